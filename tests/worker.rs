//! End-to-end behaviour of the send worker against the real RabbitMQ and Redis and the
//! in-process simulator over real HTTP.

mod common;

use std::time::Duration;

use common::{NUMBER, job, recipient, spawn_app, text_job};
use serde_json::json;
use wa_sender::broker::{H_ATTEMPTS, H_DETAIL, H_ERROR_CODE, H_REASON};
use wa_sender::job::Lane;
use wa_sender::simulator::{Fault, FaultRule};

#[tokio::test]
async fn a_valid_job_is_sent_once_and_its_accepted_event_carries_wamid_and_metadata() {
    let mut app = spawn_app("valid", |_, _| {}).await;
    app.enqueue_reply(Lane::Transactional, &text_job("job-valid"))
        .await;
    app.start_worker();

    let event = app.wait_job_event("job-valid", "message.accepted").await;
    let audit = app.simulator.audit();
    let sent = &audit.accepted[audit
        .position("job-valid")
        .expect("the simulator received the job")];
    assert_eq!(event.wamid.as_deref(), Some(sent.wamid.as_str()));
    assert_eq!(event.metadata, json!({"order": 42, "job": "job-valid"}));
    assert_eq!(event.campaign_id.as_deref(), Some("c-1"));
    assert_eq!(event.phone_number_id.as_deref(), Some(NUMBER));
    assert_eq!(sent.to, recipient("job-valid").trim_start_matches('+'));

    // Acked: nothing left in the lane, and it was sent exactly once.
    app.stop_worker().await;
    assert_eq!(app.broker.as_ref().depth_of(Lane::Transactional).await, 0);
    assert_eq!(app.simulator.audit().times_sent("job-valid"), 1);
    app.cleanup().await;
}

#[tokio::test]
async fn a_5xx_is_retried_through_a_delay_queue_and_then_succeeds() {
    let mut app = spawn_app("retry5xx", |_, _| {}).await;
    app.simulator.inject(FaultRule {
        job_id: Some("job-5xx".into()),
        fault: Fault::Error {
            code: 131016,
            status: 500,
        },
        times: 1,
    });
    app.enqueue_reply(Lane::Bulk, &text_job("job-5xx")).await;
    app.start_worker();

    let deferred = app.wait_job_event("job-5xx", "job.deferred").await;
    assert_eq!(deferred.error.as_ref().and_then(|e| e.code), Some(131016));
    let accepted = app.wait_job_event("job-5xx", "message.accepted").await;
    assert_eq!(accepted.attempts, Some(2), "second attempt succeeds");
    let audit = app.simulator.audit();
    assert_eq!(audit.error_count(131016), 1);
    assert_eq!(audit.times_sent("job-5xx"), 1);
    app.stop_worker().await;
    app.cleanup().await;
}

#[tokio::test]
async fn a_timeout_is_retried_for_at_least_once_jobs_but_never_resent_for_at_most_once_jobs() {
    let mut app = spawn_app("timeout", |_, _| {}).await;
    // The simulator accepts both messages but answers after the client's 1 s timeout.
    for id in ["job-otp-timeout", "job-bulk-timeout"] {
        app.simulator.inject(FaultRule {
            job_id: Some(id.into()),
            fault: Fault::Delay(Duration::from_millis(2500)),
            times: 1,
        });
    }
    app.enqueue_reply(
        Lane::Otp,
        &job(
            "job-otp-timeout",
            json!({"type": "text", "text": {"body": "123456 is your code"}}),
        ),
    )
    .await;
    app.enqueue_reply(Lane::Bulk, &text_job("job-bulk-timeout"))
        .await;
    app.start_worker();

    // otp is at-least-once: the ambiguous send is retried through a delay queue and accepted.
    let accepted = app
        .wait_job_event("job-otp-timeout", "message.accepted")
        .await;
    assert_eq!(accepted.attempts, Some(2));
    // bulk is at-most-once: it waits for a webhook instead, and without one is dead-lettered.
    let deferred = app.wait_job_event("job-bulk-timeout", "job.deferred").await;
    assert_eq!(deferred.error.unwrap().title, "send outcome unknown");
    let dead = app
        .wait_job_event("job-bulk-timeout", "job.dead_lettered")
        .await;
    assert_eq!(dead.reason.map(|r| r.as_str()), Some("ambiguous_send"));
    let audit = app.simulator.audit();
    assert_eq!(
        audit.times_sent("job-otp-timeout"),
        2,
        "at-least-once may duplicate, by contract"
    );
    assert_eq!(
        audit.times_sent("job-bulk-timeout"),
        1,
        "at-most-once is never sent twice"
    );
    app.stop_worker().await;
    app.cleanup().await;
}

#[tokio::test]
async fn a_permanent_error_is_dead_lettered_with_reason_and_code() {
    let mut app = spawn_app("permanent", |_, _| {}).await;
    // The registry had the template when it last synced; Meta deleted it since, so only the
    // API can say so (132001).
    let unknown_template = job(
        "job-132001",
        json!({"type": "template", "template": {"name": "order_update", "language": {"code": "en_US"},
               "components": [{"type": "body", "parameters": [{"type": "text", "text": "Ann"}, {"type": "text", "text": "A1"}]}]}}),
    );
    app.simulator.inject(FaultRule {
        job_id: Some("job-132001".into()),
        fault: Fault::Error {
            code: 132001,
            status: 404,
        },
        times: 1,
    });
    app.opted_in(&unknown_template).await;
    app.enqueue_json(Lane::Transactional, &unknown_template)
        .await;
    app.start_worker();

    let dead = app.next_dead().await;
    assert_eq!(dead.routing_key, "template_not_approved");
    let h = &dead.envelope.headers;
    assert_eq!(
        h.get_str(H_REASON).as_deref(),
        Some("template_not_approved")
    );
    assert_eq!(h.get_int(H_ERROR_CODE), Some(132001));
    assert_eq!(h.get_int(H_ATTEMPTS), Some(1));
    assert!(
        !h.get_str(H_DETAIL).unwrap_or_default().is_empty(),
        "Meta's error_data.details travels with the dead letter"
    );
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&dead.envelope.body).unwrap(),
        unknown_template,
        "the original job is kept"
    );
    let event = app.wait_job_event("job-132001", "job.dead_lettered").await;
    assert_eq!(event.error.unwrap().code, Some(132001));
    assert_eq!(event.metadata, json!({"order": 42, "job": "job-132001"}));
    app.stop_worker().await;
    app.cleanup().await;
}

#[tokio::test]
async fn malformed_jobs_are_dead_lettered_with_a_specific_detail_and_the_worker_keeps_running() {
    let mut app = spawn_app("malformed", |_, _| {}).await;
    let mut bad_phone = text_job("job-bad-phone");
    bad_phone["to"] = json!("12345");
    let mut v2 = text_job("job-v2");
    v2["schema"] = json!("wa.send.v2");
    let long_text = job(
        "job-long",
        json!({"type": "text", "text": {"body": "x".repeat(4097)}}),
    );
    let cases: Vec<(Vec<u8>, &str, &str)> = vec![
        (
            b"{\"schema\": \"wa.send.v1\", \"job_id\": ".to_vec(),
            "invalid_job",
            "not JSON",
        ),
        (
            serde_json::to_vec(&v2).unwrap(),
            "unsupported_schema",
            "unsupported schema \"wa.send.v2\"",
        ),
        (
            serde_json::to_vec(&bad_phone).unwrap(),
            "invalid_job",
            "to: to \"*****\" is not valid",
        ),
        (
            serde_json::to_vec(&long_text).unwrap(),
            "invalid_job",
            "message.text.body: is 4097 characters long, the limit is 4096",
        ),
    ];
    for (body, _, _) in &cases {
        app.enqueue(Lane::Bulk, body.clone()).await;
    }
    app.start_worker();
    let mut got = Vec::new();
    for _ in &cases {
        let dead = app.next_dead().await;
        got.push((
            dead.routing_key.clone(),
            dead.envelope.headers.get_str(H_DETAIL).unwrap_or_default(),
            dead.envelope.body.to_vec(),
        ));
    }
    for (body, reason, detail) in &cases {
        let (r, d, _) = got
            .iter()
            .find(|(_, _, b)| b == body)
            .expect("every malformed job is dead-lettered with its body");
        assert_eq!(r, reason);
        assert!(d.contains(detail), "detail {d:?} should contain {detail:?}");
    }
    // The worker is still running and sends the next valid job.
    app.enqueue_reply(Lane::Bulk, &text_job("job-after")).await;
    app.wait_job_event("job-after", "message.accepted").await;
    assert_eq!(
        app.simulator.audit().accepted.len(),
        1,
        "no malformed job reached the Cloud API"
    );
    app.stop_worker().await;
    app.cleanup().await;
}

#[tokio::test]
async fn an_otp_job_behind_5000_bulk_jobs_is_sent_before_them() {
    let mut app = spawn_app("priority", |s, _| {
        s.worker.prefetch = 10;
        s.worker.concurrency = 4;
    })
    .await;
    for i in 0..5000 {
        app.enqueue_reply(Lane::Bulk, &text_job(&format!("bulk-{i}")))
            .await;
    }
    app.enqueue_reply(
        Lane::Otp,
        &job(
            "otp-urgent",
            json!({"type": "text", "text": {"body": "123456"}}),
        ),
    )
    .await;
    app.start_worker();
    app.wait_job_event("otp-urgent", "message.accepted").await;
    app.stop_worker().await;

    let audit = app.simulator.audit();
    let position = audit.position("otp-urgent").unwrap();
    // At most the bulk deliveries already prefetched (10) plus those in flight (4) go first.
    assert!(
        position <= 14,
        "otp was send #{position} of {}",
        audit.accepted.len()
    );
    assert!(
        app.broker.as_ref().depth_of(Lane::Bulk).await > 4000,
        "bulk was mostly still waiting"
    );
    app.cleanup().await;
}

trait DepthOf {
    async fn depth_of(&self, lane: Lane) -> u32;
}

impl DepthOf for wa_sender::broker::rabbit::RabbitBroker {
    async fn depth_of(&self, lane: Lane) -> u32 {
        wa_sender::broker::Broker::depth(self, lane).await.unwrap()
    }
}

#[tokio::test]
async fn an_otp_job_is_sent_promptly_while_a_campaign_saturates_its_number() {
    let mut app = spawn_app("saturated", |settings, scenario| {
        settings.worker.prefetch = 64;
        settings.worker.concurrency = 64;
        common::limit_number(settings, scenario, 20);
    })
    .await;
    for i in 0..300 {
        app.enqueue_reply(Lane::Bulk, &text_job(&format!("sat-{i}")))
            .await;
    }
    app.start_worker();
    while app.simulator.audit().accepted.len() < 20 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The campaign now fills every slot the number has; otp jobs arrive now and then.
    let mut before = Vec::new();
    for i in 0..8 {
        before.push(app.simulator.audit().accepted.len());
        app.enqueue_reply(
            Lane::Otp,
            &job(
                &format!("otp-saturated-{i}"),
                json!({"type": "text", "text": {"body": "123456"}}),
            ),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    for i in 0..8 {
        app.wait_job_event(&format!("otp-saturated-{i}"), "message.accepted")
            .await;
    }
    app.stop_worker().await;
    let audit = app.simulator.audit();
    // Bulk books at most a quarter of the wait bound ahead (5 slots at 20 msg/s); an otp job
    // takes the next free slot after those, instead of queueing behind a second of campaign.
    let ahead: Vec<usize> = (0..8)
        .map(|i| audit.position(&format!("otp-saturated-{i}")).unwrap() - before[i])
        .collect();
    assert!(
        ahead.iter().all(|n| *n <= 10),
        "bulk sends that went before each otp job: {ahead:?}"
    );
    app.cleanup().await;
}

/// The events kept in `queue` of the broker at `amqp_url`, read until the events of kind
/// `kind` of every one of `jobs` are there.
async fn read_kept_events(
    amqp_url: &str,
    queue: &str,
    kind: &str,
    jobs: &std::collections::BTreeSet<String>,
) -> Vec<wa_sender::event::Event> {
    use futures::StreamExt;
    use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
    let (_connection, channel) = common::amqp_channel(amqp_url).await;
    channel
        .basic_qos(100, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "late-reader".into(),
            BasicConsumeOptions::default(),
            Default::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("{queue} can be read: {e}"));
    let mut events = Vec::new();
    let mut missing = jobs.clone();
    while !missing.is_empty() {
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .unwrap_or_else(|_| panic!("no {kind} event kept for {missing:?}"))
            .unwrap()
            .unwrap();
        let message = wa_sender::event::read_message(&delivery.data).unwrap();
        for event in message {
            if event.event == kind
                && let Some(id) = &event.job_id
            {
                missing.remove(id);
            }
            events.push(event);
        }
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    events
}

#[tokio::test]
async fn events_are_kept_for_a_consumer_that_comes_after_them() {
    let mut app = spawn_app("events-kept", |settings, _| {
        settings.amqp.events_kept = 1000
    })
    .await;
    let first: std::collections::BTreeSet<String> =
        (0..5).map(|i| format!("job-kept-{i}")).collect();
    for id in &first {
        app.enqueue_reply(Lane::Bulk, &text_job(id)).await;
    }
    app.start_worker();
    app.wait_sent_once(&first, Duration::from_secs(20)).await;
    app.stop_worker().await;

    // Nobody read them while they were published; a consumer coming now reads every one.
    let queue = format!("{}.events.kept", app.prefix);
    let kept = read_kept_events(&app.settings.amqp.url, &queue, "message.accepted", &first).await;
    assert!(kept.iter().all(|e| e.wamid.is_some()), "{kept:?}");

    app.cleanup().await;
}

#[tokio::test]
async fn an_event_finding_its_kept_queue_deleted_declares_it_again_and_is_kept() {
    let app = spawn_app("events-healed", |settings, _| {
        settings.amqp.events_kept = 1000
    })
    .await;
    // A topology of its own, with no tap bound: with its kept queue gone an event reaches none.
    let mut rabbit = app.runtime().rabbit();
    rabbit.prefix = format!("{}-alone", app.prefix);
    let alone = wa_sender::broker::rabbit::RabbitBroker::connect(rabbit)
        .await
        .unwrap();
    let queue = format!("{}-alone.events.kept", app.prefix);
    let (_connection, channel) = common::amqp_channel(&app.settings.amqp.url).await;
    channel
        .queue_delete(queue.as_str().into(), Default::default())
        .await
        .unwrap();
    let event = wa_sender::event::Event {
        job_id: Some("job-healed".into()),
        ..wa_sender::event::Event::new("message.accepted")
    };
    wa_sender::broker::publish_event(&alone, &event)
        .await
        .expect("the event is published once its queue is declared again");
    let healed = std::collections::BTreeSet::from(["job-healed".to_owned()]);
    read_kept_events(&app.settings.amqp.url, &queue, "message.accepted", &healed).await;
    alone.delete_topology().await.unwrap();
    alone.close().await;
    app.cleanup().await;
}

/// A broker that nacks a publish gets it again on a new channel: RabbitMQ 3.10 has been seen to
/// nack every later publish of a channel after losing a node.
#[tokio::test]
async fn a_nacked_publish_is_followed_by_a_new_publishing_channel() {
    let app = spawn_app("publisher-nacked", |_, _| {}).await;
    // A queue that refuses every message, bound to the events exchange: the broker nacks.
    let (_connection, channel) = common::amqp_channel(&app.settings.amqp.url).await;
    let refusing = format!("{}.refusing", app.prefix);
    let exchange = app.broker.names().events_exchange();
    common::bind_refusing_queue(&channel, &refusing, &exchange).await;
    let event = wa_sender::event::Event::new("message.accepted");
    let before = app.broker.publishing_channel().await;
    let nacked = wa_sender::broker::publish_event(app.broker.as_ref(), &event)
        .await
        .expect_err("a queue at its length limit refuses the event");
    assert!(
        matches!(nacked, wa_sender::broker::BrokerError::Nacked(_)),
        "{nacked}"
    );

    channel
        .queue_delete(refusing.as_str().into(), Default::default())
        .await
        .unwrap();
    wa_sender::broker::publish_event(app.broker.as_ref(), &event)
        .await
        .expect("published once nothing refuses it");
    assert_ne!(
        app.broker.publishing_channel().await,
        before,
        "published on the channel that was nacked"
    );
    app.cleanup().await;
}
