//! Logs and trace context: a `tracing` subscriber with an OpenTelemetry layer, and W3C
//! `traceparent` carried in AMQP headers so one job is one trace from publish to webhook.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::broker::{H_TRACEPARENT, H_TRACESTATE, Headers};

/// Installs logging (text or JSON, on stderr: stdout is for what a command prints) and the
/// OpenTelemetry layer. Safe to call twice (tests).
pub fn init(filter: &str, format: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(filter));
    let fmt = match format {
        "json" => tracing_subscriber::fmt::layer()
            .json()
            .with_target(false)
            .with_writer(std::io::stderr)
            .boxed(),
        _ => tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_ansi(colour())
            .with_writer(std::io::stderr)
            .boxed(),
    };
    // Spans get real trace ids so context can be propagated; an exporter (OTLP) plugs in here.
    let provider = SdkTracerProvider::builder().build();
    let tracer = provider.tracer("wa-sender");
    opentelemetry::global::set_tracer_provider(provider);
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(
            // Busy/idle timing, thread and source location cost a clock read or attributes on
            // every poll of every job span; traces here carry causality, not profiles.
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_tracked_inactivity(false)
                .with_threads(false)
                .with_location(false),
        )
        .try_init();
}

/// Colour only for a person at a terminal: never in a file, a pipe or a log collector, and not
/// when `NO_COLOR` is set (<https://no-color.org>).
fn colour() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

struct HeaderInjector<'a>(&'a mut Headers);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.set_str(key, value);
    }
}

struct HeaderExtractor<'a>(&'a Headers);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match self.0.0.get(key)? {
            crate::broker::HeaderValue::Str(s) => Some(s.as_str()),
            crate::broker::HeaderValue::Int(_) => None,
        }
    }
    fn keys(&self) -> Vec<&str> {
        [H_TRACEPARENT, H_TRACESTATE]
            .into_iter()
            .filter(|k| self.0.0.contains_key(*k))
            .collect()
    }
}

/// Writes the current span's trace context into `headers`.
pub fn inject_current(headers: &mut Headers) {
    let context = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&context, &mut HeaderInjector(headers));
}

/// Makes `span` a child of the trace context carried in `headers`, if any.
pub fn adopt_parent(span: &tracing::Span, headers: &Headers) {
    if headers.0.contains_key(H_TRACEPARENT) {
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        let _ = span.set_parent(parent);
    }
}
