//! The producer examples in `examples/` against the real thing: RabbitMQ, the worker and the
//! webhook process (the binary), and the Cloud API simulator posting signed status webhooks.
//! Each example publishes a job and must see its `message.accepted`, `message.sent`,
//! `message.delivered` and `message.read` events, read last. Their packages (pika, amqplib) are installed here when
//! missing, as a producer would install them.

mod common;

use std::path::Path;
use std::process::Stdio;

use common::node::free_port;
use common::{TestApp, recipient, spawn_app};
use serde_json::json;
use wa_sender::simulator::DelayRange;

const APP_SECRET: &str = "examples-app-secret";

/// The worker and the webhook process for `app`, with the simulator's webhooks reaching the
/// latter; killed when dropped.
async fn stack(test: &str) -> (TestApp, Vec<tokio::process::Child>) {
    let webhook_port = free_port();
    let app = spawn_app(test, |_, scenario| {
        let w = &mut scenario.webhooks;
        w.url = Some(format!("http://127.0.0.1:{webhook_port}/webhook"));
        w.app_secret = APP_SECRET.into();
        w.sent_after = DelayRange::fixed(100);
        w.delivered_after = DelayRange::fixed(50);
        w.read_after = DelayRange::fixed(50);
        scenario.unknown_users.read_share = 1.0;
    })
    .await;
    let worker = app
        .command("worker")
        .env("WA_SENDER__WORKER__HEALTH_LISTEN", "127.0.0.1:0")
        .stderr(Stdio::null())
        .spawn()
        .expect("the wa-sender binary starts");
    let webhook = app
        .command("webhook")
        .env(
            "WA_SENDER__WEBHOOK__LISTEN",
            format!("127.0.0.1:{webhook_port}"),
        )
        .env("WA_SENDER__WEBHOOK__APP_SECRET", APP_SECRET)
        .env("WA_SENDER__WEBHOOK__VERIFY_TOKEN", "examples-verify")
        .stderr(Stdio::null())
        .spawn()
        .expect("the wa-sender binary starts");
    (app, vec![worker, webhook])
}

/// Runs `program args` in the project with the example's settings for `app`; its stdout lines.
async fn run_example(app: &TestApp, to: &str, program: &str, args: &[&str]) -> Vec<String> {
    let output = tokio::process::Command::new(program)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("WA_AMQP_URL", &app.settings.amqp.url)
        .env("WA_PREFIX", &app.prefix)
        .env("WA_PHONE_NUMBER_ID", common::NUMBER)
        .env("WA_TO", to)
        .env("WA_TIMEOUT_S", "30")
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|e| panic!("{program} runs: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{program} {args:?} exited with {}:\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout.lines().map(str::to_owned).collect()
}

/// The events the example printed, in order: the first word of each line after `published`.
fn events(lines: &[String]) -> Vec<&str> {
    assert!(lines[0].starts_with("published "), "{lines:?}");
    lines[1..]
        .iter()
        .filter_map(|l| l.split_whitespace().next())
        .collect()
}

/// The job's story as Meta tells it: accepted, sent, delivered, and read last. (`accepted`
/// comes from the worker, the rest from the webhook process, so `accepted` and `sent` may swap.)
fn assert_story(lines: &[String]) {
    let seen = events(lines);
    let at = |e: &str| {
        seen.iter()
            .position(|s| *s == e)
            .unwrap_or_else(|| panic!("no {e} in {lines:#?}"))
    };
    assert!(at("message.sent") < at("message.delivered"), "{lines:#?}");
    assert!(
        at("message.accepted") < at("message.delivered"),
        "{lines:#?}"
    );
    assert_eq!(seen.last(), Some(&"message.read"), "{lines:#?}");
}

/// Whether `argv` runs and succeeds, in the project directory.
fn succeeds(argv: &[&str]) -> bool {
    std::process::Command::new(argv[0])
        .args(&argv[1..])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs an example's packages with `install` unless they are there.
fn install_unless(installed: bool, install: &[&str]) {
    assert!(
        installed || succeeds(install),
        "could not install the example's packages with {install:?}"
    );
}

#[tokio::test]
async fn the_python_example_sees_its_job_accepted_delivered_and_read() {
    install_unless(
        succeeds(&["python3", "-c", "import pika"]),
        &[
            "python3",
            "-m",
            "pip",
            "install",
            "--quiet",
            "-r",
            "examples/python/requirements.txt",
        ],
    );
    let (app, _processes) = stack("example-py").await;
    let to = recipient("example-py");
    app.opted_in(&json!({ "to": to })).await;
    let lines = run_example(
        &app,
        &to,
        "python3",
        &["examples/python/send_and_follow.py"],
    )
    .await;
    assert_story(&lines);
    app.cleanup().await;
}

#[tokio::test]
async fn the_node_example_sees_its_job_accepted_delivered_and_read() {
    let modules = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/node/node_modules/amqplib");
    install_unless(
        modules.exists(),
        &[
            "npm",
            "ci",
            "--prefix",
            "examples/node",
            "--no-audit",
            "--no-fund",
        ],
    );
    let (app, _processes) = stack("example-node").await;
    let to = recipient("example-node");
    app.opted_in(&json!({ "to": to })).await;
    let lines = run_example(&app, &to, "node", &["examples/node/send_and_follow.mjs"]).await;
    assert_story(&lines);
    app.cleanup().await;
}
