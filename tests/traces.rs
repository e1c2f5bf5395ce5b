//! Traces of the real binaries, received by an OTLP/HTTP collector inside the test: one job is
//! one trace, from the producer's span through the worker's stages and the Cloud API call to
//! the webhook process's handling of its statuses; and a JSON log line of the job carries the
//! same trace id.

mod common;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use common::node::free_port;
use common::{spawn_app, text_job};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message as _;
use tokio::io::AsyncBufReadExt;
use wa_sender::broker::{Broker, Envelope, H_TRACEPARENT, Headers, Route, Target};
use wa_sender::job::Lane;
use wa_sender::simulator::DelayRange;

const APP_SECRET: &str = "traces-app-secret";

/// A span as the collector received it.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    kind: i32,
    trace_id: String,
    span_id: String,
    parent: String,
    attributes: BTreeMap<String, String>,
}

type Received = Arc<Mutex<Vec<Span>>>;

/// `POST /v1/traces`: an OTLP export request, as protobuf.
async fn receive(State(received): State<Received>, body: Bytes) -> &'static str {
    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP trace export");
    let mut spans = received.lock().unwrap();
    for resource in request.resource_spans {
        let service = resource
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|a| a.key == "service.name")
            .map(|a| text(a.value.as_ref().and_then(|v| v.value.as_ref())))
            .unwrap_or_default();
        for span in resource.scope_spans.into_iter().flat_map(|s| s.spans) {
            spans.push(Span {
                service: service.clone(),
                name: span.name,
                kind: span.kind,
                trace_id: hex(&span.trace_id),
                span_id: hex(&span.span_id),
                parent: hex(&span.parent_span_id),
                attributes: span
                    .attributes
                    .iter()
                    .map(|a| {
                        let value = a.value.as_ref().and_then(|v| v.value.as_ref());
                        (a.key.clone(), text(value))
                    })
                    .collect(),
            });
        }
    }
    ""
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(value: Option<&Any>) -> String {
    match value {
        Some(Any::StringValue(s)) => s.clone(),
        Some(Any::IntValue(i)) => i.to_string(),
        Some(Any::BoolValue(b)) => b.to_string(),
        Some(Any::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

/// Starts the collector; its base URL and what it received.
async fn collector() -> (String, Received) {
    let received = Received::default();
    let router = axum::Router::new()
        .route("/v1/traces", post(receive))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    (url, received)
}

#[tokio::test]
async fn one_job_is_one_trace_from_producer_to_webhook() {
    let webhook_port = free_port();
    let mut app = spawn_app("traces", |_, scenario| {
        let w = &mut scenario.webhooks;
        w.url = Some(format!("http://127.0.0.1:{webhook_port}/webhook"));
        w.app_secret = APP_SECRET.into();
        w.duplicate_share = 0.0;
        w.reorder_share = 0.0;
        // Every message is read, soon.
        w.sent_after = DelayRange::fixed(20);
        w.delivered_after = DelayRange::fixed(50);
        w.read_after = DelayRange::fixed(50);
        scenario.unknown_users.read_share = 1.0;
    })
    .await;
    let (collector, received) = collector().await;
    let traced = |subcommand: &str| {
        let mut command = app.command(subcommand);
        command
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &collector)
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .env_remove("OTEL_SERVICE_NAME")
            .env_remove("OTEL_TRACES_SAMPLER")
            .env_remove("OTEL_SDK_DISABLED");
        command
    };
    let mut worker = traced("worker")
        .env("WA_SENDER__WORKER__HEALTH_LISTEN", "127.0.0.1:0")
        .env("WA_SENDER__TELEMETRY__LOG_FORMAT", "json")
        .env("RUST_LOG", "wa_sender=debug")
        .stderr(Stdio::piped())
        .spawn()
        .expect("the wa-sender binary starts");
    let _webhook = traced("webhook")
        .env(
            "WA_SENDER__WEBHOOK__LISTEN",
            format!("127.0.0.1:{webhook_port}"),
        )
        .env("WA_SENDER__WEBHOOK__APP_SECRET", APP_SECRET)
        .env("WA_SENDER__WEBHOOK__VERIFY_TOKEN", "traces-verify")
        .stderr(Stdio::null())
        .spawn()
        .expect("the wa-sender binary starts");
    // The worker's log lines, kept for the end.
    let stderr = worker.stderr.take().unwrap();
    let lines = tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let mut kept = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            kept.push(line);
        }
        kept
    });

    // The producer's span: its trace id and span id, as a producer's tracer would set them.
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let producer_span = &uuid::Uuid::new_v4().simple().to_string()[..16];
    let job = text_job("traced-1");
    app.user_wrote(&job).await;
    let body = serde_json::to_vec(&job).unwrap();
    let mut headers = Headers::default();
    headers.set_str(H_TRACEPARENT, format!("00-{trace_id}-{producer_span}-01"));
    app.broker
        .publish(
            Target::Job(Route::of(Lane::Bulk, &body)),
            Envelope {
                body: body.into(),
                headers,
            },
        )
        .await
        .unwrap();
    let read = tokio::time::timeout(
        Duration::from_secs(30),
        app.wait_job_event("traced-1", "message.read"),
    )
    .await;
    if read.is_err() {
        drop(worker);
        panic!(
            "the job was not read within 30 s; the worker logged: {:#?}",
            lines.await.unwrap()
        );
    }

    // Every span of the trace, once the webhook's `read` span has come in.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let spans = loop {
        let spans: Vec<Span> = received
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect();
        let read = spans
            .iter()
            .any(|s| s.name == "webhook.status" && s.attributes["status"] == "read");
        if read {
            break spans;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the collector never received the webhook's read span; spans of the trace: {spans:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let named = |name: &str| -> Vec<&Span> { spans.iter().filter(|s| s.name == name).collect() };
    let one = |name: &str| -> &Span {
        let found = named(name);
        assert_eq!(found.len(), 1, "one {name} span in the trace: {spans:#?}");
        found[0]
    };

    // producer → job → pace, admit, cloud.send, settle
    let job_span = one("job");
    assert_eq!(
        job_span.parent, producer_span,
        "the job is the producer's child"
    );
    assert_eq!(job_span.service, "wa-sender-worker");
    assert_eq!(job_span.attributes["job_id"], "traced-1");
    let wamid = &job_span.attributes["wamid"];
    assert!(
        wamid.starts_with("wamid."),
        "the job span names its wamid: {job_span:?}"
    );
    for stage in ["pace", "admit", "cloud.send", "settle"] {
        assert_eq!(
            one(stage).parent,
            job_span.span_id,
            "{stage} is the job's child"
        );
    }
    let cloud = one("cloud.send");
    assert_eq!(cloud.kind, SpanKind::Client as i32, "{cloud:?}");
    assert_eq!(cloud.attributes["http.response.status_code"], "200");
    assert!(
        !cloud.attributes["fbtrace_id"].is_empty(),
        "the client span keeps Meta's trace id: {cloud:?}"
    );
    assert_eq!(one("settle").attributes["outcome"], "sent");

    // The webhook process's spans of its statuses: children of the job, one per status.
    let statuses = named("webhook.status");
    let mut seen: Vec<&str> = statuses
        .iter()
        .map(|s| s.attributes["status"].as_str())
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, ["delivered", "read", "sent"], "{statuses:#?}");
    for status in &statuses {
        assert_eq!(status.service, "wa-sender-webhook");
        assert_eq!(status.parent, job_span.span_id, "{status:?}");
        assert_eq!(&status.attributes["wamid"], wamid);
        assert_eq!(status.kind, SpanKind::Consumer as i32);
    }

    // A JSON log line of the job names its trace and span.
    drop(worker);
    let lines = lines.await.unwrap();
    let in_trace = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["openTelemetry"]["traceId"] == trace_id.as_str());
    let line = in_trace.unwrap_or_else(|| {
        panic!("no JSON log line carries the job's trace id; the worker logged: {lines:#?}")
    });
    assert_eq!(line["openTelemetry"]["spanId"].as_str().unwrap().len(), 16);
    app.cleanup().await;
}
