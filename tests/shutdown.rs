//! SIGTERM with jobs in flight loses none: the real binary, a real signal.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{spawn_app, text_job};
use wa_sender::job::Lane;

fn worker_process(app: &common::TestApp) -> tokio::process::Child {
    app.command("worker")
        .env("WA_SENDER__WORKER__CONCURRENCY", "8")
        .env("WA_SENDER__WORKER__PREFETCH", "20")
        .stderr(Stdio::piped())
        .spawn()
        .expect("the wa-sender binary starts")
}

#[tokio::test]
async fn sigterm_with_jobs_in_flight_loses_none_of_them() {
    let mut app = spawn_app("sigterm", |_, sim| {
        sim.faults.latency = wa_sender::simulator::Latency {
            median_ms: 300.0,
            p99_ms: 400.0,
        }
    })
    .await;
    let jobs = 60;
    for i in 0..jobs {
        app.enqueue_reply(Lane::Bulk, &text_job(&format!("term-{i}")))
            .await;
    }
    let mut first = worker_process(&app);
    // Let it get going, so that jobs are in flight and prefetched when the signal arrives.
    app.wait_event(Duration::from_secs(20), |e| e.event == "message.accepted")
        .await;
    let pid = first.id().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(20), first.wait())
        .await
        .expect("the worker exits within its grace period")
        .unwrap();
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(first.stderr.as_mut().unwrap(), &mut stderr)
        .await
        .unwrap();
    assert!(
        exit.success(),
        "the worker drained and exited cleanly: {exit:?}\n{stderr}"
    );
    let sent_before_restart = app.simulator.audit().accepted.len();
    assert!(
        sent_before_restart < jobs,
        "the signal arrived mid-run ({sent_before_restart} sent)"
    );

    // A new worker picks up everything the first one did not finish.
    let mut second = worker_process(&app);
    for i in 0..jobs {
        app.wait_job_event(&format!("term-{i}"), "message.accepted")
            .await;
    }
    let audit = app.simulator.audit();
    assert_eq!(audit.accepted.len(), jobs, "every job sent");
    assert!(
        audit.duplicates.is_empty(),
        "no job sent twice: {:?}",
        audit.duplicates
    );
    second.kill().await.unwrap();
    app.cleanup().await;
}

#[tokio::test]
async fn sigkill_mid_run_then_restart_sends_nothing_twice_and_loses_nothing() {
    let mut app = spawn_app("sigkill", |_, sim| {
        sim.faults.latency = wa_sender::simulator::Latency {
            median_ms: 200.0,
            p99_ms: 300.0,
        }
    })
    .await;
    let jobs = 80;
    for i in 0..jobs {
        app.enqueue_reply(Lane::Bulk, &text_job(&format!("kill-{i}")))
            .await;
    }
    let mut first = worker_process(&app);
    app.wait_event(Duration::from_secs(20), |e| e.event == "message.accepted")
        .await;
    // No goodbye: claims stay behind, sends are cut off mid-flight, acks never happen.
    first.kill().await.unwrap();
    let sent_before_restart = app.simulator.audit().accepted.len();
    assert!(
        sent_before_restart < jobs,
        "killed mid-run ({sent_before_restart} sent)"
    );

    let mut second = worker_process(&app);
    // Every job ends exactly once: accepted, or (a send cut off by the kill, whose outcome the
    // worker cannot know without a status webhook) dead-lettered `ambiguous_send`. Nothing stays
    // in the queue and nothing is sent twice.
    let mut ambiguous = Vec::new();
    for i in 0..jobs {
        let id = format!("kill-{i}");
        let end = app
            .wait_event(Duration::from_secs(40), |e| {
                e.job_id.as_deref() == Some(id.as_str())
                    && (e.event == "message.accepted" || e.event == "job.dead_lettered")
            })
            .await;
        if end.event == "job.dead_lettered" {
            assert_eq!(
                end.reason.map(|r| r.as_str()),
                Some("ambiguous_send"),
                "{id}"
            );
            ambiguous.push(id);
        }
    }
    let audit = app.simulator.audit();
    assert!(
        audit.duplicates.is_empty(),
        "sent twice: {:?}",
        audit.duplicates
    );
    assert!(
        ambiguous.len() <= 8,
        "at most the jobs in flight at the kill are ambiguous: {ambiguous:?}"
    );
    let sent_or_ambiguous = audit.accepted.len() + ambiguous.len();
    assert!(
        sent_or_ambiguous >= jobs,
        "{} sent + {} ambiguous",
        audit.accepted.len(),
        ambiguous.len()
    );
    second.kill().await.unwrap();
    app.cleanup().await;
}
