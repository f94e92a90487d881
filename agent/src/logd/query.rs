//! logd's query side: HTTPS on `http_listen`, for administrators (a client certificate of the
//! deployment with the admin role: `sagectl logs` has one) and, restricted to the audit records
//! (`sagectl::*` runs, `backend.audit`, `backend.fleet`), for backends, whose operators' page
//! shows the latest. `GET /api/records` with filters
//! (`since`, `until` in unix ms; `level` at least; `host`; `target`; `text`, a substring of the
//! message; `after` a seq, for following; `limit`) answers JSON; `GET /` is a small page that
//! searches and tails with the same API.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use tokio::net::TcpListener;

use super::store;
use crate::db::Pool;
use crate::service::Service;

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Row {
    pub seq: i64,
    pub ts_ms: i64,
    pub host: String,
    pub source: String,
    pub level: String,
    pub target: String,
    pub message: String,
    pub fields: serde_json::Value,
}

const LEVELS: [&str; 5] = ["trace", "debug", "info", "warn", "error"];

fn decode(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The query string's parameters.
pub fn params(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.split_once('=')
                .map_or((decode(p), String::new()), |(k, v)| (decode(k), decode(v)))
        })
        .collect()
}

/// Records matching `p`; only audit records when `audit_only` (a backend asks).
pub async fn records(
    c: &tokio_postgres::Client,
    p: &HashMap<String, String>,
    audit_only: bool,
) -> Result<Vec<Row>, String> {
    let num = |k: &str| -> Result<Option<i64>, String> {
        p.get(k)
            .map(|v| {
                v.parse::<i64>()
                    .map_err(|_| format!("`{k}` must be a number"))
            })
            .transpose()
    };
    let level = match p.get("level") {
        Some(l) => LEVELS
            .iter()
            .position(|x| x == l)
            .ok_or_else(|| format!("unknown level `{l}`"))? as i16,
        None => 0,
    };
    let limit = num("limit")?.unwrap_or(100).clamp(1, 10_000);
    let rows = c
        .query(
            "SELECT seq, (extract(epoch from ts) * 1000)::int8, host, host(source_ip), level, target, message, fields::text FROM records
             WHERE seq > $1 AND ($2::int8 IS NULL OR ts >= to_timestamp($2::int8 / 1000.0)) AND ($3::int8 IS NULL OR ts <= to_timestamp($3::int8 / 1000.0)) AND level >= $4
               AND ($5::text IS NULL OR host = $5) AND ($6::text IS NULL OR target = $6) AND ($7::text IS NULL OR strpos(message, $7) > 0)
               AND (NOT $9 OR starts_with(target, 'sagectl::') OR target IN ('backend.audit', 'backend.fleet'))
             ORDER BY seq DESC LIMIT $8",
            &[&num("after")?.unwrap_or(0), &num("since")?, &num("until")?, &level, &p.get("host"), &p.get("target"), &p.get("text"), &limit, &audit_only],
        )
        .await
        .map_err(|e| format!("query failed: {}", e.as_db_error().map_or(e.to_string(), |d| d.message().to_string())))?;
    let mut out: Vec<Row> = rows
        .iter()
        .map(|r| Row {
            seq: r.get(0),
            ts_ms: r.get(1),
            host: r.get(2),
            source: r.get(3),
            level: LEVELS
                .get(r.get::<_, i16>(4) as usize)
                .unwrap_or(&"error")
                .to_string(),
            target: r.get(5),
            message: r.get(6),
            fields: serde_json::from_str(r.get::<_, &str>(7)).unwrap_or_default(),
        })
        .collect();
    out.reverse();
    Ok(out)
}

/// The schema may not be there yet if no record has arrived since logd started: migrate first.
async fn migrated_records(
    c: &mut tokio_postgres::Client,
    p: &HashMap<String, String>,
    audit_only: bool,
) -> Result<Vec<Row>, String> {
    store::migrate(c)
        .await
        .map_err(|e| format!("migration: {e}"))?;
    records(c, p, audit_only).await
}

const PAGE: &str = include_str!("page.html");

/// Serves queries (axum over the service's TLS listener) until the service stops. Each request
/// borrows a connection from `pool`: the pool of `db.rs`, the backend's too (at most
/// `database.pool` connections, reused), rather than a connection per request.
pub fn serve(
    service: &Service,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    pool: Pool,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/", get(page))
        .route("/api/records", get(api_records))
        .fallback(not_found)
        .method_not_allowed_fallback(not_found)
        .with_state(Arc::new(pool));
    let listener = service.tls_listener("logd queries", listener, tls)?;
    service.serve_https_with_certs("logd queries", listener, app, Duration::from_secs(1));
    Ok(())
}

/// Every answer: not cached, its type as said.
fn reply(status: StatusCode, ctype: &'static str, body: String) -> Response {
    let headers = [
        (header::CONTENT_TYPE, ctype),
        (header::CACHE_CONTROL, "no-store"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ];
    (status, headers, body).into_response()
}

fn json_error(status: StatusCode, error: String) -> Response {
    let body = serde_json::json!({ "error": error }).to_string();
    reply(status, "application/json", body)
}

async fn page() -> Response {
    reply(StatusCode::OK, "text/html; charset=utf-8", PAGE.to_string())
}

async fn not_found() -> Response {
    reply(
        StatusCode::NOT_FOUND,
        "text/plain",
        "not found\n".to_string(),
    )
}

async fn api_records(
    State(pool): State<Arc<Pool>>,
    ConnectInfo(cert): ConnectInfo<crate::service::ClientCert>,
    RawQuery(query): RawQuery,
) -> Response {
    // The TLS verifier admitted only admins and backends; anything but an admin sees audit
    // records only.
    let admin = cert
        .0
        .as_ref()
        .and_then(|c| crate::tls::role_of(c, &["admin".to_string(), "backend".to_string()]));
    let audit_only = admin.as_deref() != Some("admin");
    let mut c = match pool.get().await {
        Ok(c) => c,
        Err(e) => return json_error(StatusCode::SERVICE_UNAVAILABLE, format!("database: {e}")),
    };
    match migrated_records(&mut c, &params(query.as_deref().unwrap_or("")), audit_only).await {
        Ok(rows) => reply(
            StatusCode::OK,
            "application/json",
            serde_json::to_string(&rows).expect("rows serialize"),
        ),
        Err(e) => json_error(StatusCode::BAD_REQUEST, e),
    }
}

#[cfg(test)]
mod tests {
    use super::params;

    #[test]
    fn query_strings() {
        let p = params("level=warn&text=database+x%20refused&host=b1&bad=%zz");
        assert_eq!(p["level"], "warn");
        assert_eq!(p["text"], "database x refused");
        assert_eq!(p["bad"], "%zz");
    }
}
