//! logd's query side: HTTPS on `http_listen`, for administrators only (a client certificate of
//! the deployment with the admin role: `sagectl logs` has one). `GET /api/records` with filters
//! (`since`, `until` in unix ms; `level` at least; `host`; `target`; `text`, a substring of the
//! message; `after` a seq, for following; `limit`) answers JSON; `GET /` is a small page that
//! searches and tails with the same API.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use super::store;

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

pub async fn records(
    c: &tokio_postgres::Client,
    p: &HashMap<String, String>,
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
             ORDER BY seq DESC LIMIT $8",
            &[&num("after")?.unwrap_or(0), &num("since")?, &num("until")?, &level, &p.get("host"), &p.get("target"), &p.get("text"), &limit],
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
) -> Result<Vec<Row>, String> {
    store::migrate(c)
        .await
        .map_err(|e| format!("migration: {e}"))?;
    records(c, p).await
}

const PAGE: &str = include_str!("page.html");

/// Serves queries until the process ends.
pub async fn serve(
    listener: TcpListener,
    server: Arc<rustls::ServerConfig>,
    db: store::DbConfig,
    roots: Arc<rustls::RootCertStore>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            continue;
        };
        let (acceptor, db, roots) = (acceptor.clone(), db.clone(), roots.clone());
        tokio::spawn(async move {
            let Ok(Ok(tls)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
            else {
                tracing::warn!(%peer, "query connection refused at the TLS handshake");
                return;
            };
            let mut s = BufReader::new(tls);
            let mut line = String::new();
            if tokio::time::timeout(Duration::from_secs(10), s.read_line(&mut line))
                .await
                .is_err()
            {
                return;
            }
            loop {
                let mut h = String::new();
                match tokio::time::timeout(Duration::from_secs(10), s.read_line(&mut h)).await {
                    Ok(Ok(n)) if n > 2 && h.len() < 8192 => {}
                    _ => break,
                }
            }
            let target = line.split_whitespace().nth(1).unwrap_or("/");
            let (path, query) = target.split_once('?').unwrap_or((target, ""));
            let (status, ctype, body) = match (line.split_whitespace().next(), path) {
                (Some("GET"), "/") => ("200 OK", "text/html; charset=utf-8", PAGE.to_string()),
                (Some("GET"), "/api/records") => match store::connect(&db, roots).await {
                    Ok(mut c) => match migrated_records(&mut c, &params(query)).await {
                        Ok(rows) => (
                            "200 OK",
                            "application/json",
                            serde_json::to_string(&rows).expect("rows serialize"),
                        ),
                        Err(e) => (
                            "400 Bad Request",
                            "application/json",
                            serde_json::json!({"error": e}).to_string(),
                        ),
                    },
                    Err(e) => (
                        "503 Service Unavailable",
                        "application/json",
                        serde_json::json!({"error": format!("database: {e}")}).to_string(),
                    ),
                },
                _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let s = s.get_mut();
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(body.as_bytes()).await;
            let _ = s.shutdown().await;
        });
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
