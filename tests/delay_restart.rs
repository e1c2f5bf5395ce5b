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
