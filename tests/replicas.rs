//! Three worker replicas share one business number limited to 80 msg/s: Meta (the simulator)
//! never sees more than 80 in any second, never answers 130429, and the number is used at
//! 95% or more of its limit. Alone in its test binary so that nothing else competes for the
//! machine while it measures.

mod common;

use std::time::Duration;

use common::{NUMBER, WABA, job, spawn_app};
use futures::StreamExt;
use serde_json::json;
use wa_sender::ids::{WaId, WabaId};
use wa_sender::job::Lane;
use wa_sender::policy::admission::Mark;
use wa_sender::store::Store;

const JOBS: usize = 4000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_80_msg_per_second_without_a_130429() {
    let mut app = spawn_app("replicas", |settings, scenario| {
        common::limit_number(settings, scenario, 80);
    })
    .await;
    // 4,000 users who opted in, one template job each (unique recipients: the pair rate is not
    // what this test is about; the tier is unlimited in tests).
    let jobs: Vec<_> = (0..JOBS)
        .map(|i| {
            job(
                &format!("r-{i}"),
                json!({"type": "template", "template": {"name": "order_update", "language": {"code": "en_US"},
                       "components": [{"type": "body", "parameters": [{"type": "text", "text": "Ann"}, {"type": "text", "text": format!("A{i}")}]}]}}),
            )
        })
        .collect();
    let at = chrono::Utc::now();
    let opt_ins: Vec<(WaId, Mark)> = jobs
        .iter()
        .map(|j| {
            let to = WaId::parse(j["to"].as_str().unwrap()).unwrap();
            (
                to,
                Mark {
                    at,
                    source: "test".into(),
                },
            )
        })
        .collect();
    app.store
        .record_opt_ins(&WabaId::parse(WABA).unwrap(), &opt_ins)
        .await
        .unwrap();
    for j in &jobs {
        app.enqueue_json(Lane::Bulk, j).await;
    }
    for _ in 0..3 {
        app.start_replica().await;
    }

    let mut accepted = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    while accepted < JOBS {
        let event = tokio::time::timeout_at(deadline, app.events.next())
            .await
            .unwrap_or_else(|_| panic!("only {accepted} of {JOBS} accepted within 180 s"))
            .unwrap()
            .unwrap();
        match event.event.as_str() {
            "message.accepted" => accepted += 1,
            "job.dead_lettered" => panic!("no job may fail here: {event:?}"),
            _ => {}
        }
    }
    app.stop_worker().await;

    let audit = app.simulator.audit();
    let number = &audit.numbers()[NUMBER];
    let first = audit.accepted.first().unwrap().at_ms;
    let last = audit.accepted.last().unwrap().at_ms;
    let rate = (JOBS - 1) as f64 * 1000.0 / (last - first) as f64;
    println!(
        "3 replicas, 80 msg/s: {JOBS} sent in {:.1} s = {rate:.1} msg/s, peak {} in any 1 s window, 130429: {}",
        (last - first) as f64 / 1000.0,
        number.peak_per_second,
        audit.error_count(130429)
    );
    assert_eq!(audit.error_count(130429), 0, "{:?}", audit.errors);
    assert!(
        number.peak_per_second <= 80,
        "peak {}",
        number.peak_per_second
    );
    assert!(rate >= 0.95 * 80.0, "{rate:.1} msg/s is below 95% of 80");
    assert_eq!(number.accepted as usize, JOBS);
    assert!(audit.duplicates.is_empty(), "{:?}", audit.duplicates);
    app.cleanup().await;
}
