//! The backend agent against real PostgreSQL, memcached, nginx and worker processes (as root):
//! the whole flow through SockJS over websocket and over xhr-polling; two backends on one
//! database with memcached stopped midway; a worker killed under an open workspace; bad input.

use sagews_testkit::stack;

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

/// A new account `name` (password "a long password") on backend 0 over a websocket, with a new
/// workspace `ws_name`: the session and the workspace's id. `open` opens it too.
async fn account_with_workspace(
    s: &Stack,
    name: &str,
    ws_name: &str,
    open: bool,
) -> (stack::Sock, String) {
    let mut c = s.sock(0, Transport::Websocket, None).await;
    c.ok(json!({"op": "signup", "name": name, "password": "a long password"}))
        .await;
    let ws = c.ok(json!({"op": "create", "name": ws_name})).await["workspace"]
        .as_str()
        .unwrap()
        .to_string();
    if open {
        c.ok(json!({"op": "open", "workspace": ws})).await;
    }
    (c, ws)
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
    let logged = s.logged("backend.audit", 9).await;
    let what: Vec<&str> = logged
        .iter()
        .map(|l| l.split(" {").next().unwrap())
        .collect();
    assert_eq!(
        what,
        [
            "account created",
            "sign-in failed",
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
    let (mut c, ws) = account_with_workspace(&s, "mallory", "links", true).await;
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
            draining: false,
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
    s.start_haproxy();
    for (i, transport) in ["websocket", "xhr-streaming", "xhr-polling"]
        .iter()
        .enumerate()
    {
        let o = tokio::process::Command::new("node")
            .arg(js.join("sockjs_client.js"))
            .arg(format!("https://{}/sockjs", s.haproxy_addr()))
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

/// Issue 11: only the site's own origin may use a person's cookie. Every SockJS transport and
/// every REST route refuses a foreign or `null` Origin, or a cross-site fetch, and changes
/// nothing; a `text/plain` sign-in is refused; the site's own origin works.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn foreign_origins_are_refused_on_every_transport_and_route() {
    let s = Stack::start(opts(1, 1, 71800)).await;
    let pw = "a long password";
    let mut c = s.sock(0, Transport::Websocket, None).await;
    c.ok(json!({"op": "signup", "name": "olivia", "password": pw}))
        .await;
    let ws = c.ok(json!({"op": "create", "name": "mine"})).await["workspace"]
        .as_str()
        .unwrap()
        .to_string();
    c.close().await;
    let cookie = s.cookie(0, "olivia", pw).await;
    let accounts = || s.pg.query("sagews", "SELECT count(*) FROM accounts");
    let before = accounts();
    let creds = json!({"name": "mallory", "password": pw}).to_string();
    let foreign: [&[(&str, &str)]; 3] = [
        &[("Origin", "https://evil.example")],
        &[("Origin", "null")],
        &[("Sec-Fetch-Site", "cross-site")],
    ];
    for f in foreign {
        let mut h: Vec<(&str, &str)> = f.to_vec();
        h.push(("Cookie", &cookie));
        h.push(("Content-Type", "application/json"));
        let routes = [
            ("POST", "/sockjs/000/abcdef/xhr".to_string(), ""),
            ("POST", "/sockjs/000/abcdeg/xhr_streaming".into(), ""),
            ("POST", "/sockjs/000/abcdef/xhr_send".into(), "[\"{}\"]"),
            ("GET", "/sockjs/info".into(), ""),
            ("OPTIONS", "/sockjs/info".into(), ""),
            ("OPTIONS", "/sockjs/000/abcdef/xhr".into(), ""),
            ("POST", "/api/signin".into(), creds.as_str()),
            ("POST", "/api/signup".into(), creds.as_str()),
            ("POST", "/api/signout".into(), ""),
            ("GET", "/api/whoami".into(), ""),
            ("GET", format!("/api/workspaces/{ws}/bundle"), ""),
            ("POST", "/api/workspaces?name=x".into(), "bundle"),
        ];
        for (method, path, body) in &routes {
            let r = s.https(0, method, path, &h, body.as_bytes()).await;
            assert_eq!(r.status, 403, "{f:?} {method} {path}");
            assert!(
                r.header("access-control-allow-origin").is_none(),
                "{f:?} {method} {path}: no CORS grant"
            );
        }
        let e = s
            .sock_with(0, Transport::Websocket, &h)
            .await
            .err()
            .expect("a foreign websocket upgrade is refused");
        assert_eq!(e, "HTTP 403", "{f:?}");
    }
    // Nothing changed: no account made, the cookie still signed in.
    assert_eq!(accounts(), before);
    let r = s
        .https(0, "GET", "/api/whoami", &[("Cookie", &cookie)], b"")
        .await;
    assert_eq!(r.status, 200, "the foreign sign-out did nothing");
    // A cross-site form can only send text/plain: refused without a JSON content type.
    let r = s
        .https(
            0,
            "POST",
            "/api/signin",
            &[("Content-Type", "text/plain")],
            json!({"name": "olivia", "password": pw})
                .to_string()
                .as_bytes(),
        )
        .await;
    assert_eq!(r.status, 415);
    // The site's own origin: granted, with credentials, on info and on a websocket.
    let own = [
        ("Origin", "https://sagews.test"),
        ("Cookie", cookie.as_str()),
    ];
    let r = s.https(0, "GET", "/sockjs/info", &own, b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://sagews.test")
    );
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    let mut c = s.sock_with(0, Transport::Websocket, &own).await.unwrap();
    assert_eq!(c.ok(json!({"op": "whoami"})).await["account"], "olivia");
    c.close().await;
    // Credentials are small: a huge sign-in body is refused, not read into memory.
    let big = format!(
        "{{\"name\": \"{}\", \"password\": \"x\"}}",
        "n".repeat(64 << 10)
    );
    let r = s
        .https(
            0,
            "POST",
            "/api/signin",
            &[("Content-Type", "application/json")],
            big.as_bytes(),
        )
        .await;
    assert_eq!(r.status, 413);
    // A polling session opened with a cookie answers that cookie only: its id is not enough.
    let path = "/sockjs/000/cookiebound/xhr";
    let mine = [("Cookie", cookie.as_str())];
    let r = s.https(0, "POST", path, &mine, b"").await;
    assert_eq!(r.body, b"o\n");
    let send = "/sockjs/000/cookiebound/xhr_send";
    let ping = serde_json::to_string(&[json!({"id": 1, "op": "whoami"}).to_string()]).unwrap();
    for other in [vec![], vec![("Cookie", "sagews_session=someone-else")]] {
        let r = s.https(0, "POST", send, &other, ping.as_bytes()).await;
        assert_eq!(r.status, 404, "{other:?}");
    }
    let r = s.https(0, "POST", send, &mine, ping.as_bytes()).await;
    assert_eq!(r.status, 204);
}

/// Issue 11: failed sign-ins are limited per account and per client address (the address
/// HAProxy saw: a client cannot forge it), sign-ups per address; past a limit even the right
/// password gets 429 with Retry-After, over REST and over SockJS; refusals go to logd.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sign_ins_are_limited_per_account_and_per_address() {
    let mut s = Stack::start(Options {
        logd: true,
        backend_extra: json!({"accounts": {"signup": true, "max_workspaces": 5, "session_days": 7,
            "min_password_length": 8, "failed_signins_per_account": 3,
            "failed_signins_per_address": 6, "signups_per_address": 3,
            "limit_window_seconds": 600}}),
        ..opts(1, 1, 71900)
    })
    .await;
    let port = s.start_haproxy();
    let pw = "the right password";
    let json_ct = ("Content-Type", "application/json");
    let post = async |s: &Stack, path: &str, name: &str, password: &str, forged: &str| {
        let body = json!({"name": name, "password": password}).to_string();
        s.haproxy_https(
            port,
            "POST",
            path,
            &[json_ct, ("X-Sagews-Client", forged)],
            body.as_bytes(),
        )
        .await
    };
    assert_eq!(
        post(&s, "/api/signup", "victim", pw, "10.0.0.1")
            .await
            .status,
        200
    );
    // Three wrong passwords, each from a different forged address.
    for i in 0..3 {
        let r = post(
            &s,
            "/api/signin",
            "victim",
            "wrong guess",
            &format!("10.0.0.{i}"),
        )
        .await;
        assert_eq!(r.status, 401, "attempt {i}");
    }
    // Now even the right password waits.
    let r = post(&s, "/api/signin", "victim", pw, "10.0.0.9").await;
    assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
    let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=600).contains(&wait), "{wait}");
    assert!(String::from_utf8_lossy(&r.body).contains("failed sign-ins for this account"));
    // Over SockJS too (the account's limit holds on every backend path).
    let mut c = s.sock(0, Transport::Websocket, None).await;
    let r = c
        .call(json!({"op": "signin", "name": "victim", "password": pw}))
        .await;
    assert_eq!(r["status"], 429, "{r}");
    assert!(r["retry_after"].as_u64().unwrap() > 0, "{r}");
    // Per address: the forged header was replaced by HAProxy, so all failures count for
    // 127.0.0.1: three more (on unknown accounts) reach the address's limit of six.
    for i in 0..3 {
        let r = post(&s, "/api/signin", &format!("nobody{i}"), "x", "192.0.2.7").await;
        assert_eq!(r.status, 401, "{i}");
    }
    let r = post(&s, "/api/signin", "someone-else", "x", "192.0.2.8").await;
    assert_eq!(r.status, 429);
    assert!(String::from_utf8_lossy(&r.body).contains("from your address"));
    // Sign-ups per address: three in the window (one above), then 429.
    for i in 0..2 {
        let r = post(&s, "/api/signup", &format!("new{i}"), pw, "10.1.1.1").await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
    let r = post(&s, "/api/signup", "new-three", pw, "10.1.1.2").await;
    assert_eq!(r.status, 429);
    assert_eq!(s.pg.query("sagews", "SELECT count(*) FROM accounts"), "3");
    // logd has the failures and the refusals, with the real address.
    let logged = s.logged("backend.audit", 12).await;
    let throttled: Vec<&String> = logged
        .iter()
        .filter(|l| l.starts_with("sign-in throttled"))
        .collect();
    assert!(throttled.len() >= 3, "{logged:#?}");
    let failed: Vec<&String> = logged
        .iter()
        .filter(|l| l.starts_with("sign-in failed"))
        .collect();
    assert!(
        failed.iter().all(|l| l.contains("127.0.0.1")),
        "{failed:#?}"
    );
    assert!(
        !logged
            .iter()
            .any(|l| l.contains("10.0.0.") || l.contains("192.0.2."))
    );
    c.close().await;
    drop(s);
}

/// Issue 11: a browser that drops an xhr-polling or xhr-streaming request (a reload, a flaky
/// network) through HAProxy is served again within seconds, not refused with 2010 until a
/// heartbeat; a stream dropped for good ends its session within about the disconnect delay.
/// Also the protocol's details: OPTIONS carries Expires, malformed paths are 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_request_is_replaced_within_seconds() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = Stack::start(opts(0, 1, 72100)).await;
    let port = s.start_haproxy();
    let ping = serde_json::to_string(&[json!({"id": 1, "op": "ping"}).to_string()]).unwrap();
    let send_ping = async |base: &str| {
        let r = s
            .haproxy_https(
                port,
                "POST",
                &format!("{base}/xhr_send"),
                &[],
                ping.as_bytes(),
            )
            .await;
        assert_eq!(r.status, 204);
    };
    let raw = async |path: &str| {
        // A request whose connection is dropped before any answer.
        let mut c = s.via_haproxy(port).await;
        let req = format!("POST {path} HTTP/1.1\r\nHost: sagews.test\r\nContent-Length: 0\r\n\r\n");
        c.get_mut().write_all(req.as_bytes()).await.unwrap();
        c
    };
    // Polling.
    let base = "/sockjs/000/dropped-poll";
    let r = s
        .haproxy_https(port, "POST", &format!("{base}/xhr"), &[], b"")
        .await;
    assert_eq!(r.body, b"o\n");
    let c = raw(&format!("{base}/xhr")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = std::time::Instant::now();
    send_ping(base).await;
    let r = s
        .haproxy_https(port, "POST", &format!("{base}/xhr"), &[], b"")
        .await;
    let body = String::from_utf8_lossy(&r.body);
    assert!(body.starts_with("a[") && body.contains("pong"), "{body}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // Streaming: the first request opens the session; dropped, then a new one is served.
    let base = "/sockjs/000/dropped-stream";
    let mut c = raw(&format!("{base}/xhr_streaming")).await;
    let mut buf = vec![0u8; 4096];
    let n = c.read(&mut buf).await.unwrap();
    assert!(n > 0);
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = std::time::Instant::now();
    let mut c = raw(&format!("{base}/xhr_streaming")).await;
    send_ping(base).await;
    let mut got = String::new();
    while !got.contains("pong") && !got.contains("c[") {
        let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf))
            .await
            .expect("stream data")
            .unwrap();
        assert!(n > 0, "stream ended: {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(got.contains("pong") && !got.contains("2010"), "{got}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // Dropped for good: the session ends after the disconnect delay (5 s), not a heartbeat.
    drop(c);
    let t = std::time::Instant::now();
    while s.metric(0, "sockjs_sessions").await > 1 {
        assert!(
            t.elapsed() < Duration::from_secs(9),
            "the dropped stream's session lingers"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Protocol details.
    let r = s.https(0, "OPTIONS", "/sockjs/000/abc/xhr", &[], b"").await;
    assert_eq!(r.status, 204);
    let expires = r.header("expires").expect("Expires on OPTIONS");
    assert!(expires.ends_with(" GMT"), "{expires}");
    for bad in [
        "/sockjs/a.b/c/xhr",
        "/sockjs/000/a./xhr",
        "/sockjs//x/xhr",
        "/sockjs/000/abc/xhr",
    ] {
        assert_eq!(
            s.https(0, "GET", bad, &[], b"").await.status,
            404,
            "GET {bad}"
        );
    }
    assert_eq!(
        s.https(0, "POST", "/sockjs/a.b/c/xhr", &[], b"")
            .await
            .status,
        404
    );
}

/// Issue 11: a browser that stops reading while cells print cannot grow the backend: a cell's
/// output is cut at its cap with a `truncated` event, a session with too much waiting is
/// closed (3001), and the memory comes back. Figures are printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_browser_that_stops_reading_cannot_grow_the_backend() {
    let s = Stack::start(Options {
        backend_extra: json!({"max_cell_output_bytes": 1 << 20, "max_queued_bytes": 3 << 20}),
        ..opts(1, 1, 72200)
    })
    .await;
    let (mut c, ws) = account_with_workspace(&s, "reader", "loud", true).await;
    // A reading browser: a cell printing 8 MB shows 1 MB, then `truncated`, then `done`.
    let r = c
        .ok(json!({"op": "execute", "workspace": ws, "code": "for i in range(8000): print('y' * 999)"}))
        .await;
    let id = r["id"].clone();
    let (mut shown, mut truncated) = (0usize, false);
    loop {
        let v = c.until(|v| v["id"] == id && v.get("event").is_some()).await;
        match v["event"].as_str().unwrap() {
            "stdout" => shown += v["data"].as_str().unwrap().len(),
            "truncated" => {
                truncated = true;
                assert!(
                    v["message"].as_str().unwrap().contains("output truncated"),
                    "{v}"
                );
            }
            "done" => break,
            e => panic!("{e}: {v}"),
        }
    }
    assert!(
        truncated && shown <= 1 << 20 && shown > 512 << 10,
        "{shown}"
    );
    c.close().await;
}

/// Issue 11: a browser that stops reading while its cells print: what waits for it is bounded
/// (the session is closed with 3001 past `max_queued_bytes`) and the memory comes back.
/// Figures are printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_browser_that_stops_reading_is_closed_and_its_memory_returns() {
    let s = Stack::start(Options {
        backend_extra: json!({"max_queued_bytes": 3 << 20}),
        ..opts(1, 1, 72300)
    })
    .await;
    let pw = "a long password";
    let (c, ws) = account_with_workspace(&s, "sleeper", "loud", false).await;
    c.close().await;
    // Six cells of 8 MB each (4 MB shown of each: the default cap), nothing read: more than
    // the kernel's socket buffers hold, so the backend's queue fills.
    let base = s.backend_rss_kib(0);
    let cookie = s.cookie(0, "sleeper", pw).await;
    let mut c = s.sock(0, Transport::Websocket, Some(&cookie)).await;
    c.ok(json!({"op": "open", "workspace": ws})).await;
    for i in 0..6 {
        c.send_text(
            &json!({"id": 100 + i, "op": "execute", "workspace": ws,
                "code": "for i in range(8000): print('z' * 999)"})
            .to_string(),
        )
        .await;
    }
    let mut peak = base;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        peak = peak.max(s.backend_rss_kib(0));
    }
    // Reading now: what was in flight, then the close frame.
    let mut frames = 0;
    while c.frame().await != "c" {
        frames += 1;
        assert!(frames < 100_000);
    }
    let closed = c.closed.clone().unwrap();
    assert_eq!(closed[0], 3001, "{closed}");
    assert!(
        closed[1].as_str().unwrap().contains("did not read"),
        "{closed}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = s.backend_rss_kib(0);
    println!(
        "backend resident memory: {} MB before, {} MB at most while a browser did not read 24 MB of output, {} MB after",
        base / 1024,
        peak / 1024,
        after / 1024
    );
    assert!(peak < base + 48 * 1024, "peak {peak} KiB from {base} KiB");
    assert!(after < base + 8 * 1024, "after {after} KiB from {base} KiB");
}

/// Issue 12: the file ops a browser's editor needs, done by the worker as the workspace's user:
/// write, list, read, remove; the path rules of publish; no symbolic link followed; size and
/// text limits with clear errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn files_are_edited_as_the_workspace_user() {
    let s = Stack::start(opts(1, 1, 72400)).await;
    let (mut c, ws) = account_with_workspace(&s, "editor", "files", true).await;
    let w = c
        .ok(json!({"op": "write", "workspace": ws, "path": "notes/a.txt", "data": "hello ✓"}))
        .await;
    assert_eq!(w["size"], "hello ✓".len());
    let l = c.ok(json!({"op": "files", "workspace": ws})).await;
    assert_eq!(
        l["files"],
        json!([{"path": "notes/a.txt", "size": 9}]),
        "{l}"
    );
    let r = c
        .ok(json!({"op": "read", "workspace": ws, "path": "./notes//a.txt"}))
        .await;
    assert_eq!(
        (r["path"].as_str(), r["data"].as_str()),
        (Some("notes/a.txt"), Some("hello ✓"))
    );
    // The engine sees the file, owned by the workspace's user.
    let (out, err, _) = c
        .run(
            &ws,
            "import os\nprint(open('notes/a.txt').read(), os.stat('notes/a.txt').st_uid == os.getuid())",
        )
        .await;
    assert_eq!(out.trim(), "hello ✓ True", "{err}");
    // Symbolic links are never followed, by name or along the way.
    let (_, err, st) = c
        .run(
            &ws,
            "import os\nos.symlink('/etc/passwd', 'pw')\nos.symlink('/etc', 'etc')\nopen('big', 'w').write('x' * 2000000)\nopen('bin', 'wb').write(bytes([0xff, 0xfe, 0]))",
        )
        .await;
    assert_eq!(st, "ok", "{err}");
    let refused = [
        (json!({"op": "read", "path": "pw"}), "symbolic link"),
        (
            json!({"op": "write", "path": "pw", "data": "x"}),
            "symbolic link",
        ),
        (json!({"op": "read", "path": "etc/passwd"}), "symbolic link"),
        (
            json!({"op": "write", "path": "etc/evil", "data": "x"}),
            "symbolic link",
        ),
        (json!({"op": "read", "path": "../x"}), "must be relative"),
        (
            json!({"op": "read", "path": ".git/config"}),
            "must be relative",
        ),
        (
            json!({"op": "write", "path": "/tmp/x", "data": "x"}),
            "must be relative",
        ),
        (json!({"op": "read", "path": "big"}), "over 1048576 bytes"),
        (json!({"op": "read", "path": "bin"}), "not a text file"),
        (json!({"op": "read", "path": "nothing"}), "no file nothing"),
        (json!({"op": "remove", "path": "notes"}), "is a directory"),
        (json!({"op": "read", "path": ""}), "a file path is required"),
    ];
    for (mut req, want) in refused {
        req["workspace"] = ws.clone().into();
        let r = c.call(req.clone()).await;
        assert_eq!(r["ok"], false, "{req}: {r}");
        assert!(r["error"].as_str().unwrap().contains(want), "{req}: {r}");
    }
    let l = c.ok(json!({"op": "files", "workspace": ws})).await;
    let names: Vec<&str> = l["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["big", "bin", "notes/a.txt"], "links are not listed");
    c.ok(json!({"op": "remove", "workspace": ws, "path": "notes/a.txt"}))
        .await;
    let r = c
        .call(json!({"op": "read", "workspace": ws, "path": "notes/a.txt"}))
        .await;
    assert!(r["error"].as_str().unwrap().contains("no file"), "{r}");
    // A closed workspace has no file ops.
    c.ok(json!({"op": "close", "workspace": ws})).await;
    let r = c.call(json!({"op": "files", "workspace": ws})).await;
    assert!(r["error"].as_str().unwrap().contains("not open"), "{r}");
    c.close().await;
}

/// Issue 12: a cell's matplotlib figure arrives as an `image` event (PNG, base64) before its
/// `done`; the plotting cache stays out of the workspace.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plot_arrives_as_an_image() {
    use base64::Engine as _;
    let s = Stack::start(opts(1, 1, 72500)).await;
    let (mut c, ws) = account_with_workspace(&s, "plotter", "plots", true).await;
    let r = c
        .ok(json!({"op": "execute", "workspace": ws,
            "code": "import matplotlib.pyplot as plt\nplt.plot([1, 4, 9])\nplt.title('squares')\nprint('drawn')"}))
        .await;
    let id = r["id"].clone();
    let (mut images, mut out) = (Vec::new(), String::new());
    loop {
        let v = c.until(|v| v["id"] == id && v.get("event").is_some()).await;
        match v["event"].as_str().unwrap() {
            "stdout" => out.push_str(v["data"].as_str().unwrap()),
            "stderr" => {}
            "image" => images.push(v),
            "done" => {
                assert_eq!(v["status"], "ok", "{v}");
                break;
            }
            e => panic!("{e}: {v}"),
        }
    }
    assert_eq!(out.trim(), "drawn");
    assert_eq!(images.len(), 1, "one figure, one image");
    assert_eq!(images[0]["mime"], "image/png");
    let png = base64::engine::general_purpose::STANDARD
        .decode(images[0]["data"].as_str().unwrap())
        .unwrap();
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 1000,
        "{}",
        png.len()
    );
    // Shown once: the next cell has no picture.
    let (_, _, st) = c.run(&ws, "1").await;
    assert_eq!(st, "ok");
    let l = c.ok(json!({"op": "files", "workspace": ws})).await;
    assert_eq!(l["files"], json!([]), "no cache in the workspace: {l}");
    c.close().await;
}

/// Issue 13 (fair shares): an account is refused past its cap of open workspaces, across
/// backends, with the cap named, while another account still opens; closing one frees a place.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_account_at_its_cap_is_refused_while_another_opens() {
    let s = Stack::start(Options {
        backend_extra: json!({"accounts": {"signup": true, "max_workspaces": 10, "session_days": 7,
            "min_password_length": 8, "max_open_workspaces": 2}}),
        ..opts(1, 2, 72600)
    })
    .await;
    let (mut eve, first) = account_with_workspace(&s, "eve", "one", true).await;
    let second = eve.ok(json!({"op": "create", "name": "two"})).await["workspace"].clone();
    let third = eve.ok(json!({"op": "create", "name": "three"})).await["workspace"].clone();
    eve.ok(json!({"op": "open", "workspace": second})).await;
    // The cap holds across backends: the third, opened through the other backend, is refused.
    let cookie = s.cookie(1, "eve", "a long password").await;
    let mut eve2 = s.sock(1, Transport::Websocket, Some(&cookie)).await;
    let r = eve2.call(json!({"op": "open", "workspace": third})).await;
    assert_eq!(r["status"], 409, "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("the most one account may have at once (2)"),
        "{r}"
    );
    // Another account opens meanwhile.
    let (_dan, _) = account_with_workspace(&s, "dan", "his", true).await;
    // Closing one frees a place.
    eve.ok(json!({"op": "close", "workspace": first})).await;
    eve2.ok(json!({"op": "open", "workspace": third})).await;
    assert_eq!(
        s.pg.query("sagews", "SELECT count(*) FROM open_sessions"),
        "3"
    );
}

/// `sage-agent backend` exits within 2 s of SIGTERM with a browser's websocket open (browsers
/// keep theirs: a graceful stop would otherwise wait for them until systemd's timeout), and
/// what the browser left open is saved on the way out (issue 15).
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_ends_the_backend_within_two_seconds() {
    let mut s = Stack::start(opts(1, 1, 75000)).await;
    let (mut c, ws) = account_with_workspace(&s, "stopper", "kept", true).await;
    c.ok(json!({"op": "execute", "workspace": ws, "code": "open('unsaved.txt', 'w').write('typed')"}))
        .await;
    // And a browser holding an xhr-streaming request open, as one does between messages.
    let mut stream = tokio::io::BufReader::new(s.tls(0).await.unwrap());
    tokio::io::AsyncWriteExt::write_all(
        stream.get_mut(),
        b"POST /sockjs/000/held/xhr_streaming HTTP/1.1\r\nHost: sagews.test\r\nOrigin: https://sagews.test\r\nContent-Length: 0\r\n\r\n",
    )
    .await
    .unwrap();
    loop {
        let mut l = String::new();
        tokio::io::AsyncBufReadExt::read_line(&mut stream, &mut l)
            .await
            .unwrap();
        if l == "\r\n" {
            break;
        }
    }
    let mut seen = String::new();
    read_chunks_until(&mut stream, &mut seen, "o\n").await;
    let (took, clean) = s.backends[0].stop();
    eprintln!("the backend exited {took:?} after SIGTERM");
    assert!(clean, "the backend exited with an error");
    assert!(took < Duration::from_secs(2), "{took:?}");
    // Every background task (accept loops, reaper, expiry, HTTP server) finished first.
    let log = s.log(&s.backends[0].name);
    assert!(
        log.contains("stopped: ") && log.contains(" tasks finished"),
        "{log}"
    );
    // The workspace was saved on the way out: it has a bundle now.
    assert!(ws.chars().all(|c| c.is_ascii_alphanumeric()), "{ws}");
    let size: u64 =
        s.pg.query(
            "sagews",
            &format!("SELECT coalesce(length(bundle), 0) FROM workspaces WHERE id = '{ws}'"),
        )
        .parse()
        .unwrap();
    assert!(
        size > 0,
        "the open workspace was saved before the backend exited"
    );
}

/// A backend that stops hands its browsers over to the other backend (what a rolling upgrade
/// does to each in turn): through HAProxy, a person's running cell ends normally and its output
/// arrives; a request sent during the stop is refused as `restarting` and, once the person has
/// reconnected (close 1012, HAProxy's persistence cookie expired by the backend), runs on the
/// other backend; the file written before the stop is there; nothing is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopping_backend_hands_its_browsers_over() {
    let mut s = Stack::start(opts(1, 2, 75100)).await;
    s.start_haproxy();
    let site = sagews_testkit::browser::Site {
        name: "sagews.test".into(),
        addr: s.haproxy_addr(),
        ca: s.ca_file(),
    };
    let mut p = sagews_testkit::person::Person::sign_up(&site, "handed", "a long password")
        .await
        .unwrap();
    p.create_and_open("handover").await.unwrap();
    let (out, status) = p
        .execute("_ = open('before.txt', 'w').write('typed before the stop')")
        .await
        .unwrap();
    assert_eq!((out.as_str(), status.as_str()), ("", "ok"));
    let first = p
        .backend()
        .expect("HAProxy's persistence cookie")
        .to_string();
    let i = s.backends.iter().position(|b| b.name == first).unwrap();
    // A cell that runs through the stop, then SIGTERM to the person's backend.
    let running = p
        .start_execute("import time\ntime.sleep(1.5)\nprint('slept')")
        .await
        .unwrap();
    let pid = s.backends[i].pid().unwrap();
    let stopped = std::time::Instant::now();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Sent while the backend waits for the cell: refused as restarting, run elsewhere after.
    let during = p
        .start_execute("print(open('before.txt').read())")
        .await
        .unwrap();
    assert_eq!(
        p.finish_execute(running).await.unwrap(),
        ("slept\n".to_string(), "ok".to_string()),
        "the running cell ended normally on the stopping backend"
    );
    assert_eq!(
        p.finish_execute(during).await.unwrap(),
        ("typed before the stop\n".to_string(), "ok".to_string()),
        "the held request ran once, on the other backend, with the saved files"
    );
    let handed = stopped.elapsed();
    let seen = p.seen.clone();
    eprintln!("handed over in {handed:?}: {seen:?}");
    assert_eq!(seen.restarted_requests, 1, "{seen:?}");
    assert_eq!(seen.closed.get(&1012), Some(&1), "{seen:?}");
    assert!(seen.lost_requests.is_empty(), "{seen:?}");
    assert!(seen.trouble.is_empty(), "{seen:?}");
    let now = p
        .backend()
        .expect("a cookie for the other backend")
        .to_string();
    assert_ne!(now, first, "{seen:?}");
    // The stopping backend exits cleanly within the unit's TimeoutStopSec, saying so.
    let (_, clean) = s.backends[i].stop();
    assert!(clean);
    let log = s.log(&first);
    assert!(log.contains("handed the browsers over"), "{log}");
    // Later work goes on as before.
    assert_eq!(
        p.execute("print(1 + 1)").await.unwrap(),
        ("2\n".to_string(), "ok".to_string())
    );
}

/// The operators' page's server side (issue 16): the inventory's admins get an account made
/// by the deployment (nobody can sign up under that name); an operator sees the workers, the
/// backends and the latest audit records (from logd, which shows backends audit records only),
/// and drains and undrains a worker, each action in logd; anyone else is refused, and that is
/// logged too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operators_see_the_fleet_and_drain_a_worker() {
    let s = Stack::start(Options {
        backend_extra: json!({"admins": ["oscar"], "admin_password": "the operators' password"}),
        logd: true,
        ..opts(2, 1, 75200)
    })
    .await;
    s.wait_workers(0, 2).await;
    // Nobody takes the operator's name by signing up first.
    let mut mallory = s.sock(0, Transport::Websocket, None).await;
    let r = mallory
        .call(json!({"op": "signup", "name": "oscar", "password": "a long password"}))
        .await;
    assert_eq!(r["status"], 409, "{r}");
    mallory
        .ok(json!({"op": "signup", "name": "mallory", "password": "a long password"}))
        .await;
    for req in [
        json!({"op": "fleet"}),
        json!({"op": "drain_worker", "worker": "worker1", "drain": true}),
    ] {
        let r = mallory.call(req).await;
        assert_eq!(r["status"], 403, "{r}");
    }
    // The operator, with the deployment's password.
    let mut oscar = s.sock(0, Transport::Websocket, None).await;
    oscar
        .ok(json!({"op": "signin", "name": "oscar", "password": "the operators' password"}))
        .await;
    let fleet = |f: &Value| -> Vec<(String, bool)> {
        f["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| {
                (
                    w["host"].as_str().unwrap().to_string(),
                    w["draining"] == true,
                )
            })
            .collect()
    };
    // The backend records itself every few seconds: wait for its first record.
    let mut f = oscar.ok(json!({"op": "fleet"})).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while f["backends"].as_array().unwrap().is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        f = oscar.ok(json!({"op": "fleet"})).await;
    }
    assert_eq!(
        fleet(&f),
        [
            ("worker1".to_string(), false),
            ("worker2".to_string(), false)
        ],
        "{f}"
    );
    assert_eq!(f["backends"][0]["host"], "backend1", "{f}");
    assert_eq!(f["audit_error"], Value::Null, "{f}");
    // Drain from the page: the worker's heartbeat says so; the page shows it; undrain.
    let r = oscar
        .ok(json!({"op": "drain_worker", "worker": "worker1", "drain": true}))
        .await;
    assert_eq!(r["draining"], true, "{r}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let f = oscar.ok(json!({"op": "fleet"})).await;
        if fleet(&f)
            == [
                ("worker1".to_string(), true),
                ("worker2".to_string(), false),
            ]
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{f}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(s.metric(0, "draining_workers").await, 1);
    let r = oscar
        .ok(json!({"op": "drain_worker", "worker": "worker1", "drain": false}))
        .await;
    assert_eq!(r["draining"], false, "{r}");
    let r = oscar
        .call(json!({"op": "drain_worker", "worker": "nosuch", "drain": true}))
        .await;
    assert_eq!(r["status"], 404, "{r}");
    // Every action, and the refusals, in logd; the page lists the latest audit records.
    let logged = s.logged("backend.audit", 4).await.join("\n");
    for what in [
        "operator oscar drained worker worker1",
        "operator oscar undrained worker worker1",
        "refused an operator's action to a non-operator",
    ] {
        assert!(logged.contains(what), "{what} not in:\n{logged}");
    }
    let f = oscar.ok(json!({"op": "fleet"})).await;
    let audit: Vec<&str> = f["audit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["message"].as_str().unwrap())
        .collect();
    assert!(
        audit.contains(&"operator oscar undrained worker worker1"),
        "{f}"
    );
}

/// A backend killed outright (no handover) leaves its workspaces' sessions running on the
/// workers; the backend a person reconnects to takes the session over on that worker instead
/// of opening the last save elsewhere: what was typed since the save, and the engine's
/// variables, are still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_left_by_a_killed_backend_is_taken_over() {
    let mut s = Stack::start(opts(2, 2, 75300)).await;
    s.wait_workers(1, 2).await;
    let (mut c, ws) = account_with_workspace(&s, "orphan", "kept open", true).await;
    c.ok(json!({"op": "execute", "workspace": ws,
        "code": "x = 41\n_ = open('typed.txt', 'w').write('not saved yet')"}))
        .await;
    c.until(|v| v["event"] == "done").await;
    s.backends[0].kill9();
    // A heartbeat later the other backend sees the session's worker busier than the idle one,
    // where a fresh placement would go.
    tokio::time::sleep(Duration::from_secs(6)).await;
    // The person, reconnected to the other backend, opens the workspace again.
    let cookie = s.cookie(1, "orphan", "a long password").await;
    let mut again = s.sock(1, Transport::Websocket, Some(&cookie)).await;
    again.ok(json!({"op": "open", "workspace": ws})).await;
    let r = again
        .ok(json!({"op": "execute", "workspace": ws,
            "code": "print(x + 1, open('typed.txt').read())"}))
        .await;
    let id = r["id"].clone();
    let mut out = String::new();
    loop {
        let v = again.next().await;
        if v["event"] == "stdout" && v["id"] == id {
            out.push_str(v["data"].as_str().unwrap());
        }
        if v["event"] == "stderr" && v["id"] == id {
            out.push_str(v["data"].as_str().unwrap());
        }
        if v["event"] == "done" && v["id"] == id {
            assert_eq!(v["status"], "ok", "{v} {out}\n{}", s.log("backend2"));
            break;
        }
    }
    assert_eq!(out, "42 not saved yet\n");
}

/// Parallel guesses cannot pass the failed-sign-in limit together: each attempt is counted
/// before its password is checked (before, all of a burst passed the check before any was
/// counted); refused guesses and right passwords do not count as failures.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_guesses_cannot_pass_the_limit() {
    let mut s = Stack::start(Options {
        backend_extra: json!({"accounts": {"signup": true, "max_workspaces": 5, "session_days": 7,
            "min_password_length": 8, "failed_signins_per_account": 3,
            "failed_signins_per_address": 100, "signups_per_address": 10,
            "limit_window_seconds": 600}}),
        ..opts(0, 1, 72700)
    })
    .await;
    let port = s.start_haproxy();
    let s = &s;
    let post = async |name: &str, password: &str| {
        let body = json!({"name": name, "password": password}).to_string();
        s.haproxy_https(
            port,
            "POST",
            "/api/signin",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
        .await
        .status
    };
    let body = json!({"name": "burst", "password": "the right password"}).to_string();
    let r = s
        .haproxy_https(
            port,
            "POST",
            "/api/signup",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
        .await;
    assert_eq!(r.status, 200);
    // Right passwords are not failures: five sign-ins, all in.
    for _ in 0..5 {
        assert_eq!(post("burst", "the right password").await, 200);
    }
    // Twelve wrong guesses at once.
    let guesses: Vec<_> = (0..12)
        .map(|i| post("burst", if i % 2 == 0 { "guess a" } else { "guess b" }))
        .collect();
    let statuses = futures_util::future::join_all(guesses).await;
    let checked = statuses.iter().filter(|s| **s == 401).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    eprintln!("12 parallel guesses: {checked} checked, {refused} refused");
    assert!(checked <= 3, "{statuses:?}");
    assert_eq!(checked + refused, 12, "{statuses:?}");
    // Only the checked guesses count (refused ones never reached the password, the right ones
    // were uncounted).
    assert_eq!(
        s.pg.query(
            "sagews",
            "SELECT count(*) FROM auth_events WHERE key = 'signin-fail:account:burst'"
        ),
        checked.to_string()
    );
}

/// `sage-agent drain` (or `--undo`) on a worker's host, as `sagectl drain` runs it; never on
/// this box's own /var/lib/sage-worker (other tests' workers).
fn drain(worker: &stack::Proc, undo: bool) {
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(&worker.config).unwrap()).unwrap();
    let dir = config["state_dir"]
        .as_str()
        .unwrap_or("/var/lib/sage-worker");
    assert!(
        !dir.starts_with("/var/lib/sage-worker"),
        "{}: the worker's state directory is the box's",
        worker.config.display()
    );
    let mut cmd = std::process::Command::new(sagews_testkit::bin("sage-agent"));
    cmd.args(["drain", "--config"]).arg(&worker.config);
    if undo {
        cmd.arg("--undo");
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// A stack of two workers and a backend, and an account `name` with a workspace open: the
/// stack, the session, the workspace and the worker it is open on.
async fn two_workers_one_open(uid_base: u32, name: &str) -> (Stack, stack::Sock, String, String) {
    let s = Stack::start(opts(2, 1, uid_base)).await;
    let (mut c, ws) = account_with_workspace(&s, name, "drained", false).await;
    let first = c.ok(json!({"op": "open", "workspace": ws})).await["worker"]
        .as_str()
        .unwrap()
        .to_string();
    (s, c, ws, first)
}

/// Waits until backend 0 counts `n` draining workers.
async fn wait_draining(s: &Stack, n: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.metric(0, "draining_workers").await != n {
        assert!(
            std::time::Instant::now() < deadline,
            "not {n} draining workers"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Issue 16: draining a worker moves the workspaces open there to another worker, between
/// cells and saved first: a cell running at the drain finishes, the viewer gets `moved` within
/// seconds, what was written before is on the other worker, the next execute runs there; new
/// workspaces never land on the drained worker (though it is the emptier one) until it is
/// undrained, and its old session is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drained_worker_hands_its_workspaces_to_another_with_nothing_lost() {
    let (s, mut c, ws, first) = two_workers_one_open(72800, "dora").await;
    let (out, err, st) = c
        .run(
            &ws,
            "open('f.txt', 'w').write('written before the drain')\nprint(6 * 7)",
        )
        .await;
    assert_eq!((out.trim(), st.as_str()), ("42", "ok"), "{err}");
    let a = s.workers.iter().find(|w| w.name == first).unwrap();
    let id = c
        .ok(json!({"op": "execute", "workspace": ws,
            "code": "import time\ntime.sleep(2)\nprint('finished')"}))
        .await["id"]
        .clone();
    let started = std::time::Instant::now();
    drain(a, false);
    // The running cell ends first, then the workspace moves.
    let mut out = String::new();
    loop {
        let v = c.next().await;
        match v["event"].as_str() {
            Some("stdout") if v["id"] == id => out.push_str(v["data"].as_str().unwrap()),
            Some("done") if v["id"] == id => {
                assert_eq!(v["status"], "ok", "{v}");
                break;
            }
            Some("moved") | Some("worker_lost") => panic!("{v} before the running cell ended"),
            _ => {}
        }
    }
    let cell_done = std::time::Instant::now();
    assert_eq!(out.trim(), "finished");
    let moved = c.event("moved").await;
    let took = started.elapsed();
    eprintln!(
        "moved {took:?} after the drain (the 2 s cell and up to 1 s of heartbeat included), {:?} after the cell ended",
        cell_done.elapsed()
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    let log = s.log("backend1");
    let line = log
        .lines()
        .find(|l| l.contains("moved off a draining worker"));
    eprintln!("the backend: {}", line.unwrap_or("(no line)"));
    let second = moved["worker"].as_str().unwrap().to_string();
    assert_ne!(second, first, "{moved}");
    assert!(
        moved["message"].as_str().unwrap().contains("drained"),
        "{moved}"
    );
    // Nothing written is lost, and the session runs on the other worker.
    let (out, err, st) = c.run(&ws, "print(open('f.txt').read())").await;
    assert_eq!(
        (out.trim(), st.as_str()),
        ("written before the drain", "ok"),
        "{err}"
    );
    let h = c.ok(json!({"op": "history", "workspace": ws})).await;
    assert!(
        h.to_string()
            .contains("Saved before moving off a draining worker"),
        "{h}"
    );
    assert_eq!(s.metric(0, "draining_workers").await, 1);
    assert_eq!(s.metric(0, "drain_moves_total").await, 1);
    assert_eq!(s.metric(0, "worker_failovers_total").await, 0);
    // The old session is closed: the drained worker reports no session.
    let sessions = format!("SELECT sessions FROM workers WHERE host = '{first}'");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.pg.query("sagews", &sessions).trim() != "0" {
        assert!(
            std::time::Instant::now() < deadline,
            "{first} still has a session"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A new workspace goes to the other worker, though the drained one is empty.
    let other = c.ok(json!({"op": "create", "name": "second"})).await["workspace"]
        .as_str()
        .unwrap()
        .to_string();
    let r = c.ok(json!({"op": "open", "workspace": other})).await;
    assert_eq!(r["worker"], second.as_str(), "{r}");
    c.ok(json!({"op": "close", "workspace": other})).await;
    // Undrained, it takes sessions again (the emptier worker).
    drain(a, true);
    wait_draining(&s, 0).await;
    let r = c.ok(json!({"op": "open", "workspace": other})).await;
    assert_eq!(r["worker"], first.as_str(), "{r}");
    let (out, _, st) = c.run(&other, "print('back')").await;
    assert_eq!((out.trim(), st.as_str()), ("back", "ok"));
    c.close().await;
}

/// Issue 16: with every worker draining, a workspace has nowhere to go: it stays where it is
/// and keeps working, no new workspace is placed; once another worker is undrained, it moves
/// there with its files. A cell that never ends is interrupted after 30 s for the move.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_workspace_with_nowhere_to_go_stays_until_a_worker_has_room() {
    let (s, mut c, ws, first) = two_workers_one_open(72900, "stay").await;
    let (_, err, st) = c.run(&ws, "open('f.txt', 'w').write('kept')").await;
    assert_eq!(st, "ok", "{err}");
    // The other worker first (seen drained before this one is), so there is never room.
    let a = s.workers.iter().find(|w| w.name == first).unwrap();
    let b = s.workers.iter().find(|w| w.name != first).unwrap();
    for (n, w) in [b, a].into_iter().enumerate() {
        drain(w, false);
        wait_draining(&s, n as u64 + 1).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        s.log("backend1").contains("no other worker has room"),
        "{}",
        s.log("backend1")
    );
    assert_eq!(s.metric(0, "drain_moves_total").await, 0);
    let (out, err, st) = c.run(&ws, "print(open('f.txt').read())").await;
    assert_eq!((out.trim(), st.as_str()), ("kept", "ok"), "{err}");
    let other = c.ok(json!({"op": "create", "name": "second"})).await["workspace"]
        .as_str()
        .unwrap()
        .to_string();
    let r = c.call(json!({"op": "open", "workspace": other})).await;
    assert_eq!(r["ok"], false, "placed on a draining worker: {r}");
    // Room again: the workspace moves, its files with it.
    drain(b, true);
    let moved = c.event("moved").await;
    assert_eq!(moved["worker"], b.name.as_str(), "{moved}");
    let (out, err, st) = c.run(&ws, "print(open('f.txt').read())").await;
    assert_eq!((out.trim(), st.as_str()), ("kept", "ok"), "{err}");
    assert_eq!(s.metric(0, "drain_moves_total").await, 1);
    // A cell that does not end is interrupted after 30 s, then the workspace moves.
    drain(a, true);
    wait_draining(&s, 0).await;
    let id = c
        .ok(json!({"op": "execute", "workspace": ws,
            "code": "import time
while True: time.sleep(0.1)"}))
        .await["id"]
        .clone();
    let started = std::time::Instant::now();
    drain(b, false);
    let done = c.until(|v| v["event"] == "done" && v["id"] == id).await;
    assert_eq!(done["status"], "interrupted", "{done}");
    let waited = started.elapsed();
    assert!(
        waited > Duration::from_secs(29) && waited < Duration::from_secs(40),
        "{waited:?}"
    );
    let moved = c.event("moved").await;
    assert_eq!(moved["worker"], first.as_str(), "{moved}");
    assert!(
        moved["message"]
            .as_str()
            .unwrap()
            .contains("interrupted after 30 s"),
        "{moved}"
    );
    let (out, err, st) = c.run(&ws, "print(open('f.txt').read())").await;
    assert_eq!((out.trim(), st.as_str()), ("kept", "ok"), "{err}");
    c.close().await;
}

/// Issue 17: a session that fell behind cannot overwrite newer history. Two sessions of one
/// workspace (the record of the first lost, as a backend's stale record once allowed): the
/// second saves, then the first saves: refused (409), and the history keeps the second's save.
/// Before, the first's bundle replaced the stored one and the second's save was gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_that_fell_behind_cannot_overwrite_newer_history() {
    let s = Stack::start(opts(2, 2, 75400)).await;
    s.wait_workers(1, 2).await;
    let (mut c, ws) = account_with_workspace(&s, "twice", "forked", true).await;
    c.run(&ws, "_ = open('a.txt', 'w').write('a')").await;
    c.ok(json!({"op": "save", "workspace": ws, "message": "first"}))
        .await;
    // The record of the first session gone: the other backend opens a second session, on the
    // emptier worker once the heartbeats show the first one's.
    s.pg.query("sagews", "DELETE FROM open_sessions");
    tokio::time::sleep(Duration::from_secs(6)).await;
    let cookie = s.cookie(1, "twice", "a long password").await;
    let mut other = s.sock(1, Transport::Websocket, Some(&cookie)).await;
    other.ok(json!({"op": "open", "workspace": ws})).await;
    other.run(&ws, "_ = open('b.txt', 'w').write('b')").await;
    other
        .ok(json!({"op": "save", "workspace": ws, "message": "second"}))
        .await;
    // The first session, behind the stored history now, saves: refused, nothing stored.
    c.run(&ws, "_ = open('c.txt', 'w').write('c')").await;
    let r = c
        .call(json!({"op": "save", "workspace": ws, "message": "stale"}))
        .await;
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["status"], 409, "{r}");
    assert!(
        r["error"].as_str().unwrap().contains("saved from another"),
        "{r}"
    );
    let h = other.ok(json!({"op": "history", "workspace": ws})).await;
    let messages: Vec<&str> = h["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["message"].as_str().unwrap())
        .collect();
    assert!(messages.contains(&"second"), "{h}");
    assert!(messages.contains(&"first"), "{h}");
    assert!(!messages.contains(&"stale"), "{h}");
}
