//! Request and webhook shapes agree with Meta's spec.
//!
//! `schemas/cloud/*.schema.json` are JSON Schema 2020-12 documents written by hand from Meta's
//! OpenAPI spec for the Cloud API (each cites the spec components it follows, and says where and
//! why it departs from them). This file checks the schemas themselves and their fixtures:
//! every file under `tests/fixtures/cloud/<schema>/` must match `<schema>.schema.json`, and every
//! file under `tests/fixtures/cloud/invalid/<schema>/` must be refused at the place it names.
//!
//! Tests of the simulator and the worker reuse [`assert_valid`] on the webhooks and requests they
//! produce, so a shape drifting from Meta's fails there rather than in production.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use jsonschema::Validator;
use serde_json::Value;

/// The schemas under `schemas/cloud/`, by file stem.
pub const SCHEMAS: &[&str] = &["send-request", "webhook", "template-list", "phone-number"];

const DRAFT_2020_12: &str = "https://json-schema.org/draft/2020-12/schema";

fn project_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()))
}

/// The document `schemas/cloud/<schema>.schema.json`.
pub fn schema_document(schema: &str) -> Value {
    read_json(&project_path(&format!(
        "schemas/cloud/{schema}.schema.json"
    )))
}

/// The compiled validator for `schema` (one of [`SCHEMAS`]), built once per test binary.
pub fn validator(schema: &str) -> &'static Validator {
    static VALIDATORS: OnceLock<BTreeMap<&'static str, Validator>> = OnceLock::new();
    VALIDATORS
        .get_or_init(|| {
            SCHEMAS
                .iter()
                .map(|&name| {
                    let compiled = jsonschema::draft202012::new(&schema_document(name))
                        .unwrap_or_else(|e| panic!("{name}.schema.json does not compile: {e}"));
                    (name, compiled)
                })
                .collect()
        })
        .get(schema)
        .unwrap_or_else(|| panic!("no schema {schema:?}; the schemas are {SCHEMAS:?}"))
}

/// One way an instance breaks a schema.
#[derive(Debug)]
pub struct Violation {
    /// JSON pointer into the instance ("" for the root).
    pub at: String,
    /// What is wrong there.
    pub message: String,
    /// The schema keyword that refused it, through any `$ref`s.
    pub rule: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = if self.at.is_empty() {
            "(root)"
        } else {
            &self.at
        };
        write!(f, "{at}: {} [rule {}]", self.message, self.rule)
    }
}

/// Every way `instance` breaks `schema`; empty when it matches.
pub fn violations(schema: &str, instance: &Value) -> Vec<Violation> {
    validator(schema)
        .iter_errors(instance)
        .map(|e| Violation {
            at: e.instance_path().to_string(),
            message: e.to_string(),
            rule: e.evaluation_path().to_string(),
        })
        .collect()
}

fn listed(found: &[Violation]) -> String {
    found.iter().map(|v| format!("  - {v}\n")).collect()
}

/// Panics, listing every violation, unless `instance` matches `schemas/cloud/<schema>.schema.json`.
pub fn assert_valid(schema: &str, instance: &Value) {
    let found = violations(schema, instance);
    assert!(
        found.is_empty(),
        "does not match {schema}.schema.json:\n{}instance: {instance:#}",
        listed(&found)
    );
}

/// Panics unless `instance` breaks `schema`; returns how it does.
pub fn assert_invalid(schema: &str, instance: &Value) -> Vec<Violation> {
    let found = violations(schema, instance);
    assert!(
        !found.is_empty(),
        "{schema}.schema.json accepts an instance it should refuse: {instance:#}"
    );
    found
}

/// The `*.json` files in `tests/fixtures/cloud/<dir>`, sorted, with their contents.
fn fixtures(dir: &str) -> Vec<(String, Value)> {
    let dir = project_path(&format!("tests/fixtures/cloud/{dir}"));
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no fixtures in {}", dir.display());
    files
        .into_iter()
        .map(|p| {
            let name = p
                .strip_prefix(project_path(""))
                .unwrap_or(&p)
                .display()
                .to_string();
            (name, read_json(&p))
        })
        .collect()
}

/// Keywords the schemas may use. JSON Schema ignores unknown keywords, so a misspelt
/// `requried` would silently switch a rule off; [`unknown_keywords`] catches that.
#[rustfmt::skip]
const KEYWORDS: &[&str] = &[
    "$schema", "$id", "$ref", "$defs", "$comment", "title", "description", "type", "enum",
    "const", "properties", "required", "additionalProperties", "unevaluatedProperties",
    "dependentSchemas", "dependentRequired", "propertyNames", "minProperties", "maxProperties",
    "items", "prefixItems", "contains", "minItems", "maxItems", "uniqueItems", "minLength",
    "maxLength", "pattern", "format", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "multipleOf", "allOf", "anyOf", "oneOf", "not", "if", "then", "else",
    "default", "examples",
];

/// JSON pointers of unknown keywords in `schema` and its subschemas.
fn unknown_keywords(schema: &Value, at: &str, found: &mut Vec<String>) {
    let Some(object) = schema.as_object() else {
        return;
    };
    for (key, value) in object {
        let here = format!("{at}/{key}");
        match key.as_str() {
            "properties" | "$defs" | "dependentSchemas" => {
                for (name, sub) in value.as_object().into_iter().flatten() {
                    unknown_keywords(sub, &format!("{here}/{name}"), found);
                }
            }
            "allOf" | "anyOf" | "oneOf" | "prefixItems" => {
                for (i, sub) in value.as_array().into_iter().flatten().enumerate() {
                    unknown_keywords(sub, &format!("{here}/{i}"), found);
                }
            }
            "items"
            | "contains"
            | "not"
            | "if"
            | "then"
            | "else"
            | "additionalProperties"
            | "unevaluatedProperties"
            | "propertyNames" => unknown_keywords(value, &here, found),
            known if KEYWORDS.contains(&known) => {}
            _ => found.push(here),
        }
    }
}

#[test]
fn each_schema_is_a_valid_2020_12_schema() {
    for &name in SCHEMAS {
        let schema = schema_document(name);
        assert_eq!(schema["$schema"], DRAFT_2020_12, "{name}: $schema");
        let id = schema["$id"].as_str().unwrap_or_default();
        assert!(
            id.ends_with(&format!("/cloud/{name}.schema.json")),
            "{name}: $id is {id:?}"
        );
        if let Err(e) = jsonschema::meta::validate(&schema) {
            panic!(
                "{name}.schema.json breaks the 2020-12 meta-schema at {}: {e}",
                e.instance_path()
            );
        }
        let mut unknown = Vec::new();
        unknown_keywords(&schema, "", &mut unknown);
        assert!(
            unknown.is_empty(),
            "{name}.schema.json: unknown keywords at {unknown:?}"
        );
        validator(name);
    }
}

#[test]
fn every_schema_file_is_checked() {
    let dir = project_path("schemas/cloud");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|entry| {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            name.strip_suffix(".schema.json").map(str::to_owned)
        })
        .collect();
    on_disk.sort();
    let mut listed: Vec<&str> = SCHEMAS.to_vec();
    listed.sort_unstable();
    assert_eq!(on_disk, listed, "schemas/cloud and SCHEMAS disagree");
}

#[test]
fn valid_fixtures_match_their_schema() {
    for &schema in SCHEMAS {
        for (name, instance) in fixtures(schema) {
            let found = violations(schema, &instance);
            assert!(
                found.is_empty(),
                "{name} does not match {schema}.schema.json:\n{}",
                listed(&found)
            );
        }
    }
}

/// An invalid fixture is `{"why": …, "rejected_at": <JSON pointer>, "instance": …}`: the
/// instance must be refused, and refused at `rejected_at`, so it cannot pass the test by
/// breaking some other rule than the one it is about.
#[test]
fn invalid_fixtures_are_refused_where_they_break_the_rule() {
    for &schema in SCHEMAS {
        for (name, fixture) in fixtures(&format!("invalid/{schema}")) {
            let why = fixture["why"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: no \"why\""));
            let at = fixture["rejected_at"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: no \"rejected_at\" pointer"));
            let instance = fixture
                .get("instance")
                .unwrap_or_else(|| panic!("{name}: no \"instance\""));
            let found = violations(schema, instance);
            assert!(
                !found.is_empty(),
                "{name}: {schema}.schema.json accepts it, but {why}"
            );
            assert!(
                found.iter().any(|v| v.at == at),
                "{name}: refused, but not at {at:?} ({why}):\n{}",
                listed(&found)
            );
        }
    }
}

#[test]
fn helpers_report_what_is_wrong() {
    let good = serde_json::json!({"messaging_product": "whatsapp", "to": "16505551234", "type": "text",
        "text": {"body": "hi"}});
    assert_valid("send-request", &good);
    let mut bad = good.clone();
    bad["text"]["body"] = Value::from("x".repeat(4097));
    let found = assert_invalid("send-request", &bad);
    assert!(found.iter().any(|v| v.at == "/text/body"), "{found:?}");
}

mod common;

/// A pipeline with an in-memory queue and store and the real HTTP client, sending to `sim`.
async fn shapes_pipeline(
    sim: &wa_sender::simulator::Simulator,
) -> (
    wa_sender::pipeline::Pipeline,
    std::sync::Arc<wa_sender::store::memory::MemoryStore>,
) {
    use std::sync::Arc;
    use wa_sender::broker::memory::MemoryBroker;
    use wa_sender::store::memory::MemoryStore;

    let settings = common::settings("shapes", &sim.base_url())
        .runtime()
        .unwrap();
    let cloud = Arc::new(wa_sender::app::http_cloud(&settings).unwrap());
    let store = Arc::new(MemoryStore::new());
    let pipeline = wa_sender::app::pipeline(
        &settings,
        cloud,
        Arc::new(MemoryBroker::new(common::numbers().keys())),
        store.clone(),
        common::numbers(),
    );
    pipeline.refresh_templates().await;
    (pipeline, store)
}

/// Sends `job` (its user has written and opted in) through `pipeline` now.
async fn decide(
    pipeline: &wa_sender::pipeline::Pipeline,
    store: &wa_sender::store::memory::MemoryStore,
    mut job: Value,
) -> wa_sender::pipeline::Outcome {
    use wa_sender::broker::{Envelope, Headers};
    // Scheduled examples are sent now: these tests are about shapes, not scheduling.
    job.as_object_mut().unwrap().remove("not_before");
    common::user_wrote(store, &job).await;
    common::opted_in(store, &job).await;
    let envelope = Envelope {
        body: serde_json::to_vec(&job).unwrap().into(),
        headers: Headers::default(),
    };
    pipeline
        .decide(&envelope, wa_sender::job::Lane::Transactional)
        .await
}

/// The worker's requests, as the simulator received them over HTTP, match Meta's request shape:
/// every example job in `schemas/examples/` goes through the real pipeline (in-memory queue and
/// store, real HTTP client) to the simulator, which records each body.
#[tokio::test]
async fn the_workers_requests_match_metas_shape() {
    use wa_sender::pipeline::Outcome;
    use wa_sender::simulator::{Scenario, Simulator};

    // The simulator's default scenario: the templates a new user finds there are the ones the
    // example jobs use.
    let mut scenario = Scenario::single(common::NUMBER, common::WABA, common::TOKEN);
    scenario.unknown_users.window_open = true;
    let sim = Simulator::start(scenario, "127.0.0.1:0").await.unwrap();
    sim.record_requests(true);
    let (pipeline, store) = shapes_pipeline(&sim).await;
    let mut sent = 0;
    for entry in std::fs::read_dir(project_path("schemas/examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        // Each example's user has written and opted in: the policy lets every example through.
        let outcome = decide(&pipeline, &store, read_json(&path)).await;
        assert!(
            matches!(outcome, Outcome::Accepted(_)),
            "{}: {outcome:?}",
            path.display()
        );
        sent += 1;
    }
    let requests = sim.audit().requests;
    assert_eq!(requests.len(), sent);
    assert!(sent >= 5);
    for request in &requests {
        assert_valid("send-request", request);
        assert!(
            request["biz_opaque_callback_data"].is_string(),
            "the job id travels with the send"
        );
    }
}

/// Meta's catalog- and flow-button template examples are admitted and posted exactly as the job
/// gives them (action parameter, `CATALOG` spelling, integer index); an action addressed to the
/// wrong kind of button is dead-lettered `template_params_invalid` without an API call.
#[tokio::test]
async fn catalog_and_flow_buttons_reach_the_api_unchanged() {
    use wa_sender::pipeline::Outcome;
    use wa_sender::simulator::{Scenario, Simulator};

    let scenario = Scenario::single(common::NUMBER, common::WABA, common::TOKEN);
    let sim = Simulator::start(scenario, "127.0.0.1:0").await.unwrap();
    sim.record_requests(true);
    let (pipeline, store) = shapes_pipeline(&sim).await;

    for example in ["catalog-template.json", "flow-template.json"] {
        let job = read_json(&project_path(&format!("schemas/examples/{example}")));
        let outcome = decide(&pipeline, &store, job.clone()).await;
        assert!(
            matches!(outcome, Outcome::Accepted(_)),
            "{example}: {outcome:?}"
        );
        let requests = sim.audit().requests;
        let sent = requests
            .iter()
            .find(|r| r["biz_opaque_callback_data"] == job["job_id"])
            .unwrap_or_else(|| panic!("{example} was not sent: {requests:?}"));
        assert_eq!(sent["type"], "template", "{example}");
        assert_eq!(
            sent["template"], job["message"]["template"],
            "{example}: the template went out changed"
        );
        assert_valid("send-request", sent);
    }

    // The flow action given to the catalog button, and the catalog's to an OTP button.
    let mut flow_on_catalog = read_json(&project_path("schemas/examples/catalog-template.json"));
    flow_on_catalog["job_id"] = "flow-on-catalog".into();
    flow_on_catalog["message"]["template"]["components"][1]["sub_type"] = "flow".into();
    flow_on_catalog["message"]["template"]["components"][1]["parameters"][0]["action"] =
        serde_json::json!({"flow_token": "tok-1"});
    let mut catalog_on_url = read_json(&project_path("schemas/examples/otp-template.json"));
    catalog_on_url["job_id"] = "catalog-on-url".into();
    catalog_on_url["message"]["template"]["components"][1] = serde_json::json!({
        "type": "button", "sub_type": "CATALOG", "index": "0",
        "parameters": [{"type": "action", "action": {"thumbnail_product_retailer_id": "2lc20305pt"}}]});
    let cases = [
        (
            flow_on_catalog,
            "template_params_invalid",
            "template intro_catalog_offer: components[1] is a \"flow\" button, but button 0 of the template is CATALOG",
        ),
        (
            catalog_on_url,
            "template_params_invalid",
            "template otp_code: components[1] is a \"CATALOG\" button, but button 0 of the template is OTP",
        ),
    ];
    for (job, reason, detail) in cases {
        let outcome = decide(&pipeline, &store, job.clone()).await;
        let Outcome::Dead(dead) = &outcome else {
            panic!("{}: {outcome:?}", job["job_id"]);
        };
        assert_eq!(dead.reason.as_str(), reason, "{}", job["job_id"]);
        assert!(
            dead.detail.contains(detail),
            "{}: {:?} should say {detail:?}",
            job["job_id"],
            dead.detail
        );
        assert!(
            !sim.audit()
                .requests
                .iter()
                .any(|r| r["biz_opaque_callback_data"] == job["job_id"]),
            "{}: refused by the policy, yet sent",
            job["job_id"]
        );
    }
}

/// A CSV row mapped with a media header, body parameters and a URL button's suffix becomes the
/// job `schemas/examples/tracking-template.json` shows, and the simulator's default
/// `delivery_tracking` template accepts it as sent.
#[tokio::test]
async fn a_csv_row_with_header_and_url_button_columns_is_sent_as_mapped() {
    use csv::StringRecord;
    use wa_sender::ids::{CampaignId, PhoneNumberId};
    use wa_sender::pipeline::Outcome;
    use wa_sender::producer::input::{CsvColumns, Defaults, HeaderType, Mapping, Row};
    use wa_sender::simulator::{Scenario, Simulator};

    let mapping = Mapping {
        to_column: Some("phone".into()),
        template: Some("delivery_tracking".into()),
        language: Some("en_US".into()),
        param_columns: vec!["name".into(), "parcel".into()],
        header_column: Some("photo".into()),
        header_type: Some(HeaderType::Image),
        url_button_column: Some("tracking".into()),
        ..Mapping::default()
    };
    let defaults = Defaults {
        campaign: Some(CampaignId::parse("parcels").unwrap()),
        phone_number_id: Some(PhoneNumberId::parse(common::NUMBER).unwrap()),
        ..Defaults::default()
    };
    let header = StringRecord::from(vec!["phone", "name", "parcel", "photo", "tracking"]);
    let columns = CsvColumns::new(&header, &mapping, &defaults).unwrap();
    let record = StringRecord::from(vec![
        "+16505551234",
        "Jessica",
        "7731",
        "https://example.com/parcels/7731.jpg",
        "7731-XK",
    ]);
    let Row::Job(job) = columns.row(2, &record) else {
        panic!("the row is refused");
    };
    let job: Value = serde_json::from_slice(&job.body).unwrap();
    assert_eq!(
        job,
        read_json(&project_path("schemas/examples/tracking-template.json"))
    );

    let sim = Simulator::start(
        Scenario::single(common::NUMBER, common::WABA, common::TOKEN),
        "127.0.0.1:0",
    )
    .await
    .unwrap();
    sim.record_requests(true);
    let (pipeline, store) = shapes_pipeline(&sim).await;
    let outcome = decide(&pipeline, &store, job.clone()).await;
    assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
    let requests = sim.audit().requests;
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0]["template"], job["message"]["template"]);
    assert_valid("send-request", &requests[0]);
}

/// The simulator's webhooks and management answers match Meta's shapes: every kind of webhook it
/// sends (statuses with pricing, with and without `conversation`, failures, inbound messages,
/// user preferences, template status, throughput upgrade) is posted to a receiver here and
/// checked against `webhook.schema.json`; the template list and phone number against theirs.
#[tokio::test]
async fn the_simulators_webhooks_and_answers_match_metas_shape() {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use wa_sender::simulator::{Action, DelayRange, Marketing, Scenario, SimUser, Simulator};

    let bodies: Arc<Mutex<Vec<Value>>> = Arc::default();
    let sink = Arc::clone(&bodies);
    let receiver = axum::Router::new().route(
        "/webhook",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sink = Arc::clone(&sink);
            async move {
                sink.lock()
                    .unwrap()
                    .push(serde_json::from_slice(&body).unwrap());
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/webhook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, receiver).await });

    let mut scenario = Scenario::single(common::NUMBER, common::WABA, common::TOKEN);
    scenario.webhooks.url = Some(url);
    scenario.webhooks.sent_after = DelayRange::fixed(10);
    scenario.webhooks.delivered_after = DelayRange::fixed(10);
    scenario.webhooks.read_after = DelayRange::fixed(10);
    scenario.webhooks.duplicate_share = 0.5;
    scenario.users.push(SimUser {
        reachable: false,
        ..SimUser::new("16505550404")
    });
    let sim = Simulator::start(scenario, "127.0.0.1:0").await.unwrap();
    let http = reqwest::Client::new();
    let send = |version: &str, body: Value| {
        http.post(format!(
            "{}/{version}/{}/messages",
            sim.base_url(),
            common::NUMBER
        ))
        .bearer_auth(common::TOKEN)
        .json(&body)
        .send()
    };
    let order = serde_json::json!({"messaging_product": "whatsapp", "to": "+16505550001", "type": "template",
        "biz_opaque_callback_data": "job-shape-1",
        "template": {"name": "order_update", "language": {"code": "en_US"}, "components": [
            {"type": "body", "parameters": [{"type": "text", "text": "Ann"}, {"type": "text", "text": "A-1"}]}]}});
    for version in ["v23.0", "v24.0"] {
        assert!(
            send(version, order.clone())
                .await
                .unwrap()
                .status()
                .is_success()
        );
    }
    let text = serde_json::json!({"messaging_product": "whatsapp", "to": "16505550404", "type": "text", "text": {"body": "hi"}});
    assert!(send("v24.0", text).await.unwrap().status().is_success());
    let text = serde_json::json!({"messaging_product": "whatsapp", "to": "16505550002", "type": "text", "text": {"body": "hi"}});
    assert!(send("v24.0", text).await.unwrap().status().is_success());
    let number = common::NUMBER.to_owned();
    for action in [
        Action::Inbound {
            from: "16505550003".into(),
            phone_number_id: number.clone(),
            text: "STOP".into(),
        },
        Action::MarketingPreference {
            wa_id: "16505550003".into(),
            phone_number_id: number.clone(),
            value: Marketing::Stopped,
        },
        Action::TemplateStatus {
            waba_id: None,
            name: "spring_sale".into(),
            language: "en_US".into(),
            status: "PAUSED".into(),
        },
        Action::TemplateStatus {
            waba_id: None,
            name: "spring_sale".into(),
            language: "en_US".into(),
            status: "DISABLED".into(),
        },
        Action::ThroughputUpgrade {
            phone_number_id: number.clone(),
            maintenance_ms: 10,
        },
    ] {
        sim.act(action).unwrap();
    }

    // 2 × (sent, delivered, maybe read) + failed 131026 + failed 131047 + 5 actions, some twice.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let fields = |bodies: &[Value]| -> std::collections::BTreeSet<String> {
        bodies
            .iter()
            .flat_map(|b| b["entry"].as_array().unwrap().iter())
            .flat_map(|e| e["changes"].as_array().unwrap().iter())
            .flat_map(|c| {
                let statuses = c["value"]["statuses"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let mut kinds: Vec<String> = statuses
                    .iter()
                    .map(|s| format!("status:{}", s["status"].as_str().unwrap()))
                    .collect();
                kinds.push(c["field"].as_str().unwrap().to_owned());
                kinds
            })
            .collect()
    };
    let wanted = [
        "status:sent",
        "status:delivered",
        "status:failed",
        "user_preferences",
        "message_template_status_update",
        "phone_number_quality_update",
    ];
    loop {
        let seen = fields(&bodies.lock().unwrap());
        if wanted.iter().all(|w| seen.contains(*w)) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "webhooks seen so far: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let bodies = bodies.lock().unwrap().clone();
    let conversations = bodies
        .iter()
        .filter(|b| b.to_string().contains("\"conversation\""))
        .count();
    assert!(conversations > 0, "v23 statuses carry conversation objects");
    for body in &bodies {
        assert_valid("webhook", body);
    }

    let get = |path: String| {
        http.get(format!("{}{path}", sim.base_url()))
            .bearer_auth(common::TOKEN)
            .send()
    };
    let list: Value = get(format!("/v23.0/{}/message_templates?limit=2", common::WABA))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 2);
    assert_valid("template-list", &list);
    let all_fields: Value = get(format!(
        "/v23.0/{}/message_templates?fields=id,name,language,status,category,components,parameter_format,quality_score,rejected_reason",
        common::WABA
    ))
    .await.unwrap().json().await.unwrap();
    assert_valid("template-list", &all_fields);
    let phone: Value = get(format!(
        "/v23.0/{}?fields=id,display_phone_number,verified_name,quality_rating,throughput,whatsapp_business_manager_messaging_limit,status,platform_type,code_verification_status,name_status",
        common::NUMBER
    ))
    .await.unwrap().json().await.unwrap();
    assert_valid("phone-number", &phone);
}
