//! `sagectl bench up --hosts N`: wall time of a first deploy and of no-op runs of `up` on N lab
//! machines (one carrying the infrastructure roles, the others workers); `bench status --hosts
//! N`: wall time of `status` on such a deployment (its own lab). Prints figures; asserts
//! nothing (goals are met here, never in timed tests). `bench load`: simulated browsers
//! against a deployed lab (`crate::load`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;

use super::up;
use crate::inventory::Inventory;

#[derive(clap::Args)]
pub struct Opts {
    #[command(subcommand)]
    pub what: What,
}

#[derive(clap::Subcommand)]
pub enum What {
    /// Time `up` on N lab machines.
    Up {
        /// How many lab machines.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(2..=250))]
        hosts: u32,
        /// How many no-op runs to time after the first deploy.
        #[arg(long, default_value_t = 5)]
        runs: u32,
        /// Keep the machines afterwards (`sagectl lab down` on the printed inventory removes them).
        #[arg(long)]
        keep: bool,
    },
    /// Time `status` on N lab machines (deployed first).
    Status {
        /// How many lab machines.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(2..=250))]
        hosts: u32,
        /// How many runs to time.
        #[arg(long, default_value_t = 10)]
        runs: u32,
        /// Keep the machines afterwards (`sagectl lab down` on the printed inventory removes them).
        #[arg(long)]
        keep: bool,
    },
    /// The fault drill: faults one after another under load on a lab with a standby
    /// (inventories/lab-chaos.yaml); prints what people saw and the recovery per fault.
    Chaos(super::chaos::Opts),
    /// N simulated browsers through a lab deployment's HAProxy: figures per second, then
    /// latencies, errors, what each service cost, and a check of every user's work.
    Load(crate::load::Opts),
}

/// The generated inventory `name` on 10.`net`.0.0/24: host 1 carries every infrastructure role,
/// the next four are workers, any beyond are static hosts (nginx: a worker's packages, numpy
/// and matplotlib, on 49 machines would not fit the lab's tmpfs of writable layers, half the
/// box's memory; what a no-op run does per host is the same).
fn inventory(name: &str, net: u8, hosts: u32) -> String {
    let mut s = format!(
        "name: {name}\nlab: {{subnet: 10.{net}.0.0/24}}\ntls: {{public_name: sagews.{name}.test}}\nvars:\n  admin_cidrs: [\"10.{net}.0.1/32\"]\n  postgres_shared_buffers: \"64MB\"\n  memcached_memory_mb: 64\nhosts:\n",
    );
    s.push_str(&format!(
        "  infra: {{address: 10.{net}.0.10, roles: [database, cache, backend, loadbalancer, static]}}\n"
    ));
    for i in 1..hosts {
        let (name, role) = if i <= 4 {
            (format!("w{i}"), "worker")
        } else {
            (format!("s{i}"), "static")
        };
        s.push_str(&format!(
            "  {name}: {{address: 10.{net}.0.{}, roles: [{role}]}}\n",
            10 + i
        ));
    }
    s
}

/// min, median and max of `times`, as printed.
fn spread(mut times: Vec<f64>) -> String {
    times.sort_by(f64::total_cmp);
    format!(
        "min {:.3} s, median {:.3} s, max {:.3} s",
        times[0],
        times[times.len() / 2],
        times[times.len() - 1]
    )
}

/// Where the wall time of no-op runs goes: the run's phases (setup: loading the inventory,
/// secrets and agent binary before any host is contacted), then each host phase's median and
/// slowest host, all medians over the runs.
fn phases(recaps: &[(f64, crate::pipeline::Recap)]) -> String {
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let of = |r: &crate::pipeline::Recap, name: &str| {
        r.phases
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0.0, |(_, s)| *s)
    };
    let mut out = String::from("  where the wall time goes (medians over the runs):\n");
    let setup = median(
        recaps
            .iter()
            .map(|(wall, r)| wall - r.seconds - of(r, "audit"))
            .collect(),
    );
    out.push_str(&format!("    setup before connecting   {setup:.3} s\n"));
    for name in ["hosts", "health", "audit"] {
        let m = median(recaps.iter().map(|(_, r)| of(r, name)).collect());
        out.push_str(&format!("    {name:<25} {m:.3} s\n"));
    }
    out.push_str("  per host (median host, slowest host):\n");
    for name in ["render", "connect", "facts", "plan", "apply"] {
        let (mut mid, mut max) = (Vec::new(), Vec::new());
        for (_, r) in recaps {
            let mut v: Vec<(f64, &str)> = r
                .hosts
                .iter()
                .map(|h| {
                    let s = h
                        .phases
                        .iter()
                        .find(|(n, _)| *n == name)
                        .map_or(0.0, |(_, s)| *s);
                    (s, h.host.as_str())
                })
                .collect();
            v.sort_by(|a, b| a.0.total_cmp(&b.0));
            mid.push(v[v.len() / 2].0);
            max.push(v[v.len() - 1].0);
        }
        out.push_str(&format!(
            "    {name:<25} {:.3} s, {:.3} s\n",
            median(mid),
            median(max)
        ));
    }
    out
}

pub fn run(o: Opts) -> anyhow::Result<ExitCode> {
    let (hosts, runs, keep, status) = match o.what {
        What::Up { hosts, runs, keep } => (hosts, runs, keep, false),
        What::Status { hosts, runs, keep } => (hosts, runs, keep, true),
        What::Chaos(o) => return super::chaos::run(o),
        What::Load(o) => return crate::load::run(o),
    };
    let runs = runs.max(1);
    // Each benchmark on a lab of its own, so the two can run side by side.
    let (name, net) = if status {
        ("benchstatus", 91)
    } else {
        ("bench", 90)
    };
    let dir = PathBuf::from("/var/lib/sagectl").join(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let file = dir.join(format!("{name}.yaml"));
    std::fs::write(&file, inventory(name, net, hosts)).context("writing the bench inventory")?;
    let load = || Inventory::load(&file).map_err(|d| anyhow::anyhow!("{d}"));
    let inv = load()?;
    let lab = crate::lab::Lab::new(&inv)?;
    let t = Instant::now();
    lab.up()?;
    let lab_secs = t.elapsed().as_secs_f64();
    let mut opts = up::Opts::new(file.clone());
    opts.quiet = true;
    opts.parallel = hosts.max(16);
    let t = Instant::now();
    let first = up::converge_inventory(load()?, opts.clone())?;
    let first_secs = t.elapsed().as_secs_f64();
    anyhow::ensure!(
        first.success,
        "the first deploy failed: {}",
        serde_json::to_string_pretty(&first.hosts).unwrap_or_default()
    );
    println!("hosts: {hosts}");
    println!("lab up (machines answering SSH): {lab_secs:.2} s");
    println!("first deploy (up on fresh machines): {first_secs:.1} s");
    let mut times = Vec::new();
    let mut recaps = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        if status {
            let r = super::status::report(load()?, std::time::Duration::from_secs(3))?;
            times.push(t.elapsed().as_secs_f64());
            anyhow::ensure!(r.ok, "status found problems:\n{}", r.text());
            continue;
        }
        let r = up::converge_inventory(load()?, opts.clone())?;
        let wall = t.elapsed().as_secs_f64();
        times.push(wall);
        let changed: usize = r.hosts.iter().map(|h| h.changed).sum();
        anyhow::ensure!(
            r.success && changed == 0,
            "a no-op run changed {changed} things or failed"
        );
        recaps.push((wall, r));
    }
    let what = if status { "status" } else { "no-op up" };
    println!("{what}, {runs} runs: {}", spread(times));
    if !recaps.is_empty() {
        print!("{}", phases(&recaps));
    }
    if !keep {
        lab.down()?;
    } else {
        println!("machines kept: sagectl lab down {}", file.display());
    }
    Ok(ExitCode::SUCCESS)
}
