//! The `wa-sender` binary: parses the command line, loads settings, installs telemetry and runs
//! one subcommand. Bad configuration exits with code 64 and names the key.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio::io::AsyncBufReadExt;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};
use wa_sender::config::Settings;
use wa_sender::job::Lane;
use wa_sender::simulator::{Scenario, SimNumber, Simulator};

/// Exit code for configuration errors (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "wa-sender",
    version,
    about = "Outbound send worker for the WhatsApp Business Cloud API"
)]
struct Cli {
    /// Configuration directory (default.toml, <environment>.toml).
    #[arg(
        long,
        env = "WA_SENDER_CONFIG_DIR",
        default_value = "config",
        global = true
    )]
    config_dir: PathBuf,
    /// Environment whose overrides are layered on the defaults.
    #[arg(
        long = "env",
        env = "WA_SENDER_ENV",
        default_value = "local",
        global = true
    )]
    environment: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume the lane queues and send through the Cloud API until SIGTERM/SIGINT.
    Worker,
    /// Run the Cloud API simulator.
    Simulate {
        /// Scenario file (TOML, see scenarios/README.md); default: the configured numbers with
        /// three approved templates.
        #[arg(long)]
        scenario: Option<String>,
        /// Bearer token the simulator accepts, besides the scenario's (the worker's
        /// cloud.access_token).
        #[arg(long, env = "WA_SENDER__CLOUD__ACCESS_TOKEN")]
        token: Option<String>,
        /// Listen address (default: simulator.listen).
        #[arg(long)]
        listen: Option<String>,
        /// Callback URL for webhooks (overrides the scenario's webhooks.url).
        #[arg(long)]
        webhook_url: Option<String>,
    },
    /// Publish jobs (one JSON job per line, from a file or stdin) to a lane.
    Enqueue {
        /// Lane: otp, transactional or bulk.
        #[arg(long, default_value = "bulk", value_parser = parse_lane)]
        lane: Lane,
        /// File of JSON lines; `-` for stdin.
        #[arg(default_value = "-")]
        file: String,
    },
    /// Simulator, worker and producer in one process; prints a summary.
    Demo {
        /// Use the in-process queue and store instead of RabbitMQ and Redis.
        #[arg(long)]
        embedded: bool,
        /// Number of jobs (default: demo.jobs).
        #[arg(long)]
        jobs: Option<usize>,
    },
}

fn parse_lane(s: &str) -> Result<Lane, String> {
    Lane::parse(s).ok_or_else(|| format!("{s:?} is not a lane (otp, transactional, bulk)"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(&cli.config_dir, &cli.environment) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("wa-sender: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    wa_sender::telemetry::init(
        &settings.telemetry.log_filter,
        &settings.telemetry.log_format,
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(cli.command, settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_configuration_error(&e) => {
            eprintln!("wa-sender: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            eprintln!("wa-sender: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Cancels the token on SIGTERM or SIGINT.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received, shutting down"),
            _ = tokio::signal::ctrl_c() => info!("SIGINT received, shutting down"),
        }
        cancel.cancel();
    });
    token
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<()> {
    match command {
        Command::Worker => {
            let numbers = settings.resolve_numbers()?;
            let (broker, store) = wa_sender::app::connect(&settings).await?;
            let cloud = Arc::new(wa_sender::app::http_cloud(&settings)?);
            let pipeline = Arc::new(wa_sender::app::pipeline(
                &settings,
                cloud,
                broker.clone(),
                store,
                numbers,
            )?);
            let drained = wa_sender::worker::run(
                pipeline,
                broker.clone(),
                wa_sender::app::worker_settings(&settings),
                shutdown_on_signal(),
            )
            .await;
            broker.close().await;
            match drained {
                Ok(d) if d.abandoned == 0 => Ok(()),
                Ok(d) => anyhow::bail!(
                    "{} jobs were still in flight after the grace period; they return to their queues",
                    d.abandoned
                ),
                Err(e) => Err(e).context("worker stopped"),
            }
        }
        Command::Simulate {
            scenario,
            token,
            listen,
            webhook_url,
        } => {
            let mut scenario = match scenario {
                Some(path) => Scenario::load(&path)?,
                None => configured_scenario(&settings),
            };
            scenario.tokens.extend(token);
            if webhook_url.is_some() {
                scenario.webhooks.url = webhook_url;
            }
            if scenario.tokens.is_empty() {
                anyhow::bail!(
                    "the simulator accepts no token: pass --token or set WA_SENDER__CLOUD__ACCESS_TOKEN"
                );
            }
            let listen = listen.unwrap_or(settings.simulator.listen.clone());
            let simulator = Simulator::start(scenario, &listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            info!(addr = %simulator.addr(), "simulator listening; audit at /_sim/audit");
            shutdown_on_signal().cancelled().await;
            simulator.stop();
            Ok(())
        }
        Command::Enqueue { lane, file } => {
            let (broker, _store) = wa_sender::app::connect(&settings).await?;
            let reader: Box<dyn tokio::io::AsyncRead + Unpin> = if file == "-" {
                Box::new(tokio::io::stdin())
            } else {
                Box::new(
                    tokio::fs::File::open(&file)
                        .await
                        .with_context(|| format!("cannot open {file}"))?,
                )
            };
            let mut lines = tokio::io::BufReader::new(reader).lines();
            let mut published = 0u64;
            while let Some(line) = lines.next_line().await? {
                if line.trim().is_empty() {
                    continue;
                }
                // Producers may publish anything; the worker validates and dead-letters. A
                // malformed line is still published so it is reported, never silently dropped.
                wa_sender::app::enqueue(broker.as_ref(), lane, line.into_bytes()).await?;
                published += 1;
            }
            broker.close().await;
            println!("published {published} jobs to lane {}", lane.as_str());
            Ok(())
        }
        Command::Demo { embedded, jobs } => {
            let jobs = jobs.unwrap_or(settings.demo.jobs);
            let summary = wa_sender::demo::run(&settings, embedded, jobs)
                .await
                .inspect_err(|e| error!(error = %e, "demo failed"))?;
            println!("{}", wa_sender::demo::render(&summary));
            Ok(())
        }
    }
}

/// The configured numbers, each with the default templates, as a scenario.
fn configured_scenario(settings: &Settings) -> Scenario {
    let mut scenario = Scenario::single("106540352242922", "102290129340398", "");
    scenario.tokens.clear();
    if !settings.numbers.is_empty() {
        scenario.numbers = settings
            .numbers
            .iter()
            .map(|(id, n)| SimNumber {
                throughput_mps: Some(n.throughput_mps),
                ..SimNumber::new(id, &n.waba_id)
            })
            .collect();
        let templates = scenario.templates.clone();
        scenario.templates = scenario
            .numbers
            .iter()
            .map(|n| n.waba_id.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .flat_map(|waba| {
                templates.iter().cloned().map(move |mut t| {
                    t.waba_id.clone_from(&waba);
                    t
                })
            })
            .collect();
    }
    scenario
}

/// Bad settings or a bad scenario file: the operator's to fix, exit 64.
fn is_configuration_error(e: &anyhow::Error) -> bool {
    e.downcast_ref::<wa_sender::config::ConfigError>().is_some()
        || e.downcast_ref::<wa_sender::simulator::ScenarioError>()
            .is_some()
}
