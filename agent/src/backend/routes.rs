//! HTTP routes: SockJS under `/sockjs`, and plain HTTPS under `/api` for health, metrics,
//! cookie sign-in, and bundles (upload creates a workspace, download gets its last save).

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;

use super::accounts::Account;
use super::{ApiError, Backend, sockjs};

type B = State<Arc<Backend>>;

pub fn router(backend: Arc<Backend>) -> Router {
    Router::new()
        .route("/api/health", get(health))
        .route("/api/metrics", get(metrics))
        // Credentials are small: a body past 16 KiB is refused before it is read on.
        .route(
            "/api/signup",
            post(signup).layer(axum::extract::DefaultBodyLimit::max(16 << 10)),
        )
        .route(
            "/api/signin",
            post(signin).layer(axum::extract::DefaultBodyLimit::max(16 << 10)),
        )
        .route("/api/signout", post(signout))
        .route("/api/whoami", get(whoami))
        .route("/api/workspaces", post(upload))
        .route("/api/workspaces/{id}/bundle", get(download))
        .route("/sockjs", get(welcome))
        .route("/sockjs/", get(welcome))
        .route("/sockjs/info", get(info).options(options))
        .route("/sockjs/{server}/{session}/websocket", get(websocket))
        .route("/sockjs/{server}/{session}/xhr", post(xhr).options(options))
        .route(
            "/sockjs/{server}/{session}/xhr_send",
            post(xhr_send).options(options),
        )
        .route(
            "/sockjs/{server}/{session}/xhr_streaming",
            post(xhr_streaming).options(options),
        )
        // A known path with another method, or an unknown one: 404 (as SockJS 0.3 asks).
        .method_not_allowed_fallback(not_found)
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(backend)
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/plain; charset=UTF-8")],
        "Not found\n",
    )
        .into_response()
}

/// Refuses a request from another site's page (`origin.rs` says how it is told).
fn same_site(b: &Backend, headers: &HeaderMap) -> Result<(), ApiError> {
    super::origin::ours(&b.origins, headers).map(drop)
}

/// Sign-in and sign-up take JSON only: a cross-site form (`text/plain`) cannot post one without
/// a preflight that this site refuses.
fn json_body(headers: &HeaderMap) -> Result<(), ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .eq_ignore_ascii_case("application/json")
    {
        Ok(())
    } else {
        Err(ApiError::new(
            415,
            "send the credentials as JSON (Content-Type: application/json)",
        ))
    }
}

async fn info(State(b): B, headers: HeaderMap) -> Response {
    match same_site(&b, &headers) {
        Ok(()) => sockjs::info(headers).await,
        Err(e) => e.into_response(),
    }
}

async fn options(State(b): B, headers: HeaderMap) -> Response {
    match same_site(&b, &headers) {
        Ok(()) => sockjs::options(headers).await,
        Err(e) => e.into_response(),
    }
}

async fn welcome() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=UTF-8")],
        "Welcome to SockJS!\n",
    )
        .into_response()
}

async fn health(State(b): B) -> Response {
    // HAProxy's check: a stopping backend takes no new browsers.
    if b.stopping.load(std::sync::atomic::Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "restarting\n").into_response();
    }
    match b.db().await {
        Ok(c) => match c.query_one("SELECT 1", &[]).await {
            Ok(_) => (StatusCode::OK, "ok\n").into_response(),
            Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("database: {e}\n")).into_response(),
        },
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{}\n", e.message)).into_response(),
    }
}

async fn metrics(State(b): B) -> Response {
    b.metrics_response()
}

#[derive(Deserialize)]
struct Credentials {
    name: String,
    password: String,
}

fn credentials(body: &Bytes) -> Result<Credentials, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad(format!(
            "expected JSON {{\"name\": ..., \"password\": ...}}: {e}"
        ))
    })
}

fn signed_in(b: &Backend, acct: &Account, token: &str) -> Response {
    (
        [
            (header::SET_COOKIE, b.cookie(Some(token))),
            (header::CONTENT_TYPE, "application/json".into()),
        ],
        serde_json::json!({"ok": true, "account": acct.name}).to_string(),
    )
        .into_response()
}

async fn signup(State(b): B, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    same_site(&b, &headers)?;
    json_body(&headers)?;
    let c = credentials(&body)?;
    let client = super::throttle::client_address(&headers);
    let (acct, token) = b.signup(&c.name, &c.password, client).await?;
    Ok(signed_in(&b, &acct, &token))
}

async fn signin(State(b): B, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    same_site(&b, &headers)?;
    json_body(&headers)?;
    let c = credentials(&body)?;
    let client = super::throttle::client_address(&headers);
    let (acct, token) = b.signin(&c.name, &c.password, client).await?;
    Ok(signed_in(&b, &acct, &token))
}

async fn signout(State(b): B, headers: HeaderMap) -> Result<Response, ApiError> {
    same_site(&b, &headers)?;
    if let Some(t) = super::accounts::token_from_cookies(&headers) {
        b.signout(&t).await?;
    }
    Ok((
        [(header::SET_COOKIE, b.cookie(None))],
        serde_json::json!({"ok": true}).to_string(),
    )
        .into_response())
}

/// The signed-in account of a request from our own site.
async fn account(b: &Backend, headers: &HeaderMap) -> Result<Account, ApiError> {
    same_site(b, headers)?;
    let t = super::accounts::token_from_cookies(headers)
        .ok_or_else(|| ApiError::unauthorized("sign in first (no session cookie)"))?;
    b.session_account(&t)
        .await?
        .ok_or_else(|| ApiError::unauthorized("your session has ended: sign in again"))
}

async fn whoami(State(b): B, headers: HeaderMap) -> Result<Response, ApiError> {
    let a = account(&b, &headers).await?;
    Ok(serde_json::json!({"ok": true, "account": a.name})
        .to_string()
        .into_response())
}

#[derive(Deserialize)]
struct UploadQuery {
    name: String,
}

/// POST /api/workspaces?name=NAME with a git bundle as the body.
async fn upload(
    State(b): B,
    Query(q): Query<UploadQuery>,
    headers: HeaderMap,
    req: Request,
) -> Result<Response, ApiError> {
    let acct = account(&b, &headers).await?;
    let max = b.config.max_bundle_bytes();
    let body = axum::body::to_bytes(req.into_body(), max)
        .await
        .map_err(|_| {
            ApiError::too_large(format!(
                "the bundle is over the limit of {} MB",
                b.config.max_bundle_mb
            ))
        })?;
    if body.is_empty() {
        return Err(ApiError::bad("the request body must be a git bundle"));
    }
    let id = b
        .create_workspace(&acct, &q.name, Some(body.to_vec()))
        .await?;
    Ok((
        StatusCode::CREATED,
        serde_json::json!({"ok": true, "workspace": id}).to_string(),
    )
        .into_response())
}

/// GET /api/workspaces/ID/bundle: the last save (saved first if the workspace is open here).
async fn download(
    State(b): B,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let acct = account(&b, &headers).await?;
    let owned = b
        .db()
        .await?
        .query_opt(
            "SELECT 1 FROM workspaces WHERE id = $1 AND account_id = $2",
            &[&id, &acct.id],
        )
        .await?
        .is_some();
    if !owned {
        return Err(ApiError::not_found(format!(
            "no workspace {id:?} in your account"
        )));
    }
    b.save_if_open(&id).await?;
    let bundle = b
        .stored_bundle(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("the workspace has nothing saved yet"))?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-git-bundle".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{id}.bundle\""),
            ),
        ],
        bundle,
    )
        .into_response())
}

async fn websocket(
    State(b): B,
    Path((server, session)): Path<(String, String)>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if !sockjs::valid_ids(&server, &session) {
        return not_found().await;
    }
    if let Err(e) = same_site(&b, &headers) {
        return e.into_response();
    }
    // Our own limit (with a clear error) applies first; this one stops the absurd.
    // Small buffers: an idle session should cost kilobytes (tungstenite's defaults are 128 KiB).
    let stopping = b.clone();
    let mut r = ws
        .max_message_size(b.config.max_message_bytes * 2 + 1024)
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .on_upgrade(move |socket| sockjs::websocket(b, session, headers, socket));
    // Stopping: the session is refused on the socket (1012); the browser's next goes elsewhere.
    sockjs::end_persistence(&stopping, &mut r);
    r
}

async fn xhr(
    State(b): B,
    Path((server, session)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = same_site(&b, &headers) {
        return e.into_response();
    }
    sockjs::xhr(b, server, session, headers).await
}

async fn xhr_send(
    State(b): B,
    Path((server, session)): Path<(String, String)>,
    headers: HeaderMap,
    req: Request,
) -> Response {
    if let Err(e) = same_site(&b, &headers) {
        return e.into_response();
    }
    // A little over the message limit: the frame's JSON quoting adds some.
    let max = b.config.max_message_bytes * 2 + 1024;
    match axum::body::to_bytes(req.into_body(), max).await {
        Ok(body) => sockjs::xhr_send(b, server, session, headers, body).await,
        Err(_) => ApiError::too_large(format!(
            "message refused: the limit is {} bytes",
            b.config.max_message_bytes
        ))
        .into_response(),
    }
}

async fn xhr_streaming(
    State(b): B,
    Path((server, session)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = same_site(&b, &headers) {
        return e.into_response();
    }
    sockjs::xhr_streaming(b, server, session, headers).await
}
