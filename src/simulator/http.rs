//! The simulator's HTTP surface: Meta's send, template-list and phone-number endpoints, plus
//! `/_sim/*` routes for the audit and for actions (users writing, templates paused, upgrades),
//! and `/healthz` and `/readyz` (always ready) for whoever starts it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::body::{Body as HttpBody, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use chrono::Utc;
use rand::Rng;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::scenario::{Action, Marketing, ParameterFormat, SimNumber, SimTemplate};
use super::statuses::{self, Accepted, Fate, Pricing};
use super::webhooks::Update;
use super::{AcceptedSend, Fault, SimState};
use crate::cloud::{ApiError, ErrorBody, ErrorData};
use crate::job::{Body, Component, Message, Parameter, Template, ViolationKind};

pub(super) fn router(state: Arc<SimState>) -> Router {
    let routes = Router::new()
        .route("/{version}/{phone_number_id}/messages", post(send_message))
        .route(
            "/{version}/{waba_id}/message_templates",
            get(list_templates),
        )
        .route("/{version}/{phone_number_id}", get(phone_number))
        .route("/_sim/audit", get(audit))
        .route("/_sim/actions", post(action))
        .with_state(state)
        .merge(crate::health::router(crate::health::Health::always()))
        .merge(crate::metrics::router());
    crate::metrics::count_requests(routes)
}

/// An error as Meta reports it: HTTP status, `error.code`, optional subcode, title, details.
struct MetaError {
    status: u16,
    code: i64,
    subcode: Option<i64>,
    title: &'static str,
    details: String,
}

fn meta(status: u16, code: i64, title: &'static str, details: impl Into<String>) -> MetaError {
    MetaError {
        status,
        code,
        subcode: None,
        title,
        details: details.into(),
    }
}

fn missing(details: impl Into<String>) -> MetaError {
    meta(400, 131008, "Required parameter is missing", details)
}

fn invalid(details: impl Into<String>) -> MetaError {
    meta(400, 131009, "Parameter value is not valid", details)
}

fn unknown_parameter(details: impl Into<String>) -> MetaError {
    meta(400, 100, "Invalid parameter", details)
}

impl MetaError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ApiError {
                message: format!("(#{}) {}", self.code, self.title),
                kind: "OAuthException".into(),
                code: self.code,
                error_subcode: self.subcode,
                error_data: Some(ErrorData {
                    messaging_product: Some("whatsapp".into()),
                    details: self.details,
                }),
                fbtrace_id: Some(fbtrace_id()),
            },
        };
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        (status, axum::Json(body)).into_response()
    }
}

fn fbtrace_id() -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut rng = rand::rng();
    (0..23)
        .map(|_| char::from(ALPHABET[rng.random_range(0..64)]))
        .collect()
}

fn new_wamid() -> String {
    format!(
        "wamid.HBgL{}",
        uuid::Uuid::new_v4().simple().to_string().to_uppercase()
    )
}

/// `v23.0` → 23.
fn graph_version(version: &str) -> Result<u32, MetaError> {
    version
        .strip_prefix('v')
        .and_then(|v| v.split('.').next())
        .and_then(|major| major.parse().ok())
        .ok_or_else(|| {
            meta(
                400,
                2500,
                "Unknown path components",
                format!("{version:?} is not a Graph API version such as v23.0"),
            )
        })
}

fn check_token(state: &SimState, headers: &HeaderMap) -> Result<(), MetaError> {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let world = state.world.lock().expect("world lock");
    if token.is_some_and(|t| world.scenario.tokens.iter().any(|k| k == t)) {
        Ok(())
    } else {
        Err(MetaError {
            subcode: None,
            ..meta(
                401,
                190,
                "Invalid OAuth access token - Cannot parse access token",
                "The access token is missing, expired or invalid",
            )
        })
    }
}

/// The scenario's number with this id, or Meta's 100/33 for an unknown object.
fn known_number(state: &SimState, phone_number_id: &str) -> Result<SimNumber, MetaError> {
    state
        .world
        .lock()
        .expect("world lock")
        .scenario
        .number(phone_number_id)
        .cloned()
        .ok_or_else(|| no_such_object(phone_number_id))
}

fn no_such_object(id: &str) -> MetaError {
    MetaError {
        subcode: Some(33),
        ..unknown_parameter(format!(
            "Unsupported request. Object with ID '{id}' does not exist, cannot be loaded due to missing permissions, or does not support this operation."
        ))
    }
}

/// Records the error in the audit and answers it.
fn reject(state: &SimState, e: MetaError) -> Response {
    state.audit.lock().expect("audit lock").record_error(e.code);
    e.into_response()
}

/// A management answer: the JSON, or Meta's error (recorded in the audit).
fn json_or_reject(state: &SimState, answer: Result<Value, MetaError>) -> Response {
    match answer {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => reject(state, e),
    }
}

async fn send_message(
    State(state): State<Arc<SimState>>,
    Path((version, phone_number_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(job_id) = callback_data(&body) {
        state
            .audit
            .lock()
            .expect("audit lock")
            .record_arrival(job_id);
    }
    let latency = state
        .world
        .lock()
        .expect("world lock")
        .scenario
        .faults
        .latency
        .sample();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    match accept(&state, &version, &phone_number_id, &headers, &body) {
        Ok(Answer::Now(response)) => response,
        Ok(Answer::Late(delay, response)) => {
            // The message exists; only the answer is late (a timeout makes the send ambiguous).
            tokio::time::sleep(delay).await;
            response
        }
        Ok(Answer::Reset) => reset_connection(),
        Err(e) => reject(&state, e),
    }
}

/// A send request's `biz_opaque_callback_data`, read before anything else is done with it.
fn callback_data(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Probe {
        biz_opaque_callback_data: Option<String>,
    }
    serde_json::from_slice::<Probe>(body)
        .ok()?
        .biz_opaque_callback_data
}

enum Answer {
    Now(Response),
    Late(Duration, Response),
    Reset,
}

/// A response whose body fails at once: hyper drops the connection without an answer.
fn reset_connection() -> Response {
    let failing = futures::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "simulated connection reset",
        ))
    });
    Response::new(HttpBody::from_stream(failing))
}

/// Validates the request as Meta does, applies faults and limits, and accepts the message.
fn accept(
    state: &SimState,
    version: &str,
    phone_number_id: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Answer, MetaError> {
    let version = graph_version(version)?;
    check_token(state, headers)?;
    let number = known_number(state, phone_number_id)?;
    let request = parse_request(body)?;
    if state.record_requests.load(Ordering::Relaxed) {
        state
            .audit
            .lock()
            .expect("audit lock")
            .requests
            .push(Value::Object(request.clone()));
    }
    let envelope = Envelope::take(request)?;
    let template_category = match &envelope.message.body {
        Body::Template(t) => Some(check_template(state, &number, t)?),
        _ => None,
    };

    // Injected faults: scripted rules first, then the scenario's random shares.
    let mut late = None;
    match take_fault(state, envelope.job_id.as_deref()) {
        Some(Fault::Error { code, status }) => {
            return Err(meta(
                status,
                code,
                "Injected error",
                "injected by the simulator's fault plan",
            ));
        }
        Some(Fault::BareStatus(status)) => {
            state
                .audit
                .lock()
                .expect("audit lock")
                .record_error(-i64::from(status));
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            return Ok(Answer::Now((status, "upstream error").into_response()));
        }
        Some(Fault::Reset) => return Ok(Answer::Reset),
        Some(Fault::Delay(d)) => late = Some(d),
        None => match random_fault(state) {
            RandomFault::None => {}
            RandomFault::Transient => {
                return Err(meta(
                    500,
                    131016,
                    "Service unavailable",
                    "A service is temporarily unavailable",
                ));
            }
            RandomFault::BadGateway => {
                state.audit.lock().expect("audit lock").record_error(-502);
                return Ok(Answer::Now(
                    (StatusCode::BAD_GATEWAY, "502 Bad Gateway").into_response(),
                ));
            }
            RandomFault::Reset => return Ok(Answer::Reset),
            RandomFault::Timeout(d) => late = Some(d),
        },
    }

    // Limits and the user's fate, decided atomically under the world lock.
    let now = Instant::now();
    let wall = Utc::now();
    let (fate, window_open) = {
        let mut world = state.world.lock().expect("world lock");
        if world
            .maintenance
            .get(phone_number_id)
            .is_some_and(|until| now < *until)
        {
            return Err(meta(
                500,
                131057,
                "Account in maintenance mode",
                "The business account is in maintenance mode (throughput upgrade in progress).",
            ));
        }
        let limit = world
            .scenario
            .number(phone_number_id)
            .map_or(number.throughput(), SimNumber::throughput);
        if !world.throughput.try_take(phone_number_id, limit, now) {
            return Err(MetaError {
                subcode: Some(2494055),
                ..meta(
                    400,
                    130429,
                    "Rate limit hit",
                    "Cloud API message throughput has been reached.",
                )
            });
        }
        if !world.pairs.try_take(phone_number_id, &envelope.wa_id, now) {
            return Err(meta(
                400,
                131056,
                "(Business Account, Consumer Account) pair rate limit hit",
                "Message failed to send because there were too many messages sent from this phone number to the same phone number in a short period of time.",
            ));
        }
        world.sends += 1;
        if world.sends.is_multiple_of(65_536) {
            world.pairs.sweep(now);
        }
        let window_open = world.window_open(phone_number_id, &envelope.wa_id, wall);
        let marketing = template_category.as_deref() == Some("MARKETING");
        let waba = number.waba_id.clone();
        let user = world.user(&envelope.wa_id);
        let fate = if !user.reachable {
            Fate::Fail(131026)
        } else if template_category.is_none() && !window_open {
            Fate::Fail(131047)
        } else if marketing && user.stopped_marketing.contains(&waba) {
            Fate::Fail(131050)
        } else if marketing && capped(user, wall) {
            Fate::Fail(131049)
        } else {
            if marketing {
                user.marketing_received.push_back(wall);
            }
            Fate::Deliver { read: user.reads }
        };
        (fate, window_open)
    };

    let wamid = new_wamid();
    let send = AcceptedSend {
        phone_number_id: phone_number_id.to_owned(),
        to: envelope.wa_id.clone(),
        kind: envelope.message.body.kind().to_owned(),
        job_id: envelope.job_id.clone(),
        wamid: wamid.clone(),
        waba_id: number.waba_id.clone(),
        outside_window: !window_open,
        at_ms: 0,
        at: None,
    };
    state
        .audit
        .lock()
        .expect("audit lock")
        .record_accepted(send, now);
    let accepted = Accepted {
        number,
        wamid: wamid.clone(),
        recipient: envelope.wa_id.clone(),
        job_id: envelope.job_id,
        pricing: Pricing::for_message(template_category.as_deref(), window_open),
        version,
    };
    schedule_statuses(state, &accepted, fate, wall);

    let mut answer = json!({
        "messaging_product": "whatsapp",
        "contacts": [{"input": envelope.to, "wa_id": envelope.wa_id}],
        "messages": [{"id": wamid}],
    });
    if template_category.is_some() {
        answer["messages"][0]["message_status"] = json!("accepted");
    }
    let mut response = (StatusCode::OK, axum::Json(answer)).into_response();
    let h = response.headers_mut();
    h.insert(
        "facebook-api-version",
        HeaderValue::from_str(&format!("v{version}.0")).expect("ascii"),
    );
    h.insert(
        "x-fb-trace-id",
        HeaderValue::from_str(&fbtrace_id()).expect("ascii"),
    );
    Ok(match late {
        Some(d) => Answer::Late(d, response),
        None => Answer::Now(response),
    })
}

/// Whether the user has had their fill of marketing for the last 24 h (131049).
fn capped(user: &mut super::UserState, now: chrono::DateTime<Utc>) -> bool {
    while user
        .marketing_received
        .front()
        .is_some_and(|at| now - *at >= chrono::Duration::hours(24))
    {
        user.marketing_received.pop_front();
    }
    user.marketing_cap_per_day
        .is_some_and(|cap| user.marketing_received.len() >= cap as usize)
}

fn schedule_statuses(
    state: &SimState,
    accepted: &Accepted,
    fate: Fate,
    now: chrono::DateTime<Utc>,
) {
    let settings = &state.outbox.settings;
    let reorder = settings.reorder_share > 0.0 && rand::rng().random_bool(settings.reorder_share);
    let plan = statuses::plan(accepted, fate, settings, reorder, now);
    let mut audit = state.audit.lock().expect("audit lock");
    for step in plan {
        *audit.webhooks.scheduled.entry(step.kind).or_default() += 1;
        state.outbox.send_after(
            step.after,
            Update {
                waba_id: accepted.number.waba_id.clone(),
                field: "messages",
                value: step.value,
            },
        );
    }
}

fn parse_request(body: &[u8]) -> Result<serde_json::Map<String, Value>, MetaError> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(unknown_parameter("The request body must be a JSON object")),
        Err(e) => Err(unknown_parameter(format!("Malformed JSON: {e}"))),
    }
}

/// The send request's envelope fields, and the message they wrap.
struct Envelope {
    to: String,
    wa_id: String,
    job_id: Option<String>,
    message: Message,
}

impl Envelope {
    fn take(mut object: serde_json::Map<String, Value>) -> Result<Self, MetaError> {
        match object.remove("messaging_product") {
            Some(Value::String(p)) if p == "whatsapp" => {}
            Some(other) => {
                return Err(invalid(format!(
                    "messaging_product: {other} is not \"whatsapp\""
                )));
            }
            None => return Err(missing("messaging_product is required")),
        }
        match object.remove("recipient_type") {
            None => {}
            Some(Value::String(t)) if t == "individual" || t == "group" => {}
            Some(other) => {
                return Err(invalid(format!(
                    "recipient_type: {other} is not individual or group"
                )));
            }
        }
        let to = match object.remove("to") {
            Some(Value::String(to)) => to,
            Some(other) => return Err(invalid(format!("to: {other} is not a phone number"))),
            None => return Err(missing("to is required")),
        };
        let digits = to.strip_prefix('+').unwrap_or(&to);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.len() > 15 {
            return Err(invalid(format!("to: {to:?} is not a valid phone number")));
        }
        let wa_id = digits.to_owned();
        let job_id = match object.remove("biz_opaque_callback_data") {
            None => None,
            Some(Value::String(s)) if s.chars().count() <= 512 => Some(s),
            Some(_) => {
                return Err(invalid(
                    "biz_opaque_callback_data must be a string of at most 512 characters",
                ));
            }
        };
        let message = Message::from_value(Value::Object(object), "message").map_err(|v| {
            let field = v.field.strip_prefix("message.").unwrap_or(&v.field);
            let details = format!("{field}: {}", v.problem);
            match v.kind {
                ViolationKind::Missing => missing(details),
                ViolationKind::NotAllowed => unknown_parameter(details),
                ViolationKind::Invalid => invalid(details),
            }
        })?;
        Ok(Envelope {
            to,
            wa_id,
            job_id,
            message,
        })
    }
}

/// Checks a template send against the registry as Meta does; returns the template's category.
fn check_template(state: &SimState, number: &SimNumber, t: &Template) -> Result<String, MetaError> {
    let template = {
        let world = state.world.lock().expect("world lock");
        world
            .scenario
            .template(&number.waba_id, &t.name, &t.language.code)
            .cloned()
    };
    let not_found = |why: String| {
        meta(
            404,
            132001,
            "Template name does not exist in the translation",
            why,
        )
    };
    let template = template.ok_or_else(|| {
        not_found(format!(
            "template name ({}) does not exist in {}",
            t.name, t.language.code
        ))
    })?;
    match template.status.as_str() {
        "APPROVED" => {}
        "PAUSED" => {
            return Err(meta(
                400,
                132015,
                "Template is paused",
                format!("template {} is paused due to low quality", t.name),
            ));
        }
        "DISABLED" => {
            return Err(meta(
                400,
                132016,
                "Template is disabled",
                format!("template {} has been disabled", t.name),
            ));
        }
        other => {
            return Err(not_found(format!(
                "template {} is {other}, not approved",
                t.name
            )));
        }
    }
    check_template_params(&template, t)?;
    Ok(template.category)
}

fn mismatch(details: String) -> MetaError {
    meta(
        400,
        132000,
        "Number of parameters does not match the expected number of params",
        details,
    )
}

fn format_mismatch(details: String) -> MetaError {
    meta(
        400,
        132012,
        "Parameter format does not match format in the created template",
        details,
    )
}

/// Parameter count (132000), format (132012), characters (132007) and hydrated length (132005).
fn check_template_params(template: &SimTemplate, t: &Template) -> Result<(), MetaError> {
    let params_of = |kind: &str| -> Vec<&Parameter> {
        t.components
            .iter()
            .filter(|c| c.kind == kind)
            .flat_map(|c| &c.parameters)
            .collect()
    };
    // Header: a text header takes its placeholders, a media header one parameter of its type.
    let header = params_of("header");
    let header_format = template.header_format.as_deref().unwrap_or("TEXT");
    let header_expected = if template.header_format.is_some() && header_format != "TEXT" {
        1
    } else {
        template.header_params().len()
    };
    if header.len() != header_expected {
        return Err(mismatch(format!(
            "header: number of localizable_params ({}) does not match the expected number of params ({header_expected})",
            header.len()
        )));
    }
    if let Some(p) = header.first() {
        let wanted = header_format.to_ascii_lowercase();
        if p.kind != wanted {
            return Err(format_mismatch(format!(
                "header: parameter type {:?} does not match the template's {header_format} header",
                p.kind
            )));
        }
    }
    // Body: count, then named vs positional.
    let body = params_of("body");
    let names = template.body_params();
    if body.len() != names.len() {
        return Err(mismatch(format!(
            "body: number of localizable_params ({}) does not match the expected number of params ({})",
            body.len(),
            names.len()
        )));
    }
    for (i, p) in body.iter().enumerate() {
        match (template.parameter_format, &p.parameter_name) {
            (ParameterFormat::Named, None) => {
                return Err(format_mismatch(format!(
                    "body.parameters[{i}]: the template uses named parameters; parameter_name is required"
                )));
            }
            (ParameterFormat::Named, Some(name)) if !names.contains(name) => {
                return Err(format_mismatch(format!(
                    "body.parameters[{i}]: parameter_name {name:?} is not one of {names:?}"
                )));
            }
            (ParameterFormat::Positional, Some(name)) => {
                return Err(format_mismatch(format!(
                    "body.parameters[{i}]: the template uses positional parameters; parameter_name {name:?} is not allowed"
                )));
            }
            _ => {}
        }
        if !matches!(p.kind.as_str(), "text" | "currency" | "date_time") {
            return Err(format_mismatch(format!(
                "body.parameters[{i}]: type {:?} is not allowed in a body (text, currency, date_time)",
                p.kind
            )));
        }
        if let Some(text) = &p.text
            && (text.contains(['\n', '\t']) || text.contains("     "))
        {
            return Err(meta(
                400,
                132007,
                "Template Format Character Policy Violated",
                format!(
                    "body.parameters[{i}]: parameters cannot have new-line/tab characters or more than 4 consecutive spaces"
                ),
            ));
        }
    }
    if template.category == "AUTHENTICATION"
        && let Some(code) = body.first().and_then(|p| p.text.as_deref())
        && code.chars().count() > 15
    {
        return Err(meta(
            400,
            132005,
            "Translated text too long",
            format!(
                "authentication code is {} characters; the limit is 15",
                code.chars().count()
            ),
        ));
    }
    let hydrated = hydrate(&template.body, &names, &body);
    if hydrated > 1024 {
        return Err(meta(
            400,
            132005,
            "Translated text too long",
            format!(
                "body: the text with its parameters is {hydrated} characters; the limit is 1024"
            ),
        ));
    }
    if let Some(text) = &template.header_text {
        let hydrated = hydrate(text, &template.header_params(), &header);
        if hydrated > 60 {
            return Err(meta(
                400,
                132005,
                "Translated text too long",
                format!(
                    "header: the text with its parameters is {hydrated} characters; the limit is 60"
                ),
            ));
        }
    }
    // Buttons: every dynamic button needs its parameter, addressed by index.
    let mut given: HashMap<usize, usize> = HashMap::new();
    for c in t.components.iter().filter(|c| c.kind == "button") {
        let index = match &c.index {
            Some(Value::Number(n)) => n.as_u64().map(|i| i as usize),
            Some(Value::String(s)) => s.parse().ok(),
            _ => None,
        };
        let Some(index) = index.filter(|i| *i < template.buttons.len()) else {
            return Err(mismatch(format!(
                "button index {:?}: the template has {} buttons",
                c.index,
                template.buttons.len()
            )));
        };
        check_action_button(&template.buttons[index].kind, index, c)?;
        *given.entry(index).or_default() += c.parameters.len();
    }
    for index in 0..template.buttons.len() {
        let expected = usize::from(template.button_takes_param(index));
        let got = given.get(&index).copied().unwrap_or(0);
        // A quick reply's payload, a catalog's thumbnail and a flow's token are optional.
        let optional = matches!(
            template.buttons[index].kind.as_str(),
            "QUICK_REPLY" | "CATALOG" | "FLOW"
        ) && got == 1;
        if got != expected && !optional {
            return Err(mismatch(format!(
                "buttons[{index}]: number of params ({got}) does not match the expected number of params ({expected})"
            )));
        }
    }
    Ok(())
}

/// A catalog or flow button is sent with its own `sub_type` and only an `action` parameter; no
/// other button takes an action (132012 either way).
fn check_action_button(kind: &str, index: usize, c: &Component) -> Result<(), MetaError> {
    let action_kind = |k: &str| k.eq_ignore_ascii_case("CATALOG") || k.eq_ignore_ascii_case("FLOW");
    let sub_type = c.sub_type.as_deref().unwrap_or_default();
    let takes_action = action_kind(kind);
    if (takes_action || action_kind(sub_type)) && !sub_type.eq_ignore_ascii_case(kind) {
        return Err(format_mismatch(format!(
            "buttons[{index}]: sub_type {sub_type:?} does not match the template's {kind} button"
        )));
    }
    match c
        .parameters
        .iter()
        .find(|p| (p.kind == "action") != takes_action)
    {
        Some(p) => Err(format_mismatch(format!(
            "buttons[{index}]: parameter type {:?} does not match the template's {kind} button",
            p.kind
        ))),
        None => Ok(()),
    }
}

/// Length in characters of `text` with its placeholders replaced by the parameters.
fn hydrate(text: &str, names: &[String], params: &[&Parameter]) -> usize {
    let placeholder_len: usize = names.iter().map(|n| n.chars().count() + 4).sum();
    let values: usize = params
        .iter()
        .map(|p| {
            let fallback = |v: &Option<Value>| {
                v.as_ref()
                    .and_then(|v| v.get("fallback_value"))
                    .and_then(Value::as_str)
                    .map_or(0, |s| s.chars().count())
            };
            p.text
                .as_deref()
                .map(|t| t.chars().count())
                .unwrap_or_else(|| fallback(&p.currency).max(fallback(&p.date_time)))
        })
        .sum();
    (text.chars().count() + values).saturating_sub(placeholder_len)
}

enum RandomFault {
    None,
    Transient,
    BadGateway,
    Reset,
    Timeout(Duration),
}

fn random_fault(state: &SimState) -> RandomFault {
    let faults = state
        .world
        .lock()
        .expect("world lock")
        .scenario
        .faults
        .clone();
    let total = faults.transient_share
        + faults.bad_gateway_share
        + faults.reset_share
        + faults.timeout_share;
    if total <= 0.0 {
        return RandomFault::None;
    }
    let draw: f64 = rand::rng().random();
    let mut edge = faults.transient_share;
    if draw < edge {
        return RandomFault::Transient;
    }
    edge += faults.bad_gateway_share;
    if draw < edge {
        return RandomFault::BadGateway;
    }
    edge += faults.reset_share;
    if draw < edge {
        return RandomFault::Reset;
    }
    edge += faults.timeout_share;
    if draw < edge {
        return RandomFault::Timeout(Duration::from_millis(faults.timeout_ms));
    }
    RandomFault::None
}

fn take_fault(state: &SimState, job_id: Option<&str>) -> Option<Fault> {
    let mut faults = state.faults.lock().expect("faults lock");
    if faults.is_empty() {
        return None;
    }
    let index = faults
        .iter()
        .position(|r| r.times > 0 && r.job_id.as_deref().is_none_or(|j| Some(j) == job_id))?;
    let rule = &mut faults[index];
    rule.times -= 1;
    let fault = rule.fault.clone();
    if rule.times == 0 {
        faults.remove(index);
    }
    Some(fault)
}

const TEMPLATE_DEFAULT_FIELDS: &[&str] = &[
    "name",
    "parameter_format",
    "components",
    "language",
    "status",
    "category",
    "id",
];
const TEMPLATE_FIELDS: &[&str] = &[
    "id",
    "name",
    "language",
    "status",
    "category",
    "components",
    "parameter_format",
    "quality_score",
    "rejected_reason",
];

/// The `fields=a,b` a caller asked for, or the endpoint's defaults.
fn requested_fields<'a>(asked: Option<&'a String>, default: &[&'a str]) -> Vec<&'a str> {
    match asked {
        Some(f) => f
            .split(',')
            .map(str::trim)
            .filter(|f| !f.is_empty())
            .collect(),
        None => default.to_vec(),
    }
}

/// `GET /{version}/{waba_id}/message_templates`: fields, filters and cursor paging.
async fn list_templates(
    State(state): State<Arc<SimState>>,
    Path((version, waba_id)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    // Graph's paging links are absolute; ours point back at this simulator.
    let base = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .map_or_else(|| "http://localhost".to_owned(), |h| format!("http://{h}"));
    let page = templates_page(&state, &base, &version, &waba_id, &query, &headers);
    json_or_reject(&state, page)
}

fn templates_page(
    state: &SimState,
    base: &str,
    version: &str,
    waba_id: &str,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Result<Value, MetaError> {
    graph_version(version)?;
    check_token(state, headers)?;
    let world = state.world.lock().expect("world lock");
    if !world.scenario.numbers.iter().any(|n| n.waba_id == waba_id) {
        return Err(no_such_object(waba_id));
    }
    let fields = requested_fields(query.get("fields"), TEMPLATE_DEFAULT_FIELDS);
    if let Some(unknown) = fields.iter().find(|f| !TEMPLATE_FIELDS.contains(f)) {
        return Err(unknown_parameter(format!(
            "Tried accessing nonexisting field ({unknown}) on node type (WhatsAppBusinessHSM)"
        )));
    }
    let limit = match query.get("limit") {
        None => 25,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=1000).contains(l))
            .ok_or_else(|| invalid(format!("limit: {l:?} is not a number between 1 and 1000")))?,
    };
    let matches = |t: &&SimTemplate| {
        t.waba_id == waba_id
            && query
                .get("name")
                .is_none_or(|n| t.name.contains(n.as_str()))
            && query
                .get("status")
                .is_none_or(|s| t.status.eq_ignore_ascii_case(s))
            && query
                .get("category")
                .is_none_or(|c| t.category.eq_ignore_ascii_case(c))
            && query.get("language").is_none_or(|l| &t.language == l)
    };
    let all: Vec<&SimTemplate> = world.scenario.templates.iter().filter(matches).collect();
    let cursor = |i: usize| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(i.to_string());
    let decode = |c: &String| -> Result<usize, MetaError> {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(c)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| invalid(format!("cursor {c:?} is not valid")))
    };
    let (start, end) = match (query.get("after"), query.get("before")) {
        (Some(after), _) => {
            let start = decode(after)? + 1;
            (start, (start + limit).min(all.len()))
        }
        (None, Some(before)) => {
            let end = decode(before)?.min(all.len());
            (end.saturating_sub(limit), end)
        }
        (None, None) => (0, limit.min(all.len())),
    };
    let start = start.min(end);
    let data: Vec<Value> = all[start..end]
        .iter()
        .map(|t| template_json(t, &fields))
        .collect();
    let mut page = json!({ "data": data });
    if start < end {
        page["paging"] = json!({"cursors": {"before": cursor(start), "after": cursor(end - 1)}});
        // Links keep the caller's fields and filters, with the cursor replaced.
        let mut kept: Vec<(&String, &String)> = query
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "after" | "before" | "limit"))
            .collect();
        kept.sort();
        let link = |cursor_name: &str, cursor_value: String| {
            let mut url = format!(
                "{base}/{version}/{waba_id}/message_templates?limit={limit}&{cursor_name}={cursor_value}"
            );
            for (k, v) in &kept {
                url.push_str(&format!("&{}={}", percent_encode(k), percent_encode(v)));
            }
            url
        };
        if end < all.len() {
            page["paging"]["next"] = json!(link("after", cursor(end - 1)));
        }
        if start > 0 {
            page["paging"]["previous"] = json!(link("before", cursor(start)));
        }
    }
    Ok(page)
}

/// Percent-encodes a query component (everything but unreserved characters and commas).
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b',' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A template as the management API returns it, with only the asked-for fields (`id` always).
fn template_json(t: &SimTemplate, fields: &[&str]) -> Value {
    let mut out = serde_json::Map::new();
    for field in fields.iter().chain(std::iter::once(&"id")) {
        let value = match *field {
            "id" => json!(t.id),
            "name" => json!(t.name),
            "language" => json!(t.language),
            "status" => json!(t.status),
            "category" => json!(t.category),
            "parameter_format" => json!(match t.parameter_format {
                ParameterFormat::Positional => "POSITIONAL",
                ParameterFormat::Named => "NAMED",
            }),
            "quality_score" => json!({"score": "GREEN"}),
            "rejected_reason" => json!("NONE"),
            "components" => template_components(t),
            _ => continue,
        };
        out.insert((*field).to_owned(), value);
    }
    Value::Object(out)
}

fn template_components(t: &SimTemplate) -> Value {
    let example = |names: &[String]| -> Value {
        match t.parameter_format {
            ParameterFormat::Positional => json!([names
                .iter()
                .map(|n| format!("example {n}"))
                .collect::<Vec<_>>()]),
            ParameterFormat::Named => json!(
                names
                    .iter()
                    .map(|n| json!({"param_name": n, "example": format!("example {n}")}))
                    .collect::<Vec<_>>()
            ),
        }
    };
    let mut components = Vec::new();
    match (t.header_format.as_deref(), &t.header_text) {
        (None | Some("TEXT"), Some(text)) => {
            let mut h = json!({"type": "HEADER", "format": "TEXT", "text": text});
            let names = t.header_params();
            if !names.is_empty() {
                h["example"] = json!({"header_text": names.iter().map(|n| format!("example {n}")).collect::<Vec<_>>()});
            }
            components.push(h);
        }
        (Some(format), _) if format != "TEXT" => {
            components.push(json!({"type": "HEADER", "format": format}));
        }
        _ => {}
    }
    let mut body = json!({"type": "BODY", "text": t.body});
    let names = t.body_params();
    if !names.is_empty() {
        let key = match t.parameter_format {
            ParameterFormat::Positional => "body_text",
            ParameterFormat::Named => "body_text_named_params",
        };
        body["example"] = json!({ key: example(&names) });
    }
    components.push(body);
    if let Some(footer) = &t.footer {
        components.push(json!({"type": "FOOTER", "text": footer}));
    }
    if !t.buttons.is_empty() {
        let buttons: Vec<Value> = t
            .buttons
            .iter()
            .map(|b| {
                let mut v = json!({"type": b.kind, "text": b.text});
                if let Some(url) = &b.url {
                    v["url"] = json!(url);
                }
                v
            })
            .collect();
        components.push(json!({"type": "BUTTONS", "buttons": buttons}));
    }
    Value::Array(components)
}

const NUMBER_DEFAULT_FIELDS: &[&str] = &[
    "id",
    "display_phone_number",
    "verified_name",
    "quality_rating",
];

/// `GET /{version}/{phone_number_id}`.
async fn phone_number(
    State(state): State<Arc<SimState>>,
    Path((version, phone_number_id)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let fields = phone_number_fields(&state, &version, &phone_number_id, &query, &headers);
    json_or_reject(&state, fields)
}

fn phone_number_fields(
    state: &SimState,
    version: &str,
    phone_number_id: &str,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Result<Value, MetaError> {
    graph_version(version)?;
    check_token(state, headers)?;
    let number = known_number(state, phone_number_id)?;
    let fields = requested_fields(query.get("fields"), NUMBER_DEFAULT_FIELDS);
    let mut out = serde_json::Map::new();
    for field in fields.iter().chain(std::iter::once(&"id")) {
        let value = match *field {
            "id" => json!(number.phone_number_id),
            "display_phone_number" => json!(number.display_phone_number),
            "verified_name" => json!(number.verified_name),
            "quality_rating" => json!(number.quality_rating),
            "throughput" => json!({"level": number.throughput_level()}),
            "whatsapp_business_manager_messaging_limit" | "messaging_limit_tier" => {
                json!(number.messaging_limit)
            }
            "status" => json!("CONNECTED"),
            "platform_type" => json!("CLOUD_API"),
            "code_verification_status" => json!("VERIFIED"),
            "name_status" => json!("APPROVED"),
            unknown => {
                return Err(unknown_parameter(format!(
                    "Tried accessing nonexisting field ({unknown}) on node type (WhatsAppBusinessPhoneNumber)"
                )));
            }
        };
        out.insert((*field).to_owned(), value);
    }
    Ok(Value::Object(out))
}

async fn audit(State(state): State<Arc<SimState>>) -> Response {
    let audit = state.audit.lock().expect("audit lock").clone();
    axum::Json(json!({
        "numbers": audit.numbers(),
        "errors": audit.errors,
        "duplicates": audit.duplicates,
        "accepted": audit.accepted.len(),
        "webhooks": audit.webhooks,
    }))
    .into_response()
}

/// `POST /_sim/actions` with an [`Action`] as JSON.
async fn action(State(state): State<Arc<SimState>>, body: Bytes) -> Response {
    let action: Action = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("not an action: {e}")).into_response(),
    };
    match apply(&state, action) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => (StatusCode::NOT_FOUND, e).into_response(),
    }
}

/// Applies an action to the world and sends the webhook Meta would send.
pub(super) fn apply(state: &SimState, action: Action) -> Result<(), String> {
    let now = Utc::now();
    let mut world = state.world.lock().expect("world lock");
    let number_of = |world: &super::World, id: &str| {
        world
            .scenario
            .number(id)
            .cloned()
            .ok_or_else(|| format!("no number {id} in the scenario"))
    };
    let (update, kind, delay) = match action {
        Action::Inbound {
            from,
            phone_number_id,
            text,
        } => {
            let number = number_of(&world, &phone_number_id)?;
            let user = world.user(&from);
            user.last_inbound.insert(phone_number_id, now);
            let value = statuses::inbound_text(
                &number,
                &from,
                &user.name.clone(),
                &new_wamid(),
                &text,
                now,
            );
            (
                Update {
                    waba_id: number.waba_id,
                    field: "messages",
                    value,
                },
                "inbound",
                Duration::ZERO,
            )
        }
        Action::MarketingPreference {
            wa_id,
            phone_number_id,
            value,
        } => {
            let number = number_of(&world, &phone_number_id)?;
            let user = world.user(&wa_id);
            user.stopped_marketing.retain(|w| *w != number.waba_id);
            let stop = value == Marketing::Stopped;
            if stop {
                user.stopped_marketing.push(number.waba_id.clone());
            }
            let value = statuses::user_preference(&number, &wa_id, stop, now);
            (
                Update {
                    waba_id: number.waba_id,
                    field: "user_preferences",
                    value,
                },
                "user_preferences",
                Duration::ZERO,
            )
        }
        Action::TemplateStatus {
            waba_id,
            name,
            language,
            status,
        } => {
            let waba_id = waba_id
                .or_else(|| world.scenario.numbers.first().map(|n| n.waba_id.clone()))
                .unwrap_or_default();
            let template = world
                .scenario
                .templates
                .iter_mut()
                .find(|t| t.waba_id == waba_id && t.name == name && t.language == language)
                .ok_or_else(|| format!("no template {name} in {language} in WABA {waba_id}"))?;
            template.status.clone_from(&status);
            let value = statuses::template_status(template, &status, now);
            (
                Update {
                    waba_id: template.waba_id.clone(),
                    field: "message_template_status_update",
                    value,
                },
                "template_status",
                Duration::ZERO,
            )
        }
        Action::ThroughputUpgrade {
            phone_number_id,
            maintenance_ms,
        } => {
            let number = world
                .scenario
                .number_mut(&phone_number_id)
                .ok_or_else(|| format!("no number {phone_number_id} in the scenario"))?;
            number.throughput_mps = Some(1000);
            number.coexistence = false;
            number.messaging_limit = "TIER_UNLIMITED".into();
            let number = number.clone();
            let maintenance = Duration::from_millis(maintenance_ms);
            world
                .maintenance
                .insert(phone_number_id, Instant::now() + maintenance);
            let value = statuses::throughput_upgrade(&number);
            (
                Update {
                    waba_id: number.waba_id,
                    field: "phone_number_quality_update",
                    value,
                },
                "throughput_upgrade",
                maintenance,
            )
        }
    };
    drop(world);
    *state
        .audit
        .lock()
        .expect("audit lock")
        .webhooks
        .scheduled
        .entry(kind.to_owned())
        .or_default() += 1;
    state.outbox.send_after(delay, update);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Template;

    fn template_send(value: Value) -> Template {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn hydrated_length_replaces_placeholders() {
        let p = Parameter {
            kind: "text".into(),
            parameter_name: None,
            text: Some("Ann".into()),
            payload: None,
            coupon_code: None,
            currency: None,
            date_time: None,
            image: None,
            video: None,
            document: None,
            location: None,
            action: None,
        };
        assert_eq!(hydrate("Hi {{1}}!", &["1".into()], &[&p]), "Hi Ann!".len());
    }

    #[test]
    fn template_parameter_rules_map_to_meta_codes() {
        let mut named = SimTemplate::new("t", "en_US", "UTILITY", "Hi {{first_name}}");
        named.parameter_format = ParameterFormat::Named;
        let positional = SimTemplate::new("t", "en_US", "UTILITY", "Hi {{1}}");
        let send = |params: Value| {
            template_send(json!({"name": "t", "language": {"code": "en_US"},
                "components": [{"type": "body", "parameters": params}]}))
        };
        let code =
            |t: &SimTemplate, s: &Template| check_template_params(t, s).err().map(|e| e.code);
        assert_eq!(
            code(&positional, &send(json!([{"type": "text", "text": "Ann"}]))),
            None
        );
        assert_eq!(code(&positional, &send(json!([]))), Some(132000));
        assert_eq!(
            code(
                &positional,
                &send(json!([{"type": "text", "text": "Ann", "parameter_name": "x"}]))
            ),
            Some(132012)
        );
        assert_eq!(
            code(&named, &send(json!([{"type": "text", "text": "Ann"}]))),
            Some(132012)
        );
        assert_eq!(
            code(
                &named,
                &send(json!([{"type": "text", "text": "Ann", "parameter_name": "first_name"}]))
            ),
            None
        );
        assert_eq!(
            code(
                &positional,
                &send(json!([{"type": "text", "text": "A\nB"}]))
            ),
            Some(132007)
        );
        let long = "x".repeat(1030);
        assert_eq!(
            code(&positional, &send(json!([{"type": "text", "text": long}]))),
            Some(132005)
        );
    }

    #[test]
    fn dynamic_buttons_need_their_parameter() {
        let mut t = SimTemplate::new("otp", "en_US", "AUTHENTICATION", "{{1}} is your code");
        t.buttons.push(super::super::SimButton {
            kind: "OTP".into(),
            text: "Copy".into(),
            url: None,
        });
        let without = template_send(json!({"name": "otp", "language": {"code": "en_US"},
            "components": [{"type": "body", "parameters": [{"type": "text", "text": "123456"}]}]}));
        assert_eq!(
            check_template_params(&t, &without).err().map(|e| e.code),
            Some(132000)
        );
        let with = template_send(json!({"name": "otp", "language": {"code": "en_US"},
            "components": [{"type": "body", "parameters": [{"type": "text", "text": "123456"}]},
                {"type": "button", "sub_type": "url", "index": "0", "parameters": [{"type": "text", "text": "123456"}]}]}));
        assert!(check_template_params(&t, &with).is_ok());
        let long = template_send(json!({"name": "otp", "language": {"code": "en_US"},
            "components": [{"type": "body", "parameters": [{"type": "text", "text": "1234567890123456"}]},
                {"type": "button", "sub_type": "url", "index": "0", "parameters": [{"type": "text", "text": "1"}]}]}));
        assert_eq!(
            check_template_params(&t, &long).err().map(|e| e.code),
            Some(132005)
        );
    }

    #[test]
    fn catalog_and_flow_buttons_take_an_optional_action() {
        let button = |kind: &str| super::super::SimButton {
            kind: kind.into(),
            text: "Open".into(),
            url: None,
        };
        let mut t = SimTemplate::new("offer", "en_US", "MARKETING", "Hi");
        t.buttons = vec![button("CATALOG"), button("FLOW"), button("QUICK_REPLY")];
        let send = |buttons: Value| {
            template_send(
                json!({"name": "offer", "language": {"code": "en_US"}, "components": buttons}),
            )
        };
        let catalog = json!({"type": "button", "sub_type": "CATALOG", "index": 0, "parameters": [
            {"type": "action", "action": {"thumbnail_product_retailer_id": "2lc20305pt"}}]});
        let flow = json!({"type": "button", "sub_type": "flow", "index": "1", "parameters": [
            {"type": "action", "action": {"flow_token": "tok-1"}}]});
        let code = |buttons: Value| {
            check_template_params(&t, &send(buttons))
                .err()
                .map(|e| e.code)
        };
        assert_eq!(code(json!([catalog, flow])), None);
        assert_eq!(code(json!([])), None, "both actions are optional");
        let mut wrong_kind = flow.clone();
        wrong_kind["index"] = json!("0");
        assert_eq!(code(json!([wrong_kind])), Some(132012));
        let mut on_quick_reply = flow.clone();
        on_quick_reply["index"] = json!("2");
        on_quick_reply["sub_type"] = json!("quick_reply");
        assert_eq!(code(json!([on_quick_reply])), Some(132012));
        let mut two = flow.clone();
        two["parameters"] = json!([flow["parameters"][0], flow["parameters"][0]]);
        assert_eq!(code(json!([two])), Some(132000));
    }
}
