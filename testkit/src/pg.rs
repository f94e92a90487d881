//! A PostgreSQL server for tests: a fresh cluster in a temp directory, TLS with a certificate
//! from the test CA, password logins over TLS only, run as the postgres user; stopped (fast
//! shutdown) when dropped. Can be stopped and started again on the same port.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Pg {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
    /// fsync on (benchmarks of durable commits) or off (tests, for speed).
    fsync: bool,
}

/// A PostgreSQL program (`initdb`, `postgres`, `pg_ctl`, ...) of the newest installed version.
pub fn bin(name: &str) -> PathBuf {
    let dir = std::fs::read_dir("/usr/lib/postgresql")
        .expect("postgresql installed")
        .map(|e| e.unwrap().path())
        .max()
        .unwrap();
    dir.join("bin").join(name)
}

fn postgres_ids() -> (u32, u32) {
    let u = nix::unistd::User::from_name("postgres")
        .unwrap()
        .expect("a postgres user");
    (u.uid.as_raw(), u.gid.as_raw())
}

impl Pg {
    /// A cluster whose certificate (host "db", database role, 127.0.0.1) comes from `state`'s
    /// CA, started off the async threads.
    pub async fn for_ca(state: &crate::pki::State, fsync: bool) -> Pg {
        let dbc = state
            .issue(
                "t-db",
                "db",
                vec!["db".into(), crate::pki::role_name("database")],
                vec!["127.0.0.1".parse().unwrap()],
            )
            .unwrap();
        let key = dbc.key_pem.expose().to_string();
        tokio::task::spawn_blocking(move || Pg::start_with(&dbc.chain_pem, &key, fsync))
            .await
            .unwrap()
    }

    /// A cluster on 127.0.0.1 whose server certificate is `cert`/`key` (PEM); fsync on for
    /// benchmarks of durable commits, off for tests.
    pub fn start_with(cert: &str, key: &str, fsync: bool) -> Pg {
        let dir = tempfile::Builder::new()
            .prefix("sagews-pg")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let data = dir.path().join("data");
        let (uid, gid) = postgres_ids();
        // The server writes its socket here.
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        std::fs::create_dir(&data).unwrap();
        std::os::unix::fs::chown(&data, Some(uid), Some(gid)).unwrap();
        let o = Command::new(bin("initdb"))
            .args(["-A", "peer", "-D"])
            .arg(&data)
            .uid(uid)
            .gid(gid)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        for (name, content, mode) in [("server.crt", cert, 0o644), ("server.key", key, 0o600)] {
            let p = data.join(name);
            std::fs::write(&p, content).unwrap();
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(mode))
                .unwrap();
            std::os::unix::fs::chown(&p, Some(uid), Some(gid)).unwrap();
        }
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all postgres peer\nhostssl all all 127.0.0.0/8 scram-sha-256\n",
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut pg = Pg {
            dir,
            port,
            child: None,
            fsync,
        };
        pg.run();
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts the server (again) and waits until it answers.
    pub fn run(&mut self) {
        let (uid, gid) = postgres_ids();
        let data = self.data();
        let child = Command::new(bin("postgres"))
            .arg("-D")
            .arg(&data)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "ssl=on",
                "-c",
                "password_encryption=scram-sha-256",
            ])
            .arg("-c")
            .arg(format!("fsync={}", if self.fsync { "on" } else { "off" }))
            .arg("-c")
            .arg(format!("port={}", self.port))
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.path().display()
            ))
            .uid(uid)
            .gid(gid)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.psql("select 1").status.success() {
            assert!(Instant::now() < deadline, "postgres did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Fast shutdown; waits until the server is gone.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-INT", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    /// psql as the superuser over the unix socket; `stdin` feeds a script.
    pub fn psql_script(&self, script: &str) -> std::process::Output {
        let (uid, gid) = postgres_ids();
        let mut c = Command::new("psql")
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(self.dir.path())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .uid(uid)
            .gid(gid)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(c.stdin.as_mut().unwrap(), script.as_bytes()).unwrap();
        drop(c.stdin.take());
        c.wait_with_output().unwrap()
    }

    pub fn psql(&self, sql: &str) -> std::process::Output {
        self.psql_script(&format!("{sql};\n"))
    }

    /// A login role with `password` owning a new database of the same name.
    /// A database `name` owned by a login role of the same name with `password`.
    pub fn create_db(&self, name: &str, password: &str) {
        self.create_db_owned(name, name, password);
    }

    /// A database `name` owned by a login role `user` with `password`.
    pub fn create_db_owned(&self, name: &str, user: &str, password: &str) {
        let o = self.psql_script(&format!("\\set pw '{password}'\nCREATE ROLE {user} LOGIN PASSWORD :'pw';\nCREATE DATABASE {name} OWNER {user};\n"));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }

    pub fn query(&self, db: &str, sql: &str) -> String {
        let o = self.psql_script(&format!("\\c {db}\n{sql};\n"));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        self.stop();
    }
}
