//! A rolling upgrade under people's work, on real lab machines (as root): the layout of
//! `inventories/lab-ha.yaml` (two backends behind HAProxy, two workers, logd, the database)
//! deployed, then every agent upgraded one host at a time (`sagectl up --serial 1` with a changed
//! sage-agent binary) while people keep running cells and saving through HAProxy. Each person
//! keeps the rules of the browser client (`sagews_testkit::person`). Afterwards: every execute
//! completed with its right output (a workspace moved between cells, a backend handing its
//! browsers over), every save is in the history, every line each cell appended is in the
//! workspace exactly once, and nobody saw an error. Prints the counts.

use sagews_testkit::lab;
use sagews_testkit::person::{Person, Seen};

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lab::{Down, require, sagectl, scratch_inventory, ssh, text, up};
use serde_json::{Value, json};

/// People working at once.
const PEOPLE: usize = 4;

/// What one person did and saw.
#[derive(Debug, Default)]
struct Work {
    executes: u32,
    /// Saves that made a commit.
    saves: u32,
    /// Saves with nothing new to commit (a move or a handover had just saved).
    saved_before: u32,
    errors: Vec<String>,
    seen: Seen,
}

/// A person's day: a cell every 100 ms appending its number to `notes.txt` (and printing its
/// square), a save every fifth, until `stop`; then the workspace is checked from the inside.
async fn work(
    site: &'static sagews_testkit::browser::Site,
    n: usize,
    stop: Arc<AtomicBool>,
) -> Work {
    let mut w = Work::default();
    let name = format!("person{n}");
    let mut p = match Person::sign_up(site, &name, "a rolling password").await {
        Ok(p) => p,
        Err(e) => {
            w.errors.push(e);
            return w;
        }
    };
    if let Err(e) = p.create_and_open(&format!("notes of {name}")).await {
        w.errors.push(e);
        return w;
    }
    let mut i = 0u32;
    while !stop.load(Ordering::SeqCst) {
        let code = format!("print({i} * {i})\n_ = open('notes.txt', 'a').write('{i}\\n')");
        match p.execute(&code).await {
            Ok((out, status)) if status == "ok" && out.trim() == (i * i).to_string() => {
                w.executes += 1;
            }
            Ok((out, status)) => w.errors.push(format!("cell {i}: {status}: {out}")),
            Err(e) => w.errors.push(format!("cell {i}: {e}")),
        }
        i += 1;
        if i % 5 == 0 {
            // Nothing to commit when a move or a backend's handover saved the workspace since
            // the last cell (their own commits): a save all the same.
            match p.save(&format!("save {i}")).await {
                Ok(true) => w.saves += 1,
                Ok(false) => w.saved_before += 1,
                Err(e) => w.errors.push(format!("save {i}: {e}")),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every line once, in order: no cell lost, none run twice.
    match p.execute("print(open('notes.txt').read(), end='')").await {
        Ok((out, _)) => {
            let want: String = (0..i).map(|k| format!("{k}\n")).collect();
            if out != want {
                w.errors.push(format!(
                    "notes.txt after {i} cells is not 0..{i}, one per line: {out:?}"
                ));
            }
        }
        Err(e) => w.errors.push(format!("reading notes.txt: {e}")),
    }
    // Every save is in the history.
    let ws = p.workspace.clone().unwrap_or_default();
    match p.call(json!({"op": "history", "workspace": ws})).await {
        Ok(h) => {
            let saves = h["history"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter(|c| {
                            c["message"]
                                .as_str()
                                .is_some_and(|m| m.starts_with("save "))
                        })
                        .count()
                })
                .unwrap_or(0);
            if saves != w.saves as usize {
                w.errors.push(format!(
                    "{} saves acknowledged, {saves} in the history: {h}",
                    w.saves
                ));
            }
        }
        Err(e) => w.errors.push(format!("history: {e}")),
    }
    w.seen = p.seen.clone();
    w
}

fn sha256(path: &Path) -> String {
    let o = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    text(&o).0.split_whitespace().next().unwrap().to_string()
}

#[test]
fn a_rolling_upgrade_loses_no_work() {
    require("systemd-nspawn");
    let (tmp, inv) = scratch_inventory(&lab::fixtures().join("rolling.yaml"));
    let _down = Down(inv.clone());
    let started = Instant::now();
    let (o, recap) = up(&inv, &[]);
    assert!(o.status.success(), "up failed: {recap}\n{}", text(&o).1);
    eprintln!(
        "deployed 7 lab machines in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    // A changed agent: the same program with bytes appended (another checksum, as a new build).
    let changed = tmp.path().join("sage-agent");
    let mut bytes = std::fs::read(sagews_testkit::bin("sage-agent")).unwrap();
    bytes.extend_from_slice(b"\n-- a rolling upgrade --\n");
    std::fs::write(&changed, bytes).unwrap();
    let want = sha256(&changed);

    let site: &'static sagews_testkit::browser::Site =
        Box::leak(Box::new(sagews_testkit::browser::Site {
            name: "sagews.rolling.test".into(),
            addr: "10.87.0.10:443".parse().unwrap(),
            ca: inv.parent().unwrap().join(".sagectl/rolling/ca.crt"),
        }));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let people: Vec<_> = (0..PEOPLE)
        .map(|n| rt.spawn(work(site, n, stop.clone())))
        .collect();
    // Let everyone get going, then upgrade one host at a time.
    std::thread::sleep(Duration::from_secs(5));
    let rolling = Instant::now();
    let o = sagectl()
        .arg("up")
        .arg(&inv)
        .args(["--serial", "1", "--json"])
        .env("SAGECTL_AGENT_BINARY", &changed)
        .output()
        .unwrap();
    let took = rolling.elapsed();
    // A little more work on the upgraded agents, then the checks.
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::SeqCst);
    let work: Vec<Work> = people
        .into_iter()
        .map(|h| rt.block_on(h).unwrap())
        .collect();
    let (out, err) = text(&o);
    // What the rolling run said (drains, moves, put back): the record of the upgrade.
    eprintln!("{err}");
    assert!(o.status.success(), "the rolling up failed:\n{out}\n{err}");
    let recap: Value = serde_json::from_str(&out).unwrap();

    let sum = |f: &dyn Fn(&Work) -> u32| work.iter().map(f).sum::<u32>();
    let closed_1012 = sum(&|w| w.seen.closed.get(&1012).copied().unwrap_or(0));
    eprintln!(
        "rolling upgrade of 7 hosts in {:.1}s under {PEOPLE} people: {} executes, {} saves ({} with nothing new since a move or handover saved), {} moved, {} reconnects (1012 from a stopping backend: {closed_1012}), {} requests sent again after `restarting`, {} HTTP retries",
        took.as_secs_f64(),
        sum(&|w| w.executes),
        sum(&|w| w.saves + w.saved_before),
        sum(&|w| w.saved_before),
        sum(&|w| w.seen.moved),
        sum(&|w| w.seen.sessions - 1),
        sum(&|w| w.seen.restarted_requests),
        sum(&|w| w.seen.http_retries),
    );
    for (n, w) in work.iter().enumerate() {
        assert!(w.errors.is_empty(), "person{n} saw errors: {:#?}", w.errors);
        assert!(w.seen.lost_requests.is_empty(), "person{n}: {:?}", w.seen);
        assert!(w.seen.trouble.is_empty(), "person{n}: {:?}", w.seen);
        assert!(w.executes > 10 && w.saves > 1, "person{n}: {w:?}");
    }
    // Both workers were drained with people on them: workspaces moved; both backends restarted
    // under people: they reconnected.
    assert!(sum(&|w| w.seen.moved) >= PEOPLE as u32, "{work:?}");
    assert!(closed_1012 >= PEOPLE as u32, "{work:?}");
    // Every agent runs the new program.
    for h in ["logs", "backend1", "backend2", "worker1", "worker2"] {
        let entry = lab::host_entry(&recap, h);
        assert!(entry["changed"].as_u64().unwrap() > 0, "{h}: {entry}");
        let sum = ssh(&inv, h, &["sha256sum", "/usr/local/bin/sage-agent"]);
        assert!(sum.starts_with(&want), "{h} runs {sum}");
    }
    for h in ["lb", "db"] {
        assert_eq!(lab::host_entry(&recap, h)["changed"], 0, "{recap}");
    }
    // Nothing stays drained: HAProxy has both backends up (not DRAIN), the backends see both
    // workers taking sessions.
    let stat = ssh(
        &inv,
        "lb",
        &[
            "sh",
            "-c",
            "echo 'show stat' | socat stdio /run/haproxy/admin.sock",
        ],
    );
    for b in ["backend1", "backend2"] {
        let status = stat.lines().find_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f.first() == Some(&"backends") && f.get(1) == Some(&b)).then(|| f[17].to_string())
        });
        assert_eq!(status.as_deref(), Some("UP"), "{b}:\n{stat}");
    }
    let status = sagectl()
        .arg("status")
        .arg(&inv)
        .arg("--json")
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&status.stdout).unwrap();
    for b in ["backend1", "backend2"] {
        let h = lab::host_entry(&report, b);
        let figure = |name: &str| {
            h["figures"]
                .as_array()
                .unwrap()
                .iter()
                .find(|f| f["group"] == "backend" && f["name"] == name)
                .map(|f| f["value"].clone())
        };
        assert_eq!(figure("healthy workers"), Some(json!(2)), "{h:#}");
        assert_eq!(figure("draining workers"), Some(json!(0)), "{h:#}");
    }
}
