//! Halts are shared by every replica: a halting Cloud API error met by one replica stops the
//! others within a heartbeat, the halted number's jobs wait (deferred, no attempt spent), and an
//! operator lists and lifts halts with `wa-sender halt list|resume`.

mod common;

use std::time::Duration;

use common::{NUMBER, spawn_app, text_job};
use wa_sender::job::Lane;
use wa_sender::simulator::{Fault, FaultRule};

#[tokio::test]
async fn a_halt_raised_on_one_replica_stops_sending_on_another() {
    let mut app = spawn_app("halts", |settings, _| {
        settings.worker.halt_cooldown_secs = 60;
    })
    .await;
    app.start_worker();
    app.start_replica().await;
    // One job meets Meta's 131048 (spam rate limit): its number halts.
    app.simulator.inject(FaultRule {
        job_id: Some("trigger".into()),
        fault: Fault::Error {
            code: 131048,
            status: 400,
        },
        times: 1,
    });
    app.enqueue_reply(Lane::Bulk, &text_job("trigger")).await;
    app.wait_job_event("trigger", "job.deferred").await;
    // Both replicas take jobs from the number's queue; the one that did not meet the error
    // learns of the halt at its next heartbeat (1 s).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let jobs = 20;
    for i in 0..jobs {
        app.enqueue_reply(Lane::Bulk, &text_job(&format!("after-{i}")))
            .await;
    }
    for i in 0..jobs {
        let deferred = app
            .wait_job_event(&format!("after-{i}"), "job.deferred")
            .await;
        assert_eq!(deferred.attempts, Some(0), "no attempt spent: {deferred:?}");
    }
    assert!(
        app.simulator.audit().accepted.is_empty(),
        "nothing sent while the number is halted: {:?}",
        app.simulator.audit().accepted
    );

    // The operator sees the halt, with its cause, and lifts it.
    let listed = app.run_json(&["halt", "list"]).await;
    let halts = listed.as_array().expect("a JSON array");
    assert_eq!(halts.len(), 1, "{listed}");
    assert_eq!(halts[0]["scope"], format!("number:{NUMBER}"));
    assert_eq!(halts[0]["code"], 131048);
    let left = app
        .run_json(&["halt", "resume", &format!("number:{NUMBER}")])
        .await;
    assert_eq!(left, serde_json::json!([]));
    assert!(
        app.run_json(&["halt", "list"])
            .await
            .as_array()
            .unwrap()
            .is_empty()
    );
    app.stop_worker().await;
    app.cleanup().await;
}
