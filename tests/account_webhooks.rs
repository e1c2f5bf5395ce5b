//! Meta's account webhooks through the real processor, against real RabbitMQ and Redis: each is
//! applied to the state the worker reads, in Redis, so every replica sees it.
//! - `business_capability_update`: the portfolio's messaging limit (admission's tier limit).
//! - `template_category_update`: the template's category in the registry (admission's opt-out
//!   and opt-in rules, the definitions every replica loads).
//! - `phone_number_quality_update`: a throughput upgrade reaches the number its display number
//!   names, among several, as `messages` webhooks paired them.
//! - `account_update`: restrictions, a disabled, deleted or offboarded WABA halt it for every
//!   replica; a reinstated or reconnected one is lifted.
//!
//! The bodies are the fixtures in `tests/fixtures/cloud/webhook/`, written after the examples of
//! Meta's webhook reference, with the times a test needs put in.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use common::{NUMBER, WABA, spawn_app};
use futures::StreamExt;
use serde_json::{Value, json};
use wa_sender::event::{DeadReason, Event};
use wa_sender::ids::{JobId, PhoneNumberId, WaId, WabaId};
use wa_sender::policy::admission::{OptInPolicy, PairRate, Request, TemplateUse, Verdict};
use wa_sender::policy::template::TemplateDefinition;
use wa_sender::store::{ACCOUNT_HALT_RECHECK, Halt, HaltScope, Heartbeat, JobKey, Store, Subject};
use wa_sender::webhook::processor::{Processor, ProcessorSettings};

/// A second number of the test portfolio, and the display numbers of both.
const OTHER: &str = "106540352242923";
const NUMBER_SHOWS: &str = "15550783881";
const OTHER_SHOWS: &str = "15550783882";

fn waba() -> WabaId {
    WabaId::parse(WABA).unwrap()
}

fn id(number: &str) -> PhoneNumberId {
    PhoneNumberId::parse(number).unwrap()
}

/// A processor for the test app; `numbers`: the portfolio's configured numbers.
fn processor(app: &common::TestApp, numbers: &[&str]) -> Processor {
    Processor::new(
        app.broker.clone(),
        app.store.clone(),
        ProcessorSettings {
            numbers: numbers.iter().map(|n| (id(n), waba())).collect(),
            ..app.runtime().processor()
        },
    )
}

/// The fixture `name`, as JSON to put a test's values in.
fn fixture(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/cloud/webhook")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("fixture JSON")
}

/// The first change's value of a fixture body.
fn value(body: &mut Value) -> &mut Value {
    &mut body["entry"][0]["changes"][0]["value"]
}

fn bytes(body: &Value) -> Vec<u8> {
    serde_json::to_vec(body).unwrap()
}

/// Every event published so far, taken into `app.seen`.
async fn drain(app: &mut common::TestApp) {
    while let Ok(Some(Ok(event))) =
        tokio::time::timeout(Duration::from_millis(500), app.events.next()).await
    {
        app.seen.push(event);
    }
}

fn events<'a>(app: &'a common::TestApp, kind: &str) -> Vec<&'a Event> {
    app.seen.iter().filter(|e| e.event == kind).collect()
}

/// Everything in the parked queue, taken off it: each reason.
async fn parked(app: &common::TestApp) -> Vec<String> {
    app.take_all("webhooks.parked")
        .await
        .into_iter()
        .map(|t| t.headers.get("x-wa-reason").cloned().expect("a reason"))
        .collect()
}

#[tokio::test]
async fn business_capability_update_sets_the_portfolios_messaging_limit() {
    let mut app = spawn_app("acct-limit", |_, _| {}).await;
    let p = processor(&app, &[NUMBER]);
    let store = app.store.clone();
    assert_eq!(store.tier_limit(&waba()).await.unwrap(), None);

    // Meta's example: 2,000 users a day, in both the current and the deprecated field.
    let example = fixture("business-capability-update.json");
    let handled = p.handle(&bytes(&example)).await.unwrap();
    assert_eq!((handled.events, handled.parked), (1, false));
    assert_eq!(store.tier_limit(&waba()).await.unwrap(), Some(Some(2000)));

    let limit_after = |fields: Value| {
        let mut body = example.clone();
        *value(&mut body) = fields;
        let (p, store) = (&p, &store);
        async move {
            let handled = p.handle(&bytes(&body)).await.unwrap();
            assert!(!handled.parked, "{body}");
            store.tier_limit(&waba()).await.unwrap()
        }
    };
    // -1 is unlimited; a sender's tier name is read as Meta's number; the deprecated per-phone
    // field counts when it is the only one.
    assert_eq!(
        limit_after(json!({"max_daily_conversations_per_business": -1})).await,
        Some(None)
    );
    assert_eq!(
        limit_after(json!({"max_daily_conversations_per_business": "TIER_10K"})).await,
        Some(Some(10_000))
    );
    assert_eq!(
        limit_after(json!({"max_daily_conversation_per_phone": 100_000})).await,
        Some(Some(100_000))
    );
    assert_eq!(
        limit_after(json!({"max_phone_numbers_per_waba": 20})).await,
        Some(Some(100_000)),
        "no limit stated: the recorded one stays"
    );

    // A limit that is not one is parked with its reason, and the recorded one stays.
    let mut unreadable = example.clone();
    value(&mut unreadable)["max_daily_conversations_per_business"] = json!("lots");
    let handled = p.handle(&bytes(&unreadable)).await.unwrap();
    assert!(handled.parked);
    assert_eq!(handled.events, 0);
    assert_eq!(
        parked(&app).await,
        [
            "entry[0].changes[0].value: max_daily_conversations_per_business \"lots\" is not a \
          messaging limit (250, 2000, 10000, 100000, -1 for unlimited, or a TIER_* name)"
        ]
    );
    assert_eq!(
        store.tier_limit(&waba()).await.unwrap(),
        Some(Some(100_000))
    );

    drain(&mut app).await;
    let limits: Vec<&Value> = events(&app, "portfolio.limit_changed")
        .iter()
        .map(|e| &e.metadata["messaging_limit"])
        .collect();
    assert_eq!(
        limits,
        [
            &json!(2000),
            &json!("unlimited"),
            &json!(10_000),
            &json!(100_000),
            &Value::Null
        ]
    );
    app.cleanup().await;
}

/// An admission request as the worker makes it for a template job, with no opt-in required.
fn template_request(now: DateTime<Utc>) -> Request {
    Request {
        owner: "w1".into(),
        now,
        lease: Duration::from_secs(60),
        retake_ambiguous: false,
        expires_at: None,
        not_before: None,
        free_form: false,
        template: Some(TemplateUse {
            fallback: false,
            params: None,
        }),
        opt_in: OptInPolicy {
            marketing: false,
            utility: false,
            authentication: false,
        },
        tier_limit: None,
        pair: PairRate {
            margin: Duration::ZERO,
            period: Duration::from_secs(6),
            burst: 3,
        },
        campaign_recheck: Duration::from_secs(60),
        template_recheck: Duration::from_secs(60),
    }
}

#[tokio::test]
async fn template_category_update_moves_a_template_under_the_marketing_rules() {
    let mut app = spawn_app("acct-category", |_, _| {}).await;
    let p = processor(&app, &[NUMBER]);
    let store = app.store.clone();
    let def: TemplateDefinition = serde_json::from_value(json!({
        "name": "order_update", "language": "en_US", "status": "APPROVED", "category": "UTILITY",
        "components": [{"type": "BODY", "text": "Your order {{1}} has shipped"}]}))
    .unwrap();
    store
        .put_templates(&waba(), &[def], Utc::now())
        .await
        .unwrap();
    // The user stopped marketing messages: utility templates still reach them.
    let user = "4915100000080";
    let mark = wa_sender::policy::admission::Mark {
        at: Utc::now(),
        source: "user_preferences".into(),
    };
    store
        .record_opt_out(&waba(), &WaId::parse(user).unwrap(), Some(mark))
        .await
        .unwrap();
    let admit = |job: &'static str| {
        let store = store.clone();
        async move {
            let subject = Subject {
                job: JobKey {
                    waba: waba(),
                    job_id: JobId::parse(job).unwrap(),
                },
                number: id(NUMBER),
                to: WaId::parse(user).unwrap(),
                campaign: None,
                template: Some(("order_update".into(), "en_US".into())),
            };
            store
                .admit(&subject, &template_request(Utc::now()))
                .await
                .unwrap()
        }
    };
    assert_eq!(admit("cat-1").await, Verdict::Send { fallback: false });

    // Meta announces the change: new_category is still the current one; nothing changes yet.
    let impending = fixture("template-category-update-impending.json");
    assert_eq!(p.handle(&bytes(&impending)).await.unwrap().events, 1);
    assert_eq!(admit("cat-2").await, Verdict::Send { fallback: false });

    // Meta made it marketing: the opt-out applies to the next job, on every replica.
    let done = fixture("template-category-update.json");
    let handled = p.handle(&bytes(&done)).await.unwrap();
    assert_eq!((handled.events, handled.parked), (1, false));
    let verdict = admit("cat-3").await;
    assert!(
        matches!(&verdict, Verdict::Dead(why) if why.reason() == DeadReason::OptedOutMarketing),
        "{verdict:?}"
    );
    // The definitions every replica loads say so too (the pricing category of its sends).
    let registry = wa_sender::registry::Registry::new();
    registry.load(store.as_ref(), &[waba()]).await.unwrap();
    let loaded = registry.get(&waba(), "order_update", "en_US").unwrap();
    assert_eq!(loaded.category, "MARKETING");
    assert_eq!(loaded.status, "APPROVED");

    // A template the registry does not hold yet waits for the sync; the event still goes out.
    let mut unknown = done.clone();
    value(&mut unknown)["message_template_name"] = json!("spring_sale");
    assert_eq!(p.handle(&bytes(&unknown)).await.unwrap().events, 1);
    assert_eq!(store.templates(&waba()).await.unwrap().len(), 1);

    drain(&mut app).await;
    let changes: Vec<(&Value, &Value, &Value)> = events(&app, "template.category_changed")
        .iter()
        .map(|e| {
            let m = &e.metadata;
            (
                &m["category"],
                &m["previous_category"],
                &m["correct_category"],
            )
        })
        .collect();
    assert_eq!(
        changes,
        [
            (&json!("UTILITY"), &Value::Null, &json!("MARKETING")),
            (&json!("MARKETING"), &json!("UTILITY"), &Value::Null),
            (&json!("MARKETING"), &json!("UTILITY"), &Value::Null),
        ]
    );
    app.cleanup().await;
}

/// A `messages` body with one status sent from `number`, which shows as `display`.
fn status_from(number: &str, display: &str, wamid: &str) -> Vec<u8> {
    bytes(
        &json!({"object": "whatsapp_business_account", "entry": [{"id": WABA, "changes": [{
        "field": "messages", "value": {"messaging_product": "whatsapp",
        "metadata": {"display_phone_number": display, "phone_number_id": number},
        "statuses": [{"id": wamid, "status": "delivered", "timestamp": "1750030080",
                      "recipient_id": "16505551234"}]}}]}]}),
    )
}

/// The throughput recorded for each of the portfolio's numbers, as a worker's heartbeat learns it.
async fn throughput(store: &dyn Store) -> BTreeMap<PhoneNumberId, u32> {
    let numbers = [id(NUMBER), id(OTHER)];
    let beat = Heartbeat {
        group: "acct",
        replica: "r1",
        now: Utc::now(),
        ttl: Duration::from_secs(30),
        numbers: &numbers,
    };
    store.heartbeat(&beat).await.unwrap().throughput
}

#[tokio::test]
async fn a_throughput_upgrade_reaches_the_number_its_display_number_names_among_several() {
    let mut app = spawn_app("acct-quality", |_, _| {}).await;
    let p = processor(&app, &[NUMBER, OTHER]);
    let store = app.store.clone();
    let upgrade = |display: &str| {
        let mut body = fixture("phone-quality-throughput-upgrade.json");
        value(&mut body)["display_phone_number"] = json!(display);
        bytes(&body)
    };
    // Before any messages webhook paired display numbers with ids, two numbers: no guess.
    p.handle(&upgrade(OTHER_SHOWS)).await.unwrap();
    assert_eq!(throughput(store.as_ref()).await, BTreeMap::new());

    // Status webhooks name each number with its display number (a BSP's with + and dashes).
    p.handle(&status_from(NUMBER, NUMBER_SHOWS, "wamid.Q1"))
        .await
        .unwrap();
    p.handle(&status_from(OTHER, "+1 555-078-3882", "wamid.Q2"))
        .await
        .unwrap();
    let handled = p.handle(&upgrade(OTHER_SHOWS)).await.unwrap();
    assert!(!handled.parked);
    assert_eq!(
        throughput(store.as_ref()).await,
        BTreeMap::from([(id(OTHER), 1000)]),
        "the upgraded number, not the other"
    );
    // The portfolio's limit came with it (TIER_UNLIMITED).
    assert_eq!(store.tier_limit(&waba()).await.unwrap(), Some(None));

    // Another replica's processor finds the pairing in Redis.
    let replica = processor(&app, &[NUMBER, OTHER]);
    replica.handle(&upgrade("+1 555 078 3881")).await.unwrap();
    assert_eq!(
        throughput(store.as_ref()).await,
        BTreeMap::from([(id(NUMBER), 1000), (id(OTHER), 1000)])
    );

    // A display number no webhook paired is not applied to anyone.
    store.set_throughput(&id(NUMBER), 80).await.unwrap();
    replica.handle(&upgrade("15550783889")).await.unwrap();
    assert_eq!(
        throughput(store.as_ref()).await,
        BTreeMap::from([(id(NUMBER), 80), (id(OTHER), 1000)])
    );

    drain(&mut app).await;
    let applied: Vec<Option<&str>> = events(&app, "number.throughput_changed")
        .iter()
        .map(|e| e.phone_number_id.as_deref())
        .collect();
    assert_eq!(applied, [None, Some(OTHER), Some(NUMBER), None]);
    app.cleanup().await;
}

/// The halts in force now, as the worker reads them: (scope, cause) each.
async fn halts(store: &dyn Store, at: DateTime<Utc>) -> Vec<(String, String)> {
    store
        .halts(at)
        .await
        .unwrap()
        .into_iter()
        .map(|h| (h.scope, h.cause))
        .collect()
}

#[tokio::test]
async fn account_updates_halt_the_waba_for_every_replica_and_reinstatement_lifts_it() {
    let mut app = spawn_app("acct-halts", |_, _| {}).await;
    let p = processor(&app, &[NUMBER]);
    let store = app.store.clone();
    let scope = HaltScope::Waba(waba()).to_string();

    // Disabled: halted with no end, every replica reads it from Redis.
    let handled = p
        .handle(&bytes(&fixture("account-update-disabled.json")))
        .await
        .unwrap();
    assert_eq!((handled.events, handled.parked), (1, false));
    let now = Utc::now();
    let in_force = store.halts(now).await.unwrap();
    assert_eq!(in_force.len(), 1, "{in_force:?}");
    let Halt {
        scope: halted,
        code,
        cause,
        until,
        ..
    } = &in_force[0];
    assert_eq!((halted.as_str(), *code), (scope.as_str(), 0));
    assert!(
        cause.contains("Meta disabled the WABA on 2025-02-12"),
        "{cause}"
    );
    let recheck = TimeDelta::from_std(ACCOUNT_HALT_RECHECK).unwrap();
    assert_eq!(*until, now + recheck, "looked at again every ten minutes");
    let month = now + TimeDelta::days(30);
    assert_eq!(halts(store.as_ref(), month).await.len(), 1, "no end");

    // The worker stops sending for the WABA: the job waits, Meta never sees it.
    let job = common::text_job("halted-1");
    app.user_wrote(&job).await;
    app.start_worker();
    app.enqueue_json(wa_sender::job::Lane::Transactional, &job)
        .await;
    let deferred = app.wait_job_event("halted-1", "job.deferred").await;
    app.stop_worker().await;
    assert_eq!(deferred.error.unwrap().title, "sending halted");
    assert_eq!(app.simulator.audit().times_sent("halted-1"), 0);

    // A 368 on the same WABA, with its short cool-down, does not end the disabled halt early.
    store
        .raise_halt(&Halt {
            scope: scope.clone(),
            code: 368,
            cause: "Temporarily blocked for policies violations".into(),
            at: now,
            until: now + TimeDelta::seconds(30),
        })
        .await
        .unwrap();
    let after_cooldown = now + TimeDelta::seconds(60);
    assert_eq!(halts(store.as_ref(), after_cooldown).await.len(), 1);

    // Reinstated: the disabled halt is lifted; the 368's cool-down runs out by itself.
    p.handle(&bytes(&fixture("account-update-reinstated.json")))
        .await
        .unwrap();
    assert_eq!(
        halts(store.as_ref(), now).await,
        [(
            scope.clone(),
            "Temporarily blocked for policies violations".to_owned()
        )]
    );
    assert_eq!(halts(store.as_ref(), after_cooldown).await, []);

    // Restricted until Meta's expiration: business-initiated messaging halts the whole WABA.
    let expiration = (Utc::now() + TimeDelta::days(2)).timestamp();
    let mut restricted = fixture("account-update-restriction.json");
    for r in value(&mut restricted)["restriction_info"]
        .as_array_mut()
        .unwrap()
    {
        r["expiration"] = json!(expiration);
    }
    p.handle(&bytes(&restricted)).await.unwrap();
    let now = Utc::now();
    let restriction = halts(store.as_ref(), now).await;
    assert_eq!(restriction.len(), 1, "{restriction:?}");
    assert!(
        restriction[0]
            .1
            .contains("Meta restricted business-initiated messaging until"),
        "{restriction:?}"
    );
    let day = now + TimeDelta::days(1);
    assert_eq!(
        halts(store.as_ref(), day).await.len(),
        1,
        "still restricted"
    );
    let after = DateTime::from_timestamp(expiration + 1, 0).unwrap();
    assert_eq!(
        halts(store.as_ref(), after).await,
        [],
        "over at its expiration"
    );

    // Offboarded, then reconnected; deleted stays until an operator lifts it.
    let account = |event: &str| {
        let mut body = fixture("account-update-disabled.json");
        *value(&mut body) = json!({"event": event});
        bytes(&body)
    };
    let later = after + TimeDelta::seconds(1);
    p.handle(&account("ACCOUNT_OFFBOARDED")).await.unwrap();
    assert_eq!(halts(store.as_ref(), later).await.len(), 1);
    p.handle(&account("ACCOUNT_RECONNECTED")).await.unwrap();
    assert_eq!(halts(store.as_ref(), later).await, []);
    p.handle(&account("ACCOUNT_DELETED")).await.unwrap();
    assert_eq!(halts(store.as_ref(), later).await.len(), 1);
    p.handle(&account("ACCOUNT_VIOLATION")).await.unwrap();
    assert!(store.lift_halt(&HaltScope::Waba(waba())).await.unwrap());
    assert_eq!(halts(store.as_ref(), later).await, []);

    // Each still publishes account.updated, saying what it did.
    drain(&mut app).await;
    let published: Vec<(&Value, &Value, &Value)> = events(&app, "account.updated")
        .iter()
        .map(|e| {
            let m = &e.metadata;
            (&m["event"], &m["halts_raised"], &m["halts_lifted"])
        })
        .collect();
    let none = json!([]);
    assert_eq!(
        published,
        [
            (&json!("DISABLED_UPDATE"), &json!(["disabled"]), &none),
            (&json!("DISABLED_UPDATE"), &none, &json!(["disabled"])),
            (
                &json!("ACCOUNT_RESTRICTION"),
                &json!(["restricted_business_initiated"]),
                &none
            ),
            (&json!("ACCOUNT_OFFBOARDED"), &json!(["offboarded"]), &none),
            (&json!("ACCOUNT_RECONNECTED"), &none, &json!(["offboarded"])),
            (&json!("ACCOUNT_DELETED"), &json!(["deleted"]), &none),
            (&json!("ACCOUNT_VIOLATION"), &none, &none),
        ]
    );
    app.cleanup().await;
}
