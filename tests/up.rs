//! `sagectl up` on real lab machines, as root: a fresh deploy passes every health check; a
//! second run changes nothing and restarts nothing; a changed variable shows its exact diff
//! under --check, then changes one file and restarts one service; a broken HAProxy variable is
//! refused by haproxy -c while the old config keeps serving; a machine gone mid-run is reported
//! unreachable and converged once back; a changed host key is refused with both fingerprints;
//! and the quoting helper carries a hostile path over SSH intact.

use sagews_testkit::lab;

use std::path::Path;
use std::time::{Duration, Instant};

use lab::{
    Down, host_entry as host, kill_file, require, sagectl, scratch_inventory, ssh, text, up,
};
use serde_json::Value;

/// `up --limit h`, which must fail on `h`: its error.
fn failure(inv: &Path, h: &str) -> String {
    let (o, recap) = up(inv, &["--limit", h]);
    assert!(!o.status.success(), "{recap}");
    host(&recap, h)["error"].as_str().unwrap().to_string()
}

/// When each unit last became active (monotonic µs), to tell whether a run restarted it.
fn started_at(inv: &Path, h: &str, units: &[&str]) -> Vec<String> {
    units
        .iter()
        .map(|u| {
            let v = ssh(
                inv,
                h,
                &[
                    "systemctl",
                    "show",
                    "-p",
                    "ActiveEnterTimestampMonotonic",
                    "--value",
                    u,
                ],
            )
            .trim()
            .to_string();
            assert!(
                v.parse::<u64>().is_ok_and(|t| t > 0),
                "{u} on {h} was never active: {v:?}"
            );
            v
        })
        .collect()
}

fn set_var(inv: &Path, from: &str, to: &str) {
    let t = std::fs::read_to_string(inv).unwrap();
    assert!(t.contains(from), "{from} not in the inventory");
    std::fs::write(inv, t.replace(from, to)).unwrap();
}

const ALPHA_UNITS: [&str; 5] = [
    "haproxy",
    "nginx",
    "postgresql@15-main",
    "memcached",
    "nftables",
];

/// One lab of three machines carrying every role, and the scenarios `up` must get right, in
/// order: each starts from the state the previous one left, and a failure names its scenario.
#[test]
fn converge_lab_hosts() {
    require("ip");
    let (_tmp, inv) = scratch_inventory(&lab::fixtures().join("up3.yaml"));
    let _down = Down(inv.clone());
    let inv = inv.as_path();
    scenario("a fresh deploy is up, healthy and recorded", || {
        a_fresh_deploy_is_up_healthy_and_recorded(inv)
    });
    let published = scenario("a published file survives the backends", || {
        publish_survives_the_backends(inv)
    });
    scenario("the web edge as an outsider sees it", || {
        web_edge(inv, &published)
    });
    scenario("the firewall is exactly the design", || {
        firewall_is_exactly_the_design(inv)
    });
    scenario("sshd is hardened and cannot lock sagectl out", || {
        sshd_is_hardened_and_cannot_lock_sagectl_out(inv)
    });
    scenario("a second run changes nothing", || {
        a_second_run_changes_nothing(inv)
    });
    scenario("a changed variable is shown, then applied alone", || {
        a_changed_variable_is_shown_then_applied_alone(inv)
    });
    scenario(
        "a value the tool cannot take is refused at validation",
        || a_value_the_tool_cannot_take_is_refused_at_validation(inv),
    );
    scenario("a file the host's tool refuses is never installed", || {
        a_file_the_hosts_tool_refuses_is_never_installed(inv)
    });
    scenario("a machine that dies mid-run", || {
        a_machine_that_dies_mid_run_is_unreachable_then_converged_again(inv)
    });
    scenario("quoting round-trips over SSH", || quoting_round_trip(inv));
    scenario(
        "add-worker grows the pool, touching only what it concerns; remove-worker moves its sessions",
        || add_worker_grows_the_pool(inv),
    );
    scenario("the firewall is still exactly the design", || {
        firewall_is_exactly_the_design(inv)
    });
    // Last: it leaves charlie with a host key sagectl refuses.
    scenario("a changed host key is refused", || {
        a_changed_host_key_is_refused(inv)
    });
}

/// Sessions open on `h`'s worker (its metrics page).
fn sessions_open(inv: &Path, h: &str) -> u64 {
    let metrics = ssh(
        inv,
        h,
        &[
            "python3",
            "-c",
            "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:7001/metrics').read().decode())",
        ],
    );
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("sagews_worker_sessions_open "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no sessions_open on {h}:\n{metrics}")) as u64
}

/// `sagectl add-worker` and `remove-worker` (issue 16): a new lab machine; only the hosts whose
/// files mention workers are contacted (the recap, and the untouched worker's sshd log); the
/// backend registers it and, with the other worker drained, places a workspace on it; run
/// again, nothing changes. Removed with workspaces open on it: they are saved and moved (the
/// browser is told), nothing written is lost, the hosts that mentioned it are converged.
fn add_worker_grows_the_pool(inv: &Path) {
    // SSH logins bravo's sshd accepted so far (this query's own included).
    let logins = || {
        let log = ssh(inv, "bravo", &["journalctl", "-u", "ssh", "-o", "cat"]);
        log.lines().filter(|l| l.starts_with("Accepted")).count()
    };
    let before = logins();
    let add = || {
        let started = Instant::now();
        let o = sagectl()
            .args(["add-worker"])
            .arg(inv)
            .args(["delta", "--address", "10.81.0.13", "--json"])
            .output()
            .unwrap();
        let (out, err) = text(&o);
        assert!(o.status.success(), "add-worker:\n{out}\n{err}");
        let recap: Value = serde_json::from_str(&out).unwrap();
        (recap, err, started.elapsed())
    };
    let (recap, err, took) = add();
    eprintln!(
        "add-worker (a new lab machine included): {:.1}s",
        took.as_secs_f64()
    );
    let names: Vec<&str> = recap["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["host"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alpha", "charlie", "delta"], "{err}");
    assert!(
        err.contains("converging alpha: its /etc/nftables.conf mention delta"),
        "{err}"
    );
    assert!(err.contains("1 other hosts are not contacted"), "{err}");
    assert!(
        err.contains("delta is registered with every backend (alpha)"),
        "{err}"
    );
    let file = inv.parent().unwrap().join("up3.d/delta.yaml");
    let written = std::fs::read_to_string(&file).unwrap();
    assert!(
        written.contains("delta:\n    address: 10.81.0.13\n    roles: [worker]"),
        "{written}"
    );
    // bravo was not logged into: the next query is the only login since the last.
    assert_eq!(logins(), before + 1, "add-worker logged into bravo");
    // Again: nothing changes.
    let (recap, err, _) = add();
    for h in recap["hosts"].as_array().unwrap() {
        assert_eq!(h["changed"], 0, "{h}\n{err}");
    }
    // The backend places sessions on the new worker too: with bravo drained (sagectl drain),
    // a workspace can only go to delta; then bravo is undrained.
    let drain = |verb: &str| {
        let o = sagectl().arg(verb).arg(inv).arg("bravo").output().unwrap();
        let (out, err) = text(&o);
        assert!(o.status.success(), "{verb} bravo:\n{out}\n{err}");
        err
    };
    let err = drain("drain");
    assert!(err.contains("bravo takes no new sessions"), "{err}");
    // The backend hears of it at bravo's next heartbeat (5 s).
    std::thread::sleep(Duration::from_secs(6));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let site = site(inv);
    rt.block_on(async {
        let cookie = site.sign_up("pool-user", "a pool password").await;
        let mut s = sagews_testkit::browser::Sockjs::open(&site, &cookie, "poolsession").await;
        let b = s.create_and_open(3, "pool-b").await;
        drain("undrain");
        let until = Instant::now() + Duration::from_secs(6);
        while Instant::now() < until {
            s.poll().await;
        }
        let a = s.create_and_open(1, "pool-a").await;
        let mut id = 10;
        for ws in [&a, &b] {
            let code = format!("print(6 * 7)\n_ = open('note.txt', 'w').write('written in {ws}')");
            let (out, _) = s.execute(id, ws, &code).await;
            assert_eq!(out.trim(), "42");
            id += 1;
        }
        // b went to delta (bravo was drained); a to the least loaded of the two.
        let placed = (sessions_open(inv, "bravo"), sessions_open(inv, "delta"));
        if placed.1 == 0 || placed.0 + placed.1 != 2 {
            let log = backend_log(inv, 40);
            panic!("a workspace on delta, two in all, not {placed:?}; the backend's log:\n{log}");
        }
        // remove-worker (issue 16): the workspaces on delta are saved and moved while the
        // browser keeps polling; nothing written is lost.
        let remove = std::thread::spawn({
            let inv = inv.to_path_buf();
            move || {
                sagectl()
                    .arg("remove-worker")
                    .arg(&inv)
                    .args(["delta", "--json", "--timeout", "90"])
                    .output()
                    .unwrap()
            }
        });
        while !remove.is_finished() {
            s.poll().await;
        }
        let o = remove.join().unwrap();
        let (out, err) = text(&o);
        if !o.status.success() {
            let log = backend_log(inv, 80);
            panic!("remove-worker:\n{out}\n{err}\nthe backend's log:\n{log}");
        }
        eprintln!("remove-worker:\n{err}");
        let recap: Value = serde_json::from_str(&out).unwrap();
        let names: Vec<&str> = recap["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["host"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["alpha", "charlie"], "{err}");
        assert!(!file.exists(), "delta's file is gone");
        let moved = s.take(|v| v["event"] == "moved", "a moved event").await;
        let ws = moved["workspace"].as_str().unwrap().to_string();
        assert!(ws == a || ws == b, "{moved}");
        for ws in [&a, &b] {
            let (out, status) = s.execute(id, ws, "print(open('note.txt').read())").await;
            assert_eq!(
                (out.trim(), status.as_str()),
                (format!("written in {ws}").as_str(), "ok")
            );
            id += 1;
        }
        assert_eq!(
            sessions_open(inv, "bravo"),
            2,
            "both workspaces on bravo now"
        );
    });
}

/// The last `lines` of alpha's backend journal (for a failure's message).
fn backend_log(inv: &Path, lines: u32) -> String {
    let n = lines.to_string();
    ssh(
        inv,
        "alpha",
        &[
            "journalctl",
            "-u",
            "sage-backend",
            "-n",
            &n,
            "--no-pager",
            "-o",
            "cat",
        ],
    )
}

/// Runs one scenario of a lab test; its failure is reported under its name.
fn scenario<T>(name: &str, f: impl FnOnce() -> T) -> T {
    eprintln!("== scenario: {name}");
    let started = Instant::now();
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(v) => {
            eprintln!(
                "== scenario passed in {:.1}s: {name}",
                started.elapsed().as_secs_f64()
            );
            v
        }
        Err(e) => {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("scenario `{name}` failed: {msg}")
        }
    }
}

/// A fresh deploy: lab machines are made first, then every role is up and healthy, the worker's unit exposes little, and the run is recorded in logd.
fn a_fresh_deploy_is_up_healthy_and_recorded(inv: &Path) {
    // A fresh deploy: lab machines are made first, then every infrastructure role is up and healthy.
    let started = Instant::now();
    let (o, recap) = up(inv, &[]);
    let first = started.elapsed();
    assert!(
        o.status.success(),
        "first up failed:\n{}\n{}",
        serde_json::to_string_pretty(&recap).unwrap(),
        text(&o).1
    );
    let checks: Vec<String> = host(&recap, "alpha")["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| format!("{}={}", c["name"].as_str().unwrap(), c["ok"]))
        .collect();
    assert_eq!(
        checks,
        [
            "firewall=true",
            "haproxy redirect=true",
            "haproxy https + nginx=true",
            "backend through haproxy=true",
            "backend workers=true",
            "postgresql from backend=true",
            "memcached from backend=true"
        ]
    );
    // The recap says how to open the site from this box.
    let site = &recap["site"];
    assert_eq!(site["url"], "https://sagews.uptest.test/", "{recap}");
    assert_eq!(site["addresses"], serde_json::json!(["10.81.0.10"]));
    assert_eq!(site["lab"], true);
    assert!(
        Path::new(site["ca_file"].as_str().unwrap()).is_file(),
        "{site}"
    );
    // The worker's unit exposes little: `systemd-analyze security` at most 4.0 (issue 13).
    let report = ssh(
        inv,
        "bravo",
        &["systemd-analyze", "security", "sage-worker", "--no-pager"],
    );
    let score: f64 = report
        .lines()
        .find_map(|l| l.split("sage-worker.service: ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no score in:\n{report}"));
    eprintln!("systemd-analyze security sage-worker: {score}");
    assert!(score <= 4.0, "sage-worker's exposure {score}:\n{report}");
    // The worker agent runs, with a cgroup per session (v1 controllers on this box's lab
    // machines: see ARCHITECTURE.md §8).
    let checks = host(&recap, "bravo")["checks"].to_string();
    assert!(checks.contains(r#""name":"worker","ok":true"#), "{checks}");
    assert!(
        checks.contains("sessions: a cgroup1 cgroup per session")
            || checks.contains("sessions: a cgroup2 cgroup per session"),
        "{checks}"
    );
    // logd runs and answers queries; the run was recorded in it (who, what changed).
    let checks = host(&recap, "charlie")["checks"].to_string();
    assert!(checks.contains(r#""name":"logd","ok":true"#), "{checks}");
    let audit = recap["audit"].as_str().unwrap_or("");
    assert_eq!(audit, "recorded in logd on charlie", "{recap}");
    let o = sagectl()
        .args(["logs"])
        .arg(inv)
        .args(["--since", "10m", "--grep", "ran sagectl up"])
        .output()
        .unwrap();
    let (logs, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        logs.contains("sagectl info  sagectl::up: root ran sagectl up on uptest:"),
        "{logs}"
    );
    eprintln!(
        "first deploy of 3 lab hosts (machines included): {:.1}s",
        first.as_secs_f64()
    );
}

/// A second run changes nothing and restarts nothing.
fn a_second_run_changes_nothing(inv: &Path) {
    // A second run changes nothing and restarts nothing.
    let before = started_at(inv, "alpha", &ALPHA_UNITS);
    let (o, recap) = up(inv, &[]);
    assert!(o.status.success(), "second run: {recap}");
    for h in recap["hosts"].as_array().unwrap() {
        assert_eq!(
            h["changed"], 0,
            "{} changed on a second run: {h}",
            h["host"]
        );
        assert_eq!(h["handlers"].as_array().unwrap().len(), 0, "{h}");
    }
    assert_eq!(
        started_at(inv, "alpha", &ALPHA_UNITS),
        before,
        "a no-op run restarted a service"
    );
}

/// A changed variable: `--check --diff` shows exactly that change and changes nothing; `up` then changes that file alone and restarts only its service.
fn a_changed_variable_is_shown_then_applied_alone(inv: &Path) {
    // A changed variable: --check --diff shows exactly that change and changes nothing.
    set_var(inv, "memcached_memory_mb: 64", "memcached_memory_mb: 96");
    let o = sagectl()
        .arg("up")
        .arg(inv)
        .args(["--check", "--diff"])
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    let diff: Vec<&str> = err
        .lines()
        .filter(|l| {
            (l.starts_with('-') || l.starts_with('+'))
                && !l.starts_with("---")
                && !l.starts_with("+++")
        })
        .collect();
    assert_eq!(diff, vec!["--m 64", "+-m 96"], "the diff:\n{err}");
    assert!(
        err.contains("--- alpha:/etc/memcached.conf (on the host)"),
        "{err}"
    );
    assert!(
        out.contains("memcached.conf: update /etc/memcached.conf"),
        "{out}"
    );
    assert!(
        ssh(inv, "alpha", &["cat", "/etc/memcached.conf"]).contains("-m 64\n"),
        "--check changed the file"
    );
    // ... then up changes that file alone and restarts only memcached.
    let before = started_at(inv, "alpha", &ALPHA_UNITS);
    let (o, recap) = up(inv, &[]);
    assert!(o.status.success());
    assert_eq!(host(&recap, "alpha")["changed"], 1);
    assert_eq!(
        host(&recap, "alpha")["handlers"],
        serde_json::json!(["restart memcached"])
    );
    for h in ["bravo", "charlie"] {
        assert_eq!(host(&recap, h)["changed"], 0);
    }
    let after = started_at(inv, "alpha", &ALPHA_UNITS);
    for (i, u) in ALPHA_UNITS.iter().enumerate() {
        assert_eq!(
            before[i] != after[i],
            *u == "memcached",
            "{u}: before {} after {}",
            before[i],
            after[i]
        );
    }
}

/// A value HAProxy cannot take is refused at validation, before any host is contacted.
fn a_value_the_tool_cannot_take_is_refused_at_validation(inv: &Path) {
    // A value HAProxy cannot take is refused at validation, before any host is contacted.
    set_var(
        inv,
        "memcached_memory_mb: 96",
        "memcached_memory_mb: 96\n  haproxy_tunnel_timeout: \"1fortnight\"",
    );
    let o = sagectl().arg("up").arg(inv).output().unwrap();
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("vars.haproxy_tunnel_timeout: `1fortnight` is not a duration")
            && !err.contains("alpha"),
        "{err}"
    );
    set_var(inv, "\n  haproxy_tunnel_timeout: \"1fortnight\"", "");
}

/// A file the host's own tool refuses is never installed; the old config keeps serving.
fn a_file_the_hosts_tool_refuses_is_never_installed(inv: &Path) {
    // A file the host's own tool refuses (a valid value, but this host's haproxy says no: a
    // stand-in that refuses every check) is never installed; the old config keeps serving.
    ssh(
        inv,
        "alpha",
        &[
            "sh",
            "-c",
            "mv /usr/sbin/haproxy /usr/sbin/haproxy.real && printf '#!/bin/sh\\necho \"[ALERT] this host refuses the file\" >&2\\nexit 1\\n' > /usr/sbin/haproxy && chmod +x /usr/sbin/haproxy",
        ],
    );
    set_var(
        inv,
        "memcached_memory_mb: 96",
        "memcached_memory_mb: 96\n  haproxy_tunnel_timeout: \"2h\"",
    );
    let (o, recap) = up(inv, &["--limit", "loadbalancer"]);
    ssh(
        inv,
        "alpha",
        &["mv", "/usr/sbin/haproxy.real", "/usr/sbin/haproxy"],
    );
    assert!(!o.status.success());
    let alpha = host(&recap, "alpha");
    assert_eq!(alpha["failed"], true);
    let e = alpha["error"].as_str().unwrap();
    assert!(
        e.contains("haproxy refused the new /etc/haproxy/haproxy.cfg")
            && e.contains("this host refuses the file"),
        "{e}"
    );
    assert!(
        ssh(
            inv,
            "alpha",
            &["grep", "timeout tunnel", "/etc/haproxy/haproxy.cfg"]
        )
        .contains("1h")
    );
    let page = ssh(
        inv,
        "alpha",
        &[
            "curl",
            "-sS",
            "--cacert",
            "/etc/haproxy/certs/ca.crt",
            "--resolve",
            "sagews.uptest.test:443:127.0.0.1",
            "https://sagews.uptest.test/",
        ],
    );
    assert!(
        page.contains("Sage workspaces"),
        "HAProxy stopped serving: {page}"
    );
    set_var(inv, "\n  haproxy_tunnel_timeout: \"2h\"", "");
}

/// A machine that dies mid-run: the others finish, it is unreachable, the exit code says so; back, it is converged from scratch.
fn a_machine_that_dies_mid_run_is_unreachable_then_converged_again(inv: &Path) {
    // A machine that dies mid-run: the others finish, it is unreachable, the exit code says so.
    let bravo_cgroup = kill_file("uptest-bravo");
    set_var(inv, "memcached_memory_mb: 96", "memcached_memory_mb: 80");
    let mut child = sagectl()
        .arg("up")
        .arg(inv)
        .arg("--json")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Killed once the run is past starting the lab (which would start a dead machine again),
    // while it converges: whatever step bravo is at, it is lost under the run.
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
            let line = line.unwrap_or_default();
            if line.contains("machines up") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    rx.recv_timeout(Duration::from_secs(120))
        .expect("the run started the lab");
    std::fs::write(&bravo_cgroup, "1").unwrap();
    let o = child.wait_with_output().unwrap();
    let err = reader.join().unwrap();
    assert!(
        !o.status.success(),
        "the run succeeded with bravo killed:\n{err}"
    );
    let recap: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(!o.status.success());
    assert_eq!(host(&recap, "bravo")["unreachable"], true, "{recap}");
    for h in ["alpha", "charlie"] {
        assert_eq!(host(&recap, h)["failed"], false, "{h} must finish: {recap}");
        assert_eq!(host(&recap, h)["unreachable"], false);
    }
    assert_eq!(
        host(&recap, "alpha")["changed"],
        1,
        "alpha finished its change"
    );
    // Back (remade by `up`, which brings the lab up first): converged from scratch.
    let (o, recap) = up(inv, &[]);
    assert!(o.status.success(), "after the machine came back: {recap}");
    assert!(
        host(&recap, "bravo")["changed"].as_u64().unwrap() > 5,
        "bravo was converged again: {recap}"
    );
}

/// A host key that changed behind our back is refused, naming both fingerprints.
fn a_changed_host_key_is_refused(inv: &Path) {
    // A host key that changed behind our back is refused, naming both fingerprints.
    ssh(
        inv,
        "charlie",
        &[
            "sh",
            "-c",
            "rm -f /etc/ssh/ssh_host_* && ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key && systemctl restart ssh",
        ],
    );
    let e = failure(inv, "charlie");
    assert!(
        e.contains("HOST KEY CHANGED for charlie (10.81.0.12): pinned SHA256:")
            && e.contains(", offered SHA256:"),
        "{e}"
    );
    let offered = e
        .split("offered ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    let pinned = e
        .split("pinned ")
        .nth(1)
        .unwrap()
        .split(", offered")
        .next()
        .unwrap();
    assert!(
        !pinned.contains(offered),
        "the offered key differs from every pinned one: {e}"
    );
}

/// HTTPS to the lab's HAProxy (alpha) as a browser: the deployment's CA, the public name.
async fn https(
    inv: &Path,
    method: &str,
    path: &str,
    cookie: &str,
    body: &[u8],
) -> sagews_wire::http1::Response {
    site(inv).json(method, path, cookie, body).await
}

/// The lab's site as a browser sees it.
fn site(inv: &Path) -> sagews_testkit::browser::Site {
    sagews_testkit::browser::Site {
        name: "sagews.uptest.test".into(),
        addr: "10.81.0.10:443".parse().unwrap(),
        ca: inv.parent().unwrap().join(".sagectl/uptest/ca.crt"),
    }
}

/// HTTPS to the lab's HAProxy with the given headers.
async fn https_with(
    inv: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> sagews_wire::http1::Response {
    site(inv).https(method, path, headers, body).await
}

/// Headers on real responses through HAProxy, no listing of /pub/, foreign origins refused,
/// HAProxy's sign-in rate limit, and a public certificate that names the site only.
fn web_edge(inv: &Path, published: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for path in ["/", "/api/health", "/sockjs/info", "/nothing-here"] {
            let r = https_with(inv, "GET", path, &[], b"").await;
            let h = |n: &str| r.header(n).unwrap_or("").to_string();
            let csp = h("content-security-policy");
            assert!(
                csp.contains("default-src 'self'") && csp.contains("frame-ancestors 'none'"),
                "{path}: CSP {csp:?}"
            );
            assert_eq!(h("x-frame-options"), "DENY", "{path}");
            assert_eq!(h("x-content-type-options"), "nosniff", "{path}");
            assert!(
                h("strict-transport-security").contains("max-age="),
                "{path}"
            );
            assert_eq!(h("referrer-policy"), "same-origin", "{path}");
        }
        // Published files keep nginx's stricter sandbox policy; no directory is listed.
        let r = https_with(inv, "GET", published, &[], b"").await;
        assert_eq!(r.status, 200, "{published}");
        let csp = r.header("content-security-policy").unwrap_or("");
        assert!(csp.starts_with("sandbox"), "{csp}");
        let dir = &published[..published.rfind('/').unwrap() + 1];
        for listing in ["/pub/", dir] {
            let r = https_with(inv, "GET", listing, &[], b"").await;
            assert!(
                r.status == 403 || r.status == 404,
                "{listing}: {} {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            );
        }
        // Another site's page cannot use the backends.
        let r = https_with(
            inv,
            "GET",
            "/sockjs/info",
            &[("Origin", "https://evil.example")],
            b"",
        )
        .await;
        assert_eq!(r.status, 403);
        // HAProxy's rate of sign-in requests per address: refused past it, with Retry-After.
        let mut limited = None;
        for i in 0..40 {
            let r = https_with(
                inv,
                "POST",
                "/api/signin",
                &[("Content-Type", "application/json")],
                b"not json",
            )
            .await;
            if r.status == 429 {
                limited = Some((i, r.header("retry-after").map(str::to_string)));
                break;
            }
            assert_eq!(r.status, 400, "request {i}");
        }
        let (n, retry) = limited.expect("HAProxy limits sign-in requests");
        // 20 in 10 s pass (fewer when the earlier sign-up is still in the window).
        assert!((15..=20).contains(&n), "refused after {n}");
        assert_eq!(retry.as_deref(), Some("10"));
    });
    // The certificate browsers see: the public name only (no host name, role or address),
    // and another key than HAProxy's own identity.
    let o = std::process::Command::new("sh")
        .args([
            "-c",
            "openssl s_client -connect 10.81.0.10:443 -servername sagews.uptest.test </dev/null 2>/dev/null | openssl x509 -noout -ext subjectAltName -pubkey",
        ])
        .output()
        .unwrap();
    let (cert, _) = text(&o);
    assert!(cert.contains("DNS:sagews.uptest.test"), "{cert}");
    assert!(
        !cert.contains("alpha") && !cert.contains("role.sagectl") && !cert.contains("IP Address"),
        "{cert}"
    );
    let host_pub = ssh(
        inv,
        "alpha",
        &[
            "openssl",
            "x509",
            "-noout",
            "-pubkey",
            "-in",
            "/etc/haproxy/certs/host.pem",
        ],
    );
    assert!(
        !cert.contains(host_pub.trim()),
        "the site has a key of its own"
    );
}

/// sshd takes keys only, forwards nothing; a setting that would lock sagectl out is put back
/// after a fresh login fails, and the host stays reachable.
fn sshd_is_hardened_and_cannot_lock_sagectl_out(inv: &Path) {
    let eff = ssh(inv, "alpha", &["sshd", "-T"]);
    for want in [
        "passwordauthentication no",
        "permitrootlogin without-password",
        "x11forwarding no",
        "allowtcpforwarding no",
        "allowagentforwarding no",
    ] {
        assert!(eff.lines().any(|l| l == want), "{want} in\n{eff}");
    }
    // A password login is not even offered.
    let o = std::process::Command::new("ssh")
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "PreferredAuthentications=password,keyboard-interactive",
            "-o",
            "PubkeyAuthentication=no",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=5",
            "root@10.81.0.11",
            "true",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        text(&o).1.contains("Permission denied (publickey)"),
        "{}",
        text(&o).1
    );
    // A valid sshd setting that refuses root: sshd -t accepts it, the fresh login fails, the
    // previous file is put back, and the next run still gets in.
    set_var(
        inv,
        "memcached_memory_mb: 64",
        "memcached_memory_mb: 64\n  ssh_allow_users: [nobody]",
    );
    let e = failure(inv, "charlie");
    assert!(
        e.contains("a fresh login failed") && e.contains("was put back"),
        "{e}"
    );
    assert!(
        !ssh(
            inv,
            "charlie",
            &["cat", "/etc/ssh/sshd_config.d/50-sagectl.conf"]
        )
        .contains("AllowUsers"),
        "the previous settings are back"
    );
    set_var(inv, "\n  ssh_allow_users: [nobody]", "");
    let (o, recap) = up(inv, &["--limit", "charlie"]);
    assert!(o.status.success(), "{recap}");
}

/// Returns the published file's path (`/pub/<id>/<name>`).
fn publish_survives_the_backends(inv: &Path) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let site = site(inv);
    let path = rt.block_on(async {
        let cookie = site.sign_up("lab-user", "a lab password").await;
        let mut s = sagews_testkit::browser::Sockjs::open(&site, &cookie, "labsession").await;
        let ws = s.create_and_open(1, "lab").await;
        s.call(
            3,
            serde_json::json!({"op": "execute", "workspace": ws,
            "code": "open('index.txt', 'w').write('published from the lab')"}),
        )
        .await;
        let p = s
            .call(4, serde_json::json!({"op": "publish", "workspace": ws}))
            .await;
        assert_eq!(
            p["url"],
            format!("https://sagews.uptest.test/pub/{ws}/"),
            "{p}"
        );
        ssh(inv, "alpha", &["systemctl", "stop", "sage-backend"]);
        let r = https(inv, "GET", &format!("/pub/{ws}/index.txt"), "", b"").await;
        assert_eq!(
            (r.status, String::from_utf8_lossy(&r.body).to_string()),
            (200, "published from the lab".to_string()),
            "served by nginx with the backend stopped"
        );
        let r = https(inv, "GET", "/api/health", "", b"").await;
        assert_eq!(r.status, 503, "no backend is up");
        format!("/pub/{ws}/index.txt")
    });
    ssh(inv, "alpha", &["systemctl", "start", "sage-backend"]);
    // Back in HAProxy once its health check sees it.
    let deadline = Instant::now() + Duration::from_secs(60);
    while rt
        .block_on(https(inv, "GET", "/api/health", "", b""))
        .status
        != 200
    {
        assert!(Instant::now() < deadline, "the backend did not come back");
        std::thread::sleep(Duration::from_millis(250));
    }
    path
}

fn quoting_round_trip(inv: &Path) {
    use sagectl::ssh::{HostKeyPolicy, Session, Target};
    let state = inv.parent().unwrap().join(".sagectl/uptest");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let target = Target {
            host: "alpha".into(),
            addr: "10.81.0.10:22".parse().unwrap(),
            user: "root".into(),
            identity: Some(state.join("lab/id_ed25519")),
        };
        let known = std::sync::Arc::new(sagectl::hostkeys::KnownHosts::new(
            state.join("known_hosts"),
        ));
        let s = Session::connect(&target, known, HostKeyPolicy::Strict)
            .await
            .unwrap();
        let dir = "/tmp/q dir 'single' \"double\" $HOME `id` $(id) \\ ; & | * ? [x] ~ # !\nnewline";
        let path = format!("{dir}/file name.txt");
        let content = b"content with 'quotes' and $vars\n";
        let o = s
            .run(&["mkdir", "-p", dir], b"", Duration::from_secs(10))
            .await
            .unwrap();
        assert!(o.ok(), "{}", o.tail());
        let o = s
            .run(
                &["sh", "-c", "cat > \"$1\"", "sh", &path],
                content,
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        assert!(o.ok(), "{}", o.tail());
        let o = s
            .run(&["cat", &path], b"", Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(o.stdout, content);
        // The directory really has that name (one entry, not several words).
        let o = s
            .run(
                &[
                    "find",
                    "/tmp",
                    "-maxdepth",
                    "1",
                    "-name",
                    "q dir*",
                    "-print0",
                ],
                b"",
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        assert_eq!(o.stdout, format!("{dir}\0").into_bytes());
        let o = s
            .run(&["rm", "-rf", dir], b"", Duration::from_secs(10))
            .await
            .unwrap();
        assert!(o.ok());
        s.close().await;
    });
}

/// Who may open a connection to a role's port, as ARCHITECTURE §1 draws it (with the
/// inventory's default ports): the arrows, browsers to the web edge, and the administrators'
/// SSH, audit records and log queries.
enum From {
    Anyone,
    Admin,
    Role(&'static str),
}

const ARROWS: &[(&str, u16, From)] = &[
    ("loadbalancer", 80, From::Anyone),
    ("loadbalancer", 443, From::Anyone),
    ("static", 8081, From::Role("loadbalancer")),
    ("static", 8082, From::Role("backend")),
    ("backend", 8443, From::Role("loadbalancer")),
    ("backend", 8444, From::Role("worker")),
    ("worker", 7000, From::Role("backend")),
    ("database", 5432, From::Role("backend")),
    ("database", 5432, From::Role("logd")),
    ("cache", 11211, From::Role("backend")),
    ("logd", 7200, From::Role("backend")),
    ("logd", 7200, From::Role("logd")),
    ("logd", 7200, From::Admin),
    ("logd", 7201, From::Admin),
    ("logd", 7201, From::Role("backend")),
    ("*", 22, From::Admin),
];

/// Whether the design lets `src` (None: this box, the administrators' address) open `port` on
/// `dst`. Workers reach nothing but the backends' registration port (their output policy).
fn designed(
    src: Option<&sagectl::inventory::Host>,
    dst: &sagectl::inventory::Host,
    port: u16,
) -> bool {
    let roles = |h: &sagectl::inventory::Host| h.all_roles().map(|r| r.name()).collect::<Vec<_>>();
    let (from, to) = (src.map(roles).unwrap_or_default(), roles(dst));
    if from.contains(&"worker") && !(port == 8444 && to.contains(&"backend")) {
        return false;
    }
    ARROWS.iter().any(|(role, p, who)| {
        *p == port
            && (*role == "*" || to.contains(role))
            && match who {
                From::Anyone => true,
                From::Admin => src.is_none(),
                From::Role(r) => from.contains(r),
            }
    })
}

/// The firewall against the design (issue 16): from every lab machine and from this box, a
/// connection to every port any other machine listens on (beyond loopback); exactly the
/// arrows of ARCHITECTURE §1 are open, everything else is refused or dropped.
fn firewall_is_exactly_the_design(inv: &Path) {
    use sagews_testkit::probe::{self, Reach};
    let inventory = sagectl::inventory::Inventory::load(inv).unwrap();
    let hosts = &inventory.hosts;
    let mut targets = Vec::new();
    for h in hosts {
        for port in probe::listening(&ssh(inv, &h.name, &["ss", "-Htln"])) {
            targets.push((h, port));
        }
    }
    let by_addr = |a: std::net::IpAddr| hosts.iter().find(|h| h.address == a).unwrap();
    let mut wrong = Vec::new();
    let mut count = 0;
    let mut check = |src: Option<&sagectl::inventory::Host>,
                     results: Vec<(std::net::IpAddr, u16, Reach)>| {
        for (a, port, reach) in results {
            count += 1;
            let dst = by_addr(a);
            let want = designed(src, dst, port);
            if want != (reach == Reach::Open) {
                wrong.push(format!(
                    "{} → {}:{port} ({}): {reach:?}, the design says {}",
                    src.map_or("this box (administrator)", |s| s.name.as_str()),
                    dst.name,
                    dst.all_roles()
                        .map(|r| r.name())
                        .collect::<Vec<_>>()
                        .join(", "),
                    if want { "open" } else { "closed" }
                ));
            }
        }
    };
    let all: Vec<_> = targets.iter().map(|(h, p)| (h.address, *p)).collect();
    check(None, probe::from_here(&all));
    for src in hosts {
        let others: Vec<_> = targets
            .iter()
            .filter(|(h, _)| h.name != src.name)
            .map(|(h, p)| (h.address, *p))
            .collect();
        let out = ssh(inv, &src.name, &["bash", "-c", &probe::script(&others)]);
        let results = probe::parse(&out);
        assert_eq!(
            results.len(),
            others.len(),
            "probes from {}: {out}",
            src.name
        );
        check(Some(src), results);
    }
    assert!(
        wrong.is_empty(),
        "the firewall differs from ARCHITECTURE §1:\n{}",
        wrong.join("\n")
    );
    eprintln!(
        "firewall: {count} probes from {} places, each as designed",
        hosts.len() + 1
    );
}
