//! One host through the pipeline: render its steps, connect, gather facts in one round trip,
//! plan, then apply and run its handlers (or, with `check`, only report the plan).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::{HostRecap, Pipeline};
use crate::pki::Secret;
use crate::plan::{Change, HostPlan};
use crate::ssh::{Session, SshError};

/// Converges host `name`; returns its recap and, when it succeeded, its session (for the
/// health checks).
pub(super) async fn converge(p: &Pipeline, name: &str) -> (HostRecap, Option<Session>) {
    let started = Instant::now();
    let mut phase = Instant::now();
    let mut lap = move |r: &mut HostRecap, name: &'static str| {
        r.phases.push((name, phase.elapsed().as_secs_f64()));
        phase = Instant::now();
    };
    let mut r = HostRecap {
        host: name.to_string(),
        ..Default::default()
    };
    let host = p.inv.host(name).expect("selected from the inventory");
    let (ui, settings) = (&p.ui, &p.settings);
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
    let (steps, handlers) =
        match crate::render::host_steps(&p.inv, p.catalog, &p.state, host, p.agent.as_ref()) {
            Ok(s) => s,
            Err(e) => return fail(r, e.to_string(), false),
        };
    lap(&mut r, "render");
    ui.msg(name, "connecting");
    let target = super::connect::target(host, p.lab_key.as_deref());
    let session = match Session::connect(&target, p.known.clone(), settings.host_keys).await {
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
            p.known.path().display()
        ));
    }
    lap(&mut r, "connect");
    ui.msg(name, "gathering facts");
    let query = crate::plan::query(&steps);
    let gather = || async {
        match session
            .run(
                &["sh", "-c", crate::facts::SCRIPT],
                query.stdin().as_bytes(),
                Duration::from_secs(120),
            )
            .await
        {
            Ok(o) if o.ok() => {
                crate::facts::parse(&o.stdout_text()).map_err(|e| (e.to_string(), false))
            }
            Ok(o) => Err((format!("gathering facts failed: {}", o.tail()), false)),
            Err(e) => Err((e.to_string(), true)),
        }
    };
    // The host's lock is taken on the same connection as the facts are gathered, at once
    // (facts only read): no round trip is added. Facts gathered while another run held the
    // lock are gathered again once this run has it.
    let facts = if settings.check {
        gather().await
    } else {
        let (lock, facts) = tokio::join!(lock_host(p, &session), gather());
        match lock {
            Err((e, unreachable)) => return fail(r, e, unreachable),
            Ok(lock) => {
                if let Some(prev) = lock.previous {
                    r.notes.push(format!(
                        "took over the lock left by {prev}: its SSH session is gone"
                    ));
                }
                if lock.busy.is_some() {
                    gather().await
                } else {
                    facts
                }
            }
        }
    };
    let facts = match facts {
        Ok(f) => f,
        Err((e, unreachable)) => return fail(r, e, unreachable),
    };
    if facts.os.0 != "debian" {
        r.notes.push(format!(
            "{} {} is not Debian: packages and paths may differ",
            facts.os.0, facts.os.1
        ));
    }
    lap(&mut r, "facts");
    let plan = crate::plan::plan(&steps, &handlers, &facts);
    if settings.diff {
        let text = diffs(&session, &plan, &p.secrets).await;
        if !text.is_empty() {
            ui.println(&text);
        }
    }
    lap(&mut r, "plan");
    if settings.check {
        r.planned = plan
            .items
            .iter()
            .filter(|i| i.change.is_change())
            .map(|i| format!("{}: {}", i.task, i.change.describe()))
            .collect();
        r.changed = plan.changes();
        r.ok = plan.items.len() - r.changed;
        r.handlers = plan.pending.clone();
        r.seconds = started.elapsed().as_secs_f64();
        ui.done(name, &format!("would change {}", r.changed));
        return (r, Some(session));
    }
    if settings.verbose {
        for i in plan.items.iter().filter(|i| !i.change.is_change()) {
            ui.println(&format!("{name}: {}: {}", i.task, i.change.describe()));
        }
    }
    let progress = |m: &str| {
        ui.msg(name, m);
        if settings.verbose {
            ui.println(&format!("{name}: {m}"));
        }
    };
    // A fresh connection, as the next run would make (handlers that guard sshd use it).
    let relogin = || -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async {
            let s = Session::connect(&target, p.known.clone(), settings.host_keys)
                .await
                .map_err(|e| e.to_string())?;
            s.close().await;
            Ok(())
        })
    };
    let applied = crate::apply::apply(&session, &plan, &progress, &relogin).await;
    lap(&mut r, "apply");
    r.ok = applied.ok;
    r.changed = applied.changed;
    r.handlers = applied.handlers.clone();
    r.seconds = started.elapsed().as_secs_f64();
    if let Some(e) = applied.error {
        let unreachable = applied.unreachable;
        return fail(r, e, unreachable);
    }
    ui.done(name, &format!("ok={} changed={}", r.ok, r.changed));
    (r, Some(session))
}

/// Takes the host's lock ([`crate::lock::REMOTE_SCRIPT`]) for the rest of the session.
async fn lock_host(
    p: &Pipeline,
    session: &Session,
) -> Result<crate::lock::RemoteReply, (String, bool)> {
    use crate::lock::{REMOTE_PATH, REMOTE_SCRIPT, RemoteReply};
    let timeout = p.settings.lock_timeout;
    let secs = timeout.as_secs().to_string();
    let holding = session
        .hold(
            &["sh", "-c", REMOTE_SCRIPT, "sh", REMOTE_PATH, &secs],
            format!("{}\n", p.holder.line()).as_bytes(),
            |out| out.lines().any(|l| l == "locked"),
            timeout + Duration::from_secs(60),
        )
        .await
        .map_err(|e| (e.to_string(), matches!(e, SshError::Timeout { .. })))?;
    let reply = RemoteReply::parse(&holding.stdout);
    match holding.ended {
        None => Ok(reply),
        Some(o) if o.status == 4 => Err((reply.refusal(&session.target.host, timeout), false)),
        Some(o) => Err((
            format!(
                "could not take the lock {REMOTE_PATH} on {}: {}",
                session.target.host,
                o.tail()
            ),
            false,
        )),
    }
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
