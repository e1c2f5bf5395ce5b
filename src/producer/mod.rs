//! The producer's side of `wa.send`: [`Producer`] publishes jobs with many confirms in flight,
//! and [`file`] is `wa-sender enqueue` (a JSONL or CSV file, every row validated by the job
//! decoder, rejects, progress, a checkpoint to resume from).
//!
//! Each job is routed as the worker expects (`<lane>.<phone_number_id>`, [`Route::of`]), carries
//! its trace context (a `publish` span per job, whose child is the worker's job span) and has
//! its `job_id` as AMQP message id.

pub mod checkpoint;
pub mod file;
pub mod input;

use std::pin::Pin;
use std::task::Poll;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::{FutureExt as _, StreamExt as _};

use crate::broker::{Broker, BrokerError, Envelope, H_TRACEPARENT, Headers, Route};
use crate::job::Lane;

/// Unconfirmed publishes a producer keeps in flight by default: enough to keep the broker busy
/// (a confirm takes a round trip and a disk sync), few enough that a lost connection leaves a
/// bounded number of jobs in doubt.
pub const WINDOW: usize = 4096;

/// Publishes jobs and keeps up to `window` of them unconfirmed: the next publish waits only
/// when the window is full (backpressure), not for every confirm, nor for the connection to
/// write each one (its I/O thread takes whatever has been handed over since it last wrote).
///
/// Every publish carries a caller's `position` (a line number); [`Producer::confirmed`] is the
/// last position whose publish, and every earlier one, the broker confirmed: what a checkpoint
/// may record.
pub struct Producer<'b> {
    broker: &'b dyn Broker,
    window: usize,
    /// Each publish (or passed position) in order, from hand-over to confirm: its position, and
    /// whether it was a job.
    in_flight: FuturesOrdered<BoxFuture<'b, Result<(u64, bool), BrokerError>>>,
    confirmed: Option<u64>,
    published: u64,
    confirmed_jobs: u64,
}

impl<'b> Producer<'b> {
    /// A producer on `broker` with at most `window` (at least 1) publishes unconfirmed.
    pub fn new(broker: &'b dyn Broker, window: usize) -> Self {
        Producer {
            broker,
            window: window.max(1),
            in_flight: FuturesOrdered::new(),
            confirmed: None,
            published: 0,
            confirmed_jobs: 0,
        }
    }

    /// Publishes one job body to its number's lane under a `publish` span. Returns once the
    /// connection has it; an error is a broker failure (this publish, or an earlier one
    /// refused).
    pub async fn publish(
        &mut self,
        lane: Lane,
        job_id: Option<&str>,
        body: Bytes,
        position: u64,
    ) -> Result<(), BrokerError> {
        while self.in_flight.len() >= self.window {
            self.settle_next().await?;
        }
        let span = tracing::info_span!(
            "publish",
            otel.kind = "producer",
            messaging.system = "rabbitmq",
            lane = lane.as_str(),
            job_id,
        );
        let headers = span.in_scope(trace_headers);
        let route = Route::of(lane, &body);
        let broker = self.broker;
        let job_id = job_id.map(str::to_owned);
        let mut publish = async move {
            let envelope = Envelope { body, headers };
            let confirm = broker.send_job(route, job_id.as_deref(), envelope).await?;
            confirm.await.map(|()| (position, true))
        }
        .boxed();
        // CORRECTNESS: polled once here, so each publish reaches the connection's queue in the
        // order `publish` is called (the broker keeps a lane's jobs in that order). Unconstrained:
        // once this task has used up its tokio budget, the broker's lock would otherwise answer
        // Pending before the job is handed over, and later publishes could overtake it. The
        // span is entered for this poll only: the job is handed over there, and entering
        // thousands of spans again as their confirms come costs more than publishing.
        let first = std::future::poll_fn(|cx| {
            let mut handing = tokio::task::unconstrained(publish.as_mut());
            Poll::Ready(span.in_scope(|| Pin::new(&mut handing).poll(cx)))
        });
        let publish = match first.await {
            Poll::Pending => publish,
            Poll::Ready(Ok(done)) => futures::future::ready(Ok(done)).boxed(),
            Poll::Ready(Err(e)) => return Err(e),
        };
        self.in_flight.push_back(publish);
        self.published += 1;
        self.settle_ready()
    }

    /// Marks `position` done without publishing anything (a refused row): it counts as
    /// confirmed once every publish before it is.
    pub fn pass(&mut self, position: u64) -> Result<(), BrokerError> {
        if self.in_flight.is_empty() {
            self.confirmed = Some(position);
            return Ok(());
        }
        self.in_flight
            .push_back(futures::future::ready(Ok((position, false))).boxed());
        self.settle_ready()
    }

    /// Waits for every confirm still in flight.
    pub async fn flush(&mut self) -> Result<(), BrokerError> {
        while !self.in_flight.is_empty() {
            self.settle_next().await?;
        }
        Ok(())
    }

    /// The last position whose publish, and every earlier one, is confirmed.
    pub fn confirmed(&self) -> Option<u64> {
        self.confirmed
    }

    /// Publishes sent so far (confirmed or not).
    pub fn published(&self) -> u64 {
        self.published
    }

    /// Publishes the broker confirmed.
    pub fn confirmed_jobs(&self) -> u64 {
        self.confirmed_jobs
    }

    async fn settle_next(&mut self) -> Result<(), BrokerError> {
        if let Some(done) = self.in_flight.next().await.transpose()? {
            self.settled(done);
        }
        Ok(())
    }

    fn settled(&mut self, (position, job): (u64, bool)) {
        self.confirmed = Some(position);
        self.confirmed_jobs += u64::from(job);
    }

    /// Takes the confirms that have come, without waiting.
    fn settle_ready(&mut self) -> Result<(), BrokerError> {
        // CORRECTNESS: confirms are taken in publish order (FuturesOrdered), so `confirmed`
        // never passes a publish whose confirm has not come, even if the broker answers a
        // later one first.
        while let Some(Some(result)) = self.in_flight.next().now_or_never() {
            self.settled(result?);
        }
        Ok(())
    }
}

/// The current span's trace context as headers; without a tracing subscriber, a fresh trace
/// per job so the job is still one trace.
fn trace_headers() -> Headers {
    let mut headers = Headers::default();
    crate::telemetry::inject_current(&mut headers);
    if !headers.0.contains_key(H_TRACEPARENT) {
        let trace_id = uuid::Uuid::new_v4().simple().to_string();
        let span_id = &uuid::Uuid::new_v4().simple().to_string()[..16];
        headers.set_str(H_TRACEPARENT, format!("00-{trace_id}-{span_id}-01"));
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::memory::MemoryBroker;

    #[tokio::test]
    async fn confirms_are_counted_in_order_and_each_job_has_its_own_trace() {
        let number = crate::ids::PhoneNumberId::parse("106540352242922").unwrap();
        let broker = MemoryBroker::new([&number]);
        let mut producer = Producer::new(&broker, 2);
        for line in [2, 3, 5] {
            let body = format!(r#"{{"job_id":"j-{line}","phone_number_id":"106540352242922"}}"#);
            producer
                .publish(Lane::Bulk, Some("j"), body.into(), line)
                .await
                .unwrap();
        }
        producer.flush().await.unwrap();
        assert_eq!(producer.confirmed(), Some(5));
        producer.pass(6).unwrap();
        assert_eq!(producer.confirmed(), Some(6));
        assert_eq!(producer.published(), 3);
        assert_eq!(producer.confirmed_jobs(), 3);
        assert_eq!(broker.depth(Lane::Bulk).await.unwrap(), 3);
        let parents: std::collections::BTreeSet<_> = (0..3)
            .map(|_| trace_headers().get_str(H_TRACEPARENT).unwrap())
            .collect();
        assert_eq!(parents.len(), 3);
    }
}
