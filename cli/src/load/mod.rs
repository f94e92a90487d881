//! `sagectl bench load INVENTORY --users N --duration S`: N simulated browsers through the
//! deployment's HAProxy (its public name, trusting the deployment's CA), each signing up,
//! opening a workspace over SockJS (websocket, or xhr-polling for `--xhr-percent` of them) and
//! running a cell every second and a save every ten until the duration ends; then each checks
//! its workspace from the inside. A line a second; at the end the figures of each phase, the
//! errors by kind, what each service cost on each host (sampled over SSH) and the busiest one.
//! Only against lab machines or loopback: an inventory whose loadbalancer is elsewhere is
//! refused.
//!
//! ```text
//!  run ── users (one task each: user.rs) ── client.rs (the browser client's rules)
//!   │                                          └─ transport.rs (websocket, xhr-polling) ── http.rs
//!   ├─ ticker: a line a second, phases (stats.rs)
//!   └─ hosts.rs: systemctl / /proc over SSH, once a second per host ──▶ report.rs
//! ```

pub mod client;
pub mod hosts;
pub mod http;
pub mod proto;
pub mod report;
pub mod stats;
pub mod transport;
pub mod user;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::watch;

use crate::inventory::{Inventory, Role};
use crate::net::Cidr;
use report::{Latency, Local, PhaseReport, Report, SecondLine, SignupReport};
use stats::{Kind, Phase, Shared, percentile};

/// The load is sent to HAProxy's HTTPS port.
const HTTPS_PORT: u16 = 443;

/// The sign-up phase ends when every user works or gave up, or this long after the ramp.
const SIGNUP_CAP: Duration = Duration::from_secs(150);

/// Users still busy this long after the load stopped are left (counted as not finished).
const ENDING_CAP: Duration = Duration::from_secs(300);

/// Every user's password (the accounts are the load generator's own).
const PASSWORD: &str = "sagectl-bench-load-password";

#[derive(clap::Args, Clone, Debug)]
pub struct Opts {
    /// The inventory of the deployment to load: its loadbalancer must be a lab machine (inside
    /// its `lab.subnet`) or a loopback address.
    pub inventory: PathBuf,
    /// Simulated browsers.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=2000))]
    pub users: u32,
    /// Seconds of steady load, once every user is working.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..=3600))]
    pub duration: u32,
    /// Seconds over which users start, so that sign-ups (a password hash each on the
    /// backend) do not all land at once [default: users / 50, at most 10].
    #[arg(long, value_parser = ramp_seconds)]
    pub ramp: Option<f64>,
    /// Seconds between a user's cells (each saves every 10 s whatever this is): below 1, a
    /// user stands for several people's cells on its one workspace.
    #[arg(long, default_value_t = 1.0, value_parser = interval_seconds)]
    pub interval: f64,
    /// Percentage of users on SockJS xhr-polling; the others use websocket.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub xhr_percent: u8,
    /// Names the accounts `load-<tag>-<n>` [default: a new tag each run]. A tag used before
    /// signs in to its accounts instead of making them.
    #[arg(long, value_parser = tag)]
    pub tag: Option<String>,
    /// Local addresses to spread users over (IPs or CIDR blocks, comma-separated): the
    /// deployment limits sign-ups and sign-in requests per client address (the backend: 20
    /// accounts per 10 minutes; HAProxy: `haproxy_signin_rate` requests per 10 s).
    #[arg(long, value_delimiter = ',')]
    pub source: Vec<String>,
    /// Write the whole report, every user's record included, as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Exit non-zero on any error at all (otherwise only on lost cells or saves and hung
    /// cells).
    #[arg(long)]
    pub strict: bool,
    /// Keep the users' workspaces (by default each is deleted once its check passed).
    #[arg(long)]
    pub keep: bool,
    /// Do not sample the hosts' services over SSH.
    #[arg(long)]
    pub no_hosts: bool,
}

fn ramp_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=600.0).contains(&v) => Ok(v),
        _ => Err("give seconds between 0 and 600".into()),
    }
}

fn interval_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.01..=60.0).contains(&v) => Ok(v),
        _ => Err("give seconds between 0.01 and 60".into()),
    }
}

fn tag(s: &str) -> Result<String, String> {
    let ok = (1..=16).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.');
    if ok {
        Ok(s.to_string())
    } else {
        Err(
            "1 to 16 lowercase letters, digits, '_' or '.' (account names are load-<tag>-<n>)"
                .into(),
        )
    }
}

/// The loadbalancer to load, if the inventory allows it: its name and address. Only lab
/// machines (inside `lab.subnet`) and loopback addresses are loaded.
pub fn target(inv: &Inventory) -> Result<(String, IpAddr), String> {
    let lbs: Vec<_> = inv.with_role(Role::Loadbalancer).collect();
    let Some(first) = lbs.first() else {
        return Err(format!(
            "{}: no host has the loadbalancer role: there is no HAProxy to send browsers to",
            inv.file.display()
        ));
    };
    for lb in &lbs {
        let a = lb.address;
        let in_lab = inv.lab.as_ref().is_some_and(|l| l.subnet.contains(a));
        if !a.is_loopback() && !in_lab {
            let lab = match &inv.lab {
                Some(l) => format!("outside its lab.subnet {}", l.subnet),
                None => "and it has no lab: section".into(),
            };
            return Err(format!(
                "refusing to load {}: its loadbalancer {} ({a}) is not a loopback address, {lab}\n  hint: `bench load` sends load only to lab machines and loopback deployments, never to a real one",
                inv.file.display(),
                lb.name
            ));
        }
    }
    Ok((first.name.clone(), first.address))
}

/// The addresses `--source` names, every address of a CIDR block (but its network and
/// broadcast addresses, for IPv4 blocks larger than two addresses).
pub fn sources(given: &[String]) -> Result<Vec<IpAddr>, String> {
    const MAX: usize = 4096;
    let mut out = Vec::new();
    for g in given.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        let c: Cidr = g.parse().map_err(|e| format!("--source {g}: {e}"))?;
        let bits = if c.addr().is_ipv4() { 32 } else { 128 };
        let host_bits = bits - u32::from(c.prefix());
        if host_bits > 12 {
            return Err(format!(
                "--source {g}: {} addresses; give at most {MAX}",
                if host_bits >= 64 {
                    "too many".to_string()
                } else {
                    (1u64 << host_bits).to_string()
                }
            ));
        }
        let n = 1u128 << host_bits;
        let (first, last) = if c.addr().is_ipv4() && host_bits >= 2 {
            (1, n - 1)
        } else {
            (0, n)
        };
        for i in first..last {
            if let Some(a) = c.nth(i) {
                out.push(a);
            }
        }
    }
    if out.len() > MAX {
        return Err(format!(
            "--source: {} addresses; give at most {MAX}",
            out.len()
        ));
    }
    Ok(out)
}

/// Whether user `n` of `users` uses xhr-polling: `percent` of them, spread evenly.
pub fn is_xhr(n: u32, percent: u8) -> bool {
    let p = u64::from(percent);
    (u64::from(n) + 1) * p / 100 > u64::from(n) * p / 100
}

fn random_tag() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 3];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// CPU seconds this process used.
fn own_cpu() -> (f64, u64) {
    // SAFETY: getrusage writes into the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    (
        t(ru.ru_utime) + t(ru.ru_stime),
        ru.ru_maxrss.max(0) as u64 * 1024,
    )
}

/// This machine's busy and total jiffies (all cores).
fn machine_jiffies() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = s
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

pub fn run(o: Opts) -> anyhow::Result<ExitCode> {
    let inv = match crate::command::load(&o.inventory) {
        Ok(inv) => inv,
        Err(code) => return Ok(code),
    };
    let (lb, addr) = target(&inv).map_err(|e| anyhow::anyhow!(e))?;
    let ca = crate::pki::dir_for(&inv).join("ca.crt");
    anyhow::ensure!(
        ca.is_file(),
        "{} is missing: the deployment's CA is made by `sagectl up`\n  hint: deploy the inventory first",
        ca.display()
    );
    let site = Arc::new(http::Site::new(
        &inv.tls.public_name,
        SocketAddr::new(addr, HTTPS_PORT),
        &ca,
    )?);
    let sources = sources(&o.source).map_err(|e| anyhow::anyhow!(e))?;
    for s in &sources {
        std::net::TcpListener::bind((*s, 0)).with_context(|| {
            format!("--source {s}: not an address of this machine\n  hint: add it first, e.g. `ip addr add {s}/32 dev lo` (or on the lab's bridge)")
        })?;
    }
    let ramp = o.ramp.unwrap_or((f64::from(o.users) / 50.0).min(10.0));
    let tag = o.tag.clone().unwrap_or_else(random_tag);
    let addresses = sources.len().max(1) as u32;
    if o.users > 20 * addresses && o.tag.is_none() {
        eprintln!(
            "note: the backend lets one client address make 20 accounts per 10 minutes: {} new accounts from {addresses} address(es) will wait (throttled); spread them with --source, or reuse accounts with --tag",
            o.users
        );
    }
    // SSH to every host, as `status` connects (pinned keys, the lab's key); set up before
    // the runtime (it may read files and start nothing).
    let pipeline = if o.no_hosts {
        None
    } else {
        let settings = crate::pipeline::Settings {
            check: true,
            quiet: true,
            host_keys: crate::ssh::HostKeyPolicy::Strict,
            ..Default::default()
        };
        match crate::pipeline::Pipeline::new(inv.clone(), &[], settings) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("note: the hosts will not be sampled: {e:#}");
                None
            }
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let shared = Arc::new(Shared::new());
    let plan = Arc::new(user::Plan {
        site: site.clone(),
        shared: shared.clone(),
        tag: tag.clone(),
        password: PASSWORD.into(),
        stamp,
        keep: o.keep,
        interval: Duration::from_secs_f64(o.interval),
    });
    let xhr_users = (0..o.users).filter(|n| is_xhr(*n, o.xhr_percent)).count() as u32;
    println!(
        "loading {} through {lb} ({}): {} users ({} websocket, {xhr_users} xhr-polling) started over {ramp:.1} s, then {} s of steady load; tag {tag}",
        inv.name,
        site.addr,
        o.users,
        o.users - xhr_users,
        o.duration
    );
    let cpu0 = own_cpu().0;
    let jiffies0 = machine_jiffies();
    let run = Run {
        o: &o,
        plan,
        shared: shared.clone(),
        sources: &sources,
        ramp,
    };
    let out = rt.block_on(run.go(pipeline));
    let (cpu1, rss) = own_cpu();
    let wall = shared.started.elapsed().as_secs_f64();
    let machine = match (jiffies0, machine_jiffies()) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
            Some((b1 - b0) as f64 / (t1 - t0) as f64 * 100.0)
        }
        _ => None,
    };
    let local = Local {
        generator_cpu_percent: (cpu1 - cpu0) / wall.max(1e-9) * 100.0,
        generator_peak_rss_bytes: rss,
        machine_busy_percent: machine,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let report = out.report(&inv, &site, &tag, &o, ramp, &sources, xhr_users, local);
    print!("{}", report.text());
    if let Some(path) = &o.json {
        let text = serde_json::to_string_pretty(&report).expect("serializable");
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        println!("report written to {}", path.display());
    }
    Ok(if report.failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

struct Run<'a> {
    o: &'a Opts,
    plan: Arc<user::Plan>,
    shared: Arc<Shared>,
    sources: &'a [IpAddr],
    ramp: f64,
}

/// What sampling the hosts gave.
struct HostsParts {
    sets: Vec<hosts::TrackSet>,
    errors: Vec<String>,
}

/// What the run gathered, before the report.
struct Outcome {
    shared: Arc<Shared>,
    users: Vec<user::UserRecord>,
    timeline: Vec<SecondLine>,
    /// Seconds since the start: the steady phase's, and the stop.
    steady: Option<(f64, f64)>,
    stopped_at: f64,
    ended_at: f64,
    interrupted: bool,
    hosts: HostsParts,
}

impl Run<'_> {
    async fn go(self, pipeline: Option<Arc<crate::pipeline::Pipeline>>) -> Outcome {
        let users = self.o.users;
        let (stop_tx, stop_rx) = watch::channel(false);
        let (samp_tx, samp_rx) = watch::channel(false);
        let sampler = pipeline.map(|p| {
            let started = self.shared.started;
            tokio::spawn(hosts::sample(p, started, samp_rx))
        });
        let t0 = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for n in 0..users {
            let kind = if is_xhr(n, self.o.xhr_percent) {
                transport::Kind::XhrPolling
            } else {
                transport::Kind::Websocket
            };
            let source =
                (!self.sources.is_empty()).then(|| self.sources[n as usize % self.sources.len()]);
            let at = t0 + Duration::from_secs_f64(self.ramp * f64::from(n) / f64::from(users));
            tasks.spawn(user::run(
                n,
                kind,
                source,
                self.plan.clone(),
                at,
                stop_rx.clone(),
            ));
        }
        let mut timeline = Vec::new();
        let mut steady_start: Option<f64> = None;
        let mut stopped: Option<f64> = None;
        let mut interrupted = false;
        let mut every =
            tokio::time::interval_at((t0 + Duration::from_secs(1)).into(), Duration::from_secs(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        let mut records = Vec::new();
        let sh = &self.shared;
        loop {
            tokio::select! {
                _ = every.tick() => {}
                r = tasks.join_next(), if !tasks.is_empty() => {
                    if let Some(Ok(rec)) = r {
                        records.push(rec);
                    }
                    continue;
                }
                _ = &mut ctrl_c, if stopped.is_none() => {
                    eprintln!("interrupted: stopping the load, then verifying (Ctrl-C again to quit at once)");
                    interrupted = true;
                    stopped = Some(sh.started.elapsed().as_secs_f64());
                    sh.set_phase(Phase::Ending);
                    let _ = stop_tx.send(true);
                    tokio::spawn(async {
                        let _ = tokio::signal::ctrl_c().await;
                        std::process::exit(130);
                    });
                    continue;
                }
            }
            let now = sh.started.elapsed().as_secs_f64();
            let second = sh.take_second();
            let mut lat = second.latencies;
            lat.sort_unstable();
            let line = SecondLine {
                t: now.round() as u32,
                users_connected: sh.connected.load(Ordering::Relaxed),
                executes: second.executes,
                saves_total: sh.saves.load(Ordering::Relaxed),
                p50_ms: percentile(&lat, 50.0).map(|v| v as f64 / 1000.0),
                p99_ms: percentile(&lat, 99.0).map(|v| v as f64 / 1000.0),
                errors_total: sh.errors.lock().unwrap().total(),
            };
            println!("{}", line.text(users));
            timeline.push(line);
            let settled = sh.ready.load(Ordering::SeqCst) + sh.gave_up.load(Ordering::SeqCst);
            match (steady_start, stopped) {
                (None, None)
                    if settled >= users
                        || t0.elapsed() > Duration::from_secs_f64(self.ramp) + SIGNUP_CAP =>
                {
                    steady_start = Some(now);
                    sh.set_phase(Phase::Steady);
                    println!(
                        "steady phase: {} users working, {} gave up",
                        sh.ready.load(Ordering::SeqCst),
                        sh.gave_up.load(Ordering::SeqCst)
                    );
                }
                (Some(s), None) if now - s >= f64::from(self.o.duration) - 0.5 => {
                    stopped = Some(now);
                    sh.set_phase(Phase::Ending);
                    let _ = stop_tx.send(true);
                    println!("stopping: the users finish their cell, then check their workspace");
                }
                _ => {}
            }
            let finished = sh.finished.load(Ordering::SeqCst);
            if let Some(s) = stopped {
                if tasks.is_empty() || finished >= users {
                    break;
                }
                if now - s > ENDING_CAP.as_secs_f64() {
                    eprintln!(
                        "{} users did not finish within {} s of the stop: left",
                        users - finished,
                        ENDING_CAP.as_secs()
                    );
                    tasks.abort_all();
                    break;
                }
            }
        }
        while let Some(r) = tasks.join_next().await {
            if let Ok(rec) = r {
                records.push(rec);
            }
        }
        let ended_at = sh.started.elapsed().as_secs_f64();
        let mut got: Vec<u32> = records.iter().map(|r| r.user).collect();
        got.sort_unstable();
        for n in 0..users {
            if got.binary_search(&n).is_err() {
                sh.error(
                    Kind::Timeout,
                    format!(
                        "user {n} did not finish within {} s of the stop",
                        ENDING_CAP.as_secs()
                    ),
                );
            }
        }
        records.sort_by_key(|r| r.user);
        let _ = samp_tx.send(true);
        let hosts = match sampler {
            Some(h) => match h.await {
                Ok((sets, errors)) => HostsParts { sets, errors },
                Err(e) => HostsParts {
                    sets: Vec::new(),
                    errors: vec![format!("the sampler failed: {e}")],
                },
            },
            None => HostsParts {
                sets: Vec::new(),
                errors: if self.o.no_hosts {
                    Vec::new()
                } else {
                    vec!["no SSH setup for the hosts (see the note above)".into()]
                },
            },
        };
        let stopped_at = stopped.unwrap_or(ended_at);
        Outcome {
            shared: self.shared.clone(),
            users: records,
            timeline,
            steady: steady_start.map(|s| (s, stopped_at)),
            stopped_at,
            ended_at,
            interrupted,
            hosts,
        }
    }
}

impl Outcome {
    #[allow(clippy::too_many_arguments)]
    fn report(
        self,
        inv: &Inventory,
        site: &http::Site,
        tag: &str,
        o: &Opts,
        ramp: f64,
        sources: &[IpAddr],
        xhr_users: u32,
        local: Local,
    ) -> Report {
        let sh = &self.shared;
        let phase = |f: &std::sync::Mutex<stats::PhaseFigures>, seconds: f64| {
            let f = f.lock().unwrap();
            PhaseReport {
                seconds,
                executes: f.executes,
                executes_per_second: if seconds > 0.0 {
                    f.executes as f64 / seconds
                } else {
                    0.0
                },
                saves: f.saves,
                execute_latency: Latency::of(&f.latency),
            }
        };
        let (signup_s, steady_s) = match self.steady {
            Some((a, b)) => (a, b - a),
            None => (self.stopped_at, 0.0),
        };
        let steady_window = self.steady.map(|(a, b)| (a as f32, b as f32));
        let mut units = Vec::new();
        for set in self.hosts.sets {
            units.extend(set.reports(steady_window));
        }
        let errors = sh.errors.lock().unwrap().clone();
        let failed = errors.any_fatal() || (o.strict && errors.total() > 0);
        let verified = self.users.iter().filter(|u| u.verification.ok).count() as u32;
        let failed_verification = self
            .users
            .iter()
            .filter(|u| u.gave_up.is_none() && !u.verification.ok)
            .count() as u32;
        Report {
            inventory: inv.name.clone(),
            public_name: site.name.clone(),
            target: site.addr.to_string(),
            tag: tag.to_string(),
            users: o.users,
            websocket_users: o.users - xhr_users,
            xhr_polling_users: xhr_users,
            duration_seconds: o.duration,
            ramp_seconds: ramp,
            source_addresses: sources.to_vec(),
            interrupted: self.interrupted,
            signup_phase: phase(&sh.signup, signup_s),
            signup: SignupReport {
                signups: sh.signups.load(Ordering::SeqCst),
                signins: sh.signins.load(Ordering::SeqCst),
                users_ready: sh.ready.load(Ordering::SeqCst),
                users_gave_up: sh.gave_up.load(Ordering::SeqCst),
                request_latency: Latency::of(&sh.signup_latency.lock().unwrap()),
                ready_latency: Latency::of(&sh.ready_latency.lock().unwrap()),
            },
            steady_phase: phase(&sh.steady, steady_s),
            ending_phase: phase(&sh.ending, self.ended_at - self.stopped_at),
            executes: sh.executes.load(Ordering::SeqCst),
            saves: sh.saves.load(Ordering::SeqCst),
            sessions_moved: sh.moved.load(Ordering::SeqCst),
            reconnects: sh.reconnects.load(Ordering::SeqCst),
            users_verified: verified,
            users_failed_verification: failed_verification,
            errors_total: errors.total(),
            errors,
            busiest: report::busiest(&units),
            hosts: hosts::HostsReport {
                units,
                errors: self.hosts.errors,
            },
            this_machine: local,
            timeline: self.timeline,
            user_records: self.users,
            failed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<Opts, String> {
        let mut argv = vec!["sagectl", "bench", "load", "inv.yaml"];
        argv.extend_from_slice(args);
        match crate::command::Cli::try_parse_from(argv) {
            Ok(cli) => match cli.command {
                crate::command::Command::Bench(b) => match b.what {
                    crate::command::bench::What::Load(o) => Ok(o),
                    _ => Err("not load".into()),
                },
                _ => Err("not bench".into()),
            },
            Err(e) => Err(e.to_string()),
        }
    }

    #[test]
    fn users_and_duration_are_bounded() {
        let o = parse(&[]).unwrap();
        assert_eq!(
            (o.users, o.duration, o.xhr_percent, o.ramp),
            (10, 60, 10, None)
        );
        assert_eq!(parse(&["--users", "2000"]).unwrap().users, 2000);
        assert_eq!(
            parse(&["--users", "1", "--duration", "1"])
                .unwrap()
                .duration,
            1
        );
        assert_eq!(parse(&["--duration", "3600"]).unwrap().duration, 3600);
        for bad in [
            &["--users", "0"][..],
            &["--users", "2001"],
            &["--duration", "0"],
            &["--duration", "3601"],
            &["--xhr-percent", "101"],
            &["--ramp", "-1"],
            &["--ramp", "601"],
            &["--interval", "0.005"],
            &["--interval", "61"],
            &["--tag", "Upper"],
            &["--tag", "a-b"],
            &["--tag", "seventeen-chars-x"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
        let e = parse(&["--users", "2001"]).unwrap_err();
        assert!(e.contains("2001") && e.contains("1..=2000"), "{e}");
        let o = parse(&[
            "--ramp",
            "2.5",
            "--tag",
            "t1",
            "--source",
            "10.0.0.1,10.0.0.2",
        ])
        .unwrap();
        assert_eq!(o.ramp, Some(2.5));
        assert_eq!(o.source.len(), 2);
    }

    fn inventory(text: &str) -> Inventory {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("inv.yaml");
        std::fs::write(&p, text).unwrap();
        Inventory::load(&p).unwrap_or_else(|d| panic!("{d}"))
    }

    #[test]
    fn only_lab_and_loopback_deployments_are_loaded() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../inventories");
        let lab = Inventory::load(&root.join("lab.yaml")).unwrap();
        assert_eq!(
            target(&lab),
            Ok(("lb".to_string(), "10.77.0.10".parse().unwrap()))
        );
        let real = Inventory::load(&root.join("example.yaml")).unwrap();
        let e = target(&real).unwrap_err();
        assert!(
            e.contains("refusing to load")
                && e.contains("not a loopback address")
                && e.contains("no lab: section")
                && e.contains("hint:"),
            "{e}"
        );
        let loopback = inventory(
            "name: lo\ntls: {public_name: sagews.lo.test}\nhosts:\n  all: {address: 127.0.0.1, roles: [database, cache, backend, worker, loadbalancer, static]}\n",
        );
        assert_eq!(
            target(&loopback).unwrap().1,
            "127.0.0.1".parse::<IpAddr>().unwrap()
        );
        // A lab inventory whose loadbalancer sits outside its subnet cannot validate; a
        // non-lab one on private addresses is refused.
        let private = inventory(
            "name: p\ntls: {public_name: sagews.p.test}\nhosts:\n  all: {address: 10.77.0.10, roles: [database, cache, backend, worker, loadbalancer, static]}\n",
        );
        assert!(target(&private).unwrap_err().contains("10.77.0.10"));
    }

    #[test]
    fn source_addresses_expand() {
        assert_eq!(
            sources(&["10.0.0.1".into(), "10.0.0.9".into()]).unwrap(),
            ["10.0.0.1", "10.0.0.9"].map(|a| a.parse::<IpAddr>().unwrap())
        );
        let v = sources(&["10.77.0.200/30".into()]).unwrap();
        assert_eq!(
            v,
            ["10.77.0.201", "10.77.0.202"].map(|a| a.parse::<IpAddr>().unwrap())
        );
        assert_eq!(sources(&["10.1.0.0/20".into()]).unwrap().len(), 4094);
        assert!(sources(&["10.1.0.0/16".into()]).is_err());
        assert!(sources(&["nonsense".into()]).is_err());
        assert!(sources(&[]).unwrap().is_empty());
    }

    #[test]
    fn xhr_users_are_spread_evenly() {
        let count = |users: u32, p| (0..users).filter(|n| is_xhr(*n, p)).count();
        assert_eq!(count(100, 10), 10);
        assert_eq!(count(20, 10), 2);
        assert_eq!(count(7, 0), 0);
        assert_eq!(count(7, 100), 7);
        assert_eq!(count(1000, 33), 330);
        // Every tenth user, not the first ten.
        assert!(!is_xhr(0, 10) && is_xhr(9, 10) && is_xhr(19, 10));
    }
}
