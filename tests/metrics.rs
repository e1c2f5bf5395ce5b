//! `/metrics` of the real binary: every series of a closed label set at 0 before anything
//! happened, the worker's series after jobs were sent, deferred and dead-lettered, and the
//! webhook process's after signed bodies were posted, each with the counts the jobs and bodies
//! must have produced.

mod common;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use common::node::free_port;
use common::{NUMBER, WABA, spawn_app, text_job};
use serde_json::{Value, json};
use wa_sender::event::DeadReason;
use wa_sender::job::Lane;
use wa_sender::metrics::{DeferCause, HALT_SCOPES, JobOutcome, STATUSES};

/// A scrape: each sample line `name{labels} value`, keyed by `name{labels}` with the labels
/// sorted, so a query need not know the order the exporter prints them in.
#[derive(Debug)]
struct Scrape(BTreeMap<String, f64>);

/// `series` with its labels sorted (no label value here holds a comma).
fn key(series: &str) -> String {
    match series.split_once('{') {
        Some((name, labels)) => {
            let mut labels: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
            labels.sort_unstable();
            format!("{name}{{{}}}", labels.join(","))
        }
        None => series.to_owned(),
    }
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let (series, value) = l.rsplit_once(' ').expect("`series value`");
                (key(series), value.parse().expect("a number"))
            })
            .collect();
        Scrape(samples)
    }

    /// The value of `series`, 0 when absent (a counter never incremented is not printed).
    fn get(&self, series: &str) -> f64 {
        self.0.get(&key(series)).copied().unwrap_or(0.0)
    }

    /// The sum over every series of metric `name`, whatever their labels.
    fn sum(&self, name: &str) -> f64 {
        self.0
            .iter()
            .filter(|(series, _)| series.split('{').next() == Some(name))
            .map(|(_, v)| v)
            .sum()
    }
}

async fn scrape(base: &str) -> Option<Scrape> {
    Some(Scrape::parse(&scrape_text(base).await?))
}

/// `/metrics` as served; `None` while the process does not answer yet.
async fn scrape_text(base: &str) -> Option<String> {
    let answer = reqwest::get(format!("{base}/metrics")).await.ok()?;
    assert_eq!(answer.status(), 200, "/metrics answers 200");
    answer.text().await.ok()
}

/// Scrapes until `until` holds; panics with the last scrape after `timeout`.
async fn wait_scrape(base: &str, timeout: Duration, until: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = scrape(base).await;
        if let Some(s) = last.as_ref().filter(|s| until(s)) {
            return Scrape(s.0.clone());
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/metrics never showed what was expected within {timeout:?}; last: {last:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The worker binary for `app`, serving its health and metrics on a free port; the child
/// (killed when dropped) and that port's base URL.
fn spawn_worker(app: &common::TestApp) -> (tokio::process::Child, String) {
    let port = free_port();
    let worker = app
        .command("worker")
        .env(
            "WA_SENDER__WORKER__HEALTH_LISTEN",
            format!("127.0.0.1:{port}"),
        )
        .stderr(Stdio::null())
        .spawn()
        .expect("the wa-sender binary starts");
    (worker, format!("http://127.0.0.1:{port}"))
}

/// The label values of a scrape's sample lines, each with its line.
fn label_values(text: &str) -> Vec<(&str, &str)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| Some((l, l.split_once('{')?.1.rsplit_once("\"}")?.0)))
        .flat_map(|(line, labels)| {
            labels
                .split("\",")
                .filter_map(|pair| pair.split_once("=\""))
                .map(move |(_, value)| (line, value))
        })
        .collect()
}

/// Before its first job, a worker already shows every series an SRE alerts on, at 0: a quiet
/// worker is not a missing one to `rate()` or to an absence alert. Its build is at 1, and no
/// label value holds a space.
#[tokio::test]
async fn a_worker_shows_every_series_at_zero_before_its_first_job() {
    let app = spawn_app("metrics-zero", |_, _| {}).await;
    let (mut worker, base) = spawn_worker(&app);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let text = loop {
        if let Some(text) = scrape_text(&base).await {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/metrics never answered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let m = Scrape::parse(&text);

    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        m.0.get(&key(&format!(r#"wa_build_info{{version="{version}"}}"#))),
        Some(&1.0),
        "{m:#?}"
    );
    let mut zeros: Vec<String> = [
        "wa_webhook_bodies_total",
        "wa_webhook_duplicates_total",
        "wa_webhook_stale_total",
        "wa_webhook_parked_total",
        "wa_webhook_requeued_total",
        "wa_jobs_in_flight",
        "wa_cloud_api_duration_seconds_count",
        "wa_pacing_wait_seconds_count",
        "wa_webhook_status_lag_seconds_count",
    ]
    .map(str::to_owned)
    .into();
    for outcome in JobOutcome::ALL {
        for lane in Lane::ALL {
            let (outcome, lane) = (outcome.label(), lane.as_str());
            zeros.push(format!(
                r#"wa_jobs_total{{outcome="{outcome}",lane="{lane}"}}"#
            ));
        }
    }
    zeros.extend(DeadReason::ALL.map(|r| format!(r#"wa_dead_letters_total{{reason="{r}"}}"#)));
    zeros.extend(
        DeferCause::ALL.map(|c| format!(r#"wa_deferrals_total{{cause="{}"}}"#, c.as_str())),
    );
    zeros.extend(
        ["other", "not_sent", "ambiguous"]
            .map(|c| format!(r#"wa_cloud_api_errors_total{{code="{c}"}}"#)),
    );
    zeros.extend(HALT_SCOPES.map(|s| format!(r#"wa_halts_total{{scope="{s}"}}"#)));
    zeros.extend(STATUSES.map(|s| format!(r#"wa_webhook_statuses_total{{status="{s}"}}"#)));
    let missing: Vec<&String> = zeros
        .iter()
        .filter(|series| m.0.get(&key(series)) != Some(&0.0))
        .collect();
    assert!(missing.is_empty(), "not at 0: {missing:#?}\nin {m:#?}");

    let spaced: Vec<_> = label_values(&text)
        .into_iter()
        .filter(|(_, value)| value.contains(' '))
        .collect();
    assert!(spaced.is_empty(), "label values with a space: {spaced:#?}");
    // Stopped first: a worker running while its queues are deleted declares them again.
    let _ = worker.kill().await;
    app.cleanup().await;
}

#[tokio::test]
async fn the_worker_counts_sent_deferred_and_dead_lettered_jobs() {
    worker_scrape().await;
}

/// Runs a worker through sent, deferred, failed and dead-lettered jobs, checks its series, and
/// returns its last scrape.
async fn worker_scrape() -> Scrape {
    // Events kept, so that the kept events' gauges (and the alert on them) are exported too.
    let mut app = spawn_app("metrics-worker", |settings, _| {
        settings.amqp.events_kept = 1000;
    })
    .await;
    let (mut worker, base) = spawn_worker(&app);

    // Sent: two bulk replies and one transactional.
    for (id, lane) in [
        ("m-bulk-1", Lane::Bulk),
        ("m-bulk-2", Lane::Bulk),
        ("m-tx-1", Lane::Transactional),
    ] {
        app.enqueue_reply(lane, &text_job(id)).await;
    }
    // Deferred once as `not_before`, then sent (bulk).
    let mut later = text_job("m-later");
    later["not_before"] = json!((chrono::Utc::now() + chrono::TimeDelta::seconds(3)).to_rfc3339());
    app.enqueue_reply(Lane::Bulk, &later).await;
    // Dead-lettered: a body that is not a job, and a free-form message to a user who never wrote.
    app.enqueue(Lane::Bulk, b"this is not a job".to_vec()).await;
    app.enqueue_json(Lane::Bulk, &text_job("m-no-window")).await;
    // Refused by Meta (131026, not deliverable to this user): an error by code, dead-lettered.
    app.simulator.inject(wa_sender::simulator::FaultRule {
        job_id: Some("m-undeliverable".into()),
        fault: wa_sender::simulator::Fault::Error {
            code: 131026,
            status: 400,
        },
        times: 1,
    });
    app.enqueue_reply(Lane::Bulk, &text_job("m-undeliverable"))
        .await;

    app.wait_job_event("m-later", "message.accepted").await;
    let m = wait_scrape(&base, Duration::from_secs(20), |m| {
        m.sum("wa_sends_total") >= 4.0
            && m.sum("wa_dead_letters_total") >= 3.0
            && m.get("wa_jobs_in_flight") == 0.0
    })
    .await;

    let jobs = |outcome: &str, lane: &str| {
        m.get(&format!(
            r#"wa_jobs_total{{outcome="{outcome}",lane="{lane}"}}"#
        ))
    };
    assert_eq!(jobs("sent", "bulk"), 3.0, "{m:#?}");
    assert_eq!(jobs("sent", "transactional"), 1.0, "{m:#?}");
    assert_eq!(jobs("dead_lettered", "bulk"), 3.0, "{m:#?}");
    assert_eq!(jobs("requeued", "bulk"), 0.0, "{m:#?}");
    assert_eq!(
        m.get(&format!(r#"wa_sends_total{{phone_number_id="{NUMBER}"}}"#)),
        4.0
    );
    assert_eq!(
        m.get(r#"wa_dead_letters_total{reason="invalid_job"}"#),
        1.0,
        "{m:#?}"
    );
    assert_eq!(
        m.get(r#"wa_dead_letters_total{reason="outside_care_window"}"#),
        1.0,
        "{m:#?}"
    );
    // The scheduled job is deferred once for its not_before; its later hops through shorter
    // delay queues, if any, are counted under their own cause, and every deferral is a job
    // settled `deferred`.
    assert_eq!(
        m.get(r#"wa_deferrals_total{cause="not_before"}"#),
        1.0,
        "{m:#?}"
    );
    assert_eq!(jobs("deferred", "bulk"), m.sum("wa_deferrals_total"));
    // Five calls to the Cloud API, one refused; six jobs paced (the one outside its care
    // window is refused by admission after its slot).
    assert_eq!(m.get("wa_cloud_api_duration_seconds_count"), 5.0, "{m:#?}");
    assert_eq!(
        m.get(r#"wa_cloud_api_errors_total{code="131026"}"#),
        1.0,
        "{m:#?}"
    );
    assert_eq!(m.sum("wa_cloud_api_errors_total"), 1.0);
    assert_eq!(m.get("wa_pacing_wait_seconds_count"), 6.0, "{m:#?}");
    // The number's limit as configured, its schedule at the headroom, one replica.
    let limit = f64::from(app.settings.numbers[NUMBER].throughput_mps);
    let number = format!(r#"{{phone_number_id="{NUMBER}"}}"#);
    assert_eq!(m.get(&format!("wa_number_limit_mps{number}")), limit);
    let pace = m.get(&format!("wa_number_pace_mps{number}"));
    assert!(
        (pace - limit * app.settings.worker.throughput_headroom).abs() < 1e-6,
        "{pace}"
    );
    assert_eq!(m.get("wa_replicas"), 1.0);
    assert_eq!(m.get("wa_halts_in_force"), 0.0);
    // Queue depth is sampled every few seconds: every lane is there, and empty once all is done.
    let m = wait_scrape(&base, Duration::from_secs(15), |m| {
        Lane::ALL.iter().all(|l| {
            let series = format!(r#"wa_queue_depth{{lane="{}"}}"#, l.as_str());
            m.0.get(&key(&series)) == Some(&0.0)
        })
    })
    .await;
    assert_eq!(m.sum("wa_queue_depth"), 0.0);
    // Stopped first: a worker running while its queues are deleted declares them again.
    let _ = worker.kill().await;
    app.cleanup().await;
    m
}

#[tokio::test]
async fn the_worker_reports_how_long_a_lanes_oldest_job_waited() {
    let app = spawn_app("metrics-wait", |_, _| {}).await;
    // Queued before any worker runs: it waits at least 3 s at the head of the bulk lane.
    app.enqueue_reply(Lane::Bulk, &text_job("m-waited")).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (mut worker, base) = spawn_worker(&app);
    let bulk = r#"wa_queue_oldest_wait_seconds{lane="bulk"}"#;
    let m = wait_scrape(&base, Duration::from_secs(20), |m| m.get(bulk) > 0.0).await;
    let waited = m.get(bulk);
    assert!((3.0..60.0).contains(&waited), "waited {waited} s: {m:#?}");
    // The other lanes held nothing.
    for lane in ["otp", "transactional"] {
        let series = format!(r#"wa_queue_oldest_wait_seconds{{lane="{lane}"}}"#);
        assert_eq!(m.0.get(&key(&series)), Some(&0.0), "{m:#?}");
    }
    // Stopped first: a worker running while its queues are deleted declares them again.
    let _ = worker.kill().await;
    app.cleanup().await;
}

const APP_SECRET: &str = "metrics-app-secret";

/// A signed-webhook body from the test number's portfolio with `statuses`.
fn statuses(statuses: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({"object": "whatsapp_business_account",
        "entry": [{"id": WABA, "changes": [{"field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550783881", "phone_number_id": NUMBER},
            "statuses": statuses}}]}]}))
    .unwrap()
}

#[tokio::test]
async fn the_webhook_process_counts_bodies_statuses_and_parked_parts() {
    webhook_scrape().await;
}

/// Posts signed, repeated, broken and forged bodies to a webhook process, checks its series,
/// and returns its last scrape.
async fn webhook_scrape() -> Scrape {
    let app = spawn_app("metrics-webhook", |_, _| {}).await;
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let _webhook = app
        .command("webhook")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("WA_SENDER__WEBHOOK__APP_SECRET", APP_SECRET)
        .env("WA_SENDER__WEBHOOK__VERIFY_TOKEN", "metrics-verify")
        .stderr(Stdio::null())
        .spawn()
        .expect("the wa-sender binary starts");
    common::wait_readyz(&base, Duration::from_secs(20), |status, _| status == 200).await;

    // A message sent and delivered, priced as marketing to Germany (0.1502 USD on the card).
    let at = (chrono::Utc::now().timestamp() - 2).to_string();
    let pricing = json!({"billable": true, "pricing_model": "PMP", "type": "regular", "category": "marketing"});
    let body = statuses(json!([
        {"id": "wamid.metrics-1", "status": "sent", "timestamp": at, "recipient_id": "4915112345678", "pricing": pricing},
        {"id": "wamid.metrics-1", "status": "delivered", "timestamp": at, "recipient_id": "4915112345678", "pricing": pricing},
    ]));
    let client = reqwest::Client::new();
    let post = |body: Vec<u8>, secret: &str| {
        client
            .post(format!("{base}/webhook"))
            .header("content-type", "application/json")
            .header(
                "x-hub-signature-256",
                wa_sender::simulator::sign(secret, &body),
            )
            .body(body)
            .send()
    };
    assert_eq!(post(body.clone(), APP_SECRET).await.unwrap().status(), 200);
    // Bodies are processed concurrently: the first is recorded before Meta sends it again.
    wait_scrape(&base, Duration::from_secs(20), |m| {
        m.get("wa_webhook_bodies_total") == 1.0
    })
    .await;
    for (body, secret, expected) in [
        // Meta sends again: `delivered` is a duplicate, `sent` is stale (older than delivered).
        (body, APP_SECRET, 200),
        // Signed but not a webhook: parked.
        (b"{\"object\": [".to_vec(), APP_SECRET, 200),
        // Forged: refused before the intake.
        (b"{}".to_vec(), "not-the-secret", 401),
    ] {
        let answer = post(body, secret).await.unwrap();
        assert_eq!(answer.status().as_u16(), expected);
    }

    let m = wait_scrape(&base, Duration::from_secs(20), |m| {
        m.get("wa_webhook_bodies_total") >= 3.0
    })
    .await;
    assert_eq!(m.get("wa_webhook_bodies_total"), 3.0, "{m:#?}");
    assert_eq!(
        m.get(r#"wa_webhook_statuses_total{status="sent"}"#),
        2.0,
        "{m:#?}"
    );
    assert_eq!(
        m.get(r#"wa_webhook_statuses_total{status="delivered"}"#),
        2.0
    );
    assert_eq!(m.get("wa_webhook_duplicates_total"), 1.0, "{m:#?}");
    assert_eq!(m.get("wa_webhook_stale_total"), 1.0, "{m:#?}");
    assert_eq!(m.get("wa_webhook_parked_total"), 1.0, "{m:#?}");
    assert_eq!(m.get("wa_webhook_status_lag_seconds_count"), 4.0);
    // Priced once, on the first billable status.
    assert_eq!(
        m.get(r#"wa_estimated_cost_micros_total{category="marketing",currency="USD"}"#),
        150_200.0,
        "{m:#?}"
    );
    let requests = |status: u16| {
        m.get(&format!(
            r#"wa_http_requests_total{{route="/webhook",status="{status}"}}"#
        ))
    };
    assert_eq!((requests(200), requests(401)), (3.0, 1.0), "{m:#?}");
    app.cleanup().await;
    m
}

/// Every metric the Grafana dashboard and the Prometheus alert rules query is one a running
/// worker or webhook process exports: a renamed metric cannot leave a panel blank or an alert
/// silent.
#[tokio::test]
async fn the_dashboard_and_alerts_use_only_exported_metrics() {
    let (worker, webhook) = tokio::join!(worker_scrape(), webhook_scrape());
    let exported: std::collections::BTreeSet<&str> = worker
        .0
        .keys()
        .chain(webhook.0.keys())
        .filter_map(|series| series.split('{').next())
        .collect();
    let deploy = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");
    let mut used = std::collections::BTreeSet::new();
    for file in ["grafana/wa-sender.json", "prometheus/alerts.yml"] {
        let text = std::fs::read_to_string(format!("{deploy}/{file}")).unwrap();
        for (at, _) in text.match_indices("wa_") {
            let starts_a_name = at == 0 || !text.as_bytes()[at - 1].is_ascii_alphanumeric();
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            if starts_a_name && name.len() > "wa_".len() {
                used.insert((file, name));
            }
        }
    }
    assert!(used.len() >= 15, "{used:?}");
    let missing: Vec<_> = used
        .iter()
        .filter(|(_, name)| !exported.contains(name.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "not exported: {missing:?}; exported: {exported:?}"
    );
}
