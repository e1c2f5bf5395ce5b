//! Operators and the dead letters: `wa-sender dead list|show|replay` and `wa-sender job`, and
//! the same over the admin HTTP API, against a real worker, RabbitMQ and Redis. Start them with
//! `rabbitmq-server -detached` and `redis-server --daemonize yes`.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use wa_sender::admin::Admin;
use wa_sender::admin::http::AdminServer;
use wa_sender::broker::{Broker, Envelope, H_LANE, Headers, Target};
use wa_sender::ids::{JobId, PhoneNumberId, WabaId, Wamid};
use wa_sender::job::Lane;
use wa_sender::policy::admission::JobState;
use wa_sender::store::{JobKey, Store, WamidRecord};
use wa_sender::vocab::DeadReason;

use common::{TestApp, spawn_app, text_job};

const NUMBER: &str = "106540352242922";
const WABA: &str = "102290129340398";

fn key(job_id: &str) -> JobKey {
    JobKey {
        waba: WabaId::parse(WABA).unwrap(),
        job_id: JobId::parse(job_id).unwrap(),
    }
}

/// Waits until the worker has recorded the job dead (it does so just after the dead letter
/// and its event): a replay before that would find no record to reopen.
async fn wait_recorded_dead(app: &TestApp, job_id: &str) {
    for _ in 0..100 {
        if app.store.job(&key(job_id)).await.unwrap() == Some(JobState::Dead) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{job_id} was never recorded dead");
}

/// A text job sent outside its care window: the worker dead-letters it.
async fn dead_lettered(app: &mut TestApp, job_id: &str) -> Value {
    let job = text_job(job_id);
    app.enqueue_json(Lane::Transactional, &job).await;
    let event = app.wait_job_event(job_id, "job.dead_lettered").await;
    assert_eq!(
        event.reason,
        Some(DeadReason::OutsideCareWindow),
        "{event:?}"
    );
    wait_recorded_dead(app, job_id).await;
    job
}

fn accepted(app: &TestApp, job_id: &str) -> usize {
    app.simulator
        .audit()
        .accepted
        .iter()
        .filter(|s| s.job_id.as_deref() == Some(job_id))
        .count()
}

async fn wait_accepted(app: &mut TestApp, job_id: &str) {
    app.wait_job_event(job_id, "message.accepted").await;
    assert_eq!(accepted(app, job_id), 1, "sent exactly once");
}

#[tokio::test]
async fn operators_list_replay_and_follow_a_dead_letter_from_the_command_line() {
    let mut app = spawn_app("dead-cli", |_, _| {}).await;
    app.start_worker();
    let job = dead_lettered(&mut app, "dead-cli-1").await;

    // Listing shows it, and leaves it where it is.
    for _ in 0..2 {
        let listed = app
            .run_json(&["dead", "list", "--reason", "outside_care_window"])
            .await;
        let listed = listed.as_array().unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
        let letter = &listed[0];
        assert_eq!(letter["job_id"], "dead-cli-1");
        assert_eq!(letter["campaign_id"], "c-1");
        assert_eq!(letter["reason"], "outside_care_window");
        assert_eq!(letter["lane"], "transactional");
        assert_eq!(letter["route"], format!("transactional.{NUMBER}"));
        assert!(
            letter["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{letter}"
        );
        assert!(letter["dead_at"].is_string(), "{letter}");
    }
    let other = app.run_json(&["dead", "list", "--campaign", "c-2"]).await;
    assert_eq!(other, json!([]), "another campaign's letters only");
    let shown = app.run_json(&["dead", "show", "dead-cli-1"]).await;
    assert_eq!(shown["body"]["job_id"], "dead-cli-1");
    assert_eq!(shown["headers"]["x-wa-reason"], "outside_care_window");
    let job_state = app.run_json(&["job", "dead-cli-1"]).await;
    assert_eq!(job_state["state"], "dead");
    assert_eq!(job_state["dead_letter"]["reason"], "outside_care_window");

    // A dry run changes nothing; a replay after the window opened sends it, once.
    let dry = app
        .run_json(&["dead", "replay", "dead-cli-1", "--dry-run"])
        .await;
    assert_eq!(dry["replayed"], json!(["dead-cli-1"]));
    assert_eq!(accepted(&app, "dead-cli-1"), 0);
    app.user_wrote(&job).await;
    let replayed = app.run_json(&["dead", "replay", "dead-cli-1"]).await;
    assert_eq!(replayed["replayed"], json!(["dead-cli-1"]), "{replayed}");
    wait_accepted(&mut app, "dead-cli-1").await;
    assert_eq!(app.run_json(&["dead", "list"]).await, json!([]));

    // A dead letter of a job that was sent is not sent again, and stays.
    let mut headers = Headers::default();
    headers.set_str(H_LANE, "transactional");
    let letter = Envelope {
        body: Bytes::from(serde_json::to_vec(&job).unwrap()),
        headers,
    };
    app.broker
        .publish(Target::Dead(DeadReason::MaxAttempts), letter)
        .await
        .unwrap();
    let again = app
        .run_json(&["dead", "replay", "--reason", "max_attempts"])
        .await;
    assert_eq!(again["replayed"], json!([]), "{again}");
    assert_eq!(again["skipped"][0]["job_id"], "dead-cli-1");
    assert!(
        again["skipped"][0]["why"]
            .as_str()
            .unwrap()
            .contains("already sent"),
        "{again}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(accepted(&app, "dead-cli-1"), 1, "not sent again");

    let job_state = app.run_json(&["job", "dead-cli-1"]).await;
    assert_eq!(job_state["state"], "sent", "{job_state}");
    let wamid = &app.simulator.audit().accepted[0].wamid;
    assert_eq!(job_state["wamid"], json!(wamid));
    assert_eq!(job_state["dead_letter"]["reason"], "max_attempts");

    app.stop_worker().await;
    app.cleanup().await;
}

#[tokio::test]
async fn the_admin_api_lists_replays_and_tells_a_jobs_state() {
    let mut app = spawn_app("dead-http", |_, _| {}).await;
    app.start_worker();
    let job = dead_lettered(&mut app, "dead-http-1").await;

    let numbers = BTreeMap::from([(
        PhoneNumberId::parse(NUMBER).unwrap(),
        WabaId::parse(WABA).unwrap(),
    )]);
    let store: Arc<dyn Store> = app.store.clone();
    let admin = Admin::new(store, numbers)
        .unwrap()
        .with_broker(app.broker.clone());
    let token = "dead-letters-token";
    let server = AdminServer::bind("127.0.0.1:0", admin, &SecretString::from(token))
        .await
        .unwrap();
    let base = format!("http://{}", server.addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(server.run_until_stopped(stop.clone()));
    let client = reqwest::Client::new();
    let call = |request: reqwest::RequestBuilder| async move {
        let response = request.bearer_auth(token).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json::<Value>().await.unwrap())
    };

    let (status, listed) = call(client.get(format!(
        "{base}/v1/dead?reason=outside_care_window&limit=10"
    )))
    .await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed[0]["job_id"], "dead-http-1");
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let (status, bad) = call(client.get(format!("{base}/v1/dead?limit=many"))).await;
    assert_eq!((status, &bad["field"]), (400, &json!("limit")), "{bad}");
    let (status, shown) = call(client.get(format!("{base}/v1/dead/dead-http-1"))).await;
    assert_eq!(status, 200);
    assert_eq!(shown["body"]["to"], job["to"]);
    let (status, _) = call(client.get(format!("{base}/v1/dead/nobody"))).await;
    assert_eq!(status, 404);

    let (status, bad) = call(
        client
            .post(format!("{base}/v1/dead/replay"))
            .json(&json!({})),
    )
    .await;
    assert_eq!((status, &bad["field"]), (400, &json!("job_id")), "{bad}");
    app.user_wrote(&job).await;
    let (status, replayed) = call(
        client
            .post(format!("{base}/v1/dead/replay"))
            .json(&json!({"job_id": "dead-http-1"})),
    )
    .await;
    assert_eq!(status, 200, "{replayed}");
    assert_eq!(replayed["replayed"], json!(["dead-http-1"]));
    wait_accepted(&mut app, "dead-http-1").await;

    let (status, state) = call(client.get(format!("{base}/v1/jobs/dead-http-1"))).await;
    assert_eq!(status, 200, "{state}");
    assert_eq!(state["state"], "sent");
    assert!(state["wamid"].is_string(), "{state}");
    assert_eq!(state["dead_letter"], Value::Null, "the dead queue is empty");
    let (_, listed) = call(client.get(format!("{base}/v1/dead"))).await;
    assert_eq!(listed, json!([]));

    stop.cancel();
    app.stop_worker().await;
    app.cleanup().await;
}

#[tokio::test]
async fn a_dead_letter_that_recorded_no_lane_is_replayed_to_the_lane_named() {
    let mut app = spawn_app("dead-lane", |_, _| {}).await;
    app.start_worker();
    // Dead-lettered before letters recorded their lane: no `x-wa-lane` header.
    let job = text_job("dead-lane-1");
    app.user_wrote(&job).await;
    let letter = Envelope {
        body: Bytes::from(serde_json::to_vec(&job).unwrap()),
        headers: Headers::default(),
    };
    app.broker
        .publish(Target::Dead(DeadReason::MaxAttempts), letter)
        .await
        .unwrap();
    // A webhook's failure report: no lane either, and not a job.
    let report = Envelope {
        body: Bytes::from_static(
            br#"{"job_id":"dead-lane-2","wamid":"wamid.X","status":"failed"}"#,
        ),
        headers: Headers::default(),
    };
    app.broker
        .publish(Target::Dead(DeadReason::MaxAttempts), report)
        .await
        .unwrap();

    let stays = app
        .run_json(&["dead", "replay", "--reason", "max_attempts"])
        .await;
    assert_eq!(stays["replayed"], json!([]), "{stays}");
    let why = stays["skipped"][0]["why"].as_str().unwrap();
    assert!(why.contains("--lane"), "says how to replay it: {stays}");

    let replayed = app
        .run_json(&[
            "dead",
            "replay",
            "--reason",
            "max_attempts",
            "--lane",
            "bulk",
        ])
        .await;
    assert_eq!(replayed["replayed"], json!(["dead-lane-1"]), "{replayed}");
    assert_eq!(
        replayed["skipped"][0]["job_id"], "dead-lane-2",
        "{replayed}"
    );
    assert!(
        replayed["skipped"][0]["why"]
            .as_str()
            .unwrap()
            .contains("not a send job"),
        "{replayed}"
    );
    wait_accepted(&mut app, "dead-lane-1").await;
    let left = app.run_json(&["dead", "list"]).await;
    assert_eq!(
        left.as_array().unwrap().len(),
        1,
        "the report stays: {left}"
    );

    app.stop_worker().await;
    app.cleanup().await;
}

/// A job Meta accepted whose `message.accepted` could not be published (a broker nacking every
/// publish) comes back until its last delivery: it is announced sent, never dead-lettered.
#[tokio::test]
async fn a_sent_job_on_its_last_delivery_is_announced_sent_not_dead_lettered() {
    let (mut app, _lane, wamid) = sent_on_its_last_delivery("limit-sent", "wamid.LIMITSENT").await;

    app.start_worker();
    let event = app.wait_job_event("limit-sent", "message.accepted").await;
    assert_eq!(event.wamid.as_deref(), Some("wamid.LIMITSENT"), "{event:?}");
    let dead = app.run_json(&["dead", "list"]).await;
    assert_eq!(dead.as_array().unwrap().len(), 0, "{dead}");
    assert!(
        !app.seen.iter().any(|e| e.event == "job.dead_lettered"),
        "{:?}",
        app.seen
    );
    assert_eq!(
        app.store.job(&key("limit-sent")).await.unwrap(),
        Some(JobState::Sent(wamid))
    );
    assert_eq!(accepted(&app, "limit-sent"), 0, "not sent again");

    app.stop_worker().await;
    app.cleanup().await;
}

/// A sent job on its last delivery whose `message.accepted` the broker refuses is held and
/// its event published again once the broker takes it: returned, the broker would have
/// dead-lettered it (its delivery limit) although Meta accepted it.
#[tokio::test]
async fn a_sent_job_whose_event_is_refused_on_its_last_delivery_is_not_dead_lettered() {
    let (mut app, lane, wamid) =
        sent_on_its_last_delivery("limit-refused", "wamid.LIMITREFUSED").await;
    // Every event refused: the broker nacks the job's `message.accepted`.
    let refusing = format!("{}.refusing", app.prefix);
    let events = app.broker.names().events_exchange();
    common::bind_refusing_queue(&lane.channel, &refusing, &events).await;

    app.start_worker();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    lane.channel
        .queue_delete(refusing.as_str().into(), Default::default())
        .await
        .unwrap();
    let event = app
        .wait_job_event("limit-refused", "message.accepted")
        .await;
    assert_eq!(
        event.wamid.as_deref(),
        Some("wamid.LIMITREFUSED"),
        "{event:?}"
    );
    app.stop_worker().await;

    let dead = app.run_json(&["dead", "list"]).await;
    assert_eq!(dead.as_array().unwrap().len(), 0, "{dead}");
    assert_eq!(
        common::ready_messages(&lane.channel, &lane.queue).await,
        0,
        "settled, not left in its lane"
    );
    assert_eq!(
        app.store.job(&key("limit-refused")).await.unwrap(),
        Some(JobState::Sent(wamid))
    );
    assert_eq!(accepted(&app, "limit-refused"), 0, "not sent again");
    app.cleanup().await;
}

/// A limited app with `job_id` in its bulk lane on its last delivery (returned twice), recorded
/// sent as `wamid`.
async fn sent_on_its_last_delivery(job_id: &str, wamid: &str) -> (TestApp, BulkLane, Wamid) {
    let (app, lane) = limited(job_id).await;
    app.enqueue_reply(Lane::Bulk, &text_job(job_id)).await;
    let wamid = Wamid::parse(wamid).unwrap();
    let record = WamidRecord {
        job_id: job_id.into(),
        campaign_id: None,
        traceparent: None,
        metadata: Value::Null,
        resend: None,
    };
    app.store
        .mark_sent(&key(job_id), &wamid, &record)
        .await
        .unwrap();
    for expected in 0..2 {
        assert_eq!(lane.take(job_id).await, expected);
    }
    (app, lane, wamid)
}

/// An app whose quorum lanes give a job up after 2 returns, and its bulk lane.
async fn limited(test: &str) -> (TestApp, BulkLane) {
    let app = spawn_app(test, |settings, _| {
        settings.amqp.queue_type = wa_sender::broker::rabbit::QueueType::Quorum;
        settings.amqp.delivery_limit = 2;
    })
    .await;
    let (connection, channel) = common::amqp_channel(&app.settings.amqp.url).await;
    let queue = format!("{}.send.{NUMBER}.bulk", app.prefix);
    let lane = BulkLane {
        _connection: connection,
        channel,
        queue,
    };
    (app, lane)
}

/// The test number's bulk lane, taken from as a worker would.
struct BulkLane {
    _connection: lapin::Connection,
    channel: lapin::Channel,
    queue: String,
}

impl BulkLane {
    /// Takes `job` (the next message) and returns it, as a worker that dies holding it would:
    /// its returns before this one.
    async fn take(&self, job: &str) -> i64 {
        for _ in 0..50 {
            if let Some(count) = return_once(&self.channel, &self.queue).await {
                return count;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{job} never came");
    }
}

/// Gets the next message of `queue` and returns it to the queue, as a worker that dies holding
/// it would: the broker counts the return.
async fn return_once(channel: &lapin::Channel, queue: &str) -> Option<i64> {
    let got = channel
        .basic_get(
            queue.into(),
            lapin::options::BasicGetOptions { no_ack: false },
        )
        .await
        .unwrap()?;
    let count = got
        .delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-delivery-count").cloned());
    got.delivery
        .acker
        .reject(lapin::options::BasicRejectOptions { requeue: true })
        .await
        .unwrap();
    Some(match count {
        Some(lapin::types::AMQPValue::LongLongInt(n)) => n,
        other => panic!("a quorum queue counts returns: {other:?}"),
    })
}

#[tokio::test]
async fn a_job_returned_past_its_delivery_limit_is_dead_lettered_with_a_reason_never_dropped() {
    let (mut app, lane) = limited("delivery-limit").await;
    // Returned three times: past the limit of 2, RabbitMQ dead-letters it itself.
    let by_broker = text_job("limit-broker");
    app.enqueue_reply(Lane::Bulk, &by_broker).await;
    for expected in 0..3 {
        assert_eq!(lane.take("limit-broker").await, expected);
    }
    // Returned twice: its next delivery is its last, and the worker dead-letters it.
    let by_worker = text_job("limit-worker");
    app.enqueue_reply(Lane::Bulk, &by_worker).await;
    for expected in 0..2 {
        assert_eq!(lane.take("limit-worker").await, expected);
    }
    app.start_worker();
    let event = app
        .wait_job_event("limit-worker", "job.dead_lettered")
        .await;
    assert_eq!(event.reason, Some(DeadReason::DeliveryLimit), "{event:?}");
    wait_recorded_dead(&app, "limit-worker").await;

    let listed = app
        .run_json(&["dead", "list", "--reason", "delivery_limit"])
        .await;
    let listed: BTreeMap<String, Value> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["job_id"].as_str().unwrap().to_owned(), l.clone()))
        .collect();
    assert_eq!(listed.len(), 2, "{listed:?}");
    for letter in listed.values() {
        assert_eq!(letter["lane"], "bulk", "{letter}");
        assert_eq!(letter["route"], format!("bulk.{NUMBER}"), "{letter}");
    }
    let detail = |id: &str| listed[id]["detail"].as_str().unwrap().to_owned();
    assert!(
        detail("limit-broker").contains("dead-lettered by RabbitMQ (delivery_limit)"),
        "{}",
        detail("limit-broker")
    );
    assert!(
        detail("limit-worker").contains("returned to its queue 2 times"),
        "{}",
        detail("limit-worker")
    );
    assert_eq!(
        accepted(&app, "limit-broker") + accepted(&app, "limit-worker"),
        0
    );

    // Replayed, both go back to their lane and are sent (returns are not counted any more).
    let replayed = app
        .run_json(&["dead", "replay", "--reason", "delivery_limit"])
        .await;
    assert_eq!(
        replayed["replayed"].as_array().unwrap().len(),
        2,
        "{replayed}"
    );
    wait_accepted(&mut app, "limit-broker").await;
    wait_accepted(&mut app, "limit-worker").await;

    app.stop_worker().await;
    app.cleanup().await;
}
