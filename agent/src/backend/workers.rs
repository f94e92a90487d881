//! The workers this backend knows: each announces itself on the worker port (a worker
//! certificate is required) and heartbeats with its load; the registry keeps them in memory for
//! placement and in PostgreSQL for everyone to see. A backend holds one TLS connection (a
//! `Link`) per worker it uses, carrying every session it placed there; a session's events are
//! routed to its workspace by session id. A link that breaks drops every route, which is how a
//! workspace learns its worker is gone. A worker that says it is draining gets no new session,
//! and the workspaces this backend has open there are moved away (`drain.rs`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::Backend;
use crate::frame;
use crate::proto::{Announce, AnnounceReply, Event, Request};

/// A worker is healthy while heartbeats arrive at least this often.
pub(super) const STALE: Duration = Duration::from_secs(20);
/// How long a worker whose announcements ended has to register again before its sessions are
/// given up (see `announcements_ended`).
const REANNOUNCE_GRACE: Duration = Duration::from_secs(15);

pub struct Entry {
    pub host: String,
    pub address: String,
    pub capacity: u32,
    pub engines: Vec<String>,
    /// Sessions the worker reported in its last heartbeat.
    pub sessions: u32,
    /// Sessions this backend placed there that no heartbeat has counted yet.
    pub placed: u32,
    /// When this backend last placed a session there.
    pub last_placed: Option<Instant>,
    pub last_seen: Instant,
    /// The announcement connection is up.
    pub announcing: bool,
    /// The worker is being drained: no new session goes there.
    pub draining: bool,
}

#[derive(Default)]
pub struct Registry {
    pub entries: Mutex<HashMap<String, Entry>>,
    links: Mutex<HashMap<String, Arc<Link>>>,
    /// Draining workers whose workspaces a task is moving away now (one task per worker).
    moving: Mutex<std::collections::HashSet<String>>,
}

/// One connection to a worker, shared by every session this backend placed there.
pub struct Link {
    pub host: String,
    tx: mpsc::Sender<Request>,
    routes: Mutex<HashMap<String, mpsc::UnboundedSender<Event>>>,
    dead: AtomicBool,
}

impl Link {
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Relaxed)
    }

    /// Events for `session` from now on go to the returned receiver; it ends when the link breaks.
    pub fn route(&self, session: &str) -> mpsc::UnboundedReceiver<Event> {
        let (tx, rx) = mpsc::unbounded_channel();
        if !self.is_dead() {
            self.routes.lock().unwrap().insert(session.to_string(), tx);
        }
        rx
    }

    pub fn unroute(&self, session: &str) {
        self.routes.lock().unwrap().remove(session);
    }

    pub async fn send(&self, r: Request) -> Result<(), String> {
        self.tx
            .send(r)
            .await
            .map_err(|_| format!("the connection to worker {} is closed", self.host))
    }

    fn die(&self) {
        self.dead.store(true, Ordering::Relaxed);
        self.routes.lock().unwrap().clear();
    }
}

impl Entry {
    /// Heard from lately and not draining: a worker that may take a session.
    fn takes_sessions(&self, now: Instant) -> bool {
        self.announcing && now - self.last_seen < STALE && !self.draining
    }

    fn has_room(&self) -> bool {
        self.sessions + self.placed < self.capacity
    }
}

/// What a worker's latest announcement said, as recorded for everyone to see.
struct Heard {
    sessions: u32,
    load: f64,
    draining: bool,
}

/// How long a placement may take to show in a worker's heartbeat (its engine starting).
const PLACEMENT_SHOWS: Duration = Duration::from_secs(10);

/// The placements still uncounted after a heartbeat reporting `sessions`: those the growth
/// since the last heartbeat does not account for. A heartbeat made while a placed session's
/// engine was still starting does not count it yet, and forgetting the placement then would
/// make the worker look emptier than it is (two sessions in a row to one worker of two idle
/// ones). Forgotten anyway once the last placement is older than [`PLACEMENT_SHOWS`].
fn counted(e: &Entry, sessions: u32) -> u32 {
    if e.last_placed.is_none_or(|t| t.elapsed() > PLACEMENT_SHOWS) {
        return 0;
    }
    e.placed.saturating_sub(sessions.saturating_sub(e.sessions))
}

/// The slots of a worker of `capacity` one account may hold: half, at least one.
pub fn fair_share(capacity: u32) -> u32 {
    (capacity / 2).max(1)
}

impl Registry {
    pub fn healthy(&self) -> usize {
        let now = Instant::now();
        self.entries
            .lock()
            .unwrap()
            .values()
            .filter(|e| e.announcing && now - e.last_seen < STALE)
            .count()
    }

    /// Healthy workers that are draining.
    pub fn draining(&self) -> usize {
        let now = Instant::now();
        self.entries
            .lock()
            .unwrap()
            .values()
            .filter(|e| e.announcing && now - e.last_seen < STALE && e.draining)
            .count()
    }

    /// Whether a healthy worker but `host` that is not draining has room for a session.
    pub fn room_elsewhere(&self, host: &str) -> bool {
        let now = Instant::now();
        self.entries
            .lock()
            .unwrap()
            .values()
            .any(|e| e.takes_sessions(now) && e.host != host && e.has_room())
    }

    /// The least loaded healthy worker with room, not draining, not in `exclude`, where the
    /// account does not already hold half the slots (`account_on`: its open workspaces per
    /// worker), so one account can never fill a worker and others always find room. `Err(true)`
    /// when workers had room but only past that share.
    pub fn pick(
        &self,
        exclude: &[String],
        account_on: &HashMap<String, u32>,
    ) -> Result<(String, String), bool> {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap();
        let mut share_refused = false;
        let best = entries
            .values_mut()
            .filter(|e| e.takes_sessions(now) && e.has_room())
            .filter(|e| !exclude.contains(&e.host))
            .filter(|e| {
                let fair = account_on.get(&e.host).copied().unwrap_or(0) < fair_share(e.capacity);
                share_refused |= !fair;
                fair
            })
            .min_by(|a, b| {
                let la = f64::from(a.sessions + a.placed) / f64::from(a.capacity.max(1));
                let lb = f64::from(b.sessions + b.placed) / f64::from(b.capacity.max(1));
                la.total_cmp(&lb).then_with(|| a.host.cmp(&b.host))
            })
            .ok_or(share_refused)?;
        best.placed += 1;
        best.last_placed = Some(Instant::now());
        Ok((best.host.clone(), best.address.clone()))
    }

    /// `host`, as `pick` would take it (healthy, not draining, with room), counted as placed.
    pub fn take(&self, host: &str) -> Option<(String, String)> {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap();
        let e = entries.get_mut(host)?;
        if !(e.takes_sessions(now) && e.has_room()) {
            return None;
        }
        e.placed += 1;
        e.last_placed = Some(Instant::now());
        Some((e.host.clone(), e.address.clone()))
    }

    /// Whether `host` has announced itself to this backend (live or not).
    pub fn knows(&self, host: &str) -> bool {
        self.entries.lock().unwrap().contains_key(host)
    }

    /// A session link to a worker ended: the worker is forgotten (as by [`Registry::down`]) if
    /// that link was the one in use. A duplicate made by a task that lost the race to connect
    /// (see `Backend::link`) ends unused when the worker closes it after its idle timeout; that
    /// must not take down the link in use (it did: every session on the worker saw
    /// `worker_lost` 10 s after a few workspaces opened at once).
    pub fn link_ended(&self, link: &Arc<Link>) {
        let current = {
            let links = self.links.lock().unwrap();
            links.get(&link.host).is_some_and(|l| Arc::ptr_eq(l, link))
        };
        if current {
            self.down(&link.host);
        }
    }

    /// Forgets a worker that failed us until it announces itself again.
    pub fn down(&self, host: &str) {
        if let Some(e) = self.entries.lock().unwrap().get_mut(host) {
            e.announcing = false;
        }
        if let Some(l) = self.links.lock().unwrap().remove(host) {
            l.die();
        }
    }
}

impl Backend {
    /// This backend's link to `host`, connecting if there is none (or it broke).
    pub async fn link(self: &Arc<Self>, host: &str, address: &str) -> Result<Arc<Link>, String> {
        if let Some(l) = self.workers.links.lock().unwrap().get(host) {
            if !l.is_dead() {
                return Ok(l.clone());
            }
        }
        let l = self
            .connect_worker(host, address)
            .await
            .map_err(|e| format!("connecting to worker {host}: {e:#}"))?;
        let mut links = self.workers.links.lock().unwrap();
        // Another task may have connected meanwhile: keep one.
        if let Some(existing) = links.get(host).filter(|x| !x.is_dead()) {
            return Ok(existing.clone());
        }
        links.insert(host.to_string(), l.clone());
        Ok(l)
    }

    async fn connect_worker(
        self: &Arc<Self>,
        host: &str,
        address: &str,
    ) -> anyhow::Result<Arc<Link>> {
        let cfg = self.identity.client_config(&["worker"])?;
        let tcp =
            tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(address)).await??;
        tcp.set_nodelay(true)?;
        let tls = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_rustls::TlsConnector::from(cfg)
                .connect(ServerName::try_from(host.to_string())?, tcp),
        )
        .await??;
        let (mut rd, mut wr) = tokio::io::split(tls);
        let (tx, mut rx) = mpsc::channel::<Request>(256);
        let link = Arc::new(Link {
            host: host.to_string(),
            tx,
            routes: Mutex::new(HashMap::new()),
            dead: AtomicBool::new(false),
        });
        let writer = tokio::spawn(async move {
            while let Some(r) = rx.recv().await {
                if frame::write(&mut wr, &r).await.is_err() {
                    break;
                }
            }
        });
        let (l, me) = (link.clone(), self.clone());
        tokio::spawn(async move {
            let max = me.config.max_worker_frame_bytes;
            loop {
                match frame::read::<Event, _>(&mut rd, max, Duration::from_secs(3600 * 24)).await {
                    Ok(ev) => {
                        let session = match &ev {
                            Event::Opened { session, .. }
                            | Event::Stdout { session, .. }
                            | Event::Stderr { session, .. }
                            | Event::Done { session, .. }
                            | Event::Saved { session, .. }
                            | Event::Image { session, .. }
                            | Event::FileResult { session, .. }
                            | Event::Closed { session, .. } => Some(session.clone()),
                            Event::Error { session, message } => {
                                if session.is_none() {
                                    tracing::warn!(worker = %l.host, "worker error: {message}");
                                }
                                session.clone()
                            }
                            Event::Pong { .. } => None,
                        };
                        let to = session.and_then(|s| l.routes.lock().unwrap().get(&s).cloned());
                        if let Some(to) = to {
                            let _ = to.send(ev);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(worker = %l.host, "lost the connection to the worker: {e}");
                        break;
                    }
                }
            }
            l.die();
            writer.abort();
            me.workers.link_ended(&l);
        });
        Ok(link)
    }

    /// Serves one worker's announcement connection (already TLS, role checked).
    pub async fn announcements<S>(self: Arc<Self>, mut s: S, peer: std::net::SocketAddr)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let first: Announce = match frame::read(&mut s, 1 << 16, Duration::from_secs(10)).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(%peer, "bad worker announcement: {e}");
                return;
            }
        };
        let Announce::Register {
            host,
            address,
            capacity,
            engines,
            draining,
        } = first
        else {
            tracing::warn!(%peer, "a worker must register before its heartbeats");
            return;
        };
        // The worker's session address must be on the host that connected.
        let ok_addr = address
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.ip() == peer.ip());
        if !ok_addr {
            tracing::warn!(%peer, %address, "refusing a worker announcing another host's address");
            return;
        }
        tracing::info!(worker = %host, %address, capacity, draining, "worker registered");
        self.fleet_event(
            &format!("worker {host} registered"),
            serde_json::json!({"worker": host, "address": address, "capacity": capacity, "draining": draining}),
        );
        self.workers.entries.lock().unwrap().insert(
            host.clone(),
            Entry {
                host: host.clone(),
                address: address.clone(),
                capacity,
                engines: engines.clone(),
                sessions: 0,
                placed: 0,
                last_placed: None,
                last_seen: Instant::now(),
                announcing: true,
                draining,
            },
        );
        let heard = Heard {
            sessions: 0,
            load: 0.0,
            draining,
        };
        self.record_worker(&host, &address, capacity, &engines, heard)
            .await;
        if frame::write(&mut s, &AnnounceReply::Ack).await.is_err() {
            self.announcements_ended(&host);
            return;
        }
        loop {
            match frame::read::<Announce, _>(&mut s, 1 << 16, STALE).await {
                Ok(Announce::Heartbeat {
                    sessions,
                    load,
                    draining,
                }) => {
                    if let Some(e) = self.workers.entries.lock().unwrap().get_mut(&host) {
                        e.placed = counted(e, sessions);
                        e.sessions = sessions;
                        e.last_seen = Instant::now();
                        e.announcing = true;
                        if e.draining != draining {
                            tracing::info!(worker = %host, draining, "worker draining changed");
                        }
                        e.draining = draining;
                    }
                    // At every heartbeat while draining, so what could not move yet (no room
                    // elsewhere, a failed save) is tried again.
                    if draining {
                        self.move_off_draining(&host);
                    }
                    let heard = Heard {
                        sessions,
                        load,
                        draining,
                    };
                    self.record_worker(&host, &address, capacity, &engines, heard)
                        .await;
                    if frame::write(&mut s, &AnnounceReply::Ack).await.is_err() {
                        break;
                    }
                }
                Ok(Announce::Register { .. }) => {
                    tracing::warn!(worker = %host, "registered twice on one connection");
                    break;
                }
                Err(e) => {
                    tracing::warn!(worker = %host, "worker announcements ended: {e}");
                    break;
                }
            }
        }
        self.announcements_ended(&host);
    }

    /// A worker's announcement connection ended: no new session goes there; the sessions open
    /// there keep their own connection (the link) for [`REANNOUNCE_GRACE`], long enough for a
    /// worker that only lost its announcement connection to register again (its reconnect
    /// backoff starts at 1 s). Only a worker still silent then is given up, its link closed and
    /// its workspaces reopened elsewhere. (Closing the link at once made every session of a
    /// live worker `worker_lost` at an announcement hiccup.)
    fn announcements_ended(self: &Arc<Self>, host: &str) {
        if let Some(e) = self.workers.entries.lock().unwrap().get_mut(host) {
            e.announcing = false;
        }
        let (me, host) = (self.clone(), host.to_string());
        tokio::spawn(async move {
            tokio::time::sleep(REANNOUNCE_GRACE).await;
            let back = me
                .workers
                .entries
                .lock()
                .unwrap()
                .get(&host)
                .is_some_and(|e| e.announcing);
            if !back {
                tracing::warn!(worker = %host, "the worker did not announce itself again: its sessions are given up");
                me.workers.down(&host);
            }
        });
    }

    /// Moves this backend's workspaces off the draining worker `host`, in a task of its own
    /// unless one is at it already.
    fn move_off_draining(self: &Arc<Self>, host: &str) {
        if !self.workers.moving.lock().unwrap().insert(host.to_string()) {
            return;
        }
        let (me, host) = (self.clone(), host.to_string());
        tokio::spawn(async move {
            me.move_workspaces_off(&host).await;
            me.workers.moving.lock().unwrap().remove(&host);
        });
    }

    async fn record_worker(
        &self,
        host: &str,
        address: &str,
        capacity: u32,
        engines: &[String],
        heard: Heard,
    ) {
        let Heard {
            sessions,
            load,
            draining,
        } = heard;
        let Ok(db) = self.db().await else { return };
        let r = db
            .execute(
                "INSERT INTO workers (host, address, capacity, engines, sessions, load, last_seen, seen_by, draining)
                 VALUES ($1, $2, $3, $4, $5, $6, now(), $7, $8)
                 ON CONFLICT (host) DO UPDATE SET address = $2, capacity = $3, engines = $4,
                   sessions = $5, load = $6, last_seen = now(), seen_by = $7, draining = $8",
                &[
                    &host,
                    &address,
                    &(capacity as i32),
                    &engines,
                    &(sessions as i32),
                    &load,
                    &self.config.host,
                    &draining,
                ],
            )
            .await;
        if let Err(e) = r {
            tracing::warn!("recording worker {host}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(host: &str) -> Arc<Link> {
        Arc::new(Link {
            host: host.into(),
            tx: mpsc::channel(1).0,
            routes: Mutex::new(HashMap::new()),
            dead: AtomicBool::new(false),
        })
    }

    #[test]
    fn a_duplicate_link_ending_leaves_the_one_in_use() {
        let r = registry(&[("w1", 8, 0)]);
        let used = link("w1");
        r.links.lock().unwrap().insert("w1".into(), used.clone());
        // A second connection made by a task that lost the race, closed by the worker later.
        r.link_ended(&link("w1"));
        assert!(!used.is_dead());
        assert!(r.links.lock().unwrap().contains_key("w1"));
        assert!(r.take("w1").is_some(), "w1 still takes sessions");
        // The link in use ending is the worker lost.
        r.link_ended(&used);
        assert!(used.is_dead());
        assert!(!r.links.lock().unwrap().contains_key("w1"));
        assert!(r.take("w1").is_none());
    }

    #[test]
    fn a_placement_counts_until_a_heartbeat_shows_it() {
        let r = registry(&[("w1", 8, 0), ("w2", 8, 0)]);
        let none = HashMap::new();
        assert_eq!(r.pick(&[], &none).unwrap().0, "w1");
        // A heartbeat from w1 made before its new session's engine started: still 0.
        let mut entries = r.entries.lock().unwrap();
        let e = entries.get_mut("w1").unwrap();
        e.placed = counted(e, 0);
        e.sessions = 0;
        assert_eq!(e.placed, 1, "not counted yet: still placed");
        drop(entries);
        assert_eq!(
            r.pick(&[], &none).unwrap().0,
            "w2",
            "w1 is not emptier than it is"
        );
        // Once a heartbeat shows the session, the placement is no longer counted twice.
        let mut entries = r.entries.lock().unwrap();
        let e = entries.get_mut("w1").unwrap();
        e.placed = counted(e, 1);
        assert_eq!(e.placed, 0);
    }

    fn registry(workers: &[(&str, u32, u32)]) -> Registry {
        let r = Registry::default();
        for (host, capacity, sessions) in workers {
            r.entries.lock().unwrap().insert(
                host.to_string(),
                Entry {
                    host: host.to_string(),
                    address: format!("{host}:1"),
                    capacity: *capacity,
                    engines: vec!["python3".into()],
                    sessions: *sessions,
                    placed: 0,
                    last_placed: None,
                    last_seen: Instant::now(),
                    announcing: true,
                    draining: false,
                },
            );
        }
        r
    }

    #[test]
    fn a_draining_worker_gets_no_new_session() {
        let r = registry(&[("w1", 8, 0), ("w2", 8, 6)]);
        let none = HashMap::new();
        r.entries.lock().unwrap().get_mut("w1").unwrap().draining = true;
        assert_eq!(r.draining(), 1);
        // The emptier w1 is draining: w2, though busier.
        assert_eq!(r.pick(&[], &none).unwrap().0, "w2");
        assert!(r.room_elsewhere("w1"));
        // w2 full: nowhere to go, and w1 is still not used.
        r.entries.lock().unwrap().get_mut("w2").unwrap().sessions = 8;
        assert_eq!(r.pick(&[], &none), Err(false));
        assert!(!r.room_elsewhere("w1"));
        // Undrained: w1 again.
        r.entries.lock().unwrap().get_mut("w1").unwrap().draining = false;
        assert_eq!(r.pick(&[], &none).unwrap().0, "w1");
        assert_eq!(r.draining(), 0);
        assert!(r.room_elsewhere("w2"), "w1 has room again");
    }

    #[test]
    fn one_account_never_takes_more_than_half_a_worker() {
        let r = registry(&[("w1", 8, 0), ("w2", 8, 6)]);
        let none = HashMap::new();
        assert_eq!(r.pick(&[], &none).unwrap().0, "w1", "the least loaded");
        // The account already holds half of w1: w2 then, though it is busier.
        let on = HashMap::from([("w1".to_string(), 4)]);
        assert_eq!(r.pick(&[], &on).unwrap().0, "w2");
        // Half of both: refused, and the refusal says it is the share.
        let on = HashMap::from([("w1".to_string(), 4), ("w2".to_string(), 4)]);
        assert_eq!(r.pick(&[], &on), Err(true));
        // A full worker is no share refusal.
        let full = registry(&[("w1", 2, 2)]);
        assert_eq!(full.pick(&[], &none), Err(false));
        assert_eq!(fair_share(1), 1);
        assert_eq!(fair_share(9), 4);
    }
}
