//! The API server: axum routes on the UNIX socket. Each request becomes a
//! [`Request`] for the sampling loop (which owns the governor, so changes
//! and sampling never interleave) or for the placement thread; its answer
//! goes back as JSON with a status that says what went wrong.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Serialize;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

use super::{ErrorBody, HealthBody, MoveBody, Request, Response, Status};
use crate::placement::runtime::Command;
use crate::placement::Refusal;
use crate::qos::{Direction, LimitSpec};

/// A request for the sampling loop and where its answer goes.
pub type Job = (Request, oneshot::Sender<Response>);

/// What the routes talk to.
#[derive(Clone)]
pub struct Backend {
    pub jobs: mpsc::Sender<Job>,
    /// The placement thread (None: no MC VMs configured).
    pub placement: Option<std::sync::mpsc::Sender<Command>>,
    /// Where the log VM's output is written (`[placement] logs_dir`).
    pub logs_dir: Option<PathBuf>,
}

/// Bind the API socket, mode 0600: only root (the governor's user) may
/// change limits or move VMs. A socket left by a dead process is replaced;
/// a live one is not stolen.
pub fn bind(path: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!("another governor is serving {}", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("remove stale {}", path.display()))?;
    }
    let l = UnixListener::bind(path).with_context(|| format!("bind {}", path.display()))?;
    // Nobody can have connected yet that matters: the socket is served only
    // once this returns, and a connection made in between is answered
    // under the same rules.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    Ok(l)
}

/// Serve until the listener fails.
pub async fn serve(listener: UnixListener, backend: Backend) {
    if let Err(e) = axum::serve(listener, router(backend)).await {
        tracing::error!("the API server stopped: {e}");
    }
}

pub fn router(b: Backend) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/vms", get(vms))
        .route("/v1/vms/{vm}", get(vm))
        .route("/v1/health", get(health))
        .route("/v1/limits", get(limits))
        .route("/v1/vms/{vm}/limits/{direction}", put(set_limit).delete(clear_limit))
        .route("/v1/vms/{vm}/logs", get(logs))
        .route("/v1/placement", get(placement))
        .route("/v1/placement/{task}/move", post(move_task))
        .route("/v1/placement/{task}/pin", put(pin).delete(unpin))
        .route("/v1/decisions", get(decisions))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "path: no such resource (see /v1/status)") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method: not allowed on this resource")
        })
        .with_state(b)
}

/// A refused request: its status and `{"error": ...}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    fn new(status: StatusCode, error: impl Into<String>) -> ApiError {
        ApiError { status, body: ErrorBody { error: error.into(), decision: None } }
    }
    fn bad(error: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> HttpResponse {
        (self.status, Json(self.body)).into_response()
    }
}

type Reply = std::result::Result<HttpResponse, ApiError>;

fn json<T: Serialize>(v: T) -> Reply {
    Ok(Json(v).into_response())
}

/// Ask the sampling loop or the placement thread; a refusal becomes its
/// status and message.
async fn ask(b: &Backend, req: Request) -> std::result::Result<Response, ApiError> {
    let r = if req.is_placement() {
        let Some(tx) = b.placement.clone() else {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "placement: no management VMs are configured ([[mc]], [card])",
            ));
        };
        // A move may take a few hundred ms: a blocking-pool thread waits.
        tokio::task::spawn_blocking(move || placement_call(&tx, req))
            .await
            .unwrap_or_else(|e| Response::error(format!("placement: {e}")))
    } else {
        let (tx, rx) = oneshot::channel();
        if b.jobs.send((req, tx)).await.is_err() {
            return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the governor is shutting down"));
        }
        rx.await.unwrap_or_else(|_| Response::refused(503, "the governor is shutting down"))
    };
    if r.ok {
        return Ok(r);
    }
    let status = StatusCode::from_u16(r.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let decision = r.decisions.and_then(|mut d| d.pop()).map(Box::new);
    Err(ApiError { status, body: ErrorBody { error: r.error.unwrap_or_default(), decision } })
}

async fn current(b: &Backend) -> std::result::Result<Status, ApiError> {
    ask(b, Request::Status).await?.status.ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "no status"))
}

/// The query's `name=value` pairs; unknown names are refused.
fn query(raw: Option<String>, known: &[&str]) -> std::result::Result<Vec<(String, String)>, ApiError> {
    let mut out = Vec::new();
    for pair in raw.as_deref().unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if !known.contains(&k) {
            return Err(ApiError::bad(format!("query: unknown parameter {k:?} (known: {})", known.join(", "))));
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

fn number(q: &[(String, String)], name: &str) -> std::result::Result<u64, ApiError> {
    match q.iter().find(|(k, _)| k == name) {
        None => Ok(0),
        Some((_, v)) => v.parse().map_err(|_| ApiError::bad(format!("{name}: {v:?} is not a non-negative integer"))),
    }
}

fn direction(d: &str) -> std::result::Result<Direction, ApiError> {
    match d {
        "egress" => Ok(Direction::Egress),
        "ingress" => Ok(Direction::Ingress),
        _ => Err(ApiError::bad(format!("direction: {d:?} is neither egress nor ingress"))),
    }
}

fn body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> std::result::Result<T, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::bad("body: missing (a JSON object)"));
    }
    serde_json::from_slice(bytes).map_err(|e| ApiError::bad(format!("body: {e}")))
}

async fn status(State(b): State<Backend>) -> Reply {
    json(current(&b).await?)
}

async fn vms(State(b): State<Backend>) -> Reply {
    json(current(&b).await?.vms)
}

async fn vm(State(b): State<Backend>, UrlPath(vm): UrlPath<String>) -> Reply {
    let st = current(&b).await?;
    match st.vms.into_iter().find(|v| v.name == vm) {
        Some(v) => json(v),
        None => Err(ApiError::new(StatusCode::NOT_FOUND, format!("vm: no VM named {vm:?}"))),
    }
}

async fn health(State(b): State<Backend>) -> Reply {
    let st = current(&b).await?;
    json(HealthBody { health: st.health, management_degraded: st.management_degraded })
}

async fn limits(State(b): State<Backend>) -> Reply {
    json(ask(&b, Request::Limits).await?.limits.unwrap_or_default())
}

async fn set_limit(State(b): State<Backend>, UrlPath((vm, d)): UrlPath<(String, String)>, bytes: Bytes) -> Reply {
    let direction = direction(&d)?;
    let limit: LimitSpec = body(&bytes)?;
    ask(&b, Request::SetLimit { vm, direction, limit }).await?;
    json(serde_json::json!({}))
}

async fn clear_limit(State(b): State<Backend>, UrlPath((vm, d)): UrlPath<(String, String)>) -> Reply {
    let direction = direction(&d)?;
    ask(&b, Request::ClearLimit { vm, direction }).await?;
    json(serde_json::json!({}))
}

async fn logs(State(b): State<Backend>, UrlPath(vm): UrlPath<String>, RawQuery(raw): RawQuery) -> Reply {
    let since = number(&query(raw, &["since"])?, "since")?;
    let Some(dir) = b.logs_dir.clone() else {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "logs: no log management is configured ([[mc]] task log)"));
    };
    let st = current(&b).await?;
    if !st.vms.iter().any(|v| v.name == vm) {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("vm: no VM named {vm:?}")));
    }
    let r = tokio::task::spawn_blocking(move || crate::manage::logs::read(&dir, &vm, since)).await;
    match r {
        Ok(Ok(lines)) => json(lines),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => json(Vec::<crate::manage::logs::LogLine>::new()),
        Ok(Err(e)) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("reading the log: {e}"))),
        Err(e) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("reading the log: {e}"))),
    }
}

async fn placement(State(b): State<Backend>) -> Reply {
    json(ask(&b, Request::Placement).await?.placement)
}

async fn decisions(State(b): State<Backend>, RawQuery(raw): RawQuery) -> Reply {
    let after_tick = number(&query(raw, &["after_tick"])?, "after_tick")?;
    json(ask(&b, Request::Decisions { after_tick }).await?.decisions.unwrap_or_default())
}

async fn move_task(State(b): State<Backend>, UrlPath(task): UrlPath<String>, bytes: Bytes) -> Reply {
    let MoveBody { to } = body(&bytes)?;
    let r = ask(&b, Request::Move { task, to }).await?;
    json(r.decisions.and_then(|mut d| d.pop()))
}

async fn pin(State(b): State<Backend>, UrlPath(task): UrlPath<String>) -> Reply {
    ask(&b, Request::Pin { task }).await?;
    json(serde_json::json!({}))
}

async fn unpin(State(b): State<Backend>, UrlPath(task): UrlPath<String>) -> Reply {
    ask(&b, Request::Unpin { task }).await?;
    json(serde_json::json!({}))
}

/// Served on the placement thread; the answer as a [`Response`].
fn placement_call(tx: &std::sync::mpsc::Sender<Command>, req: Request) -> Response {
    use std::sync::mpsc::channel;
    let gone = || Response::refused(503, "placement: the placement thread is gone");
    let refused = |r: Refusal| match r {
        Refusal::NoTask(e) => Response::refused(404, e),
        Refusal::NotNow(e) => Response::refused(409, e),
    };
    // A move copies an MC VM's memory; nothing the thread does takes longer.
    let wait = Duration::from_secs(50);
    let pin = matches!(req, Request::Pin { .. });
    match req {
        Request::Placement => {
            let (r, rx) = channel();
            if tx.send(Command::Status(r)).is_err() {
                return gone();
            }
            rx.recv_timeout(wait).map_or_else(|_| gone(), |p| Response { placement: Some(p), ..Response::ok() })
        }
        Request::Decisions { after_tick } => {
            let (r, rx) = channel();
            if tx.send(Command::Decisions { after_tick, reply: r }).is_err() {
                return gone();
            }
            rx.recv_timeout(wait).map_or_else(|_| gone(), |d| Response { decisions: Some(d), ..Response::ok() })
        }
        Request::Move { task, to } => {
            let (r, rx) = channel();
            if tx.send(Command::Move { task, to, reply: r }).is_err() {
                return gone();
            }
            match rx.recv_timeout(wait) {
                Ok(Ok(rec)) => match rec.reports.iter().find(|r| !r.ok).and_then(|r| r.error.clone()) {
                    Some(e) => Response { decisions: Some(vec![rec]), ..Response::error(format!("move failed: {e}")) },
                    None => Response { decisions: Some(vec![rec]), ..Response::ok() },
                },
                Ok(Err(e)) => refused(e),
                Err(_) => gone(),
            }
        }
        Request::Pin { task } | Request::Unpin { task } => {
            let (r, rx) = channel();
            if tx.send(Command::Pin { task, pin, reply: r }).is_err() {
                return gone();
            }
            match rx.recv_timeout(wait) {
                Ok(Ok(_)) => Response::ok(),
                Ok(Err(e)) => refused(e),
                Err(_) => gone(),
            }
        }
        _ => Response::error("not a placement request"),
    }
}
