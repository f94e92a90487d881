//! Engine start figures (run as root: `cargo bench -p sage-agent --bench engines`): a session's
//! open → first cell answered, for python3 and Sage (when installed), forked from the engine
//! server and as a fresh process, p50/p99; and the memory of an idle session (PSS, summed over
//! its processes, from /proc/PID/smaps_rollup). Prints; asserts nothing. BENCH_SESSIONS sets
//! how many sessions per case (default 100; fresh Sage sessions: a tenth of it).

use sagews_testkit::worker as harness;

use std::time::{Duration, Instant};

use harness::{Worker, limits};
use sagews_testkit::pki::State;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// (PSS, private) in kB of a process, from smaps_rollup; 0 when it is gone.
fn memory_kb(pid: i32) -> (u64, u64) {
    let t = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        t.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (
        field("Pss:"),
        field("Private_Clean:") + field("Private_Dirty:"),
    )
}

/// The processes of session cgroup `ws<uid>` (v1 memory hierarchy, as on this box).
fn session_pids(uid: u32) -> Vec<i32> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let Some(path) = own
        .lines()
        .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()))
    else {
        return Vec::new();
    };
    let procs = format!(
        "/sys/fs/cgroup/memory{}/sagews/ws{uid}/cgroup.procs",
        path.trim_end_matches('/')
    );
    std::fs::read_to_string(procs)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

async fn case(engine: &str, server: &str, uid: u32, n: usize) {
    let tmp = harness::state_tempdir();
    let state = State::open_at(&tmp.path().join("pki"), "bench").unwrap();
    let mut l = limits();
    l.cpu_seconds = 600;
    l.memory_mb = 4096;
    l.processes = 200;
    let t = Instant::now();
    let w = Worker::start_with(
        uid,
        l,
        600,
        tmp,
        state,
        serde_json::json!({"engine": engine, "engine_server": server, "max_sessions": 32, "uid_max": uid + 40}),
    )
    .await;
    let server_ready = t.elapsed();
    let mut c = w.client().await;
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("b{i}");
        let t = Instant::now();
        c.open(&name, None).await;
        let cell = c.run(&name, 1, "1+1").await;
        times.push(t.elapsed());
        assert_eq!(cell.stdout, "2\n", "{cell:?}");
        assert_eq!(c.last_forked, server == "zygote");
        c.close(&name).await;
    }
    times.sort();
    println!(
        "{engine:>7} {server:>6}: open -> first cell answered, {n} sessions: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms{}",
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        percentile(&times, 0.99).as_secs_f64() * 1e3,
        times[n - 1].as_secs_f64() * 1e3,
        if server == "zygote" {
            format!(
                " (the engine server was ready in {:.1} s)",
                server_ready.as_secs_f64()
            )
        } else {
            String::new()
        }
    );
    // Memory of idle sessions: 20 open at once, each having run one cell. PSS splits the pages
    // sessions share with the engine server between it and them, so it falls as sessions are
    // added; the private part is what each one costs on its own.
    let idle = 20;
    for i in 0..idle {
        let name = format!("idle{i}");
        c.open(&name, None).await;
        c.run(&name, 1, "1+1").await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut pss, mut private) = (Vec::new(), Vec::new());
    for u in uid..=uid + 40 {
        let pids = session_pids(u);
        if !pids.is_empty() {
            let m: Vec<(u64, u64)> = pids.iter().map(|p| memory_kb(*p)).collect();
            pss.push(m.iter().map(|x| x.0).sum::<u64>());
            private.push(m.iter().map(|x| x.1).sum::<u64>());
        }
    }
    let avg = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64 / 1024.0;
    println!(
        "{engine:>7} {server:>6}: an idle session (all its processes), {} open: PSS {:.1} MB, private {:.1} MB on average",
        pss.len(),
        avg(&pss),
        avg(&private)
    );
    for i in 0..idle {
        c.close(&format!("idle{i}")).await;
    }
    w.stop().await;
}

fn main() {
    let n: usize = std::env::var("BENCH_SESSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let have_sage = std::process::Command::new("sh")
        .args(["-c", "command -v sage"])
        .output()
        .is_ok_and(|o| o.status.success());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        case("python3", "zygote", 72000, n).await;
        case("python3", "fresh", 72100, n).await;
        if have_sage {
            case("sage", "zygote", 72200, n).await;
            case("sage", "fresh", 72300, (n / 10).max(3)).await;
        } else {
            println!("sage: not installed, not measured");
        }
    });
}
