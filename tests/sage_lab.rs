//! Sage on a deployed worker (issue 14), as root on a lab machine: an inventory with
//! `worker.engine: sage` deploys (the worker role installs Debian's sagemath), the deploy's
//! health check runs `factor(2^64+1)` through the worker's protocol with a backend's
//! certificate, and a browser-protocol client through HAProxy runs Sage cells in a session
//! forked from the engine server.

use sagews_testkit::lab;

use std::path::Path;
use std::time::Instant;

use lab::{Down, require, sagectl, scratch_inventory, text};
use sagews_testkit::browser::{Site, Sockjs};

fn ssh(inv: &Path, argv: &[&str]) -> String {
    let o = sagectl()
        .args(["lab", "ssh"])
        .arg(inv)
        .arg("solo")
        .arg("--")
        .args(argv)
        .output()
        .unwrap();
    text(&o).0
}

#[test]
fn sage_deploys_and_runs_through_haproxy() {
    if !lab::is_root() {
        eprintln!("SKIPPED: needs root (lab machines)");
        return;
    }
    require("systemd-nspawn");
    let (tmp, inv) = scratch_inventory(&lab::fixtures().join("sage.yaml"));
    let _down = Down(inv.clone());
    let started = Instant::now();
    let (o, recap) = lab::up(&inv, &[]);
    assert!(o.status.success(), "up failed:\n{recap:#}\n{}", text(&o).1);
    eprintln!(
        "first deploy with Sage (machine, packages, sagemath): {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let checks = recap["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == "solo")
        .map(|h| h["checks"].to_string())
        .unwrap();
    assert!(
        checks.contains(r#""name":"engine","ok":true"#)
            && checks.contains("274177 * 67280421310721"),
        "{checks}"
    );
    // Through HAProxy as a browser: Sage cells in a session forked from the engine server.
    let site = Site {
        name: "sagews.sagetest.test".into(),
        addr: "10.86.0.10:443".parse().unwrap(),
        ca: tmp.path().join(".sagectl/sagetest/ca.crt"),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cookie = site.sign_up("sage-user", "a sage password").await;
        let mut s = Sockjs::open(&site, &cookie, "sagesession").await;
        let ws = s.create_and_open(1, "sage").await;
        let (out, status) = s.execute(3, &ws, "factor(2^64+1)").await;
        assert_eq!(
            (out.as_str(), status.as_str()),
            ("274177 * 67280421310721\n", "ok")
        );
        let (out, _) = s.execute(4, &ws, "R.<x> = QQ[]\n(x^4 - 1).factor()").await;
        assert_eq!(out, "(x - 1) * (x + 1) * (x^2 + 1)\n");
    });
    let metrics = ssh(
        &inv,
        &[
            "python3",
            "-c",
            "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:7001/metrics').read().decode())",
        ],
    );
    assert!(
        metrics.contains("sagews_worker_engine_server{mode=\"zygote\"} 1"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("sagews_worker_engines_started_total{how=\"forked\"} 0"),
        "the browser's session was forked from the engine server:\n{metrics}"
    );
}
