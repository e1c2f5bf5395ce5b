//! The admin surface: the HTTP API (against Redis and the in-memory store), the CSV opt-in
//! import, campaign reports, and the `wa-sender` binary's admin commands. Redis must run on 127.0.0.1:6379:
//! `redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use wa_sender::admin::Admin;
use wa_sender::admin::http::AdminServer;
use wa_sender::admin::import::{self, LineError, Observer, Rows};
use wa_sender::event::DeadReason;
use wa_sender::ids::{CampaignId, JobId, PhoneNumberId, WaId, WabaId, Wamid};
use wa_sender::policy::admission::{
    CampaignState, Consent, DeadWhy, OptInPolicy, PairRate, Request, Verdict,
};
use wa_sender::store::redis::RedisStore;
use wa_sender::store::{Cost, JobKey, Store, Subject, Tally, WamidRecord};

const TOKEN: &str = "test-admin-token-5f1c";
const NUMBER: &str = "106540352242922";
const WABA: &str = "102290129340398";
const NUMBER_2: &str = "106540352242923";
const WABA_2: &str = "102290129340399";
const USER: &str = "16505551234";
/// The rate card's currency in `config/default.toml`, which the CLI reports in.
const CURRENCY: &str = "USD";

/// A Redis store under a key prefix of its own, and the prefix.
async fn redis_with_prefix(test: &str) -> (Arc<RedisStore>, String) {
    let prefix = format!("test-admin-{test}-{}", uuid::Uuid::new_v4().simple());
    let store = RedisStore::connect("redis://127.0.0.1:6379/0", &prefix)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    (Arc::new(store), prefix)
}

async fn redis(test: &str) -> Arc<RedisStore> {
    redis_with_prefix(test).await.0
}

fn numbers(pairs: &[(&str, &str)]) -> BTreeMap<PhoneNumberId, WabaId> {
    pairs
        .iter()
        .map(|(n, w)| {
            (
                PhoneNumberId::parse(*n).unwrap(),
                WabaId::parse(*w).unwrap(),
            )
        })
        .collect()
}

fn waba(id: &str) -> WabaId {
    WabaId::parse(id).unwrap()
}

fn user(id: &str) -> WaId {
    WaId::parse(id).unwrap()
}

/// One admin API on a free port; stops when dropped.
struct Api {
    base: String,
    client: reqwest::Client,
    stop: CancellationToken,
}

impl Drop for Api {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn serve(store: Arc<dyn Store>, pairs: &[(&str, &str)]) -> Api {
    let admin = Admin::new(store, numbers(pairs))
        .unwrap()
        .with_currency(CURRENCY);
    let server = AdminServer::bind("127.0.0.1:0", admin, &SecretString::from(TOKEN))
        .await
        .unwrap();
    let base = format!("http://{}", server.addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(server.run_until_stopped(stop.clone()));
    Api {
        base,
        client: reqwest::Client::new(),
        stop,
    }
}

impl Api {
    async fn call(&self, request: reqwest::RequestBuilder) -> (u16, Value) {
        let response = request.send().await.expect("the admin API answers");
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(
            self.client
                .post(format!("{}{path}", self.base))
                .bearer_auth(TOKEN)
                .json(&body),
        )
        .await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(
            self.client
                .get(format!("{}{path}", self.base))
                .bearer_auth(TOKEN),
        )
        .await
    }
}

/// Runs a check against Redis (under a unique key prefix, deleted afterwards) and against the
/// in-memory store.
macro_rules! on_both_stores {
    ($check:ident) => {
        mod $check {
            #[tokio::test]
            async fn redis() {
                let store = super::redis(stringify!($check)).await;
                super::$check(store.clone()).await;
                store.delete_all().await.unwrap();
            }

            #[tokio::test]
            async fn memory() {
                super::$check(std::sync::Arc::new(
                    wa_sender::store::memory::MemoryStore::new(),
                ))
                .await;
            }
        }
    };
}

on_both_stores!(a_missing_or_wrong_token_is_refused_and_changes_nothing);
async fn a_missing_or_wrong_token_is_refused_and_changes_nothing(store: Arc<dyn Store>) {
    let api = serve(store.clone(), &[(NUMBER, WABA)]).await;
    let pause = format!("{}/v1/campaigns/spring/pause", api.base);
    let opt_in = format!("{}/v1/consent/opt-in", api.base);
    let attempts = [
        api.client.post(&pause),
        api.client.post(&pause).bearer_auth("wrong"),
        api.client
            .post(&pause)
            .bearer_auth(&TOKEN[..TOKEN.len() - 1]),
        api.client.post(&pause).bearer_auth(format!("{TOKEN}x")),
        api.client.post(&pause).basic_auth("admin", Some(TOKEN)),
        api.client
            .post(&opt_in)
            .bearer_auth("wrong")
            .json(&json!({ "wa_id": USER })),
        api.client.get(format!("{}/v1/no-such-route", api.base)),
    ];
    let report = format!("{}/v1/campaigns/spring/report", api.base);
    let attempts = attempts.into_iter().chain([
        api.client.get(&report),
        api.client.get(&report).bearer_auth("wrong"),
        api.client.get(format!("{}/v1/report", api.base)),
    ]);
    for attempt in attempts {
        let (status, body) = api.call(attempt).await;
        assert_eq!(status, 401, "{body}");
        assert!(
            body["error"].as_str().unwrap().contains("bearer token"),
            "{body}"
        );
    }
    let spring = CampaignId::parse("spring").unwrap();
    assert_eq!(store.campaign(&waba(WABA), &spring).await.unwrap(), None);
    assert_eq!(
        store.consent(&waba(WABA), &user(USER)).await.unwrap(),
        Consent::default()
    );
    // The right token is accepted (case-insensitive scheme, as HTTP wants).
    let (status, _) = api
        .call(
            api.client
                .post(&pause)
                .header("authorization", format!("bearer {TOKEN}")),
        )
        .await;
    assert_eq!(status, 200);
}

on_both_stores!(probes_need_no_token);
/// `/healthz` and `/readyz` answer without the bearer token (probes carry none); everything
/// else still wants it.
async fn probes_need_no_token(store: Arc<dyn Store>) {
    let api = serve(store, &[(NUMBER, WABA)]).await;
    let alive = api
        .client
        .get(format!("{}/healthz", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(alive.status(), 200);
    assert_eq!(alive.text().await.unwrap(), "ok");
    let (status, body) = api
        .call(api.client.get(format!("{}/readyz", api.base)))
        .await;
    assert_eq!(
        (status, body),
        (
            200,
            json!({"ready": true, "redis": "up", "draining": false})
        )
    );
    let (status, _) = api
        .call(api.client.get(format!("{}/v1/campaigns/spring", api.base)))
        .await;
    assert_eq!(status, 401);
}

on_both_stores!(pause_resume_and_cancel_apply_to_every_configured_waba);
async fn pause_resume_and_cancel_apply_to_every_configured_waba(store: Arc<dyn Store>) {
    let api = serve(store.clone(), &[(NUMBER, WABA), (NUMBER_2, WABA_2)]).await;
    let spring = CampaignId::parse("spring-sale").unwrap();
    let (status, body) = api.get("/v1/campaigns/spring-sale").await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({ "campaign_id": "spring-sale", "state": "active",
                "wabas": { WABA: "active", WABA_2: "active" } }),
        "a campaign never paused is active"
    );
    for (action, state) in [
        ("pause", CampaignState::Paused),
        ("resume", CampaignState::Active),
        ("cancel", CampaignState::Cancelled),
    ] {
        let (status, body) = api
            .post(&format!("/v1/campaigns/spring-sale/{action}"), json!({}))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["campaign_id"], "spring-sale");
        assert_eq!(body["state"], state.as_str());
        for w in [WABA, WABA_2] {
            assert_eq!(
                store.campaign(&waba(w), &spring).await.unwrap(),
                Some(state),
                "{action} in {w}"
            );
        }
        let (_, body) = api.get("/v1/campaigns/spring-sale").await;
        assert_eq!(body["wabas"][WABA_2], state.as_str());
    }
    // Another campaign is untouched.
    let other = CampaignId::parse("autumn").unwrap();
    assert_eq!(store.campaign(&waba(WABA), &other).await.unwrap(), None);
}

on_both_stores!(opt_in_opt_out_and_resume_change_the_recorded_consent);
async fn opt_in_opt_out_and_resume_change_the_recorded_consent(store: Arc<dyn Store>) {
    let api = serve(store.clone(), &[(NUMBER, WABA)]).await;
    let consent = || async { store.consent(&waba(WABA), &user(USER)).await.unwrap() };

    // One WABA configured: waba_id may be left out; a '+' is accepted and dropped.
    let (status, body) = api
        .post(
            "/v1/consent/opt-in",
            json!({ "wa_id": "+16505551234", "source": "web-form", "at": "2025-04-30T08:00:00Z" }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["wa_id"], USER);
    assert_eq!(body["waba_id"], WABA);
    let opt_in = consent().await.opt_in.expect("opt-in recorded");
    assert_eq!(opt_in.source, "web-form");
    assert_eq!(opt_in.at.to_rfc3339(), "2025-04-30T08:00:00+00:00");
    assert_eq!(consent().await.opt_out, None);

    let (status, body) = api
        .post(
            "/v1/consent/opt-out",
            json!({ "waba_id": WABA, "wa_id": USER }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let opt_out = consent().await.opt_out.expect("opt-out recorded");
    assert_eq!(opt_out.source, "admin");
    assert!(Utc::now() - opt_out.at < chrono::TimeDelta::minutes(1));
    assert!(body["opt_out"].is_object(), "{body}");

    let (status, body) = api.get(&format!("/v1/consent/{WABA}/{USER}")).await;
    assert_eq!(status, 200);
    assert_eq!(body["opt_in"]["source"], "web-form");
    assert_eq!(body["opt_out"]["source"], "admin");

    let (status, body) = api
        .post(
            "/v1/consent/opt-out",
            json!({ "wa_id": USER, "resume": true }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["opt_out"], Value::Null);
    let after = consent().await;
    assert_eq!(after.opt_out, None, "resume withdraws the opt-out");
    assert_eq!(
        after.opt_in.unwrap().source,
        "web-form",
        "and keeps the opt-in"
    );
}

on_both_stores!(bad_input_is_a_400_naming_the_field_and_changes_nothing);
async fn bad_input_is_a_400_naming_the_field_and_changes_nothing(store: Arc<dyn Store>) {
    let api = serve(store.clone(), &[(NUMBER, WABA), (NUMBER_2, WABA_2)]).await;
    let long_campaign = format!("/v1/campaigns/{}/pause", "x".repeat(129));
    let cases = [
        (
            "/v1/consent/opt-in",
            json!({ "waba_id": WABA, "wa_id": "+1 650 555" }),
            "wa_id",
            "wa_id \"+1 650 555\" is not a valid phone number",
        ),
        (
            "/v1/consent/opt-in",
            json!({ "waba_id": WABA }),
            "wa_id",
            "wa_id is missing",
        ),
        (
            "/v1/consent/opt-in",
            json!({ "wa_id": USER }),
            "waba_id",
            "waba_id is required",
        ),
        (
            "/v1/consent/opt-out",
            json!({ "waba_id": "999", "wa_id": USER }),
            "waba_id",
            "waba_id 999 is not configured",
        ),
        (
            "/v1/consent/opt-out",
            json!({ "waba_id": WABA, "wa_id": USER, "at": "yesterday" }),
            "at",
            "at \"yesterday\" is not an RFC 3339 time",
        ),
        (
            "/v1/windows",
            json!({ "phone_number_id": "555", "wa_id": USER }),
            "phone_number_id",
            "phone_number_id 555 is not configured",
        ),
        (
            "/v1/windows",
            json!({ "phone_number_id": NUMBER, "wa_id": "0044123456789" }),
            "wa_id",
            "never 0",
        ),
        (
            long_campaign.as_str(),
            json!({}),
            "campaign_id",
            "the limit is 128",
        ),
    ];
    for (path, body, field, message) in cases {
        let (status, answer) = api.post(path, body.clone()).await;
        assert_eq!(status, 400, "{path} {body}: {answer}");
        assert_eq!(answer["field"], field, "{path} {body}: {answer}");
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains(message), "{error:?} should say {message:?}");
    }
    // A misspelt field is refused, not ignored.
    let (status, answer) = api
        .post(
            "/v1/consent/opt-out",
            json!({ "waba_id": WABA, "wa_id": USER, "resumed": true }),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("resumed"),
        "{answer}"
    );
    for w in [WABA, WABA_2] {
        assert_eq!(
            store.consent(&waba(w), &user(USER)).await.unwrap(),
            Consent::default()
        );
    }
}

/// Records in `waba` what the worker and the webhook processor would for one job of
/// `campaign` (`None`: no campaign): accepted, then its `statuses` reached one by one, the
/// first priced `marketing` at `micros`.
async fn sent(
    store: &dyn Store,
    waba_id: &str,
    job: &str,
    campaign: Option<&str>,
    statuses: &[&'static str],
    micros: i64,
) {
    let key = JobKey {
        waba: waba(waba_id),
        job_id: JobId::parse(job).unwrap(),
    };
    let wamid = Wamid::parse(format!("wamid.{job}")).unwrap();
    let record = WamidRecord {
        job_id: job.into(),
        campaign_id: campaign.map(Into::into),
        traceparent: None,
        metadata: Value::Null,
        resend: None,
    };
    store.mark_sent(&key, &wamid, &record).await.unwrap();
    let mut expected = None;
    for (i, status) in statuses.iter().enumerate() {
        let tally = Tally {
            report: true,
            campaign: campaign.map(|c| CampaignId::parse(c).unwrap()),
            reached: vec![*status],
            cost: (i == 0).then(|| Cost {
                category: "marketing".into(),
                micros,
            }),
        };
        let applied = store
            .apply_status(&waba(waba_id), &wamid, expected, status, &tally)
            .await
            .unwrap();
        assert!(applied, "{job} {status}");
        expected = Some(status);
    }
}

/// A job of `campaign` dead-lettered for `reason` in `waba`.
async fn dead(
    store: &dyn Store,
    waba_id: &str,
    job: &str,
    campaign: Option<&str>,
    reason: DeadReason,
) {
    let key = JobKey {
        waba: waba(waba_id),
        job_id: JobId::parse(job).unwrap(),
    };
    let campaign = campaign.map(|c| CampaignId::parse(c).unwrap());
    store
        .mark_dead(&key, reason, campaign.as_ref())
        .await
        .unwrap();
}

/// Spring: four jobs accepted over two portfolios (two delivered, one of them read, one
/// failed) and one dead-lettered; outside it, one more accepted and one more dead-lettered.
async fn spring_and_more(store: &dyn Store) {
    sent(
        store,
        WABA,
        "s1",
        Some("spring"),
        &["sent", "delivered", "read"],
        150_200,
    )
    .await;
    sent(
        store,
        WABA,
        "s2",
        Some("spring"),
        &["sent", "delivered"],
        150_200,
    )
    .await;
    sent(store, WABA_2, "s3", Some("spring"), &["sent"], 27_500).await;
    sent(
        store,
        WABA_2,
        "s4",
        Some("spring"),
        &["sent", "failed"],
        27_500,
    )
    .await;
    dead(store, WABA_2, "s5", Some("spring"), DeadReason::NoOptIn).await;
    sent(store, WABA, "o1", None, &["sent", "delivered"], 4_400).await;
    dead(store, WABA, "o2", Some("autumn"), DeadReason::Expired).await;
}

on_both_stores!(reports_sum_a_campaign_and_the_portfolios_over_every_waba);
async fn reports_sum_a_campaign_and_the_portfolios_over_every_waba(store: Arc<dyn Store>) {
    let api = serve(store.clone(), &[(NUMBER, WABA), (NUMBER_2, WABA_2)]).await;
    spring_and_more(store.as_ref()).await;

    let (status, spring) = api.get("/v1/campaigns/spring/report").await;
    assert_eq!(status, 200, "{spring}");
    assert_eq!(
        spring,
        json!({
            "campaign_id": "spring",
            "accepted": 4,
            "statuses": {"sent": 4, "delivered": 2, "read": 1, "failed": 1},
            "dead_lettered": {"no_opt_in": 1},
            "delivery_rate": 0.5,
            "read_rate": 0.5,
            "cost": {
                "currency": CURRENCY,
                "total": "0.3554",
                "categories": {"marketing": {"messages": 4, "cost": "0.3554"}},
            },
        })
    );

    let (status, all) = api.get("/v1/report").await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(all["campaign_id"], Value::Null);
    assert_eq!(all["accepted"], 5, "{all}");
    assert_eq!(all["statuses"]["delivered"], 3, "{all}");
    assert_eq!(
        all["dead_lettered"],
        json!({"no_opt_in": 1, "expired": 1}),
        "{all}"
    );
    assert_eq!(all["delivery_rate"], 0.6, "{all}");
    assert_eq!(all["cost"]["total"], "0.3598", "{all}");

    // A campaign nothing was recorded for is all zeros, its rates unknown.
    let (status, winter) = api.get("/v1/campaigns/winter/report").await;
    assert_eq!(status, 200, "{winter}");
    assert_eq!(
        (winter["accepted"].clone(), winter["delivery_rate"].clone()),
        (json!(0), Value::Null),
        "{winter}"
    );
    let (status, body) = api
        .get(&format!("/v1/campaigns/{}/report", "x".repeat(129)))
        .await;
    assert_eq!((status, body["field"].clone()), (400, json!("campaign_id")));
}

/// The HTTP API's reports are the CLI's `--json` reports, figure for figure.
#[tokio::test]
async fn http_reports_are_the_cli_reports() {
    let (store, prefix) = redis_with_prefix("report-cli").await;
    spring_and_more(store.as_ref()).await;
    let api = serve(store.clone(), &[(NUMBER, WABA)]).await;
    let number_waba = format!("WA_SENDER__NUMBERS__{NUMBER}__WABA_ID");
    let env = [
        ("WA_SENDER__REDIS__KEY_PREFIX", prefix.as_str()),
        (number_waba.as_str(), WABA),
    ];
    for (args, path) in [
        (
            &["campaign", "report", "spring", "--json"][..],
            "/v1/campaigns/spring/report",
        ),
        (&["campaign", "report", "--all", "--json"][..], "/v1/report"),
    ] {
        let output = wa_sender(args, &env).output().await.unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{args:?}: {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let cli: Value = serde_json::from_str(&stdout).unwrap();
        let (status, http) = api.get(path).await;
        assert_eq!(status, 200, "{http}");
        assert_eq!(http, cli, "{path} against {args:?}");
        assert!(http["accepted"].as_u64().unwrap() > 0, "{http}");
    }
    store.delete_all().await.unwrap();
}

/// A free-form message to `USER` from `NUMBER`, as admission sees it.
async fn admit_free_form(store: &dyn Store, job: &str) -> Verdict {
    let now = DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).unwrap();
    let subject = Subject {
        job: JobKey {
            waba: waba(WABA),
            job_id: JobId::parse(job).unwrap(),
        },
        number: PhoneNumberId::parse(NUMBER).unwrap(),
        to: user(USER),
        campaign: None,
        template: None,
    };
    let request = Request {
        owner: "test".into(),
        now,
        lease: Duration::from_secs(60),
        retake_ambiguous: true,
        expires_at: None,
        not_before: None,
        free_form: true,
        template: None,
        opt_in: OptInPolicy {
            marketing: true,
            utility: true,
            authentication: false,
        },
        tier_limit: Some(250),
        pair: PairRate {
            margin: Duration::ZERO,
            period: Duration::from_secs(6),
            burst: 45,
        },
        campaign_recheck: Duration::from_secs(60),
        template_recheck: Duration::from_secs(600),
    };
    store.admit(&subject, &request).await.unwrap()
}

on_both_stores!(opening_a_window_lets_a_free_form_message_through);
async fn opening_a_window_lets_a_free_form_message_through(store: Arc<dyn Store>) {
    let api = serve(store.clone(), &[(NUMBER, WABA)]).await;
    assert_eq!(
        admit_free_form(store.as_ref(), "before").await,
        Verdict::Dead(DeadWhy::OutsideCareWindow { last_inbound: None })
    );
    let (status, body) = api
        .post(
            "/v1/windows",
            json!({ "phone_number_id": NUMBER, "wa_id": USER }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["waba_id"], WABA);
    let opened: DateTime<Utc> = body["opened_at"].as_str().unwrap().parse().unwrap();
    let closes: DateTime<Utc> = body["closes_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(closes - opened, chrono::TimeDelta::hours(24));
    assert_eq!(
        admit_free_form(store.as_ref(), "after").await,
        Verdict::Send { fallback: false }
    );
    // A window that would already be closed is refused.
    let (status, body) = api
        .post(
            "/v1/windows",
            json!({ "phone_number_id": NUMBER, "wa_id": USER, "at": "2020-01-01T00:00:00Z" }),
        )
        .await;
    assert_eq!(
        (status, body["field"].clone()),
        (400, json!("at")),
        "{body}"
    );
}

/// Collects what an import reports line by line.
#[derive(Default)]
struct Collect {
    rejected: Vec<LineError>,
    batches: u32,
}

impl Observer for Collect {
    fn rejected(&mut self, error: &LineError) {
        self.rejected.push(error.clone());
    }
    fn written(&mut self, _imported: u64, _bytes: u64) {
        self.batches += 1;
    }
}

const MIXED_CSV: &str = "wa_id,opted_in_at,source\n\
    16505551234,2025-04-30T08:00:00Z,web-form\n\
    not-a-number,2025-04-30T08:00:00Z,web-form\n\
    +4915112345678,,\n\
    16505551235,30/04/2025,web-form\n\
    ,2025-04-30T08:00:00Z,web-form\n\
    16505551236,2025-04-30T08:00:00Z\n\
    16505551237,2025-04-30T09:00:00Z,shop\n";

#[tokio::test]
async fn csv_import_records_the_good_lines_and_reports_each_bad_one() {
    let store = redis("csv").await;
    let now = DateTime::parse_from_rfc3339("2025-05-01T10:00:00Z")
        .unwrap()
        .with_timezone(&Utc);
    let mut rows = Rows::new(MIXED_CSV.as_bytes(), "csv:optins.csv", now).unwrap();
    let mut seen = Collect::default();
    let report = import::import(store.as_ref(), &waba(WABA), &mut rows, &mut seen)
        .await
        .unwrap();
    assert_eq!((report.imported, report.lines), (3, 7));
    let lines: Vec<(u64, &str)> = report
        .rejected
        .iter()
        .map(|e| (e.line, e.wa_id.as_str()))
        .collect();
    assert_eq!(
        lines,
        [
            (3, "not-a-number"),
            (5, "16505551235"),
            (6, ""),
            (7, "16505551236")
        ]
    );
    let reasons: Vec<&str> = report.rejected.iter().map(|e| e.reason.as_str()).collect();
    assert!(
        reasons[0].contains("is not a valid phone number"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].contains("opted_in_at \"30/04/2025\""),
        "{reasons:?}"
    );
    assert_eq!(reasons[2], "wa_id is missing");
    assert_eq!(reasons[3], "2 fields, the header has 3");
    assert_eq!(
        seen.rejected, report.rejected,
        "each line is reported as it is met"
    );
    assert!(
        report.check().is_err(),
        "rejected lines make the import fail"
    );

    let consent = |id: &'static str| {
        let store = store.clone();
        async move { store.consent(&waba(WABA), &user(id)).await.unwrap() }
    };
    let first = consent("16505551234").await.opt_in.unwrap();
    assert_eq!(
        (first.source.as_str(), first.at.to_rfc3339().as_str()),
        ("web-form", "2025-04-30T08:00:00+00:00")
    );
    let defaulted = consent("4915112345678").await.opt_in.unwrap();
    assert_eq!(
        (defaulted.source.as_str(), defaulted.at),
        ("csv:optins.csv", now)
    );
    assert_eq!(consent("16505551237").await.opt_in.unwrap().source, "shop");
    for rejected in ["16505551235", "16505551236"] {
        assert_eq!(consent(rejected).await, Consent::default(), "{rejected}");
    }
    store.delete_all().await.unwrap();
}

#[tokio::test]
async fn csv_import_writes_one_round_trip_per_thousand_lines() {
    let store = redis("batch").await;
    let mut text = String::from("wa_id\n");
    for i in 0..2_500 {
        text.push_str(&format!("1650{:07}\n", i));
    }
    let mut rows = Rows::new(text.as_bytes(), "csv:big.csv", Utc::now()).unwrap();
    let mut seen = Collect::default();
    let before = store.round_trips();
    let report = import::import(store.as_ref(), &waba(WABA), &mut rows, &mut seen)
        .await
        .unwrap();
    assert_eq!(report.imported, 2_500);
    assert_eq!(store.round_trips() - before, 3, "batches of 1,000");
    assert_eq!(seen.batches, 3);
    let last = user("16500002499");
    assert!(
        store
            .consent(&waba(WABA), &last)
            .await
            .unwrap()
            .opt_in
            .is_some()
    );
    store.delete_all().await.unwrap();
}

/// The binary, configured from `config/` (test environment) plus `env`.
fn wa_sender(args: &[&str], env: &[(&str, &str)]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_wa-sender"));
    command
        .args([
            "--config-dir",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config"),
            "--env",
            "test",
        ])
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("WA_SENDER__ADMIN__TOKEN")
        .env_remove("WA_SENDER__ADMIN__TOKEN_FILE");
    for (key, value) in env {
        command.env(key, value);
    }
    command
}

#[tokio::test]
async fn the_import_command_exits_65_and_reports_each_bad_line() {
    let (store, prefix) = redis_with_prefix("cli").await;
    let dir = std::env::temp_dir().join(format!("wa-sender-admin-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("optins.csv");
    std::fs::write(&file, MIXED_CSV).unwrap();
    let errors = dir.join("errors.csv");
    let number_waba = format!("WA_SENDER__NUMBERS__{NUMBER}__WABA_ID");
    let output = wa_sender(
        &[
            "consent",
            "import",
            file.to_str().unwrap(),
            "--errors",
            errors.to_str().unwrap(),
        ],
        &[
            ("WA_SENDER__REDIS__KEY_PREFIX", &prefix),
            (&number_waba, WABA),
        ],
    )
    .output()
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(65), "{stdout}\n{stderr}");
    for line in [
        "line 3: wa_id \"not-a-number\" is not a valid phone number",
        "line 5: opted_in_at \"30/04/2025\" is not an RFC 3339 time",
        "line 6: wa_id is missing",
        "line 7: 2 fields, the header has 3",
        "4 of 7 lines were rejected",
    ] {
        assert!(
            stderr.contains(line),
            "stderr should say {line:?}:\n{stderr}"
        );
    }
    assert!(
        stdout.contains("imported 3 opt-ins into WABA 102290129340398, skipped 4 of 7 lines"),
        "{stdout}"
    );
    let report = std::fs::read_to_string(&errors).unwrap();
    let mut report_lines = report.lines();
    assert_eq!(report_lines.next(), Some("line,wa_id,error"));
    assert!(
        report_lines
            .next()
            .unwrap()
            .starts_with("3,not-a-number,\"wa_id \"\"not-a-number\"\" is not"),
        "{report}"
    );
    assert_eq!(report.lines().count(), 5, "{report}");
    let imported = store
        .consent(&waba(WABA), &user("16505551237"))
        .await
        .unwrap();
    assert_eq!(imported.opt_in.unwrap().source, "shop");
    let defaulted = store
        .consent(&waba(WABA), &user("4915112345678"))
        .await
        .unwrap();
    assert_eq!(defaulted.opt_in.unwrap().source, "csv:optins.csv");

    // A clean file exits 0.
    std::fs::write(&file, "wa_id\n16505550001\n").unwrap();
    let output = wa_sender(
        &["consent", "import", file.to_str().unwrap()],
        &[
            ("WA_SENDER__REDIS__KEY_PREFIX", &prefix),
            (&number_waba, WABA),
        ],
    )
    .output()
    .await
    .unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
    store.delete_all().await.unwrap();
}

#[tokio::test]
async fn the_admin_api_refuses_to_start_without_a_token() {
    let number_waba = format!("WA_SENDER__NUMBERS__{NUMBER}__WABA_ID");
    let output = wa_sender(
        &["admin", "--listen", "127.0.0.1:0"],
        &[(&number_waba, WABA)],
    )
    .output()
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("admin.token: is not set") && stderr.contains("WA_SENDER__ADMIN__TOKEN"),
        "{stderr}"
    );
}

#[tokio::test]
async fn campaign_and_consent_commands_change_the_store() {
    let (store, prefix) = redis_with_prefix("cmds").await;
    let number_waba = format!("WA_SENDER__NUMBERS__{NUMBER}__WABA_ID");
    let env = [
        ("WA_SENDER__REDIS__KEY_PREFIX", prefix.as_str()),
        (number_waba.as_str(), WABA),
    ];
    let run = |args: &'static [&'static str]| {
        let mut command = wa_sender(args, &env);
        async move {
            let output = command.output().await.unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
            (output.status.code(), stderr)
        }
    };
    assert_eq!(run(&["campaign", "pause", "winter"]).await.0, Some(0));
    let winter = CampaignId::parse("winter").unwrap();
    assert_eq!(
        store.campaign(&waba(WABA), &winter).await.unwrap(),
        Some(CampaignState::Paused)
    );
    assert_eq!(
        run(&[
            "consent",
            "opt-out",
            "+16505551234",
            "--source",
            "keyword:STOP"
        ])
        .await
        .0,
        Some(0)
    );
    let opt_out = store
        .consent(&waba(WABA), &user(USER))
        .await
        .unwrap()
        .opt_out;
    assert_eq!(opt_out.unwrap().source, "keyword:STOP");
    let (code, stderr) = run(&["consent", "opt-in", "12ab"]).await;
    assert_eq!(code, Some(64), "a bad argument is a usage error: {stderr}");
    assert!(stderr.contains("wa_id \"12ab\""), "{stderr}");
    store.delete_all().await.unwrap();
}

/// Commands that print JSON print only JSON on stdout, so `… | jq` works: logs (at any level,
/// here `RUST_LOG=debug`) go to stderr, without colour codes when stderr is not a terminal.
#[tokio::test]
async fn json_printing_commands_print_only_json_on_stdout() {
    let (store, prefix) = redis_with_prefix("json-out").await;
    let number_waba = format!("WA_SENDER__NUMBERS__{NUMBER}__WABA_ID");
    let env = [
        ("WA_SENDER__REDIS__KEY_PREFIX", prefix.as_str()),
        (number_waba.as_str(), WABA),
        ("RUST_LOG", "debug"),
    ];
    let commands: [&[&str]; 4] = [
        &["window", "open", "--number", NUMBER, "+16505550199"],
        &["consent", "opt-in", "+16505550199"],
        &["campaign", "pause", "spring"],
        &["campaign", "report", "spring", "--json"],
    ];
    let mut logged = 0;
    for args in commands {
        let output = wa_sender(args, &[]).envs(env).output().await.unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{args:?}: {stdout}\n{stderr}");
        let parsed: Result<serde_json::Value, _> = serde_json::from_str(&stdout);
        assert!(parsed.is_ok(), "{args:?} printed more than JSON: {stdout}");
        assert!(
            !stderr.contains('\u{1b}'),
            "{args:?}: colour codes in a pipe"
        );
        logged += stderr.lines().count();
    }
    assert!(logged > 0, "the debug logs went to stderr");
    store.delete_all().await.unwrap();
}
