//! Backend figures (run as root: `cargo bench -p sage-agent --bench backend`), on loopback with
//! real PostgreSQL, memcached and a worker process, the agents built in release:
//! - the execute round trip as a browser sees it through SockJS over websocket (backend, worker,
//!   engine and back), p50 and p99 (goal p50 <= 3 ms);
//! - the backend's memory for 10,000 idle SockJS websocket sessions (resident set before and
//!   after; goal <= 200 MB);
//! - sign-ins per second over HTTPS (argon2id, PostgreSQL session insert).
//!
//! Prints; asserts nothing. BENCH_EXECUTES, BENCH_SOCKETS and BENCH_SIGNINS change the counts.

use sagews_testkit::stack;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;
use stack::{Options, Stack, Transport};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb / 1024.0
}

fn main() {
    let executes = env("BENCH_EXECUTES", 2000);
    let sockets = env("BENCH_SOCKETS", 10_000);
    let signins = env("BENCH_SIGNINS", 200);
    // Room for the sockets, here and in the backend (which inherits the limit).
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = Stack::start(Options {
            workers: 1,
            backends: 1,
            uid_base: 72000,
            backend_extra: json!({"max_sessions": sockets + 100}),
            logd: false,
        })
        .await;
        let pid = s.backends[0].pid().unwrap();

        // Execute round trip.
        let mut c = s.sock(0, Transport::Websocket, None).await;
        c.ok(json!({"op": "signup", "name": "bench", "password": "bench password"})).await;
        let ws = c.ok(json!({"op": "create", "name": "bench"})).await["workspace"]
            .as_str()
            .unwrap()
            .to_string();
        c.ok(json!({"op": "open", "workspace": ws})).await;
        for _ in 0..50 {
            c.run(&ws, "1+1").await;
        }
        let mut times = Vec::with_capacity(executes);
        for _ in 0..executes {
            let t = Instant::now();
            let (out, _, status) = c.run(&ws, "1+1").await;
            times.push(t.elapsed());
            assert_eq!((out.trim(), status.as_str()), ("2", "ok"));
        }
        times.sort();
        println!(
            "execute `1+1` round trip through SockJS (websocket) + backend + worker, {executes} runs: p50 {:.2} ms, p99 {:.2} ms",
            percentile(&times, 0.5).as_secs_f64() * 1e3,
            percentile(&times, 0.99).as_secs_f64() * 1e3
        );

        // Sign-ins per second, 4 at a time.
        let body = json!({"name": "bench", "password": "bench password"}).to_string();
        let t = Instant::now();
        let ok = futures_util::stream::iter(0..signins)
            .map(|_| {
                s.try_https(
                    0,
                    "POST",
                    "/api/signin",
                    &[("Content-Type", "application/json")],
                    body.as_bytes(),
                )
            })
            .buffer_unordered(4)
            .filter(|r| std::future::ready(r.as_ref().is_ok_and(|r| r.status == 200)))
            .count()
            .await;
        let secs = t.elapsed().as_secs_f64();
        println!(
            "sign-ins over HTTPS (argon2id m=19MiB t=2, 4 concurrent): {ok}/{signins} in {secs:.1} s = {:.0}/s",
            ok as f64 / secs
        );

        // Idle websocket sessions.
        let before = rss_mb(pid);
        let t = Instant::now();
        let socks: Vec<_> = futures_util::stream::iter(0..sockets)
            .map(|_| s.sock(0, Transport::Websocket, None))
            .buffer_unordered(64)
            .collect()
            .await;
        let opened = t.elapsed();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let sessions = s.metric(0, "sockjs_sessions").await;
        let after = rss_mb(pid);
        println!(
            "{} idle SockJS websocket sessions (opened in {:.1} s; backend counts {sessions}): backend RSS {before:.1} MB -> {after:.1} MB, {:.1} MB for the sessions ({:.1} KB each)",
            socks.len(),
            opened.as_secs_f64(),
            after - before,
            (after - before) * 1024.0 / socks.len() as f64
        );
        drop(socks);
        c.close().await;
    });
}
