//! What the deployment's services cost under the load: every host asked once a second over
//! one SSH connection kept open (the pipeline's connection code, as `status` uses it) for the
//! CPU time and memory of the units its roles run. systemd's own figures
//! (`CPUUsageNSec`, `MemoryCurrent`) when it keeps them; otherwise (lab machines on a box
//! whose cgroup controllers are not delegated to the machines: systemd says `[not set]`) the
//! sums over the unit's processes from /proc (user and system time of each, and of its reaped
//! children; resident set sizes). A fact: a remote command and a pure parser of its output.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;

use crate::inventory::{Host, Inventory, Role};
use crate::pipeline::Pipeline;

/// Prints the host's uptime (the clock the figures are read against: a sample that comes
/// back late over a busy SSH connection still covers the time it covers), `systemctl show`
/// for the units given as arguments, then, for each unit's control group, the `/proc/<pid>/stat` lines of every process in it (and in its children), after a
/// `cgroup <path>` line. Units are arguments (`$@`), never written into the script.
const SCRIPT: &str = r#"printf 'uptime %s\n' "$(cut -d ' ' -f 1 /proc/uptime)"
out=$(systemctl show -p Id -p CPUUsageNSec -p MemoryCurrent -p ControlGroup "$@")
printf '%s\n\n' "$out"
printf '%s\n' "$out" | sed -n 's/^ControlGroup=//p' | while read -r cg; do
  [ -n "$cg" ] || continue
  for root in /sys/fs/cgroup/systemd /sys/fs/cgroup/unified /sys/fs/cgroup; do
    if [ -d "$root$cg" ]; then
      printf 'cgroup %s\n' "$cg"
      find "$root$cg" -name cgroup.procs -exec cat {} + 2>/dev/null | sed 's|^|/proc/|; s|$|/stat|' | xargs -r cat 2>/dev/null
      break
    fi
  done
done"#;

/// The units a host's roles run (the names the roles' `service` tasks give).
pub fn units(inv: &Inventory, host: &Host) -> Vec<String> {
    let mut out = Vec::new();
    for role in &host.roles {
        let unit = match role {
            Role::Backend => "sage-backend".to_string(),
            Role::Worker => "sage-worker".to_string(),
            Role::Logd => "sage-logd".to_string(),
            Role::Loadbalancer => "haproxy".to_string(),
            Role::Static => "nginx".to_string(),
            Role::Cache => "memcached".to_string(),
            Role::Database => {
                let version = crate::roles::Catalog::embedded()
                    .ok()
                    .and_then(|c| {
                        crate::render::host_vars(inv, c, host)
                            .get("postgres_version")
                            .and_then(|v| v.as_str().map(str::to_string))
                    })
                    .unwrap_or_else(|| "15".into());
                format!("postgresql@{version}-main")
            }
            _ => continue,
        };
        out.push(unit);
    }
    out
}

/// One unit's figures in one sample.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnitSample {
    /// systemd's accounting, when it keeps it.
    pub cpu_ns: Option<u64>,
    pub memory: Option<u64>,
    pub cgroup: Option<String>,
    /// Sums over the unit's processes: clock ticks (user, system, and reaped children's).
    pub proc_ticks: u64,
    /// Resident pages.
    pub proc_rss_pages: u64,
    pub procs: u32,
}

/// A value of `systemctl show`: None for `[not set]`, empty, or "infinity".
fn number(v: &str) -> Option<u64> {
    v.parse().ok().filter(|n| *n != u64::MAX)
}

/// What one run of the script gave.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample {
    /// The host's seconds since boot when it was taken.
    pub uptime: Option<f64>,
    /// Each unit (by its name without `.service`) and its figures.
    pub units: BTreeMap<String, UnitSample>,
}

/// Reads the script's output.
pub fn parse(out: &str) -> Sample {
    let mut uptime = None;
    let mut units: BTreeMap<String, UnitSample> = BTreeMap::new();
    let mut block = UnitSample::default();
    let mut id: Option<String> = None;
    let mut current: Option<String> = None;
    let flush = |units: &mut BTreeMap<String, UnitSample>,
                 id: &mut Option<String>,
                 block: &mut UnitSample| {
        if let Some(i) = id.take() {
            let name = i.strip_suffix(".service").unwrap_or(&i).to_string();
            units.insert(name, std::mem::take(block));
        }
        *block = UnitSample::default();
    };
    for line in out.lines() {
        if line.as_bytes().first().is_some_and(u8::is_ascii_digit) {
            // pid (comm) state ppid ... utime stime cutime cstime ... rss
            let Some(unit) = current.as_ref().and_then(|u| units.get_mut(u)) else {
                continue;
            };
            let Some((_, rest)) = line.rsplit_once(')') else {
                continue;
            };
            let f: Vec<&str> = rest.split_whitespace().collect();
            let field = |i: usize| f.get(i).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
            if f.len() > 21 {
                unit.proc_ticks += (field(11) + field(12) + field(13) + field(14)).max(0) as u64;
                unit.proc_rss_pages += field(21).max(0) as u64;
                unit.procs += 1;
            }
        } else if let Some(u) = line.strip_prefix("uptime ") {
            uptime = u.trim().parse().ok();
        } else if let Some(cg) = line.strip_prefix("cgroup ") {
            flush(&mut units, &mut id, &mut block);
            current = units
                .iter()
                .find(|(_, u)| u.cgroup.as_deref() == Some(cg))
                .map(|(n, _)| n.clone());
        } else if line.is_empty() {
            flush(&mut units, &mut id, &mut block);
        } else if let Some((k, v)) = line.split_once('=') {
            match k {
                "Id" => id = Some(v.to_string()),
                "CPUUsageNSec" => block.cpu_ns = number(v),
                "MemoryCurrent" => block.memory = number(v),
                "ControlGroup" if !v.is_empty() => block.cgroup = Some(v.to_string()),
                _ => {}
            }
        }
    }
    flush(&mut units, &mut id, &mut block);
    Sample { uptime, units }
}

/// Where a unit's figures come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// systemd's CPUUsageNSec and MemoryCurrent.
    Systemd,
    /// Sums over the unit's processes (/proc).
    Processes,
}

/// A unit's figures over the run.
#[derive(Clone, Debug, Serialize)]
pub struct UnitReport {
    pub host: String,
    pub unit: String,
    pub source: Source,
    /// CPU as % of one core, averaged over the samples of the run.
    pub cpu_percent: f64,
    /// The same over the steady phase.
    pub cpu_percent_steady: Option<f64>,
    /// The busiest second.
    pub cpu_peak_percent: f64,
    pub memory_peak_bytes: Option<u64>,
    /// Processes in the unit at the last sample (process sums only).
    pub processes: Option<u32>,
    /// Seconds since the run's start and CPU % of one core, one per sample.
    pub series: Vec<(f32, f32)>,
}

/// What sampling found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HostsReport {
    pub units: Vec<UnitReport>,
    /// Hosts that could not be sampled, and why.
    pub errors: Vec<String>,
}

/// A unit's running figures.
struct Track {
    host: String,
    unit: String,
    source: Source,
    /// The last sample: when (the host's uptime when it gives one, else when it came) and the
    /// CPU nanoseconds then.
    last: Option<(f64, f64)>,
    mem_peak: Option<u64>,
    procs: Option<u32>,
    series: Vec<(f32, f32)>,
}

impl Track {
    fn add(
        &mut self,
        started: Instant,
        at: Instant,
        uptime: Option<f64>,
        s: &UnitSample,
        tick_ns: f64,
        page: u64,
    ) {
        let when = uptime.unwrap_or_else(|| at.duration_since(started).as_secs_f64());
        let (cpu_ns, mem) = match (s.cpu_ns, self.source) {
            (Some(ns), _) => {
                self.source = Source::Systemd;
                (ns as f64, s.memory)
            }
            (None, _) => {
                self.source = Source::Processes;
                self.procs = Some(s.procs);
                (s.proc_ticks as f64 * tick_ns, Some(s.proc_rss_pages * page))
            }
        };
        if let Some(m) = mem {
            self.mem_peak = Some(self.mem_peak.map_or(m, |p| p.max(m)));
        }
        if let Some((t0, c0)) = self.last {
            let dt = when - t0;
            if dt > 0.0 {
                // A process that left (reaped outside the unit) takes its time with it: a
                // drop is counted as nothing, not as negative work.
                let pct = ((cpu_ns - c0).max(0.0) / 1e9 / dt * 100.0) as f32;
                let t = at.duration_since(started).as_secs_f32();
                self.series.push((t, pct));
            }
        }
        self.last = Some((when, cpu_ns));
    }

    fn report(self, steady: Option<(f32, f32)>) -> UnitReport {
        let mean = |v: &mut dyn Iterator<Item = f32>| {
            let (n, sum) = v.fold((0u32, 0f64), |(n, s), x| (n + 1, s + f64::from(x)));
            (n > 0).then(|| sum / f64::from(n))
        };
        let all = mean(&mut self.series.iter().map(|(_, p)| *p)).unwrap_or(0.0);
        let steady = steady.and_then(|(a, b)| {
            mean(
                &mut self
                    .series
                    .iter()
                    .filter(|(t, _)| *t >= a && *t <= b)
                    .map(|(_, p)| *p),
            )
        });
        let peak = self.series.iter().map(|(_, p)| *p).fold(0f32, f32::max);
        UnitReport {
            host: self.host,
            unit: self.unit,
            source: self.source,
            cpu_percent: all,
            cpu_percent_steady: steady,
            cpu_peak_percent: f64::from(peak),
            memory_peak_bytes: self.mem_peak,
            processes: self.procs,
            series: self.series,
        }
    }
}

/// Samples every host of `p` once a second until `stop`: per unit, its tracks.
pub async fn sample(
    p: Arc<Pipeline>,
    started: Instant,
    mut stop: watch::Receiver<bool>,
) -> (Vec<TrackSet>, Vec<String>) {
    let mut tasks = tokio::task::JoinSet::new();
    for host in &p.inv.hosts {
        let units = units(&p.inv, host);
        if units.is_empty() {
            continue;
        }
        let (p, name, stop) = (p.clone(), host.name.clone(), stop.clone());
        tasks.spawn(async move { sample_host(p, name, units, started, stop).await });
    }
    let mut sets = Vec::new();
    let mut errors = Vec::new();
    let _ = stop.wait_for(|s| *s).await;
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok((set, err)) => {
                sets.push(set);
                errors.extend(err);
            }
            Err(e) => errors.push(format!("a sampling task failed: {e}")),
        }
    }
    sets.sort_by(|a, b| a.host.cmp(&b.host));
    (sets, errors)
}

/// One host's tracks.
pub struct TrackSet {
    host: String,
    tracks: Vec<Track>,
}

impl TrackSet {
    /// The reports, the steady phase given as seconds since the start.
    pub fn reports(self, steady: Option<(f32, f32)>) -> Vec<UnitReport> {
        self.tracks.into_iter().map(|t| t.report(steady)).collect()
    }
}

async fn sample_host(
    p: Arc<Pipeline>,
    name: String,
    units: Vec<String>,
    started: Instant,
    stop: watch::Receiver<bool>,
) -> (TrackSet, Option<String>) {
    let mut set = TrackSet {
        host: name.clone(),
        tracks: units
            .iter()
            .map(|u| Track {
                host: name.clone(),
                unit: u.clone(),
                source: Source::Systemd,
                last: None,
                mem_peak: None,
                procs: None,
                series: Vec::new(),
            })
            .collect(),
    };
    let mut error = None;
    let mut argv: Vec<&str> = vec!["sh", "-c", SCRIPT, "sh"];
    argv.extend(units.iter().map(String::as_str));
    let mut session = None;
    let (mut tick_ns, mut page) = (1e7, 4096u64);
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while !*stop.borrow() {
        every.tick().await;
        if session.is_none() {
            match p.session(&name).await {
                Ok(s) => {
                    // The units of /proc's figures, once.
                    let cf = s
                        .run(
                            &["sh", "-c", "getconf CLK_TCK; getconf PAGESIZE"],
                            b"",
                            Duration::from_secs(5),
                        )
                        .await;
                    if let Ok(o) = cf {
                        let v: Vec<u64> = o
                            .stdout_text()
                            .lines()
                            .filter_map(|l| l.trim().parse().ok())
                            .collect();
                        if let [hz, pg] = v[..] {
                            tick_ns = 1e9 / hz.max(1) as f64;
                            page = pg;
                        }
                    }
                    session = Some(s);
                }
                Err(e) => {
                    error = Some(format!("{name}: {e}"));
                    continue;
                }
            }
        }
        let s = session.as_ref().expect("connected above");
        match s.run(&argv, b"", Duration::from_secs(5)).await {
            Ok(o) if o.ok() => {
                let at = Instant::now();
                let got = parse(&o.stdout_text());
                for t in &mut set.tracks {
                    if let Some(u) = got.units.get(&t.unit) {
                        t.add(started, at, got.uptime, u, tick_ns, page);
                    }
                }
            }
            Ok(o) => error = Some(format!("{name}: sampling failed: {}", o.tail())),
            Err(e) => {
                error = Some(format!("{name}: {e}"));
                if let Some(s) = session.take() {
                    s.close().await;
                }
            }
        }
    }
    if let Some(s) = session.take() {
        s.close().await;
    }
    (set, error)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAB_OUTPUT: &str = "uptime 41956.95
MemoryCurrent=[not set]
CPUUsageNSec=[not set]
Id=sage-worker.service
ControlGroup=/system.slice/sage-worker.service

MemoryCurrent=[not set]
CPUUsageNSec=[not set]
Id=nftables.service
ControlGroup=

cgroup /system.slice/sage-worker.service
51 (sage-agent) S 1 51 51 0 -1 4194560 5365 0 0 0 120 30 7 3 20 0 9 0 4145 1395580928 4096 18446744073709551615 1 1 0 0 0 0 0 4096 17415 0 0 0 17 1 0 0 0 0 0
59 (python3 (engine) S 51 59 59 0 -1 4194560 5365 0 0 0 200 50 0 0 20 0 1 0 4145 95580928 1000 18446744073709551615 1 1 0 0 0 0 0 4096 17415 0 0 0 17 1 0 0 0 0 0
";

    const SYSTEMD_OUTPUT: &str = "Id=sage-backend.service
CPUUsageNSec=1500000000
MemoryCurrent=20971520
ControlGroup=/system.slice/sage-backend.service

cgroup /system.slice/sage-backend.service
812 (sage-agent) S 1 812 812 0 -1 4194560 5365 0 0 0 100 50 0 0 20 0 9 0 4145 1395580928 5120 18446744073709551615 1 1 0 0 0 0 0 4096 17415 0 0 0 17 1 0 0 0 0 0
";

    #[test]
    fn process_sums_when_systemd_keeps_no_figures() {
        let s = parse(LAB_OUTPUT);
        assert_eq!(s.uptime, Some(41956.95));
        let u = s.units;
        let w = &u["sage-worker"];
        assert_eq!(w.cpu_ns, None);
        assert_eq!(w.memory, None);
        // 120+30+7+3 and 200+50: a command name with a parenthesis and a space is read from
        // its last ')'.
        assert_eq!(w.proc_ticks, 160 + 250);
        assert_eq!(w.proc_rss_pages, 4096 + 1000);
        assert_eq!(w.procs, 2);
        assert_eq!(u["nftables"], UnitSample::default());
    }

    #[test]
    fn systemd_figures_when_it_keeps_them() {
        let u = parse(SYSTEMD_OUTPUT).units;
        assert_eq!(parse(SYSTEMD_OUTPUT).uptime, None);
        let b = &u["sage-backend"];
        assert_eq!(
            (b.cpu_ns, b.memory),
            (Some(1_500_000_000), Some(20_971_520))
        );
        assert_eq!(b.procs, 1);
        assert!(
            parse("Id=x.service\nMemoryCurrent=18446744073709551615\n").units["x"]
                .memory
                .is_none()
        );
    }

    #[test]
    fn cpu_percent_from_successive_samples() {
        let t0 = Instant::now();
        let mut t = Track {
            host: "h".into(),
            unit: "u".into(),
            source: Source::Systemd,
            last: None,
            mem_peak: None,
            procs: None,
            series: Vec::new(),
        };
        let s = |ns, mem| UnitSample {
            cpu_ns: Some(ns),
            memory: Some(mem),
            ..Default::default()
        };
        t.add(
            t0,
            t0 + Duration::from_secs(1),
            None,
            &s(1_000_000_000, 10),
            1e7,
            4096,
        );
        t.add(
            t0,
            t0 + Duration::from_secs(2),
            None,
            &s(1_500_000_000, 30),
            1e7,
            4096,
        );
        t.add(
            t0,
            t0 + Duration::from_secs(4),
            None,
            &s(3_500_000_000, 20),
            1e7,
            4096,
        );
        let r = t.report(Some((3.0, 5.0)));
        assert_eq!(r.series.len(), 2);
        assert!((r.series[0].1 - 50.0).abs() < 0.01, "{:?}", r.series);
        assert!((r.series[1].1 - 100.0).abs() < 0.01);
        assert!((r.cpu_percent - 75.0).abs() < 0.01);
        assert_eq!(r.cpu_percent_steady.map(|v| v.round()), Some(100.0));
        assert!((r.cpu_peak_percent - 100.0).abs() < 0.01);
        assert_eq!(r.memory_peak_bytes, Some(30));
        assert_eq!(r.source, Source::Systemd);
    }

    #[test]
    fn a_late_sample_is_read_against_the_hosts_clock() {
        // The second sample came back 1.5 s after the first over a busy connection, yet it
        // was taken 1 s later on the host: 1 s of work in 1 s, not 0.67.
        let t0 = Instant::now();
        let mut t = Track {
            host: "h".into(),
            unit: "u".into(),
            source: Source::Systemd,
            last: None,
            mem_peak: None,
            procs: None,
            series: Vec::new(),
        };
        let s = |ns| UnitSample {
            cpu_ns: Some(ns),
            ..Default::default()
        };
        t.add(t0, t0, Some(100.0), &s(0), 1e7, 4096);
        t.add(
            t0,
            t0 + Duration::from_millis(1500),
            Some(101.0),
            &s(1_000_000_000),
            1e7,
            4096,
        );
        assert!((t.series[0].1 - 100.0).abs() < 0.01, "{:?}", t.series);
    }

    #[test]
    fn units_follow_the_roles() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../inventories/lab.yaml");
        let inv = Inventory::load(&path).unwrap();
        let of = |h: &str| units(&inv, inv.host(h).unwrap());
        assert!(
            of("lb").contains(&"haproxy".to_string()) && of("lb").contains(&"nginx".to_string())
        );
        assert_eq!(of("db").len(), 2);
        assert!(of("db").contains(&"postgresql@15-main".to_string()));
        assert_eq!(of("backend1"), ["sage-backend"]);
        assert_eq!(of("worker1"), ["sage-worker"]);
        assert_eq!(of("logs"), ["sage-logd"]);
    }
}
