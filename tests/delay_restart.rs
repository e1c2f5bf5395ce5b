//! Deferred jobs survive a RabbitMQ restart. The test runs its own RabbitMQ node (own ports,
//! own data) with quorum queues and restarts it while every job waits in a delay queue, many
//! of them expiring while the node is down: each must still be sent, and sent once.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::node::RabbitNode;
use common::{spawn_app, text_job};
use serde_json::json;
use wa_sender::broker::rabbit::QueueType;
use wa_sender::job::Lane;

const JOBS: usize = 1000;

#[tokio::test]
async fn jobs_waiting_in_quorum_delay_queues_survive_a_broker_restart_and_are_sent_once() {
    let node = RabbitNode::start("delay-restart");
    let url = node.url();
    let mut app = spawn_app("delay-restart", move |settings, _| {
        settings.amqp.url = url;
        settings.amqp.queue_type = QueueType::Quorum;
    })
    .await;
    // Due in 5 to 9 s: the worker parks them all in the 5 s delay queue.
    let start = chrono::Utc::now();
    let mut ids = BTreeSet::new();
    for i in 0..JOBS {
        let id = format!("deferred-{i}");
        let mut job = text_job(&id);
        let due = start + chrono::TimeDelta::milliseconds(5_000 + (i as i64 % 40) * 100);
        job["not_before"] = json!(due.to_rfc3339());
        app.enqueue_reply(Lane::Bulk, &job).await;
        ids.insert(id);
    }
    app.start_worker();
    let parked = app
        .wait_event(Duration::from_secs(30), {
            let last = format!("deferred-{}", JOBS - 1);
            move |e| e.event == "job.deferred" && e.job_id.as_deref() == Some(last.as_str())
        })
        .await;
    assert_eq!(parked.event, "job.deferred");
    // Every job is in a delay queue (or on its way to it): stop the worker, restart the broker.
    app.stop_worker().await;
    assert!(
        app.simulator.audit().accepted.is_empty(),
        "nothing is due before the restart"
    );
    node.restart();

    // A new worker (as a supervisor would start one) on the healed connection.
    app.start_worker();
    app.wait_sent_once(&ids, Duration::from_secs(90)).await;
    app.stop_worker().await;
    app.cleanup().await;
    drop(node);
}

/// A RabbitMQ restart (`stop_app`/`start_app`) under a running worker: the worker is not
/// restarted by anyone, it reconnects by itself, and every job is sent exactly once.
#[tokio::test]
async fn a_running_worker_lives_through_a_broker_restart_and_sends_every_job_once() {
    const RESTART_JOBS: usize = 300;
    let node = std::sync::Arc::new(RabbitNode::start("worker-restart"));
    let url = node.url();
    let mut app = spawn_app("worker-restart", move |settings, _| {
        settings.amqp.url = url;
        settings.amqp.queue_type = QueueType::Quorum;
    })
    .await;
    let ids: Vec<String> = (0..RESTART_JOBS).map(|i| format!("live-{i}")).collect();
    for id in &ids[..RESTART_JOBS / 2] {
        app.enqueue_reply(Lane::Bulk, &text_job(id)).await;
    }
    app.start_worker();
    // Some are sent; then the broker restarts under the worker.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while app.simulator.audit().accepted.len() < 20 {
        assert!(tokio::time::Instant::now() < deadline, "nothing was sent");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let restarting = std::sync::Arc::clone(&node);
    tokio::task::spawn_blocking(move || restarting.restart())
        .await
        .unwrap();
    // More jobs after the restart (the producer's connection heals on its next publish).
    for id in &ids[RESTART_JOBS / 2..] {
        app.user_wrote(&text_job(id)).await;
        let mut published = false;
        for _ in 0..50 {
            if wa_sender::app::enqueue(
                app.broker.as_ref(),
                Lane::Bulk,
                serde_json::to_vec(&text_job(id)).unwrap(),
            )
            .await
            .is_ok()
            {
                published = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            published,
            "the producer could not publish after the restart"
        );
    }

    let ids: BTreeSet<String> = ids.into_iter().collect();
    app.wait_sent_once(&ids, Duration::from_secs(120)).await;
    app.stop_worker().await;
    app.cleanup().await;
    drop(node);
}
