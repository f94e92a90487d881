//! Alert rules, evaluated on committed records: a rule matches records by least level, target,
//! host and a regular expression on the message, and fires when `count` matches fall in one
//! window of `window_seconds` (fixed windows of the records' time). It fires once per window,
//! however long the burst, and again in a later window. Actions run in the background: a command
//! gets the alert as JSON on stdin; a webhook gets it POSTed (http, or https verified against the
//! system's CA bundle).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::proto::{Level, LogRecord};

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Command(Vec<String>),
    Webhook(String),
}

/// A rule as sagectl renders it from the inventory.
#[derive(Clone, Debug, Deserialize)]
pub struct Rule {
    pub name: String,
    pub level: Level,
    pub target: Option<String>,
    pub message: Option<String>,
    pub host: Option<String>,
    pub count: u32,
    pub window_seconds: u32,
    pub action: Action,
}

/// What an action receives.
#[derive(Clone, Debug, Serialize)]
pub struct Alert {
    pub rule: String,
    pub count: u32,
    pub window_start_ms: i64,
    pub window_seconds: u32,
    /// The record that reached the threshold.
    pub last: LogRecord,
}

struct Compiled {
    rule: Rule,
    message: Option<regex::Regex>,
    /// Window start → matches counted, and whether it fired.
    windows: HashMap<i64, (u32, bool)>,
}

pub struct Alerts {
    rules: Vec<Compiled>,
}

impl Alerts {
    pub fn new(rules: Vec<Rule>) -> Result<Alerts, String> {
        let rules = rules
            .into_iter()
            .map(|rule| {
                let message = rule
                    .message
                    .as_deref()
                    .map(regex::Regex::new)
                    .transpose()
                    .map_err(|e| format!("alert `{}`: message: {e}", rule.name))?;
                Ok(Compiled {
                    rule,
                    message,
                    windows: HashMap::new(),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Alerts { rules })
    }

    /// Counts committed records; returns the alerts that fire.
    pub fn observe(&mut self, records: &[&LogRecord]) -> Vec<Alert> {
        let mut fired = Vec::new();
        for c in &mut self.rules {
            let r = &c.rule;
            let window_ms = i64::from(r.window_seconds) * 1000;
            for rec in records {
                let matches = rec.level >= r.level
                    && r.target.as_ref().is_none_or(|t| &rec.target == t)
                    && r.host.as_ref().is_none_or(|h| &rec.host == h)
                    && c.message.as_ref().is_none_or(|m| m.is_match(&rec.message));
                if !matches {
                    continue;
                }
                let start = rec.ts_ms.div_euclid(window_ms) * window_ms;
                let w = c.windows.entry(start).or_insert((0, false));
                w.0 += 1;
                if w.0 >= r.count && !w.1 {
                    w.1 = true;
                    fired.push(Alert {
                        rule: r.name.clone(),
                        count: w.0,
                        window_start_ms: start,
                        window_seconds: r.window_seconds,
                        last: (*rec).clone(),
                    });
                }
            }
            // Forget windows long past.
            if let Some(newest) = c.windows.keys().max().copied() {
                c.windows.retain(|k, _| *k >= newest - 10 * window_ms);
            }
        }
        fired
    }

    pub fn action(&self, rule: &str) -> Option<&Action> {
        self.rules
            .iter()
            .find(|c| c.rule.name == rule)
            .map(|c| &c.rule.action)
    }
}

/// Runs an alert's action; failures are logged, never fatal.
pub async fn fire(action: Action, alert: Alert) {
    let body = serde_json::to_vec(&alert).expect("alerts serialize");
    let r: anyhow::Result<()> = async {
        match action {
            Action::Command(argv) => {
                anyhow::ensure!(!argv.is_empty(), "empty command");
                let mut child = tokio::process::Command::new(&argv[0])
                    .args(&argv[1..])
                    .stdin(std::process::Stdio::piped())
                    .spawn()?;
                let mut stdin = child.stdin.take().expect("piped");
                tokio::io::AsyncWriteExt::write_all(&mut stdin, &body).await?;
                drop(stdin);
                let status = tokio::time::timeout(std::time::Duration::from_secs(60), child.wait())
                    .await??;
                anyhow::ensure!(status.success(), "{} exited with {status}", argv[0]);
            }
            Action::Webhook(url) => post(&url, &body).await?,
        }
        Ok(())
    }
    .await;
    match r {
        Ok(()) => tracing::info!(rule = %alert.rule, "alert fired"),
        Err(e) => tracing::error!(rule = %alert.rule, "alert action failed: {e:#}"),
    }
}

async fn post(url: &str, body: &[u8]) -> anyhow::Result<()> {
    let (tls, rest) = match (url.strip_prefix("https://"), url.strip_prefix("http://")) {
        (Some(r), _) => (true, r),
        (_, Some(r)) => (false, r),
        _ => anyhow::bail!("not an http(s) URL: {url}"),
    };
    let (hostport, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let host = hostport.rsplit_once(':').map_or(hostport, |(h, _)| h);
    let addr = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:{}", if tls { 443 } else { 80 })
    };
    let tcp = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio::net::TcpStream::connect(&addr),
    )
    .await??;
    let headers = [
        ("Content-Type", "application/json"),
        ("Connection", "close"),
    ];
    let r = if tls {
        crate::tls::init();
        let mut roots = rustls::RootCertStore::empty();
        for c in
            rustls_pki_types::pem::PemObject::pem_file_iter("/etc/ssl/certs/ca-certificates.crt")?
        {
            let _ = roots.add(c?);
        }
        let cfg = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(host.to_string())?;
        let s = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
            .connect(name, tcp)
            .await?;
        let mut s = tokio::io::BufReader::new(s);
        crate::http1::request(&mut s, "POST", host, &path, &headers, body, 1 << 20).await?
    } else {
        let mut s = tokio::io::BufReader::new(tcp);
        crate::http1::request(&mut s, "POST", host, &path, &headers, body, 1 << 20).await?
    };
    anyhow::ensure!(
        (200..300).contains(&r.status),
        "webhook answered {}",
        r.status
    );
    Ok(())
}

#[cfg(test)]
mod tests {

    /// A webhook receiver on loopback answering `status`; returns the URL and what it received.
    async fn receiver(status: &'static str) -> (String, tokio::task::JoinHandle<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hooks/alert", l.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let (mut c, _) = l.accept().await.unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !String::from_utf8_lossy(&got).ends_with("{\"rule\":\"r\"}") {
                let n = c.read(&mut buf).await.unwrap();
                assert!(n > 0, "the request ended early");
                got.extend_from_slice(&buf[..n]);
            }
            c.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                .await
                .unwrap();
            String::from_utf8(got).unwrap()
        });
        (url, task)
    }

    #[tokio::test]
    async fn webhooks_post_json_and_report_a_refusal() {
        let (url, got) = receiver("204 No Content").await;
        post(&url, br#"{"rule":"r"}"#).await.unwrap();
        let req = got.await.unwrap();
        assert!(req.starts_with("POST /hooks/alert HTTP/1.1\r\n"), "{req}");
        assert!(req.contains("Content-Type: application/json\r\n"), "{req}");
        let (url, _) = receiver("500 Internal Server Error").await;
        let e = post(&url, br#"{"rule":"r"}"#).await.unwrap_err();
        assert_eq!(e.to_string(), "webhook answered 500");
        assert!(post("ftp://x/", b"").await.is_err());
    }

    use super::*;

    fn rec(ts_ms: i64, level: Level, msg: &str) -> LogRecord {
        LogRecord {
            id: format!("{ts_ms}"),
            ts_ms,
            host: "b1".into(),
            level,
            target: "backend".into(),
            message: msg.into(),
            fields: Default::default(),
        }
    }

    #[test]
    fn fires_once_per_window_then_again_in_the_next() {
        let rule = Rule {
            name: "db".into(),
            level: Level::Error,
            target: Some("backend".into()),
            message: Some("database .* refused".into()),
            host: None,
            count: 3,
            window_seconds: 60,
            action: Action::Command(vec!["true".into()]),
        };
        let mut a = Alerts::new(vec![rule]).unwrap();
        let burst: Vec<LogRecord> = (0..10)
            .map(|i| rec(1_000 + i, Level::Error, "database x refused"))
            .collect();
        let fired = a.observe(&burst.iter().collect::<Vec<_>>());
        assert_eq!(fired.len(), 1, "one alert for a burst of 10");
        assert_eq!(fired[0].count, 3);
        // Non-matching: lower level, other message.
        let other = [
            rec(2_000, Level::Warn, "database x refused"),
            rec(2_001, Level::Error, "all fine"),
        ];
        assert!(a.observe(&other.iter().collect::<Vec<_>>()).is_empty());
        // The next window fires again.
        let next: Vec<LogRecord> = (0..3)
            .map(|i| rec(61_000 + i, Level::Error, "database y refused"))
            .collect();
        assert_eq!(a.observe(&next.iter().collect::<Vec<_>>()).len(), 1);
        assert!(
            Alerts::new(vec![Rule {
                name: "bad".into(),
                level: Level::Info,
                target: None,
                message: Some("(".into()),
                host: None,
                count: 1,
                window_seconds: 1,
                action: Action::Webhook("http://x".into())
            }])
            .is_err()
        );
    }
}
