//! The browser client end to end, as root: lab machines deployed by `sagectl up`, and a real
//! headless Chromium (Debian's chromium and chromium-driver) driven over WebDriver by
//! `tests/js/e2e.mjs` through HAProxy, trusting the deployment's CA from an NSS database (not
//! by ignoring certificate errors). Two people at once (one on a phone-sized screen), then the
//! xhr-streaming and xhr-polling transports forced, then the backend SIGKILLed during a
//! session: every run signs up, runs code, streams and interrupts, plots, edits and saves a
//! file, saves, reverts, publishes and signs out and in; the CSP is enforced and Chromium
//! reports no violation. Screenshots go to `target/e2e-screenshots/`.

use sagews_testkit::lab;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use lab::{Down, require, root, scratch_inventory, text};
use serde_json::Value;

/// An NSS database under `home` trusting `ca` for web sites, as Chromium reads it.
fn trust_ca(home: &Path, ca: &Path) {
    let db = home.join(".pki/nssdb");
    std::fs::create_dir_all(&db).unwrap();
    let db = format!("sql:{}", db.display());
    let o = Command::new("certutil")
        .args(["-N", "--empty-password", "-d", &db])
        .output()
        .unwrap();
    assert!(o.status.success(), "certutil -N: {}", text(&o).1);
    let o = Command::new("certutil")
        .args(["-A", "-t", "C,,", "-n", "sagectl-e2e", "-d", &db, "-i"])
        .arg(ca)
        .output()
        .unwrap();
    assert!(o.status.success(), "certutil -A: {}", text(&o).1);
}

struct Person<'a> {
    user: &'a str,
    transport: &'a str,
    phone: bool,
    kill: Option<Vec<String>>,
    bench: Option<u32>,
}

fn browse(site: &Value, home: &Path, shots: &Path, p: &Person<'_>) -> std::process::Child {
    let mut c = Command::new("node");
    c.arg(root().join("tests/js/e2e.mjs"))
        .env("HOME", home)
        .env("SAGEWS_URL", site["url"].as_str().unwrap())
        .env("SAGEWS_ADDRESS", site["addresses"][0].as_str().unwrap())
        .env("SAGEWS_CA", site["ca_file"].as_str().unwrap())
        .env("SAGEWS_USER", p.user)
        .env("SAGEWS_TRANSPORT", p.transport)
        .env("SAGEWS_PHONE", if p.phone { "1" } else { "0" })
        .env("SAGEWS_SHOTS", shots)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some(k) = &p.kill {
        c.env("SAGEWS_KILL", serde_json::to_string(k).unwrap());
    }
    if let Some(n) = p.bench {
        c.env("SAGEWS_BENCH", n.to_string());
    }
    c.spawn().expect("node")
}

fn finished(inv: &Path, name: &str, o: Output) -> Value {
    let (out, err) = text(&o);
    if !o.status.success() {
        // What the agents said meanwhile: the backend's and the worker's journals.
        let journal = |host: &str, unit: &str| {
            let o = lab::sagectl()
                .args(["lab", "ssh"])
                .arg(inv)
                .args([
                    host,
                    "--",
                    "journalctl",
                    "-u",
                    unit,
                    "-n",
                    "80",
                    "--no-pager",
                    "-o",
                    "short-precise",
                ])
                .output();
            o.map(|o| text(&o).0).unwrap_or_default()
        };
        panic!(
            "{name} failed:\n{err}\n--- sage-backend on alpha:\n{}\n--- sage-worker on bravo:\n{}",
            journal("alpha", "sage-backend"),
            journal("bravo", "sage-worker")
        );
    }
    let v: Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{name}: {e}: {out}"));
    eprintln!("{name}: {v}");
    v
}

/// The lab deployed, a browser home trusting its CA, and the screenshot directory.
struct Deployed {
    // Fields drop in order: the machines go before the directory holding their inventory.
    _down: Down,
    _tmp: tempfile::TempDir,
    inv: PathBuf,
    site: Value,
    home: PathBuf,
    shots: PathBuf,
}

fn deploy() -> Deployed {
    require("ip");
    for tool in ["chromium", "chromedriver", "node", "certutil"] {
        require(tool);
    }
    let (tmp, inv) = scratch_inventory(&lab::fixtures().join("e2e.yaml"));
    let down = Down(inv.clone());
    let (o, recap) = lab::up(&inv, &[]);
    assert!(o.status.success(), "up failed: {recap}");
    let site = recap["site"].clone();
    let home = tmp.path().join("browser-home");
    trust_ca(&home, Path::new(site["ca_file"].as_str().unwrap()));
    let shots = root().join("target/e2e-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    Deployed {
        _down: down,
        _tmp: tmp,
        inv,
        site,
        home,
        shots,
    }
}

/// The browser bench (prints figures; not a timed test): page load through HAProxy to
/// interactive and Run `1+1` click to output painted, measured in the browser. Run it with
/// `cargo test -p sagectl --test e2e -- --ignored --nocapture` (as root).
#[test]
#[ignore = "a benchmark: run it on purpose"]
fn bench_the_page() {
    let d = deploy();
    let n: u32 = std::env::var("SAGEWS_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let bench = Person {
        user: "bench",
        transport: "websocket",
        phone: false,
        kill: None,
        bench: Some(n),
    };
    let v = finished(
        &d.inv,
        "bench",
        browse(&d.site, &d.home, &d.shots, &bench)
            .wait_with_output()
            .unwrap(),
    );
    let b = &v["bench"];
    let (l, r) = (&b["load_to_interactive_ms"], &b["run_1_plus_1_ms"]);
    println!(
        "page load through HAProxy to interactive: p50 {} ms, p99 {} ms ({} loads)",
        l["p50"], l["p99"], l["n"]
    );
    println!(
        "Run 1+1, click to output painted: p50 {} ms, p99 {} ms, max {} ms ({} runs)",
        r["p50"], r["p99"], r["max"], r["n"]
    );
    println!(
        "static assets, gzipped: {} bytes",
        b["static_gzipped_bytes"]
    );
}

#[test]
fn people_use_the_site_in_a_real_browser() {
    let d = deploy();
    let (inv, site, home, shots) = (&d.inv, &d.site, &d.home, &d.shots);
    // Two people at once, one on a phone.
    let ada = browse(
        site,
        home,
        shots,
        &Person {
            user: "ada",
            transport: "websocket",
            phone: false,
            kill: None,
            bench: None,
        },
    );
    let bob = browse(
        site,
        home,
        shots,
        &Person {
            user: "bob",
            transport: "websocket",
            phone: true,
            kill: None,
            bench: None,
        },
    );
    let a = finished(inv, "ada", ada.wait_with_output().unwrap());
    let b = finished(inv, "bob", bob.wait_with_output().unwrap());
    assert_ne!(a["workspace"], b["workspace"]);
    // The polling transports, forced.
    for (user, transport) in [("carol", "xhr-streaming"), ("dave", "xhr-polling")] {
        let p = browse(
            site,
            home,
            shots,
            &Person {
                user,
                transport,
                phone: false,
                kill: None,
                bench: None,
            },
        );
        let v = finished(inv, user, p.wait_with_output().unwrap());
        assert_eq!(v["transport"], transport);
    }
    // The backend SIGKILLed during a session: the page reconnects by itself.
    let kill = vec![
        env!("CARGO_BIN_EXE_sagectl").to_string(),
        "lab".into(),
        "ssh".into(),
        inv.display().to_string(),
        "alpha".into(),
        "--".into(),
        "systemctl".into(),
        "kill".into(),
        "--signal=KILL".into(),
        "sage-backend".into(),
    ];
    let p = browse(
        site,
        home,
        shots,
        &Person {
            user: "erin",
            transport: "websocket",
            phone: false,
            kill: Some(kill),
            bench: None,
        },
    );
    let v = finished(inv, "erin", p.wait_with_output().unwrap());
    assert!(v["reconnect_ms"].as_u64().is_some(), "{v}");
}
