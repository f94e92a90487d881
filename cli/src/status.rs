//! `sagectl status`: what one round trip per host tells. A constant shell script reads its
//! questions on stdin (files to checksum, units, local metrics to fetch, PostgreSQL's figures)
//! and prints tab-separated lines that a pure parser turns into a [`Probe`]; the report types
//! ([`Report`], [`HostStatus`]) and their text. Gathering is `pipeline::status`.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

/// The status script. It only reads. Every fetch has its stdin closed (the loop reads ours).
pub const SCRIPT: &str = r#"
cd /
tab=$(printf '\t')
out=$(mktemp -d) || exit 1
trap 'rm -rf "$out"' EXIT
files=
units=
pg=
n=0
# Every question runs in the background into a file of its own: the answer takes as long as
# the slowest question, not the sum.
fetched() { printf '%s\n' "$3" | sed "s/^/m$tab$1$tab/"; printf 'mend\t%s\t%s\n' "$1" "$2"; }
while IFS="$tab" read -r kind a b c d e; do
  n=$((n + 1))
  case "$kind" in
    F) files="$files$a
" ;;
    U) units="$units $a" ;;
    T) { r=$(timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2" && printf "GET %s HTTP/1.0\r\n\r\n" "$3" >&3 && cat <&3' sh "$b" "$c" "$d" 2>&1 </dev/null); fetched "$a" "$?" "$r"; } > "$out/$n" & ;;
    C) { r=$(curl -sS --fail --max-time 3 --resolve "$c" --cacert "$d" --cert "$e" "$b" 2>&1 </dev/null); fetched "$a" "$?" "$r"; } > "$out/$n" & ;;
    Q) pg=$a ;;
  esac
done
if [ -n "$units" ]; then
  systemctl is-active -- $units 2>/dev/null | {
    for u in $units; do read -r s; printf 'unit\t%s\t%s\n' "$u" "${s:-unknown}"; done; } > "$out/units" &
fi
if [ -n "$files" ]; then
  printf '%s' "$files" | tr '\n' '\0' | xargs -0 -r -n 8 -P 4 sha256sum -- 2>/dev/null | sed "s/^/sum$tab/" > "$out/sums" &
fi
if [ -n "$pg" ]; then
  # Named, so that these connections are not counted.
  export PGAPPNAME=sagectl-status
  q() { db=$1; shift; runuser -u postgres -- psql -XAtq -F "$tab" -d "$db" "$@" </dev/null 2>/dev/null || printf 'pgerr\t%s\n' "$db"; }
  q postgres -c "select 'pgconn', coalesce(datname, '-'), count(*) from pg_stat_activity where backend_type = 'client backend' and application_name <> 'sagectl-status' group by 2" \
    -c "select 'pgsize', datname, pg_database_size(datname) from pg_database where not datistemplate" > "$out/pg1" &
  case "$pg" in *workers*)
    q sagews -c "select 'pgworker', host, sessions, load, extract(epoch from now() - last_seen)::int8, seen_by from workers" > "$out/pg2" & ;;
  esac
  case "$pg" in *replication*)
    q sagews_logs -c "select 'pglogs', coalesce(max(seq), 0) from records" -c "select 'pgrepl', peer, last_seq from replication" > "$out/pg3" & ;;
  esac
fi
wait
cat "$out"/* 2>/dev/null
exit 0
"#;

/// A local HTTP(S) fetch made on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fetch {
    /// Plain HTTP/1.0 on bash's /dev/tcp (workers have no curl; starting python3 costs more
    /// than the rest of the round trip).
    Tcp {
        name: String,
        addr: String,
        port: u16,
        path: String,
    },
    /// By curl with a client certificate, the name resolved to `resolve` (`name:port:addr`).
    Curl {
        name: String,
        url: String,
        resolve: String,
        cacert: String,
        cert: String,
    },
}

/// What to ask one host.
#[derive(Clone, Debug, Default)]
pub struct Query {
    pub files: BTreeSet<String>,
    pub units: Vec<String>,
    pub fetches: Vec<Fetch>,
    /// PostgreSQL's connections and sizes, when set.
    pub postgres: Option<PgQuery>,
}

/// What to ask PostgreSQL besides connections and sizes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PgQuery {
    /// The workers as the backends recorded them (the backend's database).
    pub workers: bool,
    /// logd's replication (the logs database).
    pub replication: bool,
}

impl Query {
    /// The script's stdin: one tab-separated question a line (paths never hold a tab or
    /// newline: rendering refuses control characters).
    pub fn stdin(&self) -> String {
        let mut s = String::new();
        for f in &self.files {
            s.push_str(&format!("F\t{f}\n"));
        }
        for u in &self.units {
            s.push_str(&format!("U\t{u}\n"));
        }
        for f in &self.fetches {
            match f {
                Fetch::Tcp {
                    name,
                    addr,
                    port,
                    path,
                } => s.push_str(&format!("T\t{name}\t{addr}\t{port}\t{path}\n")),
                Fetch::Curl {
                    name,
                    url,
                    resolve,
                    cacert,
                    cert,
                } => s.push_str(&format!("C\t{name}\t{url}\t{resolve}\t{cacert}\t{cert}\n")),
            }
        }
        if let Some(q) = self.postgres {
            s.push_str(&format!(
                "Q\tsizes{}{}\n",
                if q.workers { ",workers" } else { "" },
                if q.replication { ",replication" } else { "" }
            ));
        }
        s
    }
}

/// A worker as the backends last recorded it (the `workers` table).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WorkerSeen {
    pub sessions: i64,
    pub load: f64,
    pub seconds_ago: i64,
    pub seen_by: String,
}

/// PostgreSQL's figures, from the database host.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pg {
    pub connections: BTreeMap<String, u64>,
    pub sizes: BTreeMap<String, u64>,
    pub workers: BTreeMap<String, WorkerSeen>,
    /// The newest record's seq in the logs database.
    pub logs_top: Option<i64>,
    /// Last seq each replica peer (`address:port`) acknowledged.
    pub replicated: BTreeMap<String, i64>,
    pub errors: Vec<String>,
}

/// What one host answered.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Probe {
    /// sha256 of each managed path that exists.
    pub sums: BTreeMap<String, String>,
    pub units: BTreeMap<String, String>,
    /// Each fetch: succeeded, and its output.
    pub fetched: BTreeMap<String, (bool, String)>,
    pub pg: Option<Pg>,
}

/// sha256sum escapes a name holding a backslash or newline with a leading `\`.
fn unescape(p: &str) -> String {
    p.replace("\\n", "\n").replace("\\\\", "\\")
}

/// Parses the script's output.
pub fn parse(out: &str) -> Probe {
    let mut p = Probe::default();
    let mut bodies: BTreeMap<String, String> = BTreeMap::new();
    for line in out.lines() {
        let mut f = line.splitn(6, '\t');
        let kind = f.next().unwrap_or("");
        let a = f.next().unwrap_or("");
        let rest: Vec<&str> = f.collect();
        let b = rest.first().copied().unwrap_or("");
        let n = |s: &str| s.trim().parse::<i64>().ok();
        match kind {
            "sum" => {
                let (escaped, a) = match a.strip_prefix('\\') {
                    Some(a) => (true, a),
                    None => (false, a),
                };
                if let Some((hash, path)) = a.split_once("  ") {
                    let path = if escaped { unescape(path) } else { path.into() };
                    p.sums.insert(path, hash.to_string());
                }
            }
            "unit" => {
                p.units.insert(a.to_string(), b.to_string());
            }
            "m" => {
                let body = bodies.entry(a.to_string()).or_default();
                body.push_str(b);
                body.push('\n');
            }
            "mend" => {
                let mut body = bodies.remove(a).unwrap_or_default();
                // An answer over /dev/tcp comes with its head.
                if body.starts_with("HTTP/") {
                    body = body.replace('\r', "");
                    body = match body.split_once("\n\n") {
                        Some((_, b)) => b.to_string(),
                        None => String::new(),
                    };
                }
                p.fetched.insert(a.to_string(), (b.trim() == "0", body));
            }
            k if k.starts_with("pg") => {
                let pg = p.pg.get_or_insert_with(Pg::default);
                match k {
                    "pgconn" => {
                        if let Some(c) = n(b) {
                            pg.connections.insert(a.to_string(), c as u64);
                        }
                    }
                    "pgsize" => {
                        if let Some(s) = n(b) {
                            pg.sizes.insert(a.to_string(), s as u64);
                        }
                    }
                    "pgworker" if rest.len() >= 4 => {
                        pg.workers.insert(
                            a.to_string(),
                            WorkerSeen {
                                sessions: n(rest[0]).unwrap_or(0),
                                load: rest[1].trim().parse().unwrap_or(0.0),
                                seconds_ago: n(rest[2]).unwrap_or(0),
                                seen_by: rest[3].to_string(),
                            },
                        );
                    }
                    "pglogs" => pg.logs_top = n(a),
                    "pgrepl" => {
                        if let Some(s) = n(b) {
                            pg.replicated.insert(a.to_string(), s);
                        }
                    }
                    "pgerr" => pg.errors.push(a.to_string()),
                    _ => {}
                }
            }
            _ => {}
        }
    }
    p
}

/// One figure of a host: a value, or why there is none.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Figure {
    /// What it is about: worker, backend, postgres, logd.
    pub group: &'static str,
    pub name: String,
    pub value: Option<serde_json::Value>,
    /// `bytes` or `s` (for the text), or nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<&'static str>,
    /// Why there is no value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
}

impl Figure {
    pub fn new(
        group: &'static str,
        name: impl Into<String>,
        v: impl Into<serde_json::Value>,
    ) -> Self {
        Figure {
            group,
            name: name.into(),
            value: Some(v.into()),
            unit: None,
            unavailable: None,
        }
    }

    pub fn missing(group: &'static str, name: impl Into<String>, why: impl Into<String>) -> Self {
        Figure {
            group,
            name: name.into(),
            value: None,
            unit: None,
            unavailable: Some(why.into()),
        }
    }

    pub fn unit(mut self, unit: &'static str) -> Self {
        self.unit = Some(unit);
        self
    }

    fn text(&self) -> String {
        match (&self.value, self.unit) {
            (Some(v), Some("bytes")) => {
                let b = v.as_f64().unwrap_or(0.0);
                format!("{} {:.1} MB", self.name, b / 1e6)
            }
            (Some(v), Some(u)) => format!("{} {v}{u}", self.name),
            (Some(serde_json::Value::String(s)), None) => format!("{} {s}", self.name),
            (Some(v), None) => format!("{} {v}", self.name),
            (None, _) => format!(
                "{} n/a ({})",
                self.name,
                self.unavailable.as_deref().unwrap_or("unknown")
            ),
        }
    }
}

/// A managed file whose content on the host is not what would be rendered now.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Drift {
    pub path: String,
    /// `changed` or `missing`.
    pub what: &'static str,
}

/// The deployed sage-agent against the one this sagectl would upload (sha256, 12 digits).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AgentBuild {
    pub deployed: Option<String>,
    pub this_sagectl: String,
    pub same: bool,
}

/// One host's status.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HostStatus {
    pub host: String,
    pub address: String,
    pub roles: Vec<String>,
    /// Whether it answered over SSH; `None` when it was not tried (its files did not render).
    pub reachable: Option<bool>,
    /// Why it could not be asked (unreachable, refused key, rendering failed).
    pub error: Option<String>,
    /// unit → `systemctl is-active` (active, inactive, failed, activating, ...).
    pub services: BTreeMap<String, String>,
    /// Managed files checked (the sage-agent binary included).
    pub files_checked: usize,
    pub drift: Vec<Drift>,
    pub agent: Option<AgentBuild>,
    pub figures: Vec<Figure>,
    pub seconds: f64,
}

impl HostStatus {
    /// What is wrong with this host, each named.
    pub fn problems(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(e) = &self.error {
            let what = if self.reachable == Some(false) {
                "unreachable"
            } else {
                "error"
            };
            v.push(format!(
                "{}: {what}: {}",
                self.host,
                e.lines().next().unwrap_or("")
            ));
        }
        for (u, s) in &self.services {
            if s != "active" {
                v.push(format!("{}: {u} is {s}", self.host));
            }
        }
        for d in &self.drift {
            v.push(format!(
                "{}: {} {} (differs from what would be rendered now)",
                self.host, d.path, d.what
            ));
        }
        if let Some(a) = &self.agent {
            if !a.same {
                v.push(format!(
                    "{}: sage-agent {} is not this sagectl's {}",
                    self.host,
                    a.deployed.as_deref().unwrap_or("missing"),
                    a.this_sagectl
                ));
            }
        }
        v
    }
}

/// The last `sagectl up` recorded in logd.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LastUp {
    pub when: Option<String>,
    pub user: Option<String>,
    pub message: Option<String>,
    /// host → things changed (hosts with changes only).
    pub changed: BTreeMap<String, u64>,
    pub failed: Vec<String>,
    /// Why there is no record.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
}

impl LastUp {
    /// From an audit record as logd's query API gives it.
    pub fn from_record(r: &serde_json::Value) -> LastUp {
        let f = &r["fields"];
        LastUp {
            when: r["ts_ms"].as_i64().map(crate::logquery::format_ms),
            user: f["user"].as_str().map(str::to_string),
            message: r["message"].as_str().map(str::to_string),
            changed: f["changed"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .filter_map(|(h, n)| {
                            let n = n.as_u64().or_else(|| n.as_str()?.parse().ok())?;
                            Some((h.clone(), n))
                        })
                        .filter(|(_, n)| *n > 0)
                        .collect()
                })
                .unwrap_or_default(),
            failed: f["failed"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|h| h.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
            unavailable: None,
        }
    }
}

/// The whole deployment.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub inventory: String,
    /// true when nothing is down, unreachable or drifted.
    pub ok: bool,
    pub seconds: f64,
    pub hosts: Vec<HostStatus>,
    pub last_up: LastUp,
    pub problems: Vec<String>,
}

impl Report {
    pub fn new(inventory: String, hosts: Vec<HostStatus>, last_up: LastUp, seconds: f64) -> Report {
        let problems: Vec<String> = hosts.iter().flat_map(HostStatus::problems).collect();
        Report {
            inventory,
            ok: problems.is_empty(),
            seconds,
            hosts,
            last_up,
            problems,
        }
    }

    /// The report as text: a block per host, the last `up`, then the problems and a summary.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let width = self.hosts.iter().map(|h| h.host.len()).max().unwrap_or(0);
        for h in &self.hosts {
            let state = if h.error.is_none() {
                format!("reachable ({:.2} s)", h.seconds)
            } else if h.reachable != Some(false) {
                "ERROR".to_string()
            } else {
                "UNREACHABLE".to_string()
            };
            s.push_str(&format!(
                "{:<width$}  {:<15} {:<45} {state}\n",
                h.host,
                h.address,
                h.roles.join(",")
            ));
            if let Some(e) = &h.error {
                s.push_str(&format!(
                    "  {:<9} {}\n",
                    "error",
                    e.lines().next().unwrap_or("")
                ));
                continue;
            }
            let services: Vec<String> = h
                .services
                .iter()
                .map(|(u, st)| {
                    if st == "active" {
                        format!("{u} active")
                    } else {
                        format!("{u} {}", st.to_uppercase())
                    }
                })
                .collect();
            s.push_str(&format!("  {:<9} {}\n", "services", services.join(" · ")));
            let drift = if h.drift.is_empty() {
                format!("none ({} files checked)", h.files_checked)
            } else {
                h.drift
                    .iter()
                    .map(|d| format!("{} {}", d.path, d.what.to_uppercase()))
                    .collect::<Vec<_>>()
                    .join(" · ")
            };
            s.push_str(&format!("  {:<9} {drift}\n", "drift"));
            if let Some(a) = &h.agent {
                let d = a.deployed.as_deref().unwrap_or("missing");
                let t = if a.same {
                    format!("{d} (this sagectl's)")
                } else {
                    format!("{d} DIFFERS from this sagectl's {}", a.this_sagectl)
                };
                s.push_str(&format!("  {:<9} {t}\n", "agent"));
            }
            let mut groups: Vec<&str> = h.figures.iter().map(|f| f.group).collect();
            groups.dedup();
            for g in groups {
                let items: Vec<String> = h
                    .figures
                    .iter()
                    .filter(|f| f.group == g)
                    .map(Figure::text)
                    .collect();
                s.push_str(&format!("  {g:<9} {}\n", items.join(" · ")));
            }
        }
        let l = &self.last_up;
        match (&l.when, &l.unavailable) {
            (Some(when), _) => {
                let changed = if l.changed.is_empty() {
                    "nothing changed".to_string()
                } else {
                    let c: Vec<String> =
                        l.changed.iter().map(|(h, n)| format!("{h} {n}")).collect();
                    format!("changed: {}", c.join(", "))
                };
                s.push_str(&format!(
                    "last up   {when} by {}: {changed}{}\n",
                    l.user.as_deref().unwrap_or("?"),
                    if l.failed.is_empty() {
                        String::new()
                    } else {
                        format!("; failed: {}", l.failed.join(", "))
                    }
                ));
            }
            (None, why) => s.push_str(&format!(
                "last up   n/a ({})\n",
                why.as_deref().unwrap_or("no record in logd")
            )),
        }
        for p in &self.problems {
            s.push_str(&format!("PROBLEM   {p}\n"));
        }
        let reachable = self
            .hosts
            .iter()
            .filter(|h| h.reachable == Some(true))
            .count();
        s.push_str(&format!(
            "{}: {} hosts, {reachable} reachable, {} problem{}: {} ({:.2} s)\n",
            self.inventory,
            self.hosts.len(),
            self.problems.len(),
            if self.problems.len() == 1 { "" } else { "s" },
            if self.ok { "OK" } else { "NOT OK" },
            self.seconds
        ));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn questions_one_a_line() {
        let q = Query {
            files: ["/etc/a b".to_string()].into(),
            units: vec!["nginx".into()],
            fetches: vec![Fetch::Tcp {
                name: "worker".into(),
                addr: "127.0.0.1".into(),
                port: 7001,
                path: "/metrics".into(),
            }],
            postgres: Some(PgQuery {
                workers: true,
                replication: false,
            }),
        };
        assert_eq!(
            q.stdin(),
            "F\t/etc/a b\nU\tnginx\nT\tworker\t127.0.0.1\t7001\t/metrics\nQ\tsizes,workers\n"
        );
    }

    #[test]
    fn parses_what_the_script_prints() {
        let out = "unit\tnginx\tactive\nunit\tsage-worker\tinactive\n\
                   sum\tabc  /etc/a b\nsum\t\\def  /etc/x\\ny\n\
                   m\tworker\tHTTP/1.0 200 OK\r\nm\tworker\tContent-Length: 30\r\nm\tworker\t\r\n\
                   m\tworker\tsagews_worker_sessions_open 2\nmend\tworker\t0\n\
                   mend\tbackend:alpha\t7\n\
                   pgconn\tsagews\t3\npgsize\tsagews\t8000000\n\
                   pgworker\tbravo\t1\t0.25\t4\talpha\npglogs\t42\npgrepl\t10.0.0.3:7100\t40\n\
                   pgerr\tsagews_logs\n";
        let p = parse(out);
        assert_eq!(p.units["sage-worker"], "inactive");
        assert_eq!(p.sums["/etc/a b"], "abc");
        assert_eq!(p.sums["/etc/x\ny"], "def");
        assert_eq!(
            p.fetched["worker"],
            (true, "sagews_worker_sessions_open 2\n".into())
        );
        assert_eq!(p.fetched["backend:alpha"], (false, String::new()));
        let pg = p.pg.unwrap();
        assert_eq!(pg.connections["sagews"], 3);
        assert_eq!(pg.sizes["sagews"], 8_000_000);
        assert_eq!(
            pg.workers["bravo"],
            WorkerSeen {
                sessions: 1,
                load: 0.25,
                seconds_ago: 4,
                seen_by: "alpha".into()
            }
        );
        assert_eq!(
            (pg.logs_top, pg.replicated["10.0.0.3:7100"]),
            (Some(42), 40)
        );
        assert_eq!(pg.errors, vec!["sagews_logs"]);
    }

    #[test]
    fn the_last_up_from_its_audit_record() {
        let r = serde_json::json!({
            "seq": 7, "ts_ms": 1_795_800_000_123_i64, "host": "sagectl", "source": "10.0.0.1",
            "level": "warn", "target": "sagectl::up",
            "message": "ann ran sagectl up on t: 3 changes on 2 hosts, 1 failed",
            "fields": {"user": "ann", "inventory": "/i.yaml", "changed": {"a": 3, "b": 0}, "failed": ["b"]}
        });
        let l = LastUp::from_record(&r);
        assert_eq!(l.when.as_deref(), Some("2026-11-27T17:20:00.123Z"));
        assert_eq!(l.user.as_deref(), Some("ann"));
        assert_eq!(l.changed, [("a".to_string(), 3)].into());
        assert_eq!(l.failed, vec!["b"]);
    }

    #[test]
    fn problems_are_named_and_decide_the_exit() {
        let mut down = HostStatus {
            host: "bravo".into(),
            reachable: Some(true),
            ..Default::default()
        };
        down.services
            .insert("sage-worker".into(), "inactive".into());
        let drifted = HostStatus {
            host: "alpha".into(),
            reachable: Some(true),
            drift: vec![Drift {
                path: "/etc/haproxy/haproxy.cfg".into(),
                what: "changed",
            }],
            ..Default::default()
        };
        let gone = HostStatus {
            host: "charlie".into(),
            reachable: Some(false),
            error: Some("cannot connect to 10.0.0.3:22: no answer within 2s".into()),
            ..Default::default()
        };
        let r = Report::new(
            "t".into(),
            vec![drifted, down, gone],
            LastUp::default(),
            0.1,
        );
        assert!(!r.ok);
        assert_eq!(
            r.problems,
            vec![
                "alpha: /etc/haproxy/haproxy.cfg changed (differs from what would be rendered now)",
                "bravo: sage-worker is inactive",
                "charlie: unreachable: cannot connect to 10.0.0.3:22: no answer within 2s",
            ]
        );
        let t = r.text();
        assert!(t.contains("charlie") && t.contains("UNREACHABLE"), "{t}");
        assert!(
            t.ends_with("t: 3 hosts, 2 reachable, 3 problems: NOT OK (0.10 s)\n"),
            "{t}"
        );
        let ok = Report::new("t".into(), vec![], LastUp::default(), 0.1);
        assert!(ok.ok && ok.problems.is_empty());
    }
}
