//! Opt-ins from a CSV file (`wa-sender consent import`). [`Rows`] is a pure parser: each line
//! becomes an opt-in or the reason it was refused, so one bad line never stops the file.
//! [`import`] records the good ones in batches of [`BATCH`], one store round trip each.
//!
//! The file has a header row naming its columns, in any order: `wa_id` (required),
//! `opted_in_at` (RFC 3339; default: the start of the import) and `source` (default
//! `csv:<file name>`).

use std::fmt;
use std::io::Read;
use std::path::Path;

use chrono::{DateTime, Utc};
use csv::StringRecord;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::{Admin, AdminError, parse_source, parse_time, parse_wa_id};
use crate::ids::{WaId, WabaId};
use crate::policy::admission::Mark;
use crate::store::{Store, StoreError};

/// Opt-ins written per store round trip.
pub const BATCH: usize = 1000;
/// The columns a file may have.
pub const COLUMNS: [&str; 3] = ["wa_id", "opted_in_at", "source"];

/// One data line: an opt-in to record, or why it was refused.
pub type Line = Result<(WaId, Mark), LineError>;

/// A line that was not imported, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    /// Its line number in the file (the header is line 1).
    pub line: u64,
    /// Its `wa_id` field as written (empty when missing).
    pub wa_id: String,
    /// What is wrong, naming the field.
    pub reason: String,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

/// Why a file could not be imported (or, for [`ImportError::Rejected`], not all of it).
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file could not be opened or read; lines before the failure may have been imported.
    #[error("cannot read {path}: {detail}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        detail: String,
    },
    /// The header row is missing, lacks `wa_id`, or names a column not in [`COLUMNS`]:
    /// nothing was imported.
    #[error("{0}")]
    Header(String),
    /// An argument is invalid: the portfolio is missing where it must be given or is not
    /// configured, or the default source is unusable. Nothing was imported.
    #[error(transparent)]
    Argument(AdminError),
    /// The store failed after `imported` opt-ins were recorded. Importing the file again is
    /// safe: a later opt-in replaces an earlier one.
    #[error(
        "the store failed after {imported} opt-ins were imported (importing the file again is safe): {source}"
    )]
    Store {
        /// Opt-ins recorded before the failure.
        imported: u64,
        /// The cause.
        source: StoreError,
    },
    /// The error report could not be written (the import itself went through).
    #[error("cannot write the error report {path}: {detail}")]
    Report {
        /// The report file.
        path: String,
        /// The cause.
        detail: String,
    },
    /// Some lines were rejected and skipped; the others were imported.
    #[error("{rejected} of {lines} lines were rejected")]
    Rejected {
        /// Lines skipped.
        rejected: usize,
        /// Data lines in the file.
        lines: u64,
    },
}

/// Where each column is in a record.
#[derive(Debug)]
struct Columns {
    wa_id: usize,
    opted_in_at: Option<usize>,
    source: Option<usize>,
    count: usize,
}

impl Columns {
    fn from_header(header: &StringRecord) -> Result<Columns, ImportError> {
        let names: Vec<String> = header
            .iter()
            .map(|h| h.trim_start_matches('\u{feff}').trim().to_ascii_lowercase())
            .collect();
        if names.iter().all(String::is_empty) {
            return Err(ImportError::Header(format!(
                "the file has no header row; its first line must name the columns ({})",
                COLUMNS.join(", ")
            )));
        }
        for (i, name) in names.iter().enumerate() {
            // An unknown column is refused rather than ignored: `opted_at` ignored would
            // silently date every opt-in to the import, and consent is evidence.
            if !COLUMNS.contains(&name.as_str()) {
                return Err(ImportError::Header(format!(
                    "line 1: unknown column {name:?} (columns: {})",
                    COLUMNS.join(", ")
                )));
            }
            if names[..i].contains(name) {
                return Err(ImportError::Header(format!(
                    "line 1: column {name:?} appears twice"
                )));
            }
        }
        let find = |column: &str| names.iter().position(|n| n == column);
        Ok(Columns {
            wa_id: find("wa_id").ok_or_else(|| {
                ImportError::Header("line 1: the header has no wa_id column".into())
            })?,
            opted_in_at: find("opted_in_at"),
            source: find("source"),
            count: names.len(),
        })
    }
}

/// The opt-ins of a CSV file, one line at a time.
pub struct Rows<R> {
    reader: csv::Reader<R>,
    columns: Columns,
    default_source: String,
    now: DateTime<Utc>,
    record: StringRecord,
    lines: u64,
    failure: Option<csv::Error>,
}

impl<R: Read> Rows<R> {
    /// Reads the header row. Lines without `opted_in_at` are dated `now`; lines without
    /// `source` get `default_source`.
    pub fn new(input: R, default_source: &str, now: DateTime<Utc>) -> Result<Self, ImportError> {
        let mut reader = csv::ReaderBuilder::new()
            // Column counts are checked per line, so a short line is reported, not fatal.
            .flexible(true)
            .from_reader(input);
        let header = reader
            .headers()
            .map_err(|e| ImportError::Header(format!("line 1: {e}")))?;
        let columns = Columns::from_header(header)?;
        Ok(Rows {
            reader,
            columns,
            default_source: default_source.to_owned(),
            now,
            record: StringRecord::new(),
            lines: 0,
            failure: None,
        })
    }

    /// Bytes read so far (for a progress bar).
    pub fn bytes_read(&self) -> u64 {
        self.reader.position().byte()
    }

    /// Data lines seen so far.
    pub fn lines(&self) -> u64 {
        self.lines
    }

    /// The read error that ended the rows early, if one did.
    pub fn take_failure(&mut self) -> Option<csv::Error> {
        self.failure.take()
    }

    fn parse(&self, line: u64) -> Result<(WaId, Mark), LineError> {
        let record = &self.record;
        let raw = record.get(self.columns.wa_id).unwrap_or_default().trim();
        let error = |reason: String| LineError {
            line,
            wa_id: raw.to_owned(),
            reason,
        };
        if record.len() != self.columns.count {
            return Err(error(format!(
                "{} fields, the header has {}",
                record.len(),
                self.columns.count
            )));
        }
        let wa_id = parse_wa_id(raw).map_err(error)?;
        let cell = |i: Option<usize>| i.and_then(|i| record.get(i)).map(str::trim);
        let at = match cell(self.columns.opted_in_at).filter(|t| !t.is_empty()) {
            Some(text) => parse_time("opted_in_at", text, self.now).map_err(error)?,
            None => self.now,
        };
        let source =
            parse_source(cell(self.columns.source), &self.default_source).map_err(error)?;
        Ok((wa_id, Mark { at, source }))
    }
}

impl<R: Read> Iterator for Rows<R> {
    type Item = Line;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failure.is_some() {
            return None;
        }
        match self.reader.read_record(&mut self.record) {
            Ok(false) => None,
            Ok(true) => {
                self.lines += 1;
                let line = self.record.position().map_or(0, |p| p.line());
                Some(self.parse(line))
            }
            // Invalid UTF-8 spoils one line; the reader has moved past it.
            Err(e) if matches!(e.kind(), csv::ErrorKind::Utf8 { .. }) => {
                self.lines += 1;
                Some(Err(LineError {
                    line: e.position().map_or(0, |p| p.line()),
                    wa_id: String::new(),
                    reason: "the line is not valid UTF-8".into(),
                }))
            }
            Err(e) => {
                self.failure = Some(e);
                None
            }
        }
    }
}

/// Parses a whole file held in memory (tests, small files).
pub fn parse(
    text: &str,
    default_source: &str,
    now: DateTime<Utc>,
) -> Result<Vec<Line>, ImportError> {
    Ok(Rows::new(text.as_bytes(), default_source, now)?.collect())
}

/// What an import did.
#[derive(Debug, Default)]
pub struct Report {
    /// Opt-ins recorded.
    pub imported: u64,
    /// Lines skipped, in file order.
    pub rejected: Vec<LineError>,
    /// Data lines in the file.
    pub lines: u64,
}

impl Report {
    /// `Ok` when every line was imported, else [`ImportError::Rejected`].
    pub fn check(&self) -> Result<(), ImportError> {
        if self.rejected.is_empty() {
            Ok(())
        } else {
            Err(ImportError::Rejected {
                rejected: self.rejected.len(),
                lines: self.lines,
            })
        }
    }
}

/// Told about an import as it goes (a progress bar, a line report).
pub trait Observer {
    /// A line was skipped.
    fn rejected(&mut self, _error: &LineError) {}
    /// A batch was written: `imported` in all so far, `bytes` of the file read.
    fn written(&mut self, _imported: u64, _bytes: u64) {}
}

/// Observes nothing.
impl Observer for () {}

/// Records the opt-ins of `rows` for `waba`, [`BATCH`] per round trip, skipping bad lines.
pub async fn import<R: Read>(
    store: &dyn Store,
    waba: &WabaId,
    rows: &mut Rows<R>,
    observer: &mut dyn Observer,
) -> Result<Report, ImportError> {
    let mut report = Report::default();
    let mut batch = Vec::with_capacity(BATCH);
    // Rows reads the file synchronously; a batch is a few hundred kilobytes at most, and this
    // runs in a CLI process with nothing else on the runtime to hold up.
    loop {
        let done = match rows.next() {
            Some(Ok(opt_in)) => {
                batch.push(opt_in);
                false
            }
            Some(Err(e)) => {
                observer.rejected(&e);
                report.rejected.push(e);
                false
            }
            None => true,
        };
        if batch.len() == BATCH || (done && !batch.is_empty()) {
            store
                .record_opt_ins(waba, &batch)
                .await
                .map_err(|source| ImportError::Store {
                    imported: report.imported,
                    source,
                })?;
            report.imported += batch.len() as u64;
            batch.clear();
            observer.written(report.imported, rows.bytes_read());
        }
        if done {
            break;
        }
    }
    report.lines = rows.lines();
    if let Some(e) = rows.take_failure() {
        return Err(ImportError::Read {
            path: "the input".into(),
            detail: format!("{e} (after {} opt-ins were imported)", report.imported),
        });
    }
    Ok(report)
}

/// A progress bar by bytes on stderr (hidden when stderr is not a terminal) that prints each
/// rejected line above it.
struct Progress(ProgressBar);

impl Observer for Progress {
    fn rejected(&mut self, error: &LineError) {
        self.0.suspend(|| eprintln!("{error}"));
    }

    fn written(&mut self, imported: u64, bytes: u64) {
        self.0.set_position(bytes);
        self.0.set_message(format!("{imported} imported"));
    }
}

/// `wa-sender consent import`: imports `path` for the portfolio `waba_id` (may be left out
/// when one is configured), reports each bad line on stderr, and writes them as CSV to
/// `errors` when given.
pub async fn import_file(
    admin: &Admin,
    path: &Path,
    waba_id: Option<&str>,
    source: Option<&str>,
    errors: Option<&Path>,
) -> Result<(WabaId, Report), ImportError> {
    let waba = admin.waba(waba_id).map_err(ImportError::Argument)?;
    let read_error = |e: std::io::Error| ImportError::Read {
        path: path.display().to_string(),
        detail: e.to_string(),
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let size = file.metadata().map_err(read_error)?.len();
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let default_source = parse_source(source, &format!("csv:{name}")).map_err(|e| {
        ImportError::Argument(AdminError::Invalid {
            field: "source",
            problem: e,
        })
    })?;
    let mut rows = Rows::new(std::io::BufReader::new(file), &default_source, super::now())?;
    let bar = ProgressBar::with_draw_target(Some(size), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {msg}")
            .expect("a valid template"),
    );
    let mut progress = Progress(bar);
    let result = import(admin.store(), &waba, &mut rows, &mut progress).await;
    progress.0.finish_and_clear();
    let report = result.map_err(|e| match e {
        ImportError::Read { detail, .. } => ImportError::Read {
            path: path.display().to_string(),
            detail,
        },
        other => other,
    })?;
    if let Some(errors) = errors {
        write_errors(errors, &report.rejected).map_err(|e| ImportError::Report {
            path: errors.display().to_string(),
            detail: e.to_string(),
        })?;
    }
    Ok((waba, report))
}

/// Writes the rejected lines as CSV: `line,wa_id,error`.
pub fn write_errors(path: &Path, rejected: &[LineError]) -> Result<(), csv::Error> {
    let mut writer = csv::Writer::from_path(path)?;
    writer.write_record(["line", "wa_id", "error"])?;
    for e in rejected {
        writer.write_record([e.line.to_string().as_str(), &e.wa_id, &e.reason])?;
    }
    writer.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2025-05-01T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn rejected(text: &str) -> Vec<(u64, String)> {
        parse(text, "csv:test.csv", now())
            .unwrap()
            .into_iter()
            .filter_map(Result::err)
            .map(|e| (e.line, e.reason))
            .collect()
    }

    #[test]
    fn good_lines_take_defaults_for_missing_time_and_source() {
        let rows = parse(
            "source,wa_id,opted_in_at\n\
             web-form,+16505551234,2025-04-30T08:00:00Z\n\
             ,4915112345678,\n",
            "csv:test.csv",
            now(),
        )
        .unwrap();
        let rows: Vec<_> = rows.into_iter().map(Result::unwrap).collect();
        assert_eq!(rows[0].0.as_str(), "16505551234");
        assert_eq!(rows[0].1.source, "web-form");
        assert_eq!(rows[0].1.at.to_rfc3339(), "2025-04-30T08:00:00+00:00");
        assert_eq!(rows[1].1.source, "csv:test.csv");
        assert_eq!(rows[1].1.at, now());
    }

    #[test]
    fn each_bad_line_is_reported_with_its_number_and_reason() {
        let text = "wa_id,opted_in_at\n\
                    16505551234,2025-04-30T08:00:00Z\n\
                    12ab,2025-04-30T08:00:00Z\n\
                    16505551235,last tuesday\n\
                    ,2025-04-30T08:00:00Z\n\
                    16505551236\n\
                    16505551237,2025-04-30T08:00:00Z,extra\n\
                    16505551238,2030-01-01T00:00:00Z\n\
                    \"1650555\n1239\",2025-04-30T08:00:00Z\n\
                    16505551240,\n";
        let got = rejected(text);
        let lines: Vec<u64> = got.iter().map(|(l, _)| *l).collect();
        assert_eq!(lines, [3, 4, 5, 6, 7, 8, 9], "{got:#?}");
        let expect = [
            "wa_id \"12ab\" is not a valid phone number",
            "opted_in_at \"last tuesday\" is not an RFC 3339 time",
            "wa_id is missing",
            "1 fields, the header has 2",
            "3 fields, the header has 2",
            "opted_in_at \"2030-01-01T00:00:00Z\" is in the future",
            "is not a valid phone number",
        ];
        for ((_, reason), want) in got.iter().zip(expect) {
            assert!(reason.contains(want), "{reason:?} should say {want:?}");
        }
        let good = parse(text, "s", now())
            .unwrap()
            .into_iter()
            .filter(Result::is_ok)
            .count();
        assert_eq!(good, 2, "the lines after bad ones are still read");
    }

    #[test]
    fn a_bad_header_rejects_the_file() {
        for (text, want) in [
            ("", "no header row"),
            ("phone\n16505551234\n", "unknown column \"phone\""),
            ("opted_in_at\n2025-04-30T08:00:00Z\n", "no wa_id column"),
            ("wa_id,WA_ID\n1,2\n", "appears twice"),
        ] {
            let err = parse(text, "s", now()).expect_err(text);
            assert!(err.to_string().contains(want), "{err} should say {want}");
        }
        // A UTF-8 byte-order mark and capitals in the header are fine.
        assert_eq!(
            parse("\u{feff}WA_ID\n16505551234\n", "s", now())
                .unwrap()
                .len(),
            1
        );
    }
}
