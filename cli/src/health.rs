//! Health checks after a run: the checks each role declares (`roles/<role>/health/main.yaml`,
//! parsed by `roles::health`), made where the traffic really comes from. This module keeps only
//! the generic kinds: run a command, fetch over HTTP(S) (and read Prometheus metrics), query
//! PostgreSQL, talk TLS with `openssl s_client`, query logd's API with sagectl's certificate.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use minijinja::value::Serde;
use minijinja::{Environment, Value};

use crate::inventory::{Host, Inventory, Role};
use crate::roles::health::{CheckFrom, CheckKind, HealthCheck, HttpClient};
use crate::ssh::Session;

/// One check's result, reported on the host whose role it checks.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Check {
    pub host: String,
    pub name: String,
    pub ok: bool,
    pub detail: String,
    /// How long it took (retries included).
    pub seconds: f64,
}

/// The password travels on stdin into a temporary PGPASSFILE, never on a command line.
const PG_SCRIPT: &str = r#"f=$(mktemp)
trap 'rm -f "$f"' EXIT
cat > "$f"
PGPASSFILE="$f" PGCONNECT_TIMEOUT=5 psql "$1" -XAtc "$2"
"#;

const TLS_SCRIPT: &str = r#"printf '%s' "$1" | timeout 5 openssl s_client -quiet -connect "$2" -CAfile "$3" -cert "$4" -key "$5" -verify_return_error 2>&1"#;

/// Prints the body, then a last line with the status (urllib follows no error status).
/// A plain `http://` GET on bash's /dev/tcp (hosts without curl), printing what curl's `-w`
/// prints below: the body, a line break, the status and a space.
const SHELL_FETCH: &str = r#"u=${1#http://}; hp=${u%%/*}; path=/${u#*/}
[ "$u" = "$hp" ] && path=/
host=${hp%:*}; port=${hp##*:}
[ "$host" = "$hp" ] && port=80
exec 3<>"/dev/tcp/$host/$port" || exit 7
printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$path" "$hp" >&3
IFS=' ' read -r _ status _ <&3
while IFS= read -r h <&3; do h=${h%$'\r'}; [ -z "$h" ] && break; done
cat <&3
printf '\n%s ' "$status""#;

async fn retry<F, Fut>(again: bool, mut f: F) -> Result<String, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<String, String>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if !again || Instant::now() > deadline => return Err(e),
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

/// Prometheus text as `name → [{labels, value}]` (integral values as integers).
pub fn parse_metrics(text: &str) -> serde_json::Value {
    let mut out: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.trim().rsplit_once(' ') else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let labels: serde_json::Map<String, serde_json::Value> = labels
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').into()))
            .collect();
        let value = match (value.parse::<i64>(), value.parse::<f64>()) {
            (Ok(i), _) => serde_json::json!(i),
            (_, Ok(f)) => serde_json::json!(f),
            _ => continue,
        };
        out.entry(name.to_string())
            .or_default()
            .push(serde_json::json!({"labels": labels, "value": value}));
    }
    serde_json::json!(out)
}

/// Everything a check needs besides itself.
struct Env<'a> {
    inv: &'a Inventory,
    secrets: &'a BTreeMap<String, crate::pki::Secret>,
    jinja: Environment<'static>,
}

type Ctx = BTreeMap<String, Value>;

impl Env<'_> {
    fn render(&self, t: &str, ctx: &Ctx) -> Result<String, String> {
        self.jinja.render_str(t, ctx).map_err(|e| format!("{e:#}"))
    }

    fn truth(&self, e: &str, ctx: &Ctx) -> Result<bool, String> {
        let expr = self
            .jinja
            .compile_expression(e)
            .map_err(|e| format!("{e:#}"))?;
        expr.eval(ctx)
            .map(|v| v.is_true())
            .map_err(|e| format!("{e:#}"))
    }

    /// Makes the check's kind once; what it gave back is added to `ctx`.
    async fn make(&self, c: &HealthCheck, s: &Session, ctx: &mut Ctx) -> Result<(), String> {
        match &c.kind {
            CheckKind::Command(argv) => {
                let argv = argv
                    .iter()
                    .map(|a| self.render(a, ctx))
                    .collect::<Result<Vec<_>, _>>()?;
                let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
                let out = run(s, &argv, b"").await?;
                ctx.insert("output".into(), Value::from(out));
            }
            CheckKind::Http {
                url,
                resolve,
                cacert,
                cert,
                client,
            } => {
                let url = self.render(url, ctx)?;
                let (resolve, cacert, cert) = (
                    self.render(resolve, ctx)?,
                    self.render(cacert, ctx)?,
                    self.render(cert, ctx)?,
                );
                let out = match client {
                    HttpClient::Shell => {
                        if !url.starts_with("http://") {
                            return Err(format!(
                                "{url}: the shell client fetches plain http:// URLs only"
                            ));
                        }
                        let argv = ["timeout", "5", "bash", "-c", SHELL_FETCH, "bash", &url];
                        run(s, &argv, b"").await?
                    }
                    HttpClient::Curl => {
                        let mut argv = vec!["curl", "-sS", "--fail", "--max-time", "5"];
                        for (flag, v) in [
                            ("--resolve", &resolve),
                            ("--cacert", &cacert),
                            ("--cert", &cert),
                        ] {
                            if !v.is_empty() {
                                argv.extend([flag, v.as_str()]);
                            }
                        }
                        argv.extend(["-w", "\\n%{http_code} %{redirect_url}", &url]);
                        run(s, &argv, b"").await?
                    }
                };
                let (body, last) = out.rsplit_once('\n').unwrap_or(("", &out));
                let (status, location) = last.split_once(' ').unwrap_or((last, ""));
                ctx.insert("url".into(), Value::from(url.clone()));
                ctx.insert(
                    "status".into(),
                    Value::from(status.parse::<u16>().unwrap_or(0)),
                );
                ctx.insert("location".into(), Value::from(location.trim()));
                ctx.insert("metrics".into(), Value::from(Serde(parse_metrics(body))));
                ctx.insert("body".into(), Value::from(body));
            }
            CheckKind::Psql {
                conninfo,
                password_secret,
                query,
            } => {
                let (conninfo, query) = (self.render(conninfo, ctx)?, self.render(query, ctx)?);
                let secret = self
                    .secrets
                    .get(password_secret)
                    .ok_or_else(|| format!("no secret {password_secret}"))?;
                let pgpass = format!("*:*:*:*:{}\n", secret.expose());
                let argv = ["sh", "-c", PG_SCRIPT, "sh", &conninfo, &query];
                let out = run(s, &argv, pgpass.as_bytes()).await?;
                ctx.insert("output".into(), Value::from(out));
            }
            CheckKind::Tls(t) => {
                let connect = self.render(&t.connect, ctx)?;
                let argv = [
                    "sh",
                    "-c",
                    TLS_SCRIPT,
                    "sh",
                    &self.render(&t.send, ctx)?,
                    &connect,
                    &self.render(&t.ca, ctx)?,
                    &self.render(&t.cert, ctx)?,
                    &self.render(&t.key, ctx)?,
                ];
                let out = run(s, &argv, b"").await?;
                ctx.insert("connect".into(), Value::from(connect));
                ctx.insert("output".into(), Value::from(out));
            }
            CheckKind::LogdQuery => {
                let q = crate::logquery::Query {
                    since: "1h".into(),
                    limit: 1,
                    ..Default::default()
                };
                let client =
                    crate::logquery::Client::new(self.inv, q).map_err(|e| e.to_string())?;
                client.records(0).await.map_err(|e| format!("{e:#}"))?;
            }
        }
        Ok(())
    }

    /// One attempt: make the check, then judge what came back.
    async fn attempt(&self, c: &HealthCheck, s: &Session, ctx: &Ctx) -> Result<String, String> {
        let mut ctx = ctx.clone();
        self.make(c, s, &mut ctx).await?;
        self.judge(c, &ctx)
    }

    /// The detail of a check whose kind gave back what `ctx` holds: `ok` when `expect` holds.
    fn judge(&self, c: &HealthCheck, ctx: &Ctx) -> Result<String, String> {
        let passed = match &c.expect {
            Some(e) => self.truth(e, ctx)?,
            None => true,
        };
        if passed {
            self.render(&c.ok, ctx)
        } else {
            Err(match &c.fail {
                Some(t) => self.render(t, ctx)?,
                None => format!("{}: not as expected", c.name),
            })
        }
    }
}

/// Runs every check the roles of `hosts` (those that were converged) declare. A host's checks
/// come in role order, those made on the host (or from sagectl) before those made from another
/// host.
pub async fn check_all(
    inv: &Inventory,
    catalog: &crate::roles::Catalog,
    hosts: &[&Host],
    sessions: &BTreeMap<String, Session>,
    secrets: &BTreeMap<String, crate::pki::Secret>,
    changed: &BTreeMap<&str, usize>,
) -> Vec<Check> {
    let env = Env {
        inv,
        secrets,
        jinja: crate::render::environment(),
    };
    let reached: BTreeMap<&str, usize> = Role::DECLARABLE
        .iter()
        .map(|r| {
            let n = inv
                .with_role(*r)
                .filter(|h| sessions.contains_key(&h.name))
                .count();
            (r.name(), n)
        })
        .collect();
    let view = |h: &Host| serde_json::json!({"name": h.name, "address": h.address.to_string()});
    // Every check at once: each is a round trip or two on an open SSH connection (channels
    // multiplex), so a run waits for the slowest, not for their sum (issue 16: 0.53 s of the
    // 5-host lab's no-op run went to checks made one after another).
    let env = &env;
    let mut jobs = Vec::new();
    for h in hosts {
        let Some(own) = sessions.get(&h.name) else {
            continue;
        };
        let mut base: Ctx = crate::render::context(inv, catalog, h)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        base.insert(
            "own_certificate".into(),
            Value::from(inv.tls.certificate.is_some()),
        );
        base.insert("reached".into(), Value::from(Serde(&reached)));
        // The hosts reached in this run, by name.
        base.insert(
            "reached_hosts".into(),
            Value::from(Serde(sessions.keys().collect::<Vec<_>>())),
        );
        // What this run changed on the host (a check may be made only after a change).
        base.insert(
            "host_changed".into(),
            Value::from(changed.get(h.name.as_str()).copied().unwrap_or(0)),
        );
        let mut checks: Vec<&HealthCheck> = h
            .all_roles()
            .flat_map(|r| catalog.role(r).health.iter())
            .collect();
        checks.sort_by_key(|c| c.from != CheckFrom::Host);
        for c in checks {
            let from = match c.from {
                CheckFrom::Host => Some((*h, own)),
                CheckFrom::Role(r) => inv
                    .with_role(r)
                    .find_map(|x| sessions.get(&x.name).map(|s| (x, s))),
            };
            let Some((from, s)) = from else {
                continue;
            };
            let mut ctx = base.clone();
            ctx.insert("from_host".into(), Value::from(Serde(view(from))));
            let targets: Vec<Option<&Host>> = match c.for_each {
                Some(r) => inv.with_role(r).map(Some).collect(),
                None => vec![None],
            };
            for t in targets {
                let mut ctx = ctx.clone();
                if let Some(t) = t {
                    ctx.insert("target".into(), Value::from(Serde(view(t))));
                }
                let r = prepare(env, c, &mut ctx);
                let host = h.name.clone();
                jobs.push(async move {
                    let started = std::time::Instant::now();
                    let r = match r {
                        Ok(false) => return None,
                        Ok(true) => retry(c.retry, || env.attempt(c, s, &ctx)).await,
                        Err(e) => Err(e),
                    };
                    let (ok, detail) = match r {
                        Ok(d) => (true, d),
                        Err(e) => (false, e),
                    };
                    Some(Check {
                        host,
                        name: c.name.clone(),
                        ok,
                        detail,
                        seconds: started.elapsed().as_secs_f64(),
                    })
                });
            }
        }
    }
    futures_util::future::join_all(jobs)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Whether the check applies (`when:`), with its `let:` values added to `ctx`.
fn prepare(env: &Env<'_>, c: &HealthCheck, ctx: &mut Ctx) -> Result<bool, String> {
    if let Some(w) = &c.when {
        if !env.truth(w, ctx)? {
            return Ok(false);
        }
    }
    for (k, t) in &c.lets {
        let v = env.render(t, ctx)?;
        ctx.insert(k.clone(), Value::from(v));
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The declared check `name` of `role`, judged on what its kind gave back (`values`).
    fn judge(role: Role, name: &str, values: serde_json::Value) -> Result<String, String> {
        let catalog = crate::roles::Catalog::embedded().unwrap();
        let c = catalog
            .role(role)
            .health
            .iter()
            .find(|c| c.name == name)
            .unwrap();
        let inv = crate::inventory::Inventory::load(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../inventories/lab.yaml"
        )))
        .unwrap();
        let secrets = BTreeMap::new();
        let env = Env {
            inv: &inv,
            secrets: &secrets,
            jinja: crate::render::environment(),
        };
        let mut ctx: Ctx = serde_json::from_value::<BTreeMap<String, serde_json::Value>>(values)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, Value::from(Serde(v))))
            .collect();
        ctx.insert(
            "reached".into(),
            Value::from(Serde(serde_json::json!({"worker": 2}))),
        );
        ctx.insert(
            "from_host".into(),
            Value::from(Serde(serde_json::json!({"name": "backend1"}))),
        );
        ctx.insert(
            "worker".into(),
            Value::from(Serde(serde_json::json!({"engine": "python3"}))),
        );
        ctx.entry("host_changed".into()).or_insert(Value::from(1));
        if !prepare(&env, c, &mut ctx)? {
            return Err("not made".into());
        }
        env.judge(c, &ctx)
    }

    #[test]
    fn the_shell_client_fetches_like_curl_prints() {
        // A one-answer HTTP server on loopback, and the script as a check runs it.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            use std::io::{Read, Write};
            let (mut c, _) = l.accept().unwrap();
            // The whole request first: closing with some of it unread would reset the
            // connection and lose the answer.
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.ends_with(b"\r\n\r\n") {
                let n = c.read(&mut buf).unwrap();
                assert!(n > 0, "the request ended early: {req:?}");
                req.extend_from_slice(&buf[..n]);
            }
            c.write_all(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nsagews_worker_sessions_open 3\n")
                .unwrap();
            String::from_utf8_lossy(&req).to_string()
        });
        let url = format!("http://127.0.0.1:{port}/metrics");
        let o = std::process::Command::new("bash")
            .args(["-c", SHELL_FETCH, "bash", &url])
            .output()
            .unwrap();
        let req = server.join().unwrap();
        assert!(req.starts_with("GET /metrics HTTP/1.0\r\n"), "{req:?}");
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            "sagews_worker_sessions_open 3\n\n200 "
        );
    }

    #[test]
    fn declared_checks_judge_as_before() {
        let limits = |mode: &str| {
            parse_metrics(&format!(
                "sagews_worker_limits{{mode=\"{mode}\"}} 1\nsagews_worker_sessions_open 0\n"
            ))
        };
        assert_eq!(
            judge(
                Role::Worker,
                "worker",
                serde_json::json!({"metrics": limits("cgroup1"), "body": ""})
            ),
            Ok(
                "sage-worker runs and serves its metrics; sessions: a cgroup1 cgroup per session"
                    .into()
            )
        );
        assert_eq!(
            judge(Role::Worker, "worker", serde_json::json!({"metrics": limits("rlimits"), "body": ""})),
            Ok("sage-worker runs and serves its metrics; sessions: per-process rlimits only: no cgroup controllers".into())
        );
        assert_eq!(
            judge(
                Role::Worker,
                "worker",
                serde_json::json!({"metrics": {}, "body": "nope"})
            ),
            Err("no metrics from sage-worker: nope".into())
        );
        assert_eq!(
            judge(
                Role::Worker,
                "engine",
                serde_json::json!({"output": "42\n"})
            ),
            Ok("`print(6 * 7)` from backend1 gives `42`".into())
        );
        assert_eq!(
            judge(
                Role::Worker,
                "engine",
                serde_json::json!({"output": "41\n"})
            ),
            Err("`print(6 * 7)` from backend1 gave `41`, not `42`".into())
        );
        // Made after a change on the worker only (a no-op run starts no session).
        assert_eq!(
            judge(
                Role::Worker,
                "engine",
                serde_json::json!({"output": "42\n", "host_changed": 0})
            ),
            Err("not made".into())
        );
        let healthy = |n: i64| parse_metrics(&format!("sagews_backend_healthy_workers {n}\n"));
        let target = serde_json::json!({"name": "backend1"});
        assert_eq!(
            judge(
                Role::Loadbalancer,
                "backend workers",
                serde_json::json!({"metrics": healthy(2), "target": target})
            ),
            Ok("backend1 sees 2 of 2 workers".into())
        );
        assert_eq!(
            judge(
                Role::Loadbalancer,
                "backend workers",
                serde_json::json!({"metrics": healthy(1), "target": target})
            ),
            Err("backend1 sees 1 of 2 workers".into())
        );
        assert_eq!(
            judge(
                Role::Loadbalancer,
                "backend workers",
                serde_json::json!({"metrics": {}, "target": target})
            ),
            Err("backend1 sees no of 2 workers".into())
        );
        assert_eq!(
            judge(
                Role::Loadbalancer,
                "haproxy redirect",
                serde_json::json!({"status": 301, "location": "https://x/"})
            ),
            Ok("port 80 redirects: 301 https://x/".into())
        );
        assert!(
            judge(
                Role::Loadbalancer,
                "haproxy redirect",
                serde_json::json!({"status": 200, "location": ""})
            )
            .is_err()
        );
        let url = serde_json::json!("https://x/api/health");
        assert_eq!(
            judge(
                Role::Loadbalancer,
                "backend through haproxy",
                serde_json::json!({"body": "ok\n", "url": url})
            ),
            Ok(
                "https://x/api/health: a backend answers through HAProxy and reaches PostgreSQL"
                    .into()
            )
        );
        assert_eq!(
            judge(
                Role::Database,
                "postgresql from backend",
                serde_json::json!({"output": "t\n"})
            ),
            Ok("backend1 connects with verify-full TLS and its password".into())
        );
        assert_eq!(
            judge(
                Role::Cache,
                "memcached from backend",
                serde_json::json!({"output": "STAT pid 12\r\nEND\r\n", "connect": "a:1"})
            ),
            Ok("backend1 gets `stats` over TLS with its certificate".into())
        );
        assert_eq!(
            judge(
                Role::Cache,
                "memcached from backend",
                serde_json::json!({"output": "x\nverify error", "connect": "a:1"})
            ),
            Err("no stats from a:1: verify error".into())
        );
        assert_eq!(
            judge(
                Role::Firewall,
                "firewall",
                serde_json::json!({"output": "table inet sagectl {}"})
            ),
            Ok("rules loaded".into())
        );
    }

    #[test]
    fn metrics_by_name_with_labels() {
        let m = parse_metrics(
            "# TYPE x gauge\nsagews_worker_limits{mode=\"cgroup1\"} 1\nsagews_worker_sessions_open 0\nf 0.5\n",
        );
        assert_eq!(m["sagews_worker_limits"][0]["labels"]["mode"], "cgroup1");
        assert_eq!(m["sagews_worker_sessions_open"][0]["value"], 0);
        assert_eq!(m["f"][0]["value"], 0.5);
    }
}
