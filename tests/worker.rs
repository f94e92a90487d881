//! The worker agent, as root with real processes: sessions (state kept, output streamed and kept
//! apart, interrupt, save and reopen from the bundle, close removes the user and its processes),
//! hostile code contained with a clear message while other sessions keep working, connections
//! refused for the wrong role, no certificate or another CA, and bad frames refused without harm.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use sagews_testkit::worker as harness;

use harness::{Client, Worker, creds, limits, require_root};
use sage_agent::frame;
use sage_agent::proto::{Event, Request, Status};
use sage_agent::tls::Identity;
use sagews_testkit::pki::State;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The v1 memory cgroup of the session of `uid` (these tests run on this box's hybrid cgroups,
/// under the test process's own memory cgroup).
fn session_cgroup(uid: u32) -> PathBuf {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let path = own
        .lines()
        .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()))
        .expect("a v1 memory cgroup");
    PathBuf::from(format!(
        "/sys/fs/cgroup/memory{}/sagews/ws{uid}",
        path.trim_end_matches('/')
    ))
}

/// Waits for the worker to say that `session` ended (by itself).
async fn closed(c: &mut Client, session: &str) -> String {
    loop {
        if let Event::Closed { session: s, reason } = c.next().await
            && s == session
        {
            return reason;
        }
    }
}

/// What is left of the session of `uid`: processes, homes, its cgroup.
fn leftovers(w: &Worker, uid: u32) -> Vec<String> {
    let mut out = Vec::new();
    let pids = sage_agent::worker::sandbox::pids_of(uid);
    if !pids.is_empty() {
        out.push(format!("processes {pids:?}"));
    }
    if let Ok(homes) = std::fs::read_dir(w.tmp.path().join("state/homes")) {
        for e in homes.flatten() {
            let owner = std::os::unix::fs::MetadataExt::uid(&e.metadata().unwrap());
            if owner == uid {
                out.push(e.path().display().to_string());
            }
        }
    }
    if session_cgroup(uid).exists() {
        out.push(session_cgroup(uid).display().to_string());
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn session_lifecycle() {
    let w = Worker::start(61000, limits(), 600).await;
    let mut c = w.client().await;
    let ready = c.open("ws-life", None).await;
    eprintln!("session ready in {ready} ms");
    assert_eq!(
        leftovers(&w, 61000).len(),
        4,
        "the workspace has its own uid, with processes, a home, a cache and a cgroup: {:?}",
        leftovers(&w, 61000)
    );

    let cell = c.run("ws-life", 1, "x = 2").await;
    assert_eq!((cell.status, cell.stdout.as_str()), (Some(Status::Ok), ""));
    let cell = c.run("ws-life", 2, "x + 1").await;
    assert_eq!(
        (cell.status, cell.stdout.as_str()),
        (Some(Status::Ok), "3\n"),
        "the value of a last expression, as a REPL shows it"
    );
    let cell = c.run("ws-life", 3, "import sys\nprint('a')\nprint('E1', file=sys.stderr)\nprint('b')\nprint('E2', file=sys.stderr)").await;
    assert_eq!(
        (cell.stdout.as_str(), cell.stderr.as_str()),
        ("a\nb\n", "E1\nE2\n"),
        "streams kept apart and in order"
    );
    let cell = c.run("ws-life", 4, "1/0").await;
    assert_eq!(cell.status, Some(Status::Error));
    assert!(cell.stderr.contains("ZeroDivisionError"), "{}", cell.stderr);
    // Streaming: output arrives before the cell ends.
    let cell = c
        .run(
            "ws-life",
            5,
            "import time\nfor i in range(3):\n    print(i)\n    time.sleep(0.2)",
        )
        .await;
    assert_eq!(cell.stdout, "0\n1\n2\n");
    assert!(
        cell.chunks >= 3,
        "flushed within 50 ms, so in several chunks: {}",
        cell.chunks
    );

    // Executes queue in order; an interrupt stops a loop.
    c.send(Request::Execute {
        session: "ws-life".into(),
        id: 6,
        code: "while True: pass".into(),
    })
    .await;
    c.send(Request::Execute {
        session: "ws-life".into(),
        id: 7,
        code: "'after'".into(),
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.send(Request::Interrupt {
        session: "ws-life".into(),
    })
    .await;
    let cell = c.collect("ws-life", 6).await;
    assert_eq!(cell.status, Some(Status::Interrupted), "{cell:?}");
    let cell = c.collect("ws-life", 7).await;
    assert_eq!(cell.stdout, "'after'\n");

    // Save: a commit made as the user, returned as a bundle; reopened elsewhere with its files.
    c.run("ws-life", 8, "open('notes.txt', 'w').write('hello')")
        .await;
    c.send(Request::Save {
        session: "ws-life".into(),
        message: "first".into(),
    })
    .await;
    let bundle = match c.next().await {
        Event::Saved {
            bundle, changed, ..
        } => {
            assert!(changed);
            bundle
        }
        e => panic!("{e:?}"),
    };
    c.send(Request::Save {
        session: "ws-life".into(),
        message: "again".into(),
    })
    .await;
    assert!(
        matches!(c.next().await, Event::Saved { changed: false, .. }),
        "nothing new: no commit"
    );
    let reason = c.close("ws-life").await;
    assert_eq!(reason, "closed by the backend");
    assert_eq!(
        leftovers(&w, 61000),
        Vec::<String>::new(),
        "nothing of the session is left after close"
    );

    c.open("ws-copy", Some(bundle)).await;
    let cell = c.run("ws-copy", 1, "print(open('notes.txt').read())\nimport subprocess\nprint(subprocess.run(['git','log','--format=%s %an'], capture_output=True, text=True).stdout)").await;
    assert!(cell.stdout.starts_with("hello\nfirst ws61"), "{cell:?}");
    c.close("ws-copy").await;

    // A corrupt bundle is refused with a clear error, and leaves no user behind.
    c.send(Request::Open {
        session: "ws-bad".into(),
        bundle: Some("bm90IGEgYnVuZGxl".into()),
        limits: None,
    })
    .await;
    match c.next().await {
        Event::Error { message, .. } => {
            assert!(message.contains("not a valid git bundle"), "{message}")
        }
        e => panic!("{e:?}"),
    }
    assert!(leftovers(&w, 61000).is_empty() && leftovers(&w, 61001).is_empty());
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_code_is_contained() {
    let w = Worker::start(62000, limits(), 600).await;
    let mut c = w.client().await;
    c.open("victim", None).await;
    c.run("victim", 1, "open('secret.txt', 'w').write('s3cret')")
        .await;
    c.open("attacker", None).await;
    let home = w.tmp.path().join("state/homes");
    let cases: Vec<(&str, String, &str)> = vec![
        ("fork bomb", "import os\npids = []\nwhile True:\n    pids.append(os.fork())\n    if pids[-1] == 0:\n        import time; time.sleep(30)".into(), "BlockingIOError"),
        ("file over the size limit", "open('big', 'wb').write(b'x' * (2 * 1024 * 1024))".into(), "File too large"),
        ("thousands of files", "fs = [open('/dev/null') for _ in range(5000)]".into(), "Too many open files"),
        ("another workspace's home", format!("print(open('{}/victim/secret.txt').read())", home.display()), "PermissionError"),
        ("a TCP connection", "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=3)".into(), "Network is unreachable"),
        // The worker is not even in the session's PID namespace.
        ("killing the worker", format!("import os, signal\nos.kill({}, signal.SIGKILL)", std::process::id()), "ProcessLookupError"),
    ];
    for (i, (what, code, expect)) in cases.iter().enumerate() {
        let cell = c.run("attacker", 10 + i as u64, code).await;
        assert_eq!(cell.status, Some(Status::Error), "{what}: {cell:?}");
        assert!(
            cell.stderr.contains(expect),
            "{what}: expected {expect} in {}",
            cell.stderr
        );
        // The victim's session keeps working after each.
        let ok = c.run("victim", 100 + i as u64, "1 + 1").await;
        assert_eq!(ok.stdout, "2\n", "after {what}");
    }
    // CPU past the limit: the engine is stopped with a clear message; the session ends.
    let cell = c.run("attacker", 50, "while True: pass").await;
    assert_eq!(cell.status, Some(Status::Killed), "{cell:?}");
    assert!(
        cell.message
            .as_deref()
            .unwrap_or("")
            .contains("CPU time limit reached (3 s of CPU"),
        "{cell:?}"
    );
    closed(&mut c, "attacker").await;
    assert!(
        sage_agent::worker::sandbox::pids_of(62001).is_empty(),
        "nothing of the attacker is left running"
    );
    assert_eq!(
        c.run("victim", 200, "'still here'").await.stdout,
        "'still here'\n"
    );
    c.close("victim").await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_peers_are_refused_and_bad_frames_are_harmless() {
    let w = Worker::start(63000, limits(), 600).await;
    // A certificate of the deployment whose role is not backend.
    let logd = w.backend_identity("logs1", &["logd"]);
    assert!(
        Client::connect(w.addr, &logd).await.is_err(),
        "a logd certificate is refused"
    );
    // A backend certificate from another CA.
    let other = State::open_at(&w.tmp.path().join("other-pki"), "other").unwrap();
    let (ca, crt, key) = creds(
        &other,
        &w.tmp.path().join("other"),
        "backend1",
        &["backend"],
    );
    let mut foreign = Identity::load(&ca, &crt, &key).unwrap();
    foreign.roots = w.backend_identity("backend1", &["backend"]).roots; // trusts the worker, but is not trusted by it
    assert!(
        Client::connect(w.addr, &foreign).await.is_err(),
        "another CA's certificate is refused"
    );
    // No certificate at all.
    sage_agent::tls::init();
    let roots = w.backend_identity("backend1", &["backend"]).roots;
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(w.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("worker1").unwrap();
    let refused = match tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await
    {
        Err(_) => true,
        Ok(mut s) => {
            let _ = frame::write(&mut s, &Request::Ping).await;
            frame::read::<Event, _>(&mut s, 1 << 20, Duration::from_secs(5))
                .await
                .is_err()
        }
    };
    assert!(refused, "no client certificate is refused");

    let good = w.backend_identity("backend1", &["backend"]);
    // Oversized, non-JSON and unknown requests: an error event, then the connection closes.
    for (what, bytes) in [
        ("oversized", vec![0x7f, 0xff, 0xff, 0xff]),
        ("not JSON", [&[0u8, 0, 0, 5][..], b"hello"].concat()),
        (
            "unknown request",
            [&[0u8, 0, 0, 20][..], br#"{"type":"rm_rf_root"}"#].concat(),
        ),
    ] {
        let mut c = Client::connect(w.addr, &good).await.unwrap();
        c.wr.write_all(&bytes).await.unwrap();
        c.wr.flush().await.unwrap();
        match c.next().await {
            Event::Error { message, .. } => assert!(
                message.starts_with("closing the connection"),
                "{what}: {message}"
            ),
            e => panic!("{what}: {e:?}"),
        }
        assert!(
            frame::read::<Event, _>(&mut c.rd, 1 << 20, Duration::from_secs(5))
                .await
                .is_err(),
            "{what}: closed after the error"
        );
    }
    // A truncated frame: an error within the frame deadline (2 s here), then the end.
    let mut c = Client::connect(w.addr, &good).await.unwrap();
    c.wr.write_all(&[0, 0, 1, 0, b'{']).await.unwrap();
    c.wr.flush().await.unwrap();
    let started = Instant::now();
    let e = c.next_or_end().await;
    assert!(
        matches!(&e, Some(Event::Error { message, .. }) if message.contains("no complete frame")),
        "{e:?}"
    );
    assert!(c.next_or_end().await.is_none());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    // A client that connects and sends nothing is dropped after the first-frame deadline.
    let cfg = good.client_config(&["worker"]).unwrap();
    let tcp = TcpStream::connect(w.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("worker1").unwrap();
    let mut silent = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .unwrap();
    let started = Instant::now();
    let r = frame::read::<Event, _>(&mut silent, 1 << 20, Duration::from_secs(30)).await;
    assert!(matches!(r, Ok(Event::Error { .. })), "{r:?}");
    assert!(
        frame::read::<Event, _>(&mut silent, 1 << 20, Duration::from_secs(30))
            .await
            .is_err()
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "dropped after the 2 s deadline, took {:?}",
        started.elapsed()
    );
    // Invalid session names never reach the filesystem.
    let mut c = w.client().await;
    c.send(Request::Open {
        session: "../../etc".into(),
        bundle: None,
        limits: None,
    })
    .await;
    assert!(
        matches!(c.next().await, Event::Error { message, .. } if message.contains("invalid session id"))
    );
    // And the worker still serves.
    c.open("after", None).await;
    assert_eq!(c.run("after", 1, "6 * 7").await.stdout, "42\n");
    c.close("after").await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_stop_when_no_backend_is_heard_from() {
    let w = Worker::start(64000, limits(), 3).await;
    let mut c = w.client().await;
    c.open("lonely", None).await;
    let started = Instant::now();
    let reason = loop {
        if let Event::Closed { reason, .. } = c.next().await {
            break reason;
        }
    };
    assert!(reason.starts_with("no backend heard from for"), "{reason}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(leftovers(&w, 64000), Vec::<String>::new());
    w.stop().await;
}

/// The worker's metrics page on `port`, the HTTP answer whole.
async fn metrics_page(port: u16) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
    let mut body = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut s, &mut body)
        .await
        .unwrap();
    body
}

#[tokio::test(flavor = "multi_thread")]
async fn registers_with_backends_heartbeats_and_serves_metrics() {
    use sage_agent::proto::{Announce, AnnounceReply};
    require_root();
    let tmp = harness::state_tempdir();
    let state = State::open_at(&tmp.path().join("pki"), "wtest").unwrap();
    // A backend's worker port, as the backend will serve it: TLS, worker certificates only.
    let (ca, crt, key) = creds(
        &state,
        &tmp.path().join("backend"),
        "backend1",
        &["backend"],
    );
    let backend = Identity::load(&ca, &crt, &key).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(backend.server_config(&["worker"]).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = listener.local_addr().unwrap();
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (got_tx, mut got) = tokio::sync::mpsc::channel::<Announce>(16);
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut s = acceptor.accept(tcp).await.unwrap();
        loop {
            let Ok(a) = frame::read::<Announce, _>(&mut s, 1 << 16, Duration::from_secs(30)).await
            else {
                break;
            };
            got_tx.send(a).await.unwrap();
            frame::write(&mut s, &AnnounceReply::Ack).await.unwrap();
        }
    });
    let extra = serde_json::json!({
        "backends": [{"name": "backend1", "address": backend_addr.to_string()}],
        "heartbeat_seconds": 1,
        "metrics_listen": format!("127.0.0.1:{metrics_port}"),
    });
    let w = Worker::start_with(65000, limits(), 3, tmp, state, extra).await;
    match tokio::time::timeout(Duration::from_secs(10), got.recv())
        .await
        .unwrap()
        .unwrap()
    {
        Announce::Register {
            host,
            address,
            capacity,
            engines,
            draining: false,
        } => {
            assert_eq!(
                (host.as_str(), address, capacity, engines),
                (
                    "worker1",
                    w.addr.to_string(),
                    8,
                    vec!["python3".to_string()]
                )
            );
        }
        a => panic!("{a:?}"),
    }
    assert!(matches!(
        tokio::time::timeout(Duration::from_secs(5), got.recv())
            .await
            .unwrap()
            .unwrap(),
        Announce::Heartbeat { sessions: 0, .. }
    ));
    // Acknowledged heartbeats count as hearing from a backend: past the 3 s timeout, the session
    // is still open (compare sessions_stop_when_no_backend_is_heard_from).
    let mut c = w.client().await;
    c.open("kept", None).await;
    drop(c);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut c = w.client().await;
    assert_eq!(c.run("kept", 1, "'alive'").await.stdout, "'alive'\n");
    let hb = loop {
        if let Announce::Heartbeat { sessions, load, .. } = got.recv().await.unwrap() {
            break (sessions, load);
        }
    };
    assert_eq!(hb, (1, 1.0 / 8.0), "heartbeats carry the load");
    // Metrics, in Prometheus' text format.
    let body = metrics_page(metrics_port).await;
    assert!(body.starts_with("HTTP/1.0 200 OK"), "{body}");
    // (Sessions opened before this test's: the harness's probes of the engine server.)
    for line in [
        "sagews_worker_sessions_open 1",
        "sagews_worker_executes_total 1",
        "sagews_worker_engine_server{mode=\"zygote\"} 1",
        "sagews_worker_draining 0",
    ] {
        assert!(body.contains(line), "{line} not in\n{body}");
    }
    // `sage-agent drain`: the next heartbeat says so, and the metrics; `--undo` ends it.
    let config = w.tmp.path().join("worker.json");
    for (undo, draining) in [(false, true), (true, false)] {
        let mut cmd = std::process::Command::new(sagews_testkit::bin("sage-agent"));
        cmd.args(["drain", "--config"]).arg(&config);
        if undo {
            cmd.arg("--undo");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.starts_with("worker worker1: "), "{said}");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Announce::Heartbeat { draining: d, .. } = got.recv().await.unwrap() {
                if d == draining {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no heartbeat with draining {draining}"
            );
        }
        let body = metrics_page(metrics_port).await;
        let line = format!("sagews_worker_draining {}", u8::from(draining));
        assert!(body.contains(&line), "{line} not in\n{body}");
    }
    c.close("kept").await;
    w.stop().await;
}

/// Sage as the engine, when the `sagemath` package is installed (it is large: CI installs it
/// unless SAGECTL_CI_SAGE=0). Without it the test says it was skipped.
#[tokio::test(flavor = "multi_thread")]
async fn sage_engine_factors() {
    let have_sage = std::process::Command::new("sh")
        .args(["-c", "command -v sage"])
        .output()
        .unwrap()
        .status
        .success();
    if !have_sage {
        eprintln!(
            "SKIPPED: sagemath is not installed (apt-get install sagemath; .ci/run installs it)"
        );
        return;
    }
    require_root();
    let tmp = harness::state_tempdir();
    let state = State::open_at(&tmp.path().join("pki"), "wtest").unwrap();
    let mut l = limits();
    l.cpu_seconds = 300;
    l.memory_mb = 4096;
    l.processes = 200;
    let w = Worker::start_with(
        74000,
        l,
        600,
        tmp,
        state,
        serde_json::json!({"engine": "sage"}),
    )
    .await;
    let mut c = w.client().await;
    c.open("sage-ws", None).await;
    assert!(c.last_forked, "forked from the Sage engine server");
    let cell = c.run("sage-ws", 1, "factor(2^64+1)").await;
    assert_eq!(
        (cell.status, cell.stdout.trim()),
        (Some(Status::Ok), "274177 * 67280421310721"),
        "{cell:?}"
    );
    // The preparser on every cell; state kept between cells.
    let cell = c.run("sage-ws", 2, "R.<x> = QQ[]\nf = x^2 - 1\n2^10").await;
    assert_eq!(cell.stdout, "1024\n", "{cell:?}");
    let cell = c.run("sage-ws", 3, "f.factor()").await;
    assert_eq!(cell.stdout, "(x - 1) * (x + 1)\n", "{cell:?}");
    // Errors: the traceback starts at the user's code (none of the driver's frames).
    let cell = c.run("sage-ws", 4, "1/0").await;
    assert_eq!(cell.status, Some(Status::Error));
    assert!(
        cell.stderr.contains("File \"<cell>\", line 1")
            && cell.stderr.contains("ZeroDivisionError")
            && !cell.stderr.contains("def run"),
        "{}",
        cell.stderr
    );
    // A plot echoed by a cell is a picture.
    c.send(Request::Execute {
        session: "sage-ws".into(),
        id: 5,
        code: "plot(sin(x), (x, 0, 6))".into(),
    })
    .await;
    let (mut image, mut done) = (None, None);
    while done.is_none() {
        match c.next().await {
            Event::Image { mime, data, .. } => image = Some((mime, data.len())),
            Event::Done { status, .. } => done = Some(status),
            _ => {}
        }
    }
    assert_eq!(done, Some(Status::Ok));
    let (mime, len) = image.expect("an image event");
    assert_eq!(mime, "image/png");
    assert!(len > 1000, "a real picture: {len} bytes of base64");
    // Sessions forked from one server do not share state.
    c.open("sage-2", None).await;
    let cell = c.run("sage-2", 1, "'f' in globals(), 2^3").await;
    assert_eq!(cell.stdout, "(False, 8)\n", "{cell:?}");
    c.close("sage-2").await;
    c.close("sage-ws").await;
    w.stop().await;
}

/// Issue 13 (closing really ends a session): a cell that ignores SIGINT and has started a
/// process in a session of its own is ended by a close, and by the wall-clock limit, within
/// seconds, with a clear message; nothing of the user is left running.
#[tokio::test(flavor = "multi_thread")]
async fn a_stuck_cell_is_ended_by_close_and_by_the_wall_clock() {
    let mut l = limits();
    l.wall_clock_seconds = 6;
    let w = Worker::start(66000, l, 600).await;
    let mut c = w.client().await;
    let stuck = "import signal, subprocess, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nsubprocess.Popen(['setsid', 'sleep', '1000'])\nprint('stuck', flush=True)\nwhile True:\n    time.sleep(0.1)";
    c.open("ws-stuck", None).await;
    let opened = Instant::now();
    c.send(Request::Execute {
        session: "ws-stuck".into(),
        id: 1,
        code: stuck.into(),
    })
    .await;
    match c.next().await {
        Event::Stdout { data, .. } => assert_eq!(data, "stuck\n"),
        e => panic!("{e:?}"),
    }
    c.send(Request::Interrupt {
        session: "ws-stuck".into(),
    })
    .await;
    let still = tokio::time::timeout(Duration::from_millis(800), c.next()).await;
    assert!(
        still.is_err(),
        "SIGINT is ignored: the cell runs on ({still:?})"
    );
    let closing = Instant::now();
    c.send(Request::Close {
        session: "ws-stuck".into(),
    })
    .await;
    match c.next().await {
        Event::Done {
            id: 1,
            status,
            message,
            ..
        } => {
            assert_eq!(status, Status::Killed);
            assert!(message.unwrap().contains("closed while this cell ran"));
        }
        e => panic!("{e:?}"),
    }
    loop {
        if let Event::Closed { session, .. } = c.next().await {
            assert_eq!(session, "ws-stuck");
            break;
        }
    }
    let took = closing.elapsed();
    assert!(took < Duration::from_secs(5), "closed in {took:?}");
    assert!(
        opened.elapsed() < Duration::from_secs(6),
        "before the wall clock"
    );
    assert!(
        sage_agent::worker::sandbox::pids_of(66000).is_empty(),
        "nothing of the session is left, not even the process in its own session"
    );
    eprintln!("a stuck cell ended {took:?} after close");

    // The wall clock acts while a cell runs.
    c.open("ws-wall", None).await;
    let opened = Instant::now();
    c.send(Request::Execute {
        session: "ws-wall".into(),
        id: 2,
        code: stuck.into(),
    })
    .await;
    let done = loop {
        match c.next().await {
            Event::Done {
                id: 2,
                status,
                message,
                ..
            } => break (status, message.unwrap()),
            Event::Stdout { .. } => {}
            e => panic!("{e:?}"),
        }
    };
    let took = opened.elapsed();
    assert_eq!(done.0, Status::Killed);
    assert!(
        done.1.contains("wall-clock limit reached (6 s)"),
        "{}",
        done.1
    );
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(10),
        "{took:?}"
    );
    w.stop().await;
}

/// Issue 13 (a session is a small container): its own /tmp, /dev/shm, SysV IPC, /run and host
/// name, and a /proc that shows only its own processes. What one session leaves there is gone
/// for the next user of its uid; a symlink planted in /tmp catches nothing; another tenant's
/// processes are invisible; the journal and syslog cannot be reached.
#[tokio::test(flavor = "multi_thread")]
async fn sessions_share_no_tmp_shm_ipc_proc_or_journal() {
    let w = Worker::start(67000, limits(), 600).await;
    let mut c = w.client().await;
    c.open("ws-a", None).await;
    let plant = "import ctypes, os\n\
open('/tmp/secret', 'w').write('a-secret'); os.chmod('/tmp/secret', 0o600)\n\
open('/dev/shm/secret', 'w').write('a-secret')\n\
open(os.path.expanduser('~/victim.txt'), 'w').write('untouched')\n\
os.symlink(os.path.expanduser('~/victim.txt'), '/tmp/report.txt')\n\
libc = ctypes.CDLL(None, use_errno=True)\n\
libc.shmat.restype = ctypes.c_void_p\n\
shmid = libc.shmget(0x5a6e, 4096, 0o1000 | 0o600)\n\
assert shmid >= 0, ctypes.get_errno()\n\
ctypes.memmove(libc.shmat(shmid, None, 0), b'a-secret', 8)\n\
import subprocess\n\
subprocess.Popen(['python3', '-c', 'import time; time.sleep(60)', '--password=a-secret'])\n\
print(os.getpid(), os.getuid())";
    let cell = c.run("ws-a", 1, plant).await;
    assert_eq!(cell.status, Some(Status::Ok), "{}", cell.stderr);
    let mut it = cell.stdout.split_whitespace();
    let (a_pid, a_uid) = (
        it.next().unwrap().to_string(),
        it.next().unwrap().to_string(),
    );
    assert_eq!(a_uid, "67000");
    assert_eq!(
        a_pid, "2",
        "the engine is the second process of its own PID namespace"
    );
    // A's command line, secret and all, is visible on the machine (to root)...
    let on_machine = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .any(|c| String::from_utf8_lossy(&c).contains("--password=a-secret"));
    assert!(on_machine, "the control: the process runs");
    assert!(
        !std::path::Path::new("/tmp/report.txt").exists(),
        "the machine's /tmp is untouched"
    );

    // Another tenant, at the same time.
    c.open("ws-b", None).await;
    let probe = "import ctypes, os, socket\n\
print('tmp', os.path.exists('/tmp/secret'), os.path.exists('/dev/shm/secret'))\n\
open('/tmp/report.txt', 'w').write('captured?')\n\
cmds = [open('/proc/' + p + '/cmdline', 'rb').read() for p in os.listdir('/proc') if p.isdigit()]\n\
print('proc', any(b'a-secret' in c for c in cmds), sorted({os.stat('/proc/' + p).st_uid for p in os.listdir('/proc') if p.isdigit()}) == [os.getuid()])\n\
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
try:\n    s.connect('/dev/log'); print('log', 'reached')\nexcept OSError:\n    print('log', 'refused')\n\
print('journal', os.path.exists('/run/systemd/journal/socket'), os.path.exists('/run/dbus/system_bus_socket'))\n\
print('host', socket.gethostname())\n\
print('shm', ctypes.CDLL(None).shmget(0x5a6e, 0, 0))";
    let cell = c.run("ws-b", 2, probe).await;
    assert_eq!(cell.status, Some(Status::Ok), "{}", cell.stderr);
    assert_eq!(
        cell.stdout,
        "tmp False False\nproc False True\nlog refused\njournal False False\nhost sagews\nshm -1\n"
    );
    // The planted link caught nothing: A's file is as A left it.
    let cell = c
        .run(
            "ws-a",
            3,
            "import os\nprint(open(os.path.expanduser('~/victim.txt')).read())",
        )
        .await;
    assert_eq!(cell.stdout, "untouched\n");

    // A closes; the next session gets its uid and finds nothing of it.
    c.close("ws-a").await;
    c.open("ws-c", None).await;
    let cell = c
        .run(
            "ws-c",
            4,
            "import ctypes, os\nprint(os.getuid(), os.path.exists('/tmp/secret'), os.path.exists('/dev/shm/secret'), ctypes.CDLL(None).shmget(0x5a6e, 0, 0))",
        )
        .await;
    assert_eq!(cell.stdout, "67000 False False -1\n", "{}", cell.stderr);
    w.stop().await;
}

/// The session's cgroup counts all its processes together: three processes that each fit cannot
/// pass the memory limit together once the session's tmpfs files are counted; children share
/// one core's quota; their CPU time adds up to the session's limit; a cell that needs more memory
/// than the session has is ended with a message that names the memory limit.
#[tokio::test(flavor = "multi_thread")]
async fn session_limits_count_all_processes_together() {
    let mut l = limits();
    l.memory_mb = 512;
    l.processes = 64;
    l.cpu_seconds = 4;
    l.file_size_mb = 512;
    let w = Worker::start(68000, l, 600).await;
    let mut c = w.client().await;
    c.open("mem", None).await;
    let three = "import subprocess, sys\n\
hold = 'import sys, time; b = bytearray(140 << 20); b[::4096] = b\"x\" * len(b[::4096]); print(\"ok\", flush=True); time.sleep(2)'\n\
ps = [subprocess.Popen([sys.executable, '-c', hold], stdout=subprocess.PIPE) for _ in range(3)]\n\
print(sorted(p.wait() for p in ps))";
    // The control: 3 × 140 MB fit in 512 MB.
    let cell = c.run("mem", 1, three).await;
    assert_eq!(cell.stdout, "[0, 0, 0]\n", "{cell:?}");
    // 150 MB of files in the session's /tmp (tmpfs) count too: one of the three is killed.
    let cell = c
        .run(
            "mem",
            2,
            "open('/tmp/fill', 'wb').write(b'f' * (150 << 20))",
        )
        .await;
    assert_eq!(cell.status, Some(Status::Ok), "{cell:?}");
    let cell = c.run("mem", 3, three).await;
    assert!(
        cell.stdout.contains("-9"),
        "a process was killed at the session's memory limit: {cell:?}"
    );
    // A cell that needs more than the session's memory ends with a message that says so.
    let cell = c.run("mem", 4, "x = b'x' * (600 << 20)").await;
    assert_eq!(cell.status, Some(Status::Killed), "{cell:?}");
    let message = cell.message.unwrap_or_default();
    assert!(
        message.contains("memory limit reached (512 MB"),
        "{message}"
    );
    closed(&mut c, "mem").await;
    assert_eq!(
        leftovers(&w, 68000),
        Vec::<String>::new(),
        "the session ended whole"
    );

    // CPU: two busy children for 1.5 s of wall clock get one core between them (the session's
    // quota, 100 % of a core), not one each.
    c.open("cpu", None).await;
    let spin = "import os, subprocess, sys, time\n\
burn = 'import time\\nend = time.time() + 1.5\\nwhile time.time() < end: pass'\n\
ps = [subprocess.Popen([sys.executable, '-c', burn]) for _ in range(2)]\n\
[p.wait() for p in ps]\n\
t = os.times()\n\
print(round(t.children_user + t.children_system, 2))";
    let cell = c.run("cpu", 1, spin).await;
    let used: f64 = cell
        .stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{cell:?}"));
    eprintln!("two busy children for 1.5 s used {used} s of CPU together");
    assert!(
        used < 1.9,
        "the session's processes shared one core: {used} s"
    );
    // Children's CPU time adds up: the session ends at its limit (4 s) whoever spends it.
    let cell = c.run("cpu", 2, "import subprocess, sys\nburn = 'while True: pass'\nps = [subprocess.Popen([sys.executable, '-c', burn]) for _ in range(3)]\n[p.wait() for p in ps]").await;
    assert_eq!(cell.status, Some(Status::Killed), "{cell:?}");
    assert!(
        cell.message
            .as_deref()
            .unwrap_or("")
            .contains("CPU time limit reached (4 s of CPU for the session's processes together)"),
        "{cell:?}"
    );
    closed(&mut c, "cpu").await;
    assert_eq!(leftovers(&w, 68000), Vec::<String>::new());
    w.stop().await;
}

/// Outside its home, a session sees the machine read-only: nothing it writes there can outlive
/// it; the system calls no notebook needs are refused.
#[tokio::test(flavor = "multi_thread")]
async fn sessions_see_a_read_only_machine_and_a_narrow_kernel() {
    let w = Worker::start(69000, limits(), 600).await;
    let mut c = w.client().await;
    c.open("ro", None).await;
    let state = w.tmp.path().join("state");
    let probe = format!(
        "import ctypes, errno, os\n\
def tries(p):\n    try:\n        open(p, 'w').write('x'); return 'wrote'\n    except OSError as e:\n        return errno.errorcode[e.errno]\n\
print(tries('{state}/planted'), tries('/etc/planted'), tries('/var/planted'), tries(os.path.expanduser('~/mine')), tries('/tmp/mine'))\n\
libc = ctypes.CDLL(None, use_errno=True)\n\
def call(nr, *a):\n    r = libc.syscall(nr, *a)\n    return errno.errorcode.get(ctypes.get_errno(), '?') if r < 0 else 'ok'\n\
# keyctl, bpf, perf_event_open, userfaultfd, unshare(CLONE_NEWUSER), io_uring_setup, ptrace\n\
print(call(250, 0, 0, 0, 0), call(321, 0, 0, 0), call(298, 0, 0, 0, 0, 0), call(323, 0), call(272, 0x10000000), call(425, 1, 0), call(101, 0, 1, 0, 0))\n\
print(os.path.exists('/sys/fs/cgroup/memory'), os.listdir('/sys/fs/cgroup'))",
        state = state.display()
    );
    let cell = c.run("ro", 1, &probe).await;
    assert_eq!(cell.status, Some(Status::Ok), "{cell:?}");
    assert_eq!(
        cell.stdout,
        "EROFS EROFS EROFS wrote wrote\nEPERM EPERM EPERM EPERM EPERM EPERM EPERM\nFalse []\n",
        "{}",
        cell.stderr
    );
    assert!(!state.join("planted").exists());
    // Threads and processes still start (clone3 answers ENOSYS, the C library uses clone).
    let cell = c
        .run(
            "ro",
            2,
            "import threading, subprocess\nt = threading.Thread(target=print, args=('thread',)); t.start(); t.join()\nprint(subprocess.run(['echo', 'child'], capture_output=True, text=True).stdout.strip())",
        )
        .await;
    assert_eq!(cell.stdout, "thread\nchild\n", "{cell:?}");
    c.close("ro").await;
    w.stop().await;
}

/// The engine server of a worker: the process whose HOME is its directory in the state dir.
fn engine_server_pid(w: &Worker) -> Option<i32> {
    let home = format!(
        "HOME={}",
        w.tmp.path().join("state/engine-server").display()
    );
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid = e.file_name().to_str()?.parse::<i32>().ok()?;
        let env = std::fs::read(e.path().join("environ")).ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        // The server itself (a child of the worker process), not a session forked from it.
        let status = std::fs::read_to_string(e.path().join("status")).ok()?;
        let ppid = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))?
            .trim()
            .parse::<u32>()
            .ok()?;
        (Some(ppid) == w.pid()
            && env.split(|b| *b == 0).any(|v| v == home.as_bytes())
            && String::from_utf8_lossy(&cmd).contains("engine server"))
        .then_some(pid)
    })
}

/// Sessions forked from the engine server (issue 14): each starts from the server's modules and
/// changes only its own copy; the server holds nothing of the worker's key; killed under an
/// open session, that session ends with a clear message, and sessions are forked again once a
/// new server is up.
#[tokio::test(flavor = "multi_thread")]
async fn sessions_forked_from_the_engine_server() {
    let w = Worker::start(70000, limits(), 600).await;
    let key = w.tmp.path().join("worker/worker1.key");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let mut c = w.client().await;
    c.open("za", None).await;
    assert!(c.last_forked, "forked from the engine server");
    let cell = c
        .run(
            "za",
            1,
            "import numpy, json\nnumpy.sagews_mark = 1\njson.dumps = None\nx = 41",
        )
        .await;
    assert_eq!(cell.status, Some(Status::Ok), "{cell:?}");
    assert_eq!(c.run("za", 2, "x + 1").await.stdout, "42\n", "state kept");
    c.open("zb", None).await;
    assert!(c.last_forked);
    let cell = c
        .run(
            "zb",
            1,
            &format!(
                "import sys, json, numpy\nprint('numpy' in sys.modules, hasattr(numpy, 'sagews_mark'), json.dumps([1]), 'x' in dir())\ntry:\n    open('{}').read(); print('key read')\nexcept OSError as e:\n    print(type(e).__name__)",
                key.display()
            ),
        )
        .await;
    assert_eq!(
        cell.stdout, "True False [1] False\nPermissionError\n",
        "numpy came preloaded; A's changes are A's own; the key is out of reach: {cell:?}"
    );

    // The server holds nothing of the key: not in its environment or command line, no
    // descriptor or mapping of the key file.
    let server = engine_server_pid(&w).expect("the engine server runs");
    let key_text = std::fs::read_to_string(&key).unwrap();
    let key_body = key_text.lines().nth(1).unwrap();
    for f in ["environ", "cmdline", "maps"] {
        let text = String::from_utf8_lossy(&std::fs::read(format!("/proc/{server}/{f}")).unwrap())
            .into_owned();
        assert!(
            !text.contains(key_body) && !text.contains(&key.display().to_string()),
            "{f} of the engine server"
        );
    }
    let mut targets = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{server}/fd"))
        .unwrap()
        .flatten()
    {
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        assert_ne!(target, key, "a descriptor of the engine server");
        targets.push(target.display().to_string());
    }
    eprintln!("the engine server's descriptors: {targets:?}");
    let fds = std::fs::read_dir(format!("/proc/{server}/fd"))
        .unwrap()
        .count();
    assert!(
        fds <= 8,
        "the server holds its socket, stdio, a wakeup pipe and its poller: {fds}"
    );

    // Killed under open sessions: they end with a clear message, nothing of them is left.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Both sessions end, in either order.
    let mut ended = std::collections::BTreeMap::new();
    while ended.len() < 2 {
        if let Event::Closed { session, reason } = c.next().await {
            ended.insert(session, reason);
        }
    }
    for (session, reason) in &ended {
        assert!(
            reason.contains("the engine server stopped"),
            "{session}: {reason}"
        );
    }
    assert_eq!(leftovers(&w, 70000), Vec::<String>::new());
    assert_eq!(leftovers(&w, 70001), Vec::<String>::new());
    // A new server comes up by itself; sessions are forked from it again.
    w.wait_for_engine_server().await;
    assert_ne!(engine_server_pid(&w), Some(server), "a new engine server");
    c.open("zc", None).await;
    assert!(c.last_forked);
    assert_eq!(c.run("zc", 1, "1 + 1").await.stdout, "2\n");
    c.close("zc").await;
    w.stop().await;
}

/// `sage-agent worker` (the binary, as systemd runs it) exits within 2 s of SIGTERM, even with
/// a session whose cell ignores SIGTERM, and leaves nothing: no process of the session, no
/// session cgroup, no engine server (issue 15).
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_ends_the_worker_within_two_seconds() {
    require_root();
    let tmp = harness::state_tempdir();
    let state = State::open_at(&tmp.path().join("pki"), "wtest").unwrap();
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let config = harness::write_config(
        tmp.path(),
        &state,
        addr,
        73000,
        limits(),
        600,
        serde_json::json!({}),
    );
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sage-agent"))
        .args(["worker", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(tmp.path().join("worker.log")).unwrap())
        .spawn()
        .unwrap();
    let id = harness::creds(
        &state,
        &tmp.path().join("backend"),
        "backend1",
        &["backend"],
    );
    let id = Identity::load(&id.0, &id.1, &id.2).unwrap();
    let mut c = loop {
        match Client::connect(addr, &id).await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    c.open("stubborn", None).await;
    c.send(Request::Execute {
        session: "stubborn".into(),
        id: 1,
        code: "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\nwhile True: pass".into(),
    })
    .await;
    loop {
        if let Event::Stdout { data, .. } = c.next().await
            && data.contains("ready")
        {
            break;
        }
    }
    let (took, status) = harness::sigterm_and_wait(&mut child).await;
    eprintln!("the worker exited {took:?} after SIGTERM ({status})");
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    // Every background task (accept loop, announcing, autostop, engine server) finished first.
    let log = std::fs::read_to_string(tmp.path().join("worker.log")).unwrap();
    assert!(
        log.contains("stopped: ") && log.contains(" tasks finished"),
        "{log}"
    );
    assert_eq!(
        sage_agent::worker::sandbox::pids_of(73000),
        Vec::<i32>::new()
    );
    assert!(!session_cgroup(73000).exists());
    // The engine server went with it (its socket closed).
    let deadline = Instant::now() + Duration::from_secs(2);
    let server_gone = loop {
        let running = std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            std::fs::read(e.path().join("environ")).is_ok_and(|env| {
                env.split(|b| *b == 0).any(|v| {
                    v == format!("HOME={}", tmp.path().join("state/engine-server").display())
                        .as_bytes()
                })
            })
        });
        if !running || Instant::now() > deadline {
            break !running;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(server_gone, "the engine server outlived the worker");
}
