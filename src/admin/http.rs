//! The admin API over HTTP (axum): JSON in and out, every route behind a bearer token. Bad input
//! is a 400 naming the field, a missing or wrong token a 401, a store failure a 503; the body of
//! every error is `{"error": "...", "field": "..."}` (`field` only when one is to blame).

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::warn;

use super::dead::{DeadLetterView, DeadQuery, DeadSummary, JobStatus, ReplayReport};
use super::report::CampaignReport;
use super::{Admin, AdminError, ConsentChange};
use crate::health::Health;
use crate::job::Lane;
use crate::policy::admission::CampaignState;
use crate::server::HttpServer;

/// The admin API, bound to its address and ready to serve.
pub struct AdminServer;

impl AdminServer {
    /// Binds `listen` (`127.0.0.1:0` for a free port) and builds the routes.
    pub async fn bind(
        listen: &str,
        admin: Admin,
        token: &SecretString,
    ) -> std::io::Result<HttpServer> {
        HttpServer::bind(listen, router(admin, token)).await
    }
}

#[derive(Clone)]
struct AppState {
    admin: Admin,
    /// SHA-256 of the token: comparing digests takes the same time whatever the presented
    /// token's length, so neither the token nor its length leaks through timing.
    token_digest: Arc<[u8; 32]>,
}

/// The routes, every one (and the 404 fallback) behind the bearer token but `/healthz`,
/// `/readyz` (ready while Redis answers) and `/metrics`.
pub fn router(admin: Admin, token: &SecretString) -> Router {
    let health = Health::of_store(Arc::clone(&admin.store));
    let state = AppState {
        admin,
        token_digest: Arc::new(Sha256::digest(token.expose_secret().as_bytes()).into()),
    };
    let api = Router::new()
        .route("/v1/campaigns/{id}", get(campaign))
        .route("/v1/campaigns/{id}/pause", post(pause))
        .route("/v1/campaigns/{id}/resume", post(resume))
        .route("/v1/campaigns/{id}/cancel", post(cancel))
        .route("/v1/campaigns/{id}/report", get(campaign_report))
        .route("/v1/report", get(portfolio_report))
        .route("/v1/consent/opt-in", post(opt_in))
        .route("/v1/consent/opt-out", post(opt_out))
        .route("/v1/consent/{waba_id}/{wa_id}", get(consent))
        .route("/v1/windows", post(open_window))
        .route("/v1/halts", get(halts))
        .route("/v1/halts/{scope}", axum::routing::delete(lift_halt))
        .route("/v1/dead", get(dead_letters))
        .route("/v1/dead/replay", post(replay))
        .route("/v1/dead/{job_id}", get(dead_letter))
        .route("/v1/jobs/{job_id}", get(job))
        .fallback(not_found)
        // A layer (not a route layer) so that unknown paths answer 401 too: without the token
        // nobody learns which routes exist.
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .with_state(state)
        // Merged after the layer, so outside it: probes and scrapers carry no token.
        .merge(crate::health::router(health))
        .merge(crate::metrics::router());
    // Outermost, so refused requests are counted too.
    crate::metrics::count_requests(api)
}

async fn authorize(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let authorized = presented.is_some_and(|token| {
        let digest = Sha256::digest(token.as_bytes());
        bool::from(digest.as_slice().ct_eq(state.token_digest.as_slice()))
    });
    if !authorized {
        warn!(
            path = %request.uri().path(),
            presented = presented.is_some(),
            "admin request refused: missing or wrong bearer token"
        );
        let mut response = ApiError {
            status: StatusCode::UNAUTHORIZED,
            field: None,
            message: "missing or wrong bearer token (Authorization: Bearer <admin.token>)".into(),
        }
        .into_response();
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"wa-sender admin\""),
        );
        return response;
    }
    next.run(request).await
}

/// An error answer: `{"error": message, "field": field}`.
struct ApiError {
    status: StatusCode,
    field: Option<&'static str>,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match self.field {
            Some(field) => json!({ "error": self.message, "field": field }),
            None => json!({ "error": self.message }),
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> Self {
        match e {
            AdminError::Invalid { field, problem } => ApiError {
                status: StatusCode::BAD_REQUEST,
                field: Some(field),
                message: problem,
            },
            AdminError::Store(e) => {
                warn!(error = %e, "admin request failed in the store");
                ApiError {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    field: None,
                    message: e.to_string(),
                }
            }
            AdminError::Broker(e) => {
                warn!(error = %e, "admin request failed in the broker");
                ApiError {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    field: None,
                    message: e.to_string(),
                }
            }
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        // axum's text names the offending field (`wa_id: invalid type: …`). Its 422 for a
        // body that parses but does not fit is a 400 here: all bad input answers alike.
        let status = match rejection {
            JsonRejection::MissingJsonContentType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError {
            status,
            field: None,
            message: rejection.body_text(),
        }
    }
}

type Answer<T> = Result<Json<T>, ApiError>;

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        field: None,
        message: "no such route; see README \"Admin: campaigns, consent, windows, dead letters\""
            .into(),
    }
}

async fn campaign(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Answer<super::CampaignStatus> {
    Ok(Json(s.admin.campaign(&id).await?))
}

/// `wa-sender campaign report <id> --json`.
async fn campaign_report(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Answer<CampaignReport> {
    Ok(Json(s.admin.report(Some(&id), s.admin.currency()).await?))
}

/// `wa-sender campaign report --all --json`: every job of the configured portfolios.
async fn portfolio_report(State(s): State<AppState>) -> Answer<CampaignReport> {
    Ok(Json(s.admin.report(None, s.admin.currency()).await?))
}

async fn halts(State(s): State<AppState>) -> Answer<Vec<crate::store::Halt>> {
    Ok(Json(s.admin.halts().await?))
}

async fn lift_halt(
    State(s): State<AppState>,
    Path(scope): Path<String>,
) -> Answer<Vec<crate::store::Halt>> {
    Ok(Json(s.admin.lift_halt(&scope).await?))
}

async fn pause(s: State<AppState>, id: Path<String>) -> Answer<super::CampaignStatus> {
    set_campaign(s, id, CampaignState::Paused).await
}

async fn resume(s: State<AppState>, id: Path<String>) -> Answer<super::CampaignStatus> {
    set_campaign(s, id, CampaignState::Active).await
}

async fn cancel(s: State<AppState>, id: Path<String>) -> Answer<super::CampaignStatus> {
    set_campaign(s, id, CampaignState::Cancelled).await
}

async fn set_campaign(
    State(s): State<AppState>,
    Path(id): Path<String>,
    state: CampaignState,
) -> Answer<super::CampaignStatus> {
    Ok(Json(s.admin.set_campaign(&id, state).await?))
}

/// `POST /v1/consent/opt-in`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OptInBody {
    waba_id: Option<String>,
    // Optional here so that its absence is answered as a 400 naming `wa_id`, like a bad value.
    wa_id: Option<String>,
    source: Option<String>,
    at: Option<String>,
}

/// `POST /v1/consent/opt-out`; `"resume": true` withdraws the opt-out instead.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OptOutBody {
    waba_id: Option<String>,
    wa_id: Option<String>,
    source: Option<String>,
    at: Option<String>,
    #[serde(default)]
    resume: bool,
}

async fn opt_in(
    State(s): State<AppState>,
    body: Result<Json<OptInBody>, JsonRejection>,
) -> Answer<super::ConsentStatus> {
    let Json(body) = body?;
    let change = ConsentChange {
        waba_id: body.waba_id.as_deref(),
        wa_id: body.wa_id.as_deref().unwrap_or_default(),
        source: body.source.as_deref(),
        at: body.at.as_deref(),
    };
    Ok(Json(s.admin.opt_in(change).await?))
}

async fn opt_out(
    State(s): State<AppState>,
    body: Result<Json<OptOutBody>, JsonRejection>,
) -> Answer<super::ConsentStatus> {
    let Json(body) = body?;
    let wa_id = body.wa_id.as_deref().unwrap_or_default();
    if body.resume {
        if body.source.is_some() || body.at.is_some() {
            return Err(AdminError::Invalid {
                field: if body.source.is_some() {
                    "source"
                } else {
                    "at"
                },
                problem: "source and at do not apply to a resume (it deletes the opt-out)".into(),
            }
            .into());
        }
        return Ok(Json(s.admin.resume(body.waba_id.as_deref(), wa_id).await?));
    }
    let change = ConsentChange {
        waba_id: body.waba_id.as_deref(),
        wa_id,
        source: body.source.as_deref(),
        at: body.at.as_deref(),
    };
    Ok(Json(s.admin.opt_out(change).await?))
}

async fn consent(
    State(s): State<AppState>,
    Path((waba_id, wa_id)): Path<(String, String)>,
) -> Answer<super::ConsentStatus> {
    Ok(Json(s.admin.consent(Some(&waba_id), &wa_id).await?))
}

/// `POST /v1/windows`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WindowBody {
    phone_number_id: Option<String>,
    wa_id: Option<String>,
    at: Option<String>,
}

async fn open_window(
    State(s): State<AppState>,
    body: Result<Json<WindowBody>, JsonRejection>,
) -> Answer<super::WindowStatus> {
    let Json(body) = body?;
    let window = s
        .admin
        .open_window(
            body.phone_number_id.as_deref().unwrap_or_default(),
            body.wa_id.as_deref().unwrap_or_default(),
            body.at.as_deref(),
        )
        .await?;
    Ok(Json(window))
}

/// `GET /v1/dead?reason=&campaign=&since=&limit=`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeadParams {
    reason: Option<String>,
    campaign: Option<String>,
    since: Option<String>,
    // Text, so that a bad number is answered like any bad field.
    limit: Option<String>,
}

async fn dead_letters(
    State(s): State<AppState>,
    Query(params): Query<DeadParams>,
) -> Answer<Vec<DeadSummary>> {
    let limit = params
        .limit
        .as_deref()
        .map(|l| {
            l.trim().parse::<usize>().map_err(|_| AdminError::Invalid {
                field: "limit",
                problem: format!("limit {l:?} is not a number"),
            })
        })
        .transpose()?;
    let query = DeadQuery {
        reason: params.reason.as_deref(),
        campaign: params.campaign.as_deref(),
        since: params.since.as_deref(),
        ..DeadQuery::default()
    };
    Ok(Json(s.admin.dead_letters(&query, limit).await?))
}

async fn dead_letter(
    State(s): State<AppState>,
    Path(job_id): Path<String>,
) -> Result<Json<DeadLetterView>, ApiError> {
    s.admin
        .dead_letter(&job_id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError {
            status: StatusCode::NOT_FOUND,
            field: None,
            message: format!("no dead letter of job {job_id:?} in the dead queue"),
        })
}

/// `POST /v1/dead/replay`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayBody {
    job_id: Option<String>,
    reason: Option<String>,
    campaign: Option<String>,
    #[serde(default)]
    dry_run: bool,
    /// The lane of letters that recorded none.
    lane: Option<String>,
}

async fn replay(
    State(s): State<AppState>,
    body: Result<Json<ReplayBody>, JsonRejection>,
) -> Answer<ReplayReport> {
    let Json(body) = body?;
    let query = DeadQuery {
        job_id: body.job_id.as_deref(),
        reason: body.reason.as_deref(),
        campaign: body.campaign.as_deref(),
        since: None,
    };
    let lane = match body.lane.as_deref() {
        None => None,
        Some(l) => Some(Lane::parse(l).ok_or_else(|| AdminError::Invalid {
            field: "lane",
            problem: format!("{l:?} is not a lane (otp, transactional, bulk)"),
        })?),
    };
    Ok(Json(s.admin.replay(&query, body.dry_run, lane).await?))
}

/// `GET /v1/jobs/{job_id}?waba_id=`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobParams {
    waba_id: Option<String>,
}

async fn job(
    State(s): State<AppState>,
    Path(job_id): Path<String>,
    Query(params): Query<JobParams>,
) -> Answer<JobStatus> {
    Ok(Json(s.admin.job(&job_id, params.waba_id.as_deref()).await?))
}
