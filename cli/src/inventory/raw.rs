//! Stage one: the inventory's YAML files (the main file and its `include:`s) decoded into typed
//! values with positions. Refuses unknown keys and values of the wrong type; applies defaults of
//! the agent sections. Names and cross-host rules are stage two's (validate.rs).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::files::{MAX_INVENTORY_FILE, read_text};
use crate::diag::{Diagnostics, Pos, display_path};
use crate::inventory::{
    Accounts, AlertAction, AlertRule, BackendSettings, Engine, Limits, WorkerSettings,
};
use crate::yaml::{self, Decoder, Fields, Node, index, join};

/// A value with where it was written.
#[derive(Clone, Debug)]
pub struct Sp<T> {
    pub v: T,
    pub pos: Pos,
}

/// Variables as written: name, and the value's node (checked against its role's constraint in
/// stage two, with positions down to a list's items).
pub type Vars = Vec<(Sp<String>, Node)>;

#[derive(Debug, Default)]
pub struct RawSsh {
    pub user: Option<Sp<String>>,
    pub port: Option<Sp<i64>>,
    pub identity_file: Option<Sp<String>>,
}

#[derive(Debug)]
pub struct RawHost {
    pub name: Sp<String>,
    /// The file declaring it (relative paths in it start from that file's directory).
    pub file: PathBuf,
    pub address: Option<Sp<String>>,
    pub roles: Vec<Sp<String>>,
    pub vars: Vars,
    pub ssh: RawSsh,
}

#[derive(Debug)]
pub struct RawLogd {
    pub port: u16,
    pub http_port: u16,
    pub allow: Vec<Sp<String>>,
    pub retention_days: u32,
    pub alerts: Vec<Sp<AlertRule>>,
    pub replica: Option<Sp<String>>,
}

#[derive(Debug, Default)]
pub struct RawDatabase {
    pub standby: Option<Sp<String>>,
    /// `backups:` was given (its position, for messages).
    pub backups: Option<Sp<RawBackups>>,
}

#[derive(Debug)]
pub struct RawBackups {
    pub schedule: Sp<String>,
    pub keep: u32,
    pub dir: Sp<String>,
}

#[derive(Debug)]
pub struct RawLab {
    pub subnet: Sp<String>,
    pub suite: Sp<String>,
}

#[derive(Debug)]
pub struct RawInventory {
    pub file: PathBuf,
    /// The top of the main file, for problems of the whole inventory.
    pub top: Pos,
    pub name: Option<Sp<String>>,
    pub ssh: RawSsh,
    pub public_name: Option<Sp<String>>,
    pub certificate: Option<Sp<String>>,
    pub key: Option<Sp<String>>,
    pub vars: Vars,
    pub groups: Vec<(Sp<String>, Vec<Sp<String>>)>,
    pub hosts: Vec<RawHost>,
    pub worker: WorkerSettings,
    pub backend: BackendSettings,
    pub logd: RawLogd,
    pub database: RawDatabase,
    pub lab: Option<RawLab>,
    pub include_dirs: Vec<PathBuf>,
    /// Paths stage one reported (see `Decoder::reported`), so stage two does not report their
    /// consequences ("the host has no address" after a misspelt `adress:`).
    pub reported: BTreeSet<String>,
}

const TOP_KEYS: &[&str] = &[
    "name", "ssh", "tls", "vars", "groups", "hosts", "worker", "backend", "logd", "database",
    "include", "lab",
];
const INCLUDED_KEYS: &[&str] = &["hosts", "groups"];

/// Reads `path` and everything it includes. Problems of structure are returned with whatever
/// could be read, so stage two can report its own problems in the same run; only a main file
/// that cannot be read or parsed at all gives no inventory.
pub fn read(path: &Path) -> Result<(RawInventory, Diagnostics), Diagnostics> {
    let root = load_file(path, None)?;
    let mut d = Decoder::default();
    let top = root.pos.clone();
    let fields = d.fields(&root, "", TOP_KEYS);
    let Some(f) = fields else {
        let mut diags = d.diags;
        if let Some(last) = diags.0.last_mut() {
            last.hint = Some("an inventory is a mapping with `name:` and `hosts:` at least".into());
        }
        return Err(diags);
    };
    let mut inv = RawInventory {
        file: path.to_path_buf(),
        top,
        name: opt_string(&mut d, &f, "name"),
        ssh: f
            .get("ssh")
            .map(|n| ssh(&mut d, n, "ssh"))
            .unwrap_or_default(),
        public_name: None,
        certificate: None,
        key: None,
        vars: f
            .get("vars")
            .map(|n| vars(&mut d, n, "vars"))
            .unwrap_or_default(),
        groups: Vec::new(),
        hosts: Vec::new(),
        worker: worker(&mut d, f.get("worker")),
        backend: backend(&mut d, f.get("backend")),
        logd: logd(&mut d, f.get("logd")),
        database: database(&mut d, f.get("database")),
        lab: f.get("lab").and_then(|n| lab(&mut d, n)),
        include_dirs: Vec::new(),
        reported: BTreeSet::new(),
    };
    if let Some(t) = f.get("tls") {
        if let Some(tf) = d.fields(t, "tls", &["public_name", "certificate", "key"]) {
            inv.public_name = opt_string(&mut d, &tf, "public_name");
            inv.certificate = opt_string(&mut d, &tf, "certificate");
            inv.key = opt_string(&mut d, &tf, "key");
        }
    }
    hosts_and_groups(&mut d, &f, path, &mut inv);
    if let Some(inc) = f.get("include") {
        includes(&mut d, inc, path, &mut inv);
    }
    inv.reported = std::mem::take(&mut d.reported);
    Ok((inv, d.diags))
}

/// Reads and parses one file: a regular file of at most `MAX_INVENTORY_FILE` bytes.
fn load_file(path: &Path, from: Option<(&Pos, &str)>) -> Result<Node, Diagnostics> {
    let text = read_text(path, MAX_INVENTORY_FILE).map_err(|e| {
        let mut d = Diagnostics::default();
        let hint = match e.kind() {
            std::io::ErrorKind::NotFound if from.is_some() => {
                "include paths are relative to the file that includes them"
            }
            std::io::ErrorKind::InvalidInput => {
                "an inventory is made of YAML files (include a file, or a directory of them)"
            }
            std::io::ErrorKind::InvalidData => "an inventory file is UTF-8 text of at most 1 MiB",
            _ => "check the path and its permissions",
        };
        match from {
            Some((pos, p)) => d.push(
                pos,
                p,
                format!("cannot read included file {}: {e}", display_path(path)),
                Some(hint.into()),
            ),
            None => d.push(
                &Pos::file_start(path),
                "",
                format!("cannot read inventory: {e}"),
                Some(hint.into()),
            ),
        }
        d
    })?;
    yaml::parse(path, &text)
}

fn hosts_and_groups(d: &mut Decoder, f: &Fields<'_>, file: &Path, inv: &mut RawInventory) {
    if let Some(hosts) = f.get("hosts") {
        for (name, key, node) in d.mapping(hosts, "hosts").unwrap_or_default() {
            let h = host(d, name, key, node, file);
            inv.hosts.push(h);
        }
    }
    if let Some(groups) = f.get("groups") {
        for (name, key, node) in d.mapping(groups, "groups").unwrap_or_default() {
            let path = join("groups", name);
            let members = d.strings(node, &path).unwrap_or_default();
            let members = members
                .into_iter()
                .map(|(v, n)| Sp { v, pos: n.pos })
                .collect();
            inv.groups.push((
                Sp {
                    v: name.to_string(),
                    pos: key.pos.clone(),
                },
                members,
            ));
        }
    }
}

fn includes(d: &mut Decoder, node: &Node, main: &Path, inv: &mut RawInventory) {
    let base = main.parent().unwrap_or(Path::new("."));
    let entries = match &node.kind {
        yaml::Kind::Str(_) => vec![(d.string(node, "include").unwrap_or_default(), node.clone())],
        _ => d.strings(node, "include").unwrap_or_default(),
    };
    for (i, (rel, n)) in entries.into_iter().enumerate() {
        let path = index("include", i);
        let target = base.join(&rel);
        let files = if target.is_dir() {
            inv.include_dirs.push(target.clone());
            match yaml_files_in(&target) {
                Ok(files) => files,
                Err(e) => {
                    d.error(
                        &n,
                        &path,
                        format!("cannot list directory {}: {e}", display_path(&target)),
                        None,
                    );
                    continue;
                }
            }
        } else {
            vec![target]
        };
        for file in files {
            match load_file(&file, Some((&n.pos, &path))) {
                Ok(root) => {
                    if let Some(f) = d.fields(&root, "", INCLUDED_KEYS) {
                        hosts_and_groups(d, &f, &file, inv);
                    }
                }
                Err(e) => d.diags.0.extend(e.0),
            }
        }
    }
}

/// The `.yaml` and `.yml` entries of a directory, sorted by name. Those that are not regular
/// files (a FIFO, a device) are kept, so reading them reports what they are.
fn yaml_files_in(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let p = entry?.path();
        let ext = p.extension().and_then(|e| e.to_str());
        if matches!(ext, Some("yaml" | "yml")) {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

fn host(d: &mut Decoder, name: &str, key: &Node, node: &Node, file: &Path) -> RawHost {
    let path = join("hosts", name);
    let mut h = RawHost {
        name: Sp {
            v: name.to_string(),
            pos: key.pos.clone(),
        },
        file: file.to_path_buf(),
        address: None,
        roles: Vec::new(),
        vars: Vec::new(),
        ssh: RawSsh::default(),
    };
    if let Some(f) = d.fields(node, &path, &["address", "roles", "vars", "ssh"]) {
        h.address = opt_string(d, &f, "address");
        if let Some(r) = f.get("roles") {
            let roles = d.strings(r, &f.path_of("roles")).unwrap_or_default();
            h.roles = roles
                .into_iter()
                .map(|(v, n)| Sp { v, pos: n.pos })
                .collect();
        }
        if let Some(v) = f.get("vars") {
            h.vars = vars(d, v, &f.path_of("vars"));
        }
        if let Some(s) = f.get("ssh") {
            h.ssh = ssh(d, s, &f.path_of("ssh"));
        }
    }
    h
}

fn ssh(d: &mut Decoder, node: &Node, path: &str) -> RawSsh {
    let mut s = RawSsh::default();
    if let Some(f) = d.fields(node, path, &["user", "port", "identity_file"]) {
        s.user = opt_string(d, &f, "user");
        s.identity_file = opt_string(d, &f, "identity_file");
        if let Some(n) = f.get("port") {
            s.port = d.int(n, &f.path_of("port"), 1, 65535).map(|v| Sp {
                v,
                pos: n.pos.clone(),
            });
        }
    }
    s
}

fn vars(d: &mut Decoder, node: &Node, path: &str) -> Vars {
    d.mapping(node, path)
        .unwrap_or_default()
        .into_iter()
        .map(|(k, kn, v)| {
            (
                Sp {
                    v: k.to_string(),
                    pos: kn.pos.clone(),
                },
                v.clone(),
            )
        })
        .collect()
}

fn opt_string(d: &mut Decoder, f: &Fields<'_>, key: &str) -> Option<Sp<String>> {
    let n = f.get(key)?;
    d.string(n, &f.path_of(key)).map(|v| Sp {
        v,
        pos: n.pos.clone(),
    })
}

/// Reads an optional integer field into `slot` (which holds the default).
fn num<T: TryFrom<i64>>(
    d: &mut Decoder,
    f: &Fields<'_>,
    key: &str,
    min: i64,
    max: i64,
    slot: &mut T,
) {
    if let Some(n) = f.get(key) {
        if let Some(v) = d
            .int(n, &f.path_of(key), min, max)
            .and_then(|v| T::try_from(v).ok())
        {
            *slot = v;
        }
    }
}

fn flag(d: &mut Decoder, f: &Fields<'_>, key: &str, slot: &mut bool) {
    if let Some(v) = f.get(key).and_then(|n| d.bool(n, &f.path_of(key))) {
        *slot = v;
    }
}

const PORT: (i64, i64) = (1, 65535);
const BIG: i64 = 1 << 40;

fn worker(d: &mut Decoder, node: Option<&Node>) -> WorkerSettings {
    let mut w = WorkerSettings {
        engine: Engine::Python3,
        port: 7000,
        max_sessions: 32,
        uid_min: 20000,
        uid_max: 29999,
        backend_timeout_seconds: 120,
        limits: Limits {
            cpu_seconds: 600,
            memory_mb: 2048,
            processes: 128,
            open_files: 1024,
            file_size_mb: 256,
            wall_clock_seconds: 86400,
            idle_timeout_seconds: 1800,
            cpu_percent: 100,
        },
        require_cgroups: true,
        engine_server: "zygote".into(),
        preload: ["numpy", "matplotlib", "matplotlib.pyplot"]
            .map(String::from)
            .to_vec(),
    };
    let keys = [
        "engine",
        "port",
        "max_sessions",
        "uid_min",
        "uid_max",
        "backend_timeout_seconds",
        "limits",
        "require_cgroups",
        "engine_server",
        "preload",
    ];
    let Some(f) = node.and_then(|n| d.fields(n, "worker", &keys)) else {
        return w;
    };
    if let Some(n) = f.get("engine") {
        match d.string(n, "worker.engine").as_deref() {
            Some("python3") => w.engine = Engine::Python3,
            Some("sage") => w.engine = Engine::Sage,
            Some(other) => d.error(
                n,
                "worker.engine",
                format!("unknown engine `{other}`"),
                Some("use python3 or sage".into()),
            ),
            None => {}
        }
    }
    num(d, &f, "port", PORT.0, PORT.1, &mut w.port);
    num(d, &f, "max_sessions", 1, 100_000, &mut w.max_sessions);
    num(d, &f, "uid_min", 1000, 4_000_000_000, &mut w.uid_min);
    num(d, &f, "uid_max", 1000, 4_000_000_000, &mut w.uid_max);
    num(
        d,
        &f,
        "backend_timeout_seconds",
        5,
        86400,
        &mut w.backend_timeout_seconds,
    );
    if let Some(lf) = f.get("limits").and_then(|n| {
        let keys = [
            "cpu_seconds",
            "memory_mb",
            "processes",
            "open_files",
            "file_size_mb",
            "wall_clock_seconds",
            "idle_timeout_seconds",
            "cpu_percent",
        ];
        d.fields(n, "worker.limits", &keys)
    }) {
        let l = &mut w.limits;
        num(d, &lf, "cpu_seconds", 1, BIG, &mut l.cpu_seconds);
        num(d, &lf, "memory_mb", 16, BIG, &mut l.memory_mb);
        // Within the worker unit's own limits (LimitNOFILE=65536): a session cannot be given more
        // than the worker has (setrlimit would fail and no session could start).
        num(d, &lf, "processes", 1, 32_768, &mut l.processes);
        num(d, &lf, "open_files", 16, 65_536, &mut l.open_files);
        num(d, &lf, "file_size_mb", 1, BIG, &mut l.file_size_mb);
        num(
            d,
            &lf,
            "wall_clock_seconds",
            1,
            BIG,
            &mut l.wall_clock_seconds,
        );
        num(
            d,
            &lf,
            "idle_timeout_seconds",
            1,
            BIG,
            &mut l.idle_timeout_seconds,
        );
        // Percent of one core for the whole session (its cgroup's CPU quota).
        num(d, &lf, "cpu_percent", 1, 100_000, &mut l.cpu_percent);
    }
    flag(d, &f, "require_cgroups", &mut w.require_cgroups);
    if let Some(n) = f.get("engine_server") {
        match d.string(n, "worker.engine_server").as_deref() {
            Some(v @ ("zygote" | "fresh")) => w.engine_server = v.to_string(),
            Some(other) => d.error(
                n,
                "worker.engine_server",
                format!("unknown engine server `{other}`"),
                Some("use zygote (sessions forked from one process that imported the engine) or fresh (a new process per session)".into()),
            ),
            None => {}
        }
    }
    if let Some(n) = f.get("preload")
        && let Some(items) = d.strings(n, "worker.preload")
    {
        let module = |m: &str| {
            !m.is_empty()
                && m.split('.').all(|p| {
                    p.chars()
                        .next()
                        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                        && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                })
        };
        let mut ok = Vec::new();
        for (i, (m, node)) in items.into_iter().enumerate() {
            if module(&m) {
                ok.push(m);
            } else {
                d.error(
                    &node,
                    &format!("worker.preload[{i}]"),
                    format!("`{m}` is not a Python module name"),
                    Some("write dotted module names, such as numpy or matplotlib.pyplot".into()),
                );
            }
        }
        w.preload = ok;
    }
    // Checked whichever end was given: `uid_min: 35000` alone is above the default uid_max.
    // Not when one end was invalid: its default would stand in for what was meant.
    let bad = |d: &Decoder, k: &str| d.was_reported(&f.path_of(k));
    if w.uid_min >= w.uid_max && !bad(d, "uid_min") && !bad(d, "uid_max") {
        if let Some((n, key)) = f
            .get("uid_max")
            .map(|n| (n, "uid_max"))
            .or_else(|| f.get("uid_min").map(|n| (n, "uid_min")))
        {
            let (min, max) = (w.uid_min, w.uid_max);
            d.error(
                n,
                &f.path_of(key),
                format!("uid_min ({min}) must be below uid_max ({max})"),
                Some(format!(
                    "give a range of uids for workspace users, such as uid_min: {min} and uid_max: {}",
                    min.saturating_add(9999)
                )),
            );
        }
    }
    w
}

fn backend(d: &mut Decoder, node: Option<&Node>) -> BackendSettings {
    let mut b = BackendSettings {
        port: 8443,
        worker_port: 8444,
        max_sessions: 10000,
        max_bundle_mb: 64,
        accounts: Accounts {
            signup: true,
            max_workspaces: 50,
            max_open_workspaces: 3,
            session_days: 14,
            min_password_length: 10,
        },
        admins: Vec::new(),
    };
    let keys = [
        "port",
        "worker_port",
        "max_sessions",
        "max_bundle_mb",
        "accounts",
        "admins",
    ];
    let Some(f) = node.and_then(|n| d.fields(n, "backend", &keys)) else {
        return b;
    };
    num(d, &f, "port", PORT.0, PORT.1, &mut b.port);
    num(d, &f, "worker_port", PORT.0, PORT.1, &mut b.worker_port);
    num(d, &f, "max_sessions", 1, 10_000_000, &mut b.max_sessions);
    num(d, &f, "max_bundle_mb", 1, 65536, &mut b.max_bundle_mb);
    if let Some(n) = f.get("admins") {
        for (name, at) in d.strings(n, &f.path_of("admins")).unwrap_or_default() {
            // The backend's rule for account names (agent/src/backend/accounts.rs).
            let ok = (3..=32).contains(&name.len())
                && name.bytes().all(|b| {
                    b.is_ascii_lowercase()
                        || b.is_ascii_digit()
                        || b == b'_'
                        || b == b'-'
                        || b == b'.'
                });
            if ok {
                b.admins.push(name);
            } else {
                d.error(
                    &at,
                    &f.path_of("admins"),
                    format!("`{name}` is not an account name"),
                    Some(
                        "an account name is 3 to 32 characters: lowercase letters, digits, '_', '-' or '.'"
                            .into(),
                    ),
                );
            }
        }
    }
    let keys = [
        "signup",
        "max_workspaces",
        "max_open_workspaces",
        "session_days",
        "min_password_length",
    ];
    if let Some(af) = f
        .get("accounts")
        .and_then(|n| d.fields(n, "backend.accounts", &keys))
    {
        let a = &mut b.accounts;
        flag(d, &af, "signup", &mut a.signup);
        num(
            d,
            &af,
            "max_workspaces",
            1,
            1_000_000,
            &mut a.max_workspaces,
        );
        num(
            d,
            &af,
            "max_open_workspaces",
            1,
            10_000,
            &mut a.max_open_workspaces,
        );
        num(d, &af, "session_days", 1, 3650, &mut a.session_days);
        num(
            d,
            &af,
            "min_password_length",
            8,
            1024,
            &mut a.min_password_length,
        );
    }
    b
}

fn logd(d: &mut Decoder, node: Option<&Node>) -> RawLogd {
    let mut l = RawLogd {
        port: 7200,
        http_port: 7201,
        allow: Vec::new(),
        retention_days: 30,
        alerts: Vec::new(),
        replica: None,
    };
    let keys = [
        "port",
        "http_port",
        "allow",
        "retention_days",
        "alerts",
        "replica",
    ];
    let Some(f) = node.and_then(|n| d.fields(n, "logd", &keys)) else {
        return l;
    };
    num(d, &f, "port", PORT.0, PORT.1, &mut l.port);
    num(d, &f, "http_port", PORT.0, PORT.1, &mut l.http_port);
    num(d, &f, "retention_days", 1, 36500, &mut l.retention_days);
    if let Some(n) = f.get("allow") {
        let items = d.strings(n, "logd.allow").unwrap_or_default();
        l.allow = items
            .into_iter()
            .map(|(v, n)| Sp { v, pos: n.pos })
            .collect();
    }
    l.replica = opt_string(d, &f, "replica");
    if let Some(n) = f.get("alerts") {
        for (i, a) in d
            .seq(n, "logd.alerts")
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            if let Some(rule) = alert(d, a, &index("logd.alerts", i)) {
                l.alerts.push(Sp {
                    v: rule,
                    pos: a.pos.clone(),
                });
            }
        }
    }
    l
}

fn database(d: &mut Decoder, node: Option<&Node>) -> RawDatabase {
    let mut db = RawDatabase::default();
    let Some(f) = node.and_then(|n| d.fields(n, "database", &["standby", "backups"])) else {
        return db;
    };
    db.standby = opt_string(d, &f, "standby");
    if let Some(n) = f.get("backups") {
        let path = f.path_of("backups");
        if let Some(bf) = d.fields(n, &path, &["schedule", "keep", "dir"]) {
            let schedule = opt_string(d, &bf, "schedule").unwrap_or(Sp {
                v: "daily".into(),
                pos: n.pos.clone(),
            });
            let dir = opt_string(d, &bf, "dir").unwrap_or(Sp {
                v: "/var/backups/sagews".into(),
                pos: n.pos.clone(),
            });
            let mut keep = 7;
            num(d, &bf, "keep", 1, 1000, &mut keep);
            db.backups = Some(Sp {
                v: RawBackups {
                    schedule,
                    keep,
                    dir,
                },
                pos: n.pos.clone(),
            });
        }
    }
    db
}

const LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error"];

fn alert(d: &mut Decoder, node: &Node, path: &str) -> Option<AlertRule> {
    let keys = [
        "name",
        "level",
        "target",
        "message",
        "host",
        "count",
        "window_seconds",
        "command",
        "webhook",
    ];
    let f = d.fields(node, path, &keys)?;
    let before = d.diags.len();
    let name = match opt_string(d, &f, "name") {
        Some(n) => n.v,
        None => {
            if !d.was_reported(&f.path_of("name")) {
                d.error(
                    node,
                    path,
                    "an alert rule needs a `name`",
                    Some("add `name: backend-errors`: alerts say which rule fired".into()),
                );
            }
            String::new()
        }
    };
    let level = opt_string(d, &f, "level").map_or("error".to_string(), |l| l.v);
    if !LEVELS.contains(&level.as_str()) {
        let n = f.get("level").unwrap_or(node);
        d.error(
            n,
            &f.path_of("level"),
            format!("unknown level `{level}`"),
            Some(crate::diag::suggest(&level, LEVELS)),
        );
    }
    let mut rule = AlertRule {
        name,
        level,
        target: opt_string(d, &f, "target").map(|s| s.v),
        message: opt_string(d, &f, "message").map(|s| s.v),
        host: opt_string(d, &f, "host").map(|s| s.v),
        count: 1,
        window_seconds: 60,
        action: AlertAction::Command(Vec::new()),
    };
    if let (Some(re), Some(n)) = (&rule.message, f.get("message")) {
        check_regex(d, n, &f.path_of("message"), re);
    }
    num(d, &f, "count", 1, 1_000_000_000, &mut rule.count);
    num(
        d,
        &f,
        "window_seconds",
        1,
        86400 * 31,
        &mut rule.window_seconds,
    );
    match (f.get("command"), f.get("webhook")) {
        (Some(c), None) => {
            let before = d.diags.len();
            let argv: Vec<String> = d
                .strings(c, &f.path_of("command"))
                .unwrap_or_default()
                .into_iter()
                .map(|(s, _)| s)
                .collect();
            if argv.is_empty() && d.diags.len() == before {
                d.error(
                    c,
                    &f.path_of("command"),
                    "the command is empty",
                    Some("give the program and its arguments as a list".into()),
                );
            }
            rule.action = AlertAction::Command(argv);
        }
        (None, Some(w)) => {
            if let Some(url) = d.string(w, &f.path_of("webhook")) {
                if let Some(why) = url_problem(&url) {
                    d.error(
                        w,
                        &f.path_of("webhook"),
                        format!("`{url}` is not a usable http(s) URL: {why}"),
                        Some("write it as https://host[:port]/path, without spaces".into()),
                    );
                }
                rule.action = AlertAction::Webhook(url);
            }
        }
        _ => d.error(
            node,
            path,
            "an alert rule needs exactly one action",
            Some("give either `command: [program, args...]` or `webhook: https://...`".into()),
        ),
    }
    (d.diags.len() == before).then_some(rule)
}

/// Compiles an alert's message pattern as logd will (the agent's own code and regex crate),
/// so a rule that validates is one logd starts with.
fn check_regex(d: &mut Decoder, node: &Node, path: &str, re: &str) {
    use sagews_wire::alerts::{Alerts, Rule};
    let rule = serde_json::json!({
        "name": "check", "level": "error", "target": null, "message": re, "host": null,
        "count": 1, "window_seconds": 60, "action": {"command": ["true"]},
    });
    let rule: Rule = serde_json::from_value(rule).expect("a rule of the agent's shape");
    if let Err(e) = Alerts::new(vec![rule]) {
        // The regex crate's message spans lines (the pattern, a caret, then `error: why`).
        let why = e
            .lines()
            .find_map(|l| l.trim().strip_prefix("error: "))
            .unwrap_or_else(|| e.rsplit(": ").next().unwrap_or(&e))
            .to_string();
        d.error(
            node,
            path,
            format!("not a valid regular expression: {why}"),
            Some("logd matches it with Rust's regex syntax; put a backslash before ( ) [ ] { } . * + ? | ^ $ to match them literally".into()),
        );
    }
}

/// Why a webhook URL would not reach anything, if it would not: logd writes it into an HTTP
/// request, so it must be http(s), name a host, and hold no blank or control character.
fn url_problem(url: &str) -> Option<&'static str> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    let Some(rest) = rest else {
        return Some("it does not start with https:// or http://");
    };
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Some("it holds a blank or a control character");
    }
    let hostport = rest.split('/').next().unwrap_or("");
    let (host, port) = match hostport.strip_prefix('[') {
        // An IPv6 literal: `[fd00::1]` or `[fd00::1]:8080`.
        Some(v6) => match v6.split_once(']') {
            Some((h, "")) => (h, None),
            Some((h, p)) => (h, Some(p.strip_prefix(':').unwrap_or("x"))),
            None => ("", None),
        },
        None => match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        },
    };
    if host.is_empty()
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'))
    {
        return Some("it names no host");
    }
    if let Some(p) = port {
        if !p.parse::<u16>().is_ok_and(|p| p > 0) {
            return Some("its port is not a number from 1 to 65535");
        }
    }
    None
}

fn lab(d: &mut Decoder, node: &Node) -> Option<RawLab> {
    let f = d.fields(node, "lab", &["subnet", "suite"])?;
    let subnet = opt_string(d, &f, "subnet").unwrap_or(Sp {
        v: "10.77.0.0/24".into(),
        pos: node.pos.clone(),
    });
    let suite = opt_string(d, &f, "suite").unwrap_or(Sp {
        v: "bookworm".into(),
        pos: node.pos.clone(),
    });
    Some(RawLab { subnet, suite })
}
