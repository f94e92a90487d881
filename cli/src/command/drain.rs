//! Taking hosts out of service and back:
//! - `sagectl drain INVENTORY HOST`: a worker takes no new sessions and its open workspaces are
//!   saved and moved to other workers (their viewers get `moved`); a backend is set to `drain`
//!   in every HAProxy (runtime API) and keeps serving its open connections until they end.
//!   Waits until the host holds nothing (or `--timeout`), saying what is left.
//! - `sagectl undrain INVENTORY HOST`: back in service.
//! - `sagectl remove-worker INVENTORY NAME`: drains the worker, stops and disables its agent,
//!   removes its host file and converges the hosts whose files mentioned it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::inventory::{Inventory, Role};
use crate::pipeline::{Pipeline, Settings};
use crate::ssh::Session;

#[derive(clap::Args)]
pub struct Opts {
    pub inventory: PathBuf,
    /// A worker or backend of the inventory.
    pub host: String,
    /// Seconds to wait for the host to hold nothing.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

#[derive(clap::Args)]
pub struct RemoveOpts {
    pub inventory: PathBuf,
    /// The worker to remove (added by `add-worker`: its own file in the include directory).
    pub name: String,
    /// Seconds to wait for its sessions to move before giving up (nothing is removed then).
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Print the recap of the converge as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The deployed worker's config (what `sage-agent drain` reads to find the state directory).
const WORKER_CONFIG: &str = "/etc/sage-agent/worker.json";
/// HAProxy's runtime API (templates/haproxy.cfg.j2: `stats socket`).
const HAPROXY_SOCKET: &str = "/run/haproxy/admin.sock";

/// A pipeline for acting on `hosts` over SSH (nothing is converged, no lab machine started)
/// for `command` (as the audit record names it).
fn pipeline(
    inv: Inventory,
    hosts: &[String],
    command: &'static str,
) -> anyhow::Result<std::sync::Arc<Pipeline>> {
    let settings = Settings {
        check: true,
        quiet: true,
        command,
        ..Settings::default()
    };
    Pipeline::new(inv, hosts, settings)
}

async fn run_on(s: &Session, argv: &[&str]) -> anyhow::Result<String> {
    let o = s.run(argv, b"", Duration::from_secs(30)).await?;
    anyhow::ensure!(
        o.ok(),
        "{} on {}: {}",
        argv.join(" "),
        s.target.host,
        o.tail()
    );
    Ok(o.stdout_text())
}

/// One command to HAProxy's runtime API on an HAProxy host; its answer.
async fn haproxy(s: &Session, command: &str) -> anyhow::Result<String> {
    let script = format!("printf '%s\\n' \"$1\" | socat stdio {HAPROXY_SOCKET}");
    run_on(s, &["sh", "-c", &script, "sh", command]).await
}

/// A backend's current connections in HAProxy's `show stat` (`scur` of its server line).
fn connections(stat: &str, backend: &str) -> Option<u64> {
    stat.lines().find_map(|l| {
        let f: Vec<&str> = l.split(',').collect();
        (f.first() == Some(&"backends") && f.get(1) == Some(&backend))
            .then(|| f.get(4)?.parse().ok())
            .flatten()
    })
}

/// Sessions open on a worker (its local metrics page).
async fn sessions_open(s: &Session) -> anyhow::Result<u64> {
    let text = run_on(
        s,
        &[
            "python3",
            "-c",
            "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:7001/metrics', timeout=5).read().decode())",
        ],
    )
    .await?;
    text.lines()
        .find_map(|l| l.strip_prefix("sagews_worker_sessions_open "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .context("the worker's metrics have no sagews_worker_sessions_open")
}

/// Polls `left` until it is 0 or `timeout` passes, printing each change; whether it emptied.
async fn wait_empty<F, Fut>(what: &str, timeout: Duration, mut left: F) -> anyhow::Result<bool>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<u64>>,
{
    let started = Instant::now();
    let mut last = None;
    loop {
        let n = left().await?;
        if last != Some(n) {
            eprintln!("{what}: {n} left ({:.1}s)", started.elapsed().as_secs_f64());
            last = Some(n);
        }
        if n == 0 {
            return Ok(true);
        }
        if started.elapsed() > timeout {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// How many healthy workers backend `host` sees (its `/api/metrics`, fetched on the first
/// loadbalancer with HAProxy's certificate, which the backend's metrics require).
pub async fn healthy_workers(p: &Pipeline, host: &str) -> anyhow::Result<u64> {
    let b = p.inv.host(host).context("no such backend")?;
    let lb = p
        .inv
        .with_role(Role::Loadbalancer)
        .next()
        .context("no loadbalancer to ask the backend's metrics through")?;
    let port = p.inv.backend.port;
    let s = p.session(&lb.name).await?;
    let text = run_on(
        &s,
        &[
            "curl",
            "-sS",
            "--fail",
            "--max-time",
            "5",
            "--resolve",
            &format!("{}:{port}:{}", b.name, b.address),
            "--cacert",
            "/etc/haproxy/certs/ca.crt",
            "--cert",
            "/etc/haproxy/certs/host.pem",
            &format!("https://{}:{port}/api/metrics", b.name),
        ],
    )
    .await;
    s.close().await;
    text?
        .lines()
        .find_map(|l| l.strip_prefix("sagews_backend_healthy_workers "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .context("the backend's metrics have no sagews_backend_healthy_workers")
}

/// The hosts a drain of `host` acts on: itself, and for a backend every HAProxy host.
fn drain_targets(inv: &Inventory, host: &str) -> anyhow::Result<Vec<String>> {
    let Some(h) = inv.host(host) else {
        let names: Vec<&str> = inv.hosts.iter().map(|h| h.name.as_str()).collect();
        anyhow::bail!(
            "{host}: no such host in {}\n  hint: {}",
            inv.file.display(),
            crate::diag::suggest(host, &names)
        );
    };
    anyhow::ensure!(
        h.has(Role::Worker) || h.has(Role::Backend),
        "{host} is neither a worker nor a backend: only those are drained"
    );
    let mut names = vec![host.to_string()];
    if h.has(Role::Backend) {
        names.extend(inv.with_role(Role::Loadbalancer).map(|h| h.name.clone()));
    }
    Ok(names)
}

/// Drains (or undrains) `host` of `p`'s inventory and, draining, waits until it holds nothing
/// or `timeout` passes: whether it emptied. A worker: `sage-agent drain` on it, then its open
/// sessions until none; a backend: `drain` in every HAProxy, then its connections until none.
pub async fn drain_host(
    p: &Pipeline,
    host: &str,
    drain: bool,
    timeout: Duration,
) -> anyhow::Result<bool> {
    let h = p.inv.host(host).expect("checked by drain_targets").clone();
    let mut emptied = true;
    if h.has(Role::Worker) {
        let s = p.session(host).await?;
        let mut argv = vec![
            "/usr/local/bin/sage-agent",
            "drain",
            "--config",
            WORKER_CONFIG,
        ];
        if !drain {
            argv.push("--undo");
        }
        run_on(&s, &argv).await?;
        if drain {
            eprintln!("{host} takes no new sessions; moving its open workspaces");
            emptied &= wait_empty(&format!("{host}: open sessions"), timeout, || {
                sessions_open(&s)
            })
            .await?;
        } else {
            eprintln!("{host} takes sessions again");
        }
        s.close().await;
    }
    if h.has(Role::Backend) {
        let state = if drain { "drain" } else { "ready" };
        let lbs: Vec<String> = p
            .inv
            .with_role(Role::Loadbalancer)
            .map(|h| h.name.clone())
            .collect();
        for lb in &lbs {
            let s = p.session(lb).await?;
            haproxy(&s, &format!("set server backends/{host} state {state}")).await?;
            eprintln!("{lb}: HAProxy sets {host} to {state}");
            if drain {
                emptied &= wait_empty(&format!("{lb}: connections to {host}"), timeout, || async {
                    let stat = haproxy(&s, "show stat").await?;
                    connections(&stat, host)
                        .with_context(|| format!("{lb}'s HAProxy has no server {host}"))
                })
                .await?;
            }
            s.close().await;
        }
    }
    Ok(emptied)
}

/// [`drain_host`] on a runtime of its own, for the commands (`command`), under the deploy lock
/// of the inventory (it changes machines), recorded in logd.
fn set_drain(
    inv: Inventory,
    host: &str,
    drain: bool,
    timeout: Duration,
    command: &'static str,
) -> anyhow::Result<bool> {
    let names = drain_targets(&inv, host)?;
    let _lock =
        crate::pipeline::lock_inventory(&inv, &crate::lock::Holder::me(), &Settings::default())?;
    let p = pipeline(inv, &names, command)?;
    let rt = super::runtime()?;
    let emptied = rt.block_on(drain_host(&p, host, drain, timeout));
    let what = match &emptied {
        Ok(true) if drain => format!("{host} drained"),
        Ok(true) => format!("{host} back in service"),
        Ok(false) => format!("{host} draining, not empty after {} s", timeout.as_secs()),
        Err(e) => format!("{host}: {e:#}"),
    };
    if let Some(a) = rt.block_on(crate::pipeline::record(
        &p,
        matches!(emptied, Ok(true)),
        &what,
    )) {
        eprintln!("audit: {a}");
    }
    emptied
}

pub fn run(o: Opts, drain: bool) -> anyhow::Result<ExitCode> {
    let inv = match super::load(&o.inventory) {
        Ok(inv) => inv,
        Err(code) => return Ok(code),
    };
    let command = if drain { "drain" } else { "undrain" };
    let emptied = set_drain(inv, &o.host, drain, Duration::from_secs(o.timeout), command)?;
    if !emptied {
        eprintln!(
            "{} is draining but still holds something after {} s (see above); it stays drained",
            o.host, o.timeout
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn remove_worker(o: RemoveOpts) -> anyhow::Result<ExitCode> {
    let inv = match super::load(&o.inventory) {
        Ok(inv) => inv,
        Err(code) => return Ok(code),
    };
    let Some(h) = inv.host(&o.name).cloned() else {
        anyhow::bail!("{}: no such host in {}", o.name, o.inventory.display());
    };
    anyhow::ensure!(
        h.roles == [Role::Worker],
        "{} is not a worker alone (roles: {}): remove it from its file by hand, then run `sagectl up`",
        o.name,
        h.roles
            .iter()
            .map(|r| r.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    // Its own file, in an include directory, as add-worker writes it.
    let file = PathBuf::from(h.pos.file.as_ref());
    let own = inv.include_dirs.iter().any(|d| file.parent() == Some(d))
        && inv
            .hosts
            .iter()
            .filter(|x| x.pos.file == h.pos.file)
            .count()
            == 1;
    anyhow::ensure!(
        own,
        "{} is declared in {} with other hosts: remove it there by hand, then run `sagectl up`",
        o.name,
        h.pos
    );
    // Held for the whole command: the drain, the stop, the converge after.
    let _lock =
        crate::pipeline::lock_inventory(&inv, &crate::lock::Holder::me(), &Settings::default())?;
    let command = "remove-worker";
    if !set_drain(
        inv.clone(),
        &o.name,
        true,
        Duration::from_secs(o.timeout),
        command,
    )? {
        eprintln!(
            "{}'s sessions did not all move within {} s: nothing was removed (it stays drained; `sagectl undrain` puts it back)",
            o.name, o.timeout
        );
        return Ok(ExitCode::FAILURE);
    }
    let p = pipeline(inv.clone(), std::slice::from_ref(&o.name), command)?;
    super::runtime()?.block_on(async {
        let s = p.session(&o.name).await?;
        run_on(&s, &["systemctl", "disable", "--now", "sage-worker"]).await?;
        s.close().await;
        anyhow::Ok(())
    })?;
    eprintln!("{}: sage-worker stopped and disabled", o.name);
    std::fs::remove_file(&file).with_context(|| format!("removing {}", file.display()))?;
    eprintln!("removed {}", file.display());
    let after = match super::load(&o.inventory) {
        Ok(inv) => inv,
        Err(code) => return Ok(code),
    };
    let affected = super::add_host::affected(&after, &inv, &o.name)?;
    let names: Vec<String> = affected.iter().map(|(h, _)| h.clone()).collect();
    for (h, why) in &affected {
        eprintln!(
            "converging {h}: its {} mentioned {}",
            why.join(", "),
            o.name
        );
    }
    let recap = if names.is_empty() {
        None
    } else {
        let settings = Settings {
            command,
            ..Settings::default()
        };
        let p = Pipeline::new(after, &names, settings)?;
        Some(super::runtime()?.block_on(p.run(&[names])))
    };
    if let Some(r) = &recap {
        r.print(o.json, &inv.tls.public_name);
        if !r.success {
            eprintln!(
                "{} is out of the inventory, but converging the hosts that mentioned it failed: run `sagectl up {}`",
                o.name,
                o.inventory.display()
            );
            return Ok(ExitCode::FAILURE);
        }
    }
    if inv.lab.is_some() {
        eprintln!(
            "{}'s lab machine stays until `sagectl lab down` (it no longer serves)",
            o.name
        );
    }
    eprintln!("{} removed", o.name);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backends_connections_from_show_stat() {
        let stat = "# pxname,svname,qcur,qmax,scur,smax\nbackends,app1,0,0,3,9\nbackends,app2,0,0,0,4\nbackends,BACKEND,0,0,3,9\n";
        assert_eq!(connections(stat, "app1"), Some(3));
        assert_eq!(connections(stat, "app2"), Some(0));
        assert_eq!(connections(stat, "app3"), None);
    }
}
