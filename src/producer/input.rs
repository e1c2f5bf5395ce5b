//! What `wa-sender enqueue` reads: JSONL (one job per line) or CSV (columns mapped to a
//! template job), each row turned into a job body and validated by the job decoder
//! ([`crate::job::decode`]) before anything is published. Pure: no I/O beyond the mapping file.
//!
//! Every job gets a stable `job_id`: its own, a CSV column's, or `<campaign>-<line>`, so a run
//! restarted over the same file publishes the same ids (the worker sends a `job_id` once).

use std::path::Path;

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use csv::StringRecord;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::ids::{CampaignId, PhoneNumberId};
use crate::job::SCHEMA_V1;

/// The input's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON job (`wa.send.v1`) per line; blank lines are skipped.
    Jsonl,
    /// A header row, then one template job per row (see [`Mapping`]).
    Csv,
}

impl Format {
    /// `.csv` files are CSV, anything else (stdin included) JSONL.
    pub fn of(path: Option<&Path>) -> Format {
        match path.and_then(Path::extension) {
            Some(ext) if ext.eq_ignore_ascii_case("csv") => Format::Csv,
            _ => Format::Jsonl,
        }
    }
}

/// What every job gets unless it names its own.
#[derive(Debug, Clone, Default)]
pub struct Defaults {
    /// `campaign_id`, and the prefix of derived job ids (`<campaign>-<line>`).
    pub campaign: Option<CampaignId>,
    /// `not_before`.
    pub not_before: Option<DateTime<Utc>>,
    /// `expires_at`.
    pub expires_at: Option<DateTime<Utc>>,
    /// `phone_number_id` (every CSV row needs one).
    pub phone_number_id: Option<PhoneNumberId>,
}

impl Defaults {
    fn is_empty(&self) -> bool {
        self.campaign.is_none()
            && self.not_before.is_none()
            && self.expires_at.is_none()
            && self.phone_number_id.is_none()
    }

    /// The job id of the row at `line` that names none.
    fn job_id(&self, line: u64) -> Option<String> {
        self.campaign
            .as_ref()
            .map(|c| format!("{}-{line}", c.as_str()))
    }
}

/// How CSV columns become a template job: flags, or a TOML file with the same keys
/// (`--mapping`), flags winning. Template name and language are each either fixed or a column.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    /// The recipient's column (default `to`).
    pub to_column: Option<String>,
    /// The template name for every row.
    pub template: Option<String>,
    /// The column holding each row's template name.
    pub template_column: Option<String>,
    /// The template language code for every row (`en_US`).
    pub language: Option<String>,
    /// The column holding each row's language code.
    pub language_column: Option<String>,
    /// Columns whose values are the template's body parameters, in order.
    #[serde(default)]
    pub param_columns: Vec<String>,
    /// The column holding the header's parameter: its text, or its media's link.
    pub header_column: Option<String>,
    /// What the header's parameter is (default text).
    pub header_type: Option<HeaderType>,
    /// The column holding the dynamic suffix of a URL button's link.
    pub url_button_column: Option<String>,
    /// That URL button's index among the template's buttons (default 0).
    pub url_button_index: Option<u8>,
    /// The column holding each row's job id (default: `<campaign>-<line>`).
    pub job_id_column: Option<String>,
}

/// A template header's parameter from a CSV column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum HeaderType {
    /// The cell is the header's text parameter.
    Text,
    /// The cell is an image's link.
    Image,
    /// The cell is a video's link.
    Video,
    /// The cell is a document's link.
    Document,
}

impl HeaderType {
    /// The header component with `cell` as its parameter.
    fn component(self, cell: &str) -> Value {
        let parameter = match self {
            HeaderType::Text => json!({"type": "text", "text": cell}),
            HeaderType::Image => json!({"type": "image", "image": {"link": cell}}),
            HeaderType::Video => json!({"type": "video", "video": {"link": cell}}),
            HeaderType::Document => json!({"type": "document", "document": {"link": cell}}),
        };
        json!({"type": "header", "parameters": [parameter]})
    }
}

impl Mapping {
    /// Reads a mapping file.
    pub fn load(path: &Path) -> Result<Mapping, InputError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| InputError(format!("cannot read the mapping {}: {e}", path.display())))?;
        toml::from_str(&text)
            .map_err(|e| InputError(format!("mapping {}: {}", path.display(), e.message())))
    }

    /// This mapping with `flags`' settings in place of its own.
    pub fn overlaid(self, flags: Mapping) -> Mapping {
        Mapping {
            to_column: flags.to_column.or(self.to_column),
            template: flags.template.or(self.template),
            template_column: flags.template_column.or(self.template_column),
            language: flags.language.or(self.language),
            language_column: flags.language_column.or(self.language_column),
            param_columns: if flags.param_columns.is_empty() {
                self.param_columns
            } else {
                flags.param_columns
            },
            header_column: flags.header_column.or(self.header_column),
            header_type: flags.header_type.or(self.header_type),
            url_button_column: flags.url_button_column.or(self.url_button_column),
            url_button_index: flags.url_button_index.or(self.url_button_index),
            job_id_column: flags.job_id_column.or(self.job_id_column),
        }
    }
}

/// Arguments, a mapping or a header that cannot work: nothing is published (exit 64).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InputError(pub String);

/// One input row: a job to publish, or why it was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Row {
    /// A valid job.
    Job(Job),
    /// A row the decoder (or the mapping) refused; never published.
    Rejected(Rejected),
}

/// A validated job.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// Its line in the input (CSV: the header is line 1).
    pub line: u64,
    /// Its job id.
    pub job_id: String,
    /// The body to publish.
    pub body: Bytes,
}

/// A refused row.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    /// Its line in the input.
    pub line: u64,
    /// What is wrong, naming the field.
    pub reason: String,
    /// The row as read, for the reject file.
    pub raw: Raw,
}

/// A row as read.
#[derive(Debug, Clone, PartialEq)]
pub enum Raw {
    /// A JSONL line.
    Line(String),
    /// A CSV record's fields.
    Fields(Vec<String>),
}

/// Validates `body` with the job decoder: the row's job, or why it was refused.
fn validated(line: u64, body: Vec<u8>, raw: impl FnOnce() -> Raw) -> Row {
    match crate::job::decode(&body) {
        Ok(job) => Row::Job(Job {
            line,
            job_id: job.job_id.as_str().to_owned(),
            body: body.into(),
        }),
        Err(e) => Row::Rejected(Rejected {
            line,
            reason: e.to_string(),
            raw: raw(),
        }),
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// A JSONL line: the job as written, with the [`Defaults`] it lacks added in front (the rest of
/// the line untouched, so the decoder still sees a key named twice).
pub fn jsonl_row(line: u64, text: &str, defaults: &Defaults) -> Row {
    let raw = || Raw::Line(text.to_owned());
    if defaults.is_empty() {
        return validated(line, text.as_bytes().to_vec(), raw);
    }
    #[derive(Deserialize)]
    struct Present {
        job_id: Option<serde::de::IgnoredAny>,
        campaign_id: Option<serde::de::IgnoredAny>,
        not_before: Option<serde::de::IgnoredAny>,
        expires_at: Option<serde::de::IgnoredAny>,
        phone_number_id: Option<serde::de::IgnoredAny>,
    }
    let (Ok(present), Some(rest)) = (
        serde_json::from_str::<Present>(text),
        text.trim_start().strip_prefix('{'),
    ) else {
        // Not a JSON object: the decoder says what is wrong with it.
        return validated(line, text.as_bytes().to_vec(), raw);
    };
    let mut added: Vec<(&str, Value)> = Vec::new();
    if present.job_id.is_none()
        && let Some(id) = defaults.job_id(line)
    {
        added.push(("job_id", id.into()));
    }
    if let (None, Some(c)) = (&present.campaign_id, &defaults.campaign) {
        added.push(("campaign_id", c.as_str().into()));
    }
    if let (None, Some(t)) = (&present.not_before, defaults.not_before) {
        added.push(("not_before", rfc3339(t).into()));
    }
    if let (None, Some(t)) = (&present.expires_at, defaults.expires_at) {
        added.push(("expires_at", rfc3339(t).into()));
    }
    if let (None, Some(n)) = (&present.phone_number_id, &defaults.phone_number_id) {
        added.push(("phone_number_id", n.as_str().into()));
    }
    if added.is_empty() {
        return validated(line, text.as_bytes().to_vec(), raw);
    }
    let mut body = Vec::with_capacity(text.len() + 64 * added.len());
    body.push(b'{');
    for (i, (key, value)) in added.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        serde_json::to_writer(&mut body, key).expect("a string serialises");
        body.push(b':');
        serde_json::to_writer(&mut body, value).expect("a value serialises");
    }
    if !rest.trim_start().starts_with('}') {
        body.push(b',');
    }
    body.extend_from_slice(rest.as_bytes());
    validated(line, body, raw)
}

/// Where each mapped column is in a CSV record.
#[derive(Debug, Clone)]
pub struct CsvColumns {
    to: usize,
    template: Field,
    language: Field,
    params: Vec<usize>,
    header: Option<(HeaderType, usize)>,
    url_button: Option<(u8, usize)>,
    job_id: Option<usize>,
    count: usize,
    phone_number_id: PhoneNumberId,
    defaults: Defaults,
}

/// A fixed value or a column.
#[derive(Debug, Clone)]
enum Field {
    Fixed(String),
    Column(usize),
}

impl CsvColumns {
    /// Resolves `mapping` against the header row. Every CSV job needs a phone number id, and a
    /// job id: a column's, or one derived from the campaign.
    pub fn new(
        header: &StringRecord,
        mapping: &Mapping,
        defaults: &Defaults,
    ) -> Result<CsvColumns, InputError> {
        let names: Vec<&str> = header
            .iter()
            .map(|h| h.trim_start_matches('\u{feff}').trim())
            .collect();
        let find = |column: &str, flag: &str| {
            names.iter().position(|n| *n == column).ok_or_else(|| {
                InputError(format!(
                    "{flag}: the header has no column {column:?} (columns: {})",
                    names.join(", ")
                ))
            })
        };
        let field =
            |fixed: &Option<String>, column: &Option<String>, what: &str| match (fixed, column) {
                (Some(value), None) => Ok(Field::Fixed(value.clone())),
                (None, Some(column)) => {
                    Ok(Field::Column(find(column, &format!("--{what}-column"))?))
                }
                (Some(_), Some(_)) => Err(InputError(format!(
                    "give --{what} or --{what}-column, not both"
                ))),
                (None, None) => Err(InputError(format!(
                    "CSV input needs --{what} (the same for every row) or --{what}-column"
                ))),
            };
        let phone_number_id = defaults.phone_number_id.clone().ok_or_else(|| {
            InputError("CSV input needs --phone-number-id (the sending number of every row)".into())
        })?;
        let strays = [
            (mapping.header_type.is_some() && mapping.header_column.is_none())
                .then_some("--header-type needs --header-column"),
            (mapping.url_button_index.is_some() && mapping.url_button_column.is_none())
                .then_some("--url-button-index needs --url-button-column"),
        ];
        if let Some(stray) = strays.into_iter().flatten().next() {
            return Err(InputError(stray.into()));
        }
        if mapping.job_id_column.is_none() && defaults.campaign.is_none() {
            return Err(InputError(
                "CSV input needs --campaign (job ids are <campaign>-<line>) or --job-id-column"
                    .into(),
            ));
        }
        Ok(CsvColumns {
            to: find(mapping.to_column.as_deref().unwrap_or("to"), "--to-column")?,
            template: field(&mapping.template, &mapping.template_column, "template")?,
            language: field(&mapping.language, &mapping.language_column, "language")?,
            params: mapping
                .param_columns
                .iter()
                .map(|c| find(c, "--param-columns"))
                .collect::<Result<_, _>>()?,
            header: mapping
                .header_column
                .as_deref()
                .map(|c| {
                    let kind = mapping.header_type.unwrap_or(HeaderType::Text);
                    find(c, "--header-column").map(|i| (kind, i))
                })
                .transpose()?,
            url_button: mapping
                .url_button_column
                .as_deref()
                .map(|c| {
                    let index = mapping.url_button_index.unwrap_or(0);
                    find(c, "--url-button-column").map(|i| (index, i))
                })
                .transpose()?,
            job_id: mapping
                .job_id_column
                .as_deref()
                .map(|c| find(c, "--job-id-column"))
                .transpose()?,
            count: names.len(),
            phone_number_id,
            defaults: defaults.clone(),
        })
    }

    /// The record at `line` as a validated template job.
    pub fn row(&self, line: u64, record: &StringRecord) -> Row {
        let raw = || Raw::Fields(record.iter().map(str::to_owned).collect());
        if record.len() != self.count {
            return Row::Rejected(Rejected {
                line,
                reason: format!("{} fields, the header has {}", record.len(), self.count),
                raw: raw(),
            });
        }
        let cell = |i: usize| record.get(i).unwrap_or_default().trim();
        fn value<'a>(f: &'a Field, record: &'a StringRecord) -> &'a str {
            match f {
                Field::Fixed(v) => v,
                Field::Column(i) => record.get(*i).unwrap_or_default().trim(),
            }
        }
        let job_id = match self.job_id {
            Some(i) if !cell(i).is_empty() => cell(i).to_owned(),
            _ => self.defaults.job_id(line).unwrap_or_default(),
        };
        let mut template = json!({"name": value(&self.template, record),
                                  "language": {"code": value(&self.language, record)}});
        let mut components = Vec::new();
        if let Some((kind, i)) = self.header {
            components.push(kind.component(cell(i)));
        }
        if !self.params.is_empty() {
            let parameters: Vec<Value> = self
                .params
                .iter()
                .map(|&i| json!({"type": "text", "text": cell(i)}))
                .collect();
            components.push(json!({"type": "body", "parameters": parameters}));
        }
        if let Some((index, i)) = self.url_button {
            components.push(json!({"type": "button", "sub_type": "url",
                "index": index.to_string(), "parameters": [{"type": "text", "text": cell(i)}]}));
        }
        if !components.is_empty() {
            template["components"] = components.into();
        }
        let mut job = json!({
            "schema": SCHEMA_V1,
            "job_id": job_id,
            "phone_number_id": self.phone_number_id.as_str(),
            "to": cell(self.to),
            "message": {"type": "template", "template": template},
        });
        if let Some(c) = &self.defaults.campaign {
            job["campaign_id"] = c.as_str().into();
        }
        if let Some(t) = self.defaults.not_before {
            job["not_before"] = rfc3339(t).into();
        }
        if let Some(t) = self.defaults.expires_at {
            job["expires_at"] = rfc3339(t).into();
        }
        let body = serde_json::to_vec(&job).expect("a job serialises");
        validated(line, body, raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NUMBER: &str = "106540352242922";

    fn defaults() -> Defaults {
        Defaults {
            campaign: Some(CampaignId::parse("spring").unwrap()),
            phone_number_id: Some(PhoneNumberId::parse(NUMBER).unwrap()),
            ..Defaults::default()
        }
    }

    fn job(row: Row) -> (String, Value) {
        match row {
            Row::Job(j) => (j.job_id, serde_json::from_slice(&j.body).unwrap()),
            Row::Rejected(r) => panic!("rejected: {}", r.reason),
        }
    }

    fn reason(row: Row) -> String {
        match row {
            Row::Rejected(r) => r.reason,
            Row::Job(j) => panic!("accepted {}", j.job_id),
        }
    }

    #[test]
    fn a_jsonl_line_keeps_its_own_fields_and_gets_the_missing_ones() {
        let line = r#"{"schema":"wa.send.v1","to":"+16505551234","message":{"type":"text","text":{"body":"hi"}}}"#;
        let (id, body) = job(jsonl_row(7, line, &defaults()));
        assert_eq!(id, "spring-7");
        assert_eq!(body["campaign_id"], "spring");
        assert_eq!(body["phone_number_id"], NUMBER);
        let own = r#"{"schema":"wa.send.v1","job_id":"mine","phone_number_id":"106540352242922","to":"+16505551234","message":{"type":"text","text":{"body":"hi"}}}"#;
        assert_eq!(job(jsonl_row(8, own, &defaults())).0, "mine");
        // Without defaults the line is published byte for byte.
        match jsonl_row(8, own, &Defaults::default()) {
            Row::Job(j) => assert_eq!(j.body, own.as_bytes()),
            Row::Rejected(r) => panic!("{}", r.reason),
        }
    }

    #[test]
    fn a_bad_jsonl_line_is_refused_with_the_decoders_reason() {
        assert!(reason(jsonl_row(1, "{not json", &defaults())).starts_with("malformed job"));
        let twice = r#"{"schema":"wa.send.v1","to":"+16505551234","to":"+16505551235","message":{"type":"text","text":{"body":"hi"}}}"#;
        assert!(reason(jsonl_row(2, twice, &defaults())).contains("duplicate key \"to\""));
        let no_id = r#"{"schema":"wa.send.v1","phone_number_id":"106540352242922","to":"+16505551234","message":{"type":"text","text":{"body":"hi"}}}"#;
        assert!(reason(jsonl_row(3, no_id, &Defaults::default())).contains("job_id: is required"));
    }

    fn header(fields: &[&str]) -> StringRecord {
        StringRecord::from(fields.to_vec())
    }

    fn mapping() -> Mapping {
        Mapping {
            to_column: Some("phone".into()),
            template: Some("order_update".into()),
            language: Some("en_US".into()),
            param_columns: vec!["name".into(), "order".into()],
            ..Mapping::default()
        }
    }

    #[test]
    fn a_csv_row_becomes_a_template_job_with_its_parameters() {
        let columns = CsvColumns::new(
            &header(&["phone", "name", "order"]),
            &mapping(),
            &defaults(),
        )
        .unwrap();
        let (id, body) = job(columns.row(2, &header(&["+16505551234", "Ada", "42"])));
        assert_eq!(id, "spring-2");
        assert_eq!(body["message"]["template"]["name"], "order_update");
        assert_eq!(
            body["message"]["template"]["components"][0]["parameters"][1]["text"],
            "42"
        );
        assert!(reason(columns.row(3, &header(&["12", "Ada", "42"]))).contains("to:"));
        assert_eq!(
            reason(columns.row(4, &header(&["+16505551234", "Ada"]))),
            "2 fields, the header has 3"
        );
    }

    #[test]
    fn header_and_url_button_columns_add_their_components() {
        let m = Mapping {
            header_column: Some("name".into()),
            url_button_column: Some("order".into()),
            url_button_index: Some(1),
            ..mapping()
        };
        let columns = CsvColumns::new(&header(&["phone", "name", "order"]), &m, &defaults());
        let (_, body) = job(columns
            .unwrap()
            .row(2, &header(&["+16505551234", "Ada", "42"])));
        let components = &body["message"]["template"]["components"];
        assert_eq!(
            components[0],
            json!({"type": "header", "parameters": [{"type": "text", "text": "Ada"}]})
        );
        assert_eq!(components[1]["type"], "body");
        assert_eq!(
            components[2],
            json!({"type": "button", "sub_type": "url", "index": "1",
                   "parameters": [{"type": "text", "text": "42"}]})
        );
        let image = HeaderType::Image.component("https://example.com/a.jpg");
        assert_eq!(
            image["parameters"][0]["image"]["link"],
            "https://example.com/a.jpg"
        );
    }

    #[test]
    fn a_mapping_that_cannot_work_is_refused_before_any_row() {
        let h = header(&["phone", "name", "order"]);
        let cases = [
            (
                Mapping {
                    to_column: Some("mobile".into()),
                    ..mapping()
                },
                "no column \"mobile\"",
            ),
            (
                Mapping {
                    template: None,
                    ..mapping()
                },
                "needs --template",
            ),
            (
                Mapping {
                    language_column: Some("name".into()),
                    ..mapping()
                },
                "not both",
            ),
            (
                Mapping {
                    header_type: Some(HeaderType::Video),
                    ..mapping()
                },
                "--header-type needs --header-column",
            ),
            (
                Mapping {
                    url_button_index: Some(1),
                    ..mapping()
                },
                "--url-button-index needs --url-button-column",
            ),
            (
                Mapping {
                    url_button_column: Some("link".into()),
                    ..mapping()
                },
                "--url-button-column: the header has no column \"link\"",
            ),
        ];
        for (m, want) in cases {
            let err = CsvColumns::new(&h, &m, &defaults()).unwrap_err().0;
            assert!(err.contains(want), "{err} should say {want}");
        }
        let no_campaign = Defaults {
            campaign: None,
            ..defaults()
        };
        assert!(
            CsvColumns::new(&h, &mapping(), &no_campaign)
                .unwrap_err()
                .0
                .contains("--campaign")
        );
    }

    #[test]
    fn flags_win_over_the_mapping_file() {
        let file: Mapping = toml::from_str(
            "to_column = \"phone\"\ntemplate = \"a\"\nlanguage = \"en\"\nparam_columns = [\"x\"]\n\
             header_column = \"photo\"\nheader_type = \"image\"\n",
        )
        .unwrap();
        let merged = file.overlaid(Mapping {
            template: Some("b".into()),
            ..Mapping::default()
        });
        assert_eq!(merged.template.as_deref(), Some("b"));
        assert_eq!(merged.to_column.as_deref(), Some("phone"));
        assert_eq!(merged.param_columns, ["x"]);
        assert_eq!(merged.header_type, Some(HeaderType::Image));
        assert!(toml::from_str::<Mapping>("colour = \"red\"").is_err());
    }
}
