//! Facts: what a host has now, gathered in one round trip. A constant shell script reads what
//! to look at from stdin (one `KIND argument` per line, so no path is ever pasted into a shell
//! line) and prints tab-separated lines that a pure parser turns into [`Facts`].

use std::collections::{BTreeMap, BTreeSet};

/// The fact-gathering script. It only reads.
pub const SCRIPT: &str = r#"
cd /
tab=$(printf '\t')
t=$(mktemp -d)
trap 'rm -rf "$t"' EXIT
: > "$t/files"
: > "$t/dirs"
. /etc/os-release 2>/dev/null
printf 'os\t%s\t%s\n' "${ID:-unknown}" "${VERSION_ID:-unknown}"
printf 'mem\t%s\n' "$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
printf 'cpus\t%s\n' "$(nproc)"
pg=no
pkgs=
units=
while IFS=' ' read -r kind arg; do
  case "$kind" in
    P) pkgs="$pkgs $arg" ;;
    F) printf '%s\n' "$arg" >> "$t/files" ;;
    D) printf '%s\n' "$arg" >> "$t/dirs" ;;
    U) units="$units $arg" ;;
    N) printf 'user\t%s\t%s\n' "$arg" "$(getent passwd "$arg" | cut -d: -f3)" ;;
    Q) pg=yes ;;
  esac
done
# Directories: one stat for all.
if [ -s "$t/dirs" ]; then
  xargs -d '\n' stat -L --printf '%F\t%n\t%a\t%U\t%G\n' -- < "$t/dirs" 2>/dev/null |
    awk -F'\t' '$1 == "directory" { printf "dir\t%s\t%s\t%s\t%s\n", $2, $3, $4, $5 }' > "$t/dout"
  awk -F'\t' 'FILENAME == ARGV[1] { seen[$2] = 1; print; next }
    !($0 in seen) { printf "dir\t%s\t-\n", $0 }' "$t/dout" "$t/dirs"
fi
# Files: one stat for all; a checksum only for those whose size, times and inode differ from
# the last run's (a cache of them, as git's index keeps; files modified in the last 2 s are not
# cached, being racy). A no-op run then hashes nothing, not even the agent binary.
if [ -s "$t/files" ]; then
  state=${SAGECTL_FACTS_STATE:-/var/lib/sagectl}
  cache=$state/facts-cache
  [ -f "$cache" ] || cache=/dev/null
  xargs -d '\n' stat -L --printf '%F\t%n\t%s %.9Y %.9Z %i\t%a\t%U\t%G\n' -- < "$t/files" 2>/dev/null |
    awk -F'\t' '$1 ~ /^regular/' > "$t/fstat"
  awk -F'\t' -v known="$t/known" -v todo="$t/todo" '
    FILENAME == ARGV[1] { sum[$1 "\t" $2] = $3; next }
    { k = $2 "\t" $3
      if (k in sum) print $2 "\t" sum[k] "\t" $3 "\t" $4 "\t" $5 "\t" $6 > known
      else print $2 "\t" $3 "\t" $4 "\t" $5 "\t" $6 > todo }' "$cache" "$t/fstat"
  : >> "$t/known"
  : >> "$t/todo"
  cut -f1 "$t/todo" | xargs -r -d '\n' sha256sum -- > "$t/sums" 2>/dev/null
  awk -F'\t' 'FILENAME == ARGV[1] { sha[substr($0, 67)] = substr($0, 1, 64); next }
    $1 in sha { print $1 "\t" sha[$1] "\t" $2 "\t" $3 "\t" $4 "\t" $5 }' "$t/sums" "$t/todo" >> "$t/known"
  new=/dev/null
  [ -d "$state" ] && new=$state/.facts-cache.$$
  awk -F'\t' -v now="$(date +%s)" -v cache="$new" -v list="$t/files" '
    { printf "file\t%s\t%s\t%s\t%s\t%s\n", $1, $2, $4, $5, $6; seen[$1] = 1
      split($3, k, " "); if (k[2] + 1 < now && k[3] + 1 < now) print $1 "\t" $3 "\t" $2 > cache }
    END { while ((getline f < list) > 0) if (!(f in seen)) printf "file\t%s\t-\n", f }' "$t/known"
  [ "$new" = /dev/null ] || mv -f "$new" "$state/facts-cache"
fi
# One dpkg-query and one systemctl for all packages and units (names never hold spaces).
if [ -n "$pkgs" ]; then
  dpkg-query -W -f='pkg\t${Package}\t${db:Status-Abbrev}\t${Version}\n' $pkgs 2>/dev/null
fi
if [ -n "$units" ]; then
  systemctl show -p UnitFileState -p ActiveState -- $units 2>/dev/null | awk -v names="$units" '
    BEGIN { n = split(names, a, " "); i = 1 }
    /^$/ { if (seen) { printf "unit\t%s\t%s\t%s\n", a[i], ufs, act; i++; ufs = ""; act = ""; seen = 0 }; next }
    /^UnitFileState=/ { ufs = substr($0, 15); seen = 1 }
    /^ActiveState=/ { act = substr($0, 13); seen = 1 }
    END { if (seen) printf "unit\t%s\t%s\t%s\n", a[i], ufs, act }'
fi
if [ -f /var/lib/sagectl/pending-handlers ]; then
  while IFS= read -r h; do printf 'pending\t%s\n' "$h"; done < /var/lib/sagectl/pending-handlers
fi
if [ "$pg" = yes ] && command -v psql >/dev/null 2>&1; then
  runuser -u postgres -- psql -XAtq -F "$tab" \
    -c "select 'pgrole', rolname, coalesce(rolpassword, '') from pg_authid where rolcanlogin" \
    -c "select 'pgdb', datname, pg_get_userbyid(datdba) from pg_database" \
    -c "select 'pgrepl', rolname from pg_roles where rolreplication and rolcanlogin and not rolsuper" \
    -c "select 'pgslot', slot_name, coalesce(wal_status, '-') from pg_replication_slots" 2>/dev/null
fi
exit 0
"#;

/// What to look at on a host.
#[derive(Clone, Debug, Default)]
pub struct Query {
    pub packages: BTreeSet<String>,
    pub files: BTreeSet<String>,
    pub dirs: BTreeSet<String>,
    pub units: BTreeSet<String>,
    pub users: BTreeSet<String>,
    pub postgres: bool,
}

impl Query {
    /// The script's stdin.
    pub fn stdin(&self) -> String {
        let mut s = String::new();
        let mut add = |k: &str, items: &BTreeSet<String>| {
            for i in items {
                s.push_str(&format!("{k} {i}\n"));
            }
        };
        add("P", &self.packages);
        add("F", &self.files);
        add("D", &self.dirs);
        add("U", &self.units);
        add("N", &self.users);
        if self.postgres {
            s.push_str("Q -\n");
        }
        s
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileFact {
    pub sha256: String,
    pub mode: u32,
    pub owner: String,
    pub group: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirFact {
    pub mode: u32,
    pub owner: String,
    pub group: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct UnitFact {
    /// `enabled`, `disabled`, `static`, ... or empty when systemd does not know the unit.
    pub enabled: String,
    /// `active`, `inactive`, `failed`, ...
    pub active: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    pub os: (String, String),
    pub mem_kb: u64,
    pub cpus: u32,
    /// Installed packages and their versions.
    pub packages: BTreeMap<String, String>,
    /// Files: `None` when missing.
    pub files: BTreeMap<String, Option<FileFact>>,
    pub dirs: BTreeMap<String, Option<DirFact>>,
    pub units: BTreeMap<String, UnitFact>,
    pub users: BTreeMap<String, Option<u32>>,
    /// Handlers that an earlier run notified but could not run.
    pub pending: Vec<String>,
    /// PostgreSQL login roles and their password verifiers, when PostgreSQL runs.
    pub pg_roles: Option<BTreeMap<String, String>>,
    /// Databases and their owners.
    pub pg_databases: BTreeMap<String, String>,
    /// Login roles that may stream WAL (superusers aside).
    pub pg_replication_roles: BTreeSet<String>,
    /// Replication slots and their `wal_status` (`lost`: the WAL it needed is gone).
    pub pg_slots: BTreeMap<String, String>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("facts line {line}: {why}: {text:?}")]
pub struct ParseError {
    pub line: usize,
    pub why: &'static str,
    pub text: String,
}

fn attrs(fields: &[&str]) -> Option<(u32, String, String)> {
    match fields {
        [mode, owner, group] => Some((
            u32::from_str_radix(mode, 8).ok()?,
            owner.to_string(),
            group.to_string(),
        )),
        _ => None,
    }
}

/// Parses the script's output.
pub fn parse(out: &str) -> Result<Facts, ParseError> {
    let mut f = Facts::default();
    for (i, line) in out.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        let w: Vec<&str> = line.split('\t').collect();
        let err = |why| ParseError {
            line: i + 1,
            why,
            text: line.to_string(),
        };
        match w[..] {
            ["os", id, ver] => f.os = (id.into(), ver.into()),
            ["mem", kb] => f.mem_kb = kb.parse().map_err(|_| err("bad memory size"))?,
            ["cpus", n] => f.cpus = n.parse().map_err(|_| err("bad cpu count"))?,
            ["pkg", name, status, version] => {
                // "ii" = installed and configured; anything else counts as missing.
                if status.trim() == "ii" {
                    f.packages.insert(name.into(), version.into());
                }
            }
            ["file", path, "-"] => {
                f.files.insert(path.into(), None);
            }
            ["file", path, sha, ref rest @ ..] => {
                let (mode, owner, group) = attrs(rest).ok_or_else(|| err("bad file attributes"))?;
                f.files.insert(
                    path.into(),
                    Some(FileFact {
                        sha256: sha.into(),
                        mode,
                        owner,
                        group,
                    }),
                );
            }
            ["dir", path, "-"] => {
                f.dirs.insert(path.into(), None);
            }
            ["dir", path, ref rest @ ..] => {
                let (mode, owner, group) =
                    attrs(rest).ok_or_else(|| err("bad directory attributes"))?;
                f.dirs
                    .insert(path.into(), Some(DirFact { mode, owner, group }));
            }
            ["unit", name, enabled, active] => {
                f.units.insert(
                    name.into(),
                    UnitFact {
                        enabled: enabled.into(),
                        active: active.into(),
                    },
                );
            }
            ["user", name, uid] => {
                f.users.insert(name.into(), uid.parse().ok());
            }
            ["pending", h] => f.pending.push(h.into()),
            ["pgrole", name, verifier] => {
                f.pg_roles
                    .get_or_insert_with(BTreeMap::new)
                    .insert(name.into(), verifier.into());
            }
            ["pgrepl", name] => {
                f.pg_replication_roles.insert(name.into());
            }
            ["pgslot", name, status] => {
                f.pg_slots.insert(name.into(), status.into());
            }
            ["pgdb", name, owner] => {
                f.pg_roles.get_or_insert_with(BTreeMap::new);
                f.pg_databases.insert(name.into(), owner.into());
            }
            _ => return Err(err("unknown line")),
        }
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_fresh_host() {
        let out = "os\tdebian\t12\nmem\t24684436\ncpus\t2\npkg\tnftables\tii \t1.0.6-2+deb12u2\npkg\thaproxy\tun \t\nfile\t/etc/haproxy/haproxy.cfg\t-\ndir\t/etc/haproxy/certs\t-\nunit\thaproxy\t\t\nuser\tpostgres\t\n";
        let f = parse(out).unwrap();
        assert_eq!(f.os, ("debian".into(), "12".into()));
        assert_eq!((f.mem_kb, f.cpus), (24684436, 2));
        assert_eq!(f.packages.keys().collect::<Vec<_>>(), ["nftables"]);
        assert_eq!(f.files["/etc/haproxy/haproxy.cfg"], None);
        assert_eq!(f.dirs["/etc/haproxy/certs"], None);
        assert_eq!(f.units["haproxy"], UnitFact::default());
        assert_eq!(f.users["postgres"], None);
        assert_eq!(f.pg_roles, None);
    }

    #[test]
    fn parses_a_converged_host() {
        let out = "file\t/etc/x.conf\tab12\t640\troot\tpostgres\ndir\t/etc/haproxy/certs\t700\troot\troot\nunit\thaproxy\tenabled\tactive\npending\tloadbalancer:reload haproxy\npgrole\tsagews_backend\tSCRAM-SHA-256$4096:c2FsdA==$a:b\npgdb\tsagews\tsagews_backend\n";
        let f = parse(out).unwrap();
        assert_eq!(
            f.files["/etc/x.conf"],
            Some(FileFact {
                sha256: "ab12".into(),
                mode: 0o640,
                owner: "root".into(),
                group: "postgres".into()
            })
        );
        assert_eq!(f.dirs["/etc/haproxy/certs"].as_ref().unwrap().mode, 0o700);
        assert_eq!(f.units["haproxy"].active, "active");
        assert_eq!(f.pending, ["loadbalancer:reload haproxy"]);
        assert!(f.pg_roles.unwrap()["sagews_backend"].starts_with("SCRAM-SHA-256$4096"));
        assert_eq!(f.pg_databases["sagews"], "sagews_backend");
    }

    #[test]
    fn refuses_garbage() {
        let e = parse("os\tdebian\t12\nwhat is this\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(parse("file\t/x\tsha\t9z9\troot\troot\n").is_err());
    }

    /// The facts script on this machine with `q` on stdin and `env`, parsed.
    fn run_script(q: &Query, env: &[(&str, &std::path::Path)]) -> Facts {
        let mut child = std::process::Command::new("sh")
            .args(["-c", SCRIPT])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(q.stdin().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        parse(&String::from_utf8(out.stdout).unwrap()).unwrap()
    }

    #[test]
    fn checksums_are_cached_by_stat_and_made_again_when_it_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let file = tmp.path().join("managed file.conf");
        std::fs::write(&file, "one").unwrap();
        let q = Query {
            files: [file.display().to_string()].into(),
            dirs: ["/no/such dir".into()].into(),
            ..Default::default()
        };
        let env = [("SAGECTL_FACTS_STATE", state.as_path())];
        // No directory there at all (a fresh host): each is reported missing.
        assert_eq!(run_script(&q, &env).dirs["/no/such dir"], None);
        let key = file.display().to_string();
        let sha = |f: &Facts| f.files[&key].as_ref().map(|x| x.sha256.clone());
        let sum = |text: &str| {
            let d = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
            d.as_ref()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        // Modified just now: hashed, and not cached (racy).
        assert_eq!(sha(&run_script(&q, &env)), Some(sum("one")));
        assert!(!state.join("facts-cache").exists());
        // Older than 2 s: hashed once more, and cached.
        std::thread::sleep(std::time::Duration::from_millis(2100));
        assert_eq!(sha(&run_script(&q, &env)), Some(sum("one")));
        let cache = std::fs::read_to_string(state.join("facts-cache")).unwrap();
        assert!(cache.contains(&sum("one")), "{cache}");
        // The cache is what answers while the file's stat is unchanged (a planted checksum
        // shows through)...
        std::fs::write(
            state.join("facts-cache"),
            cache.replace(&sum("one"), &"f".repeat(64)),
        )
        .unwrap();
        assert_eq!(sha(&run_script(&q, &env)), Some("f".repeat(64)));
        // ...and a change of content (same size) is seen: stat differs, the file is hashed.
        std::fs::write(&file, "two").unwrap();
        assert_eq!(sha(&run_script(&q, &env)), Some(sum("two")));
        std::fs::remove_file(&file).unwrap();
        assert_eq!(sha(&run_script(&q, &env)), None);
    }

    #[test]
    fn script_runs_here_and_its_output_parses() {
        // The real script on this machine: reads stdin, prints lines the parser takes.
        let q = Query {
            packages: [
                "bash".into(),
                "no-such-package-xyz".into(),
                "coreutils".into(),
            ]
            .into(),
            files: ["/etc/hostname".into(), "/no/such file".into()].into(),
            dirs: ["/etc".into()].into(),
            users: ["root".into()].into(),
            ..Default::default()
        };
        let tmp = tempfile::tempdir().unwrap();
        let f = run_script(&q, &[("SAGECTL_FACTS_STATE", tmp.path())]);
        assert!(f.packages.contains_key("bash") && f.packages.contains_key("coreutils"));
        assert!(!f.packages.contains_key("no-such-package-xyz"));
        assert!(f.files["/etc/hostname"].is_some());
        assert_eq!(f.files["/no/such file"], None);
        assert_eq!(f.dirs["/etc"].as_ref().unwrap().owner, "root");
        assert_eq!(f.users["root"], Some(0));
        assert!(f.cpus >= 1);
    }
}
