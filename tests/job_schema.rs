//! The shipped JSON Schema examples and the Rust decoder agree: every example under
//! `schemas/examples` decodes, every one under `schemas/examples/invalid` is refused.

use std::path::Path;

fn examples(dir: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no examples in {}", dir.display());
    files
}

#[test]
fn valid_examples_decode() {
    for (name, body) in examples("schemas/examples") {
        if let Err(e) = wa_sender::job::decode(&body) {
            panic!("{name}: {e}");
        }
    }
}

#[test]
fn invalid_examples_are_refused_as_invalid_jobs() {
    for (name, body) in examples("schemas/examples/invalid") {
        let err = wa_sender::job::decode(&body).expect_err(&name);
        assert_eq!(err.reason().as_str(), "invalid_job", "{name}: {err}");
    }
}

#[test]
fn the_schema_file_is_json_and_names_the_schema_version() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/send-job.v1.schema.json");
    let schema: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    assert_eq!(
        schema["properties"]["schema"]["const"], "wa.send.v1",
        "{}",
        schema["properties"]["schema"]
    );
}

#[test]
fn the_event_schema_lists_every_dead_letter_reason() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/event.v1.schema.json");
    let schema: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let listed = &schema["$defs"]["deadReason"]["enum"];
    let reasons: Vec<&str> = wa_sender::vocab::DeadReason::ALL
        .iter()
        .map(|r| r.as_str())
        .collect();
    assert_eq!(listed, &serde_json::json!(reasons), "{listed}");
}

/// The refusals about button actions and a missing type name the field and the rule.
#[test]
fn action_and_type_refusals_name_the_field() {
    let at = "message.template.components[0].parameters[0]";
    let cases = [
        (
            "action-on-url-button.json",
            format!(
                "invalid job: {at}.type: \"action\" parameters belong to catalog, flow and mpm buttons, not to a url button"
            ),
        ),
        (
            "flow-action-data-not-object.json",
            format!(
                "invalid job: {at}.action.flow_action_data: must be an object (the first screen's data)"
            ),
        ),
        (
            "catalog-action-unknown-field.json",
            format!(
                "invalid job: {at}.action.catalog_id: is not an action field of a CATALOG button (thumbnail_product_retailer_id)"
            ),
        ),
        (
            "image-without-type.json",
            "invalid job: message.type: is required for the image body; only a text body may go without it"
                .to_owned(),
        ),
    ];
    for (file, expected) in cases {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("schemas/examples/invalid")
            .join(file);
        let err = wa_sender::job::decode(&std::fs::read(&path).unwrap()).expect_err(file);
        assert_eq!(err.to_string(), expected, "{file}");
    }
}
