//! Backend figures (run as root: `cargo bench -p sage-agent --bench backend`), on loopback with
//! real PostgreSQL, memcached and a worker process: the execute round trip as a browser sees it
//! through SockJS over websocket (backend + worker + engine), p50 and p99; the memory of
//! 10,000 idle SockJS websocket sessions (the backend's resident set before and after); and
//! sign-ins per second (argon2id). Prints; asserts nothing.

#[path = "../../tests/worker_harness.rs"]
mod harness;
#[path = "../../tests/pg_harness.rs"]
mod pg;
#[path = "../../tests/backend_harness.rs"]
mod stack;

fn main() {
    println!("backend bench: not written yet");
}
