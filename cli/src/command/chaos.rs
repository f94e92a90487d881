//! `sagectl bench chaos INVENTORY`: the fault drill. While `bench load` runs people against
//! the deployment (two backends, two workers, a PostgreSQL standby, logd), one fault after
//! another: SIGKILL a backend, SIGKILL a worker, restart PostgreSQL, SIGKILL logd twice, stop
//! memcached (started again after a while), then lose the primary's machine and promote the
//! standby. Afterwards, from the outside: the load generator's own verification (every
//! acknowledged save in the workspace's history with its contents, every acknowledged cell's
//! line once, no execute hung), every save's audit record in logd exactly once, and no process
//! of a workspace's user left on the workers once their sessions are gone. Prints, per fault,
//! what the people saw and how long until the service worked again (from the load's
//! per-second figures).
//!
//! Lab inventories only (it destroys a lab machine); the promote rewrites the inventory's
//! `database.standby` as `sagectl promote` does.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use serde_json::Value;

use crate::inventory::{Inventory, Role};
use crate::pipeline::{Pipeline, Settings};

#[derive(clap::Args, Clone)]
pub struct Opts {
    /// A lab inventory with two backends, two workers, `database.standby` and logd
    /// (inventories/lab-chaos.yaml).
    pub inventory: PathBuf,
    /// People working through the drill.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=500))]
    pub users: u32,
    /// Seconds between faults (each fault's recovery is measured within it).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(8..=600))]
    pub gap: u64,
    /// Write the drill's report (faults, recoveries, checks, the load's report) as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One fault as injected.
#[derive(Debug, Clone, Serialize)]
pub struct Fault {
    pub name: String,
    /// Seconds since the load started.
    pub at: f64,
    /// What was done, and what the command said.
    pub detail: String,
    /// Seconds from the fault until executes ran at the usual rate again with no new errors
    /// (None: not within the gap).
    pub recovery_seconds: Option<u32>,
    /// Errors the people saw from the fault until recovery.
    pub errors: u64,
    /// Fewest executes in one second meanwhile, and the usual rate before the fault.
    pub low_rate: u64,
    pub usual_rate: u64,
}

#[derive(Debug, Serialize)]
pub struct ChaosReport {
    pub users: u32,
    pub faults: Vec<Fault>,
    /// Problems found afterwards (empty: nothing lost).
    pub problems: Vec<String>,
    pub checks: Vec<String>,
    pub load: Value,
}

fn say(msg: impl AsRef<str>) {
    eprintln!("chaos: {}", msg.as_ref());
}

/// Runs `argv` on `host` (a fresh connection each time: hosts come and go in a drill).
fn on(inv: &Inventory, host: &str, argv: &[&str], secs: u64) -> anyhow::Result<String> {
    let p = Pipeline::new(
        inv.clone(),
        &[host.to_string()],
        Settings {
            check: true,
            quiet: true,
            command: "bench chaos",
            start_lab: false,
            ..Settings::default()
        },
    )?;
    super::runtime()?.block_on(async {
        let s = p.session(host).await?;
        let out = s.run(argv, b"", Duration::from_secs(secs)).await?;
        s.close().await;
        anyhow::ensure!(out.ok(), "{host}: `{}`: {}", argv.join(" "), out.tail());
        Ok(out.stdout_text())
    })
}

fn sagectl(args: &[&str]) -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("finding sagectl's own binary")?;
    let out = std::process::Command::new(exe)
        .args(args)
        .output()
        .with_context(|| format!("running sagectl {}", args.join(" ")))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(
        out.status.success(),
        "sagectl {} failed: {}",
        args.join(" "),
        crate::sys::tail(text.as_bytes(), 12)
    );
    Ok(text)
}

pub fn run(o: Opts) -> anyhow::Result<ExitCode> {
    let inv = match super::load(&o.inventory) {
        Ok(inv) => inv,
        Err(code) => return Ok(code),
    };
    anyhow::ensure!(
        inv.lab.is_some(),
        "{}: the drill destroys a machine: lab inventories only",
        o.inventory.display()
    );
    let backends: Vec<String> = inv
        .with_role(Role::Backend)
        .map(|h| h.name.clone())
        .collect();
    let workers: Vec<String> = inv
        .with_role(Role::Worker)
        .map(|h| h.name.clone())
        .collect();
    let logd = inv.with_role(Role::Logd).next().map(|h| h.name.clone());
    let cache = inv.with_role(Role::Cache).next().map(|h| h.name.clone());
    let (Some(standby), Some(logd), Some(cache)) = (inv.database.standby.clone(), logd, cache)
    else {
        anyhow::bail!(
            "{}: the drill needs `database.standby`, a logd host and a cache host (inventories/lab-chaos.yaml)",
            o.inventory.display()
        );
    };
    anyhow::ensure!(
        backends.len() >= 2 && workers.len() >= 2,
        "{}: the drill needs two backends and two workers",
        o.inventory.display()
    );
    let primary = inv.database.primary.clone();
    let inv_arg = o.inventory.display().to_string();

    // The standby streams before anything is done to the primary.
    let r = on(
        &inv,
        &standby,
        &super::postgres_psql("postgres", "select status from pg_stat_wal_receiver")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        30,
    )?;
    anyhow::ensure!(
        r.trim() == "streaming",
        "{standby} is not streaming from {primary} ({:?}): run `sagectl up {inv_arg}` first",
        r.trim()
    );

    let warmup = 15 + (o.users as u64 / 10);
    let faults_n = 7u64;
    let duration = warmup + faults_n * o.gap + 30;
    let report_file =
        std::env::temp_dir().join(format!("sagectl-chaos-{}.json", std::process::id()));
    say(format!(
        "{} people for {duration} s; faults every {} s from {warmup} s",
        o.users, o.gap
    ));
    let exe = std::env::current_exe()?;
    let users = o.users.to_string();
    let dur = duration.to_string();
    let t0 = Instant::now();
    let mut load = std::process::Command::new(exe)
        .args([
            "bench",
            "load",
            &inv_arg,
            "--users",
            &users,
            "--duration",
            &dur,
            "--keep",
            "--json",
        ])
        .arg(&report_file)
        .stdout(std::process::Stdio::inherit())
        .spawn()
        .context("starting the load generator")?;

    let mut faults: Vec<Fault> = Vec::new();
    let mut fault = |name: &str, f: &mut dyn FnMut() -> anyhow::Result<String>| {
        let at = t0.elapsed().as_secs_f64();
        say(format!("{at:.1}s: {name}"));
        let detail = match f() {
            Ok(d) => d.trim().lines().last().unwrap_or("").to_string(),
            Err(e) => format!("FAILED: {e:#}"),
        };
        faults.push(Fault {
            name: name.into(),
            at,
            detail,
            recovery_seconds: None,
            errors: 0,
            low_rate: 0,
            usual_rate: 0,
        });
    };
    let sleep_until = |secs: u64| {
        let target = Duration::from_secs(secs);
        if let Some(left) = target.checked_sub(t0.elapsed()) {
            std::thread::sleep(left);
        }
    };
    let kill = |host: &str, unit: &str| {
        on(
            &inv,
            host,
            &[
                "systemctl",
                "kill",
                "--kill-whom=main",
                "--signal=KILL",
                unit,
            ],
            30,
        )
        .map(|_| format!("SIGKILL to {unit}'s main process on {host}"))
    };
    let mut at = warmup;
    sleep_until(at);
    fault("SIGKILL a backend", &mut || {
        kill(&backends[0], "sage-backend")
    });
    at += o.gap;
    sleep_until(at);
    fault("SIGKILL a worker", &mut || kill(&workers[0], "sage-worker"));
    at += o.gap;
    sleep_until(at);
    fault("restart PostgreSQL", &mut || {
        on(
            &inv,
            &primary,
            &["systemctl", "restart", "postgresql@15-main"],
            120,
        )
        .map(|_| format!("systemctl restart postgresql@15-main on {primary}"))
    });
    at += o.gap;
    sleep_until(at);
    fault("SIGKILL logd twice", &mut || {
        kill(&logd, "sage-logd")?;
        std::thread::sleep(Duration::from_secs(3));
        kill(&logd, "sage-logd").map(|d| format!("{d}, twice 3 s apart"))
    });
    at += o.gap;
    sleep_until(at);
    fault("stop memcached", &mut || {
        on(&inv, &cache, &["systemctl", "stop", "memcached"], 60)?;
        std::thread::sleep(Duration::from_secs(o.gap / 2));
        on(&inv, &cache, &["systemctl", "start", "memcached"], 60)
            .map(|_| format!("memcached on {cache} stopped for {} s", o.gap / 2))
    });
    at += o.gap;
    sleep_until(at);
    fault(
        "lose the primary's machine, promote the standby",
        &mut || {
            sagectl(&["lab", "destroy", &inv_arg, &primary])?;
            let t = Instant::now();
            sagectl(&["promote", &inv_arg, &standby]).map(|_| {
            format!(
                "{primary}'s machine destroyed; `sagectl promote` made {standby} the primary and converged backends and logd in {:.1} s",
                t.elapsed().as_secs_f64()
            )
        })
        },
    );
    let status = load.wait().context("waiting for the load generator")?;
    let text = std::fs::read_to_string(&report_file)
        .with_context(|| format!("the load generator wrote no report ({status})"))?;
    say(format!("the load's report: {}", report_file.display()));
    let load: Value = serde_json::from_str(&text).context("reading the load report")?;
    measure(&mut faults, &load, o.gap);

    // Outside checks, on the deployment as it is now (the standby promoted).
    let after = match super::load(&o.inventory) {
        Ok(inv) => inv,
        Err(code) => return Ok(code),
    };
    let mut problems = Vec::new();
    let mut checks = Vec::new();
    // What must never happen: an acknowledged save missing, a cell hung past its timeout, a
    // cell's output wrong. Cells acknowledged but not yet saved when their session died are
    // counted, not failed: unsaved work may die with its worker or database.
    let count = |kind: &str| load["errors"][kind]["count"].as_u64().unwrap_or(0);
    let mut bad: Vec<String> = ["lost_save", "hung"]
        .iter()
        .filter(|k| count(k) > 0)
        .map(|k| format!("{k} {}: {}", count(k), load["errors"][*k]["samples"]))
        .collect();
    // Every execute ended with a status a person can act on.
    let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
    for u in load["user_records"].as_array().into_iter().flatten() {
        for (k, v) in u["executes"].as_object().into_iter().flatten() {
            *statuses.entry(k.clone()).or_default() += v.as_u64().unwrap_or(0);
        }
    }
    for k in ["hung", "wrong_output"] {
        if statuses.get(k).copied().unwrap_or(0) > 0 {
            bad.push(format!("{} executes ended {k}", statuses[k]));
        }
    }
    checks.push(format!(
        "every execute ended with a status: {}",
        statuses
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    if bad.is_empty() && load["users_verified"].as_u64().is_some() {
        checks.push(format!(
            "every acknowledged save is in its workspace's history with its contents, no cell hung ({} of {} users' files hold every acknowledged cell; {} unsaved cells were lost with a session)",
            load["users_verified"],
            o.users,
            count("lost_cell")
        ));
    } else {
        problems.push(format!(
            "the load generator found lost or hung work ({status}): {}",
            bad.join("; ")
        ));
    }
    for f in &faults {
        if f.detail.starts_with("FAILED") {
            problems.push(format!(
                "fault `{}` could not be injected: {}",
                f.name, f.detail
            ));
        }
    }
    audit_check(&after, &load, &mut problems, &mut checks);
    leftovers_check(&after, &mut problems, &mut checks);

    let report = ChaosReport {
        users: o.users,
        faults,
        problems,
        checks,
        load,
    };
    print!("{}", text_report(&report));
    if let Some(path) = &o.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(if report.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Per fault, from the load's per-second lines: the usual rate (median of the 5 seconds
/// before), then, within the fault's window (until the next fault, at most two gaps; the last
/// fault's until the load's last seconds), the last second that was bad (executes under 80 % of usual, or new
/// errors): recovery is the end of that second. Errors and the lowest rate are counted until
/// then.
fn measure(faults: &mut [Fault], load: &Value, gap: u64) {
    let seconds: Vec<(u32, u64, u64)> = load["timeline"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    (
                        s["t"].as_u64().unwrap_or(0) as u32,
                        s["executes"].as_u64().unwrap_or(0),
                        s["errors_total"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let last_t = seconds.last().map_or(0, |s| s.0).saturating_sub(5);
    let n = faults.len();
    for i in 0..n {
        let start = faults[i].at.floor() as u32;
        // The last fault's window runs to the load's end (a promote takes longer than a gap).
        let end = faults
            .get(i + 1)
            .map_or(last_t, |f| {
                (f.at.floor() as u32).min(start + 2 * gap as u32)
            })
            .min(last_t);
        let mut before: Vec<u64> = seconds
            .iter()
            .filter(|s| s.0 < start && s.0 + 6 > start)
            .map(|s| s.1)
            .collect();
        before.sort_unstable();
        let usual = before.get(before.len() / 2).copied().unwrap_or(0);
        let errors_at_start = seconds.iter().rfind(|s| s.0 < start).map_or(0, |s| s.2);
        let window: Vec<&(u32, u64, u64)> = seconds
            .iter()
            .filter(|s| s.0 >= start && s.0 < end)
            .collect();
        let mut prev_err = errors_at_start;
        let mut last_bad = None;
        for (k, s) in window.iter().enumerate() {
            if s.1 * 10 < usual * 8 || s.2 != prev_err {
                last_bad = Some(k);
            }
            prev_err = s.2;
        }
        let f = &mut faults[i];
        f.usual_rate = usual;
        let upto = last_bad.map_or(0, |k| k + 1);
        f.recovery_seconds = match last_bad {
            None => Some(0),
            // Still bad at the window's end: not seen to recover.
            Some(k) if k + 1 >= window.len() => None,
            Some(k) => Some(window[k].0 + 1 - start),
        };
        f.errors = window[..upto]
            .last()
            .map_or(0, |s| s.2.saturating_sub(errors_at_start));
        f.low_rate = window[..upto.max(1).min(window.len())]
            .iter()
            .map(|s| s.1)
            .min()
            .unwrap_or(usual);
    }
}

/// Every acknowledged save's audit record is in logd once: counted by its message (unique per
/// save in the load) in the logs database of the primary.
fn audit_check(
    inv: &Inventory,
    load: &Value,
    problems: &mut Vec<String>,
    checks: &mut Vec<String>,
) {
    let sql = "select fields->>'workspace', fields->>'message', count(*) from records where target = 'backend.audit' and message = 'workspace saved' group by 1, 2";
    let out = match on(
        inv,
        &inv.database.primary,
        &super::postgres_psql("sagews_logs", sql)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        120,
    ) {
        Ok(o) => o,
        Err(e) => {
            problems.push(format!("could not read the audit records: {e:#}"));
            return;
        }
    };
    let mut counts: BTreeMap<(String, String), u64> = BTreeMap::new();
    for l in out.lines() {
        let f: Vec<&str> = l.split('\t').collect();
        if let [ws, msg, n] = f[..] {
            counts.insert((ws.into(), msg.into()), n.parse().unwrap_or(0));
        }
    }
    let mut acked = 0;
    let mut missing = Vec::new();
    let mut twice = Vec::new();
    for u in load["user_records"].as_array().into_iter().flatten() {
        let ws = u["workspace"].as_str().unwrap_or("").to_string();
        for s in u["saves"].as_array().into_iter().flatten() {
            let msg = s["message"].as_str().unwrap_or("").to_string();
            acked += 1;
            match counts.get(&(ws.clone(), msg.clone())) {
                None => missing.push(format!("{ws} `{msg}`")),
                Some(1) => {}
                Some(n) => twice.push(format!("{ws} `{msg}` {n} times")),
            }
        }
    }
    if !missing.is_empty() {
        problems.push(format!(
            "{} of {acked} acknowledged saves have no audit record in logd: {}",
            missing.len(),
            missing
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if !twice.is_empty() {
        problems.push(format!(
            "audit records more than once: {}",
            twice.join(", ")
        ));
    }
    if missing.is_empty() && twice.is_empty() {
        checks.push(format!(
            "each of the {acked} acknowledged saves has its audit record in logd exactly once"
        ));
    }
}

/// No process of a workspace's user (uids `worker.uid_min..=uid_max`) is left on a worker
/// without its session: waits up to 60 s for the users with processes to be no more than the
/// sessions the worker says are open (its metrics), then names what is left.
fn leftovers_check(inv: &Inventory, problems: &mut Vec<String>, checks: &mut Vec<String>) {
    let (lo, hi) = (inv.worker.uid_min, inv.worker.uid_max);
    let script = format!(
        r#"open_sessions() {{
  exec 3<>/dev/tcp/127.0.0.1/7001 || {{ echo -1; return; }}
  printf 'GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
  awk '/^sagews_worker_sessions_open / {{ print int($2) }}' <&3
  exec 3<&-
}}
users() {{ ps -e -o uid= | awk '$1 >= {lo} && $1 <= {hi}' | sort -u | wc -l; }}
for i in $(seq 60); do
  s=$(open_sessions); u=$(users)
  [ "$u" -le "${{s:-0}}" ] && break
  sleep 1
done
echo "sessions ${{s:-?}} users $u"
[ "$u" -le "${{s:-0}}" ] || ps -e -o uid=,pid=,etime=,comm= | awk '$1 >= {lo} && $1 <= {hi}'
"#
    );
    for w in inv.with_role(Role::Worker) {
        match on(inv, &w.name, &["bash", "-c", &script], 120) {
            Ok(o) => {
                let first = o.lines().next().unwrap_or("").to_string();
                if o.lines().count() <= 1 {
                    checks.push(format!(
                        "{}: no workspace user's process without its session ({first})",
                        w.name
                    ));
                } else {
                    problems.push(format!(
                        "{}: processes of workspace users beyond the open sessions ({first}): {}",
                        w.name,
                        crate::sys::tail(o.as_bytes(), 8)
                    ));
                }
            }
            Err(e) => problems.push(format!("{}: could not look: {e:#}", w.name)),
        }
    }
}

fn text_report(r: &ChaosReport) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "\nfault drill, {} people (recovery: the end of the fault's last second with executes under 80% of the usual rate or a new error)\n",
        r.users
    ));
    s.push_str(&format!(
        "{:<48} {:>7} {:>10} {:>7} {:>12}\n",
        "fault", "at", "recovery", "errors", "low/usual/s"
    ));
    for f in &r.faults {
        s.push_str(&format!(
            "{:<48} {:>6.0}s {:>10} {:>7} {:>12}\n",
            f.name,
            f.at,
            f.recovery_seconds
                .map_or("not seen".into(), |x| format!("{x} s")),
            f.errors,
            format!("{}/{}", f.low_rate, f.usual_rate)
        ));
        s.push_str(&format!("    {}\n", f.detail));
    }
    let l = &r.load;
    s.push_str(&format!(
        "load: {} executes, {} saves, {} moved, {} reconnects; {} errors: {}\n",
        l["executes"],
        l["saves"],
        l["sessions_moved"],
        l["reconnects"],
        l["errors_total"],
        l["errors"]
            .as_object()
            .map(|m| m
                .iter()
                .map(|(k, v)| format!("{k} {}", v["count"]))
                .collect::<Vec<_>>()
                .join(", "))
            .unwrap_or_default()
    ));
    for c in &r.checks {
        s.push_str(&format!("ok: {c}\n"));
    }
    for p in &r.problems {
        s.push_str(&format!("PROBLEM: {p}\n"));
    }
    s.push_str(if r.problems.is_empty() {
        "data lost: none\n"
    } else {
        "the drill found problems (above)\n"
    });
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(at: f64) -> Fault {
        Fault {
            name: "f".into(),
            at,
            detail: String::new(),
            recovery_seconds: None,
            errors: 0,
            low_rate: 0,
            usual_rate: 0,
        }
    }

    #[test]
    fn recovery_is_the_end_of_the_last_bad_second() {
        // 10 executes a second; fault one at 10 s: fine for 3 s, then 4 bad seconds with 5
        // errors; fault two at 30 s: nothing seen.
        let mut timeline = Vec::new();
        let mut errors = 0;
        for t in 0..60u32 {
            let bad = (13..17).contains(&t);
            if t == 14 {
                errors += 5;
            }
            timeline.push(serde_json::json!({"t": t, "executes": if bad { 2 } else { 10 }, "errors_total": errors}));
        }
        let load = serde_json::json!({ "timeline": timeline });
        let mut faults = vec![fault(10.2), fault(30.0)];
        measure(&mut faults, &load, 15);
        assert_eq!(faults[0].recovery_seconds, Some(7));
        assert_eq!(
            (faults[0].errors, faults[0].low_rate, faults[0].usual_rate),
            (5, 2, 10)
        );
        assert_eq!(faults[1].recovery_seconds, Some(0));
        assert_eq!(faults[1].errors, 0);
    }
}
