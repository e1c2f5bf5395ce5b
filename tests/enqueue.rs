//! `wa-sender enqueue` as an operator runs it (the real binary, the real RabbitMQ): bad rows
//! refused with their line numbers and the rest queued once, an interrupted run resumed without
//! losing a row, and a producer that starts before any worker.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use common::{NUMBER, TestApp, spawn_app, text_job};
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::FieldTable;

/// A scratch directory for one test's files.
fn scratch(app: &TestApp) -> PathBuf {
    let dir = std::env::temp_dir().join(&app.prefix);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `wa-sender enqueue <args>` with the app's configuration, run to its end.
async fn enqueue(app: &TestApp, args: &[&str]) -> Output {
    app.command("enqueue")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .unwrap()
}

/// The message ids (job ids) of everything in the number's bulk queue, taken off it.
async fn drain_bulk(app: &TestApp) -> Vec<String> {
    let queue = format!("{}.send.{NUMBER}.bulk", app.prefix);
    let (connection, channel) = common::amqp_channel(&app.settings.amqp.url).await;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let count = channel
        .queue_declare(queue.as_str().into(), passive, FieldTable::default())
        .await
        .unwrap()
        .message_count() as usize;
    channel
        .basic_qos(2000, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "drain".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut ids = Vec::with_capacity(count);
    while ids.len() < count {
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("the queue delivers what it holds")
            .unwrap()
            .unwrap();
        let id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string());
        ids.push(id.expect("every job has its job_id as message id"));
    }
    let _ = connection.close(200, "drained".into()).await;
    ids
}

/// Job ids seen more than once, with their counts.
fn duplicates(ids: &[String]) -> BTreeMap<&str, usize> {
    let mut counts = BTreeMap::new();
    for id in ids {
        *counts.entry(id.as_str()).or_insert(0) += 1;
    }
    counts.retain(|_, n| *n > 1);
    counts
}

/// A JSONL file of `rows` text jobs without job ids (the campaign gives them: `<campaign>-<line>`).
fn jsonl(dir: &Path, rows: usize) -> PathBuf {
    let path = dir.join("jobs.jsonl");
    let mut text = String::new();
    for i in 0..rows {
        let mut job = text_job("x");
        job.as_object_mut().unwrap().remove("job_id");
        job.as_object_mut().unwrap().remove("campaign_id");
        job["to"] = format!("+1650{i:07}").into();
        text.push_str(&serde_json::to_string(&job).unwrap());
        text.push('\n');
    }
    std::fs::write(&path, text).unwrap();
    path
}

fn checkpoint_line(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let checkpoint: serde_json::Value = serde_json::from_str(&text).ok()?;
    checkpoint["line"].as_u64()
}

#[tokio::test]
async fn a_csv_with_bad_rows_queues_the_rest_once_and_rejects_each_bad_row_by_its_line() {
    let app = spawn_app("enq-csv", |_, _| {}).await;
    let dir = scratch(&app);
    let file = dir.join("recipients.csv");
    const ROWS: u64 = 100_000;
    // Every thousandth row has a recipient no one can have; the header is line 1.
    let mut text = String::from("phone,name,order\n");
    let mut bad = BTreeSet::new();
    for i in 0..ROWS {
        let line = i + 2;
        if (i + 1) % 1000 == 0 {
            bad.insert(line);
            text.push_str(&format!("12,Ada,{i}\n"));
        } else {
            text.push_str(&format!("+1650{i:07},Ada,{i}\n"));
        }
    }
    std::fs::write(&file, text).unwrap();

    let output = enqueue(
        &app,
        &[
            file.to_str().unwrap(),
            "--campaign",
            "spring",
            "--template",
            "order_update",
            "--language",
            "en_US",
            "--to-column",
            "phone",
            "--param-columns",
            "name,order",
        ],
    )
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(65), "{stdout}\n{stderr}");
    let reported: BTreeSet<u64> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("line ")?.split_once(':')?.0.parse().ok())
        .collect();
    assert_eq!(
        reported, bad,
        "each bad row is reported on stderr by its line"
    );
    assert!(stdout.contains("published 99900 jobs"), "{stdout}");

    let rejects = std::fs::read_to_string(dir.join("recipients.csv.rejects.csv")).unwrap();
    let mut lines = rejects.lines();
    assert_eq!(lines.next(), Some("line,error,phone,name,order"));
    let in_file: BTreeSet<u64> = lines
        .map(|l| l.split_once(',').unwrap().0.parse().unwrap())
        .collect();
    assert_eq!(in_file, bad, "the reject file holds exactly the bad rows");

    let ids = drain_bulk(&app).await;
    assert_eq!(ids.len(), 99_900, "every good row is on the queue");
    assert!(duplicates(&ids).is_empty(), "and only once");
    assert!(ids.contains(&"spring-2".to_owned()) && !ids.contains(&"spring-1001".to_owned()));
    let lines: Vec<u64> = ids
        .iter()
        .map(|id| id.strip_prefix("spring-").unwrap().parse().unwrap())
        .collect();
    assert!(
        lines.windows(2).all(|w| w[0] < w[1]),
        "the queue holds the rows in the file's order"
    );
    std::fs::remove_dir_all(dir).unwrap();
    app.cleanup().await;
}

#[tokio::test]
async fn an_enqueue_killed_midway_and_run_again_leaves_every_row_on_the_queue() {
    let app = spawn_app("enq-kill", |_, _| {}).await;
    let dir = scratch(&app);
    const ROWS: usize = 20_000;
    let file = jsonl(&dir, ROWS);
    let checkpoint = dir.join("jobs.jsonl.checkpoint");
    let args = [
        file.to_str().unwrap(),
        "--campaign",
        "kill",
        "--window",
        "256",
    ];

    let mut child = app
        .command("enqueue")
        .args(args)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while checkpoint_line(&checkpoint).is_none_or(|l| l < 5_000) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no checkpoint past line 5000 within a minute"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.start_kill().unwrap(); // SIGKILL: no chance to tidy up.
    let status = child.wait().await.unwrap();
    assert!(!status.success(), "killed, not finished: {status:?}");
    let killed_at = checkpoint_line(&checkpoint).unwrap();
    assert!((killed_at as usize) < ROWS, "killed before the end");

    let output = enqueue(&app, &args).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains(&format!("resumed after line {killed_at}")),
        "{stdout}"
    );

    let ids = drain_bulk(&app).await;
    let distinct: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(distinct.len(), ROWS, "no row is lost");
    // A kill cannot be tidied up after: the jobs published after the last checkpoint (at most
    // the window and what confirmed since the last write) go again, and the worker's
    // idempotency record sends them once. Nothing the checkpoint covered goes twice.
    for (id, _) in duplicates(&ids) {
        let line: u64 = id.strip_prefix("kill-").unwrap().parse().unwrap();
        assert!(
            line > killed_at,
            "{id} was checkpointed at {killed_at} yet sent again"
        );
    }
    assert!(
        ids.len() - ROWS <= 256 + 2_000,
        "{} rows went twice",
        ids.len() - ROWS
    );
    std::fs::remove_dir_all(dir).unwrap();
    app.cleanup().await;
}

#[tokio::test]
async fn an_enqueue_stopped_by_sigterm_and_run_again_queues_every_row_exactly_once() {
    let app = spawn_app("enq-term", |_, _| {}).await;
    let dir = scratch(&app);
    const ROWS: usize = 20_000;
    let file = jsonl(&dir, ROWS);
    let checkpoint = dir.join("jobs.jsonl.checkpoint");
    let args = [file.to_str().unwrap(), "--campaign", "term"];

    let child = app
        .command("enqueue")
        .args(args)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while checkpoint_line(&checkpoint).is_none_or(|l| l < 5_000) {
        assert!(tokio::time::Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    common::signal(&child, "TERM");
    let output = child.wait_with_output().await.unwrap();
    assert_eq!(output.status.code(), Some(130), "stopped, to be continued");
    let stopped_at = checkpoint_line(&checkpoint).unwrap();
    assert!((stopped_at as usize) < ROWS, "stopped before the end");

    let output = enqueue(&app, &args).await;
    assert!(output.status.success());
    let ids = drain_bulk(&app).await;
    assert_eq!(ids.len(), ROWS, "every row once: {:?}", duplicates(&ids));
    let distinct: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(distinct.len(), ROWS);
    std::fs::remove_dir_all(dir).unwrap();
    app.cleanup().await;
}

#[tokio::test]
async fn a_producer_publishes_before_any_worker_ran_and_a_worker_then_sends_its_job() {
    let mut app = spawn_app("enq-first", |_, _| {}).await;
    // As on a fresh broker: none of the exchanges and queues a worker would declare.
    app.broker.delete_topology().await.unwrap();
    let dir = scratch(&app);
    let job = text_job("first-1");
    app.user_wrote(&job).await;
    let file = dir.join("first.jsonl");
    std::fs::write(&file, serde_json::to_string(&job).unwrap()).unwrap();

    let output = enqueue(&app, &[file.to_str().unwrap(), "--lane", "transactional"]).await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    app.start_worker();
    app.wait_sent_once(
        &BTreeSet::from(["first-1".to_owned()]),
        Duration::from_secs(20),
    )
    .await;
    app.stop_worker().await;
    std::fs::remove_dir_all(dir).unwrap();
    app.cleanup().await;
}

#[tokio::test]
async fn setup_declares_and_prints_the_topology_and_bad_arguments_exit_64() {
    let app = spawn_app("enq-setup", |_, _| {}).await;
    app.broker.delete_topology().await.unwrap();
    let output = app
        .command("setup")
        .stdout(Stdio::piped())
        .output()
        .await
        .unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    let bulk = format!("queue {}.send.{NUMBER}.bulk", app.prefix);
    assert!(stdout.lines().any(|l| l == bulk), "{stdout}");
    assert!(
        stdout.contains(&format!("exchange {}.send\n", app.prefix)),
        "{stdout}"
    );
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let (connection, channel) = common::amqp_channel(&app.settings.amqp.url).await;
    channel
        .queue_declare(
            format!("{}.send.{NUMBER}.bulk", app.prefix).as_str().into(),
            passive,
            FieldTable::default(),
        )
        .await
        .expect("the queue exists after setup");
    let _ = connection.close(200, "bye".into()).await;

    let dir = scratch(&app);
    let file = dir.join("a.csv");
    std::fs::write(&file, "phone\n+16505551234\n").unwrap();
    // A CSV without a template to map to, a flag that does not exist.
    for args in [
        vec![
            file.to_str().unwrap(),
            "--campaign",
            "c",
            "--to-column",
            "phone",
        ],
        vec![file.to_str().unwrap(), "--colour", "red"],
    ] {
        let output = enqueue(&app, &args).await;
        assert_eq!(
            output.status.code(),
            Some(64),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
    app.cleanup().await;
}
