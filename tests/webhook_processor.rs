//! The webhook processor against real RabbitMQ and Redis: statuses become events for their job
//! (duplicates once, never backwards), failures become dead letters with the original job id,
//! opt-outs and care windows are recorded, and what cannot be parsed is parked, not dropped.
//! The last test runs the whole path: simulator → signed POST → receiver → intake → processor.

mod common;

use std::time::Duration;

use common::webhook_envelope as envelope;
use common::{NUMBER, WABA, spawn_app};
use futures::StreamExt;
use serde_json::{Value, json};
use wa_sender::event::Event;
use wa_sender::ids::{CampaignId, WaId, WabaId, Wamid};
use wa_sender::store::{Store, WamidRecord};
use wa_sender::webhook::processor::{Processor, ProcessorSettings};

fn processor(app: &common::TestApp) -> Processor {
    Processor::new(
        app.broker.clone(),
        app.store.clone(),
        ProcessorSettings {
            stop_keywords: vec!["STOP".into(), "ABMELDEN".into()],
            ..app.runtime().processor()
        },
    )
}

/// The trace context of the producer's publish, recorded with the send.
const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn status(wamid: &str, status: &str, ts: u64, errors: Value) -> Vec<u8> {
    let mut s = json!({"id": wamid, "status": status, "timestamp": ts.to_string(), "recipient_id": "16505551234",
                       "pricing": {"billable": true, "pricing_model": "PMP", "type": "regular", "category": "utility"}});
    if !errors.is_null() {
        s["errors"] = errors;
    }
    envelope(json!({"statuses": [s]}))
}

async fn sent(app: &common::TestApp, wamid: &str, job_id: &str) {
    let record = WamidRecord {
        job_id: job_id.into(),
        campaign_id: Some("c-1".into()),
        traceparent: Some(TRACE.into()),
        metadata: json!({"order": 42}),
        resend: None,
    };
    let key = wa_sender::store::JobKey {
        waba: WabaId::parse(WABA).unwrap(),
        job_id: wa_sender::ids::JobId::parse(job_id).unwrap(),
    };
    app.store
        .mark_sent(&key, &Wamid::parse(wamid).unwrap(), &record)
        .await
        .unwrap();
}

fn events_of<'a>(app: &'a common::TestApp, kind: &str) -> Vec<&'a Event> {
    app.seen.iter().filter(|e| e.event == kind).collect()
}

async fn drain(app: &mut common::TestApp) {
    // Takes every event published so far into app.seen.
    while let Ok(Some(Ok(event))) =
        tokio::time::timeout(Duration::from_millis(500), app.events.next()).await
    {
        app.seen.push(event);
    }
}

#[tokio::test]
async fn statuses_reach_their_job_once_and_never_go_backwards() {
    let mut app = spawn_app("wh-status", |_, _| {}).await;
    let p = processor(&app);
    sent(&app, "wamid.A", "job-a").await;
    let delivered = status("wamid.A", "delivered", 1_750_030_080, Value::Null);
    let h = p.handle(&delivered).await.unwrap();
    assert_eq!(h.events, 1);
    // The event joins the job's trace.
    let event = tokio::time::timeout(Duration::from_secs(5), app.events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(event.traceparent.as_deref(), Some(TRACE));
    app.seen.push(event);
    assert_eq!(
        p.handle(&delivered).await.unwrap().duplicates,
        1,
        "Meta's duplicate"
    );
    p.handle(&status("wamid.A", "read", 1_750_030_090, Value::Null))
        .await
        .unwrap();
    // Out of order: sent and delivered arrive after read. Nothing regresses.
    assert_eq!(
        p.handle(&status("wamid.A", "sent", 1_750_030_070, Value::Null))
            .await
            .unwrap()
            .stale,
        1
    );
    assert_eq!(
        p.handle(&delivered).await.unwrap().stale,
        1,
        "delivered after read"
    );
    let waba = WabaId::parse(WABA).unwrap();
    let message = app
        .store
        .message(&waba, &Wamid::parse("wamid.A").unwrap())
        .await
        .unwrap();
    assert_eq!(message.status.as_deref(), Some("read"));
    // The campaign's report: delivered and read once, priced once (utility to a +1 number at
    // the rate card's north_america utility rate, 0.0044 USD), though two statuses were priced.
    let report = app
        .store
        .report(&waba, Some(&CampaignId::parse("c-1").unwrap()))
        .await
        .unwrap();
    assert_eq!(report.accepted, 1);
    assert_eq!(
        (
            report.reached("sent"),
            report.reached("delivered"),
            report.reached("read")
        ),
        (1, 1, 1)
    );
    assert_eq!(report.billable["utility"], 1);
    assert_eq!(report.cost_micros["utility"], 4_400);
    // A status for a wamid no job sent is still published, flagged.
    p.handle(&status(
        "wamid.stranger",
        "delivered",
        1_750_030_000,
        Value::Null,
    ))
    .await
    .unwrap();
    drain(&mut app).await;
    let delivered = events_of(&app, "message.delivered");
    assert_eq!(delivered.len(), 2);
    let ours = delivered
        .iter()
        .find(|e| e.wamid.as_deref() == Some("wamid.A"))
        .unwrap();
    assert_eq!(ours.job_id.as_deref(), Some("job-a"));
    assert_eq!(ours.campaign_id.as_deref(), Some("c-1"));
    assert_eq!(ours.metadata, json!({"order": 42}));
    assert_eq!(ours.pricing.as_ref().unwrap()["category"], "utility");
    assert_eq!(ours.correlated, None);
    let stranger = delivered
        .iter()
        .find(|e| e.wamid.as_deref() == Some("wamid.stranger"))
        .unwrap();
    assert_eq!(stranger.correlated, Some(false));
    assert_eq!(events_of(&app, "message.read").len(), 1);
    assert!(
        events_of(&app, "message.sent").is_empty(),
        "a late sent is not published"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn failed_statuses_dead_letter_with_the_original_job_id() {
    let mut app = spawn_app("wh-failed", |_, _| {}).await;
    let p = processor(&app);
    let error = |code: i64| json!([{"code": code, "title": "t", "message": "m", "error_data": {"details": format!("details {code}")}}]);
    let cases = [
        ("wamid.F1", "job-131047", 131047, "outside_care_window"),
        ("wamid.F2", "job-131050", 131050, "opted_out_marketing"),
        ("wamid.F3", "job-132001", 132001, "template_not_approved"),
    ];
    for (wamid, job, code, _) in cases {
        sent(&app, wamid, job).await;
        p.handle(&status(wamid, "failed", 1_750_030_080, error(code)))
            .await
            .unwrap();
    }
    // Vonage forwards the legacy flat format: 1020 and 1022 ride on the status itself.
    for (wamid, job, code) in [
        ("wamid.V1", "job-1020", 1020),
        ("wamid.V2", "job-1022", 1022),
    ] {
        sent(&app, wamid, job).await;
        let body = json!({"statuses": [{"id": wamid, "status": "failed", "timestamp": "1750030080", "recipient_id": "16505551234",
                                         "errors": [{"code": code, "title": "Invalid template"}]}]});
        p.handle(&serde_json::to_vec(&body).unwrap()).await.unwrap();
    }
    let mut dead = std::collections::BTreeMap::new();
    for _ in 0..5 {
        let letter = app.next_dead().await;
        let body: Value = serde_json::from_slice(&letter.envelope.body).unwrap();
        dead.insert(
            body["job_id"].as_str().unwrap().to_owned(),
            letter.routing_key,
        );
    }
    for (_, job, _, reason) in cases {
        assert_eq!(dead[job], reason, "{job}");
    }
    assert_eq!(dead["job-1020"], "template_params_invalid");
    assert_eq!(dead["job-1022"], "template_not_approved");
    drain(&mut app).await;
    let events = events_of(&app, "job.dead_lettered");
    assert_eq!(events.len(), 5);
    assert!(
        events
            .iter()
            .all(|e| e.error.as_ref().unwrap().source == wa_sender::event::ErrorSource::Webhook)
    );
    // 131050 records the opt-out, so the next marketing job is refused before any API call.
    let consent = app
        .store
        .consent(
            &WabaId::parse(WABA).unwrap(),
            &WaId::parse("16505551234").unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(consent.opt_out.unwrap().source, "131050");
    app.cleanup().await;
}

#[tokio::test]
async fn inbound_messages_open_the_window_and_stop_keywords_opt_out() {
    let mut app = spawn_app("wh-inbound", |_, _| {}).await;
    let p = processor(&app);
    let inbound = |text: &str, id: &str| {
        envelope(json!({
        "contacts": [{"profile": {"name": "Sheena"}, "wa_id": "4915100000777"}],
        "messages": [{"from": "4915100000777", "id": id, "timestamp": chrono::Utc::now().timestamp().to_string(), "type": "text", "text": {"body": text}}]}))
    };
    p.handle(&inbound("Does it come in blue?", "wamid.in1"))
        .await
        .unwrap();
    let user = WaId::parse("4915100000777").unwrap();
    let waba = WabaId::parse(WABA).unwrap();
    assert_eq!(app.store.consent(&waba, &user).await.unwrap().opt_out, None);
    // The window is open: a free-form reply is admitted.
    let job = json!({"to": "+4915100000777"});
    let reply = common::text_job("reply-after-inbound");
    let mut reply = reply;
    reply["to"] = job["to"].clone();
    app.enqueue_json(wa_sender::job::Lane::Transactional, &reply)
        .await;
    app.start_worker();
    app.wait_job_event("reply-after-inbound", "message.accepted")
        .await;
    app.stop_worker().await;

    p.handle(&inbound(" abmelden ", "wamid.in2")).await.unwrap();
    let opt_out = app
        .store
        .consent(&waba, &user)
        .await
        .unwrap()
        .opt_out
        .unwrap();
    assert_eq!(opt_out.source, "keyword:ABMELDEN");
    drain(&mut app).await;
    assert_eq!(events_of(&app, "inbound.message").len(), 2);
    assert_eq!(events_of(&app, "optout.recorded").len(), 1);
    app.cleanup().await;
}

#[tokio::test]
async fn what_cannot_be_parsed_is_parked_and_template_updates_reach_the_registry() {
    let app = spawn_app("wh-parked", |_, _| {}).await;
    let p = processor(&app);
    assert!(p.handle(b"{not json").await.unwrap().parked);
    assert!(
        p.handle(br#"{"object":"page","entry":[]}"#)
            .await
            .unwrap()
            .parked
    );
    let paused = serde_json::to_vec(&json!({"object": "whatsapp_business_account", "entry": [{"id": WABA, "changes": [{"field": "message_template_status_update",
        "value": {"event": "PAUSED", "message_template_id": 1, "message_template_name": "spring_sale", "message_template_language": "en_US", "reason": "LOW_QUALITY"}}]}]})).unwrap();
    let waba = WabaId::parse(WABA).unwrap();
    let def: wa_sender::policy::template::TemplateDefinition = serde_json::from_value(json!({
        "name": "spring_sale", "language": "en_US", "status": "APPROVED", "category": "MARKETING", "components": []})).unwrap();
    app.store
        .put_templates(&waba, &[def], chrono::Utc::now())
        .await
        .unwrap();
    p.handle(&paused).await.unwrap();
    assert_eq!(
        app.store.templates(&waba).await.unwrap()[0].status,
        "PAUSED"
    );
    let (conn, channel) = common::amqp_channel(&app.settings.amqp.url).await;
    let parked = format!("{}.webhooks.parked", app.prefix);
    let parked = common::ready_messages(&channel, &parked).await;
    assert_eq!(parked, 2, "both unreadable bodies kept");
    let _ = conn.close(200, "bye".into()).await;
    app.cleanup().await;
}

/// An app whose simulator posts its webhooks to a receiver, with a processor consuming the
/// intake: the whole path of issue 5.
async fn with_webhooks(
    test: &str,
    tweak: impl FnOnce(&mut wa_sender::simulator::Scenario),
) -> (
    common::TestApp,
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    use wa_sender::webhook::receiver::ReceiverSettings;
    let secret = "e2e-secret";
    // The receiver's address must be in the scenario before the simulator starts.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/webhook", listener.local_addr().unwrap());
    let app = spawn_app(test, |_, scenario| {
        scenario.webhooks.url = Some(url.clone());
        scenario.webhooks.app_secret = secret.into();
        tweak(scenario);
    })
    .await;
    let secrets = ReceiverSettings {
        verify_token: "v".to_owned().into(),
        app_secret: secret.to_owned().into(),
    };
    let webhook = wa_sender::app::WebhookApp::on_listener(
        &app.runtime(),
        listener,
        secrets,
        app.broker.clone(),
        app.store.clone(),
    )
    .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(webhook.run_until_stopped(stop.clone()));
    (app, stop, running)
}

#[tokio::test]
async fn simulator_to_receiver_to_processor_end_to_end() {
    let (mut app, stop, running) = with_webhooks("wh-e2e", |scenario| {
        scenario.webhooks.duplicate_share = 0.5;
        scenario.webhooks.reorder_share = 0.5;
        scenario.unknown_users.read_share = 1.0;
    })
    .await;
    for i in 0..5 {
        app.enqueue_reply(
            wa_sender::job::Lane::Transactional,
            &common::text_job(&format!("e2e-{i}")),
        )
        .await;
    }
    app.start_worker();
    for i in 0..5 {
        app.wait_job_event(&format!("e2e-{i}"), "message.read")
            .await;
    }
    app.stop_worker().await;
    drain(&mut app).await;
    // Duplicated and reordered by the simulator: one event per status and job, and none
    // after a read.
    for i in 0..5 {
        let job = format!("e2e-{i}");
        let kinds: Vec<&str> = app
            .seen
            .iter()
            .filter(|e| {
                e.job_id.as_deref() == Some(job.as_str()) && e.event.starts_with("message.")
            })
            .map(|e| e.event.as_str())
            .collect();
        assert_eq!(
            kinds.iter().filter(|k| **k == "message.read").count(),
            1,
            "{job}: {kinds:?}"
        );
        assert_eq!(
            kinds.last(),
            Some(&"message.read"),
            "{job}: nothing after read: {kinds:?}"
        );
        let mut sorted = kinds.clone();
        sorted.dedup();
        assert_eq!(
            sorted.len(),
            kinds.len(),
            "{job}: no status twice: {kinds:?}"
        );
    }
    stop.cancel();
    running.await.unwrap().unwrap();
    app.cleanup().await;
}

#[tokio::test]
async fn an_ambiguous_send_is_settled_by_its_webhook_not_resent_nor_dead_lettered() {
    let (mut app, stop, running) = with_webhooks("wh-ambiguous", |_| {}).await;
    // Meta accepts the message but answers after the client's 1 s timeout: the worker cannot
    // know. The job is at-most-once (bulk), so it waits for a webhook carrying its job id.
    app.simulator.inject(wa_sender::simulator::FaultRule {
        job_id: Some("amb-1".into()),
        fault: wa_sender::simulator::Fault::Delay(Duration::from_millis(2500)),
        times: 1,
    });
    app.enqueue_reply(wa_sender::job::Lane::Bulk, &common::text_job("amb-1"))
        .await;
    app.start_worker();
    let accepted = app.wait_job_event("amb-1", "message.accepted").await;
    assert!(
        accepted.wamid.is_some(),
        "the webhook's wamid settles the job"
    );
    app.stop_worker().await;
    drain(&mut app).await;
    assert!(
        app.seen.iter().all(|e| e.event != "job.dead_lettered"),
        "not dead-lettered ambiguous_send"
    );
    let audit = app.simulator.audit();
    assert_eq!(audit.times_sent("amb-1"), 1, "sent once");
    stop.cancel();
    running.await.unwrap().unwrap();
    app.cleanup().await;
}

#[tokio::test]
async fn a_marketing_cap_failure_sends_the_job_again_a_day_later() {
    let to = common::recipient("cap-1");
    let (mut app, stop, running) = with_webhooks("wh-cap", |scenario| {
        // Meta accepts the marketing template, then fails it: the user's cap is reached (131049).
        let mut user = wa_sender::simulator::SimUser::new(to.trim_start_matches('+'));
        user.marketing_cap_per_day = Some(0);
        scenario.users.push(user);
    })
    .await;
    let job = common::job(
        "cap-1",
        json!({"type": "template", "template": {"name": "spring_sale", "language": {"code": "en_US"},
               "components": [{"type": "body", "parameters": [{"type": "text", "text": "Ann"}]}]}}),
    );
    app.opted_in(&job).await;
    app.enqueue_json(wa_sender::job::Lane::Bulk, &job).await;
    app.start_worker();
    let accepted = app.wait_job_event("cap-1", "message.accepted").await;
    let deferred = app.wait_job_event("cap-1", "job.deferred").await;
    app.stop_worker().await;
    let error = deferred.error.expect("the failure is in the event");
    assert_eq!(error.code, Some(131049));
    assert!(error.details.contains("sent again after"), "{error:?}");
    assert_eq!(deferred.wamid, accepted.wamid);
    assert_eq!(deferred.campaign_id.as_deref(), Some("c-1"));
    // The job may be sent again: its record no longer says sent.
    let waba = WabaId::parse(WABA).unwrap();
    let key = wa_sender::store::JobKey {
        waba: waba.clone(),
        job_id: wa_sender::ids::JobId::parse("cap-1").unwrap(),
    };
    let wamid = Wamid::parse(accepted.wamid.unwrap()).unwrap();
    assert!(
        !app.store.reopen(&key, &wamid).await.unwrap(),
        "reopened already"
    );
    drain(&mut app).await;
    assert!(events_of(&app, "job.dead_lettered").is_empty());
    stop.cancel();
    running.await.unwrap().unwrap();
    app.cleanup().await;
}

/// Everything in the parked queue, taken off it: each body with its `x-wa-reason`.
async fn parked(app: &common::TestApp) -> Vec<(Value, String)> {
    let taken = app.take_all("webhooks.parked").await;
    taken
        .into_iter()
        .map(|t| {
            let reason = t.headers.get("x-wa-reason").cloned();
            let reason = reason.unwrap_or_else(|| panic!("parked without a reason: {t:?}"));
            (serde_json::from_slice(&t.body).unwrap(), reason)
        })
        .collect()
}

/// The `*.json` bodies in `tests/<dir>`, by file name, sorted.
fn fixture_bodies(dir: &str) -> Vec<(String, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    files.sort();
    files
}

/// Every signed body is understood (events) or parked with its reason; none is acked in silence.
#[tokio::test]
async fn every_fixture_becomes_events_or_parts_parked_with_their_reason() {
    let mut app = spawn_app("wh-fixtures", |_, _| {}).await;
    let p = processor(&app);
    let understood = fixture_bodies("tests/fixtures/cloud/webhook");
    assert!(understood.len() >= 10, "{understood:?}");
    for (name, body) in understood {
        let handled = p.handle(&body).await.unwrap();
        // Fixtures share wamids: a status older than one fed before is understood and, as the
        // status machine documents, publishes nothing.
        assert!(
            handled.events + handled.duplicates + handled.stale >= 1,
            "{name}: {handled:?}"
        );
        assert!(!handled.parked, "{name}: {:?}", parked(&app).await);
    }

    let expected = [
        (
            "group-lifecycle-update.json",
            "entry[0].changes[0].value: unmodelled field group_lifecycle_update",
        ),
        (
            "group-participants-update.json",
            "entry[0].changes[0].value: unmodelled field group_participants_update",
        ),
        (
            "group-settings-update.json",
            "entry[0].changes[0].value: unmodelled field group_settings_update",
        ),
        (
            "status-unknown-value.json",
            "entry[0].changes[0].value.statuses[0]: status \"teleported\" is not one of Meta's \
             (sent, delivered, read, played, failed, deleted, warning)",
        ),
        (
            "statuses-not-a-list.json",
            "entry[0].changes[0].value.statuses: is a string, not an array",
        ),
        (
            "value-null.json",
            "entry[0].changes[0]: value is null, not an object",
        ),
    ];
    let bodies = fixture_bodies("tests/fixtures/webhook-parked");
    let names: Vec<&str> = bodies.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        expected.map(|(name, _)| name),
        "one expectation per fixture"
    );
    drain(&mut app).await;
    let before = app.seen.len();
    for ((name, body), (_, reason)) in bodies.iter().zip(expected) {
        let handled = p.handle(body).await.unwrap();
        assert!(handled.parked, "{name}");
        assert_eq!(handled.events, 0, "{name}: nothing is published");
        let parked = parked(&app).await;
        let reasons: Vec<&str> = parked.iter().map(|(_, r)| r.as_str()).collect();
        assert_eq!(reasons, [reason], "{name}");
    }
    drain(&mut app).await;
    assert_eq!(
        app.seen[before..].len(),
        0,
        "no event for a parked part: {:?}",
        &app.seen[before..]
    );
    app.cleanup().await;
}

/// In a body with readable and unreadable parts, the readable ones are processed and each
/// unreadable one is parked on its own, raw, with its place and reason.
#[tokio::test]
async fn unreadable_parts_are_parked_one_by_one_and_the_rest_is_processed() {
    let mut app = spawn_app("wh-parts", |_, _| {}).await;
    let p = processor(&app);
    sent(&app, "wamid.P", "job-p").await;
    let metadata = json!({"display_phone_number": "15550783881", "phone_number_id": NUMBER});
    let teleported = json!({"id": "wamid.P", "status": "teleported", "timestamp": "1750030080",
                            "recipient_id": "16505551234"});
    let group = json!({"field": "group_status_update", "value": {"messaging_product": "whatsapp",
                       "metadata": metadata, "groups": [{"group_id": "G", "type": "group_create"}]}});
    let body = serde_json::to_vec(&json!({"object": "whatsapp_business_account", "entry": [{"id": WABA, "changes": [
        {"field": "messages", "value": {"messaging_product": "whatsapp", "metadata": metadata, "statuses": [
            teleported,
            {"id": "wamid.P", "status": "delivered", "timestamp": "1750030081", "recipient_id": "16505551234"}]}},
        group]}]}))
    .unwrap();
    let handled = p.handle(&body).await.unwrap();
    assert!(handled.parked);
    assert_eq!(handled.events, 1, "{handled:?}");
    drain(&mut app).await;
    let kinds: Vec<&str> = app.seen.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(kinds, ["message.delivered"]);
    assert_eq!(app.seen[0].job_id.as_deref(), Some("job-p"));
    let parked = parked(&app).await;
    assert_eq!(parked.len(), 2, "{parked:?}");
    assert_eq!(parked[0].0, teleported);
    assert!(
        parked[0]
            .1
            .starts_with("entry[0].changes[0].value.statuses[0]: status \"teleported\""),
        "{}",
        parked[0].1
    );
    assert_eq!(parked[1].0, group);
    assert_eq!(
        parked[1].1,
        "entry[0].changes[1].value: unmodelled field group_status_update"
    );
    app.cleanup().await;
}
