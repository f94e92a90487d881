//! The state directory: created on first use, reused after, 0700/0600, certificates that
//! verify against the CA and carry the host's names and roles, and no secret in any output.

use sagews_testkit::lab;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use lab::{render, root, sagectl, scratch_inventory, text};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((
                    p.strip_prefix(dir).unwrap().display().to_string(),
                    std::fs::read(&p).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn created_once_private_and_reused() {
    let (tmp, inv) = scratch_inventory(&root().join("inventories/lab.yaml"));
    let state = tmp.path().join(".sagectl/lab");
    assert!(!state.exists());
    render(&inv, &tmp.path().join("out1"));
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&state.join("hosts")), 0o700);
    let first = tree(&state);
    let names: Vec<&str> = first.iter().map(|(n, _)| n.as_str()).collect();
    for want in [
        "ca.crt",
        "ca.key",
        "secrets.json",
        "hosts/lb.crt",
        "hosts/lb.key",
        "hosts/worker1.key",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    for (n, _) in &first {
        assert_eq!(mode(&state.join(n)), 0o600, "{n}");
    }
    render(&inv, &tmp.path().join("out2"));
    assert_eq!(
        first,
        tree(&state),
        "a second run changes nothing in the state directory"
    );
}

#[test]
fn host_certificate_is_remade_when_its_names_change_and_ca_is_kept() {
    let (tmp, inv) = scratch_inventory(&root().join("inventories/lab.yaml"));
    let state = tmp.path().join(".sagectl/lab");
    render(&inv, &tmp.path().join("out1"));
    let ca = std::fs::read(state.join("ca.crt")).unwrap();
    let (db_cert, lb_cert) = (
        std::fs::read(state.join("hosts/db.crt")).unwrap(),
        std::fs::read(state.join("hosts/lb.crt")).unwrap(),
    );
    let text = std::fs::read_to_string(&inv)
        .unwrap()
        .replace("address: 10.77.0.11", "address: 10.77.0.21");
    std::fs::write(&inv, text).unwrap();
    render(&inv, &tmp.path().join("out2"));
    assert_eq!(std::fs::read(state.join("ca.crt")).unwrap(), ca);
    assert_ne!(
        std::fs::read(state.join("hosts/db.crt")).unwrap(),
        db_cert,
        "db's address changed"
    );
    assert_eq!(
        std::fs::read(state.join("hosts/lb.crt")).unwrap(),
        lb_cert,
        "lb did not change"
    );
}

#[test]
fn certificates_verify_and_carry_names_and_roles() {
    let (tmp, inv) = scratch_inventory(&root().join("inventories/lab.yaml"));
    render(&inv, &tmp.path().join("out"));
    let state = tmp.path().join(".sagectl/lab");
    let ca = state.join("ca.crt");
    for host in ["lb", "db", "backend1"] {
        let cert = state.join(format!("hosts/{host}.crt"));
        let o = Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(&ca)
            .arg(&cert)
            .output()
            .unwrap();
        assert!(o.status.success(), "{host}: {}", text(&o).1);
        let o = Command::new("openssl")
            .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
            .arg(&cert)
            .output()
            .unwrap();
        let sans = text(&o).0;
        assert!(sans.contains(&format!("DNS:{host}")), "{sans}");
        assert!(sans.contains("DNS:firewall.role.sagectl.invalid"), "{sans}");
        match host {
            "lb" => assert!(
                !sans.contains("DNS:sagews.lab.test")
                    && sans.contains("DNS:loadbalancer.role.sagectl.invalid")
                    && sans.contains("IP Address:10.77.0.10"),
                "{sans}"
            ),
            "db" => assert!(
                sans.contains("DNS:database.role.sagectl.invalid")
                    && sans.contains("DNS:cache.role.sagectl.invalid")
                    && !sans.contains("backend.role"),
                "{sans}"
            ),
            _ => assert!(
                sans.contains("DNS:backend.role.sagectl.invalid")
                    && !sans.contains("sagews.lab.test"),
                "{sans}"
            ),
        }
    }
    // The public site: its own key, the public name only, for servers only.
    let site = state.join("site.crt");
    let o = Command::new("openssl")
        .args([
            "x509",
            "-noout",
            "-ext",
            "subjectAltName,extendedKeyUsage",
            "-in",
        ])
        .arg(&site)
        .output()
        .unwrap();
    let ext = text(&o).0;
    assert!(ext.contains("DNS:sagews.lab.test"), "{ext}");
    assert!(
        !ext.contains("role.sagectl") && !ext.contains("IP Address") && !ext.contains("Client"),
        "{ext}"
    );
    assert_ne!(
        std::fs::read(state.join("site.key")).unwrap(),
        std::fs::read(state.join("hosts/lb.key")).unwrap(),
        "the site has a key of its own"
    );
    let pem =
        std::fs::read_to_string(tmp.path().join("out/lb/etc/haproxy/certs/site.pem")).unwrap();
    assert!(pem.contains(&std::fs::read_to_string(&site).unwrap()));
    // The CA is a CA; host certificates are not.
    let o = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "basicConstraints", "-in"])
        .arg(&ca)
        .output()
        .unwrap();
    assert!(text(&o).0.contains("CA:TRUE"));
}

#[test]
fn half_a_ca_is_refused_not_replaced() {
    let (tmp, inv) = scratch_inventory(&root().join("inventories/lab.yaml"));
    render(&inv, &tmp.path().join("out"));
    let state = tmp.path().join(".sagectl/lab");
    std::fs::remove_file(state.join("ca.key")).unwrap();
    let o = sagectl()
        .arg("render")
        .arg(&inv)
        .arg("--out")
        .arg(tmp.path().join("out2"))
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("one of ca.crt and ca.key is missing"), "{err}");
    assert!(!state.join("ca.key").exists(), "no new CA key was made");
}

#[test]
fn no_secret_in_any_output() {
    let (tmp, inv) = scratch_inventory(&root().join("inventories/lab.yaml"));
    let mut printed = render(&inv, &tmp.path().join("out"));
    for args in [vec!["validate"], vec!["render", "--out"]] {
        let mut c = sagectl();
        c.arg(args[0]).arg(&inv);
        if args.len() > 1 {
            c.arg(args[1]).arg(tmp.path().join("again"));
        }
        let o = c.output().unwrap();
        let (a, b) = text(&o);
        printed.push_str(&a);
        printed.push_str(&b);
    }
    let o = sagectl().arg("vars").output().unwrap();
    printed.push_str(&text(&o).0);
    let state = tmp.path().join(".sagectl/lab");
    let secrets: std::collections::BTreeMap<String, String> =
        serde_json::from_str(&std::fs::read_to_string(state.join("secrets.json")).unwrap())
            .unwrap();
    for s in secrets.values() {
        assert_eq!(s.len(), 32);
        assert!(!printed.contains(s.as_str()));
    }
    assert!(!printed.contains("PRIVATE KEY"));
    // Debug output of a secret is redacted too.
    let st = sagews_testkit::pki::State::open_at(&state, "lab").unwrap();
    let dbg = format!("{:?}", st.secrets().unwrap());
    assert!(
        dbg.contains("<redacted>") && secrets.values().all(|s| !dbg.contains(s.as_str())),
        "{dbg}"
    );
}
