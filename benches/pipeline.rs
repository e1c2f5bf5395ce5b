//! Hot-path costs that do not need a network: decoding and validating a job, building the
//! Cloud API request body, and classifying an error. Run: `cargo bench --bench pipeline`.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use wa_sender::cloud::{ErrorCode, OutboundMessage};

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

criterion_group!(benches, bench);
criterion_main!(benches);
