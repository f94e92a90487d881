//! `sagectl status` on real lab machines, as root: on a healthy deployment it exits 0 and shows
//! every host reachable, every service active, no drift, the agents' figures and the last `up`;
//! with the worker agent stopped, HAProxy's config edited by hand and a machine killed, it names
//! each problem and exits 1; `--json` gives the same. Prints the wall time on the healthy lab.

use sagews_testkit::lab;

use std::path::Path;
use std::time::Instant;

use lab::{
    Down, host_entry as host, kill_file, require, sagectl, scratch_inventory, ssh, text, up,
};
use serde_json::Value;

/// `sagectl status INV ARGS`: the output, and the time it took.
fn status(inv: &Path, args: &[&str]) -> (std::process::Output, f64) {
    let t = Instant::now();
    let o = sagectl()
        .arg("status")
        .arg(inv)
        .args(args)
        .output()
        .unwrap();
    (o, t.elapsed().as_secs_f64())
}

fn json(inv: &Path) -> (std::process::Output, Value) {
    let (o, _) = status(inv, &["--json"]);
    let v = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("no JSON ({e}):\n{}\n{}", text(&o).0, text(&o).1));
    (o, v)
}

fn figure(h: &Value, group: &str, name: &str) -> Value {
    h["figures"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["group"] == group && f["name"] == name)
        .unwrap_or_else(|| panic!("no figure {group} {name} in {h}"))["value"]
        .clone()
}

#[test]
fn status_of_a_lab_deployment() {
    require("systemd-nspawn");
    let (_tmp, inv) = scratch_inventory(&lab::fixtures().join("status3.yaml"));
    let _down = Down(inv.clone());
    let (o, recap) = up(&inv, &[]);
    assert!(o.status.success(), "up failed: {recap}");

    // Healthy: exit 0, everything reachable, active and as rendered.
    let (o, r) = json(&inv);
    assert!(o.status.success(), "{r:#}");
    assert_eq!(r["ok"], true, "{r:#}");
    assert_eq!(r["problems"], serde_json::json!([]), "{r:#}");
    for name in ["alpha", "bravo", "charlie"] {
        let h = host(&r, name);
        assert_eq!(h["reachable"], true, "{h:#}");
        assert!(h["error"].is_null(), "{h:#}");
        let services = h["services"].as_object().unwrap();
        assert!(services.contains_key("nftables"), "{h:#}");
        assert!(services.values().all(|s| s == "active"), "{h:#}");
        assert_eq!(h["drift"], serde_json::json!([]), "{h:#}");
        assert!(h["files_checked"].as_u64().unwrap() > 2, "{h:#}");
    }
    let (alpha, bravo, charlie) = (host(&r, "alpha"), host(&r, "bravo"), host(&r, "charlie"));
    assert_eq!(bravo["agent"]["same"], true, "{bravo:#}");
    assert_eq!(charlie["agent"]["same"], true, "{charlie:#}");
    assert_eq!(figure(bravo, "worker", "sessions open"), 0, "{bravo:#}");
    assert_eq!(figure(bravo, "backends", "by"), "alpha", "{bravo:#}");
    assert_eq!(figure(alpha, "backend", "healthy workers"), 1, "{alpha:#}");
    assert_eq!(figure(alpha, "backend", "draining workers"), 0, "{alpha:#}");
    assert!(
        figure(alpha, "postgres", "connections").as_u64().unwrap() >= 1,
        "{alpha:#}"
    );
    assert!(
        figure(alpha, "postgres", "sagews size").as_u64().unwrap() > 1_000_000,
        "{alpha:#}"
    );
    let logs = sagectl()
        .arg("logs")
        .arg(&inv)
        .args(["--grep", "sagectl up"])
        .output()
        .unwrap();
    println!("sagectl logs --grep 'sagectl up':\n{}", text(&logs).0);
    assert!(r["last_up"]["when"].is_string(), "{:#}", r["last_up"]);
    assert!(
        r["last_up"]["changed"]["alpha"].as_u64().unwrap_or(0) > 0,
        "{:#}",
        r["last_up"]
    );
    assert!(r["last_up"]["user"].is_string(), "{:#}", r["last_up"]);

    // The text, timed (the goal, 0.5 s for five hosts, is measured by `sagectl bench status`).
    let mut times = Vec::new();
    let mut out = String::new();
    for _ in 0..5 {
        let (o, secs) = status(&inv, &["--timing"]);
        assert!(o.status.success(), "{}\n{}", text(&o).0, text(&o).1);
        out = text(&o).0;
        times.push(secs);
    }
    times.sort_by(f64::total_cmp);
    println!("{out}");
    println!(
        "status on 3 lab hosts (debug build), 5 runs: min {:.3} s, median {:.3} s, max {:.3} s",
        times[0], times[2], times[4]
    );
    assert!(
        out.contains("statustest: 3 hosts, 3 reachable, 0 problems: OK"),
        "{out}"
    );

    // A stopped worker agent, a hand-edited HAProxy config, a machine gone.
    ssh(&inv, "bravo", &["systemctl", "stop", "sage-worker"]);
    ssh(
        &inv,
        "alpha",
        &[
            "sh",
            "-c",
            "echo '# edited by hand' >> /etc/haproxy/haproxy.cfg",
        ],
    );
    std::fs::write(kill_file("statustest-charlie"), "1").unwrap();
    let (o, secs) = status(&inv, &[]);
    let (stdout, stderr) = text(&o);
    println!("{stdout}");
    assert_eq!(o.status.code(), Some(1), "{stdout}\n{stderr}");
    for p in [
        "PROBLEM   bravo: sage-worker is inactive",
        "PROBLEM   alpha: /etc/haproxy/haproxy.cfg changed (differs from what would be rendered now)",
        "PROBLEM   charlie: unreachable: ",
    ] {
        assert!(stdout.contains(p), "{p:?} not in:\n{stdout}");
    }
    assert!(stdout.contains("3 problems: NOT OK"), "{stdout}");
    assert!(
        secs < 10.0,
        "a host down must not hold status up: {secs:.1} s"
    );

    let (o, r) = json(&inv);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(r["ok"], false);
    assert_eq!(r["problems"].as_array().unwrap().len(), 3, "{r:#}");
    assert_eq!(host(&r, "charlie")["reachable"], false);
    assert_eq!(host(&r, "bravo")["services"]["sage-worker"], "inactive");
    assert_eq!(
        host(&r, "alpha")["drift"],
        serde_json::json!([{"path": "/etc/haproxy/haproxy.cfg", "what": "changed"}])
    );
    assert!(
        r["last_up"]["unavailable"].is_string(),
        "{:#}",
        r["last_up"]
    );
}
