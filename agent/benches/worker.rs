//! Worker figures (run as root: `cargo bench -p sage-agent --bench worker`): session open →
//! ready with python3, and the round trip of executing `1+1` as a backend sees it (TLS, frames,
//! the engine and back), p50 and p99. Prints; asserts nothing.

use sagews_testkit::worker as harness;

use std::time::{Duration, Instant};

use harness::{Worker, limits};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let n: usize = std::env::var("BENCH_EXECUTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut l = limits();
        l.cpu_seconds = 600;
        let w = Worker::start(66000, l, 600).await;
        let mut c = w.client().await;
        let mut opens = Vec::new();
        for i in 0..8 {
            let t = Instant::now();
            let ready_ms = c.open(&format!("bench-{i}"), None).await;
            opens.push((t.elapsed(), ready_ms));
        }
        for i in 1..8 {
            c.close(&format!("bench-{i}")).await;
        }
        for i in 0..100 {
            c.run("bench-0", i, "1+1").await;
        }
        let mut rtts = Vec::with_capacity(n);
        for i in 0..n as u64 {
            let t = Instant::now();
            let cell = c.run("bench-0", 1000 + i, "1+1").await;
            rtts.push(t.elapsed());
            assert_eq!(cell.stdout, "2\n");
        }
        rtts.sort();
        let mut open_times: Vec<Duration> = opens.iter().map(|o| o.0).collect();
        open_times.sort();
        println!("session open -> ready (python3, user + home + engine), 8 sessions: median {:?}, max {:?}", percentile(&open_times, 0.5), open_times[7]);
        println!("execute `1+1` round trip from a backend over TLS, {n} runs: p50 {:?}, p99 {:?}, max {:?}", percentile(&rtts, 0.5), percentile(&rtts, 0.99), rtts[n - 1]);
        c.close("bench-0").await;
        w.stop().await;
    });
}
