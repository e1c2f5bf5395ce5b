//! The simulator's HTTP surface: Meta's send endpoint plus `/_sim/*` control and audit routes.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rand::Rng;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::{AcceptedSend, Fault, SimState};
use crate::cloud::{ApiError, ErrorBody, ErrorData};
use crate::job::{Body, Message};

pub(super) fn router(state: Arc<SimState>) -> Router {
    Router::new()
        .route("/{version}/{phone_number_id}/messages", post(send_message))
        .route("/_sim/audit", get(audit))
        .route("/_sim/health", get(|| async { "ok" }))
        .with_state(state)
}

/// Meta's error answer.
fn meta_error(
    status: u16,
    code: i64,
    subcode: Option<i64>,
    title: &str,
    details: impl Into<String>,
) -> Response {
    let body = ErrorBody {
        error: ApiError {
            message: format!("(#{code}) {title}"),
            kind: "OAuthException".into(),
            code,
            error_subcode: subcode,
            error_data: Some(ErrorData {
                messaging_product: Some("whatsapp".into()),
                details: details.into(),
            }),
            fbtrace_id: Some(fbtrace_id()),
        },
    };
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
        axum::Json(body),
    )
        .into_response()
}

fn fbtrace_id() -> String {
    let mut rng = rand::rng();
    (0..23)
        .map(|_| {
            char::from(
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
                    [rng.random_range(0..64)],
            )
        })
        .collect()
}

fn new_wamid() -> String {
    format!(
        "wamid.HBgL{}",
        uuid::Uuid::new_v4().simple().to_string().to_uppercase()
    )
}

/// Maps a body violation to the code Meta uses for it, and Meta's answer.
fn violation_error(v: &crate::job::Violation) -> (i64, Response) {
    let field = v.field.strip_prefix("message.").unwrap_or(&v.field);
    let details = format!("{field}: {}", v.problem);
    let p = v.problem.as_str();
    if p.contains("is required") || p.contains("missing field") || p.starts_with("needs") {
        (
            131008,
            meta_error(400, 131008, None, "Required parameter is missing", details),
        )
    } else if p.contains("unknown field")
        || p.contains("is not allowed")
        || p.contains("is not a supported")
    {
        (
            100,
            meta_error(400, 100, None, "Invalid parameter", details),
        )
    } else {
        (
            131009,
            meta_error(400, 131009, None, "Parameter value is not valid", details),
        )
    }
}

async fn send_message(
    State(state): State<Arc<SimState>>,
    Path((_version, phone_number_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (latency, number) = {
        let config = state.config.lock().expect("config lock");
        let (lo, hi) = config.latency;
        let latency = if hi > lo {
            rand::rng().random_range(lo..hi)
        } else {
            lo
        };
        (latency, config.numbers.get(&phone_number_id).cloned())
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let response = answer(&state, &phone_number_id, number, &headers, &body).await;
    response
}

async fn answer(
    state: &SimState,
    phone_number_id: &str,
    number: Option<super::SimNumber>,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let fail = |code: i64, response: Response| {
        state.audit.lock().expect("audit lock").record_error(code);
        response
    };
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let token_ok = token.is_some_and(|t| {
        state
            .config
            .lock()
            .expect("config lock")
            .tokens
            .iter()
            .any(|k| k == t)
    });
    if !token_ok {
        return fail(
            190,
            meta_error(
                401,
                190,
                None,
                "Invalid OAuth access token - Cannot parse access token",
                "The access token is missing, expired or invalid",
            ),
        );
    }
    let Some(number) = number else {
        let details = format!(
            "Unsupported post request. Object with ID '{phone_number_id}' does not exist, cannot be loaded due to missing permissions, or does not support this operation."
        );
        return fail(
            100,
            meta_error(400, 100, Some(33), "Invalid parameter", details),
        );
    };
    let mut request: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => {
            return fail(
                100,
                meta_error(
                    400,
                    100,
                    None,
                    "Invalid parameter",
                    "The request body must be a JSON object",
                ),
            );
        }
        Err(e) => {
            return fail(
                100,
                meta_error(
                    400,
                    100,
                    None,
                    "Invalid parameter",
                    format!("Malformed JSON: {e}"),
                ),
            );
        }
    };
    let object = request.as_object_mut().expect("checked above");
    match object.remove("messaging_product") {
        Some(Value::String(p)) if p == "whatsapp" => {}
        Some(other) => {
            return fail(
                131009,
                meta_error(
                    400,
                    131009,
                    None,
                    "Parameter value is not valid",
                    format!("messaging_product: {other} is not \"whatsapp\""),
                ),
            );
        }
        None => {
            return fail(
                131008,
                meta_error(
                    400,
                    131008,
                    None,
                    "Required parameter is missing",
                    "messaging_product is required",
                ),
            );
        }
    }
    match object.remove("recipient_type") {
        None => {}
        Some(Value::String(t)) if t == "individual" || t == "group" => {}
        Some(other) => {
            return fail(
                131009,
                meta_error(
                    400,
                    131009,
                    None,
                    "Parameter value is not valid",
                    format!("recipient_type: {other} is not individual or group"),
                ),
            );
        }
    }
    let to = match object.remove("to") {
        Some(Value::String(to)) => to,
        Some(other) => {
            return fail(
                131009,
                meta_error(
                    400,
                    131009,
                    None,
                    "Parameter value is not valid",
                    format!("to: {other} is not a phone number"),
                ),
            );
        }
        None => {
            return fail(
                131008,
                meta_error(
                    400,
                    131008,
                    None,
                    "Required parameter is missing",
                    "to is required",
                ),
            );
        }
    };
    let digits = to.strip_prefix('+').unwrap_or(&to);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.len() > 15 {
        return fail(
            131009,
            meta_error(
                400,
                131009,
                None,
                "Parameter value is not valid",
                format!("to: {to:?} is not a valid phone number"),
            ),
        );
    }
    let job_id = match object.remove("biz_opaque_callback_data") {
        None => None,
        Some(Value::String(s)) if s.chars().count() <= 512 => Some(s),
        Some(_) => {
            return fail(
                131009,
                meta_error(
                    400,
                    131009,
                    None,
                    "Parameter value is not valid",
                    "biz_opaque_callback_data must be a string of at most 512 characters",
                ),
            );
        }
    };
    let message = match Message::from_value(request, "message") {
        Ok(m) => m,
        Err(v) => {
            let (code, response) = violation_error(&v);
            return fail(code, response);
        }
    };
    if let Body::Template(t) = &message.body {
        let template = state
            .config
            .lock()
            .expect("config lock")
            .templates
            .iter()
            .find(|k| k.name == t.name && k.language == t.language.code)
            .cloned();
        let Some(template) = template else {
            return fail(
                132001,
                meta_error(
                    404,
                    132001,
                    None,
                    "Template name does not exist in the translation",
                    format!(
                        "template name ({}) does not exist in {}",
                        t.name, t.language.code
                    ),
                ),
            );
        };
        match template.status.as_str() {
            "APPROVED" => {}
            "PAUSED" => {
                return fail(
                    132015,
                    meta_error(
                        400,
                        132015,
                        None,
                        "Template is paused",
                        format!("template {} is paused due to low quality", t.name),
                    ),
                );
            }
            "DISABLED" => {
                return fail(
                    132016,
                    meta_error(
                        400,
                        132016,
                        None,
                        "Template is disabled",
                        format!("template {} has been disabled", t.name),
                    ),
                );
            }
            other => {
                return fail(
                    132001,
                    meta_error(
                        404,
                        132001,
                        None,
                        "Template name does not exist in the translation",
                        format!("template {} is {other}, not approved", t.name),
                    ),
                );
            }
        }
        let given = t
            .components
            .iter()
            .filter(|c| c.kind == "body")
            .map(|c| c.parameters.len())
            .sum::<usize>();
        if given != template.body_params {
            return fail(
                132000,
                meta_error(
                    400,
                    132000,
                    None,
                    "Number of parameters does not match the expected number of params",
                    format!(
                        "body: number of localizable_params ({given}) does not match the expected number of params ({})",
                        template.body_params
                    ),
                ),
            );
        }
    }

    // Injected faults: scripted rules first, then the random transient share.
    let mut delay = None;
    if let Some(fault) = take_fault(state, job_id.as_deref()) {
        match fault {
            Fault::Error { code, status } => {
                return fail(
                    code,
                    meta_error(
                        status,
                        code,
                        None,
                        "Injected error",
                        "injected by the simulator's fault plan",
                    ),
                );
            }
            Fault::BareStatus(status) => {
                return fail(
                    -i64::from(status),
                    (
                        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                        "upstream error",
                    )
                        .into_response(),
                );
            }
            Fault::Delay(d) => delay = Some(d),
        }
    } else {
        let share = state
            .config
            .lock()
            .expect("config lock")
            .transient_failure_share;
        if share > 0.0 && rand::rng().random_bool(share) {
            return fail(
                131016,
                meta_error(
                    500,
                    131016,
                    None,
                    "Service unavailable",
                    "A service is temporarily unavailable",
                ),
            );
        }
    }

    // Per-number throughput over a sliding 1 s window.
    let now = Instant::now();
    {
        let mut windows = state.windows.lock().expect("windows lock");
        let window = windows.entry(phone_number_id.to_owned()).or_default();
        while window
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
        {
            window.pop_front();
        }
        if window.len() >= number.throughput_mps as usize {
            drop(windows);
            return fail(
                130429,
                meta_error(
                    400,
                    130429,
                    Some(2494055),
                    "Rate limit hit",
                    "Cloud API message throughput has been reached.",
                ),
            );
        }
        window.push_back(now);
    }
    let wamid = new_wamid();
    let send = AcceptedSend {
        phone_number_id: phone_number_id.to_owned(),
        to: digits.to_owned(),
        kind: message.body.kind().to_owned(),
        job_id,
        wamid: wamid.clone(),
        at_ms: 0,
        at: None,
    };
    state
        .audit
        .lock()
        .expect("audit lock")
        .record_accepted(send, now);
    if let Some(d) = delay {
        // The message exists; only the answer is late (a timeout makes the send ambiguous).
        tokio::time::sleep(d).await;
    }
    let mut answer = json!({
        "messaging_product": "whatsapp",
        "contacts": [{"input": to, "wa_id": digits}],
        "messages": [{"id": wamid}],
    });
    if message.is_template() {
        answer["messages"][0]["message_status"] = json!("accepted");
    }
    (StatusCode::OK, axum::Json(answer)).into_response()
}

fn take_fault(state: &SimState, job_id: Option<&str>) -> Option<Fault> {
    let mut faults = state.faults.lock().expect("faults lock");
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

async fn audit(State(state): State<Arc<SimState>>) -> Response {
    let audit = state.audit.lock().expect("audit lock").clone();
    axum::Json(json!({
        "numbers": audit.numbers(),
        "errors": audit.errors,
        "duplicates": audit.duplicates,
        "accepted": audit.accepted.len(),
    }))
    .into_response()
}
