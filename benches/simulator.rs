//! Load benchmark of the Cloud API simulator: how many valid send requests per second it answers
//! on this machine, so that it is never the bottleneck when wa-sender is measured.
//!
//! `cargo bench --bench simulator` (options after `--`: `--connections N --seconds S --kind
//! text|template`). The load generator is a minimal keep-alive HTTP/1.1 client over raw TCP in
//! the same process, so most CPU goes to the simulator: every request is parsed, validated
//! (template requests against the registry), rate-limited, audited and its status webhooks are
//! planned and scheduled, as in a test run.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wa_sender::simulator::{Scenario, Simulator};

const NUMBER: &str = "106540352242922";
const WABA: &str = "102290129340398";
const TOKEN: &str = "bench-token";

struct Options {
    connections: usize,
    seconds: u64,
    template: bool,
}

fn options() -> Options {
    let args: Vec<String> = std::env::args().collect();
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    Options {
        connections: value("--connections")
            .and_then(|v| v.parse().ok())
            .unwrap_or(64),
        seconds: value("--seconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(10),
        template: value("--kind").is_none_or(|k| k == "template"),
    }
}

fn request(i: u64, template: bool) -> Vec<u8> {
    let to = format!("+1650{:07}", i % 10_000_000);
    let body = if template {
        format!(
            r#"{{"messaging_product":"whatsapp","to":"{to}","type":"template","biz_opaque_callback_data":"job-{i}","template":{{"name":"order_update","language":{{"code":"en_US"}},"components":[{{"type":"body","parameters":[{{"type":"text","text":"Jessica"}},{{"type":"text","text":"A-{i}"}}]}}]}}}}"#
        )
    } else {
        format!(
            r#"{{"messaging_product":"whatsapp","to":"{to}","type":"text","biz_opaque_callback_data":"job-{i}","text":{{"body":"Your order has shipped"}}}}"#
        )
    };
    format!(
        "POST /v23.0/{NUMBER}/messages HTTP/1.1\r\nhost: sim\r\nauthorization: Bearer {TOKEN}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Reads one response; returns its status code.
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<u16> {
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end]).unwrap_or_default();
            let status = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + length {
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Ok(status);
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

struct Tally {
    ok: u64,
    other: u64,
    latency: Histogram<u64>,
}

async fn connection(
    addr: std::net::SocketAddr,
    first: u64,
    stride: u64,
    template: bool,
    warm_until: Instant,
    until: Instant,
) -> Tally {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let mut tally = Tally {
        ok: 0,
        other: 0,
        latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
    };
    let mut buf = Vec::with_capacity(8192);
    let mut i = first;
    loop {
        let started = Instant::now();
        if started >= until {
            return tally;
        }
        stream
            .write_all(&request(i, template))
            .await
            .expect("write");
        let status = read_response(&mut stream, &mut buf).await.expect("read");
        if started >= warm_until {
            if status == 200 {
                tally.ok += 1;
            } else {
                tally.other += 1;
            }
            let _ = tally
                .latency
                .record(started.elapsed().as_micros().max(1) as u64);
        }
        i += stride;
    }
}

fn main() {
    let options = options();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut scenario = Scenario::single(NUMBER, WABA, TOKEN);
        // Limits out of the way: this measures the simulator's own cost per request.
        scenario.numbers[0].throughput_mps = Some(u32::MAX);
        scenario.unknown_users.window_open = true;
        let sim = Simulator::start(scenario, "127.0.0.1:0").await.expect("simulator");
        let warm = Duration::from_secs(1);
        let warm_until = Instant::now() + warm;
        let until = warm_until + Duration::from_secs(options.seconds);
        let n = options.connections as u64;
        let tasks: Vec<_> = (0..n)
            .map(|c| {
                tokio::spawn(connection(sim.addr(), c, n, options.template, warm_until, until))
            })
            .collect();
        let mut ok = 0;
        let mut other = 0;
        let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
        for t in tasks {
            let tally = t.await.expect("connection task");
            ok += tally.ok;
            other += tally.other;
            latency.add(&tally.latency).expect("same bounds");
        }
        let audit = sim.audit();
        let secs = options.seconds as f64;
        println!(
            "simulator: {} {} requests over {} connections in {secs:.0} s (after 1 s warm-up)",
            ok + other,
            if options.template { "template" } else { "text" },
            options.connections
        );
        println!(
            "  {:.0} requests/s answered 200 ({other} other answers), latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            ok as f64 / secs,
            latency.value_at_quantile(0.5) as f64 / 1000.0,
            latency.value_at_quantile(0.99) as f64 / 1000.0,
            latency.max() as f64 / 1000.0,
        );
        println!(
            "  audit: {} accepted, {} duplicates, status webhooks planned: {:?}",
            audit.accepted.len(),
            audit.duplicates.len(),
            audit.webhooks.scheduled
        );
        sim.stop();
    });
}
