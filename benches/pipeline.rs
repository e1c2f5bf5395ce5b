//! Hot-path costs that do not need a network: decoding and validating a job, building the
//! Cloud API request body, classifying an error, and a job's trace (its span under the
//! worker's own subscriber, spans recorded but not exported, against no subscriber at all).
//! Run: `cargo bench --bench pipeline`.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use tracing::field::Empty;
use wa_sender::broker::{H_TRACEPARENT, Headers};
use wa_sender::cloud::{ErrorCode, OutboundMessage};
use wa_sender::telemetry;

const TEMPLATE_JOB: &[u8] = br##"{"schema":"wa.send.v1","job_id":"order-8c1f","phone_number_id":"106540352242922","to":"+16505551234",
"message":{"type":"template","template":{"name":"order_update","language":{"code":"en_US"},"components":[
{"type":"body","parameters":[{"type":"text","text":"Jessica"},{"type":"text","text":"#12345"}]},
{"type":"button","sub_type":"url","index":"0","parameters":[{"type":"text","text":"order/12345"}]}]}},
"campaign_id":"spring","metadata":{"order":12345}}"##;

fn bench(c: &mut Criterion) {
    c.bench_function("decode template job", |b| {
        b.iter(|| wa_sender::job::decode(black_box(TEMPLATE_JOB)).unwrap())
    });
    let job = wa_sender::job::decode(TEMPLATE_JOB).unwrap();
    c.bench_function("serialise Cloud API request", |b| {
        b.iter(|| {
            serde_json::to_vec(&OutboundMessage::new(
                job.to.as_str(),
                black_box(&job.message),
                job.job_id.as_str(),
            ))
            .unwrap()
        })
    });
    c.bench_function("classify error code", |b| {
        b.iter(|| wa_sender::policy::classify(ErrorCode::from(black_box(131_056))))
    });
}

/// What tracing does for one job in the worker: its span (shaped and targeted as the
/// pipeline's), made the child of the producer's `traceparent`, entered on each of the job
/// future's polls, its job id and wamid recorded, and the trace context written into its
/// event's headers.
fn job_trace(headers: &Headers) -> Headers {
    let span = tracing::info_span!(target: "wa_sender::pipeline", "job",
        job_id = Empty, lane = "bulk", attempt = 1u32, wamid = Empty);
    telemetry::adopt_parent(&span, headers);
    for _ in 0..POLLS {
        let _entered = span.enter();
    }
    let _entered = span.enter();
    span.record("job_id", "order-8c1f");
    span.record(
        "wamid",
        "wamid.HBgLMTY1MDM4Nzk0MzkVAgARGBJDQjZCMzlEQUE4OTJBMTE4RTUA",
    );
    let mut event = Headers::default();
    telemetry::inject_current(&mut event);
    event
}

/// About how often a job's future is polled in the worker (each store, Cloud API and broker
/// answer wakes it).
const POLLS: usize = 12;

fn trace(c: &mut Criterion) {
    telemetry::init_logs("info", "text");
    let mut headers = Headers::default();
    headers.set_str(
        H_TRACEPARENT,
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    );
    assert!(
        job_trace(&headers).get_str(H_TRACEPARENT).is_some(),
        "the event carries the job's trace"
    );
    c.bench_function("a job's trace (recorded, not exported)", |b| {
        b.iter(|| job_trace(black_box(&headers)))
    });
    let none = tracing::Dispatch::none();
    tracing::dispatcher::with_default(&none, || {
        c.bench_function("a job's trace (no subscriber)", |b| {
            b.iter(|| job_trace(black_box(&headers)))
        });
    });
}

criterion_group!(benches, bench, trace);
criterion_main!(benches);
