//! Logs and trace context: a `tracing` subscriber with an OpenTelemetry layer, and W3C
//! `traceparent` carried in AMQP headers so one job is one trace from publish to webhook.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfig, BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider,
};
use tracing::Level;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::broker::{H_TRACEPARENT, H_TRACESTATE, Headers};
use crate::config::{ConfigError, TelemetrySettings};

/// What a process exports its spans to, when it does. Dropping it flushes the spans not yet
/// sent (held for at most the batch delay, 5 s by default) and stops the exporter.
#[must_use = "dropping it stops the span export"]
pub struct Telemetry {
    provider: SdkTracerProvider,
    exporting: Option<String>,
}

impl Telemetry {
    /// The collector spans go to, if any.
    pub fn exporting_to(&self) -> Option<&str> {
        self.exporting.as_deref()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if self.exporting.is_some()
            && let Err(e) = self.provider.shutdown()
        {
            eprintln!("wa-sender: spans not exported at shutdown: {e}");
        }
    }
}

/// Installs logging (text or JSON, on stderr: stdout is for what a command prints) and the
/// OpenTelemetry layer, exporting spans over OTLP/HTTP when a collector is configured
/// (`telemetry.otlp_endpoint` or the standard `OTEL_EXPORTER_OTLP_*` variables). `service`
/// names the process in the traces (`OTEL_SERVICE_NAME` overrides it); `filter` overrides
/// `telemetry.log_filter`. Safe to call twice (tests): the second subscriber is not installed.
pub fn init(
    settings: &TelemetrySettings,
    service: &str,
    filter: Option<&str>,
) -> Result<Telemetry, ConfigError> {
    let collector = collector(settings);
    let mut builder = SdkTracerProvider::builder().with_resource(
        Resource::builder()
            .with_service_name(
                std::env::var("OTEL_SERVICE_NAME")
                    .ok()
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| service.to_owned()),
            )
            .build(),
    );
    if std::env::var_os("OTEL_TRACES_SAMPLER").is_none() {
        builder = builder.with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            settings.sample_ratio,
        ))));
    }
    if let Some(collector) = &collector {
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
        if let Collector::Configured(url) = collector {
            exporter = exporter.with_endpoint(format!("{}/v1/traces", url.trim_end_matches('/')));
        }
        let exporter = exporter
            .build()
            .map_err(|e| ConfigError(format!("telemetry.otlp_endpoint: {e}")))?;
        builder = builder.with_span_processor(
            BatchSpanProcessor::builder(exporter)
                .with_batch_config(batch_config())
                .build(),
        );
    }
    let provider = builder.build();
    install(
        filter.unwrap_or(&settings.log_filter),
        &settings.log_format,
        provider.tracer("wa-sender"),
        collector.is_some(),
    );
    opentelemetry::global::set_tracer_provider(provider.clone());
    Ok(Telemetry {
        provider,
        exporting: collector.map(|c| match c {
            Collector::Configured(url) | Collector::Environment(url) => url,
        }),
    })
}

/// The exporter's batching: the SDK's defaults (2,048 spans queued, sent every 5 s) drop most
/// spans of a worker sending thousands of jobs a second, five spans each; these hold 32,768
/// and send every second. The standard `OTEL_BSP_*` variables still win.
fn batch_config() -> BatchConfig {
    let unset = |name| std::env::var_os(name).is_none();
    let mut config = BatchConfigBuilder::default();
    if unset("OTEL_BSP_MAX_QUEUE_SIZE") {
        config = config.with_max_queue_size(32_768);
    }
    if unset("OTEL_BSP_SCHEDULE_DELAY") {
        config = config.with_scheduled_delay(std::time::Duration::from_secs(1));
    }
    if unset("OTEL_BSP_MAX_EXPORT_BATCH_SIZE") {
        config = config.with_max_export_batch_size(2_048);
    }
    config.build()
}

/// The OTLP collector spans are exported to.
enum Collector {
    /// `telemetry.otlp_endpoint`, a base URL.
    Configured(String),
    /// One of the standard variables, which the exporter resolves itself.
    Environment(String),
}

/// The collector, if spans are to be exported: the configured one, else the standard
/// variables', unless `OTEL_SDK_DISABLED=true`.
fn collector(settings: &TelemetrySettings) -> Option<Collector> {
    let env = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return None;
    }
    if !settings.otlp_endpoint.is_empty() {
        return Some(Collector::Configured(settings.otlp_endpoint.clone()));
    }
    env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
        .map(Collector::Environment)
}

/// Installs logging and trace context without exporting (benches, tools).
pub fn init_logs(filter: &str, format: &str) {
    install(
        filter,
        format,
        SdkTracerProvider::builder().build().tracer("wa-sender"),
        false,
    );
}

fn install(
    filter: &str,
    format: &str,
    tracer: opentelemetry_sdk::trace::SdkTracer,
    exporting: bool,
) {
    // The log filter is the fmt layer's alone: spans are recorded for the traces (and for the
    // trace context events carry) whatever the log level.
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(filter));
    if !filter.to_string().contains("opentelemetry") {
        // The SDK's own notes ("global tracer provider is set") at info are noise; its
        // warnings (an export that failed) are not.
        filter = filter.add_directive("opentelemetry=warn".parse().expect("a directive"));
    }
    let fmt = match format {
        "json" => json_subscriber::fmt::layer()
            .with_target(false)
            .with_opentelemetry_ids(true)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        _ => tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_ansi(colour())
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(
            // Busy/idle timing, thread and source location cost a clock read or attributes on
            // every poll of every job span; traces here carry causality, not profiles. Nothing
            // here reads OpenTelemetry's current context (the trace context is taken from the
            // tracing span), so entering a span need not make its context current: that cost a
            // context clone and a thread-local push on every poll.
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_tracked_inactivity(false)
                .with_context_activation(false)
                .with_threads(false)
                .with_location(false)
                .with_filter(tracing_subscriber::filter::filter_fn(move |meta| {
                    // wa-sender's own spans: not its libraries', nor the exporter's requests.
                    // Exported: the stage spans (debug) and log events inside them too. Not
                    // exported: only the spans whose context travels (a job, a publish, a
                    // status), which is all the events and records need.
                    let level = *meta.level();
                    meta.target().starts_with("wa_sender")
                        && if exporting {
                            level <= Level::DEBUG && meta.is_span()
                                || level <= Level::INFO && meta.is_event()
                        } else {
                            level <= Level::INFO && meta.is_span()
                        }
                })),
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

/// The current span's trace context as a W3C `traceparent`, if it has one.
pub fn current_traceparent() -> Option<String> {
    let mut headers = Headers::default();
    inject_current(&mut headers);
    headers.take_str(H_TRACEPARENT)
}

/// Makes `span` a child of the span a W3C `traceparent` names (before `span` is first entered).
pub fn adopt_traceparent(span: &tracing::Span, traceparent: &str) {
    let mut headers = Headers::default();
    headers.set_str(H_TRACEPARENT, traceparent);
    adopt_parent(span, &headers);
}

/// Makes `span` a child of the trace context carried in `headers`, if any.
pub fn adopt_parent(span: &tracing::Span, headers: &Headers) {
    if headers.0.contains_key(H_TRACEPARENT) {
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        let _ = span.set_parent(parent);
    }
}
