//! The deploy lock on real lab machines, as root: two concurrent `up` runs of one inventory,
//! the second refused naming the first (or, with `--lock-timeout`, waiting for it); a host
//! whose lock another machine's sagectl holds fails naming that holder, and is free once that
//! SSH connection is gone; a run SIGKILLed mid-way leaves no lock that stops the next run;
//! drain and undrain take the lock too and are recorded in logd.

use sagews_testkit::lab;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lab::{Down, require, sagectl, scratch_inventory, text, up};
use sagectl::lock::{Holder, LocalLock, REMOTE_PATH, REMOTE_SCRIPT};
use serde_json::Value;

/// A host's part of a recap.
fn host(recap: &Value, name: &str) -> Value {
    let found = recap["hosts"]
        .as_array()
        .and_then(|hosts| hosts.iter().find(|h| h["host"] == name));
    found.cloned().expect("the host in the recap")
}

/// `sagectl VERB INVENTORY ARGS...`, run to its end.
fn sagectl_on(verb: &str, inv: &Path, args: &[&str]) -> std::process::Output {
    sagectl().arg(verb).arg(inv).args(args).output().unwrap()
}

fn set_var(inv: &Path, from: &str, to: &str) {
    let t = std::fs::read_to_string(inv).unwrap();
    assert!(t.contains(from), "{from} not in the inventory");
    std::fs::write(inv, t.replace(from, to)).unwrap();
}

fn ssh(inv: &Path, h: &str, argv: &[&str]) -> Command {
    let mut c = sagectl();
    c.args(["lab", "ssh"]).arg(inv).arg(h).arg("--").args(argv);
    c
}

fn spawn_up(inv: &Path, args: &[&str]) -> Child {
    sagectl()
        .arg("up")
        .arg(inv)
        .args(["--json", "--quiet"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until `f` gives something, for at most `secs`.
fn until<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(t) = f() {
            return t;
        }
        assert!(Instant::now() < deadline, "{what}: not within {secs} s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The holder written in a lock file's content, when there is one.
fn holder_in(content: &str) -> Option<Holder> {
    Holder::parse(content)
}

#[test]
fn the_deploy_lock() {
    require("ip");
    require("flock");
    let (_tmp, inv) = scratch_inventory(&lab::fixtures().join("lock2.yaml"));
    let _down = Down(inv.clone());
    let local = inv.parent().unwrap().join(".sagectl/locktest/deploy.lock");

    let (o, recap) = up(&inv, &[]);
    assert!(
        o.status.success(),
        "first up failed:\n{recap}\n{}",
        text(&o).1
    );
    assert_eq!(recap["audit"], "recorded in logd on alpha", "{recap}");

    // Two concurrent runs: the first changes a file and restarts memcached; the second, started
    // once the first holds the lock, is refused at once naming the first.
    set_var(&inv, "memcached_memory_mb: 64", "memcached_memory_mb: 96");
    let first = spawn_up(&inv, &[]);
    let pid = first.id();
    until(30, "the first run's name in deploy.lock", || {
        holder_in(&std::fs::read_to_string(&local).ok()?).filter(|h| h.pid == pid)
    });
    // A third, started with it, waits for it with --lock-timeout, then converges.
    let third = sagectl()
        .arg("up")
        .arg(&inv)
        .args(["--json", "--lock-timeout", "300"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let second = sagectl_on("up", &inv, &[]);
    let (_, err) = text(&second);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "another sagectl run holds the deploy lock {}: root on ",
            local.display()
        )) && err.contains(&format!("(pid {pid}, `sagectl up "))
            && err.contains("--lock-timeout"),
        "{err}"
    );
    eprintln!("the second run's stderr: {err}");
    let first = first.wait_with_output().unwrap();
    assert!(first.status.success(), "{}", text(&first).1);
    let third = third.wait_with_output().unwrap();
    let (out, err) = text(&third);
    assert!(third.status.success(), "{out}\n{err}");
    let recap: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(host(&recap, "alpha")["changed"], 0, "{recap}");
    assert!(
        err.contains("waiting up to 300 s for the deploy lock, held by root on ")
            && err.contains(&format!("(pid {pid}, `sagectl up ")),
        "{err}"
    );
    eprintln!("the third run's stderr: {err}");

    // Both runs are in logd: who ran what from where.
    let (logs, _) = text(&sagectl_on("logs", &inv, &["--since", "10m"]));
    let recorded = logs.matches("sagectl::up: root ran sagectl up on locktest:");
    assert!(recorded.count() >= 3, "{logs}");

    // Another machine's sagectl holds bravo's lock (the same script over its own SSH
    // connection, as another state directory's run would): bravo fails naming it, alpha
    // converges.
    let other = Holder {
        user: "operator2".into(),
        host: "elsewhere".into(),
        pid: 4242,
        command: "sagectl up other/lab.yaml".into(),
        started: Holder::me().started - 5,
    };
    let mut holding = ssh(
        &inv,
        "bravo",
        &["sh", "-c", REMOTE_SCRIPT, "sh", REMOTE_PATH, "0"],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let mut stdin = holding.stdin.take().unwrap();
    writeln!(stdin, "{}", other.line()).unwrap();
    let mut lines = BufReader::new(holding.stdout.take().unwrap()).lines();
    until(30, "the other run's lock on bravo", || {
        (lines.next()?.ok()? == "locked").then_some(())
    });
    let (o, recap) = up(&inv, &[]);
    assert!(!o.status.success(), "{recap}");
    let e = host(&recap, "bravo")["error"].as_str().unwrap().to_string();
    eprintln!("bravo held by another machine's run: {e}");
    assert!(
        e.starts_with(
            "another sagectl run holds the lock /run/sagectl.lock on bravo: operator2 on elsewhere (pid 4242, `sagectl up other/lab.yaml`), started "
        ) && e.contains(" s ago"),
        "{e}"
    );
    assert_eq!(host(&recap, "alpha")["failed"], false, "{recap}");
    // That run is gone without a word (its ssh SIGKILLed): its connection drops, the host's
    // holding process sees its stdin end, and the lock is free for the next run.
    holding.kill().unwrap();
    holding.wait().unwrap();
    drop(stdin);
    let (o, recap) = up(&inv, &[]);
    assert!(o.status.success(), "{recap}\n{}", text(&o).1);

    // A run SIGKILLed mid-way, holding both locks: the next run (not waiting) takes both over.
    set_var(&inv, "memcached_memory_mb: 96", "memcached_memory_mb: 128");
    let mut killed = spawn_up(&inv, &[]);
    let pid = killed.id();
    until(60, "the run's name in alpha's lock", || {
        let o = ssh(&inv, "alpha", &["cat", REMOTE_PATH]).output().ok()?;
        holder_in(&String::from_utf8_lossy(&o.stdout)).filter(|h| h.pid == pid)
    });
    assert!(
        killed.try_wait().unwrap().is_none(),
        "it ended before the kill"
    );
    killed.kill().unwrap(); // SIGKILL
    killed.wait().unwrap();
    assert!(
        holder_in(&std::fs::read_to_string(&local).unwrap()).is_some_and(|h| h.pid == pid),
        "the killed run left its name in deploy.lock"
    );
    let next = sagectl_on("up", &inv, &["--json"]);
    let (out, err) = text(&next);
    assert!(next.status.success(), "{out}\n{err}");
    assert!(
        err.contains("took over the deploy lock left by root on ")
            && err.contains(&format!("(pid {pid}, "))
            && err.contains("that process is gone (the kernel released its lock)"),
        "{err}"
    );
    let o = ssh(&inv, "alpha", &["cat", "/etc/memcached.conf"])
        .output()
        .unwrap();
    assert!(text(&o).0.contains("-m 128\n"));
    eprintln!("after the kill: {out}\n{err}");

    // The test itself holding the state directory's lock, as another run: refused at once.
    let me = Holder {
        command: "sagectl up (the test)".into(),
        ..Holder::me()
    };
    let held = LocalLock::acquire(local.parent().unwrap(), &me, Duration::ZERO, |_| {}).unwrap();
    let o = sagectl_on("up", &inv, &[]);
    assert!(
        text(&o).1.contains("`sagectl up (the test)`"),
        "{}",
        text(&o).1
    );
    // So is a drain, which changes machines too.
    let o = sagectl()
        .args(["drain"])
        .arg(&inv)
        .arg("bravo")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        text(&o).1.contains("holds the deploy lock") && text(&o).1.contains("(the test)"),
        "{}",
        text(&o).1
    );
    drop(held);

    // Drain and undrain (the backend: HAProxy's runtime API), recorded in logd like the runs.
    for verb in ["drain", "undrain"] {
        let o = sagectl_on(verb, &inv, &["alpha", "--timeout", "20"]);
        let err = text(&o).1;
        assert!(
            err.contains("audit: recorded in logd on alpha"),
            "{verb}: {err}"
        );
        eprintln!("{verb}: {err}");
    }
    let (logs, _) = text(&sagectl_on("logs", &inv, &["--since", "10m"]));
    assert!(
        logs.contains("sagectl::drain: root ran sagectl drain on locktest: alpha ")
            && logs.contains(
                "sagectl::undrain: root ran sagectl undrain on locktest: alpha back in service"
            ),
        "{logs}"
    );
}
