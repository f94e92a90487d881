//! Inventories: the shipped ones validate; broken ones give every problem with file, line,
//! column, path and hint (snapshots), and the model resolves includes, overrides and groups.

use sagews_testkit::lab;

use std::net::IpAddr;

use lab::{fixtures, root, sagectl, text};
use sagectl::inventory::{Inventory, Role};

#[test]
fn shipped_inventories_validate() {
    for name in [
        "lab.yaml",
        "lab-sage.yaml",
        "lab-ha.yaml",
        "lab-chaos.yaml",
        "example.yaml",
    ] {
        let path = root().join("inventories").join(name);
        let o = sagectl().arg("validate").arg(&path).output().unwrap();
        let (out, err) = text(&o);
        assert!(o.status.success(), "{name}:\n{out}\n{err}");
        assert!(out.contains("is valid"), "{out}");
    }
}

#[test]
fn lab_inventory_is_the_five_host_demo() {
    let inv = Inventory::load(&root().join("inventories/lab.yaml")).unwrap();
    assert_eq!(inv.name, "lab");
    let roles: Vec<(&str, Vec<Role>)> = inv
        .hosts
        .iter()
        .map(|h| (h.name.as_str(), h.roles.clone()))
        .collect();
    assert_eq!(
        roles,
        vec![
            ("lb", vec![Role::Static, Role::Loadbalancer]),
            ("db", vec![Role::Database, Role::Cache]),
            ("logs", vec![Role::Logd]),
            ("backend1", vec![Role::Backend]),
            ("worker1", vec![Role::Worker]),
        ]
    );
    let lab = inv.lab.as_ref().expect("lab section");
    assert_eq!(lab.gateway().to_string(), "10.77.0.1");
    assert!(inv.hosts.iter().all(|h| lab.subnet.contains(h.address)));
}

#[test]
fn example_uses_every_section() {
    let inv = Inventory::load(&root().join("inventories/example.yaml")).unwrap();
    // Included file adds a host and extends a group.
    assert!(inv.host("worker3").is_some());
    assert_eq!(inv.groups["compute"], vec!["worker3", "worker1", "worker2"]);
    assert_eq!(inv.include_dirs.len(), 1);
    // Per-host SSH override merges with the defaults.
    let w1 = inv.host("worker1").unwrap();
    assert_eq!((w1.ssh.user.as_str(), w1.ssh.port), ("root", 2222));
    assert_eq!(inv.host("worker2").unwrap().ssh.port, 22);
    // Host vars are kept apart from global ones (merged at render time).
    assert_eq!(
        inv.host("db1").unwrap().vars["postgres_shared_buffers"],
        "2GB"
    );
    assert_eq!(inv.vars["postgres_shared_buffers"], "512MB");
    assert_eq!(inv.logd.replica.as_deref(), Some("logs2"));
    assert_eq!(inv.database.primary, "db1");
    assert_eq!(inv.database.standby.as_deref(), Some("db2"));
    let b = inv.database.backups.as_ref().unwrap();
    assert_eq!(
        (b.schedule.as_str(), b.keep, b.dir.as_str()),
        ("daily", 7, "/var/backups/sagews")
    );
    assert_eq!(inv.database.backup_host(), "db2");
    assert_eq!(inv.logd.alerts.len(), 2);
    assert_eq!(inv.logd.allow[1].to_string(), "198.51.100.64/26");
    assert_eq!(inv.worker.limits.cpu_seconds, 600);
    assert_eq!(
        inv.host("app1").unwrap().address,
        "192.0.2.20".parse::<IpAddr>().unwrap()
    );
}

/// Every broken inventory: exit code 2, each problem on a line `file:line:col: path: message`
/// with a hint, all of them in one run. The full report is a snapshot.
#[test]
fn broken_inventories_report_every_problem() {
    let dir = fixtures().join("broken");
    insta::glob!(&dir, "*.yaml", |path| {
        let name = path.file_name().unwrap().to_str().unwrap();
        let o = sagectl()
            .current_dir(&dir)
            .arg("validate")
            .arg(name)
            .output()
            .unwrap();
        let (out, err) = text(&o);
        assert_eq!(
            o.status.code(),
            Some(2),
            "{name}: expected exit 2\n{out}{err}"
        );
        assert!(
            out.is_empty(),
            "nothing on stdout for an invalid inventory: {out}"
        );
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
        assert!(!errors.is_empty(), "{err}");
        for e in &errors {
            let loc = e.trim_start_matches("error: ").split(": ").next().unwrap();
            let parts: Vec<&str> = loc.rsplitn(3, ':').collect();
            assert_eq!(parts.len(), 3, "no file:line:col in {e}");
            assert!(
                parts[0].parse::<usize>().is_ok() && parts[1].parse::<usize>().is_ok(),
                "{e}"
            );
            assert!(parts[2].ends_with(".yaml"), "{e}");
        }
        let n = errors.len();
        assert!(
            err.trim_end().ends_with(&format!(
                "{n} problem{} found",
                if n == 1 { "" } else { "s" }
            )),
            "{err}"
        );
        insta::assert_snapshot!(err);
    });
}

/// A FIFO, a device or an oversized file among the inventory's files is refused with an
/// error naming it, and never hangs or fills memory.
#[test]
fn special_files_are_refused_without_hanging() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::create_dir(d.join("more")).unwrap();
    for fifo in ["pipe.yaml", "more/pipe.yaml"] {
        let st = std::process::Command::new("mkfifo")
            .arg(d.join(fifo))
            .status()
            .unwrap();
        assert!(st.success());
    }
    std::fs::write(d.join("big.yaml"), "# x\n".repeat(300_000)).unwrap();
    std::fs::write(
        d.join("main.yaml"),
        "name: demo\nhosts:\n  db: {address: 10.0.0.2, roles: [database]}\ninclude: [pipe.yaml, /dev/zero, big.yaml, more]\n",
    )
    .unwrap();
    let mut child = sagectl()
        .current_dir(d)
        .args(["validate", "main.yaml"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > std::time::Duration::from_secs(20) {
            child.kill().unwrap();
            panic!("sagectl validate hangs on special files");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let o = child.wait_with_output().unwrap();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2));
    insta::assert_snapshot!("special_files", err);

    // The main file too.
    let o = sagectl()
        .current_dir(d)
        .args(["validate", "pipe.yaml"])
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert!(
        err.contains(
            "pipe.yaml:1:1: cannot read inventory: a FIFO (named pipe), not a regular file"
        ),
        "{err}"
    );
}

#[test]
fn missing_inventory_file_is_a_clear_error() {
    let o = sagectl()
        .arg("validate")
        .arg("/nonexistent/inventory.yaml")
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        err.contains("/nonexistent/inventory.yaml:1:1: cannot read inventory"),
        "{err}"
    );
}

#[test]
fn includes_of_a_directory_and_group_extension() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::create_dir(d.join("more")).unwrap();
    std::fs::write(
        d.join("main.yaml"),
        "name: inc\ntls: {public_name: inc.test}\ngroups:\n  pool: [w1]\nhosts:\n  lb: {address: 10.1.0.2, roles: [loadbalancer, static, backend, database, cache]}\n  w1: {address: 10.1.0.3, roles: [worker]}\ninclude: [more]\n",
    )
    .unwrap();
    std::fs::write(
        d.join("more/b.yaml"),
        "hosts:\n  w3: {address: 10.1.0.5, roles: [worker]}\n",
    )
    .unwrap();
    std::fs::write(
        d.join("more/a.yaml"),
        "hosts:\n  w2: {address: 10.1.0.4, roles: [worker]}\ngroups:\n  pool: [w2]\n",
    )
    .unwrap();
    std::fs::write(d.join("more/notes.txt"), "not yaml, ignored").unwrap();
    let inv = Inventory::load(&d.join("main.yaml")).unwrap();
    let names: Vec<&str> = inv.hosts.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(
        names,
        ["lb", "w1", "w2", "w3"],
        "files of a directory in name order"
    );
    assert_eq!(inv.groups["pool"], ["w2", "w1"]);

    // An included file may not set anything but hosts and groups.
    std::fs::write(d.join("more/c.yaml"), "vars: {nginx_port: 1}\n").unwrap();
    let e = Inventory::load(&d.join("main.yaml"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("more/c.yaml:1:1: vars: unknown key `vars`"),
        "{e}"
    );
}

/// Property: for inventories made by mutating the shipped ones (random values of random types
/// for variables and settings, strings with `..`, NUL and control characters, huge numbers,
/// raw YAML fragments, removed keys, odd includes), validation never panics and returns
/// quickly, its report has a position on every problem and no raw control character, and an
/// inventory that validates renders, into --out and nowhere else, with agent configs the
/// agents accept.
mod generated {
    use std::collections::BTreeSet;
    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};

    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, TestCaseError, TestRunner};
    use serde_json::{Value, json};

    use super::lab::{copy_tree, root};
    use sagectl::inventory::Inventory;

    /// A value: JSON, or a raw YAML fragment written as it is.
    #[derive(Clone, Debug)]
    enum Val {
        Json(Value),
        Raw(&'static str),
        List(Vec<Val>),
        Map(&'static str, Box<Val>),
    }

    /// Where a mutation applies, as keys from the document's root (`#n`: the nth list item).
    #[derive(Clone, Debug)]
    enum Mutation {
        Set(Vec<String>, Val),
        Remove(Vec<String>),
    }

    const RAW: &[&str] = &[
        "99999999999999999999",
        "-99999999999999999999",
        ".inf",
        "-.inf",
        ".nan",
        "0x1F",
        "0o17",
        "1e400",
        "0644",
        "yes",
        "~",
        "!!binary aGk=",
        "!foo bar",
        "!!str 0644",
        "!!int x",
        "!<tag:x> 1",
        "&a 1",
        "*a",
        "[1, 2",
        "{",
        "}",
        "'single'",
        "\"\\e[31mred\\e[0m\"",
        "\"\\u0000\"",
        "\"a\\nb\"",
        "\"\\u202eevil\"",
        "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
        "{a: 1, a: 2}",
        "- - - -",
        "? x",
        "\"x\": \"y\"",
        "!!set {a, b}",
        "!!map {}",
    ];

    const STRINGS: &[&str] = &[
        "",
        "x",
        "..",
        "../../../../ESCAPED",
        "/../../ESCAPED2",
        "/etc/../../ESCAPED3",
        "/var/www/alt",
        "/srv/site-1_a",
        "/var/www/sagews/",
        "//x",
        "/a b",
        "/a;b",
        "relative/path",
        "a\u{0}b",
        "/x\u{0}",
        "\u{1b}[31mred\u{1b}[0m",
        "\r\n",
        "\u{202e}rtl",
        "15",
        "16",
        "1.2.3",
        "15a",
        "256MB",
        "1TB",
        "2TB",
        "64kB",
        "256mb",
        "99999999999999999999MB",
        "1h",
        "24d",
        "25d",
        "500ms",
        "1h; x",
        "info",
        "trace",
        "verbose",
        "10.0.0.0/8",
        "10.77.0.1/32",
        "::/0",
        "0.0.0.0/0",
        "10.0.0.1/24",
        "fd00::5",
        "10.77.0.50",
        "10.77.0.10",
        "192.0.2.99",
        "255.255.255.255",
        "0.0.0.0",
        "database",
        "backnd",
        "python3",
        "sage",
        "error",
        "warn",
        "(unclosed",
        "database .* refused",
        "[z-a]",
        "https://alerts.example.org/x",
        "http://",
        "https://a b/",
        "https://h:99999/",
        "lab.d/",
        "example.d/",
        "fifo.yaml",
        "/dev/zero",
        "/dev/null",
        "/",
        "/proc/self/fd/0",
        "bookworm",
        "Bad_Name",
        "logs2",
        "app1",
        "logs",
        "sagews.example.org",
        "-bad-",
    ];

    const INTS: &[i64] = &[
        0,
        -1,
        1,
        2,
        8,
        16,
        22,
        80,
        443,
        999,
        1000,
        5432,
        7000,
        7200,
        7201,
        8081,
        8082,
        8443,
        8444,
        11211,
        20000,
        29999,
        35000,
        65535,
        65536,
        100000,
        1 << 40,
        i64::MAX,
        i64::MIN,
    ];

    fn scalar() -> impl Strategy<Value = Val> {
        prop_oneof![
            3 => proptest::sample::select(STRINGS).prop_map(|s| Val::Json(json!(s))),
            3 => proptest::sample::select(INTS).prop_map(|i| Val::Json(json!(i))),
            1 => any::<i64>().prop_map(|i| Val::Json(json!(i))),
            1 => proptest::sample::select(&[5432.5, 1e20, -0.0, 0.5][..]).prop_map(|f| Val::Json(json!(f))),
            1 => any::<bool>().prop_map(|b| Val::Json(json!(b))),
            1 => Just(Val::Json(Value::Null)),
            2 => proptest::sample::select(RAW).prop_map(Val::Raw),
            1 => proptest::collection::vec(
                proptest::sample::select(&['a', '0', '.', '/', '-', ':', ';', '{', '"', '\'', ' ', '\n', '\0', '\u{1b}', '\u{7f}', 'é', '\u{202e}', '#', '!', '&', '*', '$'][..]),
                0..12,
            )
            .prop_map(|c| Val::Json(json!(c.into_iter().collect::<String>()))),
        ]
    }

    fn value() -> impl Strategy<Value = Val> {
        scalar().prop_recursive(2, 12, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Val::List),
                (
                    proptest::sample::select(&["a", "port", "name", "x y"][..]),
                    inner
                )
                    .prop_map(|(k, v)| Val::Map(k, Box::new(v))),
            ]
        })
    }

    /// Settings and fields an inventory may have, as paths from the root.
    const SETTINGS: &[&str] = &[
        "name",
        "ssh.user",
        "ssh.port",
        "ssh.identity_file",
        "tls",
        "tls.public_name",
        "tls.certificate",
        "tls.key",
        "vars",
        "groups",
        "groups.edge",
        "hosts",
        "include",
        "lab",
        "lab.subnet",
        "lab.suite",
        "worker",
        "worker.engine",
        "worker.port",
        "worker.max_sessions",
        "worker.uid_min",
        "worker.uid_max",
        "worker.backend_timeout_seconds",
        "worker.limits.cpu_seconds",
        "worker.limits.memory_mb",
        "worker.limits.processes",
        "worker.limits.open_files",
        "worker.limits.file_size_mb",
        "worker.limits.wall_clock_seconds",
        "worker.limits.idle_timeout_seconds",
        "backend.port",
        "backend.worker_port",
        "backend.max_sessions",
        "backend.max_bundle_mb",
        "backend.accounts.signup",
        "backend.accounts.max_workspaces",
        "backend.accounts.session_days",
        "backend.accounts.min_password_length",
        "logd.port",
        "logd.http_port",
        "logd.allow",
        "logd.retention_days",
        "logd.replica",
        "logd.alerts",
        "logd.alerts.#0.name",
        "logd.alerts.#0.level",
        "logd.alerts.#0.target",
        "logd.alerts.#0.message",
        "logd.alerts.#0.host",
        "logd.alerts.#0.count",
        "logd.alerts.#0.window_seconds",
        "logd.alerts.#0.command",
        "logd.alerts.#0.webhook",
        "logd.alerts.#1.message",
        "unknown_key",
    ];

    const HOST_FIELDS: &[&str] = &["address", "roles", "ssh.port", "ssh.user", "vars", "adress"];
    const ROLES: &[&str] = &[
        "database",
        "cache",
        "logd",
        "worker",
        "backend",
        "static",
        "loadbalancer",
        "firewall",
        "backnd",
    ];

    fn var_names() -> Vec<String> {
        let catalog = sagectl::roles::Catalog::embedded().unwrap();
        let mut names: Vec<String> = catalog.defaults().keys().map(|k| k.to_string()).collect();
        names.push("nginx_prot".into());
        names
    }

    /// Values at and just past the edges of what each variable may hold, so that many mutated
    /// inventories validate and render with extreme values.
    fn edge_values() -> Vec<(String, Val)> {
        use sagectl::inventory::constraint::Constraint;
        let catalog = sagectl::roles::Catalog::embedded().unwrap();
        let mut out = Vec::new();
        for (name, c) in catalog.types() {
            let vals: Vec<Value> = match c {
                Constraint::Bool => vec![json!(true), json!(false)],
                Constraint::Int { min, max } => {
                    vec![
                        json!(min),
                        json!(max),
                        json!(min / 2 + max / 2),
                        json!(min - 1),
                        json!(max + 1),
                    ]
                }
                Constraint::Port { .. } => vec![
                    json!(1),
                    json!(1024),
                    json!(8081),
                    json!(8444),
                    json!(40000),
                    json!(65535),
                    json!(0),
                    json!(65536),
                ],
                Constraint::Size { min, max } | Constraint::Duration { min, max } => {
                    vec![
                        json!(min.text),
                        json!(max.text),
                        json!(format!("{}0", max.text)),
                    ]
                }
                Constraint::Enum(values) => values.iter().map(|v| json!(v)).collect(),
                Constraint::Version => {
                    vec![json!("15"), json!("16"), json!("1.2.3"), json!("1.2.3.4")]
                }
                Constraint::AbsPath => vec![
                    json!("/a"),
                    json!("/srv/x-1_2.b+c@d"),
                    json!(format!("/{}", ["d"; 100].join("/"))),
                    json!("/a/"),
                ],
                Constraint::CidrList { .. } => vec![
                    json!(["0.0.0.0/0"]),
                    json!(["10.77.0.1/32", "::/0"]),
                    json!(["192.0.2.0/24", "2001:db8::/32"]),
                    json!([]),
                ],
                Constraint::UserList => vec![
                    json!([]),
                    json!(["root", "_svc-1"]),
                    json!(["Root"]),
                    json!(["root\nPermitRootLogin yes"]),
                ],
            };
            out.extend(vals.into_iter().map(|v| (name.to_string(), Val::Json(v))));
        }
        out
    }

    fn split(p: &str) -> Vec<String> {
        p.split('.').map(str::to_string).collect()
    }

    fn mutation(hosts: Vec<String>) -> impl Strategy<Value = Mutation> {
        let vars = var_names();
        let hosts2 = hosts.clone();
        let hosts3 = hosts.clone();
        let edges = edge_values();
        let hosts4 = hosts.clone();
        prop_oneof![
            // A variable at the edges of its type, inventory-wide or on a host.
            6 => (proptest::sample::select(edges), proptest::option::of(proptest::sample::select(hosts4)))
                .prop_map(|((var, v), host)| match host {
                    None => Mutation::Set(vec!["vars".into(), var], v),
                    Some(h) => Mutation::Set(vec!["hosts".into(), h, "vars".into(), var], v),
                }),
            // A variable, inventory-wide or on a host, with any value.
            3 => (proptest::sample::select(vars.clone()), value(), proptest::option::of(proptest::sample::select(hosts.clone())))
                .prop_map(|(var, v, host)| match host {
                    None => Mutation::Set(vec!["vars".into(), var], v),
                    Some(h) => Mutation::Set(vec!["hosts".into(), h, "vars".into(), var], v),
                }),
            3 => (proptest::sample::select(SETTINGS), value()).prop_map(|(p, v)| Mutation::Set(split(p), v)),
            2 => (proptest::sample::select(hosts2), proptest::sample::select(HOST_FIELDS), value())
                .prop_map(|(h, f, v)| {
                    let mut p = vec!["hosts".to_string(), h];
                    p.extend(split(f));
                    Mutation::Set(p, v)
                }),
            // Roles: plausible sets, so that many mutated inventories still validate.
            2 => (proptest::sample::select(hosts3), proptest::sample::subsequence(ROLES, 0..4))
                .prop_map(|(h, r)| Mutation::Set(
                    vec!["hosts".into(), h, "roles".into()],
                    Val::Json(json!(r)),
                )),
            1 => proptest::sample::select(SETTINGS).prop_map(|p| Mutation::Remove(split(p))),
            1 => proptest::sample::select(hosts).prop_map(|h| Mutation::Remove(vec!["hosts".into(), h])),
        ]
    }

    /// Placeholders for raw fragments in the JSON text, replaced when it is written out.
    fn to_json(v: &Val, raws: &mut Vec<String>) -> Value {
        match v {
            Val::Json(j) => j.clone(),
            Val::Raw(r) => {
                raws.push((*r).to_string());
                json!(format!("@@RAW{}@@", raws.len() - 1))
            }
            Val::List(items) => Value::Array(items.iter().map(|i| to_json(i, raws)).collect()),
            Val::Map(k, v) => json!({ *k: to_json(v, raws) }),
        }
    }

    fn apply(doc: &mut Value, m: &Mutation, raws: &mut Vec<String>) {
        let (path, new) = match m {
            Mutation::Set(p, v) => (p, Some(to_json(v, raws))),
            Mutation::Remove(p) => (p, None),
        };
        let mut cur = doc;
        for (i, k) in path.iter().enumerate() {
            let last = i + 1 == path.len();
            if let Some(n) = k.strip_prefix('#') {
                let n: usize = n.parse().unwrap();
                let Value::Array(a) = cur else { return };
                if n >= a.len() {
                    return;
                }
                if last {
                    match new {
                        Some(v) => a[n] = v,
                        None => {
                            a.remove(n);
                        }
                    }
                    return;
                }
                cur = &mut a[n];
                continue;
            }
            if !cur.is_object() {
                if new.is_none() {
                    return;
                }
                *cur = json!({});
            }
            let obj = cur.as_object_mut().unwrap();
            if last {
                match new {
                    Some(v) => {
                        obj.insert(k.clone(), v);
                    }
                    None => {
                        obj.remove(k);
                    }
                }
                return;
            }
            cur = obj.entry(k.clone()).or_insert(json!({}));
        }
    }

    /// The document as YAML: JSON (a subset of YAML 1.2), with the raw fragments put in.
    fn write(doc: &Value, raws: &[String]) -> String {
        let mut text = serde_json::to_string_pretty(doc).unwrap();
        for (i, r) in raws.iter().enumerate() {
            text = text.replace(&format!("\"@@RAW{i}@@\""), r);
        }
        text
    }

    /// Line edits of the file as written (block style): a line removed, doubled, or its value
    /// replaced by a raw fragment or another string.
    #[derive(Clone, Debug)]
    enum LineEdit {
        Drop(usize),
        Double(usize),
        Value(usize, Val),
    }

    fn line_edit() -> impl Strategy<Value = LineEdit> {
        prop_oneof![
            (0..200usize).prop_map(LineEdit::Drop),
            (0..200usize).prop_map(LineEdit::Double),
            (0..200usize, scalar()).prop_map(|(i, v)| LineEdit::Value(i, v)),
        ]
    }

    fn edit_lines(text: &str, edits: &[LineEdit]) -> String {
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        for e in edits {
            let n = lines.len().max(1);
            match e {
                LineEdit::Drop(i) => {
                    lines.remove(i % n);
                }
                LineEdit::Double(i) => {
                    let l = lines[i % n].clone();
                    lines.insert(i % n, l);
                }
                LineEdit::Value(i, v) => {
                    let l = &mut lines[i % n];
                    if let Some(colon) = l.find(": ") {
                        let text = match v {
                            Val::Raw(r) => (*r).to_string(),
                            Val::Json(j) => j.to_string(),
                            Val::List(_) | Val::Map(..) => "[]".into(),
                        };
                        l.truncate(colon + 2);
                        l.push_str(&text);
                    }
                }
            }
        }
        lines.join("\n") + "\n"
    }

    #[derive(Clone, Debug)]
    enum Case {
        Tree(Vec<Mutation>),
        Lines(Vec<LineEdit>),
    }

    /// Every path under `dir`, relative to it.
    fn tree(dir: &Path) -> BTreeSet<PathBuf> {
        fn walk(base: &Path, d: &Path, out: &mut BTreeSet<PathBuf>) {
            for e in std::fs::read_dir(d).unwrap() {
                let e = e.unwrap();
                let p = e.path();
                out.insert(p.strip_prefix(base).unwrap().to_path_buf());
                if e.file_type().unwrap().is_dir() {
                    walk(base, &p, out);
                }
            }
        }
        let mut out = BTreeSet::new();
        walk(dir, dir, &mut out);
        out
    }

    #[derive(Default)]
    struct Stats {
        cases: std::cell::Cell<usize>,
        valid: std::cell::Cell<usize>,
    }

    /// Runs one generated inventory through validate and, when valid, render.
    fn check(base: &Path, file: &str, text: &str, stats: &Stats) -> Result<(), TestCaseError> {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("inv");
        copy_tree(base, &dir);
        let fifo = dir.join("fifo.yaml");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        let path = dir.join(file);
        std::fs::write(&path, text).unwrap();
        let out = tmp.path().join("sandbox").join("out");
        std::fs::create_dir(out.parent().unwrap()).unwrap();
        let before = tree(tmp.path());

        let start = Instant::now();
        let loaded = Inventory::load(&path);
        let took = start.elapsed();
        prop_assert!(took < Duration::from_secs(5), "validation took {took:?}");
        stats.cases.set(stats.cases.get() + 1);
        let inv = match loaded {
            Err(d) => {
                let report = d.to_string();
                prop_assert!(!d.is_empty());
                prop_assert!(
                    !report.chars().any(|c| c.is_control() && c != '\n'),
                    "raw control character in:\n{report:?}"
                );
                for p in &d.0 {
                    prop_assert!(p.pos.line >= 1 && p.pos.col >= 1, "no position: {p}");
                }
                return Ok(());
            }
            Ok(inv) => inv,
        };
        stats.valid.set(stats.valid.get() + 1);

        // Everything that validates renders, into --out only.
        let r = sagectl::command::render::run(sagectl::command::render::Opts {
            inventory: path.clone(),
            out: out.clone(),
            hosts: Vec::new(),
        });
        match r {
            Ok(code) => prop_assert_eq!(code, std::process::ExitCode::SUCCESS),
            Err(e) => prop_assert!(false, "a valid inventory failed to render: {e:#}\n{text}"),
        }
        let after = tree(tmp.path());
        let hosts: BTreeSet<&str> = inv.hosts.iter().map(|h| h.name.as_str()).collect();
        for p in after.difference(&before) {
            let mut c = p.components().map(|c| c.as_os_str().to_str().unwrap());
            let first = c.next().unwrap();
            match first {
                // The state directory beside the inventory.
                "inv" => prop_assert_eq!(c.next(), Some(".sagectl"), "made {:?}", p),
                "sandbox" => {
                    prop_assert_eq!(c.next(), Some("out"), "made {:?} beside --out", p);
                    if let Some(h) = c.next() {
                        prop_assert!(hosts.contains(h), "made {:?}: not a host's directory", p);
                    }
                }
                _ => prop_assert!(false, "made {:?} outside --out", p),
            }
        }
        for p in &after {
            let full = tmp.path().join(p);
            let m = std::fs::symlink_metadata(&full).unwrap();
            prop_assert!(
                !m.file_type().is_symlink() || before.contains(p),
                "{:?} is a symlink",
                p
            );
        }
        // The agents accept the configs rendered for them (`sage-agent check-config`, the
        // binary built beside sagectl: `cargo build --workspace` first, as ./test does).
        let agent = sagews_testkit::bin("sage-agent");
        prop_assert!(
            agent.exists(),
            "{} is missing: run cargo build --workspace",
            agent.display()
        );
        for h in &inv.hosts {
            let etc = out.join(&h.name).join("etc/sage-agent");
            for name in ["worker", "backend", "logd"] {
                let file = etc.join(format!("{name}.json"));
                if file.exists() {
                    let o = std::process::Command::new(&agent)
                        .args(["check-config", name])
                        .arg(&file)
                        .output()
                        .unwrap();
                    prop_assert!(
                        o.status.success(),
                        "{}: {name}.json: {}\n{text}",
                        h.name,
                        String::from_utf8_lossy(&o.stderr)
                    );
                }
            }
        }
        Ok(())
    }

    fn run(file: &str, cases: u32) {
        let base = root().join("inventories");
        let text = std::fs::read_to_string(base.join(file)).unwrap();
        let node = sagectl::yaml::parse(Path::new(file), &text).unwrap();
        let doc = sagectl::yaml::to_json(&node);
        let hosts: Vec<String> = doc["hosts"].as_object().unwrap().keys().cloned().collect();
        let strategy = prop_oneof![
            4 => proptest::collection::vec(mutation(hosts), 1..4).prop_map(Case::Tree),
            1 => proptest::collection::vec(line_edit(), 1..3).prop_map(Case::Lines),
        ];
        // SAGECTL_PROPTEST_CASES=5000 for a longer search than the default run's.
        let cases = std::env::var("SAGECTL_PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(cases);
        let mut runner = TestRunner::new(Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        });
        let stats = Stats::default();
        let start = Instant::now();
        let result = runner.run(&strategy, |case| {
            let generated = match &case {
                Case::Tree(ms) => {
                    let mut doc = doc.clone();
                    let mut raws = Vec::new();
                    for m in ms {
                        apply(&mut doc, m, &mut raws);
                    }
                    write(&doc, &raws)
                }
                Case::Lines(edits) => edit_lines(&text, edits),
            };
            check(&base, file, &generated, &stats)
        });
        if let Err(e) = result {
            panic!("{file}: {e}");
        }
        eprintln!(
            "{file}: {} generated inventories, {} valid and rendered, in {:?}",
            stats.cases.get(),
            stats.valid.get(),
            start.elapsed()
        );
        let (cases, valid) = (stats.cases.get(), stats.valid.get());
        // The generator must reach render often enough for the property to mean something.
        assert!(valid * 10 >= cases, "only {valid} of {cases} validated");
    }

    /// Whether the real tools can run here (root, for namespaces, and the tool installed);
    /// when not, the test says so and checks nothing more.
    fn have(tool: &str) -> bool {
        let found = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .output()
            .is_ok_and(|o| o.status.success());
        let ok = super::lab::is_root() && found;
        if !ok {
            eprintln!("skipped: needs root and `{tool}`");
        }
        ok
    }

    /// Runs `nft -c`, `haproxy -c` and `nginx -t` on what was rendered for `inv` into `out`,
    /// as tests/tools.rs does for the shipped inventories.
    fn tools_accept(inv: &Inventory, out: &Path, scratch: &Path, what: &str) {
        use super::lab::{overlay, run_isolated, text};
        use sagectl::inventory::Role;
        let ok = |o: &std::process::Output, tool: &str, host: &str| {
            let (stdout, stderr) = text(o);
            assert!(
                o.status.success(),
                "{tool} refused what was rendered for {host} ({what}):\n{stdout}\n{stderr}"
            );
        };
        for h in &inv.hosts {
            let host_out = out.join(&h.name);
            let nft = host_out.join("etc/nftables.conf");
            let o = run_isolated(&[], &[], &["nft", "-c", "-f", nft.to_str().unwrap()]);
            ok(&o, "nft -c", &h.name);
            let iso = scratch.join("iso").join(&h.name);
            if h.has(Role::Loadbalancer) {
                let etc = overlay("/etc/haproxy", &host_out, &iso);
                let cmd = ["haproxy", "-c", "-f", "/etc/haproxy/haproxy.cfg"];
                let o = run_isolated(&[(&etc, "/etc/haproxy")], &[], &cmd);
                ok(&o, "haproxy -c", &h.name);
            }
            if h.has(Role::Static) {
                let etc = overlay("/etc/nginx", &host_out, &iso);
                let cmd = ["nginx", "-t", "-c", "/etc/nginx/nginx.conf"];
                let o = run_isolated(&[(&etc, "/etc/nginx")], &[h.address.to_string()], &cmd);
                ok(&o, "nginx -t", &h.name);
            }
        }
    }

    /// lab.yaml with every variable at the low, or the high, end of what it may hold.
    fn at_the_edges(high: bool) -> String {
        use sagectl::inventory::constraint::Constraint;
        let catalog = sagectl::roles::Catalog::embedded().unwrap();
        let base = root().join("inventories/lab.yaml");
        let text = std::fs::read_to_string(&base).unwrap();
        let mut doc = sagectl::yaml::to_json(&sagectl::yaml::parse(&base, &text).unwrap());
        let mut port = if high { 65535 } else { 1 };
        for (name, c) in catalog.types() {
            let v = match c {
                Constraint::Bool => json!(high),
                Constraint::Int { min, max } => json!(if high { max } else { min }),
                // Distinct, so that no two services of a host share one.
                Constraint::Port { .. } => {
                    port = if high { port - 1 } else { port + 1 };
                    json!(port)
                }
                Constraint::Size { min, max } | Constraint::Duration { min, max } => {
                    json!(if high { &max.text } else { &min.text })
                }
                Constraint::Enum(values) => {
                    json!(if high { values.last() } else { values.first() })
                }
                Constraint::Version => json!("15"),
                Constraint::AbsPath => json!(if high {
                    format!("/{}", ["d-1_2.3+4@5"; 60].join("/"))
                } else {
                    "/s".to_string()
                }),
                Constraint::CidrList { .. } => json!(if high {
                    vec![
                        "10.77.0.1/32",
                        "0.0.0.0/0",
                        "::/0",
                        "2001:db8::/32",
                        "192.0.2.0/24",
                    ]
                } else {
                    vec!["10.77.0.1"]
                }),
                Constraint::UserList => json!(if high {
                    vec!["root".to_string(), "_a".into(), "u".repeat(32)]
                } else {
                    Vec::new()
                }),
            };
            doc["vars"][name] = v;
        }
        serde_json::to_string_pretty(&doc).unwrap()
    }

    #[test]
    fn variables_at_their_edges_render_files_the_tools_accept() {
        for high in [false, true] {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("inv");
            copy_tree(&root().join("inventories"), &dir);
            let path = dir.join("edges.yaml");
            std::fs::write(&path, at_the_edges(high)).unwrap();
            let inv = Inventory::load(&path).unwrap_or_else(|d| panic!("high={high}:\n{d}"));
            let out = tmp.path().join("out");
            super::lab::render(&path, &out);
            if have("nft") && have("haproxy") && have("nginx") {
                tools_accept(&inv, &out, tmp.path(), &format!("edges, high={high}"));
            }
        }
    }

    /// A few generated inventories that validate, through the real tools.
    #[test]
    fn generated_valid_inventories_pass_the_tools() {
        if !(have("nft") && have("haproxy") && have("nginx")) {
            return;
        }
        let base = root().join("inventories");
        let file = "lab.yaml";
        let text = std::fs::read_to_string(base.join(file)).unwrap();
        let doc = sagectl::yaml::to_json(&sagectl::yaml::parse(Path::new(file), &text).unwrap());
        let hosts: Vec<String> = doc["hosts"].as_object().unwrap().keys().cloned().collect();
        let strategy = proptest::collection::vec(mutation(hosts), 1..4);
        let mut runner = TestRunner::new(Config {
            failure_persistence: None,
            ..Config::default()
        });
        let mut checked = 0;
        for _ in 0..400 {
            if checked == 8 {
                break;
            }
            let ms = strategy.new_tree(&mut runner).unwrap().current();
            let mut doc = doc.clone();
            let mut raws = Vec::new();
            for m in &ms {
                apply(&mut doc, m, &mut raws);
            }
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("inv");
            copy_tree(&base, &dir);
            let path = dir.join(file);
            std::fs::write(&path, write(&doc, &raws)).unwrap();
            let Ok(inv) = Inventory::load(&path) else {
                continue;
            };
            let out = tmp.path().join("out");
            super::lab::render(&path, &out);
            tools_accept(&inv, &out, tmp.path(), &format!("{ms:?}"));
            checked += 1;
        }
        assert_eq!(checked, 8, "too few generated inventories validated");
    }

    #[test]
    fn mutated_lab_inventories() {
        run("lab.yaml", 120);
    }

    #[test]
    fn mutated_example_inventories() {
        run("example.yaml", 120);
    }
}
