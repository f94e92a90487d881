//! `sagectl render`: deterministic output, secrets only where needed (0600), snapshots of the
//! rendered configs, and the firewall opening exactly the arrows of the architecture.

use sagews_testkit::lab;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use lab::{render, root, sagectl, scratch_inventory, text};

/// Every file under `dir`, by path relative to it.
fn files(dir: &Path) -> BTreeMap<String, PathBuf> {
    fn walk(base: &Path, d: &Path, out: &mut BTreeMap<String, PathBuf>) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.insert(
                    p.strip_prefix(base).unwrap().to_string_lossy().into_owned(),
                    p,
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap()
}

fn secrets(inv_dir: &Path, name: &str) -> Vec<String> {
    let s: BTreeMap<String, String> = serde_json::from_str(&read(
        &inv_dir.join(".sagectl").join(name).join("secrets.json"),
    ))
    .unwrap();
    s.into_values().collect()
}

#[test]
fn rendering_is_deterministic() {
    for name in ["lab.yaml", "example.yaml"] {
        let (tmp, inv) = scratch_inventory(&root().join("inventories").join(name));
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        render(&inv, &a);
        render(&inv, &b);
        let (fa, fb) = (files(&a), files(&b));
        assert_eq!(fa.keys().collect::<Vec<_>>(), fb.keys().collect::<Vec<_>>());
        assert!(fa.len() > 30, "{name}: only {} files", fa.len());
        for (k, p) in &fa {
            assert_eq!(
                std::fs::read(p).unwrap(),
                std::fs::read(&fb[k]).unwrap(),
                "{name}: {k} differs between runs"
            );
        }
    }
}

#[test]
fn secrets_only_in_files_that_need_them() {
    let (tmp, inv) = scratch_inventory(&root().join("inventories/lab.yaml"));
    let out = tmp.path().join("out");
    let printed = render(&inv, &out);
    let secrets = secrets(tmp.path(), "lab");
    assert_eq!(
        secrets.len(),
        4,
        "two database passwords, the standby's replication password, the operators' first password"
    );
    let mut holders = Vec::new();
    for (rel, p) in files(&out) {
        let content = read(&p);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        let has_secret = secrets.iter().any(|s| content.contains(s.as_str()));
        let has_key = content.contains("PRIVATE KEY");
        if has_secret || has_key {
            assert_eq!(mode, 0o600, "{rel} holds a secret but is {mode:o}");
            holders.push(rel.clone());
        } else {
            assert_eq!(mode, 0o644, "{rel}");
        }
    }
    assert_eq!(
        holders,
        [
            "backend1/etc/sage-agent/backend.json",
            "backend1/etc/sage-agent/host.key",
            "db/etc/memcached/tls/host.key",
            "db/etc/postgresql/15/main/replica.pgpass",
            "db/etc/postgresql/15/main/server.key",
            "lb/etc/haproxy/certs/host.pem",
            "lb/etc/haproxy/certs/site.pem",
            "lb/etc/nginx/tls/host.key",
            "logs/etc/sage-agent/host.key",
            "logs/etc/sage-agent/logd.json",
            "worker1/etc/sage-agent/host.key",
        ]
    );
    // The manifests mark the same files secret and say the modes hosts get.
    let manifest = read(&out.join("backend1/MANIFEST"));
    assert!(
        manifest.contains("0600 root:root /etc/sage-agent/backend.json (secret)"),
        "{manifest}"
    );
    for s in &secrets {
        assert!(!printed.contains(s.as_str()));
    }
}

#[test]
fn rendered_configs_snapshot() {
    let (tmp, inv) = scratch_inventory(&root().join("inventories/lab.yaml"));
    let out = tmp.path().join("out");
    render(&inv, &out);
    let secrets = secrets(tmp.path(), "lab");
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_suffix("lab");
    for (rel, p) in files(&out) {
        let content = read(&p);
        if content.contains("-----BEGIN") || rel.contains("/var/www/") {
            continue; // certificates and keys differ per state directory; static files are copies
        }
        let mut redacted = content.clone();
        for s in &secrets {
            redacted = redacted.replace(s.as_str(), "<secret>");
        }
        settings.set_snapshot_suffix(rel.replace('/', "__"));
        settings.bind(|| insta::assert_snapshot!("lab", redacted));
    }
}

#[test]
fn one_host_only_and_unknown_host() {
    let (tmp, inv) = scratch_inventory(&root().join("inventories/lab.yaml"));
    let out = tmp.path().join("out");
    let o = sagectl()
        .arg("render")
        .arg(&inv)
        .arg("--out")
        .arg(&out)
        .args(["--host", "db"])
        .output()
        .unwrap();
    assert!(o.status.success());
    let hosts: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(hosts, ["db"]);
    let o = sagectl()
        .arg("render")
        .arg(&inv)
        .arg("--out")
        .arg(&out)
        .args(["--host", "bd"])
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("--host bd: no such host") && err.contains("did you mean `db`?"),
        "{err}"
    );
}

/// The accept rules of a host's input chain as (source, port) pairs.
fn accepts(nft: &str) -> Vec<(String, String)> {
    let input = nft
        .split("chain input")
        .nth(1)
        .unwrap()
        .split("chain forward")
        .next()
        .unwrap();
    input
        .lines()
        .filter(|l| l.contains(" saddr ") && l.contains(" accept"))
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w[2].to_string(), w[5].to_string())
        })
        .collect()
}

#[test]
fn firewall_opens_exactly_the_arrows() {
    let (tmp, inv) = scratch_inventory(&root().join("inventories/lab.yaml"));
    let out = tmp.path().join("out");
    render(&inv, &out);
    let nft = |h: &str| read(&out.join(h).join("etc/nftables.conf"));
    let admin = ("10.77.0.1/32".to_string(), "22".to_string());
    let pairs = |v: &[(&str, &str)]| {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect::<Vec<_>>()
    };

    let mut want = vec![admin.clone()];
    want.extend(pairs(&[
        ("10.77.0.13", "5432"),
        ("10.77.0.12", "5432"),
        ("10.77.0.13", "11211"),
    ]));
    assert_eq!(
        accepts(&nft("db")),
        want,
        "database: backend and logd; cache: backend"
    );

    let mut want = vec![admin.clone()];
    want.extend(pairs(&[("10.77.0.10", "8443"), ("10.77.0.14", "8444")]));
    assert_eq!(
        accepts(&nft("backend1")),
        want,
        "backend: HAProxy, and workers registering"
    );

    let mut want = vec![admin.clone()];
    want.extend(pairs(&[("10.77.0.13", "7000")]));
    assert_eq!(accepts(&nft("worker1")), want, "worker: backends only");

    let lb = nft("lb");
    assert!(lb.contains("tcp dport { 80, 443 } accept"));
    let mut want = vec![admin.clone()];
    // nginx from HAProxy; publishing from the backend.
    want.extend(pairs(&[("10.77.0.10", "8081"), ("10.77.0.13", "8082")]));
    assert_eq!(accepts(&lb), want);

    // logd: the worker is dropped before anything is accepted.
    let logs = nft("logs");
    let drop_at = logs
        .find("saddr 10.77.0.14 tcp dport { 7200, 7201 } drop")
        .expect("worker dropped");
    let first_accept = logs
        .find("saddr 10.77.0.13 tcp dport 7200 accept")
        .expect("backend accepted");
    assert!(drop_at < first_accept);

    // Workers' output: backends' registration port, then packages as root only.
    let w = nft("worker1");
    let output = w.split("chain output").nth(1).unwrap();
    assert!(output.contains("policy drop"));
    assert!(output.contains("ip daddr 10.77.0.13 tcp dport 8444 accept"));
    assert!(output.contains("meta skuid { root, _apt } ip daddr 10.77.0.1 tcp dport 3149 accept"));
    // Nothing else: no port 53/80/443 to anywhere (issue 13).
    let rules: Vec<&str> = output
        .lines()
        .filter(|l| l.contains(" accept") && !l.contains("established"))
        .collect();
    assert_eq!(
        rules.len(),
        4,
        "lo, icmp, registration, the proxy: {rules:#?}"
    );
    // Elsewhere: the mirrors the inventory names, and only those.
    let (tmp2, example) = scratch_inventory(&root().join("inventories/example.yaml"));
    render(&example, &tmp2.path().join("out"));
    let w = read(&tmp2.path().join("out/worker1/etc/nftables.conf"));
    let output = w.split("chain output").nth(1).unwrap();
    let packages: Vec<&str> = output
        .lines()
        .filter(|l| l.contains("meta skuid { root, _apt }"))
        .map(|l| l.split_whitespace().nth(8).unwrap())
        .collect();
    assert_eq!(packages, ["192.0.2.53/32", "198.51.100.0/24"]);
    for h in ["db", "backend1", "lb", "logs"] {
        assert!(
            nft(h).contains("policy drop")
                && nft(h)
                    .split("chain output")
                    .nth(1)
                    .unwrap()
                    .contains("policy accept"),
            "{h}"
        );
    }
}

/// The command-line interface, as users read it. (Not beside the inventory tests: insta's
/// `glob!` there would claim these snapshots when the tests run in parallel.)
#[test]
fn help_texts() {
    for args in [vec!["--help"], vec!["up", "--help"], vec!["lab", "--help"]] {
        let o = sagectl().args(&args).output().unwrap();
        assert!(o.status.success());
        let name = args.join("_").replace("--", "");
        insta::assert_snapshot!(format!("help_{name}"), text(&o).0);
    }
}

/// Variables that would put files outside --out are refused before anything is written, and
/// a path that got past validation is refused again when rendered.
#[test]
fn render_writes_nowhere_but_under_out() {
    let (tmp, inv) = scratch_inventory(&root().join("inventories/lab.yaml"));
    let edited = std::fs::read_to_string(&inv).unwrap().replace(
        "  memcached_memory_mb: 64\n",
        "  memcached_memory_mb: 64\n  postgres_version: \"../../../../ESCAPED\"\n  static_root: \"/../../ESCAPED2\"\n",
    );
    std::fs::write(&inv, edited).unwrap();
    let out = tmp.path().join("a/b/out");
    let o = sagectl()
        .arg("render")
        .arg(&inv)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("vars.postgres_version: `../../../../ESCAPED` is not a version"));
    assert!(err.contains("vars.static_root: `/../../ESCAPED2` is not a usable path"));
    assert!(!tmp.path().join("a").exists(), "nothing is written");

    // The second line: a value that skipped validation still cannot leave the host's tree.
    let (tmp, path) = scratch_inventory(&root().join("inventories/lab.yaml"));
    let mut inv = sagectl::inventory::Inventory::load(&path).unwrap();
    let catalog = sagectl::roles::Catalog::embedded().unwrap();
    let state = sagectl::pki::open(&inv).unwrap();
    for (var, value) in [
        ("postgres_version", "../../../../ESCAPED"),
        ("static_root", "/../../ESCAPED2"),
        ("static_root", "/srv/\u{0}x"),
    ] {
        inv.vars.insert(var.into(), serde_json::json!(value));
        let host = inv.hosts.iter().find(|h| h.name == "db" || h.name == "lb");
        let mut refused = 0;
        for h in inv
            .hosts
            .iter()
            .filter(|h| h.name == "db" || h.name == "lb")
        {
            if let Err(e) = sagectl::render::host_files(&inv, catalog, &state, h) {
                assert!(
                    matches!(e, sagectl::render::RenderError::UnsafePath { .. }),
                    "{e}"
                );
                refused += 1;
            }
        }
        assert!(host.is_some() && refused == 1, "{var}: {value:?}");
        inv.vars.remove(var);
    }
    drop(tmp);
}
