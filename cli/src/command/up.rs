//! `sagectl up INVENTORY`: converge the hosts. Per host, in parallel: render its steps, connect,
//! gather facts in one round trip, plan, apply (or, with `--check`, only show the plan), run its
//! handlers; then the health checks; then a recap. One failed or unreachable host never stops
//! the others; the exit code is 0 only when every host succeeded.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::hostkeys::KnownHosts;
use crate::inventory::{Host, Inventory, Role};
use crate::pki::{Secret, State};
use crate::plan::{Change, HostPlan};
use crate::roles::Catalog;
use crate::ssh::{HostKeyPolicy, Session, SshError, Target};
use crate::ui::Ui;

#[derive(clap::Args, Clone)]
pub struct Opts {
    /// The inventory file.
    pub inventory: PathBuf,
    /// Only plan: gather facts and show what would change; change nothing.
    #[arg(long)]
    pub check: bool,
    /// Show a unified diff of every file that changes (secrets masked).
    #[arg(long)]
    pub diff: bool,
    /// Only these hosts: a host, role or group name (repeatable).
    #[arg(long = "limit", value_name = "NAME|ROLE|GROUP")]
    pub limit: Vec<String>,
    /// Hosts converged at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub parallel: u32,
    /// Print the recap as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Also list the steps that had nothing to do.
    #[arg(short, long)]
    pub verbose: bool,
    /// Hosts seen for the first time: pin their key (accept-new) or refuse them (strict).
    #[arg(long, value_enum, default_value = "accept-new")]
    pub host_keys: HostKeyPolicy,
    /// No progress output; just the recap.
    #[arg(short, long)]
    pub quiet: bool,
}

impl Opts {
    /// Options for converging `inventory` with every default.
    pub fn new(inventory: PathBuf) -> Opts {
        Opts {
            inventory,
            check: false,
            diff: false,
            limit: Vec::new(),
            parallel: 16,
            json: false,
            verbose: false,
            host_keys: HostKeyPolicy::AcceptNew,
            quiet: false,
        }
    }
}

/// One host's outcome.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HostRecap {
    pub host: String,
    pub ok: usize,
    pub changed: usize,
    pub skipped: usize,
    pub failed: bool,
    pub unreachable: bool,
    pub seconds: f64,
    pub error: Option<String>,
    pub handlers: Vec<String>,
    /// With --check: what would change.
    pub planned: Vec<String>,
    pub notes: Vec<String>,
    pub checks: Vec<crate::health::Check>,
}

#[derive(Serialize)]
pub struct Recap {
    pub inventory: String,
    pub check: bool,
    pub success: bool,
    pub seconds: f64,
    pub hosts: Vec<HostRecap>,
    /// What became of the audit record (when the inventory has a logd).
    pub audit: Option<String>,
    /// How to open the deployed site from this box (after a successful run).
    pub site: Option<Site>,
}

/// The site's address and what this box needs to reach it.
#[derive(Clone, Debug, Serialize)]
pub struct Site {
    pub url: String,
    /// The loadbalancers' addresses, which the public name must resolve to.
    pub addresses: Vec<String>,
    /// The CA a browser must trust (`None` when the inventory brings its own certificate).
    pub ca_file: Option<PathBuf>,
    /// Lab machines are reachable from this box only, by address: map the name locally.
    pub lab: bool,
}

impl Site {
    fn of(inv: &Inventory, state: &State) -> Option<Site> {
        let lbs: Vec<String> = inv
            .with_role(crate::inventory::Role::Loadbalancer)
            .map(|h| h.address.to_string())
            .collect();
        if lbs.is_empty() || inv.tls.public_name.is_empty() {
            return None;
        }
        Some(Site {
            url: format!("https://{}/", inv.tls.public_name),
            addresses: lbs,
            ca_file: inv.tls.certificate.is_none().then(|| {
                std::path::absolute(state.dir().join("ca.crt"))
                    .unwrap_or_else(|_| state.dir().join("ca.crt"))
            }),
            lab: inv.lab.is_some(),
        })
    }

    /// One or two lines a person can act on.
    pub fn advice(&self, public_name: &str) -> String {
        let first = &self.addresses[0];
        let mut s = format!(
            "open {}
",
            self.url
        );
        if self.lab {
            s.push_str(&format!(
                "  from this box (lab machines are reachable from here only): map the name with `echo '{first} {public_name}' >> /etc/hosts`"
            ));
        } else {
            s.push_str(&format!(
                "  the name {public_name} must resolve to {}",
                self.addresses.join(" or ")
            ));
        }
        if let Some(ca) = &self.ca_file {
            s.push_str(&format!(
                ", and have the browser trust the deployment's CA {} (Chromium: certutil -d sql:$HOME/.pki/nssdb -A -t C,, -n sagectl -i {})",
                ca.display(),
                ca.display()
            ));
        }
        s.push('\n');
        s
    }
}

/// Hosts named by `--limit` (host, role or group names); all of them when empty.
pub fn select<'a>(inv: &'a Inventory, limit: &[String]) -> anyhow::Result<Vec<&'a Host>> {
    if limit.is_empty() {
        return Ok(inv.hosts.iter().collect());
    }
    let mut names = BTreeSet::new();
    for l in limit {
        if inv.host(l).is_some() {
            names.insert(l.clone());
        } else if let Some(role) = Role::from_name(l) {
            names.extend(
                inv.hosts
                    .iter()
                    .filter(|h| h.has(role) || role == Role::Firewall)
                    .map(|h| h.name.clone()),
            );
        } else if let Some(g) = inv.groups.get(l) {
            names.extend(g.iter().cloned());
        } else {
            let mut known: Vec<&str> = inv.hosts.iter().map(|h| h.name.as_str()).collect();
            known.extend(Role::DECLARABLE.iter().map(|r| r.name()));
            known.extend(inv.groups.keys().map(String::as_str));
            anyhow::bail!(
                "--limit {l}: no host, role or group of that name\n  hint: {}",
                crate::diag::suggest(l, &known)
            );
        }
    }
    Ok(inv
        .hosts
        .iter()
        .filter(|h| names.contains(&h.name))
        .collect())
}

/// The sage-agent binary to upload: beside sagectl, or `$SAGECTL_AGENT_BINARY`.
fn agent_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SAGECTL_AGENT_BINARY") {
        return Some(PathBuf::from(p));
    }
    let p = std::env::current_exe().ok()?.with_file_name("sage-agent");
    p.is_file().then_some(p)
}

/// The agents a sage-agent binary implements (`sage-agent built`).
fn built_agents(bin: &std::path::Path) -> anyhow::Result<BTreeSet<String>> {
    let o = std::process::Command::new(bin)
        .arg("built")
        .output()
        .with_context(|| format!("running {} built", bin.display()))?;
    anyhow::ensure!(
        o.status.success(),
        "{} built: {}",
        bin.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .map(String::from)
        .collect())
}

struct Ctx {
    inv: Inventory,
    catalog: Catalog,
    state: State,
    secrets: BTreeMap<String, Secret>,
    known: Arc<KnownHosts>,
    agent: Option<Arc<Vec<u8>>>,
    built: BTreeSet<String>,
    opts: Opts,
    ui: Ui,
    lab_key: Option<PathBuf>,
}

pub fn run(o: Opts) -> anyhow::Result<ExitCode> {
    let inv = match super::load(&o.inventory) {
        Ok(inv) => inv,
        Err(code) => return Ok(code),
    };
    let (recap, ctx) = execute(inv, o)?;
    print_recap(&ctx, &recap);
    Ok(if recap.success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Converges `inv` (lab machines first when it has a `lab:` section) and returns the recap.
pub fn converge_inventory(inv: Inventory, o: Opts) -> anyhow::Result<Recap> {
    execute(inv, o).map(|(r, _)| r)
}

fn execute(inv: Inventory, o: Opts) -> anyhow::Result<(Recap, Arc<Ctx>)> {
    let catalog =
        Catalog::embedded().map_err(|d| anyhow::anyhow!("embedded roles are broken:\n{d}"))?;
    let state = crate::pki::open(&inv)?;
    let secrets = state.secrets()?;
    let selected: Vec<String> = select(&inv, &o.limit)?
        .iter()
        .map(|h| h.name.clone())
        .collect();
    let mut lab_key = None;
    if inv.lab.is_some() {
        let lab = crate::lab::Lab::new(&inv)?;
        if !o.check {
            lab.up()?;
        }
        lab_key = Some(lab.key_path());
    }
    let needs_agent = inv
        .hosts
        .iter()
        .filter(|h| selected.contains(&h.name))
        .any(|h| h.has(Role::Worker) || h.has(Role::Backend) || h.has(Role::Logd));
    let (agent, built) = match (needs_agent, agent_binary()) {
        (false, _) => (None, BTreeSet::new()),
        (true, Some(p)) => {
            let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
            (Some(Arc::new(bytes)), built_agents(&p)?)
        }
        (true, None) => anyhow::bail!(
            "the inventory has agent hosts and no sage-agent binary was found beside {}\n  hint: build both (`cargo build --release`), or set SAGECTL_AGENT_BINARY",
            std::env::current_exe()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        ),
    };
    let names: Vec<&str> = selected.iter().map(String::as_str).collect();
    let ui = if o.quiet {
        Ui::silent()
    } else {
        Ui::new(&names)
    };
    let known = Arc::new(KnownHosts::new(
        crate::pki::dir_for(&inv).join("known_hosts"),
    ));
    let ctx = Arc::new(Ctx {
        inv,
        catalog,
        state,
        secrets,
        known,
        agent,
        built,
        opts: o.clone(),
        ui,
        lab_key,
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let recap = rt.block_on(run_all(ctx.clone(), selected));
    Ok((recap, ctx))
}

async fn run_all(ctx: Arc<Ctx>, selected: Vec<String>) -> Recap {
    let started = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(ctx.opts.parallel as usize));
    let mut tasks = tokio::task::JoinSet::new();
    for name in selected.clone() {
        let (ctx, sem) = (ctx.clone(), sem.clone());
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await.expect("semaphore open");
            converge(&ctx, &name).await
        });
    }
    let mut recaps: BTreeMap<String, HostRecap> = BTreeMap::new();
    let mut sessions: BTreeMap<String, Session> = BTreeMap::new();
    while let Some(r) = tasks.join_next().await {
        let (recap, session) = r.expect("host task panicked");
        if let Some(s) = session {
            sessions.insert(recap.host.clone(), s);
        }
        recaps.insert(recap.host.clone(), recap);
    }
    if !ctx.opts.check {
        let healthy: Vec<&Host> = ctx
            .inv
            .hosts
            .iter()
            .filter(|h| {
                recaps
                    .get(&h.name)
                    .is_some_and(|r| !r.failed && !r.unreachable)
            })
            .collect();
        ctx.ui.println("running health checks");
        for c in crate::health::check_all(&ctx.inv, &ctx.catalog, &healthy, &sessions, &ctx.secrets)
            .await
        {
            if let Some(r) = recaps.get_mut(&c.host) {
                if !c.ok {
                    r.failed = true;
                }
                r.checks.push(c);
            }
        }
    }
    for (_, s) in sessions {
        s.close().await;
    }
    let hosts: Vec<HostRecap> = ctx
        .inv
        .hosts
        .iter()
        .filter_map(|h| recaps.remove(&h.name))
        .collect();
    let success = hosts.iter().all(|h| !h.failed && !h.unreachable);
    let mut recap = Recap {
        inventory: ctx.inv.name.clone(),
        check: ctx.opts.check,
        success,
        seconds: started.elapsed().as_secs_f64(),
        hosts,
        audit: None,
        site: None,
    };
    if !ctx.opts.check {
        recap.audit = audit(&ctx, &recap).await;
        if success {
            recap.site = Site::of(&ctx.inv, &ctx.state);
        }
    }
    recap
}

/// Records who ran `up` on which inventory and what changed, in logd (spooled in the state
/// directory when logd cannot take it, and sent with the next run's).
async fn audit(ctx: &Ctx, recap: &Recap) -> Option<String> {
    use sagews_wire::proto::Level;
    let logd = ctx
        .inv
        .with_role(Role::Logd)
        .find(|h| Some(&h.name) != ctx.inv.logd.replica.as_ref())?;
    let dir = ctx.state.dir();
    if let Err(e) = ctx.state.admin() {
        return Some(format!("not recorded: {e}"));
    }
    let identity = match sagews_wire::tls::Identity::load(
        &dir.join("ca.crt"),
        &dir.join("admin.crt"),
        &dir.join("admin.key"),
    ) {
        Ok(i) => i,
        Err(e) => return Some(format!("not recorded: {e}")),
    };
    let user = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "root".into());
    let changed: usize = recap.hosts.iter().map(|h| h.changed).sum();
    let failed: Vec<&str> = recap
        .hosts
        .iter()
        .filter(|h| h.failed || h.unreachable)
        .map(|h| h.host.as_str())
        .collect();
    let mut fields = serde_json::Map::new();
    fields.insert("user".into(), serde_json::json!(user));
    fields.insert(
        "inventory".into(),
        serde_json::json!(ctx.inv.file.display().to_string()),
    );
    fields.insert(
        "changed".into(),
        serde_json::json!(
            recap
                .hosts
                .iter()
                .map(|h| (h.host.clone(), h.changed))
                .collect::<BTreeMap<_, _>>()
        ),
    );
    fields.insert("failed".into(), serde_json::json!(failed));
    let message = format!(
        "{user} ran sagectl up on {}: {changed} changes on {} hosts, {} failed",
        ctx.inv.name,
        recap.hosts.len(),
        failed.len()
    );
    let level = if failed.is_empty() {
        Level::Info
    } else {
        Level::Warn
    };
    let record = sagews_wire::logclient::record("sagectl", level, "sagectl::up", &message, fields);
    let settings = sagews_wire::logclient::Settings {
        address: format!("{}:{}", logd.address, ctx.inv.logd.port),
        server_name: logd.name.clone(),
        identity,
        spool_dir: dir.join("audit-spool"),
        host: "sagectl".into(),
        queue: 16,
        batch: 100,
    };
    Some(
        match sagews_wire::logclient::deliver_or_spool(&settings, vec![record]).await {
            Ok(true) => format!("recorded in logd on {}", logd.name),
            Ok(false) => format!(
                "logd on {} did not take it: kept in {}, sent next time",
                logd.name,
                dir.join("audit-spool").display()
            ),
            Err(e) => format!("not recorded: {e}"),
        },
    )
}

/// Converges one host; returns its recap and, when it succeeded, its session for health checks.
async fn converge(ctx: &Ctx, name: &str) -> (HostRecap, Option<Session>) {
    let started = Instant::now();
    let mut r = HostRecap {
        host: name.to_string(),
        ..Default::default()
    };
    let host = ctx.inv.host(name).expect("selected from the inventory");
    let ui = &ctx.ui;
    let fail = |mut r: HostRecap, e: String, unreachable: bool| {
        ui.done(
            name,
            &format!(
                "{} {}",
                if unreachable { "UNREACHABLE" } else { "FAILED" },
                e.lines().next().unwrap_or("")
            ),
        );
        r.failed = !unreachable;
        r.unreachable = unreachable;
        r.error = Some(e);
        r.seconds = started.elapsed().as_secs_f64();
        (r, None)
    };
    ui.msg(name, "rendering");
    let (steps, handlers) = match crate::render::host_steps(
        &ctx.inv,
        &ctx.catalog,
        &ctx.state,
        host,
        ctx.agent.as_ref(),
    ) {
        Ok(s) => s,
        Err(e) => return fail(r, e.to_string(), false),
    };
    ui.msg(name, "connecting");
    let target = Target {
        host: name.to_string(),
        addr: SocketAddr::new(host.address, host.ssh.port),
        user: host.ssh.user.clone(),
        identity: host
            .ssh
            .identity_file
            .clone()
            .or_else(|| ctx.lab_key.clone()),
    };
    let session = match Session::connect(&target, ctx.known.clone(), ctx.opts.host_keys).await {
        Ok(s) => s,
        Err(e) => {
            let unreachable = matches!(e, SshError::Connect { .. } | SshError::Timeout { .. });
            return fail(r, e.to_string(), unreachable);
        }
    };
    if let Some(fp) = &session.pinned_now {
        r.notes.push(format!("first contact: pinned host key {fp}"));
        ui.println(&format!(
            "{name}: first contact, pinned its host key {fp} in {}",
            ctx.known.path().display()
        ));
    }
    ui.msg(name, "gathering facts");
    let query = crate::plan::query(&steps);
    let facts = match session
        .run(
            &["sh", "-c", crate::facts::SCRIPT],
            query.stdin().as_bytes(),
            Duration::from_secs(120),
        )
        .await
    {
        Ok(o) if o.ok() => match crate::facts::parse(&o.stdout_text()) {
            Ok(f) => f,
            Err(e) => return fail(r, e.to_string(), false),
        },
        Ok(o) => return fail(r, format!("gathering facts failed: {}", o.tail()), false),
        Err(e) => return fail(r, e.to_string(), true),
    };
    if facts.os.0 != "debian" {
        r.notes.push(format!(
            "{} {} is not Debian: packages and paths may differ",
            facts.os.0, facts.os.1
        ));
    }
    let plan = crate::plan::plan(&steps, &handlers, &facts, &ctx.built);
    for i in &plan.items {
        if let Change::Skip(why) = &i.change {
            if !r.notes.contains(why) {
                r.notes.push(why.clone());
            }
        }
    }
    if ctx.opts.diff {
        let text = diffs(&session, &plan, &ctx.secrets).await;
        if !text.is_empty() {
            ui.println(&text);
        }
    }
    if ctx.opts.check {
        r.planned = plan
            .items
            .iter()
            .filter(|i| i.change.is_change())
            .map(|i| format!("{}: {}", i.task, i.change.describe()))
            .collect();
        r.changed = plan.changes();
        r.ok = plan
            .items
            .iter()
            .filter(|i| matches!(i.change, Change::None(_)))
            .count();
        r.skipped = plan
            .items
            .iter()
            .filter(|i| matches!(i.change, Change::Skip(_)))
            .count();
        r.handlers = plan.pending.clone();
        r.seconds = started.elapsed().as_secs_f64();
        ui.done(name, &format!("would change {}", r.changed));
        return (r, Some(session));
    }
    if ctx.opts.verbose {
        for i in plan.items.iter().filter(|i| !i.change.is_change()) {
            ui.println(&format!("{name}: {}: {}", i.task, i.change.describe()));
        }
    }
    let progress = |m: &str| {
        ui.msg(name, m);
        if ctx.opts.verbose {
            ui.println(&format!("{name}: {m}"));
        }
    };
    // A fresh connection, as the next run would make (handlers that guard sshd use it).
    let relogin = || -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async {
            let s = Session::connect(&target, ctx.known.clone(), ctx.opts.host_keys)
                .await
                .map_err(|e| e.to_string())?;
            s.close().await;
            Ok(())
        })
    };
    let applied = crate::apply::apply(&session, &plan, &progress, &relogin).await;
    r.ok = applied.ok;
    r.changed = applied.changed;
    r.skipped = applied.skipped;
    r.handlers = applied.handlers.clone();
    r.seconds = started.elapsed().as_secs_f64();
    if let Some(e) = applied.error {
        let unreachable = applied.unreachable;
        return fail(r, e, unreachable);
    }
    ui.done(
        name,
        &format!("ok={} changed={} skipped={}", r.ok, r.changed, r.skipped),
    );
    (r, Some(session))
}

/// Unified diffs of the files a plan changes; secret values masked, keys never shown.
async fn diffs(s: &Session, plan: &HostPlan, secrets: &BTreeMap<String, Secret>) -> String {
    let mask = |t: String| {
        secrets
            .values()
            .fold(t, |t, v| t.replace(v.expose(), "********"))
    };
    let mut out = String::new();
    for i in &plan.items {
        let Change::Upload(u) = &i.change else {
            continue;
        };
        let new = match String::from_utf8(u.content.to_vec()) {
            Ok(t) => t,
            Err(_) => {
                out.push_str(&format!(
                    "--- {}: binary file changes ({} bytes)\n",
                    u.path,
                    u.content.len()
                ));
                continue;
            }
        };
        if new.contains("PRIVATE KEY") {
            out.push_str(&format!(
                "--- {}: private key changes (not shown)\n",
                u.path
            ));
            continue;
        }
        let old = match &u.old_sha {
            Some(_) => match s.run(&["cat", &u.path], b"", Duration::from_secs(60)).await {
                Ok(o) if o.ok() => o.stdout_text(),
                _ => String::new(),
            },
            None => String::new(),
        };
        let (old, new) = (mask(old), mask(new));
        let d = similar::TextDiff::from_lines(&old, &new);
        let header_old = if u.old_sha.is_some() {
            format!("{}:{} (on the host)", s.target.host, u.path)
        } else {
            "/dev/null".to_string()
        };
        out.push_str(
            &d.unified_diff()
                .context_radius(3)
                .header(
                    &header_old,
                    &format!("{}:{} (rendered)", s.target.host, u.path),
                )
                .to_string(),
        );
    }
    out
}

fn print_recap(ctx: &Ctx, recap: &Recap) {
    if ctx.opts.json {
        println!(
            "{}",
            serde_json::to_string_pretty(recap).expect("serializable")
        );
        return;
    }
    let w = recap.hosts.iter().map(|h| h.host.len()).max().unwrap_or(4);
    let mut text = String::new();
    for h in &recap.hosts {
        if ctx.opts.check && !h.planned.is_empty() {
            text.push_str(&format!("{}: would change:\n", h.host));
            for p in &h.planned {
                text.push_str(&format!("  {p}\n"));
            }
        }
    }
    text.push_str(&format!(
        "\n{} recap{}\n",
        if recap.check { "CHECK" } else { "RUN" },
        if recap.check {
            " (nothing was changed)"
        } else {
            ""
        }
    ));
    for h in &recap.hosts {
        text.push_str(&format!(
            "{:<w$}  ok={:<3} {}={:<3} skipped={:<2} failed={} unreachable={}  {:.1}s\n",
            h.host,
            h.ok,
            if recap.check {
                "would-change"
            } else {
                "changed"
            },
            h.changed,
            h.skipped,
            u8::from(h.failed),
            u8::from(h.unreachable),
            h.seconds
        ));
        for hd in &h.handlers {
            text.push_str(&format!("{:<w$}    handler: {hd}\n", ""));
        }
        for n in &h.notes {
            text.push_str(&format!("{:<w$}    note: {n}\n", ""));
        }
        for c in &h.checks {
            text.push_str(&format!(
                "{:<w$}    health {}: {} ({})\n",
                "",
                c.name,
                if c.ok { "ok" } else { "FAILED" },
                c.detail.lines().next().unwrap_or("")
            ));
        }
        if let Some(e) = &h.error {
            text.push_str(&format!(
                "{:<w$}    error: {}\n",
                "",
                e.replace('\n', &format!("\n{:<w$}    ", ""))
            ));
        }
    }
    if let Some(a) = &recap.audit {
        text.push_str(&format!("audit: {a}\n"));
    }
    text.push_str(&format!(
        "{} in {:.1}s\n",
        if recap.success { "success" } else { "FAILED" },
        recap.seconds
    ));
    if let Some(site) = &recap.site {
        text.push_str(&site.advice(&ctx.inv.tls.public_name));
    }
    print!("{text}");
}
