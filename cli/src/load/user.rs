//! One simulated person: signs up (or in, when the account exists), creates a workspace and
//! opens it, then runs a cell every second (`--interval`; it prints its number's square and appends the
//! number to `notes.txt`) and saves every ten seconds until the load stops; then checks the
//! workspace from the inside: every cell acknowledged ok appended its line once and in order,
//! every acknowledged save is in the history. One tokio task each, no thread.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;

use super::client::{CallError, Client, PATIENCE, REOPEN_PATIENCE, Seen};
use super::http::Site;
use super::proto::{Commit, Op};
use super::stats::{Kind, Shared};
use super::transport;

/// An execute without `done` this long after it was sent is hung.
pub const HUNG_AFTER: Duration = Duration::from_secs(60);

/// A save every this long.
const SAVE_EVERY: Duration = Duration::from_secs(10);

/// How long a user keeps trying to sign up (a limit's `Retry-After` waited out).
const SIGNUP_PATIENCE: Duration = Duration::from_secs(300);

/// What every user of a run shares.
pub struct Plan {
    pub site: Arc<Site>,
    pub shared: Arc<Shared>,
    pub tag: String,
    pub password: String,
    /// Unix seconds of the run's start, in workspace names (unique across runs of one tag).
    pub stamp: u64,
    /// Keep the workspaces afterwards (otherwise deleted once verified).
    pub keep: bool,
    /// A cell every this long.
    pub interval: Duration,
}

/// What became of one cell, for the verification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged: `done` with status ok. Its line must be there, once.
    Ok,
    /// Sent, end unknown (lost with the connection, hung, killed, failed): its line may or may
    /// not be there, once at most.
    Unknown,
    /// Refused or never taken: its line must not be there.
    NotRun,
    /// Acknowledged, then its worker was lost before a save took it: the workspace reopened
    /// from its last save, so its line may be gone (unsaved work dies with its worker; what
    /// was saved must not).
    Unsaved,
}

/// A save the server acknowledged.
#[derive(Clone, Debug, Serialize)]
pub struct SaveRecord {
    pub message: String,
    /// Whether the save made a commit (nothing new since a move or handover saved: false).
    pub changed: bool,
    /// The commit: from the reply when it gives one, otherwise found in the history by its
    /// message at verification.
    pub commit: Option<String>,
    /// Cells acknowledged ok before it: the lines notes.txt must hold at this save.
    pub cells_ok_before: u32,
    /// Cells sent before it (those of unknown end may add lines).
    pub cells_sent_before: u32,
    pub at_seconds: f64,
}

/// The check made after the load.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Verification {
    /// Whether the check could be made.
    pub checked: bool,
    pub ok: bool,
    /// Lines notes.txt held.
    pub notes_lines: Option<usize>,
    pub cells_ok: u32,
    /// What was wrong with notes.txt (the first ones), and how many things.
    pub lost_cells: Vec<String>,
    pub lost_cells_count: usize,
    /// Acknowledged saves missing from the history.
    pub lost_saves: Vec<String>,
    /// Why the check could not be made.
    pub error: Option<String>,
}

/// One user's run, as the JSON report gives it.
#[derive(Clone, Debug, Serialize)]
pub struct UserRecord {
    pub user: u32,
    pub account: String,
    pub password: String,
    pub transport: transport::Kind,
    pub source_address: Option<IpAddr>,
    /// Whether the account was made by this run (false: it existed and was signed in to).
    pub new_account: Option<bool>,
    pub workspace: Option<String>,
    /// Whether the workspace was deleted after a passing verification.
    pub deleted: bool,
    /// Seconds from the user's start to its workspace open.
    pub ready_after_seconds: Option<f64>,
    /// Why the user stopped before working, if it did.
    pub gave_up: Option<String>,
    pub cells_sent: u32,
    /// Every execute's final status: ok, error, killed, lost (the connection), hung,
    /// rejected, no_session, wrong_output.
    pub executes: BTreeMap<String, u32>,
    pub saves: Vec<SaveRecord>,
    pub seen: Seen,
    pub verification: Verification,
}

/// The check of notes.txt against the cells' outcomes: what is wrong (each a `lost_cell`).
pub fn check_notes(outcomes: &[Outcome], text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let mut seen = vec![false; outcomes.len()];
    let mut last: Option<usize> = None;
    for (n, line) in text.lines().enumerate() {
        let Ok(k) = line.trim().parse::<usize>() else {
            problems.push(format!("line {} is {line:?}, no cell's number", n + 1));
            continue;
        };
        if k >= outcomes.len() {
            problems.push(format!("line {} names cell {k}, never sent", n + 1));
            continue;
        }
        if seen[k] {
            problems.push(format!("cell {k}'s line is there twice"));
            continue;
        }
        if let Some(l) = last
            && k < l
        {
            problems.push(format!("cell {k}'s line comes after cell {l}'s"));
        }
        if outcomes[k] == Outcome::NotRun {
            problems.push(format!("cell {k} was refused, yet its line is there"));
        }
        seen[k] = true;
        last = Some(last.map_or(k, |l| l.max(k)));
    }
    let missing: Vec<usize> = (0..outcomes.len())
        .filter(|&k| outcomes[k] == Outcome::Ok && !seen[k])
        .collect();
    for k in missing {
        problems.push(format!("cell {k} ran ok but its line is missing"));
    }
    problems
}

/// The check of acknowledged saves against the history: the messages of those that made a
/// commit and are not there. Fills in the commits found.
pub fn check_saves(saves: &mut [SaveRecord], history: &[Commit]) -> Vec<String> {
    let mut lost = Vec::new();
    for s in saves.iter_mut() {
        match history.iter().find(|c| c.message == s.message) {
            Some(c) if s.commit.is_none() => s.commit = Some(c.commit.clone()),
            Some(_) => {}
            None if s.changed => lost.push(s.message.clone()),
            None => {}
        }
    }
    lost
}

/// The code of cell `i`.
pub fn cell(i: u32) -> String {
    format!("print({i} * {i})\n_ = open('notes.txt', 'a').write('{i}\\n')")
}

struct User {
    n: u32,
    plan: Arc<Plan>,
    c: Client,
    rec: UserRecord,
    outcomes: Vec<Outcome>,
    /// Executes given up on (hung): their cell, should a late `done` come.
    late: BTreeMap<u64, u32>,
    started: Instant,
    /// Cells acknowledged since the last acknowledged save (a lost worker takes them along).
    since_save: Vec<usize>,
    /// Worker losses already accounted for.
    losses_seen: u32,
}

impl User {
    fn status(&mut self, s: &str) {
        *self.rec.executes.entry(s.to_string()).or_default() += 1;
    }

    /// Signs up, or in when the account exists: whether it was new.
    async fn sign_up(&mut self, stop: &watch::Receiver<bool>) -> Result<bool, String> {
        let deadline = Instant::now() + SIGNUP_PATIENCE;
        let body = serde_json::json!({"name": self.rec.account, "password": self.plan.password})
            .to_string();
        let mut path = "/api/signup";
        let mut failures = 0;
        loop {
            if *stop.borrow() || Instant::now() > deadline {
                return Err(format!(
                    "{path}: no success within {} s",
                    SIGNUP_PATIENCE.as_secs()
                ));
            }
            let t = Instant::now();
            let r = match self.c.rest(path, &body).await {
                Ok(r) => r,
                Err(e) => {
                    self.c.error(e.kind(), format!("{path}: {e}"));
                    failures += 1;
                    tokio::time::sleep(super::client::backoff(failures, 0.5)).await;
                    continue;
                }
            };
            let text = String::from_utf8_lossy(&r.body[..r.body.len().min(300)])
                .trim()
                .to_string();
            match r.status {
                200 => {
                    let us = t.elapsed().as_micros() as u64;
                    self.plan.shared.signup_latency.lock().unwrap().record(us);
                    let new = path == "/api/signup";
                    let counter = if new {
                        &self.plan.shared.signups
                    } else {
                        &self.plan.shared.signins
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    self.c.rest_done();
                    return Ok(new);
                }
                409 if path == "/api/signup" => path = "/api/signin",
                429 => {
                    let wait = r
                        .header("retry-after")
                        .and_then(|s| s.trim().parse::<u64>().ok())
                        .or_else(|| {
                            serde_json::from_slice::<serde_json::Value>(&r.body)
                                .ok()
                                .and_then(|v| v["retry_after"].as_u64())
                        })
                        .unwrap_or(10)
                        .clamp(1, 600);
                    self.c.error(
                        Kind::Throttled,
                        format!("{path}: 429, retry after {wait} s: {text}"),
                    );
                    let left = deadline.saturating_duration_since(Instant::now());
                    tokio::time::sleep(Duration::from_secs(wait).min(left)).await;
                }
                s => return Err(format!("{path}: HTTP {s}: {text}")),
            }
        }
    }

    /// Creates the workspace and opens it (a backend without room answers 503: tried again,
    /// backing off, for a minute).
    async fn create_and_open(&mut self) -> Result<(), String> {
        let name = format!("load-{}-{}-{}", self.plan.tag, self.n, self.plan.stamp);
        let r = self
            .c
            .call(&Op::Create { name }, Instant::now() + PATIENCE)
            .await
            .map_err(|e| format!("create: {e}"))?;
        if !r.ok {
            return Err(format!("create: {}", r.refusal()));
        }
        let ws = r.workspace.ok_or("create: the reply names no workspace")?;
        self.rec.workspace = Some(ws.clone());
        let until = Instant::now() + REOPEN_PATIENCE;
        let mut wait = Duration::from_millis(500);
        loop {
            let op = Op::Open {
                workspace: ws.clone(),
            };
            match self.c.call(&op, Instant::now() + PATIENCE).await {
                Ok(r) if r.ok => {
                    self.c.workspace = Some(ws);
                    return Ok(());
                }
                Ok(r) if r.status == Some(503) && Instant::now() < until => {
                    self.c
                        .error(Kind::Rejected, format!("open: {}", r.refusal()));
                }
                Ok(r) => return Err(format!("open: {}", r.refusal())),
                // Opening again is harmless: a lost one is sent again.
                Err(CallError::Lost) if Instant::now() < until => {
                    self.c.error(Kind::ConnectionLost, "open");
                }
                Err(e) => return Err(format!("open: {e}")),
            }
            // Listening meanwhile, as a browser does (a polling session left without a poll
            // for 5 s is closed by the server).
            let _ = self.c.idle(Instant::now() + wait).await;
            wait = (wait * 2).min(Duration::from_secs(8));
        }
    }

    /// Runs cell `i`: its outcome.
    async fn run_cell(&mut self, i: u32, ws: &str) -> Outcome {
        let op = Op::Execute {
            workspace: ws.to_string(),
            code: cell(i),
        };
        let phase = self.plan.shared.phase();
        let sent = Instant::now();
        let id = match self.c.start(&op, sent + PATIENCE).await {
            Ok(id) => id,
            Err(e) => {
                self.status("no_session");
                self.c.error(Kind::Timeout, format!("cell {i}: {e}"));
                return Outcome::NotRun;
            }
        };
        match self.c.reply(id, sent + PATIENCE).await {
            Ok(r) if r.ok => {}
            Ok(r) => {
                self.status("rejected");
                self.c
                    .error(Kind::Rejected, format!("cell {i}: {}", r.refusal()));
                return Outcome::NotRun;
            }
            Err(CallError::Lost) => {
                self.status("lost");
                self.c.error(
                    Kind::ConnectionLost,
                    format!("cell {i}: execute: {}", CallError::Lost),
                );
                return Outcome::Unknown;
            }
            Err(e) => {
                self.status("no_session");
                self.c
                    .error(Kind::Timeout, format!("cell {i}: execute: {e}"));
                return Outcome::Unknown;
            }
        }
        match self.c.done(id, sent + HUNG_AFTER).await {
            Ok(d) => {
                let micros = d.at.duration_since(sent).as_micros() as u64;
                self.plan.shared.executed(phase, micros);
                let want = u64::from(i) * u64::from(i);
                match d.status.as_str() {
                    "ok" if d.stdout.trim() == want.to_string() => {
                        self.status("ok");
                        Outcome::Ok
                    }
                    "ok" => {
                        self.status("wrong_output");
                        self.c.error(
                            Kind::CellError,
                            format!("cell {i} printed {:?}, not {want}", d.stdout),
                        );
                        Outcome::Ok
                    }
                    s => {
                        self.status(s);
                        let kind = if s == "killed" {
                            Kind::Killed
                        } else {
                            Kind::CellError
                        };
                        self.c.error(
                            kind,
                            format!(
                                "cell {i} ended {s}: {} {}",
                                d.message.unwrap_or_default(),
                                d.stderr.trim()
                            ),
                        );
                        Outcome::Unknown
                    }
                }
            }
            Err(CallError::Lost) => {
                self.status("lost");
                self.c.error(
                    Kind::ConnectionLost,
                    format!("cell {i}: the connection was lost while it ran"),
                );
                Outcome::Unknown
            }
            Err(CallError::Timeout) => {
                self.status("hung");
                self.c.error(
                    Kind::Hung,
                    format!("cell {i}: no `done` within {} s", HUNG_AFTER.as_secs()),
                );
                self.late.insert(id, i);
                Outcome::Unknown
            }
            Err(e) => {
                self.status("no_session");
                self.c.error(Kind::Timeout, format!("cell {i}: {e}"));
                Outcome::Unknown
            }
        }
    }

    /// A worker lost since the last look (`worker_lost`, or a move off a lost worker): the cells
    /// acknowledged since the last save are gone with it, expectedly. Then the newest cell is
    /// counted from here (it ran on the new worker when its `done` came after the event).
    fn after_losses(&mut self) {
        let lost = self.c.seen.worker_lost;
        if lost > self.losses_seen {
            self.losses_seen = lost;
            for k in self.since_save.drain(..) {
                if self.outcomes[k] == Outcome::Ok {
                    self.outcomes[k] = Outcome::Unsaved;
                }
            }
        }
        if let Some(k) = self.outcomes.len().checked_sub(1)
            && self.outcomes[k] == Outcome::Ok
        {
            self.since_save.push(k);
        }
    }

    /// A save acknowledged: what ran before it is in it, unless a loss came first.
    fn after_losses_before_save(&mut self) {
        if self.c.seen.worker_lost > self.losses_seen {
            self.losses_seen = self.c.seen.worker_lost;
            for k in self.since_save.drain(..) {
                if self.outcomes[k] == Outcome::Ok {
                    self.outcomes[k] = Outcome::Unsaved;
                }
            }
        }
        self.since_save.clear();
    }

    /// `done`s that came for cells given up on: an ok one makes its line expected.
    fn late_dones(&mut self) {
        for d in self.c.take_dones() {
            if let Some(i) = self.late.remove(&d.id)
                && d.status == "ok"
            {
                self.outcomes[i as usize] = Outcome::Ok;
            }
        }
    }

    async fn save(&mut self, k: u32, ws: &str) {
        let message = format!("load save {k}");
        let op = Op::Save {
            workspace: ws.to_string(),
            message: message.clone(),
        };
        let phase = self.plan.shared.phase();
        match self.c.call(&op, Instant::now() + PATIENCE).await {
            Ok(r) if r.ok => {
                self.plan.shared.saved(phase);
                self.after_losses_before_save();
                let ok = self.outcomes.iter().filter(|o| **o == Outcome::Ok).count();
                self.rec.saves.push(SaveRecord {
                    message,
                    changed: r.changed.unwrap_or(true),
                    commit: r.commit,
                    cells_ok_before: ok as u32,
                    cells_sent_before: self.outcomes.len() as u32,
                    at_seconds: self.plan.shared.started.elapsed().as_secs_f64(),
                });
            }
            Ok(r) => self
                .c
                .error(Kind::Rejected, format!("{message}: {}", r.refusal())),
            Err(CallError::Lost) => self.c.error(
                Kind::ConnectionLost,
                format!("{message}: {}", CallError::Lost),
            ),
            Err(e) => self.c.error(Kind::Timeout, format!("{message}: {e}")),
        }
    }

    /// The check from the inside, after the load.
    async fn verify(&mut self, ws: &str) {
        let v = &mut self.rec.verification;
        v.cells_ok = self.outcomes.iter().filter(|o| **o == Outcome::Ok).count() as u32;
        let deadline = Instant::now() + PATIENCE;
        let read = Op::Read {
            workspace: ws.to_string(),
            path: "notes.txt".into(),
        };
        let notes = match self.c.call(&read, deadline).await {
            Ok(r) if r.ok => r.data.unwrap_or_default(),
            // No cell appended anything: there is no file.
            Ok(r) if r.status == Some(404) && !self.outcomes.contains(&Outcome::Ok) => {
                String::new()
            }
            Ok(r) => {
                self.rec.verification.error = Some(format!("reading notes.txt: {}", r.refusal()));
                return;
            }
            Err(e) => {
                self.rec.verification.error = Some(format!("reading notes.txt: {e}"));
                return;
            }
        };
        let history = match self
            .c
            .call(
                &Op::History {
                    workspace: ws.to_string(),
                },
                deadline,
            )
            .await
        {
            Ok(r) if r.ok => r.history.unwrap_or_default(),
            Ok(r) => {
                self.rec.verification.error = Some(format!("history: {}", r.refusal()));
                return;
            }
            Err(e) => {
                self.rec.verification.error = Some(format!("history: {e}"));
                return;
            }
        };
        let cells = check_notes(&self.outcomes, &notes);
        let saves = check_saves(&mut self.rec.saves, &history);
        for p in &cells {
            self.c
                .error(Kind::LostCell, format!("{}: {p}", self.rec.account));
        }
        for s in &saves {
            self.c.error(
                Kind::LostSave,
                format!(
                    "{}: {s:?} acknowledged, not in the history",
                    self.rec.account
                ),
            );
        }
        let v = &mut self.rec.verification;
        v.checked = true;
        v.ok = cells.is_empty() && saves.is_empty();
        v.notes_lines = Some(notes.lines().count());
        v.lost_cells_count = cells.len();
        v.lost_cells = cells.into_iter().take(20).collect();
        v.lost_saves = saves;
    }
}

/// One user from `start_at` until `stop` says so, then verified: its record.
pub async fn run(
    n: u32,
    kind: transport::Kind,
    source: Option<IpAddr>,
    plan: Arc<Plan>,
    start_at: Instant,
    stop: watch::Receiver<bool>,
) -> UserRecord {
    tokio::time::sleep_until(start_at.into()).await;
    let account = format!("load-{}-{n}", plan.tag);
    let seed = u64::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ plan.stamp;
    let mut u = User {
        n,
        c: Client::new(plan.shared.clone(), plan.site.clone(), source, kind, seed),
        rec: UserRecord {
            user: n,
            account,
            password: plan.password.clone(),
            transport: kind,
            source_address: source,
            new_account: None,
            workspace: None,
            deleted: false,
            ready_after_seconds: None,
            gave_up: None,
            cells_sent: 0,
            executes: BTreeMap::new(),
            saves: Vec::new(),
            seen: Seen::default(),
            verification: Verification::default(),
        },
        outcomes: Vec::new(),
        late: BTreeMap::new(),
        started: Instant::now(),
        since_save: Vec::new(),
        losses_seen: 0,
        plan,
    };
    let shared = u.plan.shared.clone();
    let ready = async {
        let new = u
            .sign_up(&stop)
            .await
            .map_err(|e| (Kind::SignupFailed, e))?;
        u.rec.new_account = Some(new);
        u.c.connect(Instant::now() + PATIENCE)
            .await
            .map_err(|e| (Kind::OpenFailed, format!("connecting: {e}")))?;
        u.create_and_open().await.map_err(|e| (Kind::OpenFailed, e))
    }
    .await;
    if let Err((kind, why)) = ready {
        u.c.error(kind, format!("{}: {why}", u.rec.account));
        u.rec.gave_up = Some(why);
        shared.gave_up.fetch_add(1, Ordering::SeqCst);
        u.finish().await;
        return u.done();
    }
    let ws = u.c.workspace.clone().expect("opened");
    let ready_after = u.started.elapsed();
    u.rec.ready_after_seconds = Some(ready_after.as_secs_f64());
    shared
        .ready_latency
        .lock()
        .unwrap()
        .record(ready_after.as_micros() as u64);
    shared.ready.fetch_add(1, Ordering::SeqCst);

    let mut i = 0u32;
    let mut last_save = Instant::now();
    let mut saves = 0;
    while !*stop.borrow() {
        let t = Instant::now();
        let o = u.run_cell(i, &ws).await;
        u.outcomes.push(o);
        u.late_dones();
        u.after_losses();
        i += 1;
        if last_save.elapsed() >= SAVE_EVERY && !*stop.borrow() {
            saves += 1;
            u.save(saves, &ws).await;
            last_save = Instant::now();
        }
        let next = t + u.plan.interval;
        while !*stop.borrow() && Instant::now() < next {
            let step = next.min(Instant::now() + Duration::from_millis(250));
            if let Err(e) = u.c.idle(step).await {
                u.c.error(Kind::Timeout, format!("between cells: {e}"));
            }
        }
    }
    u.rec.cells_sent = i;
    u.late_dones();
    u.verify(&ws).await;
    u.finish().await;
    u.done()
}

impl User {
    /// Deletes the workspace (unless kept, or its check failed: left for a look), or closes
    /// it, and ends the session.
    async fn finish(&mut self) {
        let verified = self.rec.verification.ok || self.rec.gave_up.is_some();
        if let (Some(ws), false, true) = (self.rec.workspace.clone(), self.plan.keep, verified) {
            let op = Op::Delete { workspace: ws };
            if let Ok(r) = self.c.call(&op, Instant::now() + PATIENCE).await {
                self.rec.deleted = r.ok;
            }
        }
        // A person closing the tab's workspace: its session on the worker ends now, not at
        // the idle timeout.
        if let (Some(ws), false) = (self.rec.workspace.clone(), self.rec.deleted) {
            let op = Op::Close { workspace: ws };
            let _ = self
                .c
                .call(&op, Instant::now() + Duration::from_secs(30))
                .await;
        }
        self.c.close();
        self.plan.shared.finished.fetch_add(1, Ordering::SeqCst);
    }

    fn done(mut self) -> UserRecord {
        self.rec.seen = self.c.seen.clone();
        self.rec
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Outcome::*;

    #[test]
    fn every_ok_cell_once_and_in_order() {
        assert!(check_notes(&[Ok, Ok, Ok], "0\n1\n2\n").is_empty());
        assert!(check_notes(&[], "").is_empty());
        // Unknown cells may or may not be there.
        assert!(check_notes(&[Ok, Unknown, Ok, Unknown], "0\n1\n2\n").is_empty());
        assert!(check_notes(&[Ok, Unknown, Ok], "0\n2\n").is_empty());
        assert!(check_notes(&[Ok, NotRun, Ok], "0\n2\n").is_empty());
    }

    #[test]
    fn a_missing_doubled_misplaced_or_stray_line_is_a_lost_cell() {
        assert_eq!(
            check_notes(&[Ok, Ok, Ok], "0\n2\n"),
            ["cell 1 ran ok but its line is missing"]
        );
        assert_eq!(
            check_notes(&[Ok, Ok], "0\n1\n1\n"),
            ["cell 1's line is there twice"]
        );
        assert_eq!(
            check_notes(&[Ok, Ok, Ok], "0\n2\n1\n"),
            ["cell 1's line comes after cell 2's"]
        );
        assert_eq!(
            check_notes(&[Ok, NotRun], "0\n1\n"),
            ["cell 1 was refused, yet its line is there"]
        );
        assert_eq!(
            check_notes(&[Ok], "0\n7\nhello\n"),
            [
                "line 2 names cell 7, never sent",
                "line 3 is \"hello\", no cell's number"
            ]
        );
        // A worker lost: the workspace reopened from its last save, the cells since are gone.
        assert_eq!(check_notes(&[Ok, Ok, Ok, Ok], "0\n1\n").len(), 2);
    }

    fn save(message: &str, changed: bool) -> SaveRecord {
        SaveRecord {
            message: message.into(),
            changed,
            commit: None,
            cells_ok_before: 0,
            cells_sent_before: 0,
            at_seconds: 0.0,
        }
    }

    #[test]
    fn every_acknowledged_save_that_made_a_commit_is_in_the_history() {
        let history = vec![
            Commit {
                commit: "c2".into(),
                message: "load save 2".into(),
            },
            Commit {
                commit: "c1".into(),
                message: "load save 1".into(),
            },
        ];
        let mut saves = vec![
            save("load save 1", true),
            save("load save 2", true),
            save("load save 3", false),
        ];
        assert!(check_saves(&mut saves, &history).is_empty());
        assert_eq!(saves[0].commit.as_deref(), Some("c1"));
        assert_eq!(saves[1].commit.as_deref(), Some("c2"));
        assert_eq!(saves[2].commit, None);
        let mut saves = vec![save("load save 4", true)];
        assert_eq!(check_saves(&mut saves, &history), ["load save 4"]);
    }

    #[test]
    fn a_cell_prints_its_square_and_appends_its_number() {
        assert_eq!(
            cell(12),
            "print(12 * 12)\n_ = open('notes.txt', 'a').write('12\\n')"
        );
    }
}
