//! What the load benchmarks share: `--name value` options and a minimal keep-alive HTTP/1.1
//! client over raw TCP, so most of the machine goes to the server being measured.

#![allow(dead_code)]

use std::time::Instant;

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The value after `--name` on the command line, parsed.
pub fn option<T: std::str::FromStr>(name: &str) -> Option<T> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
}

/// Whether `word` is on the command line.
pub fn flag(word: &str) -> bool {
    std::env::args().any(|a| a == word)
}

/// Reads one response; returns its status code.
pub async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<u16> {
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

/// What one connection saw after the warm-up.
pub struct Tally {
    /// 200 answers.
    pub ok: u64,
    /// Any other answer.
    pub other: u64,
    /// Latency per request, µs.
    pub latency: Histogram<u64>,
}

impl Tally {
    /// Nothing yet.
    pub fn new() -> Self {
        Tally {
            ok: 0,
            other: 0,
            latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
        }
    }

    /// Adds another connection's tally.
    pub fn add(&mut self, other: &Tally) {
        self.ok += other.ok;
        self.other += other.other;
        self.latency.add(&other.latency).expect("same bounds");
    }

    /// `N requests/s answered 200 (M other answers), latency p50 …, p99 …, max …`.
    pub fn summary(&self, seconds: f64) -> String {
        let ms = |us: u64| us as f64 / 1000.0;
        format!(
            "{:.0} requests/s answered 200 ({} other answers), latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.ok as f64 / seconds,
            self.other,
            ms(self.latency.value_at_quantile(0.5)),
            ms(self.latency.value_at_quantile(0.99)),
            ms(self.latency.max()),
        )
    }
}

/// Sends `request(i)` for i = first, first + stride, … back to back on one keep-alive
/// connection until `until`, counting what comes back after `warm_until`.
pub async fn connection(
    addr: std::net::SocketAddr,
    first: u64,
    stride: u64,
    request: impl Fn(u64) -> Vec<u8>,
    warm_until: Instant,
    until: Instant,
) -> Tally {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let mut tally = Tally::new();
    let mut buf = Vec::with_capacity(8192);
    let mut i = first;
    loop {
        let started = Instant::now();
        if started >= until {
            return tally;
        }
        stream.write_all(&request(i)).await.expect("write");
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

/// A bare batched-confirm publisher (lapin, no headers, `window` confirms in flight): what the
/// broker allows a producer. Publishes each `(routing key, body)` to `exchange`, persistent and
/// mandatory, and panics if the broker refuses one.
pub async fn publish_raw<B: AsRef<[u8]>>(
    url: &str,
    exchange: &str,
    items: impl Iterator<Item = (String, B)>,
    window: usize,
) {
    publish_confirmed(url, exchange, items, window, true).await;
}

/// [`publish_raw`], `mandatory` or not (an event with nothing bound is dropped, not returned).
pub async fn publish_confirmed<B: AsRef<[u8]>>(
    url: &str,
    exchange: &str,
    items: impl Iterator<Item = (String, B)>,
    window: usize,
    mandatory: bool,
) {
    use futures::StreamExt;
    use futures::stream::FuturesUnordered;
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    use lapin::{BasicProperties, Connection, ConnectionProperties};

    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("RabbitMQ");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut pending = FuturesUnordered::new();
    for (key, body) in items {
        if pending.len() >= window {
            let confirm: lapin::Confirmation = pending.next().await.unwrap();
            assert!(confirm.is_ack(), "the broker refused a job");
        }
        let confirm = channel
            .basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions {
                    mandatory,
                    ..Default::default()
                },
                body.as_ref(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish");
        pending.push(async move { confirm.await.expect("confirm") });
    }
    while let Some(confirm) = pending.next().await {
        assert!(confirm.is_ack(), "the broker refused a job");
    }
    let _ = connection.close(200, "published".into()).await;
}

/// CPU time this process used so far (user + system), µs, from `/proc/self/stat` (clock ticks
/// of 10 ms).
pub fn cpu_us() -> u64 {
    stat_cpu_us(&std::fs::read_to_string("/proc/self/stat").unwrap_or_default())
}

/// User + system time in a `/proc/<pid>/stat` line, µs (clock ticks of 10 ms).
fn stat_cpu_us(stat: &str) -> u64 {
    stat_fields_us(stat, 11, 12)
}

/// Two clock-tick fields after the command name of a `/proc/<pid>/stat` line, summed, µs.
fn stat_fields_us(stat: &str, user: usize, system: usize) -> u64 {
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(user) + ticks(system)) * 10_000
}

/// The service processes a bench counts: when [`count_only`] named some, the processes whose
/// command line holds one of those names; otherwise every local `beam.smp` and `redis-server`.
static COUNTED: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

/// Counts only the service processes whose command line holds one of `names` (a bench's own
/// nodes), not the shared ones.
pub fn count_only(names: Vec<String>) {
    let _ = COUNTED.set(names);
}

/// The counted RabbitMQ (`beam.smp`) and Redis (`redis-server`) processes: `(is_rabbit, stat,
/// status)` of each, from `/proc`.
fn services() -> Vec<(bool, String, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| {
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let rabbit = stat.contains("(beam.smp)");
            if !rabbit && !stat.contains("(redis-server)") {
                return None;
            }
            if let Some(names) = COUNTED.get() {
                let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                if !names.iter().any(|n| cmdline.contains(n.as_str())) {
                    return None;
                }
            }
            let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
            Some((rabbit, stat, status))
        })
        .collect()
}

/// CPU time used so far by the counted RabbitMQ and Redis processes, µs each; 0 where they
/// cannot be seen (remote services).
pub fn services_cpu_us() -> (u64, u64) {
    services()
        .iter()
        .map(|(rabbit, stat, _)| {
            let us = stat_cpu_us(stat);
            if *rabbit { (us, 0) } else { (0, us) }
        })
        .fold((0, 0), |(r, d), (r2, d2)| (r + r2, d + d2))
}

/// Resident memory of the counted RabbitMQ processes, summed, bytes; `None` where none can be
/// seen.
pub fn broker_memory() -> Option<u64> {
    let kib: Vec<u64> = services()
        .iter()
        .filter(|(rabbit, _, _)| *rabbit)
        .filter_map(|(_, _, status)| {
            let v = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
            v.trim().trim_end_matches("kB").trim().parse().ok()
        })
        .collect();
    (!kib.is_empty()).then(|| kib.iter().sum::<u64>() * 1024)
}

/// CPU time used so far by this process's children that have ended and been waited for
/// (user + system), µs.
pub fn children_cpu_us() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    stat_fields_us(&stat, 13, 14)
}
