//! The backend agent against real PostgreSQL, memcached, nginx and worker processes (as root):
//! the whole flow through SockJS over websocket and over xhr-polling; two backends on one
//! database with memcached stopped midway; a worker killed under an open workspace; bad input.

#[path = "worker_harness.rs"]
mod harness;
#[path = "pg_harness.rs"]
mod pg;
#[path = "backend_harness.rs"]
mod stack;

use std::time::Duration;

use serde_json::{Value, json};
use stack::{Options, Stack, Transport};

fn opts(workers: usize, backends: usize, uid_base: u32) -> Options {
    Options {
        workers,
        backends,
        uid_base,
        backend_extra: json!({}),
        logd: false,
    }
}

fn git(dir: &std::path::Path, args: &[&str]) -> String {
    let o = std::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "git {args:?}: {o:?}");
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

async fn whole_flow(transport: Transport, uid_base: u32) {
    let s = Stack::start(Options {
        logd: true,
        ..opts(1, 1, uid_base)
    })
    .await;
    let name = format!("user{uid_base}");
    let pw = "a long password";
    let mut c = s.sock(0, transport, None).await;
    assert_eq!(
        c.call(json!({"op": "list"})).await["error"],
        "sign in first"
    );
    c.ok(json!({"op": "signup", "name": name, "password": pw}))
        .await;
    // Sign in again on a second connection (the first one stays signed up).
    let mut c2 = s.sock(0, transport, None).await;
    let bad = c2
        .call(json!({"op": "signin", "name": name, "password": "wrong password"}))
        .await;
    assert_eq!(bad["error"], "wrong account name or password");
    c2.ok(json!({"op": "signin", "name": name, "password": pw}))
        .await;
    assert_eq!(
        c2.ok(json!({"op": "whoami"})).await["account"],
        name.as_str()
    );
    c2.close().await;

    let ws = c.ok(json!({"op": "create", "name": "project"})).await["workspace"]
        .as_str()
        .unwrap()
        .to_string();
    let opened = c.ok(json!({"op": "open", "workspace": ws})).await;
    assert_eq!(opened["worker"], "worker1");
    let (out, err, status) = c.run(&ws, "2+2").await;
    assert_eq!((out.trim(), status.as_str()), ("4", "ok"), "stderr: {err}");

    c.run(&ws, "open('a.txt', 'w').write('one')").await;
    let r = c
        .ok(json!({"op": "save", "workspace": ws, "message": "first"}))
        .await;
    assert_eq!(r["changed"], true);
    c.run(&ws, "open('a.txt', 'w').write('two')").await;
    c.ok(json!({"op": "save", "workspace": ws, "message": "second"}))
        .await;
    let h = c.ok(json!({"op": "history", "workspace": ws})).await;
    let msgs: Vec<&str> = h["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert_eq!(msgs, ["second", "first"]);
    let first = h["history"][1]["commit"].as_str().unwrap().to_string();

    let r = c
        .ok(json!({"op": "revert", "workspace": ws, "commit": first}))
        .await;
    assert!(r["commit"].as_str().unwrap().len() == 40, "{r}");
    let (out, _, _) = c.run(&ws, "print(open('a.txt').read())").await;
    assert_eq!(
        out.trim(),
        "one",
        "the reverted file, in the reopened session"
    );
    let h = c.ok(json!({"op": "history", "workspace": ws})).await;
    assert_eq!(h["history"].as_array().unwrap().len(), 3, "{h}");
    assert!(
        h["history"][0]["message"]
            .as_str()
            .unwrap()
            .starts_with("Revert to ")
    );

    let p = c.ok(json!({"op": "publish", "workspace": ws})).await;
    assert_eq!(p["url"], format!("https://sagews.test/pub/{ws}/"));
    let got = s.get_published(&format!("/pub/{ws}/a.txt")).await;
    assert_eq!((got.status, got.body.as_slice()), (200, b"one".as_slice()));
    let l = c.ok(json!({"op": "list"})).await;
    assert_eq!(l["workspaces"][0]["published"], true, "{l}");

    // The bundle, downloaded with the sign-in cookie, clones with git.
    let cookie = s.cookie(0, &name, pw).await;
    let r = s
        .https(
            0,
            "GET",
            &format!("/api/workspaces/{ws}/bundle"),
            &[("Cookie", &cookie)],
            b"",
        )
        .await;
    assert_eq!(r.status, 200);
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("w.bundle"), &r.body).unwrap();
    git(d.path(), &["clone", "-q", "w.bundle", "clone"]);
    assert_eq!(
        std::fs::read_to_string(d.path().join("clone/a.txt")).unwrap(),
        "one"
    );
    assert_eq!(
        git(&d.path().join("clone"), &["rev-list", "--count", "HEAD"]),
        "3"
    );
    c.close().await;

    // What the account did is in logd, in order.
    let logged = s.logged("backend.audit", 8).await;
    let what: Vec<&str> = logged
        .iter()
        .map(|l| l.split(" {").next().unwrap())
        .collect();
    assert_eq!(
        what,
        [
            "account created",
            "signed in",
            "workspace created",
            "workspace saved",
            "workspace saved",
            "workspace reverted",
            "workspace published",
            "signed in"
        ],
        "{logged:#?}"
    );
    assert!(
        logged[0].contains(&format!("\"account\": \"{name}\"")),
        "{}",
        logged[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whole_flow_over_websocket() {
    whole_flow(Transport::Websocket, 71000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whole_flow_over_xhr_polling() {
    whole_flow(Transport::XhrPolling, 71100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_backends_share_the_database_and_survive_memcached_going_away() {
    let mut s = Stack::start(opts(1, 2, 71200)).await;
    let pw = "another password";
    let mut a = s.sock(0, Transport::Websocket, None).await;
    a.ok(json!({"op": "signup", "name": "bob", "password": pw}))
        .await;
    let ws = a.ok(json!({"op": "create", "name": "shared"})).await["workspace"]
        .as_str()
        .unwrap()
        .to_string();
    a.ok(json!({"op": "open", "workspace": ws})).await;
    a.run(&ws, "open('f.txt', 'w').write('from backend1')")
        .await;
    a.ok(json!({"op": "save", "workspace": ws, "message": "b1"}))
        .await;
    a.ok(json!({"op": "close", "workspace": ws})).await;

    // A cookie from backend1 is good on backend2 (sessions live in PostgreSQL).
    let cookie = s.cookie(0, "bob", pw).await;
    let mut b = s.sock(1, Transport::XhrPolling, Some(&cookie)).await;
    assert_eq!(b.ok(json!({"op": "whoami"})).await["account"], "bob");
    b.ok(json!({"op": "open", "workspace": ws})).await;
    let (out, _, _) = b.run(&ws, "print(open('f.txt').read())").await;
    assert_eq!(out.trim(), "from backend1");

    // Warm the cache, then take memcached away: nothing visible changes.
    let mut c = s.sock(1, Transport::Websocket, Some(&cookie)).await;
    assert_eq!(c.ok(json!({"op": "whoami"})).await["account"], "bob");
    let hits = s.metric(1, "session_cache_hits_total").await;
    assert!(
        hits >= 1,
        "the second session of the cookie came from memcached"
    );
    s.stop_memcached();
    let mut d = s.sock(1, Transport::Websocket, Some(&cookie)).await;
    assert_eq!(d.ok(json!({"op": "whoami"})).await["account"], "bob");
    let list = d.ok(json!({"op": "list"})).await;
    assert_eq!(list["workspaces"][0]["workspace"], ws.as_str());
    let (out, _, _) = b.run(&ws, "print(1 + 1)").await;
    assert_eq!(out.trim(), "2");
    s.start_memcached();
    b.ok(json!({"op": "save", "workspace": ws})).await;
    for x in [a, b, c, d] {
        x.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_worker_moves_the_workspace_to_another_from_the_last_save() {
    let mut s = Stack::start(opts(2, 1, 71300)).await;
    let mut c = s.sock(0, Transport::Websocket, None).await;
    c.ok(json!({"op": "signup", "name": "carol", "password": "a long password"}))
        .await;
    let ws = c.ok(json!({"op": "create", "name": "moving"})).await["workspace"]
        .as_str()
        .unwrap()
        .to_string();
    let first = c.ok(json!({"op": "open", "workspace": ws})).await["worker"]
        .as_str()
        .unwrap()
        .to_string();
    c.run(&ws, "open('f.txt', 'w').write('saved')").await;
    c.ok(json!({"op": "save", "workspace": ws})).await;
    c.run(&ws, "open('f.txt', 'w').write('not saved')").await;

    let i = s.workers.iter().position(|w| w.name == first).unwrap();
    s.workers[i].kill9();
    let lost = c.event("worker_lost").await;
    assert_eq!(lost["worker"], first.as_str());
    let moved = c.event("moved").await;
    let second = moved["worker"].as_str().unwrap().to_string();
    assert_ne!(second, first, "{moved}");
    let (out, _, status) = c.run(&ws, "print(open('f.txt').read())").await;
    assert_eq!((out.trim(), status.as_str()), ("saved", "ok"));
    assert_eq!(s.metric(0, "worker_failovers_total").await, 1);
    c.close().await;
}

/// A workspace holding symbolic links to the backend's own key directory and to /etc: publishing
/// through them (or them by name) publishes nothing, and the key never reaches nginx.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publish_never_follows_a_symbolic_link() {
    let s = Stack::start(opts(1, 1, 71700)).await;
    let key_dir = s.tmp.path().join("backend1");
    let key_name = std::fs::read_dir(&key_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.ends_with(".key"))
        .expect("the backend's key file");
    let mut c = s.sock(0, Transport::Websocket, None).await;
    c.ok(json!({"op": "signup", "name": "mallory", "password": "a long password"}))
        .await;
    let ws = c.ok(json!({"op": "create", "name": "links"})).await["workspace"]
        .as_str()
        .unwrap()
        .to_string();
    c.ok(json!({"op": "open", "workspace": ws})).await;
    let code = format!(
        "import os\nos.symlink({:?}, 'keys')\nos.symlink('/etc', 'etc')\nos.symlink('/etc/passwd', 'pw')\nopen('ok.txt', 'w').write('fine')",
        key_dir.display().to_string()
    );
    let (_, err, status) = c.run(&ws, &code).await;
    assert_eq!(status, "ok", "{err}");
    c.ok(json!({"op": "save", "workspace": ws, "message": "links"}))
        .await;
    for through in [
        format!("keys/{key_name}"),
        "keys".into(),
        "etc/passwd".into(),
        "pw".into(),
    ] {
        let r = c
            .call(json!({"op": "publish", "workspace": ws, "path": through}))
            .await;
        assert_eq!(r["ok"], false, "{through}: {r}");
        let e = r["error"].as_str().unwrap();
        assert!(
            e.contains("no file or directory") || e.contains("symbolic link"),
            "{through}: {e}"
        );
        let got = s.get_published(&format!("/pub/{ws}/{key_name}")).await;
        assert_eq!(got.status, 404, "{through}: nothing published");
    }
    // The whole workspace: the regular file only.
    let p = c.ok(json!({"op": "publish", "workspace": ws})).await;
    assert_eq!(p["files"], json!(["ok.txt"]), "{p}");
    assert_eq!(
        s.get_published(&format!("/pub/{ws}/ok.txt")).await.status,
        200
    );
    for leaked in [format!("keys/{key_name}"), "etc/passwd".into(), "pw".into()] {
        let got = s.get_published(&format!("/pub/{ws}/{leaked}")).await;
        assert_eq!(got.status, 404, "{leaked}");
    }
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_refused_with_a_clear_error_and_nothing_half_stored() {
    let s = Stack::start(Options {
        backend_extra: json!({"max_sessions": 6, "max_message_bytes": 10000}),
        ..opts(1, 1, 71400)
    })
    .await;
    let pw = "a long password";
    let mut eve = s.sock(0, Transport::Websocket, None).await;
    eve.ok(json!({"op": "signup", "name": "eve", "password": pw}))
        .await;
    let mut dan = s.sock(0, Transport::XhrPolling, None).await;
    dan.ok(json!({"op": "signup", "name": "dan", "password": pw}))
        .await;
    let dans = dan.ok(json!({"op": "create", "name": "private"})).await["workspace"]
        .as_str()
        .unwrap()
        .to_string();

    // Another account's workspace: refused as if it did not exist.
    for op in ["open", "history", "delete", "publish", "rename"] {
        let r = eve
            .call(json!({"op": op, "workspace": dans, "name": "mine", "commit": "abcd"}))
            .await;
        assert_eq!(r["ok"], false, "{op}: {r}");
        assert_eq!(
            r["error"],
            format!("no workspace {dans:?} in your account"),
            "{op}"
        );
    }
    let r = eve
        .call(json!({"op": "execute", "workspace": dans, "code": "1"}))
        .await;
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("not open on this connection"),
        "{r}"
    );

    // Oversized and invalid messages: an error reply, and the session goes on.
    eve.send_text(&"x".repeat(20_000)).await;
    let r = eve.until(|v| v["ok"] == false && v["id"].is_null()).await;
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("the limit is 10000 bytes"),
        "{r}"
    );
    eve.send_text("{not json").await;
    let r = eve.until(|v| v["ok"] == false && v["id"].is_null()).await;
    assert!(
        r["error"].as_str().unwrap().starts_with("invalid JSON"),
        "{r}"
    );
    eve.ok(json!({"op": "ping"})).await;
    let r = eve.call(json!({"op": "format_disk"})).await;
    assert_eq!(r["error"], "unknown op \"format_disk\"");

    // SQL metacharacters are names like any other.
    let evil = "x'); DROP TABLE workspaces; --";
    let id = eve.ok(json!({"op": "create", "name": evil})).await["workspace"].clone();
    let l = eve.ok(json!({"op": "list"})).await;
    assert_eq!(l["workspaces"][0]["name"], evil);
    assert_eq!(l["workspaces"][0]["workspace"], id);
    let r = eve
        .call(json!({"op": "signup", "name": "a'; DROP TABLE accounts; --", "password": pw}))
        .await;
    assert!(
        r["error"].as_str().unwrap().contains("lowercase letters"),
        "{r}"
    );
    assert_eq!(s.pg.query("sagews", "SELECT count(*) FROM accounts"), "2");
    assert_eq!(s.pg.query("sagews", "SELECT count(*) FROM workspaces"), "2");

    // `../` in a publish path.
    eve.ok(json!({"op": "open", "workspace": id})).await;
    eve.run(id.as_str().unwrap(), "open('p.txt', 'w').write('x')")
        .await;
    eve.ok(json!({"op": "save", "workspace": id})).await;
    for bad in ["../../etc", "/etc/passwd", ".git/config"] {
        let r = eve
            .call(json!({"op": "publish", "workspace": id, "path": bad}))
            .await;
        assert!(
            r["error"]
                .as_str()
                .unwrap()
                .contains("must be relative and inside the workspace"),
            "{r}"
        );
    }

    // Bundles over HTTPS: corrupt, huge, and a good one.
    let cookie = s.cookie(0, "eve", pw).await;
    let before = s.pg.query("sagews", "SELECT count(*) FROM workspaces");
    let h = [("Cookie", cookie.as_str())];
    let r = s
        .https(
            0,
            "POST",
            "/api/workspaces?name=corrupt",
            &h,
            b"# v2 git bundle\ngarbage",
        )
        .await;
    assert_eq!(r.status, 400);
    let body = String::from_utf8_lossy(&r.body);
    assert!(body.contains("not a valid git bundle"), "{body}");
    let huge = vec![b'x'; 3 << 20];
    let r = s
        .https(0, "POST", "/api/workspaces?name=huge", &h, &huge)
        .await;
    assert_eq!(r.status, 413);
    assert!(String::from_utf8_lossy(&r.body).contains("over the limit of 2 MB"));
    let r = s
        .https(0, "POST", "/api/workspaces?name=nocookie", &[], b"x")
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(
        s.pg.query("sagews", "SELECT count(*) FROM workspaces"),
        before,
        "nothing stored"
    );
    let d = tempfile::tempdir().unwrap();
    git(d.path(), &["init", "-q", "-b", "main"]);
    std::fs::write(d.path().join("up.txt"), "uploaded").unwrap();
    git(d.path(), &["add", "-A"]);
    git(
        d.path(),
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-q",
            "-m",
            "up",
        ],
    );
    git(d.path(), &["bundle", "create", "-q", "u.bundle", "--all"]);
    let bundle = std::fs::read(d.path().join("u.bundle")).unwrap();
    let r = s
        .https(0, "POST", "/api/workspaces?name=uploaded", &h, &bundle)
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let up: Value = serde_json::from_slice(&r.body).unwrap();
    let up = up["workspace"].as_str().unwrap();
    eve.ok(json!({"op": "open", "workspace": up})).await;
    let (out, _, _) = eve.run(up, "print(open('up.txt').read())").await;
    assert_eq!(out.trim(), "uploaded");

    // The workspace cap (5 per account in the test config).
    for i in 0..3 {
        eve.ok(json!({"op": "create", "name": format!("n{i}")}))
            .await;
    }
    let r = eve
        .call(json!({"op": "create", "name": "one too many"}))
        .await;
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("the most an account may have (5)"),
        "{r}"
    );

    // SockJS: a session id that does not exist, a broken frame.
    let r = s
        .https(
            0,
            "POST",
            "/sockjs/000/nosuchsession/xhr_send",
            &[],
            b"[\"x\"]",
        )
        .await;
    assert_eq!(r.status, 404);
    let r = dan.send_raw("[not json").await;
    assert_eq!(r, 500);

    // The worker port takes worker certificates only: HAProxy's is refused in the handshake.
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(&s.backends[0].config).unwrap()).unwrap();
    let wl = config["worker_listen"].as_str().unwrap();
    let tcp = tokio::net::TcpStream::connect(wl).await.unwrap();
    let cfg = s.client_identity().client_config(&["backend"]).unwrap();
    let name = rustls::pki_types::ServerName::try_from("backend1").unwrap();
    let announced = async {
        let mut tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await?;
        let register = sage_agent::proto::Announce::Register {
            host: "impostor".into(),
            address: "127.0.0.1:1".into(),
            capacity: 100,
            engines: vec!["python3".into()],
        };
        sage_agent::frame::write(&mut tls, &register)
            .await
            .map_err(std::io::Error::other)?;
        sage_agent::frame::read::<sage_agent::proto::AnnounceReply, _>(
            &mut tls,
            1024,
            Duration::from_secs(5),
        )
        .await
        .map_err(std::io::Error::other)
    }
    .await;
    assert!(
        announced.is_err(),
        "a non-worker was acknowledged: {announced:?}"
    );
    assert_eq!(s.metric(0, "healthy_workers").await, 1);

    // The session cap (6 in the test config): the excess gets a close frame that says why.
    let mut extra = Vec::new();
    let mut refused = None;
    for _ in 0..8 {
        let r = s
            .https(
                0,
                "POST",
                &format!("/sockjs/000/cap{}/xhr", extra.len()),
                &[],
                b"",
            )
            .await;
        let body = String::from_utf8_lossy(&r.body).to_string();
        if body.starts_with("c[") {
            refused = Some(body);
            break;
        }
        extra.push(body);
    }
    let refused = refused.expect("the cap refuses a session");
    assert!(
        refused.contains("2000") && refused.contains("this backend is full"),
        "{refused}"
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    eve.close().await;
}

/// Reads a chunked response body until `needle` shows up; returns everything read so far.
async fn read_chunks_until<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    seen: &mut String,
    needle: &str,
) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    while !seen.contains(needle) {
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(30), r.read_line(&mut line))
            .await
            .expect("a chunk in time")
            .unwrap();
        let n = usize::from_str_radix(line.trim(), 16).expect("a chunk size");
        assert!(n > 0, "the stream ended before {needle:?}: {seen}");
        let mut buf = vec![0; n + 2];
        r.read_exact(&mut buf).await.unwrap();
        seen.push_str(std::str::from_utf8(&buf[..n]).unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn xhr_streaming_carries_frames_after_its_prelude() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let s = Stack::start(opts(0, 1, 71500)).await;
    let session = "streamtest";
    let open = |path: String| {
        let s = &s;
        async move {
            let mut c = tokio::io::BufReader::new(s.tls(0).await.unwrap());
            let req = format!(
                "POST {path} HTTP/1.1\r\nHost: sagews.test\r\nOrigin: https://sagews.test\r\nContent-Length: 0\r\n\r\n"
            );
            c.get_mut().write_all(req.as_bytes()).await.unwrap();
            let mut head = String::new();
            loop {
                let mut l = String::new();
                c.read_line(&mut l).await.unwrap();
                if l == "\r\n" {
                    break;
                }
                head.push_str(&l);
            }
            (c, head)
        }
    };
    let (mut stream, head) = open(format!("/sockjs/000/{session}/xhr_streaming")).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("access-control-allow-origin: https://sagews.test"),
        "{head}"
    );
    let mut seen = String::new();
    read_chunks_until(&mut stream, &mut seen, "o\n").await;
    assert_eq!(seen, format!("{}\no\n", "h".repeat(2048)));

    // A second streaming request on the same session is told another one is open.
    let r = s
        .https(
            0,
            "POST",
            &format!("/sockjs/000/{session}/xhr_streaming"),
            &[],
            b"",
        )
        .await;
    let body = String::from_utf8_lossy(&r.body);
    assert!(
        body.ends_with("c[2010,\"Another connection still open\"]\n"),
        "{body}"
    );

    let msg = serde_json::to_string(&[json!({"id": 7, "op": "ping"}).to_string()]).unwrap();
    let r = s
        .https(
            0,
            "POST",
            &format!("/sockjs/000/{session}/xhr_send"),
            &[],
            msg.as_bytes(),
        )
        .await;
    assert_eq!(r.status, 204);
    let mut seen = String::new();
    read_chunks_until(&mut stream, &mut seen, "\n").await;
    let frame = seen.trim_end();
    assert!(frame.starts_with("a["), "{frame}");
    let msgs: Vec<String> = serde_json::from_str(&frame[1..]).unwrap();
    let reply: Value = serde_json::from_str(&msgs[0]).unwrap();
    assert_eq!(
        (reply["id"].as_u64(), reply["pong"].as_bool()),
        (Some(7), Some(true))
    );

    // The info route and a preflight, as sockjs-client asks them.
    let r = s.https(0, "GET", "/sockjs/info", &[], b"").await;
    let info: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(info["websocket"], true);
    assert!(r.header("cache-control").unwrap().contains("no-store"));
    let r = s
        .https(
            0,
            "OPTIONS",
            "/sockjs/000/x/xhr",
            &[("Origin", "https://sagews.test")],
            b"",
        )
        .await;
    assert_eq!(r.status, 204);
    assert!(
        r.header("access-control-allow-methods")
            .unwrap()
            .contains("POST")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_standard_sockjs_client_works_over_each_transport_through_haproxy() {
    let js = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/js");
    assert!(
        js.join("node_modules/sockjs-client").is_dir(),
        "sockjs-client is not installed: `npm ci --prefix tests/js` (./test does it)"
    );
    let mut s = Stack::start(opts(1, 1, 71600)).await;
    let port = s.start_haproxy();
    for (i, transport) in ["websocket", "xhr-streaming", "xhr-polling"]
        .iter()
        .enumerate()
    {
        let o = tokio::process::Command::new("node")
            .arg(js.join("sockjs_client.js"))
            .arg(format!("https://127.0.0.1:{port}/sockjs"))
            .arg(transport)
            .arg(format!("js-user-{i}"))
            .env("NODE_EXTRA_CA_CERTS", s.ca_file())
            .current_dir(&js)
            .output()
            .await
            .expect("node installed");
        let (out, err) = (
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
        );
        assert!(
            o.status.success(),
            "{transport}: {out}\n{err}\n{}",
            s.log("backend1")
        );
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["transport"], *transport, "{v}");
        assert_eq!(v["result"]["status"], "ok", "{v}");
        assert_eq!(v["result"]["out"].as_str().unwrap().trim(), "4", "{v}");
    }
}
