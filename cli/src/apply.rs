//! Apply: run a host's planned changes over its SSH session, in order, stopping at the first
//! failure; then its handlers, once each. A handler is recorded on the host (in
//! /var/lib/sagectl/pending-handlers) before the change that notifies it, so a run that fails
//! after a change still restarts the service next time (Ansible forgets these).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::plan::{Change, HostPlan, Upload};
use crate::roles::{Attrs, HandlerAction};
use crate::ssh::{Output, Session, SshError};

const PENDING: &str = "/var/lib/sagectl/pending-handlers";
const SHORT: Duration = Duration::from_secs(120);
const APT: Duration = Duration::from_secs(1800);

/// What applying did on one host.
#[derive(Clone, Debug, Default)]
pub struct Applied {
    pub ok: usize,
    pub changed: usize,
    /// Handlers run (`restart haproxy`), in order.
    pub handlers: Vec<String>,
    /// The first failure, which stopped the host.
    pub error: Option<String>,
    /// The connection was lost (the host went away mid-run).
    pub unreachable: bool,
}

/// Installs packages without letting their maintainer scripts start services: units start from
/// sagectl's configuration, never from the package defaults (a default nginx on :80, say).
/// A mirror or proxy that stops answering fails a download after 30 s of silence (then retried),
/// and each download step has a hard bound (see the script):
/// apt's default of 120 s, times its retries, once held a lab run for 9 minutes. The downloaded
/// packages are removed once installed and no source-package cache is kept: nobody reads them,
/// and on lab machines (writable layers in memory) they were most of what 50 machines wrote.
const APT_SCRIPT: &str = r#"set -e
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
chmod 755 /usr/sbin/policy-rc.d
trap 'rm -f /usr/sbin/policy-rc.d' EXIT
export DEBIAN_FRONTEND=noninteractive
o="-o Acquire::Retries=3 -o Acquire::http::Timeout=30 -o Acquire::https::Timeout=30 -o Dir::Cache::srcpkgcache="
# Downloads under a hard bound, tried three times: an apt method once sat 11 minutes on a
# connection the lab's proxy had closed (CLOSE_WAIT), whatever its own timeouts said.
try() {
  t=$1; shift; n=1
  while ! timeout -k 10 "$t" "$@"; do
    [ "$n" -ge 3 ] && return 1
    n=$((n + 1)); echo "sagectl: apt stalled or failed; try $n of 3" >&2; sleep 2
  done
}
try 180 apt-get update -q $o
try 900 apt-get install --download-only -y -q --no-install-recommends $o "$@"
# Installing from what was downloaded: not interrupted (dpkg half-way is worse than slow).
apt-get install -y -q --no-install-recommends $o -o Dpkg::Options::=--force-confold "$@"
apt-get clean
"#;

/// Writes stdin to a new file in a private temp directory beside `$1`, with mode `$2` and owner
/// `$3`; prints the new file's path.
const STAGE_SCRIPT: &str = r#"set -e
dir=$(dirname "$1")
mkdir -p "$dir"
tmp=$(mktemp -d "$dir/.sagectl.XXXXXX")
f="$tmp/$(basename "$1")"
cat > "$f"
chown "$3" "$f"
chmod "$2" "$f"
printf '%s' "$f"
"#;

/// Moves the staged file `$2` over `$1`, keeping the old one as `$1.sagectl-prev`.
const INSTALL_SCRIPT: &str = r#"set -e
if [ -e "$1" ]; then cp -p "$1" "$1.sagectl-prev"; fi
mv -f "$2" "$1"
rmdir "$(dirname "$2")"
"#;

/// Sets up a login role (from a SCRAM verifier on stdin's first line) and its database.
const PG_SQL: &str = r#"SELECT format('CREATE ROLE %I LOGIN', :'owner') WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'owner') \gexec
SELECT format('ALTER ROLE %I LOGIN PASSWORD %L', :'owner', :'verifier') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'owner') WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'db') \gexec
SELECT format('ALTER DATABASE %I OWNER TO %I', :'db', :'owner') \gexec
"#;

/// Sets up the replication role (verifier as for [`PG_SQL`]) and the slots: `:'make'` made
/// (reserving WAL now, for the clone that follows), `:'drop'` (comma-separated) dropped when no
/// standby is streaming through them.
const PG_REPLICATION_SQL: &str = r#"SELECT format('CREATE ROLE %I LOGIN REPLICATION', :'role') WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'role') \gexec
SELECT format('ALTER ROLE %I LOGIN REPLICATION PASSWORD %L', :'role', :'verifier') \gexec
SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = ANY (string_to_array(:'drop', ',')) AND NOT active;
SELECT pg_create_physical_replication_slot(:'make', true) WHERE :'make' <> '' AND NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = :'make');
"#;

/// Makes this host a standby of the primary: a base backup over `$3` (conninfo; the password
/// is in the passfile it names) through slot `$4` into a new directory beside `$1`, tried for
/// up to 5 minutes (the primary may be converging in the same run); only once it is complete,
/// `$2` (the service) is stopped, the old data directory moved aside and the copy moved in with
/// `standby.signal`, and the service started.
const PG_STANDBY_SCRIPT: &str = r#"set -euo pipefail
data=$1 service=$2 conninfo=$3 slot=$4
new="$data.cloning"
err=$(mktemp)
trap 'rm -f -- "$err"' EXIT
deadline=$((SECONDS + 300))
while :; do
  rm -rf -- "$new"
  install -d -o postgres -g postgres -m 0700 -- "$new"
  if runuser -u postgres -- pg_basebackup -D "$new" -d "$conninfo" -S "$slot" -X stream -c fast -w 2>"$err"; then
    break
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    rm -rf -- "$new"
    echo "no base backup from the primary within 300 s: $(tail -n 3 "$err")" >&2
    exit 1
  fi
  sleep 3
done
install -o postgres -g postgres -m 0600 /dev/null "$new/standby.signal"
systemctl stop -- "$service"
if [ -e "$data" ]; then
  aside="$data.before-standby-$(date -u +%Y%m%dT%H%M%SZ)"
  mv -- "$data" "$aside"
  echo "the data directory that was here is kept as $aside"
fi
mv -- "$new" "$data"
systemctl start -- "$service"
"#;

/// psql as the postgres superuser over the unix socket, reading its script on stdin.
const PSQL_STDIN: [&str; 11] = [
    "runuser",
    "-u",
    "postgres",
    "--",
    "psql",
    "-X",
    "-q",
    "-v",
    "ON_ERROR_STOP=1",
    "-d",
    "postgres",
];

struct Runner<'a> {
    s: &'a Session,
    lost: std::sync::atomic::AtomicBool,
}

impl Runner<'_> {
    async fn run(&self, argv: &[&str], stdin: &[u8], timeout: Duration) -> Result<Output, String> {
        self.s
            .run(argv, stdin, timeout)
            .await
            .map_err(|e: SshError| {
                if matches!(e, SshError::Channel { .. } | SshError::Timeout { .. }) {
                    self.lost.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                e.to_string()
            })
    }

    /// Runs and requires success, with the command's stderr in the error.
    async fn must(
        &self,
        what: &str,
        argv: &[&str],
        stdin: &[u8],
        timeout: Duration,
    ) -> Result<Output, String> {
        let o = self.run(argv, stdin, timeout).await?;
        if o.ok() {
            Ok(o)
        } else {
            Err(format!(
                "{what} failed (exit {}):\n{}",
                o.status,
                indent(&o.tail())
            ))
        }
    }

    async fn daemon_reload(&self) -> Result<(), String> {
        let argv = ["systemctl", "daemon-reload"];
        self.must("systemctl daemon-reload", &argv, b"", SHORT)
            .await
            .map(drop)
    }

    async fn attrs(&self, path: &str, a: &Attrs) -> Result<(), String> {
        let owner = format!("{}:{}", a.owner, a.group);
        let mode = format!("{:04o}", a.mode);
        self.must("chown", &["chown", &owner, path], b"", SHORT)
            .await?;
        self.must("chmod", &["chmod", &mode, path], b"", SHORT)
            .await?;
        Ok(())
    }

    async fn upload(&self, u: &Upload) -> Result<(), String> {
        let owner = format!("{}:{}", u.attrs.owner, u.attrs.group);
        let mode = format!("{:04o}", u.attrs.mode);
        let staged = self
            .must(
                &format!("staging {}", u.path),
                &["sh", "-c", STAGE_SCRIPT, "sh", &u.path, &mode, &owner],
                &u.content,
                SHORT,
            )
            .await?;
        let tmp = staged.stdout_text();
        if let Some(v) = &u.validate {
            let argv: Vec<String> = v.iter().map(|a| a.replace("{path}", &tmp)).collect();
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let o = self.run(&argv, b"", SHORT).await?;
            if !o.ok() {
                let dir = tmp.rsplit_once('/').map_or(tmp.as_str(), |(d, _)| d);
                let _ = self.run(&["rm", "-rf", dir], b"", SHORT).await;
                return Err(format!(
                    "{} refused the new {} (the live file is unchanged):\n{}",
                    v[0],
                    u.path,
                    indent(&o.tail())
                ));
            }
        }
        self.must(
            &format!("installing {}", u.path),
            &["sh", "-c", INSTALL_SCRIPT, "sh", &u.path, &tmp],
            b"",
            SHORT,
        )
        .await?;
        Ok(())
    }

    async fn change(&self, c: &Change) -> Result<(), String> {
        match c {
            Change::None(_) => Ok(()),
            Change::Install(pkgs) => {
                let mut argv = vec!["sh", "-c", APT_SCRIPT, "sh"];
                argv.extend(pkgs.iter().map(String::as_str));
                self.must("apt-get install", &argv, b"", APT)
                    .await
                    .map(drop)
            }
            Change::User { name, home } => {
                let argv = [
                    "useradd",
                    "--system",
                    "--user-group",
                    "--home-dir",
                    home,
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    name,
                ];
                self.must(&format!("useradd {name}"), &argv, b"", SHORT)
                    .await
                    .map(drop)
            }
            Change::MakeDir { path, attrs } => {
                let mode = format!("{:04o}", attrs.mode);
                let argv = [
                    "install",
                    "-d",
                    "-m",
                    &mode,
                    "-o",
                    &attrs.owner,
                    "-g",
                    &attrs.group,
                    path,
                ];
                self.must(&format!("creating {path}"), &argv, b"", SHORT)
                    .await
                    .map(drop)
            }
            Change::FixAttrs { path, attrs } => self.attrs(path, attrs).await,
            Change::Upload(u) => self.upload(u).await,
            Change::Unit {
                name,
                enable,
                start,
            } => {
                if *enable {
                    self.must(
                        &format!("systemctl enable {name}"),
                        &["systemctl", "enable", "--quiet", name],
                        b"",
                        SHORT,
                    )
                    .await?;
                }
                if *start {
                    self.must(&format!("systemctl start {name}"), &["systemctl", "start", name], b"", SHORT).await.map_err(|e| format!("{e}\n{}", "  hint: `sagectl lab ssh` or ssh to the host, then `journalctl -u NAME`".replace("NAME", name)))?;
                }
                Ok(())
            }
            Change::PgReplication {
                role,
                password,
                make_slot,
                drop_slots,
            } => {
                let salt: [u8; 16] = random_salt();
                let verifier = crate::scram::verifier(password.expose(), &salt);
                let script = format!(
                    "\\set role '{role}'\n\\set verifier '{verifier}'\n\\set make '{}'\n\\set drop '{}'\n{PG_REPLICATION_SQL}",
                    make_slot.as_deref().unwrap_or(""),
                    drop_slots.join(",")
                );
                self.must(
                    &format!("setting up replication role {role}"),
                    &PSQL_STDIN,
                    script.as_bytes(),
                    SHORT,
                )
                .await
                .map(drop)
            }
            Change::PgStandby {
                data_dir,
                service,
                conninfo,
                slot,
            } => self
                .must(
                    &format!("cloning the primary into {data_dir}"),
                    &[
                        "bash",
                        "-c",
                        PG_STANDBY_SCRIPT,
                        "pg-standby",
                        data_dir,
                        service,
                        conninfo,
                        slot,
                    ],
                    b"",
                    Duration::from_secs(3600),
                )
                .await
                .map(drop),
            Change::Postgres {
                database,
                owner,
                password,
            } => {
                let salt: [u8; 16] = random_salt();
                let verifier = crate::scram::verifier(password.expose(), &salt);
                // Values travel on stdin as psql variables; %I and %L quote them in SQL.
                let script = format!(
                    "\\set owner '{owner}'\n\\set db '{database}'\n\\set verifier '{verifier}'\n{PG_SQL}"
                );
                self.must(
                    &format!("setting up {owner} and {database}"),
                    &PSQL_STDIN,
                    script.as_bytes(),
                    SHORT,
                )
                .await
                .map(drop)
            }
        }
    }
}

/// How long a fresh login may take to succeed after a handler: sshd re-executes itself on a
/// reload and refuses connections for a moment meanwhile.
const RELOGIN_TIME: Duration = Duration::from_secs(10);

/// Tries `relogin` until it succeeds or `limit` has passed; the last error otherwise.
async fn relogin_within(relogin: Relogin<'_>, limit: Duration) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match relogin().await {
            Ok(()) => return Ok(()),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// Puts back the files a run replaced (`.sagectl-prev`; removes those that were new), then
/// runs the handler again.
async fn put_back(
    r: &Runner<'_>,
    files: &[String],
    verb: &str,
    service: &str,
) -> Result<(), String> {
    for f in files {
        let prev = format!("{f}.sagectl-prev");
        r.must(
            "putting the previous file back",
            &[
                "sh",
                "-c",
                "if [ -e \"$2\" ]; then mv -f \"$2\" \"$1\"; else rm -f \"$1\"; fi",
                "sh",
                f,
                &prev,
            ],
            b"",
            SHORT,
        )
        .await?;
    }
    r.must(
        &format!("systemctl {verb} {service}"),
        &["systemctl", verb, service],
        b"",
        SHORT,
    )
    .await
    .map(drop)
}

fn random_salt() -> [u8; 16] {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("system randomness");
    b
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Applies `plan` on `session`, calling `progress` with each step's name.
/// Opens a fresh SSH connection to the host and closes it: how a handler with `check_login`
/// proves that the host still takes sagectl's logins.
pub type Relogin<'a> = &'a (
        dyn Fn() -> std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<(), String>> + Send + 'a>,
> + Sync
    );

pub async fn apply(
    session: &Session,
    plan: &HostPlan,
    progress: &(dyn Fn(&str) + Sync),
    relogin: Relogin<'_>,
) -> Applied {
    let r = Runner {
        s: session,
        lost: Default::default(),
    };
    let mut out = apply_with(&r, plan, progress, relogin).await;
    out.unreachable = r.lost.load(std::sync::atomic::Ordering::Relaxed);
    out
}

async fn apply_with(
    r: &Runner<'_>,
    plan: &HostPlan,
    progress: &(dyn Fn(&str) + Sync),
    relogin: Relogin<'_>,
) -> Applied {
    let mut out = Applied::default();
    // Handler key -> files uploaded in this run that notified it (to put back if needed).
    let mut uploaded: BTreeMap<String, Vec<String>> = BTreeMap::new();
    // Handler key -> index of the last change that notified it.
    let mut notified: BTreeMap<String, usize> = BTreeMap::new();
    // Handlers an earlier run recorded but did not reach (it failed after the change) run first:
    // what they load may be what this run's tasks need (new firewall rules letting apt out).
    if !plan.pending.is_empty() {
        if let Err(e) = r.daemon_reload().await {
            out.error = Some(e);
            return out;
        }
        for h in plan
            .handlers
            .iter()
            .filter(|h| plan.pending.contains(&h.key()))
        {
            let verb = systemctl_verb(h.action);
            progress(&format!(
                "handler left by an earlier run: {verb} {}",
                h.service
            ));
            // Only a running service: one that is not running starts with its tasks below.
            let argv = [
                "sh",
                "-c",
                "if systemctl is-active --quiet \"$2\"; then systemctl \"$1\" \"$2\"; fi",
                "sh",
                verb,
                &h.service,
            ];
            if let Err(e) = r
                .must(
                    &format!("systemctl {verb} {}", h.service),
                    &argv,
                    b"",
                    SHORT,
                )
                .await
            {
                out.error = Some(format!(
                    "handler `{}` (left by an earlier run): {e}",
                    h.name
                ));
                return out;
            }
            out.handlers.push(format!("{verb} {}", h.service));
            if h.check_login {
                if let Err(e) = relogin_within(relogin, RELOGIN_TIME).await {
                    out.error = Some(format!(
                        "handler `{}` (left by an earlier run): a fresh login failed after it ({e}): this run's connection is the only way in",
                        h.name
                    ));
                    return out;
                }
            }
        }
        // Done: what this run notifies from here is recorded anew.
        if let Err(e) = clear_pending(r).await {
            out.error = Some(e);
            return out;
        }
    }
    let mut started: BTreeMap<String, usize> = BTreeMap::new();
    let mut daemon_reload = false;
    for (i, item) in plan.items.iter().enumerate() {
        match &item.change {
            Change::None(_) => out.ok += 1,
            c => {
                progress(&format!("{}: {}", item.task, c.describe()));
                let keys: Vec<String> = item
                    .notify
                    .iter()
                    .map(|n| format!("{}:{n}", item.role))
                    .collect();
                if !keys.is_empty() {
                    let mut argv = vec![
                        "sh",
                        "-c",
                        "mkdir -p /var/lib/sagectl && printf '%s\\n' \"$@\" >> /var/lib/sagectl/pending-handlers",
                        "sh",
                    ];
                    argv.extend(keys.iter().map(String::as_str));
                    if let Err(e) = r.must("recording handlers", &argv, b"", SHORT).await {
                        out.error = Some(e);
                        return out;
                    }
                }
                if matches!(c, Change::Unit { .. }) && daemon_reload {
                    if let Err(e) = r.daemon_reload().await {
                        out.error = Some(e);
                        return out;
                    }
                    daemon_reload = false;
                }
                if let Err(e) = r.change(c).await {
                    out.error = Some(format!("{} ({}): {e}", item.task, item.role));
                    return out;
                }
                out.changed += 1;
                for k in keys {
                    if let Change::Upload(u) = c {
                        uploaded.entry(k.clone()).or_default().push(u.path.clone());
                    }
                    notified.insert(k, i + 1);
                }
                match c {
                    Change::Upload(u) if u.path.starts_with("/etc/systemd/system/") => {
                        daemon_reload = true
                    }
                    Change::Unit {
                        name, start: true, ..
                    } => {
                        started.insert(name.clone(), i + 1);
                    }
                    _ => {}
                }
            }
        }
    }
    if notified.is_empty() {
        return out;
    }
    if daemon_reload {
        if let Err(e) = r.daemon_reload().await {
            out.error = Some(e);
            return out;
        }
    }
    // Handlers in the order the roles declare them, each once.
    for h in &plan.handlers {
        let Some(&at) = notified.get(&h.key()) else {
            continue;
        };
        if started.get(&h.service).is_some_and(|&s| s >= at) {
            continue; // started after the change: it already runs the new configuration
        }
        let verb = systemctl_verb(h.action);
        progress(&format!("handler: {} {}", verb, h.service));
        if let Err(e) = r
            .must(
                &format!("systemctl {verb} {}", h.service),
                &["systemctl", verb, &h.service],
                b"",
                SHORT,
            )
            .await
        {
            out.error = Some(format!("handler `{}`: {e}", h.name));
            return out;
        }
        out.handlers.push(format!("{verb} {}", h.service));
        if h.check_login {
            progress(&format!(
                "checking a fresh login after {verb} {}",
                h.service
            ));
            if let Err(e) = relogin_within(relogin, RELOGIN_TIME).await {
                let files = uploaded.get(&h.key()).cloned().unwrap_or_default();
                out.error = Some(match put_back(r, &files, verb, &h.service).await {
                    Ok(()) => format!(
                        "handler `{}`: a fresh login failed after the change ({e}); the previous {} was put back and {} {verb}ed again: fix the variables that changed it",
                        h.name,
                        files.join(", "),
                        h.service
                    ),
                    Err(e2) => format!(
                        "handler `{}`: a fresh login failed after the change ({e}), and putting the previous files back failed too ({e2}): this run's connection is the only way in",
                        h.name
                    ),
                });
                return out;
            }
        }
    }
    if let Err(e) = clear_pending(r).await {
        out.error = Some(e);
    }
    out
}

/// How systemctl carries out a handler's action.
fn systemctl_verb(action: HandlerAction) -> &'static str {
    match action {
        HandlerAction::Restart => "restart",
        HandlerAction::Reload => "reload-or-restart",
    }
}

/// Forgets the handlers recorded on the host (they have run).
async fn clear_pending(r: &Runner<'_>) -> Result<(), String> {
    r.must(
        "clearing pending handlers",
        &["rm", "-f", PENDING],
        b"",
        SHORT,
    )
    .await
    .map(drop)
}
