//! Prometheus metrics: every name, label and help text in one place, and `/metrics` for each
//! long-running process. The code that already counts something (the worker's `Stats`, the
//! webhook processor's `ProcessorStats`) calls the functions here at the same points, so the
//! logs, the demo summary and a scrape never disagree.
//!
//! Labels come from closed sets only (lanes, configured numbers, dead-letter reasons, known
//! error codes, deferral causes, status values): a job id or a recipient would give every job
//! its own series. Every label value is a snake_case token; the human phrase stays in the logs.
//! [`install`] puts every series of a closed set on the page at 0, so `rate()` and absence
//! alerts see a quiet process, not a missing one.

use std::sync::OnceLock;
use std::time::Duration;

use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub use crate::vocab::DeferCause;
use crate::vocab::{DeadReason, ErrorCode, Lane};

/// Jobs settled, by outcome and lane.
pub const JOBS: &str = "wa_jobs_total";
/// Dead letters by reason.
pub const DEAD_LETTERS: &str = "wa_dead_letters_total";
/// Deferrals by cause.
pub const DEFERRALS: &str = "wa_deferrals_total";
/// Sends Meta accepted, by business number.
pub const SENDS: &str = "wa_sends_total";
/// Cloud API send latency.
pub const CLOUD_API_DURATION: &str = "wa_cloud_api_duration_seconds";
/// Failed Cloud API sends, by code.
pub const CLOUD_API_ERRORS: &str = "wa_cloud_api_errors_total";
/// Time a job spent in the `pace` stage (booking its slot and waiting for it).
pub const PACING_WAIT: &str = "wa_pacing_wait_seconds";
/// Jobs being decided or settled now.
pub const JOBS_IN_FLIGHT: &str = "wa_jobs_in_flight";
/// Each number's limit as this replica applies it.
pub const NUMBER_LIMIT: &str = "wa_number_limit_mps";
/// Each number's schedule rate: the limit times the headroom.
pub const NUMBER_PACE: &str = "wa_number_pace_mps";
/// Live replicas as last heard.
pub const REPLICAS: &str = "wa_replicas";
/// The RabbitMQ node a process is connected to (1; 0 for a node it left).
pub const BROKER_NODE: &str = "wa_broker_node";
/// Halting errors, by what they halt.
pub const HALTS: &str = "wa_halts_total";
/// Halts whose cool-down has not ended.
pub const HALTS_IN_FORCE: &str = "wa_halts_in_force";
/// Jobs waiting in a lane's queues.
pub const QUEUE_DEPTH: &str = "wa_queue_depth";
/// How long the oldest job of a lane has waited.
pub const QUEUE_OLDEST_WAIT: &str = "wa_queue_oldest_wait_seconds";
/// Event messages (each one or more events) kept unread in the kept events' queue.
pub const EVENTS_UNREAD: &str = "wa_events_unread";
/// The most event messages the kept events' queue holds before it drops the oldest.
pub const EVENTS_KEPT_LIMIT: &str = "wa_events_kept_limit";
/// Webhook bodies processed.
pub const WEBHOOK_BODIES: &str = "wa_webhook_bodies_total";
/// Message statuses processed, by value.
pub const WEBHOOK_STATUSES: &str = "wa_webhook_statuses_total";
/// Statuses seen before.
pub const WEBHOOK_DUPLICATES: &str = "wa_webhook_duplicates_total";
/// Statuses older than the one recorded.
pub const WEBHOOK_STALE: &str = "wa_webhook_stale_total";
/// Bodies with something parked.
pub const WEBHOOK_PARKED: &str = "wa_webhook_parked_total";
/// Bodies returned to the intake.
pub const WEBHOOK_REQUEUED: &str = "wa_webhook_requeued_total";
/// From a status's timestamp to its processing.
pub const WEBHOOK_STATUS_LAG: &str = "wa_webhook_status_lag_seconds";
/// Estimated cost, in millionths of the rate card's currency.
pub const ESTIMATED_COST: &str = "wa_estimated_cost_micros_total";
/// HTTP requests answered, by route and status.
pub const HTTP_REQUESTS: &str = "wa_http_requests_total";
/// 1, labelled with this build's version (the Prometheus `*_build_info` convention).
pub const BUILD_INFO: &str = "wa_build_info";

/// The `scope` values of [`HALTS`]: `store::HaltScope::kind` of each scope (a unit test holds
/// the two together; the store's scopes carry ids, so there is no list of them to borrow).
pub const HALT_SCOPES: [&str; 4] = ["number", "waba", "token", "app"];

/// The `status` values of [`WEBHOOK_STATUSES`]: the webhook's `MessageStatus::label` of each
/// status Meta sends, and `other` (a unit test holds the two together).
pub const STATUSES: [&str; 8] = [
    "sent",
    "delivered",
    "read",
    "played",
    "failed",
    "deleted",
    "warning",
    "other",
];

/// The `code` of [`CLOUD_API_ERRORS`] for a code this build does not know.
const CODE_OTHER: &str = "other";
/// The `code` of [`CLOUD_API_ERRORS`] for a request that did not reach Meta.
const CODE_NOT_SENT: &str = "not_sent";
/// The `code` of [`CLOUD_API_ERRORS`] for a request that left without an answer.
const CODE_AMBIGUOUS: &str = "ambiguous";

/// How often histogram samples are folded into their buckets when nobody scrapes: without it
/// they would pile up in memory.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The recorder is process-wide (the facade has one global recorder), so its handle is too:
/// every server merges the same [`router`] without the handle threaded through its builder.
static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder for this process (once; later calls do nothing), describes
/// every metric and puts each series of a closed label set at 0. Before it, and in processes
/// that never call it (tests, the demo), recording costs next to nothing and `/metrics`
/// answers 404.
pub fn install() {
    HANDLE.get_or_init(|| {
        let handle = builder()
            .install_recorder()
            .expect("the metrics recorder is installed once per process");
        describe();
        initialise();
        let upkeep = handle.clone();
        std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(UPKEEP_EVERY);
                    upkeep.run_upkeep();
                }
            })
            .expect("a thread for metrics upkeep");
        handle
    });
}

/// Buckets for the histograms (Prometheus histograms, not summaries, so replicas add up).
fn builder() -> PrometheusBuilder {
    let buckets = [
        (
            CLOUD_API_DURATION,
            &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0][..],
        ),
        (
            PACING_WAIT,
            &[
                0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ][..],
        ),
        (
            WEBHOOK_STATUS_LAG,
            &[
                0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 86400.0,
            ][..],
        ),
    ];
    buckets
        .into_iter()
        .fold(PrometheusBuilder::new(), |b, (name, values)| {
            b.set_buckets_for_metric(Matcher::Full(name.into()), values)
                .expect("buckets are not empty")
        })
}

/// The help text and unit of every metric: what the README's table says.
fn describe() {
    describe_counter!(
        JOBS,
        "Jobs settled by outcome (sent, already_done, deferred, dead_lettered, requeued) and lane"
    );
    describe_counter!(DEAD_LETTERS, "Jobs dead-lettered by the worker, by reason");
    describe_counter!(
        DEFERRALS,
        "Jobs deferred to a delay queue, by cause (retry, throttled, not_before, ...)"
    );
    describe_counter!(SENDS, "Sends Meta accepted, by business number");
    describe_histogram!(
        CLOUD_API_DURATION,
        Unit::Seconds,
        "Latency of Cloud API send calls, failed ones included"
    );
    describe_counter!(
        CLOUD_API_ERRORS,
        "Failed Cloud API sends by Meta's error code (other: a code this build does not know; not_sent, ambiguous: no answer)"
    );
    describe_histogram!(
        PACING_WAIT,
        Unit::Seconds,
        "Time a job spent in the pace stage: booking its send slot in its number's schedule and waiting for it"
    );
    describe_gauge!(
        JOBS_IN_FLIGHT,
        "Jobs taken from a queue and not yet settled"
    );
    describe_gauge!(
        NUMBER_LIMIT,
        "Each number's throughput limit in messages per second (configured, or raised by a webhook)"
    );
    describe_gauge!(
        NUMBER_PACE,
        "Each number's send schedule in messages per second (limit times headroom), shared by all replicas"
    );
    describe_gauge!(REPLICAS, "Live worker replicas, as this one last heard");
    describe_gauge!(
        BROKER_NODE,
        "The RabbitMQ node this process is connected to (1), by host:port; 0 for one it left"
    );
    describe_counter!(
        HALTS,
        "Cloud API errors that halted sending, by scope (number, waba, token, app)"
    );
    describe_gauge!(
        HALTS_IN_FORCE,
        "Halts on this replica whose cool-down has not ended"
    );
    describe_gauge!(
        QUEUE_DEPTH,
        "Jobs ready in a lane's queues, all configured numbers together (sampled)"
    );
    describe_gauge!(
        QUEUE_OLDEST_WAIT,
        Unit::Seconds,
        "How long the oldest job of a lane had waited when this replica took it (sampled; grows while none is taken from a lane that is not empty)"
    );
    describe_gauge!(
        EVENTS_UNREAD,
        "Event messages (each one or more events) kept unread in <prefix>.events.kept (sampled)"
    );
    describe_gauge!(
        EVENTS_KEPT_LIMIT,
        "The most event messages <prefix>.events.kept holds; past it the oldest are dropped"
    );
    describe_counter!(WEBHOOK_BODIES, "Webhook bodies processed and acked");
    describe_counter!(
        WEBHOOK_STATUSES,
        "Message statuses processed (applied, duplicate or stale), by status"
    );
    describe_counter!(WEBHOOK_DUPLICATES, "Message statuses seen before");
    describe_counter!(
        WEBHOOK_STALE,
        "Message statuses older than the one recorded (never applied backwards)"
    );
    describe_counter!(
        WEBHOOK_PARKED,
        "Webhook bodies parked whole or in part (unreadable)"
    );
    describe_counter!(
        WEBHOOK_REQUEUED,
        "Webhook bodies returned to the intake after a store or broker failure"
    );
    describe_histogram!(
        WEBHOOK_STATUS_LAG,
        Unit::Seconds,
        "From a status's timestamp at Meta to its processing here"
    );
    describe_counter!(
        ESTIMATED_COST,
        "Estimated cost of billable messages in millionths of the currency, by pricing category"
    );
    describe_counter!(HTTP_REQUESTS, "HTTP requests answered, by route and status");
    describe_gauge!(BUILD_INFO, "1, labelled with the version of this build");
}

/// [`BUILD_INFO`] at 1, and every series whose labels come from a closed set at 0: a series is
/// otherwise absent until its first event, and `rate()` or an absence alert cannot tell a
/// quiet process from one that never counts. Every process gets them all, as it gets one
/// recorder whatever it runs. Left out: series per configured number (not known here; the
/// worker's pacer sets its gauges at start), per known error code (no list of them), per
/// rate-card category, and sampled gauges, where a 0 before the first sample would be a
/// claim nobody measured.
fn initialise() {
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    // The worker's.
    for outcome in JobOutcome::ALL {
        for lane in Lane::ALL {
            counter!(JOBS, "outcome" => outcome.label(), "lane" => lane.as_str()).increment(0);
        }
    }
    for reason in DeadReason::ALL {
        counter!(DEAD_LETTERS, "reason" => reason.as_str()).increment(0);
    }
    for cause in DeferCause::ALL {
        counter!(DEFERRALS, "cause" => cause.as_str()).increment(0);
    }
    for code in [CODE_OTHER, CODE_NOT_SENT, CODE_AMBIGUOUS] {
        counter!(CLOUD_API_ERRORS, "code" => code).increment(0);
    }
    for scope in HALT_SCOPES {
        counter!(HALTS, "scope" => scope).increment(0);
    }
    gauge!(JOBS_IN_FLIGHT).increment(0.0);
    // The webhook process's.
    for status in STATUSES {
        counter!(WEBHOOK_STATUSES, "status" => status).increment(0);
    }
    for name in [
        WEBHOOK_BODIES,
        WEBHOOK_DUPLICATES,
        WEBHOOK_STALE,
        WEBHOOK_PARKED,
        WEBHOOK_REQUEUED,
    ] {
        counter!(name).increment(0);
    }
    // A histogram is on the page, empty, once registered.
    for name in [CLOUD_API_DURATION, PACING_WAIT, WEBHOOK_STATUS_LAG] {
        let _registered = histogram!(name);
    }
}

/// `GET /metrics`: the Prometheus text format. Merge it outside any authentication, like the
/// probes: a scraper carries no token, and these say nothing secret.
pub fn router() -> Router {
    Router::new().route("/metrics", get(render))
}

async fn render() -> Response {
    let Some(handle) = HANDLE.get() else {
        return (StatusCode::NOT_FOUND, "no metrics recorder in this process").into_response();
    };
    // Folds the latest histogram samples in, so a scrape sees every call made before it.
    handle.run_upkeep();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response()
}

/// Counts every request `router` answers in [`HTTP_REQUESTS`], by its route's pattern (not
/// its path, which holds ids) and status.
pub fn count_requests(router: Router) -> Router {
    router.layer(middleware::from_fn(count_request))
}

async fn count_request(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    counter!(HTTP_REQUESTS, "route" => route, "status" => status).increment(1);
    response
}

/// How a delivery ended, as the `outcome` label of [`JOBS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobOutcome {
    /// Meta accepted it.
    Sent,
    /// Sent or dead-lettered before: acked without a send.
    AlreadyDone,
    /// Published to a delay queue.
    Deferred,
    /// Dead-lettered.
    DeadLettered,
    /// Its settlement failed; it went back to its queue.
    Requeued,
}

impl JobOutcome {
    /// Every outcome.
    pub const ALL: [JobOutcome; 5] = [
        JobOutcome::Sent,
        JobOutcome::AlreadyDone,
        JobOutcome::Deferred,
        JobOutcome::DeadLettered,
        JobOutcome::Requeued,
    ];

    /// The `outcome` label.
    pub fn label(self) -> &'static str {
        match self {
            JobOutcome::Sent => "sent",
            JobOutcome::AlreadyDone => "already_done",
            JobOutcome::Deferred => "deferred",
            JobOutcome::DeadLettered => "dead_lettered",
            JobOutcome::Requeued => "requeued",
        }
    }
}

/// A delivery of `lane` settled as `outcome`.
pub fn job_settled(outcome: JobOutcome, lane: Lane) {
    counter!(JOBS, "outcome" => outcome.label(), "lane" => lane.as_str()).increment(1);
}

/// A job was dead-lettered for `reason`.
pub fn dead_lettered(reason: DeadReason) {
    counter!(DEAD_LETTERS, "reason" => reason.as_str()).increment(1);
}

/// A job was deferred for `cause`.
pub fn deferred(cause: DeferCause) {
    counter!(DEFERRALS, "cause" => cause.as_str()).increment(1);
}

/// Meta accepted a send from `phone_number_id` (a configured number).
pub fn sent(phone_number_id: &str) {
    counter!(SENDS, "phone_number_id" => phone_number_id.to_owned()).increment(1);
}

/// A Cloud API send call took `took`.
pub fn cloud_api_call(took: Duration) {
    histogram!(CLOUD_API_DURATION).record(took);
}

/// Meta answered a send with error `code`.
pub fn cloud_api_error(code: i64) {
    let label = match ErrorCode::from(code) {
        ErrorCode::Unknown(_) => CODE_OTHER.to_owned(),
        known => known.as_i64().to_string(),
    };
    counter!(CLOUD_API_ERRORS, "code" => label).increment(1);
}

/// A send failed without Meta's answer: `ambiguous` when it may have arrived, else not sent.
pub fn cloud_api_unanswered(ambiguous: bool) {
    let label = if ambiguous {
        CODE_AMBIGUOUS
    } else {
        CODE_NOT_SENT
    };
    counter!(CLOUD_API_ERRORS, "code" => label).increment(1);
}

/// A job waited `waited` in the `pace` stage.
pub fn paced(waited: Duration) {
    histogram!(PACING_WAIT).record(waited);
}

/// A job in flight, counted in [`JOBS_IN_FLIGHT`] until dropped (however its task ends).
pub struct InFlight(());

impl InFlight {
    /// Counts one more job in flight.
    pub fn start() -> InFlight {
        gauge!(JOBS_IN_FLIGHT).increment(1.0);
        InFlight(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        gauge!(JOBS_IN_FLIGHT).decrement(1.0);
    }
}

/// `phone_number_id` is paced for `limit` messages per second, its schedule at `pace`.
pub fn number_pace(phone_number_id: &str, limit: u32, pace: f64) {
    let id = phone_number_id.to_owned();
    gauge!(NUMBER_LIMIT, "phone_number_id" => id.clone()).set(f64::from(limit));
    gauge!(NUMBER_PACE, "phone_number_id" => id).set(pace);
}

/// `replicas` live replicas were heard of.
pub fn replicas(replicas: u32) {
    gauge!(REPLICAS).set(f64::from(replicas));
}

/// This process connected to the RabbitMQ node `node` (`host:port`), leaving `left` if any.
pub fn broker_node(left: Option<&str>, node: &str) {
    if let Some(left) = left.filter(|l| *l != node) {
        gauge!(BROKER_NODE, "node" => left.to_owned()).set(0.0);
    }
    gauge!(BROKER_NODE, "node" => node.to_owned()).set(1.0);
}

/// Sending was halted for `scope`, one of [`HALT_SCOPES`].
pub fn halted(scope: &'static str) {
    counter!(HALTS, "scope" => scope).increment(1);
}

/// `halts` halts are in force now.
pub fn halts_in_force(halts: usize) {
    gauge!(HALTS_IN_FORCE).set(halts as f64);
}

/// `unread` events wait in the kept events' queue, which holds at most `limit`.
pub fn events_unread(unread: u32, limit: u64) {
    gauge!(EVENTS_UNREAD).set(f64::from(unread));
    gauge!(EVENTS_KEPT_LIMIT).set(limit as f64);
}

/// `depth` jobs wait in `lane`'s queues.
pub fn queue_depth(lane: Lane, depth: u32) {
    gauge!(QUEUE_DEPTH, "lane" => lane.as_str()).set(f64::from(depth));
}

/// The oldest job of `lane` has waited `wait`.
pub fn oldest_wait(lane: Lane, wait: Duration) {
    gauge!(QUEUE_OLDEST_WAIT, "lane" => lane.as_str()).set(wait.as_secs_f64());
}

/// A webhook body was processed, with `duplicates` and `stale` statuses among its own, and
/// something `parked` or not.
pub fn webhook_body(duplicates: usize, stale: usize, parked: bool) {
    counter!(WEBHOOK_BODIES).increment(1);
    counter!(WEBHOOK_DUPLICATES).increment(duplicates as u64);
    counter!(WEBHOOK_STALE).increment(stale as u64);
    counter!(WEBHOOK_PARKED).increment(u64::from(parked));
}

/// A status `status` that happened `lag` before it was processed.
pub fn webhook_status(status: &'static str, lag: Duration) {
    counter!(WEBHOOK_STATUSES, "status" => status).increment(1);
    histogram!(WEBHOOK_STATUS_LAG).record(lag);
}

/// A webhook body went back to the intake.
pub fn webhook_requeued() {
    counter!(WEBHOOK_REQUEUED).increment(1);
}

/// Messages of pricing `category` were estimated at `micros` millionths of `currency`.
pub fn estimated_cost(category: &str, currency: &str, micros: i64) {
    let (category, currency) = (category.to_owned(), currency.to_owned());
    counter!(ESTIMATED_COST, "category" => category, "currency" => currency)
        .increment(micros.max(0) as u64);
}

#[cfg(test)]
mod tests {
    use metrics_exporter_prometheus::PrometheusRecorder;
    use tokio_util::sync::CancellationToken;

    use super::*;

    /// What `record` puts on a fresh recorder with this process's buckets, as scraped.
    fn scraped(record: impl FnOnce()) -> String {
        let recorder = builder().build_recorder();
        metrics::with_local_recorder(&recorder, record);
        rendered(&recorder)
    }

    fn rendered(recorder: &PrometheusRecorder) -> String {
        let handle = recorder.handle();
        handle.run_upkeep();
        handle.render()
    }

    /// Each label of a scrape as (series, label, value).
    fn labels(text: &str) -> Vec<(&str, &str, &str)> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once('{'))
            .flat_map(|(series, rest)| {
                let labels = rest.rsplit_once("\"}").map_or(rest, |(labels, _)| labels);
                labels
                    .split("\",")
                    .filter_map(|pair| pair.split_once("=\""))
                    .map(move |(label, value)| (series, label, value))
            })
            .collect()
    }

    #[test]
    fn installing_shows_every_closed_series_at_zero_and_the_build_at_one() {
        let text = scraped(initialise);
        let version = env!("CARGO_PKG_VERSION");
        let mut lines = vec![
            format!(r#"wa_build_info{{version="{version}"}} 1"#),
            r#"wa_jobs_total{outcome="requeued",lane="otp"} 0"#.to_owned(),
            r#"wa_cloud_api_errors_total{code="ambiguous"} 0"#.to_owned(),
            r#"wa_webhook_statuses_total{status="other"} 0"#.to_owned(),
            "wa_webhook_requeued_total 0".to_owned(),
            "wa_jobs_in_flight 0".to_owned(),
            "wa_cloud_api_duration_seconds_count 0".to_owned(),
        ];
        lines
            .extend(DeadReason::ALL.map(|r| format!(r#"wa_dead_letters_total{{reason="{r}"}} 0"#)));
        lines.extend(
            DeferCause::ALL.map(|c| format!(r#"wa_deferrals_total{{cause="{}"}} 0"#, c.as_str())),
        );
        lines.extend(HALT_SCOPES.map(|s| format!(r#"wa_halts_total{{scope="{s}"}} 0"#)));
        for line in lines {
            assert!(text.contains(&format!("{line}\n")), "{line} in\n{text}");
        }
    }

    #[test]
    fn every_label_value_is_a_token() {
        let text = scraped(|| {
            initialise();
            for cause in DeferCause::ALL {
                deferred(cause);
            }
            halted("waba");
            cloud_api_error(131_026);
        });
        let labels = labels(&text);
        assert!(labels.len() > 60, "{labels:?}");
        for (series, label, value) in labels {
            assert!(!value.contains(' '), "{series}: {label}={value:?}");
            // A version and a bucket's bound are numbers, not tokens.
            if matches!(label, "version" | "le") {
                continue;
            }
            let token = !value.is_empty()
                && value
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            assert!(
                token,
                "{series}: {label}={value:?} is not a snake_case token"
            );
        }
        assert!(
            text.contains("wa_deferrals_total{cause=\"sending_halted\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn the_halt_scopes_and_statuses_are_those_their_owners_label() {
        use crate::ids::{PhoneNumberId, WabaId};
        use crate::store::HaltScope;
        use crate::webhook::payload::{KNOWN_STATUSES, MessageStatus};
        let scopes = [
            HaltScope::Number(PhoneNumberId::parse("106540352242922").unwrap()),
            HaltScope::Waba(WabaId::parse("102290129340398").unwrap()),
            HaltScope::Token,
            HaltScope::App,
        ];
        for scope in &scopes {
            // Exhaustive: a new scope does not compile until it is listed above.
            match scope {
                HaltScope::Number(_) | HaltScope::Waba(_) | HaltScope::Token | HaltScope::App => {}
            }
        }
        assert_eq!(scopes.map(|s| s.kind()), HALT_SCOPES);
        let statuses: Vec<&str> = KNOWN_STATUSES
            .split(", ")
            .map(|s| MessageStatus::from(s).label())
            .chain([MessageStatus::Other("new".into()).label()])
            .collect();
        assert_eq!(statuses, STATUSES);
    }

    #[test]
    fn error_codes_this_build_does_not_know_share_one_series() {
        let text = scraped(|| {
            cloud_api_error(131026);
            cloud_api_error(131026);
            cloud_api_error(987_654);
            cloud_api_error(123_456);
            cloud_api_unanswered(true);
            cloud_api_unanswered(false);
        });
        for line in [
            r#"wa_cloud_api_errors_total{code="131026"} 2"#,
            r#"wa_cloud_api_errors_total{code="other"} 2"#,
            r#"wa_cloud_api_errors_total{code="ambiguous"} 1"#,
            r#"wa_cloud_api_errors_total{code="not_sent"} 1"#,
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }

    #[test]
    fn latencies_are_histograms_that_replicas_can_add_up() {
        let text = scraped(|| {
            cloud_api_call(Duration::from_millis(30));
            paced(Duration::from_millis(2));
            webhook_status("sent", Duration::from_secs(3));
        });
        for line in [
            r#"wa_cloud_api_duration_seconds_bucket{le="0.025"} 0"#,
            r#"wa_cloud_api_duration_seconds_bucket{le="0.05"} 1"#,
            r#"wa_pacing_wait_seconds_bucket{le="0.005"} 1"#,
            r#"wa_webhook_status_lag_seconds_bucket{le="2"} 0"#,
            r#"wa_webhook_status_lag_seconds_bucket{le="5"} 1"#,
            "wa_webhook_status_lag_seconds_count 1",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }

    #[test]
    fn a_job_in_flight_is_counted_until_its_task_ends() {
        let recorder = builder().build_recorder();
        let second = metrics::with_local_recorder(&recorder, || {
            let first = InFlight::start();
            let second = InFlight::start();
            drop(first);
            second
        });
        assert!(rendered(&recorder).contains("wa_jobs_in_flight 1\n"));
        metrics::with_local_recorder(&recorder, || drop(second));
        assert!(rendered(&recorder).contains("wa_jobs_in_flight 0\n"));
    }

    #[tokio::test]
    async fn requests_are_counted_by_route_pattern_not_by_path() {
        let recorder = builder().build_recorder();
        // The test runtime has one thread: the server's handlers record on this recorder.
        let _local = metrics::set_default_local_recorder(&recorder);
        let routes = Router::new().route("/v1/campaigns/{id}", get(|| async { "ok" }));
        let server = crate::server::HttpServer::bind("127.0.0.1:0", count_requests(routes))
            .await
            .unwrap();
        let base = format!("http://{}", server.addr().unwrap());
        let stop = CancellationToken::new();
        let serving = tokio::spawn(server.run_until_stopped(stop.clone()));
        for path in ["/v1/campaigns/c-1", "/v1/campaigns/c-2", "/nowhere"] {
            reqwest::get(format!("{base}{path}")).await.unwrap();
        }
        stop.cancel();
        serving.await.unwrap().unwrap();
        let text = rendered(&recorder);
        for line in [
            r#"wa_http_requests_total{route="/v1/campaigns/{id}",status="200"} 2"#,
            r#"wa_http_requests_total{route="unmatched",status="404"} 1"#,
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }
}
