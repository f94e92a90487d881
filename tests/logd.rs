//! logd's ingestion against a real PostgreSQL (as root): records arrive with the right fields and
//! the source address taken from the connection; a resend is dropped by id; an address outside
//! the allow-list and a worker certificate are refused; bad frames are refused without harm;
//! while PostgreSQL is down nothing is acknowledged, and once it is back the batch is stored.

use sagews_testkit::pg;
use sagews_testkit::worker as harness;

use std::net::SocketAddr;
use std::time::Duration;

use sage_agent::frame;
use sage_agent::proto::{Level, LogRecord, LogReply, LogRequest};
use sage_agent::tls::Identity;
use sagews_testkit::pki::State;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpSocket;

struct Logd {
    addr: SocketAddr,
    tmp: tempfile::TempDir,
    state: State,
    pg: pg::Pg,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

async fn start() -> Logd {
    start_with(serde_json::json!({})).await
}

/// A logd whose config gets `extra`'s fields on top of the test defaults.
async fn start_with(extra: serde_json::Value) -> Logd {
    harness::require_root();
    let tmp = tempfile::tempdir().unwrap();
    // Where sagectl keeps the state of an inventory named `ltest` in this directory.
    let state = State::open_at(&tmp.path().join(".sagectl/ltest"), "ltest").unwrap();
    let pg = pg::Pg::for_ca(&state, false).await;
    pg.create_db("sagews_logs", "logpw123");
    let (ca, crt, key) = harness::creds(&state, &tmp.path().join("logd"), "logs1", &["logd"]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = serde_json::json!({
        "inventory": "ltest", "host": "logs1", "listen": addr.to_string(), "http_listen": "127.0.0.1:0",
        "tls": {"ca": ca, "cert": crt, "key": key},
        "database": {"host": "127.0.0.1", "server_name": "db", "port": pg.port, "name": "sagews_logs", "user": "sagews_logs", "password": "logpw123"},
        "allow": ["127.0.0.1"], "batch_size": 5000, "retention_days": 30, "alerts": [], "replica": null,
        "frame_seconds": 2
    });
    let mut config = config;
    for (k, v) in extra.as_object().unwrap() {
        config[k] = v.clone();
    }
    let path = tmp.path().join("logd.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let config = sage_agent::logd::Config::load(&path).unwrap();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(sage_agent::logd::run(config, listener, async move {
        let _ = rx.await;
    }));
    Logd {
        addr,
        tmp,
        state,
        pg,
        stop: Some(stop),
    }
}

/// The test logd's config with `edit` applied, written beside it as `name`.
fn config_variant(
    l: &Logd,
    name: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> std::path::PathBuf {
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(l.tmp.path().join("logd.json")).unwrap())
            .unwrap();
    edit(&mut cfg);
    let path = l.tmp.path().join(name);
    std::fs::write(&path, cfg.to_string()).unwrap();
    path
}

/// The config of a logd in a process of its own, on a free port of its own: (port, path).
fn own_process_config(l: &Logd, name: &str) -> (u16, std::path::PathBuf) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let path = config_variant(l, name, |cfg| {
        cfg["listen"] = serde_json::json!(format!("127.0.0.1:{port}"));
    });
    (port, path)
}

/// A logd in a process of its own (the tests kill it with SIGKILL).
fn spawn_logd(config: &std::path::Path) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_sage-agent"))
        .args(["logd", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(config.with_extension("log")).unwrap())
        .spawn()
        .unwrap()
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn connect_from(l: &Logd, from: &str, name: &str, roles: &[&str]) -> std::io::Result<Tls> {
    connect_to(l.addr, &l.state, l.tmp.path(), from, name, roles).await
}

async fn connect_to(
    addr: SocketAddr,
    state: &State,
    dir: &std::path::Path,
    from: &str,
    name: &str,
    roles: &[&str],
) -> std::io::Result<Tls> {
    let (ca, crt, key) = harness::creds(state, &dir.join("clients"), name, roles);
    let id = Identity::load(&ca, &crt, &key).unwrap();
    let sock = TcpSocket::new_v4()?;
    sock.bind(format!("{from}:0").parse().unwrap())?;
    let tcp = sock.connect(addr).await?;
    let cfg = id.client_config(&["logd"]).unwrap();
    let sn = rustls::pki_types::ServerName::try_from("logs1").unwrap();
    tokio_rustls::TlsConnector::from(cfg).connect(sn, tcp).await
}

fn record(i: usize) -> LogRecord {
    let mut fields = serde_json::Map::new();
    fields.insert("workspace".into(), serde_json::json!(format!("ws-{i}")));
    LogRecord {
        id: format!("rec-{i}"),
        ts_ms: 1_795_800_000_000 + i as i64,
        host: "backend1".into(),
        level: Level::Warn,
        target: "backend::save".into(),
        message: format!("saved {i}"),
        fields,
    }
}

async fn send(s: &mut Tls, batch: u64, records: Vec<LogRecord>) -> LogReply {
    frame::write(s, &LogRequest::Records { batch, records })
        .await
        .unwrap();
    frame::read(s, 1 << 20, Duration::from_secs(30))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn records_stored_once_with_the_connections_address() {
    let l = start().await;
    let mut s = connect_from(&l, "127.0.0.1", "backend1", &["backend"])
        .await
        .unwrap();
    let reply = send(&mut s, 1, (0..3).map(record).collect()).await;
    assert_eq!(
        reply,
        LogReply::Ack {
            batch: 1,
            stored: 3,
            duplicates: 0
        }
    );
    let row = l.pg.query("sagews_logs", "select id, host, host(source_ip), level, target, message, fields->>'workspace', extract(epoch from ts)::bigint from records where id = 'rec-1'");
    assert_eq!(
        row,
        "rec-1|backend1|127.0.0.1|3|backend::save|saved 1|ws-1|1795800000"
    );
    // A resend after a lost ack: dropped by id.
    let reply = send(&mut s, 2, (0..3).map(record).collect()).await;
    assert_eq!(
        reply,
        LogReply::Ack {
            batch: 2,
            stored: 0,
            duplicates: 3
        }
    );
    assert_eq!(
        l.pg.query("sagews_logs", "select count(*) from records"),
        "3"
    );
    // Old and new together, and a record twice in one batch: each stored once, counted right.
    let reply = send(&mut s, 3, [1, 2, 3, 4, 4].into_iter().map(record).collect()).await;
    assert_eq!(
        reply,
        LogReply::Ack {
            batch: 3,
            stored: 2,
            duplicates: 3
        }
    );
    assert_eq!(
        l.pg.query(
            "sagews_logs",
            "select count(*), count(distinct id) from records"
        ),
        "5|5"
    );
    // What PostgreSQL cannot store (NUL in text and jsonb, a time past year 294276) is made
    // storable instead of failing its batch forever; the next batch goes through too.
    let mut bad = record(10);
    bad.message = "nul\0here".into();
    bad.fields.insert("k\0".into(), serde_json::json!(["a\0b"]));
    bad.ts_ms = i64::MAX;
    let reply = send(&mut s, 4, vec![bad]).await;
    assert!(
        matches!(reply, LogReply::Ack { stored: 1, .. }),
        "{reply:?}"
    );
    let reply = send(&mut s, 5, vec![record(11)]).await;
    assert!(
        matches!(reply, LogReply::Ack { stored: 1, .. }),
        "{reply:?}"
    );
    assert_eq!(
        l.pg.query(
            "sagews_logs",
            "select message, fields->>'k\u{fffd}', fields->>'ts_ms_sent', extract(year from ts) from records where id = 'rec-10'"
        ),
        format!("nul\u{fffd}here|[\"a\u{fffd}b\"]|{}|9999", i64::MAX)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn outsiders_and_workers_are_refused_bad_frames_are_harmless() {
    let l = start().await;
    // 127.0.0.2 is not on the allow-list: dropped before TLS.
    assert!(
        connect_from(&l, "127.0.0.2", "backend1", &["backend"])
            .await
            .is_err(),
        "an address outside the allow-list"
    );
    // Same address, any port: allowed (the 2012 server compared the (address, port) pair).
    for _ in 0..2 {
        let mut s = connect_from(&l, "127.0.0.1", "backend1", &["backend"])
            .await
            .unwrap();
        assert!(matches!(
            send(&mut s, 1, vec![record(100)]).await,
            LogReply::Ack { .. }
        ));
    }
    // A worker certificate: refused at the handshake (seen on the first read in TLS 1.3).
    let refused = match connect_from(&l, "127.0.0.1", "worker1", &["worker"]).await {
        Err(_) => true,
        Ok(mut s) => {
            let _ = frame::write(
                &mut s,
                &LogRequest::Records {
                    batch: 1,
                    records: vec![record(200)],
                },
            )
            .await;
            frame::read::<LogReply, _>(&mut s, 1 << 20, Duration::from_secs(5))
                .await
                .is_err()
        }
    };
    assert!(refused, "a worker certificate is refused");
    assert_eq!(
        l.pg.query(
            "sagews_logs",
            "select count(*) from records where id = 'rec-200'"
        ),
        "0"
    );
    // Oversized and non-JSON frames: an error, then the end of that connection.
    for bytes in [
        vec![0x7f, 0xff, 0xff, 0xff],
        [&[0u8, 0, 0, 3][..], b"abc"].concat(),
    ] {
        let mut s = connect_from(&l, "127.0.0.1", "backend1", &["backend"])
            .await
            .unwrap();
        s.write_all(&bytes).await.unwrap();
        let r: LogReply = frame::read(&mut s, 1 << 20, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(
            matches!(&r, LogReply::Error { message } if message.starts_with("closing the connection")),
            "{r:?}"
        );
    }
    // A client that connects and sends nothing is dropped after the frame deadline (2 s).
    let mut s = connect_from(&l, "127.0.0.1", "backend1", &["backend"])
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let _ = frame::read::<LogReply, _>(&mut s, 1 << 20, Duration::from_secs(30)).await;
    assert!(started.elapsed() < Duration::from_secs(6));
    // Still serving.
    let mut s = connect_from(&l, "127.0.0.1", "backend1", &["backend"])
        .await
        .unwrap();
    assert!(matches!(
        send(&mut s, 9, vec![record(300)]).await,
        LogReply::Ack { stored: 1, .. }
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_is_acknowledged_while_postgres_is_down() {
    let mut l = start().await;
    let mut s = connect_from(&l, "127.0.0.1", "backend1", &["backend"])
        .await
        .unwrap();
    assert!(matches!(
        send(&mut s, 1, vec![record(1)]).await,
        LogReply::Ack { stored: 1, .. }
    ));
    l.pg.stop();
    frame::write(
        &mut s,
        &LogRequest::Records {
            batch: 2,
            records: (2..50).map(record).collect(),
        },
    )
    .await
    .unwrap();
    let early = frame::read::<LogReply, _>(&mut s, 1 << 20, Duration::from_secs(3)).await;
    assert!(
        early.is_err(),
        "acknowledged while the database was down: {early:?}"
    );
    l.pg.run();
    let r: LogReply = frame::read(&mut s, 1 << 20, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        r,
        LogReply::Ack {
            batch: 2,
            stored: 48,
            duplicates: 0
        }
    );
    assert_eq!(
        l.pg.query("sagews_logs", "select count(*) from records"),
        "49"
    );
    let _ = l.stop.take();
}

/// Zero loss: while a client sends 200,000 records, logd is killed with SIGKILL twice and
/// PostgreSQL restarted once; in the end the table holds exactly 200,000 distinct records.
#[tokio::test(flavor = "multi_thread")]
async fn zero_loss_through_crashes_and_a_database_restart() {
    use sage_agent::logclient::{LogClient, Settings};
    let mut l = start().await;
    // A logd of its own in a separate process (this test kills it), on a fixed port.
    let (port, path2) = own_process_config(&l, "logd-proc.json");
    let spawn = || spawn_logd(&path2);
    let mut logd = spawn();
    let (ca, crt, key) = harness::creds(
        &l.state,
        &l.tmp.path().join("clients"),
        "backend1",
        &["backend"],
    );
    let client = LogClient::start(Settings {
        address: format!("127.0.0.1:{port}"),
        server_name: "logs1".into(),
        identity: Identity::load(&ca, &crt, &key).unwrap(),
        spool_dir: l.tmp.path().join("spool"),
        host: "backend1".into(),
        queue: 10_000,
        batch: 2_000,
    })
    .unwrap();
    const N: usize = 200_000;
    let producer = {
        let client = client.clone();
        tokio::spawn(async move {
            for i in 0..N {
                client.log(
                    Level::Info,
                    "test",
                    &format!("record {i}"),
                    serde_json::Map::new(),
                );
                if i % 2_000 == 1_999 {
                    tokio::time::sleep(Duration::from_millis(100)).await; // about 20,000 records/s for 10 s
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    logd.kill().unwrap(); // SIGKILL
    logd.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    logd = spawn();
    tokio::time::sleep(Duration::from_secs(2)).await;
    l.pg.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    l.pg.run();
    tokio::time::sleep(Duration::from_secs(2)).await;
    logd.kill().unwrap();
    logd.wait().unwrap();
    logd = spawn();
    producer.await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let count = loop {
        let n: usize =
            l.pg.query("sagews_logs", "select count(*) from records")
                .parse()
                .unwrap();
        if n >= N || std::time::Instant::now() > deadline {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let distinct: usize =
        l.pg.query("sagews_logs", "select count(distinct id) from records")
            .parse()
            .unwrap();
    eprintln!(
        "stored {count} ({distinct} distinct); spilled to disk on the way: {}",
        client
            .counters
            .spilled
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    assert_eq!((count, distinct), (N, N));
    logd.kill().unwrap();
    let _ = logd.wait();
}

/// The alerts the test's command wrote into `dir` (one whole file each).
fn read_alerts(dir: &std::path::Path) -> Vec<serde_json::Value> {
    let mut names: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    names.sort();
    let mut alerts: Vec<serde_json::Value> = names
        .iter()
        .map(|p| serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap())
        .collect();
    // In the order of the records that fired them.
    alerts.sort_by_key(|a| a["last"]["ts_ms"].as_i64());
    alerts
}

/// An alert rule fires once per window for a burst, and again in the next window; its command
/// gets the alert as JSON on stdin.
#[tokio::test(flavor = "multi_thread")]
async fn alert_fires_once_per_window() {
    let out = tempfile::tempdir().unwrap();
    // Each alert into a file of its own, moved into place whole: two alerts may run at once.
    let dir = out.path().to_path_buf();
    let script = format!(
        "t=$(mktemp -p {d} .part.XXXXXX) && cat > \"$t\" && mv \"$t\" \"{d}/alert-${{t##*.}}.json\"",
        d = dir.display()
    );
    let rule = serde_json::json!([{
        "name": "db-refused", "level": "error", "target": "backend::db", "message": "database .* refused",
        "host": null, "count": 3, "window_seconds": 60, "action": {"command": ["sh", "-c", script]}
    }]);
    let l = start_with(serde_json::json!({"alerts": rule})).await;
    let mut s = connect_from(&l, "127.0.0.1", "backend1", &["backend"])
        .await
        .unwrap();
    let rec = |i: i64, window: i64, msg: &str| LogRecord {
        id: format!("a-{window}-{i}"),
        ts_ms: 1_795_800_000_000 + window * 60_000 + i,
        host: "backend1".into(),
        level: Level::Error,
        target: "backend::db".into(),
        message: msg.into(),
        fields: Default::default(),
    };
    // A burst of 10 in one window (and noise that does not match), then 3 in the next.
    let mut burst: Vec<LogRecord> = (0..10)
        .map(|i| rec(i, 0, "database x refused the connection"))
        .collect();
    burst.push(rec(50, 0, "all is well"));
    assert!(matches!(
        send(&mut s, 1, burst).await,
        LogReply::Ack { stored: 11, .. }
    ));
    // A resend of the same burst counts nothing twice.
    assert!(matches!(
        send(
            &mut s,
            2,
            (0..10)
                .map(|i| rec(i, 0, "database x refused the connection"))
                .collect()
        )
        .await,
        LogReply::Ack { stored: 0, .. }
    ));
    assert!(matches!(
        send(
            &mut s,
            3,
            (0..3).map(|i| rec(i, 1, "database y refused")).collect()
        )
        .await,
        LogReply::Ack { stored: 3, .. }
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let alerts = loop {
        let alerts = read_alerts(&dir);
        if alerts.len() >= 2 || std::time::Instant::now() > deadline {
            break alerts;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let again = read_alerts(&dir).len();
    assert_eq!(
        (alerts.len(), again),
        (2, 2),
        "one alert per window: {alerts:?}"
    );
    assert_eq!(alerts[0]["rule"], "db-refused");
    assert_eq!(alerts[0]["count"], 3);
    assert_eq!(alerts[1]["last"]["message"], "database y refused");
}

/// Records past the retention are deleted at start (then periodically); newer ones stay.
#[tokio::test(flavor = "multi_thread")]
async fn retention_deletes_old_records() {
    let l =
        start_with(serde_json::json!({"retention_days": 30, "retention_check_seconds": 1})).await;
    let mut s = connect_from(&l, "127.0.0.1", "backend1", &["backend"])
        .await
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut records: Vec<LogRecord> = (0..20).map(record).collect();
    for (i, r) in records.iter_mut().enumerate() {
        r.ts_ms = if i < 12 {
            now - 40 * 86_400_000
        } else {
            now - 86_400_000
        };
    }
    assert!(matches!(
        send(&mut s, 1, records).await,
        LogReply::Ack { stored: 20, .. }
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let n = l.pg.query("sagews_logs", "select count(*) from records");
        if n == "8" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "old records still there: {n} rows"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Replication: a second logd (its own database) is stopped while records arrive at the first,
/// then started again: both end up holding the same set, with no gap and no duplicate.
#[tokio::test(flavor = "multi_thread")]
async fn replica_catches_up_after_an_outage() {
    let l = start().await;
    // The replica: same CA, its own database, in a separate process (stopped with SIGKILL).
    l.pg.create_db("sagews_replica", "replpw12");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let replica_cfg = config_variant(&l, "replica.json", |cfg| {
        cfg["listen"] = serde_json::json!(format!("127.0.0.1:{port}"));
        cfg["database"]["name"] = serde_json::json!("sagews_replica");
        cfg["database"]["user"] = serde_json::json!("sagews_replica");
        cfg["database"]["password"] = serde_json::json!("replpw12");
    });
    let spawn = || spawn_logd(&replica_cfg);
    let mut replica = spawn();
    // The primary, replicating to it.
    let primary_cfg = config_variant(&l, "primary.json", |cfg| {
        cfg["replica"] =
            serde_json::json!({"address": format!("127.0.0.1:{port}"), "server_name": "logs1"});
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let paddr = listener.local_addr().unwrap();
    tokio::spawn(sage_agent::logd::run(
        sage_agent::logd::Config::load(&primary_cfg).unwrap(),
        listener,
        std::future::pending(),
    ));
    let mut s = connect_to(
        paddr,
        &l.state,
        l.tmp.path(),
        "127.0.0.1",
        "backend1",
        &["backend"],
    )
    .await
    .unwrap();
    let count = |db: &str| {
        l.pg.query(db, "select count(*) from records")
            .parse::<usize>()
            .unwrap_or(0)
    };
    let wait_for = |db: &'static str, n: usize| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let c = count(db);
            if c >= n || std::time::Instant::now() > deadline {
                return c;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    assert!(matches!(
        send(&mut s, 1, (0..100).map(record).collect()).await,
        LogReply::Ack { stored: 100, .. }
    ));
    assert_eq!(wait_for("sagews_replica", 100), 100);
    replica.kill().unwrap();
    replica.wait().unwrap();
    assert!(matches!(
        send(&mut s, 2, (100..250).map(record).collect()).await,
        LogReply::Ack { stored: 150, .. }
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    replica = spawn();
    assert_eq!(wait_for("sagews_replica", 250), 250);
    let ids = |db: &str| {
        l.pg.query(db, "select string_agg(id, ',' order by id) from records")
    };
    assert_eq!(
        ids("sagews_replica"),
        ids("sagews_logs"),
        "the same set on both"
    );
    assert_eq!(
        l.pg.query("sagews_replica", "select count(distinct id) from records"),
        "250"
    );
    assert_eq!(
        l.pg.query(
            "sagews_replica",
            "select count(*) from records where host(source_ip) <> '127.0.0.1'"
        ),
        "0",
        "sources kept"
    );
    replica.kill().unwrap();
    let _ = replica.wait();
}

/// Queries: the HTTPS API answers sagectl's admin certificate only; `sagectl logs`' client
/// filters by level, host, text and follows with `after`.
#[tokio::test(flavor = "multi_thread")]
async fn queries_through_sagectl_logs() {
    let http = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let l = start_with(serde_json::json!({"http_listen": format!("127.0.0.1:{http}")})).await;
    let inv_path = l.tmp.path().join("ltest.yaml");
    std::fs::write(&inv_path, format!("name: ltest\nhosts:\n  logs1: {{address: 127.0.0.1, roles: [logd, database]}}\nlogd: {{http_port: {http}}}\n")).unwrap();
    let mut s = connect_from(&l, "127.0.0.1", "backend1", &["backend"])
        .await
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mk = |i: usize, host: &str, level: Level, msg: &str| LogRecord {
        id: format!("q-{i}"),
        ts_ms: now - 1000 + i as i64,
        host: host.into(),
        level,
        target: "backend".into(),
        message: msg.into(),
        fields: Default::default(),
    };
    let records = vec![
        mk(0, "backend1", Level::Info, "signed in"),
        mk(1, "backend1", Level::Warn, "slow save of ws-7"),
        mk(2, "backend2", Level::Error, "database refused"),
        mk(3, "backend2", Level::Debug, "noise"),
    ];
    assert!(matches!(
        send(&mut s, 1, records).await,
        LogReply::Ack { stored: 4, .. }
    ));
    // `sagectl logs` itself (the binary beside sage-agent), as an operator runs it.
    let logs = |args: &[&str]| {
        let mut c = std::process::Command::new(sagews_testkit::bin("sagectl"));
        c.arg("logs")
            .arg(&inv_path)
            .args(["--since", "1h"])
            .args(args);
        c
    };
    let messages = |out: &[u8]| -> Vec<String> {
        String::from_utf8_lossy(out)
            .lines()
            .map(|l| l.split_once("backend: ").expect(l).1.to_string())
            .collect()
    };
    let query = |args: &[&str]| {
        let o = logs(args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        messages(&o.stdout)
    };
    assert_eq!(
        query(&[]),
        [
            "signed in",
            "slow save of ws-7",
            "database refused",
            "noise"
        ]
    );
    assert_eq!(
        query(&["--level", "warn"]),
        ["slow save of ws-7", "database refused"]
    );
    assert_eq!(
        query(&["--host", "backend2"]),
        ["database refused", "noise"]
    );
    assert_eq!(query(&["--grep", "ws-7"]), ["slow save of ws-7"]);
    // Follow: what is there, then only what is new.
    let mut follow = logs(&["--follow"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(follow.stdout.take().unwrap()));
    let mut next = move || lines.next().unwrap().unwrap();
    let first: Vec<String> = (0..4).map(|_| next()).collect();
    assert_eq!(messages(first.join("\n").as_bytes()).len(), 4);
    assert!(matches!(
        send(&mut s, 2, vec![mk(9, "backend1", Level::Info, "new one")]).await,
        LogReply::Ack { .. }
    ));
    let new = tokio::task::spawn_blocking(next).await.unwrap();
    assert_eq!(messages(new.as_bytes()), ["new one"]);
    follow.kill().unwrap();
    let _ = follow.wait();
    // A backend's certificate sees the audit records only (its operators' page shows them):
    // an audit record sent now is all it gets of the six.
    let mut audit = mk(
        10,
        "backend1",
        Level::Info,
        "admin alice drained worker worker1",
    );
    audit.target = "backend.audit".into();
    assert!(matches!(
        send(&mut s, 3, vec![audit]).await,
        LogReply::Ack { .. }
    ));
    let get = |role: &'static str| {
        let (state, dir) = (&l.state, l.tmp.path().join(format!("clients-{role}")));
        async move {
            let (ca, crt, key) = harness::creds(state, &dir, &format!("{role}1"), &[role]);
            let id = Identity::load(&ca, &crt, &key).unwrap();
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", http))
                .await
                .unwrap();
            let sn = rustls::pki_types::ServerName::try_from("logs1").unwrap();
            match tokio_rustls::TlsConnector::from(id.client_config(&["logd"]).unwrap())
                .connect(sn, tcp)
                .await
            {
                Err(_) => None,
                Ok(t) => {
                    let mut t = tokio::io::BufReader::new(t);
                    sagews_wire::http1::request(
                        &mut t,
                        "GET",
                        "logs1",
                        "/api/records?limit=100",
                        &[],
                        b"",
                        1 << 20,
                    )
                    .await
                    .ok()
                }
            }
        }
    };
    let r = get("backend").await.expect("a backend may query");
    assert_eq!(r.status, 200);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&r.body).unwrap();
    let seen: Vec<&str> = rows
        .iter()
        .map(|r| r["message"].as_str().unwrap())
        .collect();
    assert_eq!(seen, ["admin alice drained worker worker1"], "{rows:?}");
    // A worker's certificate is refused at the handshake (or gets nothing).
    assert!(
        get("worker").await.is_none_or(|r| r.status != 200),
        "a worker certificate cannot query logs"
    );
}

/// `sage-agent logd` exits within 2 s of SIGTERM with a client connected (issue 15).
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_ends_logd_within_two_seconds() {
    let l = start().await;
    let (port, path) = own_process_config(&l, "logd-term.json");
    let mut logd = spawn_logd(&path);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let _held = loop {
        match connect_to(
            addr,
            &l.state,
            l.tmp.path(),
            "127.0.0.1",
            "backend1",
            &["backend"],
        )
        .await
        {
            Ok(c) => break c,
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "logd did not start: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let (took, status) = harness::sigterm_and_wait(&mut logd).await;
    eprintln!("logd exited {took:?} after SIGTERM ({status})");
    assert!(
        status.success() && took < Duration::from_secs(2),
        "{status} after {took:?}"
    );
    // Every background task (writer, retention, queries, connections) finished first.
    let log = std::fs::read_to_string(path.with_extension("log")).unwrap();
    assert!(
        log.contains("stopped: ") && log.contains(" tasks finished"),
        "{log}"
    );
}
