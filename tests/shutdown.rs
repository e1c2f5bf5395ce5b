//! SIGTERM with jobs in flight loses none: the real binary, a real signal.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{spawn_app, text_job};
use wa_sender::job::Lane;

fn worker_process(app: &common::TestApp) -> tokio::process::Child {
    worker_process_with(app, &[])
}

/// The worker binary, with more settings from the environment.
fn worker_process_with(app: &common::TestApp, env: &[(&str, &str)]) -> tokio::process::Child {
    app.command("worker")
        .envs(env.iter().copied())
        .env("WA_SENDER__WORKER__CONCURRENCY", "8")
        .env("WA_SENDER__WORKER__PREFETCH", "20")
        .stderr(Stdio::piped())
        .spawn()
        .expect("the wa-sender binary starts")
}

/// Waits for `worker` to exit within its grace period: how it exited and what it logged.
async fn exited(worker: &mut tokio::process::Child) -> (std::process::ExitStatus, String) {
    let exit = tokio::time::timeout(Duration::from_secs(20), worker.wait())
        .await
        .expect("the worker exits within its grace period")
        .unwrap();
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(worker.stderr.as_mut().unwrap(), &mut stderr)
        .await
        .unwrap();
    (exit, stderr)
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
    common::signal(&first, "TERM");
    let (exit, stderr) = exited(&mut first).await;
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

/// The worker binary answers its probes on `worker.health_listen`: alive and ready while it
/// consumes, then, from SIGTERM until it exits, alive but not ready (`draining`), so an
/// orchestrator stops counting on it while it finishes its jobs.
#[tokio::test]
async fn the_worker_reports_ready_then_draining_on_its_health_port() {
    let mut app = spawn_app("health", |_, sim| {
        // Sends slow enough that the drain lasts long enough to be seen.
        sim.faults.latency = wa_sender::simulator::Latency {
            median_ms: 1500.0,
            p99_ms: 1800.0,
        }
    })
    .await;
    for i in 0..40 {
        app.enqueue_reply(Lane::Bulk, &text_job(&format!("health-{i}")))
            .await;
    }
    // A free port for the child (the tests' own default, port 0, would hide it).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let base = format!("http://{listen}");
    let mut worker = worker_process_with(
        &app,
        &[
            ("WA_SENDER__WORKER__HEALTH_LISTEN", &listen),
            // Above the simulator's latency, so no send is cut short.
            ("WA_SENDER__CLOUD__REQUEST_TIMEOUT_MS", "4000"),
        ],
    );
    common::wait_readyz(&base, Duration::from_secs(30), |status, body| {
        status == 200 && *body == common::all_up()
    })
    .await;
    let alive = reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert_eq!(alive.status(), 200);
    assert_eq!(alive.text().await.unwrap(), "ok");
    // Jobs in flight (each send takes 1.5 s) when the signal arrives.
    app.wait_event(Duration::from_secs(20), |e| e.event == "message.accepted")
        .await;

    common::signal(&worker, "TERM");
    let draining = common::wait_readyz(&base, Duration::from_secs(5), |status, body| {
        status == 503 && body["draining"] == true
    })
    .await;
    assert_eq!(draining["ready"], false, "{draining}");
    let (exit, stderr) = exited(&mut worker).await;
    assert!(
        exit.success(),
        "the worker drained and exited: {exit:?}\n{stderr}"
    );
    assert_eq!(
        common::readyz(&base).await,
        None,
        "nothing answers once it has exited"
    );
    app.cleanup().await;
}

/// A worker stopped by SIGTERM logs no error, however many channels it closes: a consumer's
/// channel close still unanswered when the connection closed made lapin log `Connection error
/// … invalid channel` (the code before the fix failed this test in 2 of 3 runs).
#[tokio::test]
async fn a_worker_with_many_numbers_stops_without_logging_an_error() {
    let mut app = spawn_app("many-stops", |settings, sim| {
        for i in 0..30 {
            let number = format!("1065403522430{i:02}");
            settings.numbers.insert(
                number.clone(),
                wa_sender::config::NumberSettings {
                    waba_id: common::WABA.into(),
                    throughput_mps: 80,
                    access_token: None,
                    access_token_file: None,
                },
            );
            let sim_number = wa_sender::simulator::SimNumber::new(&number, common::WABA);
            sim.numbers.push(sim_number);
        }
    })
    .await;
    app.enqueue_reply(Lane::Bulk, &text_job("many-stops")).await;
    for round in 0..8 {
        let mut worker = worker_process(&app);
        if round == 0 {
            app.wait_job_event("many-stops", "message.accepted").await;
        } else {
            // Consuming on every number, then stopped.
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        common::signal(&worker, "TERM");
        let (exit, stderr) = exited(&mut worker).await;
        assert!(exit.success(), "stop {round}: {exit:?}\n{stderr}");
        assert!(
            !stderr.contains("ERROR"),
            "stop {round} logged an error:\n{stderr}"
        );
    }
    app.cleanup().await;
}
