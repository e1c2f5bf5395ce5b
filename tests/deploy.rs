//! The deploy files set only real configuration: every `WA_SENDER__SECTION__KEY` variable in
//! them (manifests, compose, systemd) names a key the settings know, so a typo cannot silently
//! configure nothing. (YAML/JSON syntax and the Kubernetes schemas: `deploy/check`.)

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use wa_sender::config::Settings;

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(files(&path));
        } else {
            found.push(path);
        }
    }
    found
}

/// The `WA_SENDER__…` variable names in `text` (a placeholder such as `<phone_number_id>` ends
/// a name early: what comes before it is still checked).
fn variables(text: &str) -> Vec<String> {
    text.match_indices("WA_SENDER__")
        .map(|(at, _)| {
            text[at..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect::<String>()
                .trim_end_matches('_')
                .to_owned()
        })
        // `WA_SENDER__SECTION__KEY` and `WA_SENDER__…` are how the docs write the pattern.
        .filter(|v| v.len() > "WA_SENDER__".len() && !v.contains("SECTION__KEY"))
        .collect()
}

/// `WA_SENDER__NUMBERS__1065__WABA_ID` → `numbers.1065.waba_id`, as figment splits it.
fn key(variable: &str) -> String {
    variable["WA_SENDER__".len()..]
        .split("__")
        .map(str::to_lowercase)
        .collect::<Vec<_>>()
        .join(".")
}

/// Whether the settings know `key`: loading it with a value may fail for its type or for other
/// settings, but never as an unknown field.
fn known(key: &str) -> Result<(), String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config");
    let figment = Figment::new()
        .merge(Toml::file(format!("{dir}/default.toml")))
        .merge(Serialized::default(key, "1"));
    match Settings::from_figment(figment) {
        Err(e) if e.to_string().contains("unknown field") => Err(e.to_string()),
        _ => Ok(()),
    }
}

#[test]
fn every_wa_sender_variable_in_the_deploy_files_is_a_configuration_key() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut checked = 0;
    let mut unknown = Vec::new();
    for file in files(&deploy) {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for variable in variables(&text) {
            checked += 1;
            if let Err(e) = known(&key(&variable)) {
                unknown.push(format!("{}: {variable}: {e}", file.display()));
            }
        }
    }
    assert!(checked >= 20, "only {checked} variables found");
    assert!(unknown.is_empty(), "{}", unknown.join("\n"));
}

#[test]
fn a_misspelt_variable_is_caught() {
    assert!(known(&key("WA_SENDER__WORKER__CONCURENCY")).is_err());
    assert!(known(&key("WA_SENDER__NUMBERS__106540352242922__WABAID")).is_err());
    assert!(known(&key("WA_SENDER__WORKER__CONCURRENCY")).is_ok());
    assert!(known(&key("WA_SENDER__NUMBERS__106540352242922__WABA_ID")).is_ok());
}
