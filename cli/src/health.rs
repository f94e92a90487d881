//! Health checks after a run, per role, made where the traffic really comes from: HAProxy from
//! its own host (301 on :80; the client page on :443 with a certificate that verifies), nginx
//! through HAProxy, PostgreSQL and memcached from a backend host with that host's credentials.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::inventory::{Host, Inventory, Role};
use crate::ssh::Session;

/// One check's result, reported on the host whose role it checks.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Check {
    pub host: String,
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

const PG_SCRIPT: &str = r#"f=$(mktemp)
trap 'rm -f "$f"' EXIT
cat > "$f"
PGPASSFILE="$f" PGCONNECT_TIMEOUT=5 psql "$1" -XAtc "$2"
"#;

const MEMCACHED_SCRIPT: &str = r#"printf 'stats\r\nquit\r\n' | timeout 5 openssl s_client -quiet -connect "$1" -CAfile /etc/sage-agent/ca.crt -cert /etc/sage-agent/host.crt -key /etc/sage-agent/host.key -verify_return_error 2>&1"#;

/// Workers have python3, not curl: fetch the worker's local metrics page with it.
const WORKER_METRICS: &str = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:7001/metrics', timeout=5).read().decode())";

async fn retry<F, Fut>(mut f: F) -> Result<String, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<String, String>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

async fn run(s: &Session, argv: &[&str], stdin: &[u8]) -> Result<String, String> {
    let o = s
        .run(argv, stdin, Duration::from_secs(30))
        .await
        .map_err(|e| e.to_string())?;
    if o.ok() {
        Ok(o.stdout_text())
    } else {
        Err(o.tail())
    }
}

/// Runs every check that applies to `hosts` (those that were converged).
pub async fn check_all(
    inv: &Inventory,
    catalog: &crate::roles::Catalog,
    hosts: &[&Host],
    sessions: &BTreeMap<String, Session>,
    secrets: &BTreeMap<String, crate::pki::Secret>,
) -> Vec<Check> {
    let own_cert = inv.tls.certificate.is_some();
    let mut out = Vec::new();
    let backend = inv
        .with_role(Role::Backend)
        .find(|b| sessions.contains_key(&b.name));
    for h in hosts {
        let Some(s) = sessions.get(&h.name) else {
            continue;
        };
        let mut push = |name: &str, r: Result<String, String>| {
            let (ok, detail) = match r {
                Ok(d) => (true, d),
                Err(e) => (false, e),
            };
            out.push(Check {
                host: h.name.clone(),
                name: name.to_string(),
                ok,
                detail,
            });
        };
        let r = run(s, &["nft", "list", "table", "inet", "sagectl"], b"")
            .await
            .map(|_| "rules loaded".to_string());
        push("firewall", r);
        if h.has(Role::Logd) && Some(&h.name) != inv.logd.replica.as_ref() {
            let r = retry(|| async {
                let o = crate::command::logs::Opts {
                    inventory: inv.file.clone(),
                    since: "1h".into(),
                    level: None,
                    host: None,
                    target: None,
                    grep: None,
                    follow: false,
                    limit: 1,
                };
                let c = crate::command::logs::Client::new(inv, &o).map_err(|e| e.to_string())?;
                c.records(0)
                    .await
                    .map(|_| "sage-logd answers queries with sagectl's certificate".to_string())
                    .map_err(|e| format!("{e:#}"))
            })
            .await;
            push("logd", r);
        }
        if h.has(Role::Worker) {
            let r = retry(|| async {
                let o = run(s, &["python3", "-c", WORKER_METRICS], b"").await?;
                let mode = o.lines().find_map(|l| {
                    l.strip_prefix("sagews_worker_limits{mode=\"")
                        .and_then(|r| r.split('"').next())
                });
                if let (true, Some(mode)) = (o.contains("sagews_worker_sessions_open"), mode) {
                    let how = match mode {
                        "rlimits" => "per-process rlimits only: no cgroup controllers".to_string(),
                        m => format!("a {m} cgroup per session"),
                    };
                    Ok(format!(
                        "sage-worker runs and serves its metrics; sessions: {how}"
                    ))
                } else {
                    Err(format!("no metrics from sage-worker: {o}"))
                }
            })
            .await;
            push("worker", r);
            // A real cell on the engine, through the worker's protocol, with a backend's
            // certificate (from a backend host, as sessions come): a worker that cannot run its
            // engine is a failed deploy.
            if let Some(b) = backend {
                let bs = &sessions[&b.name];
                let (code, want) = match inv.worker.engine {
                    crate::inventory::Engine::Sage => ("factor(2^64+1)", "274177 * 67280421310721"),
                    crate::inventory::Engine::Python3 => ("print(6 * 7)", "42"),
                };
                let address = format!("{}:{}", h.address, inv.worker.port);
                let r = retry(|| async {
                    let o = run(
                        bs,
                        &[
                            "/usr/local/bin/sage-agent",
                            "probe",
                            "--worker",
                            &h.name,
                            "--address",
                            &address,
                            "--code",
                            code,
                        ],
                        b"",
                    )
                    .await?;
                    if o.trim() == want {
                        Ok(format!("`{code}` from {} gives `{want}`", b.name))
                    } else {
                        Err(format!(
                            "`{code}` from {} gave `{}`, not `{want}`",
                            b.name,
                            o.trim()
                        ))
                    }
                })
                .await;
                push("engine", r);
            }
        }
        if h.has(Role::Loadbalancer) {
            let r = retry(|| async {
                let o = run(
                    s,
                    &[
                        "curl",
                        "-sS",
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{http_code} %{redirect_url}",
                        "http://127.0.0.1/",
                    ],
                    b"",
                )
                .await?;
                if o.starts_with("301 https://") {
                    Ok(format!("port 80 redirects: {o}"))
                } else {
                    Err(format!("port 80 answered {o:?}, not a 301 to https"))
                }
            })
            .await;
            push("haproxy redirect", r);
            let name = &inv.tls.public_name;
            let resolve = format!("{name}:443:127.0.0.1");
            let url = format!("https://{name}/");
            // The public name resolved to this host, verified as a browser would.
            let get = |url: String| {
                let resolve = resolve.clone();
                async move {
                    let mut argv = vec!["curl", "-sS", "--fail", "--max-time", "5"];
                    argv.extend(["--resolve", &resolve]);
                    if !own_cert {
                        argv.extend(["--cacert", "/etc/haproxy/certs/ca.crt"]);
                    }
                    argv.push(&url);
                    run(s, &argv, b"").await
                }
            };
            let r = retry(|| async {
                let body = get(url.clone()).await?;
                if body.contains("Sage workspaces") {
                    Ok(format!(
                        "{url} serves the client page (verified certificate, HAProxy -> nginx)"
                    ))
                } else {
                    Err(format!("{url} answered without the client page"))
                }
            })
            .await;
            push("haproxy https + nginx", r);
            let api = format!("https://{name}/api/health");
            let r = retry(|| async {
                let body = get(api.clone()).await?;
                if body.trim() == "ok" {
                    Ok(format!(
                        "{api}: a backend answers through HAProxy and reaches PostgreSQL"
                    ))
                } else {
                    Err(format!("{api} answered {body:?}"))
                }
            })
            .await;
            push("backend through haproxy", r);
            // Each backend, with HAProxy's own certificate: it must see every worker reached in
            // this run (one that is down is reported on its own host).
            let workers = inv
                .with_role(Role::Worker)
                .filter(|w| sessions.contains_key(&w.name))
                .count();
            for b in inv.with_role(Role::Backend) {
                let port = inv.backend.port;
                let resolve = format!("{}:{port}:{}", b.name, b.address);
                let url = format!("https://{}:{port}/api/metrics", b.name);
                let r = retry(|| async {
                    let argv = [
                        "curl",
                        "-sS",
                        "--fail",
                        "--max-time",
                        "5",
                        "--resolve",
                        &resolve,
                        "--cacert",
                        "/etc/haproxy/certs/ca.crt",
                        "--cert",
                        "/etc/haproxy/certs/host.pem",
                        &url,
                    ];
                    let body = run(s, &argv, b"").await?;
                    let seen = body
                        .lines()
                        .find_map(|l| l.strip_prefix("sagews_backend_healthy_workers "))
                        .and_then(|n| n.trim().parse::<usize>().ok());
                    match seen {
                        Some(n) if n >= workers => {
                            Ok(format!("{} sees {n} of {workers} workers", b.name))
                        }
                        other => Err(format!(
                            "{} sees {} of {workers} workers",
                            b.name,
                            other.map_or("no".to_string(), |n| n.to_string())
                        )),
                    }
                })
                .await;
                push("backend workers", r);
            }
        }
        if let (Some(b), true) = (backend, h.has(Role::Database) || h.has(Role::Cache)) {
            let bs = &sessions[&b.name];
            if h.has(Role::Database) {
                let vars = crate::render::host_vars(inv, catalog, h);
                let port = vars
                    .get("postgres_port")
                    .and_then(|v| v.as_u64())
                    .unwrap_or(5432);
                let conninfo = format!(
                    "host={} port={port} dbname=sagews user=sagews_backend sslmode=verify-full sslrootcert=/etc/sage-agent/ca.crt",
                    h.address
                );
                let pgpass = format!(
                    "*:*:*:*:{}\n",
                    secrets["postgres_backend_password"].expose()
                );
                let r = retry(|| async {
                    let o = run(
                        bs,
                        &[
                            "sh",
                            "-c",
                            PG_SCRIPT,
                            "sh",
                            &conninfo,
                            "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
                        ],
                        pgpass.as_bytes(),
                    )
                    .await?;
                    if o.trim() == "t" {
                        Ok(format!(
                            "{} connects with verify-full TLS and its password",
                            b.name
                        ))
                    } else {
                        Err(format!("unexpected answer {o:?}"))
                    }
                })
                .await;
                push("postgresql from backend", r);
            }
            if h.has(Role::Cache) {
                let port = crate::render::host_vars(inv, catalog, h)
                    .get("memcached_port")
                    .and_then(|v| v.as_u64())
                    .unwrap_or(11211);
                let addr = format!("{}:{port}", h.address);
                let r = retry(|| async {
                    let o = run(bs, &["sh", "-c", MEMCACHED_SCRIPT, "sh", &addr], b"").await?;
                    if o.contains("STAT pid") {
                        Ok(format!(
                            "{} gets `stats` over TLS with its certificate",
                            b.name
                        ))
                    } else {
                        Err(format!(
                            "no stats from {addr}: {}",
                            o.lines().last().unwrap_or("")
                        ))
                    }
                })
                .await;
                push("memcached from backend", r);
            }
        }
    }
    out
}
