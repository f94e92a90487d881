//! `sagectl promote INVENTORY HOST`: the standby becomes the primary when the primary is gone.
//!
//! 1. The old primary is fenced when it still answers: PostgreSQL stopped, and its data
//!    directory given `standby.signal` (were it started again, it would be read-only) and
//!    `sagectl-fenced` (so `sagectl up` clones it afresh instead of taking it for a standby).
//! 2. The standby is promoted (`pg_promote`), and sagectl waits until it takes writes.
//! 3. The inventory's `database.standby` is rewritten in place to name the old primary (the
//!    file stays the truth; nothing else in it changes).
//! 4. The backends, logd and the new primary are converged onto it: their configs name it.
//!
//! The old primary's machine, once back (or a new one at its address), is made a standby of the
//! new primary by `sagectl up` (its old data moved aside, never removed).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::inventory::Role;
use crate::pipeline::{Pipeline, Settings};
use crate::yaml::Kind;

#[derive(clap::Args)]
pub struct Opts {
    /// The inventory file (its `database.standby` is rewritten).
    pub inventory: PathBuf,
    /// The standby to promote (`database.standby`).
    pub host: String,
    /// Print the converge's recap as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

const FENCE: &str = r#"set -eu
systemctl stop -- "$1"
install -o postgres -g postgres -m 0600 /dev/null "$2/standby.signal"
date -u +%FT%TZ > "$2/sagectl-fenced"
"#;

fn say(msg: impl AsRef<str>) {
    eprintln!("promote: {}", msg.as_ref());
}

pub fn run(o: Opts) -> anyhow::Result<ExitCode> {
    let inv = match super::load(&o.inventory) {
        Ok(inv) => inv,
        Err(code) => return Ok(code),
    };
    let old = inv.database.primary.clone();
    match &inv.database.standby {
        Some(s) if *s == o.host => {}
        Some(s) => anyhow::bail!(
            "{} is not the standby of {} (`database.standby` is {s})",
            o.host,
            o.inventory.display()
        ),
        None => anyhow::bail!(
            "{} has no standby to promote\n  hint: give a second host the `database` role and name it in `database: {{standby: HOST}}`; `sagectl up` makes it",
            o.inventory.display()
        ),
    }
    let version = crate::render::host_vars(
        &inv,
        crate::roles::Catalog::embedded()?,
        inv.host(&o.host).expect("validated"),
    )
    .get("postgres_version")
    .and_then(|v| v.as_str().map(String::from))
    .unwrap_or_else(|| "15".into());
    let service = format!("postgresql@{version}-main");
    let data = format!("/var/lib/postgresql/{version}/main");
    let started = Instant::now();
    // Held for the whole command: the promotion, the rewrite, the converge.
    let _lock =
        crate::pipeline::lock_inventory(&inv, &crate::lock::Holder::me(), &Settings::default())?;
    let p = Pipeline::new(
        inv.clone(),
        &[old.clone(), o.host.clone()],
        Settings {
            check: true,
            quiet: true,
            command: "promote",
            start_lab: false,
            ..Settings::default()
        },
    )?;
    let rt = super::runtime()?;
    rt.block_on(async {
        match tokio::time::timeout(Duration::from_secs(15), p.session(&old)).await {
            Ok(Ok(s)) => {
                let out = s
                    .run(
                        &["bash", "-c", FENCE, "fence", &service, &data],
                        b"",
                        Duration::from_secs(120),
                    )
                    .await?;
                anyhow::ensure!(
                    out.ok(),
                    "{old} answers but could not be fenced (its PostgreSQL stopped): {}\n  nothing was promoted",
                    out.tail()
                );
                say(format!(
                    "{old} answered: its PostgreSQL is stopped and fenced (read-only if started again)"
                ));
                s.close().await;
            }
            Ok(Err(e)) => say(format!("{old} does not answer ({e}): taken as gone")),
            Err(_) => say(format!("{old} does not answer within 15 s: taken as gone")),
        }
        let s = p.session(&o.host).await?;
        let sql = |q: &str| super::postgres_psql("postgres", q);
        let run = |argv: Vec<String>| {
            let s = &s;
            async move {
                let a: Vec<&str> = argv.iter().map(String::as_str).collect();
                s.run(&a, b"", Duration::from_secs(90)).await
            }
        };
        let r = run(sql("select pg_is_in_recovery()")).await?;
        match r.stdout_text().trim() {
            "t" => {
                let out = run(sql("select pg_promote(true, 60)")).await?;
                anyhow::ensure!(
                    out.ok() && out.stdout_text().trim() == "t",
                    "{} did not finish promoting within 60 s: {}{}",
                    o.host,
                    out.stdout_text(),
                    out.tail()
                );
                say(format!(
                    "{} promoted: it takes writes ({:.1} s)",
                    o.host,
                    started.elapsed().as_secs_f64()
                ));
            }
            "f" => say(format!(
                "{} already takes writes (promoted before): going on with the inventory",
                o.host
            )),
            other => anyhow::bail!(
                "{}'s PostgreSQL did not say whether it is a standby ({other:?}): {}\n  hint: is it running? `sagectl lab ssh` or ssh to it, then `journalctl -u {service}`",
                o.host,
                r.tail()
            ),
        }
        s.close().await;
        anyhow::Ok(())
    })?;
    drop(p);
    rewrite_standby(&o.inventory, &old)?;
    say(format!(
        "{}: database.standby is now {old} (was {})",
        o.inventory.display(),
        o.host
    ));
    let after = match super::load(&o.inventory) {
        Ok(inv) => inv,
        Err(code) => return Ok(code),
    };
    let names: Vec<String> = after
        .hosts
        .iter()
        .filter(|h| h.name == o.host || h.has(Role::Backend) || h.has(Role::Logd))
        .map(|h| h.name.clone())
        .collect();
    say(format!("converging {} onto {}", names.join(", "), o.host));
    let p = Pipeline::new(
        after,
        &names,
        Settings {
            command: "promote",
            start_lab: false,
            ..Settings::default()
        },
    )?;
    let recap = rt.block_on(p.run(std::slice::from_ref(&names)));
    recap.print(o.json, &p.inv.tls.public_name);
    if !recap.success {
        eprintln!(
            "{} is the primary, but converging the hosts onto it failed (above): run `sagectl up {} --limit backend --limit logd`",
            o.host,
            o.inventory.display()
        );
        return Ok(ExitCode::FAILURE);
    }
    say(format!(
        "done in {:.1} s: {} is the primary. {old} is the standby in the inventory: once its machine is back (or a new one at its address), `sagectl up {}` makes it a copy of {} (what its disk held is moved aside, not removed)",
        started.elapsed().as_secs_f64(),
        o.host,
        o.inventory.display(),
        o.host
    ));
    Ok(ExitCode::SUCCESS)
}

/// Rewrites the value of `database.standby` in `file` to `name`, touching nothing else (comments
/// and layout stay), through a temporary file renamed over it.
fn rewrite_standby(file: &Path, name: &str) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let new = with_standby(file, &text, name)?;
    let tmp = file.with_extension("yaml.sagectl-new");
    std::fs::write(&tmp, new).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, file).with_context(|| format!("replacing {}", file.display()))?;
    Ok(())
}

/// `text` with `database.standby`'s scalar replaced by `name`.
fn with_standby(file: &Path, text: &str, name: &str) -> anyhow::Result<String> {
    let root = crate::yaml::parse(file, text).map_err(|d| anyhow::anyhow!("{d}"))?;
    let find = |n: &crate::yaml::Node, key: &str| match &n.kind {
        Kind::Map(m) => m
            .iter()
            .find(|(k, _)| matches!(&k.kind, Kind::Str(s) if s == key))
            .map(|(_, v)| v.clone()),
        _ => None,
    };
    let node = find(&root, "database")
        .and_then(|d| find(&d, "standby"))
        .with_context(|| format!("{}: no `database.standby` to rewrite", file.display()))?;
    let Kind::Str(old) = &node.kind else {
        anyhow::bail!("{}: `database.standby` is not a name", node.pos);
    };
    let line_start: usize = text
        .split_inclusive('\n')
        .take(node.pos.line - 1)
        .map(str::len)
        .sum();
    let line = text[line_start..].lines().next().unwrap_or("");
    // Columns count characters; host names are ASCII, what precedes may not be.
    let at = line_start
        + line
            .char_indices()
            .nth(node.pos.col - 1)
            .map_or(line.len(), |(i, _)| i);
    let rest = &text[at..];
    let len = match rest.chars().next() {
        Some(q @ ('"' | '\'')) => rest[1..].find(q).map(|i| i + 2),
        _ => Some(old.len()).filter(|n| rest.get(..*n) == Some(old.as_str())),
    }
    .with_context(|| {
        format!(
            "{}: could not find `{old}` where `database.standby` is; edit it by hand to `{name}`",
            node.pos
        )
    })?;
    Ok(format!("{}{name}{}", &text[..at], &text[at + len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_standby_is_rewritten_in_place() {
        let f = Path::new("inv.yaml");
        let flow =
            "name: x # é\ndatabase: {standby: db2, backups: {keep: 3}}  # db2 streams\nhosts: {}\n";
        assert_eq!(
            with_standby(f, flow, "db").unwrap(),
            "name: x # é\ndatabase: {standby: db, backups: {keep: 3}}  # db2 streams\nhosts: {}\n"
        );
        let block = "name: x\ndatabase:\n  # the standby\n  standby: \"db2\"\nhosts: {}\n";
        assert_eq!(
            with_standby(f, block, "db").unwrap(),
            "name: x\ndatabase:\n  # the standby\n  standby: db\nhosts: {}\n"
        );
        let single = "database:\n  standby: 'db-b'   # x\n";
        assert_eq!(
            with_standby(f, single, "db-a").unwrap(),
            "database:\n  standby: db-a   # x\n"
        );
        let err = with_standby(f, "name: x\n", "db").unwrap_err().to_string();
        assert!(err.contains("no `database.standby`"), "{err}");
    }
}
