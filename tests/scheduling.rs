//! Scheduling per business number against the real RabbitMQ and Redis: each number has its own
//! queues, jobs the topology cannot place are kept and settled, and deferrals come back on time.

mod common;

use common::{NUMBER, WABA, job, spawn_app, text_job};
use serde_json::json;
use wa_sender::broker::{Broker, Envelope, H_REASON, Headers, Route, Target};
use wa_sender::config::NumberSettings;
use wa_sender::ids::{PhoneNumberId, WaId, WabaId};
use wa_sender::job::Lane;
use wa_sender::simulator::SimNumber;
use wa_sender::store::Store;

const OTHER: &str = "106540352242923";

#[tokio::test]
async fn a_backlog_on_one_number_never_delays_another_numbers_jobs() {
    let mut app = spawn_app("fair", |settings, scenario| {
        common::limit_number(settings, scenario, 20);
        settings.numbers.insert(
            OTHER.into(),
            NumberSettings {
                waba_id: WABA.into(),
                throughput_mps: 20,
                access_token: None,
                access_token_file: None,
            },
        );
        let mut other = SimNumber::new(OTHER, WABA);
        other.throughput_mps = Some(20);
        scenario.numbers.push(other);
    })
    .await;
    // 200 jobs for the first number (10 s of its throughput) are queued before 5 for the other.
    for i in 0..200 {
        app.enqueue_reply(Lane::Bulk, &text_job(&format!("a-{i}")))
            .await;
    }
    for i in 0..5 {
        let mut b = text_job(&format!("b-{i}"));
        b["phone_number_id"] = json!(OTHER);
        // The user wrote to the other number: its care window is open.
        let to = WaId::parse(b["to"].as_str().unwrap()).unwrap();
        let (waba, other) = (
            WabaId::parse(WABA).unwrap(),
            PhoneNumberId::parse(OTHER).unwrap(),
        );
        app.store
            .record_inbound(&waba, &other, &to, chrono::Utc::now())
            .await
            .unwrap();
        app.enqueue_json(Lane::Bulk, &b).await;
    }
    app.start_worker();
    for i in 0..5 {
        app.wait_job_event(&format!("b-{i}"), "message.accepted")
            .await;
    }
    // With one FIFO queue the other number's jobs would have waited behind all 200.
    let audit = app.simulator.audit();
    let first_number_sent = audit
        .accepted
        .iter()
        .filter(|s| s.phone_number_id == NUMBER)
        .count();
    assert!(
        first_number_sent < 100,
        "the other number's jobs went out after {first_number_sent} of the backlog"
    );
    assert!(
        audit
            .accepted
            .iter()
            .filter(|s| s.phone_number_id == OTHER)
            .all(|s| s.job_id.as_deref().is_some_and(|j| j.starts_with("b-")))
    );
    // The backlog is paced, not deferred: no job went through a delay queue.
    app.stop_worker().await;
    assert!(
        !app.seen.iter().any(|e| e.event == "job.deferred"),
        "no deferral for throughput"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_job_for_an_unknown_number_is_dead_lettered_and_a_legacy_lane_key_is_rerouted() {
    let mut app = spawn_app("unrouted", |_, _| {}).await;
    // Routing key `bulk.<unknown>`: no queue is bound to it; the alternate exchange keeps it.
    let mut stranger = text_job("job-stranger");
    stranger["phone_number_id"] = json!("999999999999999");
    app.enqueue_json(Lane::Bulk, &stranger).await;
    // A producer from before per-number queues publishes with the lane alone.
    let legacy = text_job("job-legacy");
    app.user_wrote(&legacy).await;
    app.broker
        .publish(
            Target::Job(Route::new(Lane::Transactional, "")),
            Envelope {
                body: serde_json::to_vec(&legacy).unwrap().into(),
                headers: Headers::default(),
            },
        )
        .await
        .unwrap();
    app.start_worker();

    let dead = app.next_dead().await;
    assert_eq!(
        dead.envelope.headers.get_str(H_REASON).as_deref(),
        Some("unknown_sender")
    );
    let body: serde_json::Value = serde_json::from_slice(&dead.envelope.body).unwrap();
    assert_eq!(body["job_id"], "job-stranger", "the original job is kept");
    app.wait_job_event("job-legacy", "message.accepted").await;
    app.stop_worker().await;
    assert_eq!(app.simulator.audit().times_sent("job-legacy"), 1);
    assert_eq!(app.simulator.audit().times_sent("job-stranger"), 0);
    app.cleanup().await;
}

#[tokio::test]
async fn a_scheduled_job_hops_through_shorter_delay_queues_silently_and_is_never_sent_early() {
    let mut app = spawn_app("hops", |_, _| {}).await;
    // The test tiers are 1s, 2s, 5s, 30s: 3.5 s is 2s + 1s + 1s, never the 5 s tier.
    let not_before = chrono::Utc::now() + chrono::TimeDelta::milliseconds(3500);
    let mut scheduled = job(
        "job-scheduled",
        json!({"type": "text", "text": {"body": "Your table is ready"}}),
    );
    scheduled["not_before"] = json!(not_before.to_rfc3339());
    app.enqueue_reply(Lane::Transactional, &scheduled).await;
    app.start_worker();

    app.wait_job_event("job-scheduled", "message.accepted")
        .await;
    let sent_at = chrono::Utc::now();
    assert!(sent_at >= not_before, "never sent before not_before");
    let deferred: Vec<_> = app
        .seen
        .iter()
        .filter(|e| e.job_id.as_deref() == Some("job-scheduled") && e.event == "job.deferred")
        .collect();
    assert_eq!(deferred.len(), 1, "one job.deferred, not one per hop");
    app.stop_worker().await;
    assert_eq!(app.simulator.audit().times_sent("job-scheduled"), 1);
    app.cleanup().await;
}

#[tokio::test]
async fn a_deferred_job_waits_in_exactly_one_delay_queue() {
    let mut app = spawn_app("one-delay", |_, _| {}).await;
    let mut scheduled = job(
        "job-later",
        json!({"type": "text", "text": {"body": "Your table is ready"}}),
    );
    scheduled["not_before"] =
        json!((chrono::Utc::now() + chrono::TimeDelta::seconds(20)).to_rfc3339());
    app.enqueue_reply(Lane::Transactional, &scheduled).await;
    app.start_worker();
    app.wait_job_event("job-later", "job.deferred").await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // Count what every delay queue holds, passively.
    let (connection, channel) = common::amqp_channel(&app.settings.amqp.url).await;
    let mut held = Vec::new();
    for &tier in app.runtime().amqp.delay_tiers.all() {
        let name = app.broker.names().delay_queue(tier);
        let count = common::ready_messages(&channel, &name).await;
        held.push((name, count));
    }
    let total: u32 = held.iter().map(|(_, n)| n).sum();
    assert_eq!(
        total, 1,
        "one copy of the deferred job, in one tier: {held:?}"
    );
    let _ = connection.close(200, "done".into()).await;
    app.stop_worker().await;
    app.cleanup().await;
}

#[tokio::test]
async fn the_job_view_tells_a_deferred_job_from_one_never_seen() {
    let mut app = spawn_app("job-view", |_, _| {}).await;
    let not_before = chrono::Utc::now() + chrono::TimeDelta::seconds(30);
    let mut scheduled = job(
        "job-waiting",
        json!({"type": "text", "text": {"body": "Your table is ready"}}),
    );
    scheduled["not_before"] = json!(not_before.to_rfc3339());
    app.enqueue_reply(Lane::Transactional, &scheduled).await;
    app.start_worker();
    app.wait_job_event("job-waiting", "job.deferred").await;

    let admin = wa_sender::app::admin(&app.runtime()).await.unwrap();
    // The deferral is noted just after its event is published.
    let mut status = admin.job("job-waiting", None).await.unwrap();
    for _ in 0..50 {
        if status.state == "deferred" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        status = admin.job("job-waiting", None).await.unwrap();
    }
    assert_eq!(status.state, "deferred", "{status:?}");
    let deferred = status.deferred.expect("since, until and why");
    assert_eq!(deferred.cause, "not_before");
    assert!(
        (deferred.until - not_before).num_milliseconds().abs() < 1_000,
        "until its not_before: {deferred:?}"
    );

    let never = admin.job("job-never-published", None).await.unwrap();
    assert_eq!(never.state, "not_seen");
    assert!(never.deferred.is_none());
    app.stop_worker().await;
    app.cleanup().await;
}
