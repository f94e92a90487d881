//! `sagectl status` gathered through the pipeline's setup (state, pinned host keys, SSH
//! targets, renderer, the sage-agent binary): every host asked at once, one SSH exec each
//! (`crate::status::SCRIPT`), within a deadline; logd asked for the last `up` meanwhile. A host
//! that does not answer in time is unreachable and the others are still reported.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Pipeline;
use crate::health::parse_metrics;
use crate::inventory::{Host, Role};
use crate::render::StepKind;
use crate::ssh::{HostKeyPolicy, Session, SshError};
use crate::status::{
    AgentBuild, Drift, Fetch, Figure, HostStatus, LastUp, PgQuery, Probe, Query, Report,
};

/// What a host should have: its query and the sums of what would be rendered now.
struct Expected {
    query: Query,
    sums: BTreeMap<String, String>,
    /// The sage-agent binary's path, when the host has one.
    agent_path: Option<String>,
}

fn expected(p: &Pipeline, host: &Host, agent_sum: Option<&str>) -> anyhow::Result<Expected> {
    let (steps, _) =
        crate::render::host_steps(&p.inv, p.catalog, &p.state, host, p.agent.as_ref())?;
    let mut e = Expected {
        query: Query::default(),
        sums: BTreeMap::new(),
        agent_path: None,
    };
    for s in steps {
        match s.kind {
            StepKind::File(f) => {
                e.sums
                    .insert(f.path.clone(), crate::plan::sha256(&f.content));
                e.query.files.insert(f.path);
            }
            StepKind::Binary { path, .. } => {
                if let Some(sum) = agent_sum {
                    e.sums.insert(path.clone(), sum.to_string());
                }
                e.query.files.insert(path.clone());
                e.agent_path = Some(path);
            }
            StepKind::Service {
                name,
                started: true,
                ..
            } => e.query.units.push(name),
            _ => {}
        }
    }
    if host.has(Role::Worker) {
        // sage-worker's own metrics address.
        e.query.fetches.push(Fetch::Tcp {
            name: "worker".into(),
            addr: "127.0.0.1".into(),
            port: 7001,
            path: "/metrics".into(),
        });
    }
    if host.has(Role::Loadbalancer) {
        // The backends' metrics take HAProxy's certificate only.
        let port = p.inv.backend.port;
        for b in p.inv.with_role(Role::Backend) {
            e.query.fetches.push(Fetch::Curl {
                name: format!("backend:{}", b.name),
                url: format!("https://{}:{port}/api/metrics", b.name),
                resolve: format!("{}:{port}:{}", b.name, b.address),
                cacert: "/etc/haproxy/certs/ca.crt".into(),
                cert: "/etc/haproxy/certs/host.pem".into(),
            });
        }
    }
    if host.has(Role::Database) {
        e.query.postgres = Some(PgQuery {
            workers: p.inv.with_role(Role::Backend).next().is_some(),
            replication: p.inv.logd.replica.is_some(),
        });
    }
    Ok(e)
}

/// Asks one host; `Err` when it could not be asked: whether it answered over SSH (`None`: not
/// tried), and why.
async fn probe(
    p: &Pipeline,
    host: &Host,
    q: &Query,
    deadline: Duration,
) -> Result<Probe, (Option<bool>, String)> {
    let target = super::connect::target(host, p.lab_key.as_deref());
    let asked = async {
        let s = Session::connect(&target, p.known.clone(), HostKeyPolicy::Strict)
            .await
            .map_err(|e| {
                let unreachable = matches!(e, SshError::Connect { .. } | SshError::Timeout { .. });
                (Some(!unreachable), e.to_string())
            })?;
        let out = s
            .run(
                &["sh", "-c", crate::status::SCRIPT],
                q.stdin().as_bytes(),
                deadline,
            )
            .await;
        s.close().await;
        match out {
            Ok(o) if o.ok() => Ok(crate::status::parse(&o.stdout_text())),
            Ok(o) => Err((
                Some(true),
                format!("the status script failed: {}", o.tail()),
            )),
            Err(e) => Err((Some(false), e.to_string())),
        }
    };
    match tokio::time::timeout(deadline, asked).await {
        Ok(r) => r,
        Err(_) => Err((
            Some(false),
            format!(
                "no answer from {} within {:.1} s",
                target.addr,
                deadline.as_secs_f64()
            ),
        )),
    }
}

/// The value of a metric without labels (or its first series).
fn metric(m: &serde_json::Value, name: &str) -> Option<serde_json::Value> {
    m.get(name)?.get(0)?.get("value").cloned()
}

/// The last `up` recorded in logd (one query).
async fn last_up(p: &Pipeline, deadline: Duration) -> LastUp {
    let q = crate::logquery::Query {
        since: "3650d".into(),
        target: Some("sagectl::up".into()),
        limit: 1,
        ..Default::default()
    };
    let missing = |why: String| LastUp {
        unavailable: Some(why),
        ..Default::default()
    };
    if p.inv.with_role(Role::Logd).next().is_none() {
        return missing("no logd host".into());
    }
    let client = match crate::logquery::Client::new(&p.inv, q) {
        Ok(c) => c,
        Err(e) => return missing(format!("{e:#}")),
    };
    match tokio::time::timeout(deadline, client.records(0)).await {
        Ok(Ok(r)) => match r.last() {
            Some(r) => LastUp::from_record(r),
            None => missing("no `up` recorded in logd".into()),
        },
        Ok(Err(e)) => missing(format!("logd: {e:#}")),
        Err(_) => missing(format!(
            "logd did not answer within {:.1} s",
            deadline.as_secs_f64()
        )),
    }
}

impl Pipeline {
    /// Every host's status at once, each within `deadline`, and the last `up`.
    pub async fn status(self: &Arc<Self>, deadline: Duration) -> Report {
        let started = Instant::now();
        let agent_sum = self.agent.as_ref().map(|a| crate::plan::sha256(a));
        let mut tasks = tokio::task::JoinSet::new();
        for host in &self.inv.hosts {
            let (p, name, agent_sum) = (self.clone(), host.name.clone(), agent_sum.clone());
            tasks.spawn(async move {
                let t = Instant::now();
                let host = p.inv.host(&name).expect("from the inventory");
                let r = match expected(&p, host, agent_sum.as_deref()) {
                    Ok(e) => match probe(&p, host, &e.query, deadline).await {
                        Ok(pr) => Ok((e, pr)),
                        Err(err) => Err(err),
                    },
                    Err(err) => Err((None, format!("rendering: {err:#}"))),
                };
                (name, r, t.elapsed().as_secs_f64())
            });
        }
        let p = self.clone();
        let audit = tokio::spawn(async move { last_up(&p, deadline).await });
        let mut got = BTreeMap::new();
        while let Some(r) = tasks.join_next().await {
            let (name, r, secs) = r.expect("status task panicked");
            got.insert(name, (r, secs));
        }
        let last_up = audit.await.expect("audit query panicked");
        let mut hosts = Vec::new();
        let mut probes = BTreeMap::new();
        for host in &self.inv.hosts {
            let (r, secs) = got.remove(&host.name).expect("every host asked");
            hosts.push(self.host_status(host, &r, secs, agent_sum.as_deref()));
            if let Ok((_, pr)) = r {
                probes.insert(host.name.clone(), pr);
            }
        }
        self.cross_figures(&mut hosts, &probes);
        Report::new(
            self.inv.name.clone(),
            hosts,
            last_up,
            started.elapsed().as_secs_f64(),
        )
    }

    fn host_status(
        &self,
        host: &Host,
        r: &Result<(Expected, Probe), (Option<bool>, String)>,
        seconds: f64,
        agent_sum: Option<&str>,
    ) -> HostStatus {
        let mut h = HostStatus {
            host: host.name.clone(),
            address: host.address.to_string(),
            roles: host.roles.iter().map(|r| r.name().to_string()).collect(),
            seconds,
            ..Default::default()
        };
        let (e, pr) = match r {
            Ok((e, pr)) => (e, pr),
            Err((reachable, why)) => {
                h.reachable = *reachable;
                h.error = Some(why.clone());
                return h;
            }
        };
        h.reachable = Some(true);
        h.services = e
            .query
            .units
            .iter()
            .map(|u| {
                let s = pr.units.get(u).cloned().unwrap_or_else(|| "unknown".into());
                (u.clone(), s)
            })
            .collect();
        h.files_checked = e.query.files.len();
        for path in &e.query.files {
            let on_host = pr.sums.get(path);
            if Some(path) == e.agent_path.as_ref() {
                if let Some(sum) = agent_sum {
                    h.agent = Some(AgentBuild {
                        deployed: on_host.map(|s| s[..12.min(s.len())].to_string()),
                        this_sagectl: sum[..12].to_string(),
                        same: on_host.map(String::as_str) == Some(sum),
                    });
                }
                continue;
            }
            match (on_host, e.sums.get(path)) {
                (None, _) => h.drift.push(Drift {
                    path: path.clone(),
                    what: "missing",
                }),
                (Some(a), Some(b)) if a != b => h.drift.push(Drift {
                    path: path.clone(),
                    what: "changed",
                }),
                _ => {}
            }
        }
        if host.has(Role::Worker) {
            match pr.fetched.get("worker") {
                Some((true, body)) => {
                    let m = parse_metrics(body);
                    for (name, key) in [
                        ("sessions open", "sagews_worker_sessions_open"),
                        ("uids held", "sagews_worker_uids_held"),
                    ] {
                        h.figures.push(match metric(&m, key) {
                            Some(v) => Figure::new("worker", name, v),
                            None => Figure::missing("worker", name, format!("no {key}")),
                        });
                    }
                }
                other => h.figures.push(Figure::missing(
                    "worker",
                    "metrics",
                    fetch_failure(other.map(|(_, b)| b.as_str())),
                )),
            }
        }
        if host.has(Role::Database) {
            match &pr.pg {
                Some(pg) => {
                    let total: u64 = pg.connections.values().sum();
                    h.figures
                        .push(Figure::new("postgres", "connections", total));
                    for (db, n) in &pg.connections {
                        h.figures
                            .push(Figure::new("postgres", format!("{db} connections"), *n));
                    }
                    for (db, b) in &pg.sizes {
                        h.figures
                            .push(Figure::new("postgres", format!("{db} size"), *b).unit("bytes"));
                    }
                    for e in &pg.errors {
                        h.figures.push(Figure::missing(
                            "postgres",
                            "query",
                            format!("no answer from database {e}"),
                        ));
                    }
                }
                None => h
                    .figures
                    .push(Figure::missing("postgres", "figures", "psql gave nothing")),
            }
        }
        h
    }

    /// Figures a host gives about others: the backends' metrics (from the loadbalancer), the
    /// workers as the backends recorded them and logd's replication (from the database).
    fn cross_figures(&self, hosts: &mut [HostStatus], probes: &BTreeMap<String, Probe>) {
        let lb = self
            .inv
            .with_role(Role::Loadbalancer)
            .find_map(|h| probes.get(&h.name));
        // The primary: the standby's copy of the same tables may lag.
        let db = probes.get(&self.inv.database.primary);
        for h in hosts.iter_mut() {
            if h.error.is_some() {
                continue;
            }
            let host = self.inv.host(&h.host).expect("from the inventory");
            if host.has(Role::Backend) {
                let key = format!("backend:{}", host.name);
                match lb.map(|l| l.fetched.get(&key)) {
                    Some(Some((true, body))) => {
                        let m = parse_metrics(body);
                        for (name, key) in [
                            ("sockjs sessions", "sagews_backend_sockjs_sessions"),
                            ("open workspaces", "sagews_backend_open_workspaces"),
                            ("healthy workers", "sagews_backend_healthy_workers"),
                            ("draining workers", "sagews_backend_draining_workers"),
                        ] {
                            h.figures.push(match metric(&m, key) {
                                Some(v) => Figure::new("backend", name, v),
                                None => Figure::missing("backend", name, format!("no {key}")),
                            });
                        }
                    }
                    Some(other) => h.figures.push(Figure::missing(
                        "backend",
                        "metrics",
                        format!(
                            "fetched from the loadbalancer: {}",
                            fetch_failure(other.map(|(_, b)| b.as_str()))
                        ),
                    )),
                    None => h.figures.push(Figure::missing(
                        "backend",
                        "metrics",
                        "no loadbalancer answered (they are fetched with its certificate)",
                    )),
                }
            }
            let pg = db.and_then(|d| d.pg.as_ref());
            if host.has(Role::Worker) {
                match pg.map(|pg| pg.workers.get(&host.name)) {
                    Some(Some(w)) => {
                        h.figures
                            .push(Figure::new("backends", "see sessions", w.sessions));
                        h.figures.push(Figure::new("backends", "load", w.load));
                        h.figures
                            .push(Figure::new("backends", "heard", w.seconds_ago).unit(" s ago"));
                        h.figures
                            .push(Figure::new("backends", "by", w.seen_by.clone()));
                    }
                    Some(None) => h.figures.push(Figure::missing(
                        "backends",
                        "see",
                        "no backend has recorded this worker",
                    )),
                    None => h.figures.push(Figure::missing(
                        "backends",
                        "see",
                        "the database host did not answer",
                    )),
                }
            }
            if host.has(Role::Logd) {
                h.figures.push(Figure::missing(
                    "logd",
                    "queue",
                    "logd does not expose its queue",
                ));
                let is_replica = self.inv.logd.replica.as_ref() == Some(&host.name);
                let replica = self
                    .inv
                    .logd
                    .replica
                    .as_ref()
                    .and_then(|r| self.inv.host(r));
                match (is_replica, replica) {
                    (true, _) => {}
                    (false, None) => h.figures.push(Figure::missing(
                        "logd",
                        "replica lag",
                        "no replica configured",
                    )),
                    (false, Some(r)) => {
                        let peer = format!("{}:{}", r.address, self.inv.logd.port);
                        h.figures.push(
                            match pg.map(|pg| (pg.logs_top, pg.replicated.get(&peer))) {
                                Some((Some(top), done)) => Figure::new(
                                    "logd",
                                    format!("replica {} lag", r.name),
                                    top - done.copied().unwrap_or(0),
                                )
                                .unit(" records"),
                                _ => Figure::missing(
                                    "logd",
                                    "replica lag",
                                    "the logs database did not answer",
                                ),
                            },
                        );
                    }
                }
            }
        }
    }
}

fn fetch_failure(body: Option<&str>) -> String {
    match body {
        None => "not fetched".into(),
        Some(b) => format!(
            "fetch failed: {}",
            b.lines().last().unwrap_or("no output").trim()
        ),
    }
}
