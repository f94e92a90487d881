//! The rendered configs are accepted by the real tools: `haproxy -c`, `nginx -t`, `nft -c`,
//! `systemd-analyze verify`, and a real PostgreSQL started from the rendered postgresql.conf and
//! pg_hba.conf that takes a TLS connection verified against the deployment's CA. Each tool reads
//! the files at their real paths (private mount namespace) and binds the hosts' real addresses
//! (private network namespace). A broken file is refused by each, so the checks mean something.
//!
//! Needs root and the packages .ci/run installs.

use sagews_testkit::lab;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lab::{fixtures, overlay, render, require, root, run_isolated, scratch_inventory, text};
use sagectl::inventory::{Inventory, Role};

struct Rendered {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    out: PathBuf,
    inv: Inventory,
}

fn rendered(inventory: &Path) -> Rendered {
    let (tmp, inv_path) = scratch_inventory(inventory);
    let out = tmp.path().join("out");
    render(&inv_path, &out);
    let inv = Inventory::load(&inv_path).unwrap();
    Rendered {
        dir: tmp.path().to_path_buf(),
        _tmp: tmp,
        out,
        inv,
    }
}

fn inventories() -> Vec<PathBuf> {
    vec![
        root().join("inventories/lab.yaml"),
        root().join("inventories/example.yaml"),
        fixtures().join("loopback.yaml"),
    ]
}

fn assert_ok(o: &std::process::Output, what: &str) {
    let (out, err) = text(o);
    assert!(o.status.success(), "{what} failed:\n{out}\n{err}");
}

#[test]
fn haproxy_accepts_rendered_config() {
    require("haproxy");
    for path in inventories() {
        let r = rendered(&path);
        for h in r.inv.with_role(Role::Loadbalancer) {
            let host_out = r.out.join(&h.name);
            let etc = overlay("/etc/haproxy", &host_out, &r.dir.join("iso").join(&h.name));
            let o = run_isolated(
                &[(&etc, "/etc/haproxy")],
                &[],
                &["haproxy", "-c", "-f", "/etc/haproxy/haproxy.cfg"],
            );
            assert_ok(
                &o,
                &format!("haproxy -c for {} in {}", h.name, path.display()),
            );
            assert!(text(&o).0.contains("Configuration file is valid"));

            // Control: a missing certificate is refused, so the check reads what we rendered.
            std::fs::remove_file(etc.join("certs/host.pem")).unwrap();
            let o = run_isolated(
                &[(&etc, "/etc/haproxy")],
                &[],
                &["haproxy", "-c", "-f", "/etc/haproxy/haproxy.cfg"],
            );
            assert!(
                !o.status.success(),
                "haproxy accepted a config whose certificate is missing"
            );
        }
    }
}

#[test]
fn nginx_accepts_rendered_config() {
    require("nginx");
    for path in inventories() {
        let r = rendered(&path);
        for h in r.inv.with_role(Role::Static) {
            let host_out = r.out.join(&h.name);
            let etc = overlay("/etc/nginx", &host_out, &r.dir.join("iso").join(&h.name));
            let addr = vec![h.address.to_string()];
            let o = run_isolated(
                &[(&etc, "/etc/nginx")],
                &addr,
                &["nginx", "-t", "-c", "/etc/nginx/nginx.conf"],
            );
            assert_ok(
                &o,
                &format!("nginx -t for {} in {}", h.name, path.display()),
            );
            assert!(text(&o).1.contains("test is successful"));

            // Control: without the host's address nginx cannot listen, so it really binds.
            if h.address.is_loopback() {
                continue; // all of 127.0.0.0/8 is local in any namespace
            }
            let o = run_isolated(
                &[(&etc, "/etc/nginx")],
                &[],
                &["nginx", "-t", "-c", "/etc/nginx/nginx.conf"],
            );
            assert!(!o.status.success());
            assert!(
                text(&o).1.contains("Cannot assign requested address"),
                "{}",
                text(&o).1
            );
        }
    }
}

#[test]
fn memcached_serves_tls_with_client_certificates_only() {
    require("memcached");
    require("openssl");
    let r = rendered(&fixtures().join("loopback.yaml"));
    let cache = r.inv.with_role(Role::Cache).next().unwrap();
    let host_out = r.out.join(&cache.name);
    lab::apply_manifest(&host_out);
    let state = r.dir.join(".sagectl/loopback");
    let backend = r.inv.with_role(Role::Backend).next().unwrap();
    let addr = format!("{}:11211", cache.address);
    // Debian's own wrapper turns memcached.conf into arguments, as memcached.service does.
    let script = format!(
        r#"/usr/share/memcached/scripts/systemd-memcached-wrapper /etc/memcached.conf & pid=$!
for i in $(seq 100); do ss -ltn | grep -q '{addr}' && break; sleep 0.05; done
echo "== with certificate"
printf 'stats\r\nquit\r\n' | timeout 5 openssl s_client -quiet -connect {addr} -CAfile {ca} -cert {crt} -key {key} -verify_return_error 2>&1
echo "== without"
printf 'stats\r\nquit\r\n' | timeout 5 openssl s_client -quiet -connect {addr} -CAfile {ca} 2>&1
echo "== plain"
printf 'stats\r\nquit\r\n' | timeout 5 bash -c 'exec 3<>/dev/tcp/{ip}/11211; cat >&3; timeout 1 cat <&3' 2>&1
kill $pid"#,
        ca = state.join("ca.crt").display(),
        crt = state.join(format!("hosts/{}.crt", backend.name)).display(),
        key = state.join(format!("hosts/{}.key", backend.name)).display(),
        ip = cache.address,
    );
    let o = lab::run_as_host(&host_out, &[cache.address.to_string()], &script);
    let (out, err) = text(&o);
    let with = out
        .split("== with certificate")
        .nth(1)
        .unwrap()
        .split("== without")
        .next()
        .unwrap();
    let without = out
        .split("== without")
        .nth(1)
        .unwrap()
        .split("== plain")
        .next()
        .unwrap();
    let plain = out.split("== plain").nth(1).unwrap();
    assert!(
        with.contains("STAT pid") && with.contains("STAT max_connections 4096"),
        "with a certificate:\n{out}\n{err}"
    );
    assert!(
        !without.contains("STAT pid"),
        "answered a client without a certificate:\n{without}"
    );
    assert!(!plain.contains("STAT pid"), "answered plain text:\n{plain}");
}

#[test]
fn nft_accepts_every_hosts_rules() {
    require("nft");
    for path in inventories() {
        let r = rendered(&path);
        for h in &r.inv.hosts {
            let file = r.out.join(&h.name).join("etc/nftables.conf");
            let f = file.to_str().unwrap();
            let o = run_isolated(&[], &[], &["nft", "-c", "-f", f]);
            assert_ok(&o, &format!("nft -c for {} in {}", h.name, path.display()));
        }
        // Control: a rule naming a port out of range is refused.
        let bad = r.dir.join("bad.nft");
        let text_ok =
            std::fs::read_to_string(r.out.join(&r.inv.hosts[0].name).join("etc/nftables.conf"))
                .unwrap();
        std::fs::write(
            &bad,
            text_ok.replace("tcp dport 22 accept", "tcp dport 70000 accept"),
        )
        .unwrap();
        let o = run_isolated(&[], &[], &["nft", "-c", "-f", bad.to_str().unwrap()]);
        assert!(!o.status.success(), "nft accepted port 70000");
    }
}

#[test]
fn systemd_accepts_agent_units() {
    require("systemd-analyze");
    // systemd-analyze checks that ExecStart's program exists and is executable; the agents'
    // binary is a stand-in here (this test is about the unit files).
    let bin = tempfile::tempdir().unwrap();
    std::fs::copy("/bin/true", bin.path().join("sage-agent")).unwrap();
    for path in inventories() {
        let r = rendered(&path);
        let mut units = 0;
        // The scheduled backups' service and timer, on each database host (`database.backups`).
        let mut backups = 0;
        for h in &r.inv.hosts {
            let dir = r.out.join(&h.name).join("etc/systemd/system");
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            // The backup timer's script, executable as the host gets it (rendered files are
            // 0644 here; the MANIFEST says 0755).
            let lib = tempfile::tempdir().unwrap();
            let script = r
                .out
                .join(&h.name)
                .join("usr/local/lib/sagectl/sagews-backup");
            if script.exists() {
                std::fs::create_dir(lib.path().join("sagectl")).unwrap();
                let to = lib.path().join("sagectl/sagews-backup");
                std::fs::copy(&script, &to).unwrap();
                std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
            for e in entries {
                let unit = e.unwrap().path();
                let o = run_isolated(
                    &[
                        (bin.path(), "/usr/local/bin"),
                        (lib.path(), "/usr/local/lib"),
                    ],
                    &[],
                    &["systemd-analyze", "verify", unit.to_str().unwrap()],
                );
                assert_ok(&o, &format!("systemd-analyze verify {}", unit.display()));
                let (_, err) = text(&o);
                assert!(
                    err.trim().is_empty(),
                    "warnings for {}:\n{err}",
                    unit.display()
                );
                let name = unit.file_name().unwrap().to_string_lossy().to_string();
                if name.starts_with("sagews-backup.") {
                    backups += 1;
                    continue;
                }
                units += 1;

                // Control: a misspelt directive is reported.
                let bad = r.dir.join(unit.file_name().unwrap());
                std::fs::write(
                    &bad,
                    std::fs::read_to_string(&unit)
                        .unwrap()
                        .replace("Restart=", "Restrat="),
                )
                .unwrap();
                let o = run_isolated(
                    &[(bin.path(), "/usr/local/bin")],
                    &[],
                    &["systemd-analyze", "verify", bad.to_str().unwrap()],
                );
                assert!(text(&o).1.contains("Unknown key"), "{}", text(&o).1);
            }
        }
        let want = r.inv.with_role(Role::Worker).count()
            + r.inv.with_role(Role::Backend).count()
            + r.inv.with_role(Role::Logd).count();
        assert_eq!(units, want, "one unit per agent role in {}", path.display());
        let want = if r.inv.database.backups.is_some() {
            2 * r.inv.with_role(Role::Database).count()
        } else {
            0
        };
        assert_eq!(backups, want, "backup units in {}", path.display());
    }
}

/// A PostgreSQL server run from a rendered configuration; stopped when dropped.
struct Postgres {
    child: Child,
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGINT is PostgreSQL's fast shutdown: the postmaster ends its children, then itself.
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// uid and gid of a system user.
fn ids(user: &str) -> (u32, u32) {
    let id = |flag: &str| {
        let o = Command::new("id").arg(flag).arg(user).output().unwrap();
        String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse::<u32>()
            .unwrap()
    };
    (id("-u"), id("-g"))
}

/// psql as the postgres superuser over the unix socket (peer authentication).
fn as_postgres(sock: &str, sql: &str) -> std::process::Output {
    Command::new("runuser")
        .args([
            "-u", "postgres", "--", "psql", "-X", "-A", "-t", "-d", sock, "-c", sql,
        ])
        .output()
        .unwrap()
}

fn free_port(ip: &str) -> u16 {
    TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn psql(conninfo: &str, password: Option<&str>, sql: &str) -> std::process::Output {
    let mut c = Command::new("psql");
    c.args([
        "-X",
        "-A",
        "-t",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        conninfo,
        "-c",
        sql,
    ])
    .env_remove("PGPASSWORD");
    if let Some(p) = password {
        c.env("PGPASSWORD", p); // the environment, never the command line
    }
    c.output().unwrap()
}

#[test]
fn postgres_runs_rendered_config_with_verified_tls() {
    require("psql");
    let r = rendered(&fixtures().join("loopback.yaml"));
    let db = r.inv.with_role(Role::Database).next().unwrap();
    let ip = db.address.to_string();
    let conf_src = r.out.join(&db.name).join("etc/postgresql/15/main");

    // A data directory and the rendered files, owned by postgres as on a real host.
    let pgdir = tempfile::Builder::new()
        .prefix("sagectl-pg")
        .tempdir()
        .unwrap();
    let (data, conf) = (pgdir.path().join("data"), pgdir.path().join("conf"));
    lab::copy_tree(&conf_src, &conf);
    std::fs::write(conf.join("pg_ident.conf"), "").unwrap();
    let chown = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(pgdir.path())
        .status()
        .unwrap();
    assert!(chown.success());
    let o = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(sagews_testkit::pg::bin("initdb"))
        .args(["-A", "peer", "-D"])
        .arg(&data)
        .output()
        .unwrap();
    assert_ok(&o, "initdb");

    // The rendered postgresql.conf as is, but for paths of this temp dir and a free port.
    let port = free_port(&ip);
    let p = |f: &str| conf.join(f).display().to_string();
    let c = |k: &str, v: &str| format!("--{k}={v}");
    // Started directly as postgres (not through runuser, which would stand between the test
    // and the postmaster and leave it running when killed).
    let (uid, gid) = ids("postgres");
    let child = Command::new(sagews_testkit::pg::bin("postgres"))
        .uid(uid)
        .gid(gid)
        .arg(c("config_file", &p("postgresql.conf")))
        .arg(c("data_directory", &data.display().to_string()))
        .arg(c("hba_file", &p("pg_hba.conf")))
        .arg(c("ident_file", &p("pg_ident.conf")))
        .arg(c("ssl_cert_file", &p("server.crt")))
        .arg(c("ssl_key_file", &p("server.key")))
        .arg(c("ssl_ca_file", &p("ca.crt")))
        .arg(c("external_pid_file", ""))
        .arg(c(
            "unix_socket_directories",
            &pgdir.path().display().to_string(),
        ))
        .arg(c("port", &port.to_string()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pg = Postgres { child };
    let sock = format!(
        "host={} port={port} user=postgres dbname=postgres",
        pgdir.path().display()
    );
    let start = Instant::now();
    loop {
        let o = Command::new("runuser")
            .args([
                "-u", "postgres", "--", "psql", "-X", "-d", &sock, "-c", "select 1",
            ])
            .output()
            .unwrap();
        if o.status.success() {
            break;
        }
        if let Ok(Some(status)) = pg.child.try_wait() {
            let mut err = String::new();
            std::io::Read::read_to_string(pg.child.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("postgres exited ({status}) with the rendered config:\n{err}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "postgres did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The settings really come from the rendered file.
    let o = as_postgres(
        &sock,
        "show listen_addresses; show ssl; show password_encryption; show shared_buffers",
    );
    assert_ok(&o, "show settings");
    assert_eq!(
        text(&o).0.split_whitespace().collect::<Vec<_>>(),
        [ip.as_str(), "on", "scram-sha-256", "256MB"]
    );

    // The backend's role and database, with the generated password (sent on stdin).
    let secrets: BTreeMap<String, String> = serde_json::from_str(
        &std::fs::read_to_string(r.dir.join(".sagectl/loopback/secrets.json")).unwrap(),
    )
    .unwrap();
    let pw = &secrets["postgres_backend_password"];
    let mut setup = Command::new("runuser")
        .args([
            "-u",
            "postgres",
            "--",
            "psql",
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            &sock,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        setup.stdin.as_mut().unwrap(),
        // The password is set from a SCRAM verifier made by sagectl: the server never sees it.
        format!("\\set pw '{}'\nCREATE ROLE sagews_backend LOGIN PASSWORD :'pw';\nCREATE DATABASE sagews OWNER sagews_backend;\n", sagectl::scram::verifier(pw, b"fixed-test-salt!")).as_bytes(),
    )
    .unwrap();
    assert!(setup.wait().unwrap().success());
    let o = as_postgres(
        &sock,
        "select rolpassword from pg_authid where rolname = 'sagews_backend'",
    );
    assert!(
        sagectl::scram::matches(text(&o).0.trim(), pw),
        "the stored verifier checks against the password"
    );

    // From the backend's address (127.0.0.1), TLS verified against the deployment's CA.
    let ca = r.dir.join(".sagectl/loopback/ca.crt").display().to_string();
    let conn = |mode: &str, ca: &str| {
        format!(
            "host={ip} port={port} dbname=sagews user=sagews_backend sslmode={mode} sslrootcert={ca}"
        )
    };
    let o = psql(
        &conn("verify-full", &ca),
        Some(pw),
        "select ssl, version from pg_stat_ssl where pid = pg_backend_pid()",
    );
    assert_ok(&o, "verify-full connection");
    let out = text(&o).0;
    assert!(out.starts_with("t|TLSv1."), "{out}");

    // Refused: no TLS, a wrong password, a CA that is not the deployment's.
    let o = psql(&conn("disable", &ca), Some(pw), "select 1");
    assert!(
        !o.status.success() && text(&o).1.contains("rejects connection"),
        "{}",
        text(&o).1
    );
    let o = psql(&conn("verify-full", &ca), Some("wrong"), "select 1");
    assert!(
        !o.status.success() && text(&o).1.contains("password authentication failed"),
        "{}",
        text(&o).1
    );
    let other = tempfile::tempdir().unwrap();
    let other_state = sagews_testkit::pki::State::open_at(other.path(), "other").unwrap();
    let other_ca = other.path().join("ca.crt");
    assert!(other_state.ca_cert_pem().contains("BEGIN CERTIFICATE"));
    let o = psql(
        &conn("verify-full", other_ca.to_str().unwrap()),
        Some(pw),
        "select 1",
    );
    assert!(
        !o.status.success() && text(&o).1.contains("certificate verify failed"),
        "{}",
        text(&o).1
    );
    // logd's role may not use the backend's database.
    let o = psql(
        &format!(
            "host={ip} port={port} dbname=sagews user=sagews_logd sslmode=verify-full sslrootcert={ca}"
        ),
        Some(pw),
        "select 1",
    );
    assert!(
        !o.status.success() && text(&o).1.contains("rejects connection"),
        "{}",
        text(&o).1
    );
    drop(pg);
}

#[test]
fn sshd_accepts_every_hosts_settings_and_they_harden_it() {
    require("/usr/sbin/sshd");
    std::fs::create_dir_all("/run/sshd").unwrap();
    for path in inventories() {
        let r = rendered(&path);
        for h in &r.inv.hosts {
            let conf = r
                .out
                .join(&h.name)
                .join("etc/ssh/sshd_config.d/50-sagectl.conf");
            let o = Command::new("/usr/sbin/sshd")
                .args(["-t", "-f"])
                .arg(&conf)
                .output()
                .unwrap();
            assert_ok(&o, &format!("sshd -t for {}", h.name));
            // What sshd makes of it (-T prints the effective settings).
            let o = Command::new("/usr/sbin/sshd")
                .args(["-T", "-f"])
                .arg(&conf)
                .output()
                .unwrap();
            assert_ok(&o, "sshd -T");
            let eff = text(&o).0;
            for want in [
                "permitrootlogin without-password",
                "passwordauthentication no",
                "kbdinteractiveauthentication no",
                "x11forwarding no",
                "allowtcpforwarding no",
                "allowagentforwarding no",
                "permittunnel no",
            ] {
                assert!(
                    eff.lines().any(|l| l == want),
                    "{}: {want} in\n{eff}",
                    h.name
                );
            }
            let kex = eff
                .lines()
                .find(|l| l.starts_with("kexalgorithms "))
                .unwrap();
            assert!(!kex.contains("sha1") && !kex.contains("group14"), "{kex}");
        }
    }
    // Control: sshd refuses a broken file, so the check above means something.
    let bad = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(bad.path(), "PermitRootLogin maybe\n").unwrap();
    let o = Command::new("/usr/sbin/sshd")
        .args(["-t", "-f"])
        .arg(bad.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
}
