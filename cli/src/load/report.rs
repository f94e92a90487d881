//! The load run's report: figures per phase (sign-up, steady, ending), errors by kind, what
//! each unit of each host cost, the busiest one, this machine's own share, one line per
//! second, and every user's record; as text for people and as JSON (`--json`).

use std::fmt::Write as _;
use std::net::IpAddr;

use serde::Serialize;

use super::hosts::{HostsReport, UnitReport};
use super::stats::{Errors, Histogram, ms};
use super::user::UserRecord;

/// Percentiles of a latency, in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub mean_ms: Option<f64>,
}

impl Latency {
    pub fn of(h: &Histogram) -> Latency {
        let m = |v: Option<u64>| v.map(|us| us as f64 / 1000.0);
        Latency {
            count: h.len(),
            p50_ms: m(h.percentile(50.0)),
            p99_ms: m(h.percentile(99.0)),
            max_ms: m(h.max()),
            mean_ms: h.mean().map(|us| us / 1000.0),
        }
    }

    fn text(&self) -> String {
        let f = |v: Option<f64>| ms(v.map(|m| (m * 1000.0) as u64));
        format!(
            "p50 {}, p99 {}, max {}",
            f(self.p50_ms),
            f(self.p99_ms),
            f(self.max_ms)
        )
    }
}

/// One phase's figures.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PhaseReport {
    pub seconds: f64,
    pub executes: u64,
    pub executes_per_second: f64,
    pub saves: u64,
    /// Execute latency: request sent → its `done` event.
    pub execute_latency: Latency,
}

/// How users got going.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SignupReport {
    /// Accounts made by this run.
    pub signups: u64,
    /// Existing accounts signed in to.
    pub signins: u64,
    pub users_ready: u32,
    pub users_gave_up: u32,
    /// The successful sign-up (or sign-in) request's time.
    pub request_latency: Latency,
    /// From a user's start to its workspace open.
    pub ready_latency: Latency,
}

/// The load generator's own share of this machine (the lab's machines share it too).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Local {
    /// CPU of the load generator, % of one core, over the run.
    pub generator_cpu_percent: f64,
    pub generator_peak_rss_bytes: u64,
    /// All of this machine's cores, % busy over the run.
    pub machine_busy_percent: Option<f64>,
    pub cores: usize,
}

/// One second as printed.
#[derive(Clone, Debug, Serialize)]
pub struct SecondLine {
    pub t: u32,
    pub users_connected: u32,
    pub executes: u64,
    pub saves_total: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub errors_total: u64,
}

impl SecondLine {
    pub fn text(&self, users: u32) -> String {
        let f = |v: Option<f64>| ms(v.map(|m| (m * 1000.0) as u64));
        format!(
            "{:>5}s  connected {:>4}/{users}  exec {:>5}/s  saves {:>6}  p50 {:>9}  p99 {:>9}  errors {}",
            self.t,
            self.users_connected,
            self.executes,
            self.saves_total,
            f(self.p50_ms),
            f(self.p99_ms),
            self.errors_total
        )
    }
}

/// The unit that worked hardest during the steady phase (the whole run when there was
/// none).
#[derive(Clone, Debug, Serialize)]
pub struct Busiest {
    pub host: String,
    pub unit: String,
    pub cpu_percent: f64,
    pub cpu_peak_percent: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub inventory: String,
    pub public_name: String,
    pub target: String,
    pub tag: String,
    pub users: u32,
    pub websocket_users: u32,
    pub xhr_polling_users: u32,
    pub duration_seconds: u32,
    pub ramp_seconds: f64,
    pub source_addresses: Vec<IpAddr>,
    /// Why the steady phase ended early (Ctrl-C), if it did.
    pub interrupted: bool,
    pub signup_phase: PhaseReport,
    pub signup: SignupReport,
    pub steady_phase: PhaseReport,
    pub ending_phase: PhaseReport,
    pub executes: u64,
    pub saves: u64,
    pub sessions_moved: u64,
    pub reconnects: u64,
    pub users_verified: u32,
    pub users_failed_verification: u32,
    pub errors_total: u64,
    pub errors: Errors,
    pub hosts: HostsReport,
    pub busiest: Option<Busiest>,
    pub this_machine: Local,
    pub timeline: Vec<SecondLine>,
    pub user_records: Vec<UserRecord>,
    /// The exit status's reason: lost work or hung cells (or, with --strict, any error).
    pub failed: bool,
}

/// The busiest unit: highest steady-phase CPU (run average without a steady phase).
pub fn busiest(units: &[UnitReport]) -> Option<Busiest> {
    units
        .iter()
        .map(|u| (u, u.cpu_percent_steady.unwrap_or(u.cpu_percent)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(u, pct)| Busiest {
            host: u.host.clone(),
            unit: u.unit.clone(),
            cpu_percent: pct,
            cpu_peak_percent: u.cpu_peak_percent,
        })
}

fn mib(b: Option<u64>) -> String {
    b.map_or_else(
        || "-".into(),
        |b| format!("{:.1} MiB", b as f64 / 1048576.0),
    )
}

impl Report {
    /// The summary for people.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "load on {} ({} at {}): {} users ({} websocket, {} xhr-polling), tag {}{}",
            self.inventory,
            self.public_name,
            self.target,
            self.users,
            self.websocket_users,
            self.xhr_polling_users,
            self.tag,
            if self.interrupted {
                " (interrupted)"
            } else {
                ""
            }
        );
        let su = &self.signup;
        let _ = writeln!(
            s,
            "sign-up phase  {:.1} s: {} accounts made, {} signed in to, {} users working, {} gave up",
            self.signup_phase.seconds, su.signups, su.signins, su.users_ready, su.users_gave_up
        );
        let _ = writeln!(
            s,
            "               sign-up request {}; ready after {}",
            su.request_latency.text(),
            su.ready_latency.text()
        );
        let _ = writeln!(
            s,
            "               {} executes, {} saves meanwhile ({})",
            self.signup_phase.executes,
            self.signup_phase.saves,
            self.signup_phase.execute_latency.text()
        );
        let st = &self.steady_phase;
        let _ = writeln!(
            s,
            "steady phase   {:.1} s: {} executes ({:.1}/s), {} saves; execute latency {}",
            st.seconds,
            st.executes,
            st.executes_per_second,
            st.saves,
            st.execute_latency.text()
        );
        let en = &self.ending_phase;
        let _ = writeln!(
            s,
            "ending         {:.1} s: {} executes, {} saves, verification",
            en.seconds, en.executes, en.saves
        );
        let _ = writeln!(
            s,
            "totals         {} executes, {} saves, {} sessions moved, {} reconnects",
            self.executes, self.saves, self.sessions_moved, self.reconnects
        );
        let _ = writeln!(
            s,
            "verification   {} users checked ok, {} not",
            self.users_verified, self.users_failed_verification
        );
        let _ = writeln!(s, "errors         {}", self.errors_total);
        for (kind, k) in self.errors.iter() {
            let _ = writeln!(s, "  {kind:<16} {:>7}", k.count);
            for t in &k.samples {
                let _ = writeln!(s, "      e.g. {t}");
            }
        }
        if !self.hosts.units.is_empty() {
            let _ = writeln!(
                s,
                "hosts          CPU in % of one core (run average, steady average, busiest second), memory peak\n               (systemd's MemoryCurrent; under `/proc sums` the processes' RSS added up, so pages forked\n               sessions share with their engine server count once per process)"
            );
            for u in &self.hosts.units {
                let _ = writeln!(
                    s,
                    "  {:<10} {:<20} {:>6.1} {:>6} {:>6.1}   {:>10}{}",
                    u.host,
                    u.unit,
                    u.cpu_percent,
                    u.cpu_percent_steady
                        .map_or_else(|| "-".into(), |v| format!("{v:.1}")),
                    u.cpu_peak_percent,
                    mib(u.memory_peak_bytes),
                    match u.processes {
                        Some(n) => format!("  ({n} processes, /proc sums)"),
                        None => String::new(),
                    }
                );
            }
        }
        for e in &self.hosts.errors {
            let _ = writeln!(s, "  sampling: {e}");
        }
        if let Some(b) = &self.busiest {
            let _ = writeln!(
                s,
                "busiest        {} on {}: {:.1} % of a core, {:.1} % in its busiest second",
                b.unit, b.host, b.cpu_percent, b.cpu_peak_percent
            );
        }
        let l = &self.this_machine;
        let _ = writeln!(
            s,
            "this machine   the load generator used {:.1} % of a core (peak RSS {}); its {} cores were {} busy",
            l.generator_cpu_percent,
            mib(Some(l.generator_peak_rss_bytes)),
            l.cores,
            l.machine_busy_percent
                .map_or_else(|| "?".into(), |p| format!("{p:.0} %"))
        );
        let _ = writeln!(
            s,
            "result         {}",
            if self.failed {
                "FAILED (lost work, hung cells, or with --strict any error)"
            } else {
                "ok"
            }
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(host: &str, unit: &str, all: f64, steady: Option<f64>) -> UnitReport {
        UnitReport {
            host: host.into(),
            unit: unit.into(),
            source: super::super::hosts::Source::Systemd,
            cpu_percent: all,
            cpu_percent_steady: steady,
            cpu_peak_percent: 99.0,
            memory_peak_bytes: None,
            processes: None,
            series: Vec::new(),
        }
    }

    #[test]
    fn the_busiest_unit_is_the_one_busiest_in_the_steady_phase() {
        let units = [
            unit("db", "postgresql@15-main", 80.0, Some(20.0)),
            unit("backend1", "sage-backend", 40.0, Some(60.0)),
        ];
        let b = busiest(&units).unwrap();
        assert_eq!((b.host.as_str(), b.cpu_percent), ("backend1", 60.0));
        let units = [unit("db", "postgresql@15-main", 80.0, None)];
        assert_eq!(busiest(&units).unwrap().cpu_percent, 80.0);
        assert!(busiest(&[]).is_none());
    }
}
