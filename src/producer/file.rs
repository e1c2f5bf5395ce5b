//! `wa-sender enqueue`: reads JSONL or CSV on a thread of its own (reading and validating
//! overlap with publishing), publishes the valid rows through a [`Producer`], writes the
//! refused ones to a reject file, reports progress, and keeps a checkpoint so an interrupted
//! run started again with the same arguments continues after the last line it finished.

use std::io::{BufRead as _, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use csv::StringRecord;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Producer;
use super::checkpoint::{CheckpointError, CheckpointFile};
use super::input::{CsvColumns, Defaults, Format, InputError, Mapping, Raw, Rejected, Row};
use crate::broker::{Broker, BrokerError};
use crate::job::Lane;

/// Rows the reader hands over at a time.
const BATCH: usize = 512;
/// How often at most the checkpoint file is rewritten while confirms come in.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// What to enqueue and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// The input file; `None` for stdin.
    pub input: Option<PathBuf>,
    /// Its format.
    pub format: Format,
    /// The lane every job goes to.
    pub lane: Lane,
    /// What each job gets unless it names its own.
    pub defaults: Defaults,
    /// CSV columns to job fields.
    pub mapping: Mapping,
    /// The reject file (default: beside the input, `<input>.rejects.{csv,jsonl}`).
    pub rejects: Option<PathBuf>,
    /// The checkpoint file (default: beside the input, `<input>.checkpoint`; none for stdin).
    pub checkpoint: Option<PathBuf>,
    /// Start from the first line even if a checkpoint says otherwise.
    pub restart: bool,
    /// Validate only: publish nothing, leave the checkpoint alone.
    pub dry_run: bool,
    /// Unconfirmed publishes at most.
    pub window: usize,
}

impl Options {
    fn rejects_path(&self) -> Option<PathBuf> {
        let ext = match self.format {
            Format::Csv => "rejects.csv",
            Format::Jsonl => "rejects.jsonl",
        };
        self.rejects
            .clone()
            .or_else(|| self.input.as_deref().map(|p| beside(p, ext)))
    }

    fn checkpoint(&self) -> Option<CheckpointFile> {
        let path = self
            .checkpoint
            .clone()
            .or_else(|| self.input.as_deref().map(|p| beside(p, "checkpoint")))?;
        let input = match &self.input {
            Some(p) => std::fs::canonicalize(p)
                .unwrap_or_else(|_| p.clone())
                .display()
                .to_string(),
            None => "-".into(),
        };
        let campaign = self.defaults.campaign.as_ref().map_or("-", |c| c.as_str());
        let run = format!(
            "input={input} lane={} campaign={campaign}",
            self.lane.as_str()
        );
        Some(CheckpointFile::new(path, run))
    }
}

/// `<path>.<suffix>`.
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".");
    name.push(suffix);
    PathBuf::from(name)
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Rows read this run (not counting those skipped as done before).
    pub rows: u64,
    /// Jobs published and confirmed (valid ones, for a dry run).
    pub published: u64,
    /// Rows refused.
    pub rejected: u64,
    /// The line an earlier run had finished, that this one continued after.
    pub resumed_after: Option<u64>,
    /// The checkpoint's line at the end.
    pub checkpoint: Option<u64>,
    /// Where the rejects are, if any were written.
    pub rejects: Option<PathBuf>,
    /// Stopped by a signal before the end of the input (rerun to continue).
    pub stopped: bool,
    /// From the first publish to the last confirm.
    pub elapsed: Duration,
}

impl Summary {
    /// Jobs per second.
    pub fn rate(&self) -> f64 {
        self.published as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    /// Bad arguments or mapping, an unreadable input, a header that does not fit: nothing was
    /// published.
    #[error(transparent)]
    Argument(#[from] InputError),
    /// The checkpoint could not be read or written, or belongs to another run.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The input could not be read to its end; what was read before was handled.
    #[error("cannot read {path} after line {line}: {detail}")]
    Read {
        /// The input.
        path: String,
        /// The last line read.
        line: u64,
        /// The cause.
        detail: String,
    },
    /// The reject file could not be written.
    #[error("cannot write the rejects to {path}: {detail}")]
    Rejects {
        /// The reject file.
        path: String,
        /// The cause.
        detail: String,
    },
    /// The broker failed or refused a job. Every line up to `checkpoint` is on the queue; run
    /// again with the same arguments to continue.
    #[error(
        "the broker failed after {published} jobs were confirmed (checkpoint at line {}): {source}",
        checkpoint.map_or("none".to_owned(), |l| l.to_string())
    )]
    Broker {
        /// Jobs confirmed this run.
        published: u64,
        /// The checkpoint's line.
        checkpoint: Option<u64>,
        /// The cause.
        source: BrokerError,
    },
}

/// How far a run is.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// Input bytes read.
    pub bytes: u64,
    /// The input's size, when it is a file.
    pub total_bytes: Option<u64>,
    /// Jobs sent (confirmed or about to be).
    pub published: u64,
    /// Rows refused.
    pub rejected: u64,
    /// Since the run started.
    pub elapsed: Duration,
}

/// Told about a run as it goes.
pub trait Observer: Send {
    /// A row was refused.
    fn rejected(&mut self, _row: &Rejected) {}
    /// Another batch was handled.
    fn progress(&mut self, _progress: &Progress) {}
    /// The run ended.
    fn finish(&mut self) {}
}

/// Observes nothing (tests, benches).
impl Observer for () {}

/// A progress bar with rate and ETA on a terminal's stderr; each refused row printed above it.
pub struct Bar(ProgressBar);

impl Bar {
    /// A bar on stderr.
    pub fn new() -> Self {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {percent:>3}% {msg}, eta {eta}")
                .expect("a valid template"),
        );
        Bar(bar)
    }
}

impl Default for Bar {
    fn default() -> Self {
        Self::new()
    }
}

impl Observer for Bar {
    fn rejected(&mut self, row: &Rejected) {
        self.0
            .suspend(|| eprintln!("line {}: {}", row.line, row.reason));
    }
    fn progress(&mut self, p: &Progress) {
        if let Some(total) = p.total_bytes {
            self.0.set_length(total);
        }
        self.0.set_position(p.bytes);
        self.0.set_message(format!(
            "{} published, {} rejected, {:.0}/s",
            p.published,
            p.rejected,
            p.published as f64 / p.elapsed.as_secs_f64().max(1e-9)
        ));
    }
    fn finish(&mut self) {
        self.0.finish_and_clear();
    }
}

/// Plain progress lines on stderr every `every` (logs, pipes); each refused row on its own line.
pub struct Lines {
    every: Duration,
    last: Option<Instant>,
}

impl Lines {
    /// A line at most every `every`.
    pub fn new(every: Duration) -> Self {
        Lines { every, last: None }
    }
}

impl Observer for Lines {
    fn rejected(&mut self, row: &Rejected) {
        eprintln!("line {}: {}", row.line, row.reason);
    }
    fn progress(&mut self, p: &Progress) {
        let now = Instant::now();
        if self.last.is_some_and(|l| now - l < self.every) {
            return;
        }
        if self.last.is_none() {
            // The first batch: the clock starts.
            self.last = Some(now);
            return;
        }
        self.last = Some(now);
        let rate = p.published as f64 / p.elapsed.as_secs_f64().max(1e-9);
        let done = match p.total_bytes {
            Some(total) if total > 0 => {
                let share = p.bytes as f64 / total as f64;
                let eta = p.elapsed.as_secs_f64() * (1.0 - share) / share.max(1e-9);
                format!(" ({:.0}%, eta {:.0} s)", share * 100.0, eta)
            }
            _ => String::new(),
        };
        eprintln!(
            "enqueue: {} published, {} rejected, {rate:.0}/s{done}",
            p.published, p.rejected
        );
    }
}

/// What the reader thread hands over.
enum Batch {
    Rows { rows: Vec<Row>, bytes: u64 },
    Failed { line: u64, detail: String },
}

/// The input opened and, for CSV, its header read and the mapping resolved.
enum Reader {
    Jsonl(Box<dyn std::io::BufRead + Send>),
    Csv {
        reader: csv::Reader<Box<dyn Read + Send>>,
        columns: Box<CsvColumns>,
    },
}

impl Reader {
    fn open(options: &Options) -> Result<(Reader, Option<u64>), InputError> {
        let (input, size): (Box<dyn Read + Send>, _) = match &options.input {
            Some(path) => {
                let file = std::fs::File::open(path)
                    .map_err(|e| InputError(format!("cannot open {}: {e}", path.display())))?;
                let size = file.metadata().ok().map(|m| m.len());
                (Box::new(file), size)
            }
            None => (Box::new(std::io::stdin()), None),
        };
        let input = std::io::BufReader::with_capacity(1 << 16, input);
        let reader = match options.format {
            Format::Jsonl => Reader::Jsonl(Box::new(input)),
            Format::Csv => {
                let mut reader = csv::ReaderBuilder::new()
                    // Field counts are checked per row, so a short row is refused, not fatal.
                    .flexible(true)
                    .from_reader(Box::new(input) as Box<dyn Read + Send>);
                let header = reader
                    .headers()
                    .map_err(|e| InputError(format!("line 1: {e}")))?
                    .clone();
                let columns = CsvColumns::new(&header, &options.mapping, &options.defaults)?;
                Reader::Csv {
                    reader,
                    columns: Box::new(columns),
                }
            }
        };
        Ok((reader, size))
    }

    /// The CSV header (for the reject file).
    fn header(&mut self) -> Option<StringRecord> {
        match self {
            Reader::Csv { reader, .. } => reader.headers().ok().cloned(),
            Reader::Jsonl(_) => None,
        }
    }

    /// Reads every row after line `skip` into `tx`, [`BATCH`] at a time, until the input ends
    /// or the receiver is gone.
    fn read(self, defaults: &Defaults, skip: u64, tx: &mpsc::Sender<Batch>) {
        let mut rows = Vec::with_capacity(BATCH);
        let mut bytes = 0u64;
        let send = |rows: &mut Vec<Row>, bytes: u64| {
            let rows = std::mem::replace(rows, Vec::with_capacity(BATCH));
            tx.blocking_send(Batch::Rows { rows, bytes }).is_ok()
        };
        match self {
            Reader::Jsonl(mut input) => {
                let mut text = String::new();
                let mut line = 0u64;
                loop {
                    text.clear();
                    match input.read_line(&mut text) {
                        Ok(0) => break,
                        Ok(n) => bytes += n as u64,
                        Err(e) => {
                            let _ = tx.blocking_send(Batch::Failed {
                                line,
                                detail: e.to_string(),
                            });
                            return;
                        }
                    }
                    line += 1;
                    let job = text.trim();
                    if line <= skip || job.is_empty() {
                        continue;
                    }
                    rows.push(super::input::jsonl_row(line, job, defaults));
                    if rows.len() == BATCH && !send(&mut rows, bytes) {
                        return;
                    }
                }
            }
            Reader::Csv {
                mut reader,
                columns,
            } => {
                let mut record = StringRecord::new();
                loop {
                    let row = match reader.read_record(&mut record) {
                        Ok(false) => break,
                        Ok(true) => {
                            let line = record.position().map_or(0, |p| p.line());
                            (line > skip).then(|| columns.row(line, &record))
                        }
                        // Invalid UTF-8 spoils one row; the reader has moved past it.
                        Err(e) if matches!(e.kind(), csv::ErrorKind::Utf8 { .. }) => {
                            let line = e.position().map_or(0, |p| p.line());
                            (line > skip).then(|| {
                                Row::Rejected(Rejected {
                                    line,
                                    reason: "the row is not valid UTF-8".into(),
                                    raw: Raw::Fields(Vec::new()),
                                })
                            })
                        }
                        Err(e) => {
                            let line = e.position().map_or(0, |p| p.line());
                            let _ = tx.blocking_send(Batch::Failed {
                                line,
                                detail: e.to_string(),
                            });
                            return;
                        }
                    };
                    bytes = reader.position().byte();
                    if let Some(row) = row {
                        rows.push(row);
                        if rows.len() == BATCH && !send(&mut rows, bytes) {
                            return;
                        }
                    }
                }
            }
        }
        if !rows.is_empty() {
            send(&mut rows, bytes);
        }
    }
}

/// The reject file, created at the first refused row: CSV (`line`, `error`, then the input's
/// columns) or JSONL (`{"line", "error", "input"}`). Appended to when the run resumes.
struct Rejects {
    path: Option<PathBuf>,
    append: bool,
    header: Option<StringRecord>,
    writer: Option<RejectWriter>,
}

enum RejectWriter {
    Csv(Box<csv::Writer<std::fs::File>>),
    Jsonl(std::io::BufWriter<std::fs::File>),
}

impl Rejects {
    fn write(&mut self, row: &Rejected) -> Result<(), EnqueueError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let failed = |e: &dyn std::fmt::Display| EnqueueError::Rejects {
            path: path.display().to_string(),
            detail: e.to_string(),
        };
        if self.writer.is_none() {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(self.append)
                .truncate(!self.append)
                .open(path)
                .map_err(|e| failed(&e))?;
            let empty = file.metadata().map(|m| m.len() == 0).unwrap_or(true);
            self.writer = Some(match &self.header {
                Some(header) => {
                    // A refused row may have any number of fields.
                    let mut writer = csv::WriterBuilder::new().flexible(true).from_writer(file);
                    if empty {
                        let mut columns = StringRecord::from(vec!["line", "error"]);
                        columns.extend(header.iter());
                        writer.write_record(&columns).map_err(|e| failed(&e))?;
                    }
                    RejectWriter::Csv(Box::new(writer))
                }
                None => RejectWriter::Jsonl(std::io::BufWriter::new(file)),
            });
        }
        match (self.writer.as_mut().expect("opened above"), &row.raw) {
            (RejectWriter::Csv(writer), Raw::Fields(fields)) => {
                let line = row.line.to_string();
                let mut record = vec![line.as_str(), row.reason.as_str()];
                record.extend(fields.iter().map(String::as_str));
                writer.write_record(&record).map_err(|e| failed(&e))
            }
            (RejectWriter::Jsonl(writer), raw) => {
                let input = match raw {
                    Raw::Line(text) => text.clone(),
                    Raw::Fields(fields) => fields.join(","),
                };
                let entry =
                    serde_json::json!({"line": row.line, "error": row.reason, "input": input});
                serde_json::to_writer(&mut *writer, &entry).map_err(|e| failed(&e))?;
                std::io::Write::write_all(writer, b"\n").map_err(|e| failed(&e))
            }
            (RejectWriter::Csv(_), Raw::Line(_)) => unreachable!("CSV rows have fields"),
        }
    }

    fn finish(&mut self) -> Result<Option<PathBuf>, EnqueueError> {
        let Some(writer) = self.writer.take() else {
            return Ok(None);
        };
        let flushed = match writer {
            RejectWriter::Csv(mut w) => w.flush(),
            RejectWriter::Jsonl(mut w) => std::io::Write::flush(&mut w),
        };
        let path = self.path.clone().expect("a writer has a path");
        flushed.map_err(|e| EnqueueError::Rejects {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        Ok(Some(path))
    }
}

/// Enqueues `options.input`: every row validated, the valid ones published on `broker` (none
/// for a dry run), the refused ones written to the reject file, the checkpoint kept up to date.
/// Stops early, cleanly, when `stop` is cancelled: everything sent is confirmed first and the
/// checkpoint records it.
pub async fn enqueue(
    broker: Option<&dyn Broker>,
    options: &Options,
    stop: &CancellationToken,
    observer: &mut dyn Observer,
) -> Result<Summary, EnqueueError> {
    let checkpoint = if options.dry_run {
        None
    } else {
        options.checkpoint()
    };
    let resumed_after = match &checkpoint {
        Some(c) if options.restart => {
            c.remove()?;
            None
        }
        Some(c) => c.load()?,
        None => None,
    };
    let (mut reader, total_bytes) = Reader::open(options)?;
    let mut rejects = Rejects {
        path: options.rejects_path(),
        append: resumed_after.is_some(),
        header: reader.header(),
        writer: None,
    };
    let (tx, mut rx) = mpsc::channel(8);
    let defaults = options.defaults.clone();
    let skip = resumed_after.unwrap_or(0);
    let reading = tokio::task::spawn_blocking(move || reader.read(&defaults, skip, &tx));

    let broker = if options.dry_run { None } else { broker };
    let mut producer = broker.map(|b| Producer::new(b, options.window));
    let started = Instant::now();
    let mut summary = Summary {
        resumed_after,
        checkpoint: resumed_after,
        ..Summary::default()
    };
    let mut progress = Progress {
        total_bytes,
        ..Progress::default()
    };
    let mut saved_at = Instant::now();
    let outcome: Result<(), EnqueueError> = async {
        loop {
            let batch = tokio::select! {
                biased;
                _ = stop.cancelled() => {
                    summary.stopped = true;
                    break;
                }
                batch = rx.recv() => batch,
            };
            let rows = match batch {
                None => break,
                Some(Batch::Rows { rows, bytes }) => {
                    progress.bytes = bytes;
                    rows
                }
                Some(Batch::Failed { line, detail }) => {
                    return Err(EnqueueError::Read {
                        path: options
                            .input
                            .as_ref()
                            .map_or("stdin".into(), |p| p.display().to_string()),
                        line,
                        detail,
                    });
                }
            };
            for row in rows {
                summary.rows += 1;
                match (row, producer.as_mut()) {
                    (Row::Job(job), Some(producer)) => {
                        producer
                            .publish(options.lane, Some(&job.job_id), job.body, job.line)
                            .await
                            .map_err(|source| broker_failed(producer, source))?;
                    }
                    (Row::Job(_), None) => summary.published += 1,
                    (Row::Rejected(rejected), producer) => {
                        summary.rejected += 1;
                        observer.rejected(&rejected);
                        rejects.write(&rejected)?;
                        if let Some(producer) = producer {
                            producer
                                .pass(rejected.line)
                                .map_err(|source| broker_failed(producer, source))?;
                        }
                    }
                }
            }
            if let Some(p) = &producer {
                progress.published = p.published();
            } else {
                progress.published = summary.published;
            }
            progress.rejected = summary.rejected;
            progress.elapsed = started.elapsed();
            observer.progress(&progress);
            if let (Some(c), Some(p)) = (&checkpoint, &producer)
                && saved_at.elapsed() >= CHECKPOINT_EVERY
                && p.confirmed() > summary.checkpoint
            {
                c.save(p.confirmed().expect("greater than something"))?;
                summary.checkpoint = p.confirmed();
                saved_at = Instant::now();
            }
        }
        if let Some(p) = producer.as_mut() {
            p.flush().await.map_err(|source| broker_failed(p, source))?;
        }
        Ok(())
    }
    .await;
    // The reader stops at its next batch once nobody receives.
    drop(rx);
    let _ = reading.await;
    observer.finish();
    if let Some(p) = &producer {
        summary.published = p.confirmed_jobs();
        // CORRECTNESS: only lines whose publish (and every earlier one) was confirmed are
        // recorded, also after a failure: a rerun sends again what may be missing, never skips it.
        if let Some(c) = &checkpoint
            && p.confirmed() > summary.checkpoint
        {
            c.save(p.confirmed().expect("greater than something"))?;
            summary.checkpoint = p.confirmed();
        }
    }
    summary.rejects = rejects.finish()?;
    summary.elapsed = started.elapsed();
    outcome.map(|()| summary)
}

fn broker_failed(producer: &Producer<'_>, source: BrokerError) -> EnqueueError {
    EnqueueError::Broker {
        published: producer.confirmed_jobs(),
        checkpoint: producer.confirmed(),
        source,
    }
}
