//! Per-replica counters and send latency, for the demo summary and logs; each count is also
//! forwarded to the process's metrics (`crate::metrics`) at the same moment, so the two agree.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;

use super::Outcome;
use crate::event::DeadReason;
use crate::job::Lane;
use crate::metrics::{self, JobOutcome};

/// Counters of one replica.
pub struct Stats {
    accepted: AtomicU64,
    already_done: AtomicU64,
    requeued: AtomicU64,
    duplicates_avoided: AtomicU64,
    halts: AtomicU64,
    deferred: Mutex<BTreeMap<String, u64>>,
    dead: Mutex<BTreeMap<DeadReason, u64>>,
    accepted_by_lane: Mutex<BTreeMap<Lane, u64>>,
    send_latency_us: Mutex<Histogram<u64>>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            accepted: AtomicU64::new(0),
            already_done: AtomicU64::new(0),
            requeued: AtomicU64::new(0),
            duplicates_avoided: AtomicU64::new(0),
            halts: AtomicU64::new(0),
            deferred: Mutex::default(),
            dead: Mutex::default(),
            accepted_by_lane: Mutex::default(),
            send_latency_us: Mutex::new(
                Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid histogram bounds"),
            ),
        }
    }
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatsSnapshot {
    /// Sends Meta accepted.
    pub accepted: u64,
    /// Accepted sends per lane.
    pub accepted_by_lane: BTreeMap<Lane, u64>,
    /// Redeliveries of jobs already sent or dead-lettered (acked without a send).
    pub already_done: u64,
    /// Deliveries whose settlement failed (a lost broker): back in their queues.
    pub requeued: u64,
    /// Of those, jobs already sent: duplicates avoided.
    pub duplicates_avoided: u64,
    /// Halting errors seen.
    pub halts: u64,
    /// Deferrals and retries by cause, keyed by its token (`DeferCause::as_str`).
    pub deferred: BTreeMap<String, u64>,
    /// Dead letters by reason.
    pub dead: BTreeMap<DeadReason, u64>,
    /// Cloud API call latency percentiles (p50, p99), if any call was made.
    pub send_latency_p50_p99: Option<(Duration, Duration)>,
}

impl Stats {
    pub(super) fn count(&self, outcome: &Outcome, lane: Lane) {
        match outcome {
            Outcome::Accepted(event) => {
                metrics::job_settled(JobOutcome::Sent, lane);
                // Only jobs of configured numbers are sent: the label has one value per number.
                metrics::sent(event.phone_number_id.as_deref().unwrap_or_default());
                self.accepted.fetch_add(1, Ordering::Relaxed);
                *self
                    .accepted_by_lane
                    .lock()
                    .expect("stats lock")
                    .entry(lane)
                    .or_default() += 1;
            }
            Outcome::AlreadyDone(_) => {
                metrics::job_settled(JobOutcome::AlreadyDone, lane);
                self.already_done.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Later(later) => {
                metrics::job_settled(JobOutcome::Deferred, lane);
                metrics::deferred(later.cause);
                *self
                    .deferred
                    .lock()
                    .expect("stats lock")
                    .entry(later.cause.as_str().to_owned())
                    .or_default() += 1
            }
            Outcome::Dead(dead) => {
                metrics::job_settled(JobOutcome::DeadLettered, lane);
                metrics::dead_lettered(dead.reason);
                *self
                    .dead
                    .lock()
                    .expect("stats lock")
                    .entry(dead.reason)
                    .or_default() += 1
            }
        }
    }

    /// A delivery of `lane` could not be settled and went back to its queue.
    pub(super) fn count_requeued(&self, lane: Lane) {
        metrics::job_settled(JobOutcome::Requeued, lane);
        self.requeued.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn count_duplicate_avoided(&self) {
        self.duplicates_avoided.fetch_add(1, Ordering::Relaxed);
    }

    /// Sending was halted for `scope` (`number`, `waba`, `token`, `app`).
    pub(super) fn count_halt(&self, scope: &'static str) {
        metrics::halted(scope);
        self.halts.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn record_send_latency(&self, d: Duration) {
        metrics::cloud_api_call(d);
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
        let _ = self
            .send_latency_us
            .lock()
            .expect("stats lock")
            .record(us.min(120_000_000));
    }

    /// A consistent-enough copy of every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        let h = self.send_latency_us.lock().expect("stats lock");
        StatsSnapshot {
            accepted: self.accepted.load(Ordering::Relaxed),
            accepted_by_lane: self.accepted_by_lane.lock().expect("stats lock").clone(),
            already_done: self.already_done.load(Ordering::Relaxed),
            requeued: self.requeued.load(Ordering::Relaxed),
            duplicates_avoided: self.duplicates_avoided.load(Ordering::Relaxed),
            halts: self.halts.load(Ordering::Relaxed),
            deferred: self.deferred.lock().expect("stats lock").clone(),
            dead: self.dead.lock().expect("stats lock").clone(),
            send_latency_p50_p99: (!h.is_empty()).then(|| {
                (
                    Duration::from_micros(h.value_at_quantile(0.5)),
                    Duration::from_micros(h.value_at_quantile(0.99)),
                )
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use metrics_exporter_prometheus::PrometheusBuilder;

    use super::*;
    use crate::vocab::DeferCause;

    #[test]
    fn every_count_reaches_the_metrics_as_it_reaches_the_snapshot() {
        let stats = Stats::default();
        let recorder = PrometheusBuilder::new().build_recorder();
        let bad = crate::job::decode(b"not a job").expect_err("not a job");
        ::metrics::with_local_recorder(&recorder, || {
            stats.count(&Outcome::undecodable(&bad, 0, None), Lane::Otp);
            stats.count(&Outcome::already_dead(), Lane::Bulk);
            stats.count_requeued(Lane::Bulk);
            stats.count_halt("waba");
        });
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.dead, BTreeMap::from([(bad.reason(), 1)]));
        assert_eq!(
            (snapshot.already_done, snapshot.requeued, snapshot.halts),
            (1, 1, 1)
        );
        let text = recorder.handle().render();
        for line in [
            r#"wa_jobs_total{outcome="dead_lettered",lane="otp"} 1"#,
            &format!(r#"wa_dead_letters_total{{reason="{}"}} 1"#, bad.reason()),
            r#"wa_jobs_total{outcome="already_done",lane="bulk"} 1"#,
            r#"wa_jobs_total{outcome="requeued",lane="bulk"} 1"#,
            r#"wa_halts_total{scope="waba"} 1"#,
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }

    #[test]
    fn deferrals_are_counted_by_their_causes_token() {
        let stats = Stats::default();
        let recorder = PrometheusBuilder::new().build_recorder();
        let job = crate::job::decode(
            br#"{"schema": "wa.send.v1", "job_id": "j-1", "phone_number_id": "106540352242922",
                 "to": "15551234567", "message": {"type": "text", "text": {"body": "hi"}}}"#,
        )
        .expect("a valid job");
        let due = chrono::Utc::now();
        ::metrics::with_local_recorder(&recorder, || {
            for cause in DeferCause::ALL {
                stats.count(
                    &Outcome::later(due, 0, cause, None, job.clone()),
                    Lane::Bulk,
                );
            }
            let hop = Outcome::later_silent(due, 0, DeferCause::NotYetDue, job);
            stats.count(&hop, Lane::Bulk);
        });
        let deferred = stats.snapshot().deferred;
        let tokens: Vec<&str> = deferred.keys().map(String::as_str).collect();
        let mut expected: Vec<&str> = DeferCause::ALL.map(DeferCause::as_str).to_vec();
        expected.sort_unstable();
        assert_eq!(tokens, expected, "one key per cause, its token");
        assert_eq!(deferred["not_yet_due"], 2);
        let text = recorder.handle().render();
        assert!(
            text.contains(r#"wa_deferrals_total{cause="not_yet_due"} 2"#),
            "{text}"
        );
    }
}
