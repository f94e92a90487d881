//! The load run's figures: latencies (exact for one second, a histogram for a phase), the
//! nearest-rank percentiles both give, and errors counted by kind with a few samples of their
//! text. Pure code; the users write into [`Shared`] and the ticker reads it once a second.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;

/// What went wrong, as the report counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A request had no answer within the client's patience (reconnects included).
    Timeout,
    /// An execute had no `done` within [`super::user::HUNG_AFTER`].
    Hung,
    /// A `worker_lost` event.
    WorkerLost,
    /// An execute ended `killed`.
    Killed,
    /// A `moved` event (the workspace was reopened on another worker).
    Moved,
    /// A request or a running cell lost with its connection (it may or may not have run).
    ConnectionLost,
    /// The server closed a SockJS session that was open (`c[code, reason]`).
    Closed,
    /// An HTTP request answered 5xx (by HAProxy or a backend).
    Http5xx,
    /// A connection could not be made (refused, reset, TLS, no answer).
    Refused,
    /// A 429: a sign-in or sign-up limit, waited out.
    Throttled,
    /// A request answered `ok: false` (other than `restarting`).
    Rejected,
    /// An execute ended with another status than `ok` (`error`, `interrupted`), or printed
    /// something else than its square.
    CellError,
    /// The user could not sign up or sign in.
    SignupFailed,
    /// The user's workspace could not be created or opened.
    OpenFailed,
    /// Verification: a cell acknowledged ok whose line is missing, doubled or out of order.
    LostCell,
    /// Verification: an acknowledged save missing from the history.
    LostSave,
    Other,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Timeout => "timeout",
            Kind::Hung => "hung",
            Kind::WorkerLost => "worker_lost",
            Kind::Killed => "killed",
            Kind::Moved => "moved",
            Kind::ConnectionLost => "connection_lost",
            Kind::Closed => "closed",
            Kind::Http5xx => "http_5xx",
            Kind::Refused => "refused",
            Kind::Throttled => "throttled",
            Kind::Rejected => "rejected",
            Kind::CellError => "cell_error",
            Kind::SignupFailed => "signup_failed",
            Kind::OpenFailed => "open_failed",
            Kind::LostCell => "lost_cell",
            Kind::LostSave => "lost_save",
            Kind::Other => "other",
        }
    }

    /// Kinds that fail the run even without `--strict`: work acknowledged and then lost, or
    /// a cell that never ended.
    pub fn fatal(self) -> bool {
        matches!(self, Kind::LostCell | Kind::LostSave | Kind::Hung)
    }
}

/// How many samples of each kind's text are kept.
const SAMPLES: usize = 5;

/// Errors by kind: a count and the first few texts.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Errors(BTreeMap<&'static str, KindCount>);

#[derive(Clone, Debug, Default, Serialize)]
pub struct KindCount {
    pub count: u64,
    pub samples: Vec<String>,
}

impl Errors {
    pub fn add(&mut self, kind: Kind, text: impl Into<String>) {
        let e = self.0.entry(kind.as_str()).or_default();
        e.count += 1;
        if e.samples.len() < SAMPLES {
            let mut t: String = text.into();
            if t.len() > 300 {
                let cut = (0..=300)
                    .rev()
                    .find(|&i| t.is_char_boundary(i))
                    .unwrap_or(0);
                t.truncate(cut);
                t.push_str("...");
            }
            e.samples.push(t);
        }
    }

    pub fn total(&self) -> u64 {
        self.0.values().map(|k| k.count).sum()
    }

    pub fn count(&self, kind: Kind) -> u64 {
        self.0.get(kind.as_str()).map_or(0, |k| k.count)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &KindCount)> {
        self.0.iter().map(|(k, v)| (*k, v))
    }

    /// Whether any error of a kind that fails the run happened.
    pub fn any_fatal(&self) -> bool {
        [Kind::LostCell, Kind::LostSave, Kind::Hung]
            .iter()
            .any(|k| self.count(*k) > 0)
    }
}

/// The nearest-rank `p`th percentile (0 < p ≤ 100) of `sorted` (ascending): the smallest value
/// with at least p% of the values at or below it. None when empty.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Sub-buckets per power of two: values are kept within 1/128 (0.8 %) of their size.
const SUB_BITS: u32 = 7;
const SUB: u64 = 1 << SUB_BITS;

/// A latency histogram in microseconds: exact below 128 µs, then 128 buckets per power of
/// two, so a phase of any length costs a few tens of kilobytes. Percentiles give the upper
/// end of a bucket (never more than the largest value seen).
#[derive(Clone, Debug, Default)]
pub struct Histogram {
    counts: Vec<u64>,
    n: u64,
    max: u64,
    sum: u128,
}

fn bucket(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    // The value's top SUB_BITS + 1 bits: a mantissa in [SUB, 2 SUB), `shift` octaves up.
    let shift = u64::from(63 - v.leading_zeros() - SUB_BITS);
    (SUB * shift + (v >> shift)) as usize
}

/// The largest value bucket `i` holds.
fn bucket_top(i: usize) -> u64 {
    let i = i as u64;
    if i < SUB {
        return i;
    }
    let shift = i / SUB - 1;
    let mantissa = i % SUB + SUB;
    ((mantissa + 1) << shift) - 1
}

impl Histogram {
    pub fn record(&mut self, micros: u64) {
        let b = bucket(micros);
        if self.counts.len() <= b {
            self.counts.resize(b + 1, 0);
        }
        self.counts[b] += 1;
        self.n += 1;
        self.max = self.max.max(micros);
        self.sum += u128::from(micros);
    }

    pub fn len(&self) -> u64 {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    pub fn max(&self) -> Option<u64> {
        (self.n > 0).then_some(self.max)
    }

    pub fn mean(&self) -> Option<f64> {
        (self.n > 0).then(|| self.sum as f64 / self.n as f64)
    }

    /// The nearest-rank percentile, as [`percentile`], within a bucket's width.
    pub fn percentile(&self, p: f64) -> Option<u64> {
        if self.n == 0 {
            return None;
        }
        let rank = (((p / 100.0) * self.n as f64).ceil() as u64).clamp(1, self.n);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(bucket_top(i).min(self.max));
            }
        }
        Some(self.max)
    }
}

/// Phases of a run: figures are kept apart for each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Users starting: signing up, creating and opening their workspace, first cells.
    Signup,
    /// Every user working (or given up): the figures that count.
    Steady,
    /// The load stopped: last cells ending, verification.
    Ending,
}

/// Figures of one phase.
#[derive(Debug, Default)]
pub struct PhaseFigures {
    pub executes: u64,
    pub saves: u64,
    pub latency: Histogram,
}

/// This second's figures (the ticker takes them).
#[derive(Debug, Default)]
pub struct Second {
    pub executes: u64,
    pub latencies: Vec<u64>,
}

/// What every user task writes into and the ticker and the report read.
pub struct Shared {
    pub started: Instant,
    phase: AtomicU32,
    /// Users with an open SockJS session (their workspace open on it, once they have one).
    pub connected: AtomicU32,
    /// Users that reached their working loop.
    pub ready: AtomicU32,
    /// Users that stopped before working (gave up).
    pub gave_up: AtomicU32,
    /// Users that finished (verified or not).
    pub finished: AtomicU32,
    pub saves: AtomicU64,
    pub executes: AtomicU64,
    pub reconnects: AtomicU64,
    pub moved: AtomicU64,
    pub second: Mutex<Second>,
    pub errors: Mutex<Errors>,
    pub signup: Mutex<PhaseFigures>,
    pub steady: Mutex<PhaseFigures>,
    pub ending: Mutex<PhaseFigures>,
    /// Sign-up (or sign-in) request times, successful ones.
    pub signup_latency: Mutex<Histogram>,
    /// From a user's start to its workspace open.
    pub ready_latency: Mutex<Histogram>,
    pub signups: AtomicU64,
    pub signins: AtomicU64,
}

impl Shared {
    pub fn new() -> Shared {
        Shared {
            started: Instant::now(),
            phase: AtomicU32::new(0),
            connected: AtomicU32::new(0),
            ready: AtomicU32::new(0),
            gave_up: AtomicU32::new(0),
            finished: AtomicU32::new(0),
            saves: AtomicU64::new(0),
            executes: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            moved: AtomicU64::new(0),
            second: Mutex::new(Second::default()),
            errors: Mutex::new(Errors::default()),
            signup: Mutex::new(PhaseFigures::default()),
            steady: Mutex::new(PhaseFigures::default()),
            ending: Mutex::new(PhaseFigures::default()),
            signup_latency: Mutex::new(Histogram::default()),
            ready_latency: Mutex::new(Histogram::default()),
            signups: AtomicU64::new(0),
            signins: AtomicU64::new(0),
        }
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::SeqCst) {
            0 => Phase::Signup,
            1 => Phase::Steady,
            _ => Phase::Ending,
        }
    }

    pub fn set_phase(&self, p: Phase) {
        let v = match p {
            Phase::Signup => 0,
            Phase::Steady => 1,
            Phase::Ending => 2,
        };
        self.phase.store(v, Ordering::SeqCst);
    }

    fn figures(&self, p: Phase) -> &Mutex<PhaseFigures> {
        match p {
            Phase::Signup => &self.signup,
            Phase::Steady => &self.steady,
            Phase::Ending => &self.ending,
        }
    }

    pub fn error(&self, kind: Kind, text: impl Into<String>) {
        self.errors.lock().unwrap().add(kind, text);
    }

    /// An execute ended with `done` after `micros`, sent during phase `p`.
    pub fn executed(&self, p: Phase, micros: u64) {
        self.executes.fetch_add(1, Ordering::Relaxed);
        {
            let mut s = self.second.lock().unwrap();
            s.executes += 1;
            s.latencies.push(micros);
        }
        let mut f = self.figures(p).lock().unwrap();
        f.executes += 1;
        f.latency.record(micros);
    }

    pub fn saved(&self, p: Phase) {
        self.saves.fetch_add(1, Ordering::Relaxed);
        self.figures(p).lock().unwrap().saves += 1;
    }

    /// Takes this second's figures.
    pub fn take_second(&self) -> Second {
        std::mem::take(&mut *self.second.lock().unwrap())
    }
}

impl Default for Shared {
    fn default() -> Shared {
        Shared::new()
    }
}

/// Microseconds as milliseconds for people, e.g. `12.3 ms`.
pub fn ms(micros: Option<u64>) -> String {
    match micros {
        None => "-".into(),
        Some(v) if v >= 10_000_000 => format!("{:.1} s", v as f64 / 1e6),
        Some(v) => format!("{:.1} ms", v as f64 / 1e3),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&v, 0.1), Some(1));
        assert_eq!(percentile(&[7], 50.0), Some(7));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        assert_eq!(percentile(&[], 50.0), None);
        // Ten values: the 99th percentile is the largest (rank ceil(9.9) = 10), the median
        // the fifth.
        let v: Vec<u64> = (1..=10).map(|x| x * 10).collect();
        assert_eq!(percentile(&v, 99.0), Some(100));
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 90.0), Some(90));
    }

    #[test]
    fn buckets_cover_every_value_once_and_in_order() {
        let mut last = None;
        for v in (0..100_000u64).chain([(1 << 40) + 12345, u64::MAX / 2]) {
            let b = bucket(v);
            assert!(
                bucket_top(b) >= v,
                "{v} in bucket {b} topping at {}",
                bucket_top(b)
            );
            if b > 0 {
                assert!(bucket_top(b - 1) < v, "{v}: the bucket below holds it too");
            }
            if let Some(l) = last {
                assert!(b >= l);
            }
            last = Some(b);
            // Within 1/128 of the value.
            assert!(bucket_top(b) - v <= v / 128, "{v} -> {}", bucket_top(b));
        }
    }

    #[test]
    fn histogram_percentiles_match_exact_ones_within_a_bucket() {
        // Latencies from 0.2 ms to ~2 s, unevenly spread.
        let mut exact: Vec<u64> = (0..5000u64)
            .map(|i| 200 + (i * i * 37) % 2_000_000)
            .collect();
        let mut h = Histogram::default();
        for v in &exact {
            h.record(*v);
        }
        exact.sort();
        for p in [1.0, 50.0, 90.0, 99.0, 99.9, 100.0] {
            let want = percentile(&exact, p).unwrap();
            let got = h.percentile(p).unwrap();
            assert!(
                got >= want && got - want <= want / 128,
                "p{p}: exact {want}, histogram {got}"
            );
        }
        assert_eq!(h.max(), exact.last().copied());
        assert_eq!(h.len(), 5000);
        // Small values are exact.
        let mut h = Histogram::default();
        for v in [3, 1, 2, 5, 4] {
            h.record(v);
        }
        assert_eq!(h.percentile(50.0), Some(3));
        assert_eq!(h.percentile(99.0), Some(5));
        assert_eq!(Histogram::default().percentile(50.0), None);
    }

    #[test]
    fn errors_keep_counts_and_a_few_samples() {
        let mut e = Errors::default();
        for i in 0..8 {
            e.add(Kind::Http5xx, format!("503 number {i}"));
        }
        e.add(Kind::LostCell, "x".repeat(1000));
        assert_eq!(e.count(Kind::Http5xx), 8);
        assert_eq!(e.total(), 9);
        let (_, k) = e.iter().find(|(k, _)| *k == "http_5xx").unwrap();
        assert_eq!(k.samples.len(), SAMPLES);
        let (_, k) = e.iter().find(|(k, _)| *k == "lost_cell").unwrap();
        assert!(k.samples[0].len() <= 303);
        assert!(e.any_fatal());
        assert!(!Errors::default().any_fatal());
        assert!(Kind::Hung.fatal() && !Kind::Moved.fatal());
    }

    #[test]
    fn milliseconds_for_people() {
        assert_eq!(ms(Some(12_345)), "12.3 ms");
        assert_eq!(ms(Some(12_345_678)), "12.3 s");
        assert_eq!(ms(None), "-");
    }
}
