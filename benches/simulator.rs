//! Load benchmark of the Cloud API simulator: how many valid send requests per second it answers
//! on this machine, so that it is never the bottleneck when wa-sender is measured.
//!
//! `cargo bench --bench simulator` (options after `--`: `--connections N --seconds S --kind
//! text|template`). The load generator is a minimal keep-alive HTTP/1.1 client over raw TCP in
//! the same process, so most CPU goes to the simulator: every request is parsed, validated
//! (template requests against the registry), rate-limited, audited and its status webhooks are
//! planned and scheduled, as in a test run.

mod common;

use std::time::{Duration, Instant};

use common::{Tally, option};
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
    Options {
        connections: option("--connections").unwrap_or(64),
        seconds: option("--seconds").unwrap_or(10),
        template: option::<String>("--kind").is_none_or(|k| k == "template"),
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
        let sim = Simulator::start(scenario, "127.0.0.1:0")
            .await
            .expect("simulator");
        let warm = Duration::from_secs(1);
        let warm_until = Instant::now() + warm;
        let until = warm_until + Duration::from_secs(options.seconds);
        let n = options.connections as u64;
        let tasks: Vec<_> = (0..n)
            .map(|c| {
                let template = options.template;
                let request = move |i| request(i, template);
                tokio::spawn(common::connection(
                    sim.addr(),
                    c,
                    n,
                    request,
                    warm_until,
                    until,
                ))
            })
            .collect();
        let mut tally = Tally::new();
        for t in tasks {
            tally.add(&t.await.expect("connection task"));
        }
        let audit = sim.audit();
        let secs = options.seconds as f64;
        println!(
            "simulator: {} {} requests over {} connections in {secs:.0} s (after 1 s warm-up)",
            tally.ok + tally.other,
            if options.template { "template" } else { "text" },
            options.connections
        );
        println!("  {}", tally.summary(secs));
        println!(
            "  audit: {} accepted, {} duplicates, status webhooks planned: {:?}",
            audit.accepted.len(),
            audit.duplicates.len(),
            audit.webhooks.scheduled
        );
        sim.stop();
    });
}
