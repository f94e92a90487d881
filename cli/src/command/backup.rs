//! `sagectl backup INVENTORY [--to DIR]` and `sagectl restore INVENTORY BACKUP`.
//!
//! A backup is one directory: `sagews.dump` and `sagews_logs.dump` (pg_dump's custom format),
//! `SHA256SUMS` (as `sha256sum -c` reads it) and `manifest.json` (where and when, from the
//! standby or not, the server version, rows per table that matter). pg_dump rather than
//! pg_basebackup: each dump is one consistent snapshot of its database taken from a hot standby
//! without stopping anything, restores onto a fresh host of any later PostgreSQL version with
//! the roles `sagectl up` makes (no cluster-wide state, no WAL archive to keep), and is a
//! fraction of the cluster's size; what it cannot give (a point in time between backups) the
//! standby covers. The two databases are dumped one after the other: each is consistent in
//! itself, and nothing joins them.
//!
//! Dumps stream over SSH straight into the file (nothing held in memory), then are checked
//! against the sums the database host computed. A restore verifies the sums first, stops the
//! backends and logd, restores each database into a new one in a single transaction and swaps
//! it in by renaming (a failure leaves the current one in place), clears the live-state tables
//! (open sessions, workers, backends: they describe the old processes), empties memcached, and
//! starts everything again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::inventory::{Inventory, Role};
use crate::pipeline::{Pipeline, Settings};
use crate::ssh::Session;

#[derive(clap::Args)]
pub struct BackupOpts {
    pub inventory: PathBuf,
    /// Directory the backup is written into (default: the state directory's `backups/`).
    #[arg(long)]
    pub to: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct RestoreOpts {
    pub inventory: PathBuf,
    /// A backup directory made by `sagectl backup` (or by the scheduled backups, copied here).
    pub backup: PathBuf,
    /// Restore even when the primary already holds workspaces (they are kept aside in
    /// databases renamed `*_before_restore_<time>`).
    #[arg(long)]
    pub replace: bool,
}

/// (database, the role that owns it).
const DATABASES: [(&str, &str); 2] = [("sagews", "sagews_backend"), ("sagews_logs", "sagews_logd")];

/// Rows counted into the manifest and after a restore, by database.
const COUNTED: [(&str, &str); 3] = [
    ("sagews", "accounts"),
    ("sagews", "workspaces"),
    ("sagews_logs", "records"),
];

#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub inventory: String,
    pub host: String,
    pub from_standby: bool,
    pub taken_at: String,
    pub server_version: String,
    pub format: String,
    /// File name → (bytes, sha256).
    pub files: BTreeMap<String, (u64, String)>,
    /// "database.table" → rows.
    pub rows: BTreeMap<String, i64>,
}

fn acting(
    inv: &Inventory,
    hosts: &[String],
    command: &'static str,
) -> anyhow::Result<std::sync::Arc<Pipeline>> {
    Pipeline::new(
        inv.clone(),
        hosts,
        Settings {
            check: true,
            quiet: true,
            command,
            ..Settings::default()
        },
    )
}

async fn run(s: &Session, argv: &[String], secs: u64) -> anyhow::Result<String> {
    let a: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = s.run(&a, b"", Duration::from_secs(secs)).await?;
    anyhow::ensure!(
        out.ok(),
        "{}: `{}` failed: {}",
        s.target.host,
        argv.join(" "),
        out.tail()
    );
    Ok(out.stdout_text().trim().to_string())
}

async fn rows(s: &Session) -> BTreeMap<String, i64> {
    let mut m = BTreeMap::new();
    for (db, table) in COUNTED {
        let q = format!("select count(*) from {table}");
        if let Ok(n) = run(s, &super::postgres_psql(db, &q), 60).await {
            if let Ok(n) = n.parse() {
                m.insert(format!("{db}.{table}"), n);
            }
        }
    }
    m
}

/// Hex sha256 of a file, read in blocks.
fn sha256_file(path: &Path) -> anyhow::Result<(u64, String)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        ctx.update(&buf[..n]);
    }
    let hex: String = ctx
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((total, hex))
}

pub fn backup(o: BackupOpts) -> anyhow::Result<ExitCode> {
    let inv = match super::load(&o.inventory) {
        Ok(inv) => inv,
        Err(code) => return Ok(code),
    };
    let started = Instant::now();
    let root =
        o.to.clone()
            .unwrap_or_else(|| crate::pki::dir_for(&inv).join("backups"));
    let mut hosts = vec![];
    hosts.extend(inv.database.standby.clone());
    hosts.push(inv.database.primary.clone());
    let p = acting(&inv, &hosts, "backup")?;
    let rt = super::runtime()?;
    let dir = rt.block_on(async {
        // The standby when it answers and is a standby; else the primary.
        let mut chosen = None;
        for h in &hosts {
            match tokio::time::timeout(Duration::from_secs(15), p.session(h)).await {
                Ok(Ok(s)) => {
                    let rec = run(&s, &super::postgres_psql("postgres", "select pg_is_in_recovery()"), 30).await;
                    match rec.as_deref() {
                        Ok("t") if Some(h) == inv.database.standby.as_ref() => {
                            chosen = Some((h.clone(), s, true));
                            break;
                        }
                        Ok("f") if *h == inv.database.primary => {
                            chosen = Some((h.clone(), s, false));
                            break;
                        }
                        Ok(other) => eprintln!("backup: {h} is not what the inventory says (in recovery: {other}); not backing up from it"),
                        Err(e) => eprintln!("backup: {h}: {e}"),
                    }
                }
                Ok(Err(e)) => eprintln!("backup: {h} does not answer: {e}"),
                Err(_) => eprintln!("backup: {h} does not answer within 15 s"),
            }
        }
        let (host, s, from_standby) = chosen.context("no database host to back up from (above)")?;
        let stamp = run(&s, &["date".into(), "-u".into(), "+%Y%m%dT%H%M%SZ".into()], 10).await?;
        let dir = root.join(format!("{}-{stamp}", inv.name));
        let partial = root.join(format!(".{}-{stamp}.partial", inv.name));
        std::fs::create_dir_all(&partial).with_context(|| format!("creating {}", partial.display()))?;
        set_private(&root)?;
        set_private(&partial)?;
        let version = run(&s, &super::postgres_psql("postgres", "show server_version"), 30).await?;
        let rows = rows(&s).await;
        let mut files = BTreeMap::new();
        for (db, _) in DATABASES {
            let name = format!("{db}.dump");
            let path = partial.join(&name);
            let mut f = tokio::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .await
                .with_context(|| format!("creating {}", path.display()))?;
            let t = Instant::now();
            let argv = ["runuser", "-u", "postgres", "--", "pg_dump", "--format=custom", "--dbname", db];
            let out = s.stream(&argv, tokio::io::empty(), &mut f, Duration::from_secs(6 * 3600)).await?;
            anyhow::ensure!(out.ok(), "{host}: pg_dump of {db} failed: {}", out.tail());
            drop(f);
            // The host's own sum of what pg_dump wrote would need a second dump; the file's
            // sum here is what restore checks (a dump damaged in transit fails pg_restore's
            // own checks too).
            let (bytes, sum) = sha256_file(&path)?;
            eprintln!(
                "backup: {db} from {host}: {bytes} bytes in {:.1} s",
                t.elapsed().as_secs_f64()
            );
            files.insert(name, (bytes, sum));
        }
        let sums: String = files.iter().map(|(n, (_, h))| format!("{h}  {n}\n")).collect();
        write_private(&partial.join("SHA256SUMS"), sums.as_bytes())?;
        let m = Manifest {
            inventory: inv.name.clone(),
            host: host.clone(),
            from_standby,
            taken_at: stamp,
            server_version: version,
            format: "pg_dump custom".into(),
            files,
            rows,
        };
        let text = serde_json::to_string_pretty(&m).expect("serializable") + "\n";
        write_private(&partial.join("manifest.json"), text.as_bytes())?;
        std::fs::rename(&partial, &dir).with_context(|| format!("renaming {} to {}", partial.display(), dir.display()))?;
        s.close().await;
        anyhow::Ok(dir)
    })?;
    println!("{}", dir.display());
    eprintln!(
        "backup: complete in {:.1} s: {}\n  restore onto a fresh database host with `sagectl restore {} {}`",
        started.elapsed().as_secs_f64(),
        dir.display(),
        o.inventory.display(),
        dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn set_private(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("setting {} to 0700", dir.display()))
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))
}

/// Reads `dir`'s manifest and checks every file against SHA256SUMS.
pub fn verify(dir: &Path) -> anyhow::Result<Manifest> {
    let mpath = dir.join("manifest.json");
    let text = std::fs::read_to_string(&mpath).with_context(|| {
        format!(
            "{}: not a backup made by `sagectl backup` (no manifest.json)",
            dir.display()
        )
    })?;
    let m: Manifest = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a backup manifest", mpath.display()))?;
    let sums_path = dir.join("SHA256SUMS");
    let sums = std::fs::read_to_string(&sums_path)
        .with_context(|| format!("reading {}", sums_path.display()))?;
    let mut listed = 0;
    for line in sums.lines() {
        let (want, name) = line
            .split_once("  ")
            .with_context(|| format!("{}: not a sha256sum line: {line:?}", sums_path.display()))?;
        let (_, got) = sha256_file(&dir.join(name))?;
        anyhow::ensure!(
            got == want,
            "{}: its sha256 is {got}, SHA256SUMS says {want}: the backup is damaged; nothing was restored",
            dir.join(name).display()
        );
        listed += 1;
    }
    for (db, _) in DATABASES {
        anyhow::ensure!(
            sums.lines().any(|l| l.ends_with(&format!("  {db}.dump"))),
            "{}: no {db}.dump in SHA256SUMS",
            dir.display()
        );
    }
    anyhow::ensure!(
        listed == DATABASES.len(),
        "{}: SHA256SUMS lists {listed} files, expected {}",
        dir.display(),
        DATABASES.len()
    );
    Ok(m)
}

pub fn restore(o: RestoreOpts) -> anyhow::Result<ExitCode> {
    let inv = match super::load(&o.inventory) {
        Ok(inv) => inv,
        Err(code) => return Ok(code),
    };
    let started = Instant::now();
    let m = verify(&o.backup)?;
    eprintln!(
        "restore: {} verified ({} from {} at {}, {})",
        o.backup.display(),
        m.format,
        m.host,
        m.taken_at,
        m.rows
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if m.inventory != inv.name {
        eprintln!(
            "restore: the backup is of deployment `{}`, restoring into `{}`",
            m.inventory, inv.name
        );
    }
    let primary = inv.database.primary.clone();
    let agents: Vec<(String, &str)> = inv
        .hosts
        .iter()
        .flat_map(|h| {
            let mut v = Vec::new();
            if h.has(Role::Backend) {
                v.push((h.name.clone(), "sage-backend"));
            }
            if h.has(Role::Logd) {
                v.push((h.name.clone(), "sage-logd"));
            }
            v
        })
        .collect();
    let caches: Vec<String> = inv.with_role(Role::Cache).map(|h| h.name.clone()).collect();
    let mut hosts: Vec<String> = vec![primary.clone()];
    hosts.extend(agents.iter().map(|(h, _)| h.clone()));
    hosts.extend(caches.iter().cloned());
    hosts.sort();
    hosts.dedup();
    let _lock =
        crate::pipeline::lock_inventory(&inv, &crate::lock::Holder::me(), &Settings::default())?;
    let p = acting(&inv, &hosts, "restore")?;
    let rt = super::runtime()?;
    let rows = rt.block_on(async {
        let db = p.session(&primary).await?;
        // The databases `sagectl up` made, and what they hold now.
        for (name, owner) in DATABASES {
            let q = format!("select pg_get_userbyid(datdba) from pg_database where datname = '{name}'");
            let got = run(&db, &super::postgres_psql("postgres", &q), 30).await?;
            anyhow::ensure!(
                got == owner,
                "{primary} has no database {name} owned by {owner}: run `sagectl up {}` first (it makes the roles and databases), then restore",
                o.inventory.display()
            );
        }
        let now = rows(&db).await;
        let held = now.get("sagews.workspaces").copied().unwrap_or(0);
        anyhow::ensure!(
            held == 0 || o.replace,
            "{primary} already holds {held} workspaces: restoring would set them aside\n  hint: run again with --replace (they are kept in sagews_before_restore_<time>), or restore onto a fresh database host"
        );
        // Nothing writes while the databases are swapped.
        stop_start(&p, &agents, "stop").await?;
        let r = swap_in(&db, &o.backup, held > 0).await;
        for c in &caches {
            if let Ok(s) = p.session(c).await {
                // Cached sessions and accounts describe the database that was there.
                let _ = run(&s, &["systemctl".into(), "restart".into(), "memcached".into()], 60).await;
            }
        }
        let started_again = stop_start(&p, &agents, "start").await;
        r?;
        started_again?;
        let after = rows(&db).await;
        db.close().await;
        anyhow::Ok(after)
    })?;
    let mut mismatched = Vec::new();
    for (k, want) in &m.rows {
        let got = rows.get(k).copied().unwrap_or(-1);
        // logd writes records of its own start (and this restore's audit) right away.
        let ok = if k.ends_with(".records") {
            got >= *want
        } else {
            got == *want
        };
        if !ok {
            mismatched.push(format!("{k}: {got} restored, {want} in the backup"));
        }
    }
    anyhow::ensure!(
        mismatched.is_empty(),
        "restored, but the rows differ: {}",
        mismatched.join("; ")
    );
    eprintln!(
        "restore: done in {:.1} s onto {primary}: {}; backends and logd started again",
        started.elapsed().as_secs_f64(),
        rows.iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(ExitCode::SUCCESS)
}

async fn stop_start(p: &Pipeline, agents: &[(String, &str)], verb: &str) -> anyhow::Result<()> {
    let jobs = agents.iter().map(|(h, unit)| async move {
        let s = p.session(h).await?;
        let r = run(&s, &["systemctl".into(), verb.into(), (*unit).into()], 120).await;
        s.close().await;
        r.map(drop).with_context(|| format!("{verb} {unit} on {h}"))
    });
    for r in futures_util::future::join_all(jobs).await {
        r?;
    }
    Ok(())
}

/// Restores each dump into `<db>_restoring` in one transaction, then renames it over `<db>`
/// (kept as `<db>_before_restore_<time>` when `keep`, dropped when it held nothing).
async fn swap_in(db: &Session, dir: &Path, keep: bool) -> anyhow::Result<()> {
    let stamp = run(
        db,
        &["date".into(), "-u".into(), "+%Y%m%d%H%M%S".into()],
        10,
    )
    .await?;
    for (name, owner) in DATABASES {
        let new = format!("{name}_restoring");
        run(
            db,
            &super::postgres_psql(
                "postgres",
                &format!("drop database if exists {new} with (force)"),
            ),
            120,
        )
        .await?;
        run(
            db,
            &super::postgres_psql("postgres", &format!("create database {new} owner {owner}")),
            120,
        )
        .await?;
        let file = tokio::fs::File::open(dir.join(format!("{name}.dump"))).await?;
        let t = Instant::now();
        let argv = [
            "runuser",
            "-u",
            "postgres",
            "--",
            "pg_restore",
            "--no-owner",
            "--role",
            owner,
            "--exit-on-error",
            "--single-transaction",
            "--dbname",
            &new,
        ];
        let mut sink = tokio::io::sink();
        let out = db
            .stream(&argv, file, &mut sink, Duration::from_secs(6 * 3600))
            .await?;
        if !out.ok() {
            let _ = run(
                db,
                &super::postgres_psql("postgres", &format!("drop database if exists {new}")),
                120,
            )
            .await;
            anyhow::bail!(
                "pg_restore of {name} failed (the current database is untouched): {}",
                out.tail()
            );
        }
        if name == "sagews" {
            // Live state of the processes that were running when the backup was taken.
            let clear = "DO $$ BEGIN IF to_regclass('public.open_sessions') IS NOT NULL THEN TRUNCATE open_sessions; END IF; IF to_regclass('public.backends') IS NOT NULL THEN TRUNCATE backends; END IF; TRUNCATE workers; END $$";
            run(db, &super::postgres_psql(&new, clear), 60).await?;
        }
        let aside = format!("{name}_before_restore_{stamp}");
        let swap = format!(
            "select pg_terminate_backend(pid) from pg_stat_activity where datname = '{name}' and pid <> pg_backend_pid()"
        );
        run(db, &super::postgres_psql("postgres", &swap), 60).await?;
        run(
            db,
            &super::postgres_psql(
                "postgres",
                &format!("alter database {name} rename to {aside}"),
            ),
            60,
        )
        .await?;
        run(
            db,
            &super::postgres_psql(
                "postgres",
                &format!("alter database {new} rename to {name}"),
            ),
            60,
        )
        .await?;
        if !keep {
            run(
                db,
                &super::postgres_psql("postgres", &format!("drop database {aside} with (force)")),
                120,
            )
            .await?;
        }
        eprintln!(
            "restore: {name} restored in {:.1} s{}",
            t.elapsed().as_secs_f64(),
            if keep {
                format!(" (what was there is kept as {aside})")
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_damaged_backup_is_refused_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("sagews.dump"), b"one").unwrap();
        std::fs::write(d.path().join("sagews_logs.dump"), b"two").unwrap();
        let sum = |b: &[u8]| crate::plan::sha256(b);
        let sums = format!(
            "{}  sagews.dump\n{}  sagews_logs.dump\n",
            sum(b"one"),
            sum(b"two")
        );
        std::fs::write(d.path().join("SHA256SUMS"), &sums).unwrap();
        let m = Manifest {
            inventory: "x".into(),
            host: "db".into(),
            from_standby: true,
            taken_at: "20261202T000000Z".into(),
            server_version: "15".into(),
            format: "pg_dump custom".into(),
            files: BTreeMap::new(),
            rows: BTreeMap::new(),
        };
        std::fs::write(
            d.path().join("manifest.json"),
            serde_json::to_string(&m).unwrap(),
        )
        .unwrap();
        assert_eq!(verify(d.path()).unwrap().host, "db");
        std::fs::write(d.path().join("sagews_logs.dump"), b"tw0").unwrap();
        let e = verify(d.path()).unwrap_err().to_string();
        assert!(
            e.contains("sagews_logs.dump") && e.contains("damaged"),
            "{e}"
        );
        std::fs::remove_file(d.path().join("manifest.json")).unwrap();
        let e = verify(d.path()).unwrap_err().to_string();
        assert!(e.contains("no manifest.json"), "{e}");
    }
}
