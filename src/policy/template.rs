//! The local parameter check that turns Meta's 132000 / 132005 / 132007 / 132012 into specific
//! dead letters before any send (the definitions it checks against are in the vocabulary).

use std::collections::BTreeMap;

use crate::job::{Component, Parameter, Template};
use crate::vocab::Category;
pub use crate::vocab::{DefinitionButton, DefinitionComponent, TemplateDefinition};

/// The parameter check's view of a definition.
impl TemplateDefinition {
    fn component(&self, kind: &str) -> Option<&DefinitionComponent> {
        self.components
            .iter()
            .find(|c| c.kind.eq_ignore_ascii_case(kind))
    }

    fn named(&self) -> bool {
        self.parameter_format
            .as_deref()
            .is_some_and(|f| f.eq_ignore_ascii_case("NAMED"))
    }
}

/// Body (with its parameters) limit, and header limit, in characters.
const BODY_LIMIT: usize = 1024;
const HEADER_LIMIT: usize = 60;
/// An authentication code's limit.
const OTP_LIMIT: usize = 15;

/// The distinct placeholder names in `text`, in order: `{{1}}` gives `1`, `{{name}}` `name`.
fn placeholders(text: &str) -> Vec<&str> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find("{{") {
        let after = &rest[open + 2..];
        let Some(close) = after.find("}}") else { break };
        let name = after[..close].trim();
        if !name.is_empty() && !names.contains(&name) {
            names.push(name);
        }
        rest = &after[close + 2..];
    }
    names
}

/// The text a parameter puts in place of its placeholder (currency and date_time: the fallback).
fn value_len(p: &Parameter) -> usize {
    let fallback = |v: &Option<serde_json::Value>| {
        v.as_ref()
            .and_then(|v| v.get("fallback_value"))
            .and_then(|v| v.as_str())
            .map(|s| s.chars().count())
    };
    p.text
        .as_deref()
        .map(|t| t.chars().count())
        .or_else(|| fallback(&p.currency))
        .or_else(|| fallback(&p.date_time))
        .unwrap_or(0)
}

/// `text` with every placeholder replaced by its parameter, in characters.
fn hydrated_len(text: &str, names: &[&str], params: &[&Parameter]) -> usize {
    let placeholders: usize = names.iter().map(|n| n.chars().count() + 4).sum();
    let values: usize = params.iter().map(|p| value_len(p)).sum();
    (text.chars().count() + values).saturating_sub(placeholders)
}

/// What is wrong with `sent`'s parameters for `def`, in words a producer can act on; `None`
/// when they fit. The rules are Meta's: count (132000), named vs positional and types (132012),
/// no newlines, tabs or five spaces in a row (132007), hydrated length and OTP length (132005).
pub fn check(def: &TemplateDefinition, sent: &Template) -> Option<String> {
    let params = |kind: &str| -> Vec<&Parameter> {
        sent.components
            .iter()
            .filter(|c| c.kind == kind)
            .flat_map(|c| &c.parameters)
            .collect()
    };
    let name = &def.name;

    // Header: a text header takes its placeholders, a media header one parameter of its type.
    let header = params("header");
    if let Some(h) = def.component("HEADER") {
        let format = h.format.as_deref().unwrap_or("TEXT").to_ascii_uppercase();
        if format == "TEXT" {
            let text = h.text.as_deref().unwrap_or("");
            let names = placeholders(text);
            if header.len() != names.len() {
                return Some(format!(
                    "template {name}: the header takes {} parameter(s), the job gives {}",
                    names.len(),
                    header.len()
                ));
            }
            let len = hydrated_len(text, &names, &header);
            if len > HEADER_LIMIT {
                return Some(format!(
                    "template {name}: the header with its parameters is {len} characters; the limit is {HEADER_LIMIT}"
                ));
            }
        } else {
            let wanted = format.to_ascii_lowercase();
            if header.len() != 1 || header[0].kind != wanted {
                return Some(format!(
                    "template {name}: the {format} header takes one {wanted} parameter, the job gives {}",
                    describe(&header)
                ));
            }
        }
    } else if !header.is_empty() {
        return Some(format!(
            "template {name} has no header parameters, the job gives {}",
            header.len()
        ));
    }

    // Body: count, then named vs positional, types and characters, then lengths.
    let body = params("body");
    let text = def
        .component("BODY")
        .and_then(|b| b.text.as_deref())
        .unwrap_or("");
    let names = placeholders(text);
    if body.len() != names.len() {
        return Some(format!(
            "template {name}: the body takes {} parameter(s), the job gives {}",
            names.len(),
            body.len()
        ));
    }
    for (i, p) in body.iter().enumerate() {
        let at = format!("template {name}: body parameter {}", i + 1);
        match (def.named(), p.parameter_name.as_deref()) {
            (true, None) => {
                return Some(format!(
                    "{at} needs a parameter_name: the template uses named parameters {names:?}"
                ));
            }
            (true, Some(given)) if !names.contains(&given) => {
                return Some(format!(
                    "{at}: parameter_name {given:?} is not one of {names:?}"
                ));
            }
            (false, Some(given)) => {
                return Some(format!(
                    "{at}: the template uses positional parameters; parameter_name {given:?} is not allowed"
                ));
            }
            _ => {}
        }
        if !matches!(p.kind.as_str(), "text" | "currency" | "date_time") {
            return Some(format!(
                "{at}: type {:?} cannot fill a body placeholder (text, currency, date_time)",
                p.kind
            ));
        }
        if let Some(t) = &p.text
            && (t.contains(['\n', '\t']) || t.contains("     "))
        {
            return Some(format!(
                "{at} has a newline, a tab or more than 4 spaces in a row, which Meta refuses"
            ));
        }
    }
    if def.category() == Some(Category::Authentication)
        && let Some(code) = body.first().and_then(|p| p.text.as_deref())
        && code.chars().count() > OTP_LIMIT
    {
        return Some(format!(
            "template {name}: the authentication code is {} characters; the limit is {OTP_LIMIT}",
            code.chars().count()
        ));
    }
    let len = hydrated_len(text, &names, &body);
    if len > BODY_LIMIT {
        return Some(format!(
            "template {name}: the body with its parameters is {len} characters; the limit is {BODY_LIMIT}"
        ));
    }

    // Buttons: a dynamic URL, OTP or copy-code button takes one parameter at its index; a quick
    // reply may take a payload, a catalog or flow button its action.
    let buttons = def
        .component("BUTTONS")
        .map(|b| b.buttons.as_slice())
        .unwrap_or_default();
    let mut given: BTreeMap<usize, (usize, &Component)> = BTreeMap::new();
    for (at, c) in sent.components.iter().enumerate() {
        if c.kind != "button" {
            continue;
        }
        let index = match &c.index {
            Some(serde_json::Value::Number(n)) => n.as_u64().map(|i| i as usize),
            Some(serde_json::Value::String(s)) => s.parse().ok(),
            _ => None,
        };
        match index {
            Some(i) if i < buttons.len() => {
                given.insert(i, (at, c));
            }
            _ => {
                return Some(format!(
                    "template {name} has {} button(s); the job addresses button index {}",
                    buttons.len(),
                    c.index.as_ref().map_or("none".into(), ToString::to_string)
                ));
            }
        }
    }
    for (i, b) in buttons.iter().enumerate() {
        let kind = b.kind.to_ascii_uppercase();
        if let Some(&(at, c)) = given.get(&i)
            && let Some(problem) = action_problem(name, i, &kind, at, c)
        {
            return Some(problem);
        }
        let takes = match kind.as_str() {
            "URL" if b.url.as_deref().is_some_and(|u| u.contains("{{")) => 1..=1,
            "OTP" | "COPY_CODE" => 1..=1,
            "QUICK_REPLY" | "CATALOG" | "FLOW" => 0..=1,
            _ => 0..=0,
        };
        let got = given.get(&i).map_or(0, |(_, c)| c.parameters.len());
        if !takes.contains(&got) {
            let takes = if takes.start() == takes.end() {
                format!("takes {}", takes.start())
            } else {
                format!("takes at most {}", takes.end())
            };
            return Some(format!(
                "template {name}: button {i} ({kind}) {takes} parameter(s), the job gives {got}"
            ));
        }
    }
    None
}

/// A catalog or flow button is addressed by its own `sub_type` and takes only an `action`
/// parameter; no other button takes one. `at` is the component's place in the job's `components`.
fn action_problem(name: &str, i: usize, kind: &str, at: usize, sent: &Component) -> Option<String> {
    let action_kind = |k: &str| {
        ["CATALOG", "FLOW"]
            .iter()
            .any(|a| a.eq_ignore_ascii_case(k))
    };
    let sub_type = sent.sub_type.as_deref().unwrap_or_default();
    let takes_action = action_kind(kind);
    if (takes_action || action_kind(sub_type)) && !sub_type.eq_ignore_ascii_case(kind) {
        return Some(format!(
            "template {name}: components[{at}] is a {sub_type:?} button, but button {i} of the template is {kind}"
        ));
    }
    let (j, p) = sent
        .parameters
        .iter()
        .enumerate()
        .find(|(_, p)| (p.kind == "action") != takes_action)?;
    let wanted = if takes_action {
        "an action"
    } else {
        "no action"
    };
    Some(format!(
        "template {name}: components[{at}].parameters[{j}]: button {i} ({kind}) takes {wanted} parameter, the job gives {:?}",
        p.kind
    ))
}

fn describe(params: &[&Parameter]) -> String {
    match params {
        [] => "none".into(),
        ps => ps
            .iter()
            .map(|p| p.kind.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn def(value: serde_json::Value) -> TemplateDefinition {
        serde_json::from_value(value).unwrap()
    }

    fn sent(components: serde_json::Value) -> Template {
        serde_json::from_value(
            json!({"name": "t", "language": {"code": "en_US"}, "components": components}),
        )
        .unwrap()
    }

    fn order_update() -> TemplateDefinition {
        def(json!({
            "name": "order_update", "language": "en_US", "status": "APPROVED", "category": "UTILITY",
            "id": "1", "quality_score": {"score": "GREEN"},
            "components": [
                {"type": "HEADER", "format": "TEXT", "text": "Order {{1}}"},
                {"type": "BODY", "text": "Hi {{1}}, order {{2}} shipped."},
                {"type": "BUTTONS", "buttons": [
                    {"type": "URL", "text": "Track", "url": "https://x.example/t/{{1}}"},
                    {"type": "QUICK_REPLY", "text": "Stop"}]}
            ]
        }))
    }

    fn text(t: &str) -> serde_json::Value {
        json!({"type": "text", "text": t})
    }

    fn fits() -> serde_json::Value {
        json!([
            {"type": "header", "parameters": [text("A1")]},
            {"type": "body", "parameters": [text("Ann"), text("A1")]},
            {"type": "button", "sub_type": "url", "index": "0", "parameters": [text("A1")]}
        ])
    }

    #[test]
    fn parameters_that_fit_pass() {
        assert_eq!(check(&order_update(), &sent(fits())), None);
    }

    #[test]
    fn each_rule_gives_a_specific_problem() {
        let d = order_update();
        let mut cases = Vec::new();
        let mut c = fits();
        c[1]["parameters"] = json!([text("Ann")]);
        cases.push((c, "the body takes 2 parameter(s), the job gives 1"));
        let mut c = fits();
        c[0]["parameters"] = json!([]);
        cases.push((c, "the header takes 1 parameter(s), the job gives 0"));
        let mut c = fits();
        c[1]["parameters"][0]["text"] = json!("Ann\nB");
        cases.push((c, "newline"));
        let mut c = fits();
        c[1]["parameters"][0]["text"] = json!("x".repeat(1020));
        cases.push((c, "the limit is 1024"));
        let mut c = fits();
        c[0]["parameters"][0]["text"] = json!("x".repeat(60));
        cases.push((c, "the limit is 60"));
        let mut c = fits();
        c[1]["parameters"][0]["parameter_name"] = json!("name");
        cases.push((c, "positional parameters"));
        let mut c = fits();
        c.as_array_mut().unwrap().pop();
        cases.push((c, "button 0 (URL) takes 1 parameter(s), the job gives 0"));
        let mut c = fits();
        c[2]["index"] = json!("5");
        cases.push((c, "addresses button index \"5\""));
        for (components, expected) in cases {
            let problem = check(&d, &sent(components.clone())).unwrap_or_default();
            assert!(
                problem.contains(expected),
                "{components}: {problem:?} should say {expected:?}"
            );
        }
    }

    #[test]
    fn named_templates_need_their_names() {
        let d = def(json!({
            "name": "promo", "language": "en", "status": "APPROVED", "category": "MARKETING",
            "parameter_format": "NAMED",
            "components": [{"type": "BODY", "text": "Hi {{first_name}}, {{deal}}!"}]
        }));
        let named = |a: &str, b: &str| {
            json!([{"type": "body", "parameters": [
                {"type": "text", "parameter_name": a, "text": "x"},
                {"type": "text", "parameter_name": b, "text": "y"}]}])
        };
        assert_eq!(check(&d, &sent(named("first_name", "deal"))), None);
        assert!(
            check(&d, &sent(named("first_name", "offer")))
                .unwrap()
                .contains("\"offer\" is not one of")
        );
        let positional = json!([{"type": "body", "parameters": [text("x"), text("y")]}]);
        assert!(
            check(&d, &sent(positional))
                .unwrap()
                .contains("needs a parameter_name")
        );
    }

    #[test]
    fn authentication_codes_are_at_most_15_characters() {
        let d = def(json!({
            "name": "otp", "language": "en_US", "status": "APPROVED", "category": "AUTHENTICATION",
            "components": [{"type": "BODY", "text": "{{1}} is your code."},
                           {"type": "BUTTONS", "buttons": [{"type": "OTP", "otp_type": "COPY_CODE"}]}]
        }));
        let with = |code: &str| {
            json!([{"type": "body", "parameters": [text(code)]},
                   {"type": "button", "sub_type": "url", "index": 0, "parameters": [text(code)]}])
        };
        assert_eq!(check(&d, &sent(with("123456"))), None);
        assert!(
            check(&d, &sent(with(&"1".repeat(16))))
                .unwrap()
                .contains("the limit is 15")
        );
    }

    /// Meta's catalog template (`intro_catalog_offer`) and a flow template whose second button
    /// is a quick reply.
    fn catalog_and_flow() -> [TemplateDefinition; 2] {
        [
            def(json!({
                "name": "intro_catalog_offer", "language": "en_US", "status": "APPROVED",
                "category": "MARKETING",
                "components": [
                    {"type": "BODY", "text": "Rs {{1}} off on orders above {{2}}, for your first {{3}} orders!"},
                    {"type": "BUTTONS", "buttons": [{"type": "CATALOG", "text": "View catalog"}]}]
            })),
            def(json!({
                "name": "survey_invite", "language": "en_US", "status": "APPROVED",
                "category": "MARKETING",
                "components": [
                    {"type": "BODY", "text": "Tell us how we did."},
                    {"type": "BUTTONS", "buttons": [
                        {"type": "FLOW", "text": "Take the survey", "flow_id": "1234567890"},
                        {"type": "QUICK_REPLY", "text": "Not now"}]}]
            })),
        ]
    }

    fn catalog_send() -> serde_json::Value {
        json!([
            {"type": "body", "parameters": [text("100"), text("400"), text("3")]},
            {"type": "button", "sub_type": "CATALOG", "index": 0, "parameters": [
                {"type": "action", "action": {"thumbnail_product_retailer_id": "2lc20305pt"}}]}
        ])
    }

    fn flow_send() -> serde_json::Value {
        json!([
            {"type": "button", "sub_type": "flow", "index": "0", "parameters": [
                {"type": "action", "action": {"flow_token": "tok-1", "flow_action_data": {"a": 1}}}]}
        ])
    }

    #[test]
    fn catalog_and_flow_buttons_take_their_action_or_nothing() {
        let [catalog, flow] = catalog_and_flow();
        assert_eq!(check(&catalog, &sent(catalog_send())), None);
        assert_eq!(check(&flow, &sent(flow_send())), None);
        // Meta documents the parameter as optional: the catalog's first product, a default token.
        let mut without = catalog_send();
        without.as_array_mut().unwrap().pop();
        assert_eq!(check(&catalog, &sent(without)), None);
        assert_eq!(check(&flow, &sent(json!([]))), None);
    }

    #[test]
    fn an_action_must_go_to_a_catalog_or_flow_button_of_the_definition() {
        let [catalog, flow] = catalog_and_flow();
        let mut cases = Vec::new();
        let mut c = flow_send();
        c[0]["index"] = json!("1");
        cases.push((
            &flow,
            c,
            "components[0] is a \"flow\" button, but button 1 of the template is QUICK_REPLY",
        ));
        let mut c = flow_send();
        c[0]["sub_type"] = json!("quick_reply");
        cases.push((
            &flow,
            c,
            "components[0] is a \"quick_reply\" button, but button 0 of the template is FLOW",
        ));
        let mut c = catalog_send();
        c[1]["sub_type"] = json!("flow");
        cases.push((
            &catalog,
            c,
            "components[1] is a \"flow\" button, but button 0 of the template is CATALOG",
        ));
        let mut c = catalog_send();
        c[1]["sub_type"] = json!("mpm");
        cases.push((
            &catalog,
            c,
            "components[1] is a \"mpm\" button, but button 0 of the template is CATALOG",
        ));
        let mut c = flow_send();
        c[0]["index"] = json!("1");
        c[0]["sub_type"] = json!("quick_reply");
        cases.push((
            &flow,
            c,
            "components[0].parameters[0]: button 1 (QUICK_REPLY) takes no action parameter, the job gives \"action\"",
        ));
        let mut c = flow_send();
        c[0]["parameters"] = json!([{"type": "payload", "payload": "p"}]);
        cases.push((
            &flow,
            c,
            "components[0].parameters[0]: button 0 (FLOW) takes an action parameter, the job gives \"payload\"",
        ));
        let mut c = flow_send();
        let action = c[0]["parameters"][0].clone();
        c[0]["parameters"] = json!([action.clone(), action]);
        cases.push((
            &flow,
            c,
            "button 0 (FLOW) takes at most 1 parameter(s), the job gives 2",
        ));
        for (d, components, expected) in cases {
            let problem = check(d, &sent(components.clone())).unwrap_or_default();
            assert!(
                problem.contains(expected),
                "{components}: {problem:?} should say {expected:?}"
            );
        }
    }

    #[test]
    fn a_media_header_takes_one_parameter_of_its_type() {
        let d = def(json!({
            "name": "m", "language": "en", "status": "APPROVED", "category": "MARKETING",
            "components": [{"type": "HEADER", "format": "IMAGE"}, {"type": "BODY", "text": "Hi"}]
        }));
        let image =
            json!([{"type": "header", "parameters": [{"type": "image", "image": {"id": "1"}}]}]);
        assert_eq!(check(&d, &sent(image)), None);
        let video =
            json!([{"type": "header", "parameters": [{"type": "video", "video": {"id": "1"}}]}]);
        assert!(
            check(&d, &sent(video))
                .unwrap()
                .contains("takes one image parameter, the job gives video")
        );
    }
}
