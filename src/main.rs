//! The `wa-sender` binary: parses the command line, loads settings, installs telemetry and runs
//! one subcommand. Bad configuration exits with code 64 and names the key.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// mimalloc: the worker allocates and frees small buffers for every job on several threads,
/// where glibc's allocator spent about a sixth of the worker's CPU (measured with the e2e bench).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use wa_sender::admin::dead::DeadQuery;
use wa_sender::admin::import::{self, ImportError};
use wa_sender::admin::{Admin, AdminError, ConsentChange};
use wa_sender::app::{WebhookApp, WorkerApp};
use wa_sender::config::Runtime;
use wa_sender::ids::{CampaignId, PhoneNumberId};
use wa_sender::job::Lane;
use wa_sender::metrics;
use wa_sender::policy::admission::CampaignState;
use wa_sender::producer::file::{self as enqueue, Bar, EnqueueError, Lines, Observer};
use wa_sender::producer::input::{Defaults, Format, HeaderType, InputError, Mapping};
use wa_sender::simulator::{DelayRange, Scenario, SimNumber, SimUser, Simulator};

/// The user the README's quick start writes to (`wa_id`).
const QUICK_START_USER: &str = "16505551234";
use wa_sender::worker::Drained;

/// Exit code for configuration errors and bad arguments (EX_USAGE).
const EXIT_CONFIG: u8 = 64;
/// Exit code when an import or enqueue skipped bad lines or could not read its file
/// (EX_DATAERR).
const EXIT_DATA: u8 = 65;
/// Exit code of an enqueue stopped by SIGINT/SIGTERM (128 + SIGINT): rerun to continue.
const EXIT_STOPPED: u8 = 130;

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
        /// six approved templates, and the quick start's user +16505551234, who reads what they
        /// get; messages are delivered within 1 s and read within 2 s.
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
    /// Publish jobs from a JSONL or CSV file (or stdin) to a lane, each row validated first.
    ///
    /// Refused rows are reported by line and go to a reject file; an interrupted run started
    /// again with the same arguments continues after the last line confirmed. Exits 0 when
    /// every row was published, 65 when some were refused, 64 on bad arguments, 1 when the
    /// broker failed, 130 when stopped by SIGINT/SIGTERM.
    Enqueue(Box<EnqueueArgs>),
    /// Declare the exchanges and queues (one per configured number and lane) and print them.
    ///
    /// Producers can then publish before any worker ran (enqueue declares them too).
    Setup,
    /// Delete every queue and exchange under `amqp.prefix` and every Redis key under
    /// `redis.key_prefix`: what a trial, a demo or a quick start left behind. Jobs still queued
    /// are deleted with their queues.
    Teardown {
        /// Required: the deletion cannot be undone.
        #[arg(long)]
        yes: bool,
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
    /// Receive Meta's webhooks (verify each signature, land the body in wa.webhooks.intake
    /// before answering 200) and process the intake into events, until SIGTERM/SIGINT.
    Webhook {
        /// Listen address (default: webhook.listen).
        #[arg(long)]
        listen: Option<String>,
    },
    /// Serve the admin HTTP API (campaigns, consent, care windows) until SIGTERM/SIGINT.
    Admin {
        /// Listen address (default: admin.listen).
        #[arg(long)]
        listen: Option<String>,
    },
    /// Pause, resume or cancel a campaign in every configured WABA, or show its state.
    Campaign {
        #[command(subcommand)]
        action: CampaignAction,
    },
    /// Record a user's opt-in or opt-out, or import opt-ins from a CSV file.
    Consent {
        #[command(subcommand)]
        action: ConsentAction,
    },
    /// Open a user's care window by hand (tests, migrations).
    Window {
        #[command(subcommand)]
        action: WindowAction,
    },
    /// Halts raised by Cloud API errors (190, 131031, 368, 131042, 131048), shared by every
    /// replica.
    Halt {
        #[command(subcommand)]
        action: HaltAction,
    },
    /// List, show or replay the dead letters (the dead queue is held briefly while it is read).
    Dead {
        #[command(subcommand)]
        action: DeadAction,
    },
    /// One job's state: its record, wamid, last delivery status and dead letter, as JSON.
    Job {
        /// The job id.
        job_id: String,
        /// The WABA (required when more than one is configured).
        #[arg(long)]
        waba: Option<String>,
    },
}

/// `wa-sender enqueue`'s arguments.
#[derive(clap::Args)]
struct EnqueueArgs {
    /// Lane: otp, transactional or bulk.
    #[arg(long, default_value = "bulk", value_parser = parse_lane)]
    lane: Lane,
    /// The input: `.csv` files are CSV, anything else JSON lines; `-` for stdin.
    #[arg(default_value = "-")]
    file: String,
    /// The input's format, whatever its name.
    #[arg(long, value_enum)]
    format: Option<Format>,
    /// Campaign of every job that names none; job ids are `<campaign>-<line>` where the input
    /// gives none (required for CSV without --job-id-column).
    #[arg(long)]
    campaign: Option<String>,
    /// Not to be sent before this time (RFC 3339), for jobs that say nothing.
    #[arg(long)]
    not_before: Option<String>,
    /// Dead-lettered `expired` if not sent by this time (RFC 3339), for jobs that say nothing.
    #[arg(long)]
    expires_at: Option<String>,
    /// The sending number of CSV rows and of JSON jobs that name none (default: the only
    /// configured number, if there is one).
    #[arg(long)]
    phone_number_id: Option<String>,
    /// CSV mapping file (TOML with the keys of the column flags below); flags win.
    #[arg(long)]
    mapping: Option<PathBuf>,
    /// CSV: the recipient's column (default `to`).
    #[arg(long)]
    to_column: Option<String>,
    /// CSV: the template of every row.
    #[arg(long)]
    template: Option<String>,
    /// CSV: the column naming each row's template.
    #[arg(long)]
    template_column: Option<String>,
    /// CSV: the template language of every row (`en_US`).
    #[arg(long)]
    language: Option<String>,
    /// CSV: the column naming each row's language.
    #[arg(long)]
    language_column: Option<String>,
    /// CSV: the columns holding the template's body parameters, in order (`name,order`).
    #[arg(long, value_delimiter = ',')]
    param_columns: Vec<String>,
    /// CSV: the column holding the template header's parameter (its text, or a media link).
    #[arg(long)]
    header_column: Option<String>,
    /// CSV: what the header column holds (default text).
    #[arg(long, value_enum)]
    header_type: Option<HeaderType>,
    /// CSV: the column holding a URL button's dynamic link suffix.
    #[arg(long)]
    url_button_column: Option<String>,
    /// CSV: that URL button's index among the template's buttons (default 0).
    #[arg(long)]
    url_button_index: Option<u8>,
    /// CSV: the column holding each row's job id.
    #[arg(long)]
    job_id_column: Option<String>,
    /// Where refused rows go (default: `<file>.rejects.csv` or `<file>.rejects.jsonl`).
    #[arg(long)]
    rejects: Option<PathBuf>,
    /// Where progress is kept for a resume (default: `<file>.checkpoint`; none for stdin).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Start from the first row even if the checkpoint says part was enqueued.
    #[arg(long)]
    restart: bool,
    /// Validate every row and write the rejects, but publish nothing.
    #[arg(long)]
    dry_run: bool,
    /// Publishes awaiting their confirm at most.
    #[arg(long, default_value_t = wa_sender::producer::WINDOW)]
    window: usize,
}

/// Which dead letters a command is about.
#[derive(clap::Args)]
struct DeadSelection {
    /// Only this reason (outside_care_window, max_attempts, …).
    #[arg(long)]
    reason: Option<String>,
    /// Only this campaign's jobs.
    #[arg(long)]
    campaign: Option<String>,
}

#[derive(Subcommand)]
enum DeadAction {
    /// Summaries of the dead letters, oldest first, as JSON; they stay in the dead queue.
    List {
        #[command(flatten)]
        selection: DeadSelection,
        /// Only those dead-lettered at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// At most this many (default 100).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// A job's dead letter in full (body and headers), as JSON.
    Show {
        /// The job id.
        job_id: String,
    },
    /// Publish matching dead letters back to their lanes and remove them from the dead queue;
    /// a job already sent is not sent again.
    Replay {
        /// The job id.
        #[arg(required_unless_present_any = ["reason", "campaign"])]
        job_id: Option<String>,
        #[command(flatten)]
        selection: DeadSelection,
        /// Only say what would be replayed.
        #[arg(long)]
        dry_run: bool,
        /// The lane for letters that recorded none (dead-lettered before lanes were recorded).
        #[arg(long, value_parser = parse_lane)]
        lane: Option<Lane>,
    },
}

#[derive(Subcommand)]
enum HaltAction {
    /// The halts in force, as JSON.
    List,
    /// Lift a halt before its end: the replicas send again within a heartbeat.
    Resume {
        /// `number:<phone_number_id>`, `waba:<waba_id>`, `token` or `app`.
        scope: String,
    },
}

#[derive(Subcommand)]
enum CampaignAction {
    /// Its jobs wait until it is resumed.
    Pause {
        /// The campaign id.
        id: String,
    },
    /// Its jobs send again.
    Resume {
        /// The campaign id.
        id: String,
    },
    /// Its remaining jobs are dead-lettered `campaign_cancelled`.
    Cancel {
        /// The campaign id.
        id: String,
    },
    /// Show its state per WABA.
    Status {
        /// The campaign id.
        id: String,
    },
    /// Counts per outcome and dead-letter reason, delivery and read rates, estimated cost.
    Report {
        /// The campaign id.
        #[arg(required_unless_present = "all")]
        id: Option<String>,
        /// Every job of the configured portfolios instead of one campaign.
        #[arg(long, conflicts_with = "id")]
        all: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Which WABA a consent command is for, and where the consent came from.
#[derive(clap::Args)]
struct ConsentTarget {
    /// The WABA (required when more than one is configured).
    #[arg(long)]
    waba: Option<String>,
    /// Where the consent came from (default: admin).
    #[arg(long)]
    source: Option<String>,
}

#[derive(Subcommand)]
enum ConsentAction {
    /// Record an opt-in.
    OptIn {
        /// The user, E.164 with or without +.
        wa_id: String,
        #[command(flatten)]
        target: ConsentTarget,
    },
    /// Record a marketing opt-out.
    OptOut {
        /// The user, E.164 with or without +.
        wa_id: String,
        #[command(flatten)]
        target: ConsentTarget,
    },
    /// Withdraw a marketing opt-out (the user resumed).
    Resume {
        /// The user, E.164 with or without +.
        wa_id: String,
        /// The WABA (required when more than one is configured).
        #[arg(long)]
        waba: Option<String>,
    },
    /// Import opt-ins from CSV: a header row, then wa_id, opted_in_at (RFC 3339, optional),
    /// source (optional). Exits 65 when some lines were rejected.
    Import {
        /// The CSV file.
        file: PathBuf,
        /// The WABA (required when more than one is configured).
        #[arg(long)]
        waba: Option<String>,
        /// Source for lines without one (default: csv:<file name>).
        #[arg(long)]
        source: Option<String>,
        /// Write the rejected lines here as CSV (line, wa_id, error).
        #[arg(long)]
        errors: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum WindowAction {
    /// Record an inbound message from the user: the care window runs 24 h from it.
    Open {
        /// The business number (phone_number_id), as configured.
        #[arg(long)]
        number: String,
        /// The user, E.164 with or without +.
        wa_id: String,
        /// When the user wrote, RFC 3339 (default: now).
        #[arg(long)]
        at: Option<String>,
    },
}

fn parse_lane(s: &str) -> Result<Lane, String> {
    Lane::parse(s).ok_or_else(|| format!("{s:?} is not a lane (otp, transactional, bulk)"))
}

fn main() -> ExitCode {
    let matches = Cli::command()
        .try_get_matches()
        .unwrap_or_else(|e| exit_usage(e));
    // Each process is its own service in the traces: wa-sender-worker, wa-sender-webhook, …
    let service = format!("wa-sender-{}", matches.subcommand_name().unwrap_or("cli"));
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| exit_usage(e));
    let settings = match Runtime::load(&cli.config_dir, &cli.environment) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("wa-sender: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The demo's output is its summary table: its per-job lines show with `RUST_LOG=info`.
    let log_filter = match cli.command {
        Command::Demo { .. } => Some("warn"),
        _ => None,
    };
    // Held to the end: dropping it flushes the spans not yet exported.
    let _telemetry = match wa_sender::telemetry::init(&settings.telemetry, &service, log_filter) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("wa-sender: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(run(cli.command, settings));
    drop(runtime);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e)
            if matches!(e.downcast_ref::<Unfinished>(), Some(Unfinished::Stopped))
                || e.downcast_ref::<wa_sender::demo::Stopped>().is_some() =>
        {
            eprintln!("wa-sender: {e}");
            ExitCode::from(EXIT_STOPPED)
        }
        Err(e) if is_configuration_error(&e) => {
            eprintln!("wa-sender: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) if is_data_error(&e) => {
            eprintln!("wa-sender: {e}");
            ExitCode::from(EXIT_DATA)
        }
        Err(e) => {
            eprintln!("wa-sender: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Help and version as clap prints them; a bad argument exits 64 like bad configuration.
fn exit_usage(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    let _ = e.print();
    std::process::exit(i32::from(EXIT_CONFIG));
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

async fn run(command: Command, settings: Runtime) -> anyhow::Result<()> {
    if matches!(
        command,
        Command::Worker
            | Command::Simulate { .. }
            | Command::Webhook { .. }
            | Command::Admin { .. }
    ) {
        // The long-running processes, each of which serves /metrics.
        metrics::install();
    }
    match command {
        Command::Worker => {
            let shutdown = shutdown_on_signal();
            let app = WorkerApp::build(&settings, &shutdown).await?;
            let drained = app.run_until_stopped(shutdown).await;
            finished(drained.context("worker stopped")?)
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
        Command::Enqueue(args) => enqueue(&settings, *args).await,
        Command::Setup => {
            let broker = wa_sender::app::connect_broker(&settings).await?;
            let topology = broker.topology();
            let node = broker.node().await;
            broker.close().await;
            for exchange in &topology.exchanges {
                println!("exchange {exchange}");
            }
            for queue in &topology.queues {
                println!("queue {queue}");
            }
            println!(
                "declared {} exchanges and {} queues on {}",
                topology.exchanges.len(),
                topology.queues.len(),
                node
            );
            Ok(())
        }
        Command::Teardown { yes } => {
            if !yes {
                anyhow::bail!(
                    "teardown deletes every queue of prefix {:?} and every Redis key of prefix {:?}: pass --yes",
                    settings.amqp.prefix,
                    settings.redis.key_prefix
                );
            }
            let (broker, store) = wa_sender::app::connect(&settings).await?;
            broker.delete_topology().await?;
            broker.close().await;
            let keys = store.delete_all().await?;
            println!(
                "deleted the queues and exchanges of prefix {:?} and {keys} Redis keys of prefix {:?}",
                settings.amqp.prefix, settings.redis.key_prefix
            );
            Ok(())
        }
        Command::Demo { embedded, jobs } => {
            let jobs = jobs.unwrap_or(settings.demo.jobs);
            let summary = wa_sender::demo::run(&settings, embedded, jobs, shutdown_on_signal())
                .await
                .inspect_err(|e| {
                    if e.downcast_ref::<wa_sender::demo::Stopped>().is_none() {
                        error!(error = %e, "demo failed");
                    }
                })?;
            println!("{}", wa_sender::demo::render(&summary));
            Ok(())
        }
        Command::Webhook { listen } => {
            let app = WebhookApp::build(&settings, listen.as_deref()).await?;
            app.run_until_stopped(shutdown_on_signal()).await
        }
        Command::Admin { listen } => {
            let server = wa_sender::app::admin_server(&settings, listen.as_deref()).await?;
            Ok(server.run_until_stopped(shutdown_on_signal()).await?)
        }
        Command::Campaign { action } => {
            let admin = wa_sender::app::admin(&settings).await?;
            let status = match action {
                CampaignAction::Pause { id } => {
                    admin.set_campaign(&id, CampaignState::Paused).await
                }
                CampaignAction::Resume { id } => {
                    admin.set_campaign(&id, CampaignState::Active).await
                }
                CampaignAction::Cancel { id } => {
                    admin.set_campaign(&id, CampaignState::Cancelled).await
                }
                CampaignAction::Status { id } => admin.campaign(&id).await,
                CampaignAction::Report { id, json, .. } => {
                    let report = admin
                        .report(id.as_deref(), &settings.pricing.currency)
                        .await?;
                    if json {
                        return print_json(&report);
                    }
                    print!("{}", report.render());
                    return Ok(());
                }
            };
            print_json(&status?)
        }
        Command::Consent { action } => {
            let admin = wa_sender::app::admin(&settings).await?;
            let status = match &action {
                ConsentAction::OptIn { wa_id, target } => {
                    admin.opt_in(consent_change(wa_id, target)).await?
                }
                ConsentAction::OptOut { wa_id, target } => {
                    admin.opt_out(consent_change(wa_id, target)).await?
                }
                ConsentAction::Resume { wa_id, waba } => {
                    admin.resume(waba.as_deref(), wa_id).await?
                }
                ConsentAction::Import {
                    file,
                    waba,
                    source,
                    errors,
                } => {
                    return import_consent(
                        &admin,
                        file,
                        waba.as_deref(),
                        source.as_deref(),
                        errors.as_deref(),
                    )
                    .await;
                }
            };
            print_json(&status)
        }
        Command::Window {
            action: WindowAction::Open { number, wa_id, at },
        } => {
            let admin = wa_sender::app::admin(&settings).await?;
            print_json(&admin.open_window(&number, &wa_id, at.as_deref()).await?)
        }
        Command::Halt { action } => {
            let admin = wa_sender::app::admin(&settings).await?;
            match action {
                HaltAction::List => print_json(&admin.halts().await?),
                HaltAction::Resume { scope } => print_json(&admin.lift_halt(&scope).await?),
            }
        }
        Command::Dead { action } => {
            let admin = wa_sender::app::admin_with_queues(&settings).await?;
            match action {
                DeadAction::List {
                    selection,
                    since,
                    limit,
                } => {
                    let query = DeadQuery {
                        since: since.as_deref(),
                        ..dead_query(None, &selection)
                    };
                    print_json(&admin.dead_letters(&query, limit).await?)
                }
                DeadAction::Show { job_id } => match admin.dead_letter(&job_id).await? {
                    Some(letter) => print_json(&letter),
                    None => anyhow::bail!("no dead letter of job {job_id:?} in the dead queue"),
                },
                DeadAction::Replay {
                    job_id,
                    selection,
                    dry_run,
                    lane,
                } => {
                    let query = dead_query(job_id.as_deref(), &selection);
                    print_json(&admin.replay(&query, dry_run, lane).await?)
                }
            }
        }
        Command::Job { job_id, waba } => {
            let admin = wa_sender::app::admin_with_queues(&settings).await?;
            print_json(&admin.job(&job_id, waba.as_deref()).await?)
        }
    }
}

/// `wa-sender enqueue`: prints a one-line summary; fails with [`Unfinished`] when rows were
/// refused (exit 65) or a signal stopped it (exit 130).
async fn enqueue(settings: &Runtime, args: EnqueueArgs) -> anyhow::Result<()> {
    let options = enqueue_options(settings, args)?;
    let broker = if options.dry_run {
        None
    } else {
        Some(wa_sender::app::connect_broker(settings).await?)
    };
    let stop = shutdown_on_signal();
    let mut observer: Box<dyn Observer> = if std::io::stderr().is_terminal() {
        Box::new(Bar::new())
    } else {
        Box::new(Lines::new(std::time::Duration::from_secs(5)))
    };
    let result = enqueue::enqueue(
        broker
            .as_deref()
            .map(|b| b as &dyn wa_sender::broker::Broker),
        &options,
        &stop,
        observer.as_mut(),
    )
    .await;
    if let Some(broker) = &broker {
        broker.close().await;
    }
    let summary = result?;
    let resumed = summary
        .resumed_after
        .map(|l| format!(", resumed after line {l}"))
        .unwrap_or_default();
    let rejects = summary
        .rejects
        .as_ref()
        .map(|p| format!(" (rejects in {})", p.display()))
        .unwrap_or_default();
    let checkpoint = summary
        .checkpoint
        .map(|l| format!(", checkpoint at line {l}"))
        .unwrap_or_default();
    let verb = if options.dry_run {
        "dry run: would publish"
    } else {
        "published"
    };
    println!(
        "{verb} {} to lane {}, rejected {}{rejects} of {}{resumed}{checkpoint}, in {:.1} s ({:.0} jobs/s)",
        count(summary.published, "job", "jobs"),
        options.lane.as_str(),
        summary.rejected,
        count(summary.rows, "row", "rows"),
        summary.elapsed.as_secs_f64(),
        summary.rate(),
    );
    if options.dry_run && summary.published > 0 {
        // The registry of approved templates is the worker's (Redis, synced from Meta): a dry
        // run checks each row's schema and fields only.
        println!(
            "dry run: templates were not checked against the approved ones; the worker does, and dead-letters a mismatch (template_not_approved, template_params_invalid)"
        );
    }
    if summary.stopped {
        return Err(Unfinished::Stopped.into());
    }
    if summary.rejected > 0 {
        return Err(Unfinished::Rejected(summary.rejected).into());
    }
    Ok(())
}

/// An enqueue that ended without publishing every row.
#[derive(Debug, thiserror::Error)]
enum Unfinished {
    /// Some rows were refused (exit 65).
    #[error("{} rejected", count(*.0, "row was", "rows were"))]
    Rejected(u64),
    /// SIGINT/SIGTERM: what was sent is confirmed and checkpointed (exit 130).
    #[error("stopped; run the same command again to continue")]
    Stopped,
}

/// The typed options of `wa-sender enqueue`; bad values are argument errors (exit 64).
fn enqueue_options(settings: &Runtime, args: EnqueueArgs) -> Result<enqueue::Options, InputError> {
    let bad = |flag: &str, e: &dyn std::fmt::Display| InputError(format!("--{flag}: {e}"));
    let time = |flag: &str, value: Option<String>| {
        value
            .map(|v| {
                chrono::DateTime::parse_from_rfc3339(&v)
                    .map(|t| t.with_timezone(&chrono::Utc))
                    .map_err(|e| bad(flag, &format!("{v:?} is not an RFC 3339 time ({e})")))
            })
            .transpose()
    };
    let phone_number_id = match args.phone_number_id {
        Some(id) => Some(PhoneNumberId::parse(id).map_err(|e| bad("phone-number-id", &e))?),
        None if settings.numbers.len() == 1 => settings.numbers.keys().next().cloned(),
        None => None,
    };
    let defaults = Defaults {
        campaign: args
            .campaign
            .map(CampaignId::parse)
            .transpose()
            .map_err(|e| bad("campaign", &e))?,
        not_before: time("not-before", args.not_before)?,
        expires_at: time("expires-at", args.expires_at)?,
        phone_number_id,
    };
    let flags = Mapping {
        to_column: args.to_column,
        template: args.template,
        template_column: args.template_column,
        language: args.language,
        language_column: args.language_column,
        param_columns: args.param_columns,
        header_column: args.header_column,
        header_type: args.header_type,
        url_button_column: args.url_button_column,
        url_button_index: args.url_button_index,
        job_id_column: args.job_id_column,
    };
    let mapping = match &args.mapping {
        Some(path) => Mapping::load(path)?.overlaid(flags),
        None => flags,
    };
    let input = (args.file != "-").then(|| PathBuf::from(&args.file));
    if input.is_none() && args.checkpoint.is_none() && !args.dry_run {
        tracing::info!("reading stdin without --checkpoint: an interrupted run cannot resume");
    }
    Ok(enqueue::Options {
        format: args.format.unwrap_or_else(|| Format::of(input.as_deref())),
        input,
        lane: args.lane,
        defaults,
        mapping,
        rejects: args.rejects,
        checkpoint: args.checkpoint,
        restart: args.restart,
        dry_run: args.dry_run,
        window: args.window,
    })
}

/// Imports, prints a one-line summary, and fails with [`ImportError::Rejected`] (exit 65) when
/// some lines were skipped.
async fn import_consent(
    admin: &Admin,
    file: &Path,
    waba: Option<&str>,
    source: Option<&str>,
    errors: Option<&Path>,
) -> anyhow::Result<()> {
    let (waba, report) = import::import_file(admin, file, waba, source, errors).await?;
    let reasons = match errors {
        Some(path) if !report.rejected.is_empty() => format!(" (reasons in {})", path.display()),
        _ => String::new(),
    };
    println!(
        "imported {} opt-ins into WABA {waba}, skipped {} of {} lines{reasons}",
        report.imported,
        report.rejected.len(),
        report.lines,
    );
    Ok(report.check()?)
}

fn consent_change<'a>(wa_id: &'a str, target: &'a ConsentTarget) -> ConsentChange<'a> {
    ConsentChange {
        waba_id: target.waba.as_deref(),
        wa_id,
        source: target.source.as_deref(),
        at: None,
    }
}

fn dead_query<'a>(job_id: Option<&'a str>, selection: &'a DeadSelection) -> DeadQuery<'a> {
    DeadQuery {
        job_id,
        reason: selection.reason.as_deref(),
        campaign: selection.campaign.as_deref(),
        since: None,
    }
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Ok when the drain finished every job; otherwise how many it left to their queues.
fn finished(drained: Drained) -> anyhow::Result<()> {
    if drained.abandoned == 0 && drained.unsettled == 0 {
        return Ok(());
    }
    anyhow::bail!(
        "{} still in flight after the grace period and {} not settled; they return to their queues",
        count(drained.abandoned, "job was", "jobs were"),
        count(drained.unsettled, "job", "jobs"),
    )
}

/// `n` and the noun that goes with it: `1 job`, `2 jobs`.
fn count(n: impl TryInto<u64>, one: &str, many: &str) -> String {
    let n = n.try_into().unwrap_or(u64::MAX);
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The configured numbers, each with the default templates, as a scenario.
fn configured_scenario(settings: &Runtime) -> Scenario {
    let mut scenario = Scenario::single("106540352242922", "102290129340398", "");
    scenario.tokens.clear();
    // The quick start's user: reads everything (an unknown user reads with `read_share`), and
    // writes only when told to (`POST /_sim/actions`), which opens the care window at both ends.
    scenario.users.push(SimUser {
        name: "Sheena Nelson".into(),
        ..SimUser::new(QUICK_START_USER)
    });
    // People at a desk: delivered within a second, read within two (a scenario file sets any
    // other pace).
    scenario.webhooks.delivered_after = DelayRange {
        min_ms: 100,
        max_ms: 1_000,
    };
    scenario.webhooks.read_after = DelayRange {
        min_ms: 300,
        max_ms: 2_000,
    };
    if !settings.numbers.is_empty() {
        scenario.numbers = settings
            .numbers
            .iter()
            .map(|(id, n)| SimNumber {
                throughput_mps: Some(n.throughput_mps),
                ..SimNumber::new(id.as_str(), n.waba.as_str())
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

/// Bad settings, a bad scenario file or a bad admin argument: the operator's to fix, exit 64.
fn is_configuration_error(e: &anyhow::Error) -> bool {
    e.downcast_ref::<wa_sender::config::ConfigError>().is_some()
        || e.downcast_ref::<wa_sender::simulator::ScenarioError>()
            .is_some()
        || matches!(
            e.downcast_ref::<AdminError>(),
            Some(AdminError::Invalid { .. })
        )
        || matches!(
            e.downcast_ref::<ImportError>(),
            Some(ImportError::Argument(AdminError::Invalid { .. }))
        )
        || e.downcast_ref::<InputError>().is_some()
        || matches!(
            e.downcast_ref::<EnqueueError>(),
            Some(EnqueueError::Argument(_) | EnqueueError::Checkpoint(_))
        )
}

/// An import whose file is unreadable, has a bad header or has bad lines: exit 65.
fn is_data_error(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<ImportError>(),
        Some(ImportError::Read { .. } | ImportError::Header(_) | ImportError::Rejected { .. })
    ) || matches!(
        e.downcast_ref::<Unfinished>(),
        Some(Unfinished::Rejected(_))
    ) || matches!(
        e.downcast_ref::<EnqueueError>(),
        Some(EnqueueError::Read { .. })
    )
}
