//! Inventories: the shipped ones validate; broken ones give every problem with file, line,
//! column, path and hint (snapshots), and the model resolves includes, overrides and groups.

mod common;

use std::net::IpAddr;

use common::{fixtures, root, sagectl, text};
use sagectl::inventory::{Inventory, Role};

#[test]
fn shipped_inventories_validate() {
    for name in ["lab.yaml", "example.yaml"] {
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
