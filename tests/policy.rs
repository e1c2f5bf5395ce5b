//! The send policy end to end (real RabbitMQ, Redis and the simulator over HTTP): every rule
//! dead-letters with its exact reason and no API call, paused things wait and resume, and the
//! pair rate and tier are kept so that Meta never has to refuse.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{WABA, job, spawn_app, text_job};
use serde_json::{Value, json};
use wa_sender::broker::H_DETAIL;
use wa_sender::ids::{CampaignId, WaId, WabaId};
use wa_sender::job::Lane;
use wa_sender::policy::admission::{CampaignState, Mark};
use wa_sender::simulator::{Action, SimUser};
use wa_sender::store::Store;

fn template(name: &str, params: &[&str]) -> Value {
    let parameters: Vec<Value> = params
        .iter()
        .map(|p| json!({"type": "text", "text": p}))
        .collect();
    json!({"type": "template", "template": {"name": name, "language": {"code": "en_US"},
           "components": [{"type": "body", "parameters": parameters}]}})
}

fn waba() -> WabaId {
    WabaId::parse(WABA).unwrap()
}

fn to(job: &Value) -> WaId {
    WaId::parse(job["to"].as_str().unwrap()).unwrap()
}

fn job_id_of(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).unwrap();
    v["job_id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn each_rule_dead_letters_with_its_reason_and_no_api_call() {
    let mut app = spawn_app("policy-dead", |_, _| {}).await;
    app.simulator.record_requests(true);
    let expired = {
        let mut j = text_job("p-expired");
        j["expires_at"] = json!("2020-01-01T00:00:00Z");
        j
    };
    let opted_out = job("p-opted-out", template("spring_sale", &["Ann"]));
    let cancelled = {
        let mut j = job("p-cancelled", template("order_update", &["Ann", "A1"]));
        j["campaign_id"] = json!("c-cancelled");
        j
    };
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            text_job("p-no-window"),
            "outside_care_window",
            "never written",
        ),
        (expired, "expired", "2020-01-01"),
        (
            job("p-unknown", template("no_such_template", &[])),
            "template_not_approved",
            "no_such_template (en_US)",
        ),
        (
            job("p-count", template("order_update", &["Ann"])),
            "template_params_invalid",
            "the body takes 2 parameter(s), the job gives 1",
        ),
        (
            job("p-newline", template("order_update", &["Ann\nB", "A1"])),
            "template_params_invalid",
            "newline",
        ),
        (
            job("p-otp-long", template("otp_code", &["1234567890123456"])),
            "template_params_invalid",
            "the limit is 15",
        ),
        (
            job("p-no-opt-in", template("spring_sale", &["Ann"])),
            "no_opt_in",
            "no opt-in",
        ),
        (opted_out.clone(), "opted_out_marketing", "131050"),
        (cancelled.clone(), "campaign_cancelled", "cancelled"),
    ];
    // Everyone but p-no-opt-in has opted in; p-opted-out then stopped marketing (131050).
    for (job, _, _) in &cases {
        if job["job_id"] != "p-no-opt-in" {
            app.opted_in(job).await;
        }
    }
    let at = chrono::Utc::now();
    app.store
        .record_opt_out(
            &waba(),
            &to(&opted_out),
            Some(Mark {
                at,
                source: "131050".into(),
            }),
        )
        .await
        .unwrap();
    app.store
        .set_campaign(
            &waba(),
            &CampaignId::parse("c-cancelled").unwrap(),
            CampaignState::Cancelled,
        )
        .await
        .unwrap();
    for (job, _, _) in &cases {
        app.enqueue_json(Lane::Transactional, job).await;
    }
    app.start_worker();

    let mut dead = BTreeMap::new();
    for _ in 0..cases.len() {
        let letter = app.next_dead().await;
        let detail = letter
            .envelope
            .headers
            .get_str(H_DETAIL)
            .unwrap_or_default();
        dead.insert(
            job_id_of(&letter.envelope.body),
            (letter.routing_key, detail),
        );
    }
    for (job, reason, detail) in &cases {
        let id = job["job_id"].as_str().unwrap();
        let (got_reason, got_detail) = &dead[id];
        assert_eq!(got_reason, reason, "{id}");
        assert!(
            got_detail.contains(detail),
            "{id}: {got_detail:?} should say {detail:?}"
        );
    }
    app.stop_worker().await;
    let audit = app.simulator.audit();
    let called: Vec<&Value> = audit
        .requests
        .iter()
        .filter(|r| dead.contains_key(r["biz_opaque_callback_data"].as_str().unwrap_or("")))
        .collect();
    assert!(
        called.is_empty(),
        "the policy refused these, yet they reached the API: {called:?}"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_closed_window_sends_the_fallback_template_and_an_opt_out_keeps_utility() {
    let mut app = spawn_app("policy-fallback", |_, _| {}).await;
    let mut reply = text_job("f-fallback");
    reply["fallback_template"] = template("order_update", &["Ann", "A1"])["template"].clone();
    let utility = job("f-utility", template("order_update", &["Ann", "A1"]));
    for j in [&reply, &utility] {
        app.opted_in(j).await;
    }
    let at = chrono::Utc::now();
    app.store
        .record_opt_out(
            &waba(),
            &to(&utility),
            Some(Mark {
                at,
                source: "user_preferences".into(),
            }),
        )
        .await
        .unwrap();
    app.enqueue_json(Lane::Transactional, &reply).await;
    app.enqueue_json(Lane::Transactional, &utility).await;
    app.start_worker();
    app.wait_job_event("f-fallback", "message.accepted").await;
    app.wait_job_event("f-utility", "message.accepted").await;
    app.stop_worker().await;
    let audit = app.simulator.audit();
    let fallback = &audit.accepted[audit.position("f-fallback").unwrap()];
    assert_eq!(
        fallback.kind, "template",
        "the free-form text was replaced by its fallback"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn paused_campaigns_and_templates_wait_and_then_go() {
    let mut app = spawn_app("policy-paused", |_, _| {}).await;
    let campaign = CampaignId::parse("c-spring").unwrap();
    let mut in_campaign = job("w-campaign", template("order_update", &["Ann", "A1"]));
    in_campaign["campaign_id"] = json!("c-spring");
    let paused_template = job("w-template", template("spring_sale", &["Ann"]));
    for j in [&in_campaign, &paused_template] {
        app.opted_in(j).await;
    }
    app.store
        .set_campaign(&waba(), &campaign, CampaignState::Paused)
        .await
        .unwrap();
    app.start_worker();
    // Meta pauses the template; its status webhook reaches the registry.
    app.simulator
        .act(Action::TemplateStatus {
            waba_id: None,
            name: "spring_sale".into(),
            language: "en_US".into(),
            status: "PAUSED".into(),
        })
        .unwrap();
    app.store
        .set_template_status(&waba(), "spring_sale", "en_US", "PAUSED")
        .await
        .unwrap();
    app.enqueue_json(Lane::Bulk, &in_campaign).await;
    app.enqueue_json(Lane::Bulk, &paused_template).await;
    let deferred = app
        .wait_event(Duration::from_secs(20), |e| {
            e.job_id.as_deref() == Some("w-campaign") && e.event == "job.deferred"
        })
        .await;
    assert_eq!(deferred.error.unwrap().title, "campaign_paused");
    let deferred = app
        .wait_event(Duration::from_secs(20), |e| {
            e.job_id.as_deref() == Some("w-template") && e.event == "job.deferred"
        })
        .await;
    assert_eq!(deferred.error.unwrap().title, "template_paused");
    assert_eq!(
        app.simulator.audit().accepted.len(),
        0,
        "nothing paused was sent"
    );

    app.store
        .set_campaign(&waba(), &campaign, CampaignState::Active)
        .await
        .unwrap();
    app.simulator
        .act(Action::TemplateStatus {
            waba_id: None,
            name: "spring_sale".into(),
            language: "en_US".into(),
            status: "APPROVED".into(),
        })
        .unwrap();
    app.store
        .set_template_status(&waba(), "spring_sale", "en_US", "APPROVED")
        .await
        .unwrap();
    app.wait_job_event("w-campaign", "message.accepted").await;
    app.wait_job_event("w-template", "message.accepted").await;
    app.stop_worker().await;
    assert_eq!(app.simulator.audit().error_count(132015), 0);
    app.cleanup().await;
}

#[tokio::test]
async fn the_pair_rate_is_kept_so_meta_never_answers_131056() {
    // Meta's rule, scaled down so the test is quick: bursts of 2, one message per second.
    let mut app = spawn_app("policy-pair", |settings, scenario| {
        scenario.pair_rate.period_s = 1.0;
        scenario.pair_rate.burst = 2;
        settings.policy.pair_period_ms = 1050;
        settings.policy.pair_burst = 2;
    })
    .await;
    let jobs: Vec<Value> = (0..7)
        .map(|i| {
            let mut j = text_job(&format!("pair-{i}"));
            j["to"] = json!("+4915112345678");
            j
        })
        .collect();
    app.user_wrote(&jobs[0]).await;
    for j in &jobs {
        app.enqueue_json(Lane::Transactional, j).await;
    }
    app.start_worker();
    for j in &jobs {
        app.wait_job_event(j["job_id"].as_str().unwrap(), "message.accepted")
            .await;
    }
    app.stop_worker().await;
    let audit = app.simulator.audit();
    assert_eq!(audit.error_count(131056), 0, "{:?}", audit.errors);
    assert_eq!(audit.accepted.len(), 7);
    let deferred = app
        .seen
        .iter()
        .filter(|e| {
            e.event == "job.deferred" && e.error.as_ref().is_some_and(|x| x.title == "pair_rate")
        })
        .count();
    assert!(
        deferred >= 3,
        "the worker paced the pair itself ({deferred} deferrals)"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn the_tier_defers_new_users_beyond_the_portfolio_budget() {
    // The simulator knows who wrote recently: only the reply's user.
    let replier = common::recipient("tier-reply")
        .trim_start_matches('+')
        .to_owned();
    let mut app = spawn_app("policy-tier", |settings, scenario| {
        settings.policy.messaging_limits = BTreeMap::from([(
            "default".to_owned(),
            serde_json::from_value(json!(5)).unwrap(),
        )]);
        scenario.unknown_users.window_open = false;
        let mut user = SimUser::new(&replier);
        user.last_inbound_minutes_ago = Some(5);
        scenario.users.push(user);
    })
    .await;
    let jobs: Vec<Value> = (0..8)
        .map(|i| {
            job(
                &format!("tier-{i}"),
                template("order_update", &["Ann", "A1"]),
            )
        })
        .collect();
    for j in &jobs {
        app.opted_in(j).await;
        app.enqueue_json(Lane::Bulk, j).await;
    }
    // A reply inside the care window does not count against the tier.
    let reply = text_job("tier-reply");
    app.enqueue_reply(Lane::Bulk, &reply).await;
    app.start_worker();
    app.wait_job_event("tier-reply", "message.accepted").await;
    for _ in 0..3 {
        let e = app
            .wait_event(Duration::from_secs(20), |e| {
                e.event == "job.deferred"
                    && e.error
                        .as_ref()
                        .is_some_and(|x| x.title == "tier_exhausted")
            })
            .await;
        app.seen.retain(|s| s.job_id != e.job_id);
    }
    // Deferred, not failed: the three wait for a slot 24 h on.
    tokio::time::sleep(Duration::from_secs(1)).await;
    app.stop_worker().await;
    let audit = app.simulator.audit();
    assert_eq!(audit.accepted.len(), 6, "5 templates and the reply");
    assert_eq!(audit.unique_outside_window(WABA), 5);
    assert!(app.seen.iter().all(|e| e.event != "job.dead_lettered"));
    app.cleanup().await;
}
