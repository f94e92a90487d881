//! logd figures (as root: `cargo bench -p sage-agent --bench logd`): sustained records per second
//! into a real PostgreSQL on this box, acknowledged after commit, from one client connection.
//! Prints; asserts nothing.

use sagews_testkit::pg;
use sagews_testkit::worker as harness;

use std::time::{Duration, Instant};

use sage_agent::frame;
use sage_agent::proto::{Level, LogRecord, LogReply, LogRequest};
use sage_agent::tls::Identity;
use sagews_testkit::pki::State;

fn main() {
    let n: usize = std::env::var("BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500_000);
    let batch: usize = 5_000;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        harness::require_root();
        let tmp = tempfile::tempdir().unwrap();
        let state = State::open_at(&tmp.path().join("pki"), "lbench").unwrap();
        let pg = pg::Pg::for_ca(&state, true).await;
        pg.create_db("sagews_logs", "benchpw1");
        let (ca, crt, key) = harness::creds(&state, &tmp.path().join("logd"), "logs1", &["logd"]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = serde_json::json!({
            "inventory": "lbench", "host": "logs1", "listen": addr.to_string(), "http_listen": "127.0.0.1:0",
            "tls": {"ca": ca, "cert": crt, "key": key},
            "database": {"host": "127.0.0.1", "server_name": "db", "port": pg.port, "name": "sagews_logs", "user": "sagews_logs", "password": "benchpw1"},
            "allow": ["127.0.0.1"], "batch_size": 20000, "retention_days": 30, "alerts": [], "replica": null
        });
        let path = tmp.path().join("logd.json");
        std::fs::write(&path, config.to_string()).unwrap();
        tokio::spawn(sage_agent::logd::run(sage_agent::logd::Config::load(&path).unwrap(), listener, std::future::pending()));
        let (ca, crt, key) = harness::creds(&state, &tmp.path().join("clients"), "backend1", &["backend"]);
        let id = Identity::load(&ca, &crt, &key).unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let sn = rustls::pki_types::ServerName::try_from("logs1").unwrap();
        let s = tokio_rustls::TlsConnector::from(id.client_config(&["logd"]).unwrap()).connect(sn, tcp).await.unwrap();
        let (mut rd, mut wr) = tokio::io::split(s);
        let batches = n / batch;
        let cpu0 = own_cpu();
        let started = Instant::now();
        let reader = tokio::spawn(async move {
            for _ in 0..batches {
                let r: LogReply = frame::read(&mut rd, 1 << 20, Duration::from_secs(60)).await.unwrap();
                assert!(matches!(r, LogReply::Ack { .. }), "{r:?}");
            }
        });
        for b in 0..batches {
            let records = (0..batch)
                .map(|i| {
                    let k = b * batch + i;
                    LogRecord { id: format!("bench-{k}"), ts_ms: 1_795_800_000_000 + k as i64, host: "backend1".into(), level: Level::Info, target: "backend::bench".into(), message: format!("workspace ws-{} saved", k % 977), fields: serde_json::Map::new() }
                })
                .collect();
            frame::write(&mut wr, &LogRequest::Records { batch: b as u64, records }).await.unwrap();
        }
        reader.await.unwrap();
        let secs = started.elapsed().as_secs_f64();
        let cpu = own_cpu() - cpu0;
        let stored = pg.query("sagews_logs", "select count(*) from records");
        println!("{n} records in batches of {batch}, acknowledged after commit: {secs:.2} s, {:.0} records/s (stored: {stored})", n as f64 / secs);
        // Where the time went: this process (the client and logd) and PostgreSQL's processes
        // (the writer's backend, the WAL writer...), CPU seconds, on a box of `nproc` cores.
        let pids = pg.query("sagews_logs", "select string_agg(pid::text, ' ') from pg_stat_activity");
        let pg_cpu: Vec<f64> = pids.split_whitespace().filter_map(|p| proc_cpu(p.parse().ok()?)).collect();
        let busiest = pg_cpu.iter().copied().fold(0.0, f64::max);
        println!(
            "CPU: client and logd {cpu:.2} s, PostgreSQL {:.2} s since its start (its busiest process, the writer's backend: {busiest:.2} s)",
            pg_cpu.iter().sum::<f64>()
        );
    });
}

/// CPU seconds (user and system) of this process so far.
fn own_cpu() -> f64 {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).unwrap();
    let s = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    s(u.user_time()) + s(u.system_time())
}

/// CPU seconds of process `pid` so far (from /proc, in clock ticks of 1/100 s).
fn proc_cpu(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    Some((f[11].parse::<f64>().ok()? + f[12].parse::<f64>().ok()?) / 100.0)
}
