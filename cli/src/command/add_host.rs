//! `sagectl add-host INVENTORY NAME --address ADDR --role ROLE... [--var K=V]... [--check]` and
//! its common case `sagectl add-worker INVENTORY NAME --address ADDR`: the inventory grows by one
//! commented file in its include directory, validated with the rest first; then only the hosts
//! whose desired state changes because of it are converged (the new host, and those whose
//! rendered files mention it: backends' firewalls for a worker, ...), each with the reason.
//! Running it again changes nothing. When the deploy fails, the file stays and the message says
//! how to retry or take it out.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;

use crate::inventory::{Host, Inventory, Role};
use crate::pipeline::{self, Settings};
use crate::roles::Catalog;

#[derive(clap::Args)]
pub struct Opts {
    pub inventory: PathBuf,
    /// The new host's name.
    pub name: String,
    #[arg(long)]
    pub address: String,
    /// A role of the new host (repeat for several).
    #[arg(long = "role", value_name = "ROLE", required = true)]
    pub roles: Vec<String>,
    #[command(flatten)]
    pub common: Common,
}

/// `add-worker`: `add-host` with the worker role.
#[derive(clap::Args)]
pub struct WorkerOpts {
    pub inventory: PathBuf,
    /// The new worker's name.
    pub name: String,
    #[arg(long)]
    pub address: String,
    #[command(flatten)]
    pub common: Common,
}

#[derive(clap::Args, Clone)]
pub struct Common {
    /// A variable of the new host, `name=value` (repeat for several).
    #[arg(long = "var", value_name = "NAME=VALUE")]
    pub vars: Vec<String>,
    /// Print the plan and the diffs; change nothing (no file is written, no host touched).
    #[arg(long)]
    pub check: bool,
    /// Print a unified diff of every file that changes.
    #[arg(long)]
    pub diff: bool,
    /// Print the recap as JSON.
    #[arg(long)]
    pub json: bool,
    #[arg(short, long)]
    pub quiet: bool,
}

pub fn run_worker(o: WorkerOpts) -> anyhow::Result<ExitCode> {
    run(Opts {
        inventory: o.inventory,
        name: o.name,
        address: o.address,
        roles: vec!["worker".into()],
        common: o.common,
    })
}

/// A value given on the command line as YAML: numbers and booleans as such, anything else as a
/// string (JSON's quoting is YAML's).
fn yaml_value(v: &str) -> String {
    if v.parse::<i64>().is_ok() || v.parse::<f64>().is_ok() || v == "true" || v == "false" {
        v.to_string()
    } else {
        serde_json::to_string(v).expect("a string serializes")
    }
}

/// `v` as a YAML scalar that reads back as the same string: plain when it is a simple name,
/// JSON-quoted otherwise.
fn yaml_name(v: &str) -> String {
    let plain = v.starts_with(|c: char| c.is_ascii_lowercase())
        && v.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && !["null", "true", "false", "yes", "no", "on", "off"].contains(&v);
    if plain {
        v.to_string()
    } else {
        serde_json::to_string(v).expect("a string serializes")
    }
}

/// The new host's file: a comment saying who added it and how to take it out, then the host.
fn host_file(o: &Opts, inventory: &Path) -> anyhow::Result<String> {
    let address: std::net::IpAddr = o.address.parse().with_context(|| {
        format!(
            "--address {}: not an IP address (give the machine's address, like 10.0.0.20)",
            o.address
        )
    })?;
    let mut vars = String::new();
    for kv in &o.common.vars {
        let Some((k, v)) = kv.split_once('=') else {
            anyhow::bail!("--var {kv}: give name=value, like postgres_port=5433");
        };
        let named = !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            && !k.starts_with(|c: char| c.is_ascii_digit());
        anyhow::ensure!(
            named,
            "--var {kv}: `{k}` is not a variable name (lowercase letters, digits and _)"
        );
        vars.push_str(&format!("      {k}: {}\n", yaml_value(v)));
    }
    let roles: Vec<String> = o.roles.iter().map(|r| yaml_name(r)).collect();
    Ok(format!(
        "# Added by `sagectl add-host` to {inv}. Take it out with `sagectl remove-worker {inv} {name}`\n\
         # (a worker), or delete this file and run `sagectl up {inv}`.\n\
         hosts:\n  {name}:\n    address: {address}\n    roles: [{roles}]\n{vars_block}",
        inv = inventory.display(),
        name = yaml_name(&o.name),
        roles = roles.join(", "),
        vars_block = if vars.is_empty() {
            String::new()
        } else {
            format!("    vars:\n{vars}")
        },
    ))
}

/// Removes the file it names when dropped, unless kept.
struct Written {
    path: PathBuf,
    keep: bool,
}

impl Drop for Written {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// What a host is given: its files (path → mode, owner and content) and its other steps
/// (packages, services, ...), each as text.
type Desired = (BTreeMap<String, Vec<u8>>, Vec<String>);

/// What each host is given, for comparing two versions of an inventory.
fn desired(
    inv: &Inventory,
    catalog: &Catalog,
    state: &crate::pki::State,
    host: &Host,
) -> anyhow::Result<Desired> {
    let agent = std::sync::Arc::new(Vec::new());
    let (steps, _) = crate::render::host_steps(inv, catalog, state, host, Some(&agent))?;
    let mut files = BTreeMap::new();
    let mut other = Vec::new();
    for s in steps {
        match s.kind {
            crate::render::StepKind::File(f) => {
                let mut v = format!("{:o} {}:{}\n", f.attrs.mode, f.attrs.owner, f.attrs.group)
                    .into_bytes();
                v.extend(f.content);
                files.insert(f.path, v);
            }
            // Passwords are the same on both sides (one state directory): compare the rest.
            kind => other.push(format!("{}/{}: {kind:?}", s.role, s.task)),
        }
    }
    Ok((files, other))
}

/// The hosts of `after` other than `new` whose desired state differs from `before`'s, each with
/// the paths that differ.
pub(crate) fn affected(
    before: &Inventory,
    after: &Inventory,
    new: &str,
) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    let catalog = Catalog::embedded()?;
    let state = crate::pki::open(after)?;
    let mut out = Vec::new();
    for h in after.hosts.iter().filter(|h| h.name != new) {
        let old = before.host(&h.name).expect("the same hosts but one");
        let (a, a_steps) = desired(before, catalog, &state, old)?;
        let (b, b_steps) = desired(after, catalog, &state, h)?;
        let mut why: Vec<String> = b
            .iter()
            .filter(|(p, c)| a.get(*p) != Some(*c))
            .map(|(p, _)| p.clone())
            .chain(a.keys().filter(|p| !b.contains_key(*p)).cloned())
            .collect();
        if a_steps != b_steps {
            why.push("packages or services".into());
        }
        if !why.is_empty() {
            out.push((h.name.clone(), why));
        }
    }
    Ok(out)
}

pub fn run(o: Opts) -> anyhow::Result<ExitCode> {
    let started_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let current = match super::load(&o.inventory) {
        Ok(inv) => inv,
        Err(code) => return Ok(code),
    };
    for r in &o.roles {
        if Role::from_name(r).is_none() {
            let names: Vec<&str> = Role::DECLARABLE.iter().map(|r| r.name()).collect();
            anyhow::bail!(
                "--role {r}: no such role\n  hint: {}",
                crate::diag::suggest(r, &names)
            );
        }
    }
    let Some(dir) = current.include_dirs.first() else {
        anyhow::bail!(
            "{} has no include directory for added hosts\n  hint: add `include: [{}.d/]` to it (and make that directory): each added host gets a file of its own there",
            o.inventory.display(),
            current.name
        );
    };
    let path = dir.join(format!("{}.yaml", o.name));
    let text = host_file(&o, &o.inventory)?;
    // Run again: the same file is already there (the comment may differ), or another host
    // holds the name.
    let existing = std::fs::read_to_string(&path).ok();
    let same = existing.as_deref().is_some_and(|e| body(e) == body(&text));
    if let Some(h) = current.host(&o.name).filter(|_| !same) {
        anyhow::bail!(
            "{} is already in the inventory ({}, address {}): choose another name, or remove it first",
            o.name,
            h.pos,
            h.address
        );
    }
    if existing.is_some() && !same {
        anyhow::bail!(
            "{} exists and says something else: look at it, then remove it or choose another name",
            path.display()
        );
    }
    let mut written = Written {
        path: path.clone(),
        keep: same,
    };
    if !same {
        // Beside it under a name the include loader skips, then renamed: never half a file.
        let tmp = dir.join(format!(".{}.yaml.tmp", o.name));
        std::fs::write(&tmp, &text)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    // The grown inventory, validated as a whole: every problem at once, and the file removed.
    let grown = match super::load(&o.inventory) {
        Ok(inv) => inv,
        Err(code) => {
            eprintln!("nothing was changed: {} is not kept", path.display());
            return Ok(code);
        }
    };
    written.keep = !o.common.check || same;
    if o.common.check && !same {
        // Loaded: the inventory file is not needed to plan.
        drop(written);
    } else if !same {
        eprintln!("wrote {}", path.display());
    }
    let mut before = grown.clone();
    before.hosts.retain(|h| h.name != o.name);
    let affected = affected(&before, &grown, &o.name)?;
    let mut batch = vec![o.name.clone()];
    eprintln!("converging {} (the new host)", o.name);
    for (h, why) in &affected {
        eprintln!("converging {h}: its {} mention {}", why.join(", "), o.name);
        batch.push(h.clone());
    }
    let untouched = grown.hosts.len() - batch.len();
    if o.common.check && grown.lab.is_some() {
        let lab = crate::lab::Lab::new(&grown)?;
        let made = lab
            .status()
            .into_iter()
            .any(|(n, s)| n == o.name && matches!(s, crate::lab::MachineStatus::Running { .. }));
        if !made {
            eprintln!(
                "{}: a new lab machine would be made, then everything installed on it",
                o.name
            );
            batch.retain(|h| *h != o.name);
        }
    }
    eprintln!("{untouched} other hosts are not contacted");
    let settings = Settings {
        check: o.common.check,
        diff: o.common.diff,
        quiet: o.common.quiet,
        command: if o.roles == ["worker"] {
            "add-worker"
        } else {
            "add-host"
        },
        ..Settings::default()
    };
    let names: Vec<String> = grown
        .hosts
        .iter()
        .filter(|h| batch.contains(&h.name))
        .map(|h| h.name.clone())
        .collect();
    let p = pipeline::Pipeline::new(grown, &names, settings)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let recap = rt.block_on(p.run(&[names]));
    if o.common.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&recap).expect("serializable")
        );
    } else {
        print!("{}", recap.text(&p.inv.tls.public_name));
    }
    if o.common.check {
        return Ok(if recap.success {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    if !recap.success {
        eprintln!(
            "{} stays in the inventory ({}): fix what failed above and run the same command again (it converges what is left); to give up, delete that file and run `sagectl up {}`",
            o.name,
            path.display(),
            o.inventory.display()
        );
        return Ok(ExitCode::FAILURE);
    }
    if o.roles.iter().any(|r| r == "worker") {
        let backends: Vec<String> = p
            .inv
            .with_role(Role::Backend)
            .map(|h| h.name.clone())
            .collect();
        // A worker this run changed (restarted) must register anew; one it left alone (a run
        // again) registered before and has been heartbeating since.
        let changed = recap
            .hosts
            .iter()
            .any(|h| h.host == o.name && h.changed > 0);
        let since = if changed { started_ms } else { 0 };
        match rt.block_on(registered(&p.inv, &o.name, since, &backends)) {
            Ok(took) => eprintln!(
                "{} is registered with every backend ({}), which place new sessions on it ({:.1}s after the run, from their logs in logd)",
                o.name,
                backends.join(", "),
                took.as_secs_f64()
            ),
            Err(e) => {
                eprintln!("{} was deployed, but {e}", o.name);
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    eprintln!("{} added", o.name);
    Ok(ExitCode::SUCCESS)
}

/// Waits (30 s at most) until every backend has logged registering `worker` since `since_ms`
/// (within the last week): the backends' own word, read from logd.
async fn registered(
    inv: &Inventory,
    worker: &str,
    since_ms: i64,
    backends: &[String],
) -> anyhow::Result<std::time::Duration> {
    let started = std::time::Instant::now();
    if inv.with_role(Role::Logd).next().is_none() {
        anyhow::bail!("the inventory has no logd to confirm that the backends registered it");
    }
    let query = crate::logquery::Query {
        since: "7d".into(),
        text: Some(format!("worker {worker} registered")),
        limit: 10_000,
        ..Default::default()
    };
    let client = crate::logquery::Client::new(inv, query)?;
    loop {
        let seen: std::collections::BTreeSet<String> = client
            .records(0)
            .await
            .unwrap_or_default()
            .iter()
            .filter(|r| {
                r["fields"]["worker"] == worker && r["ts_ms"].as_i64().unwrap_or(0) >= since_ms
            })
            .filter_map(|r| r["host"].as_str().map(String::from))
            .collect();
        let missing: Vec<&String> = backends.iter().filter(|b| !seen.contains(*b)).collect();
        if missing.is_empty() {
            return Ok(started.elapsed());
        }
        if started.elapsed() > std::time::Duration::from_secs(30) {
            anyhow::bail!(
                "after 30 s these backends have not registered it: {} (see `sagectl logs` for why)",
                missing
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// A host file without its comment lines (what the host is, not who wrote it when).
fn body(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(vars: &[&str]) -> Opts {
        Opts {
            inventory: "inv.yaml".into(),
            name: "worker3".into(),
            address: "10.0.0.20".into(),
            roles: vec!["worker".into()],
            common: Common {
                vars: vars.iter().map(|s| s.to_string()).collect(),
                check: false,
                diff: false,
                json: false,
                quiet: true,
            },
        }
    }

    #[test]
    fn the_host_file_says_what_was_added() {
        let t = host_file(
            &opts(&["memcached_port=11212", "note=a b: c"]),
            Path::new("inv.yaml"),
        )
        .unwrap();
        assert!(
            t.starts_with("# Added by `sagectl add-host` to inv.yaml."),
            "{t}"
        );
        assert!(
            t.ends_with("hosts:\n  worker3:\n    address: 10.0.0.20\n    roles: [worker]\n    vars:\n      memcached_port: 11212\n      note: \"a b: c\"\n"),
            "{t}"
        );
        assert_eq!(body(&t), body(&t.replace("inv.yaml", "other.yaml")));
    }

    #[test]
    fn bad_arguments_are_named() {
        let mut o = opts(&[]);
        o.address = "10.0.0".into();
        let e = host_file(&o, Path::new("i")).unwrap_err().to_string();
        assert!(e.contains("--address 10.0.0: not an IP address"), "{e}");
        let e = host_file(&opts(&["Bad-Name=1"]), Path::new("i"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`Bad-Name` is not a variable name"), "{e}");
        let e = host_file(&opts(&["novalue"]), Path::new("i"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("give name=value"), "{e}");
    }
}
