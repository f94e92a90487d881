//! One backend connection: TLS handshake (the verifier has already checked the backend role),
//! then requests in and events out. A frame that is too large, truncated or not a request ends
//! the connection with one error event; sessions it opened live on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;

use super::Shared;
use super::session::{self, Cmd, Sink};
use crate::frame::{self, FrameError};
use crate::proto::{Event, Request, valid_session_id};

const IDLE: Duration = Duration::from_secs(600);

/// Connections from backends, for the service's accept loop: at most `limit` at once.
pub struct Backends {
    pub shared: Arc<Shared>,
    pub limit: Arc<tokio::sync::Semaphore>,
}

impl crate::service::Handler for Backends {
    type Permit = tokio::sync::OwnedSemaphorePermit;

    fn admit(&self, peer: SocketAddr) -> Option<Self::Permit> {
        let permit = self.limit.clone().try_acquire_owned().ok();
        if permit.is_none() {
            tracing::warn!(%peer, "too many connections: refused");
        }
        permit
    }

    fn refused(&self, peer: SocketAddr, why: &str) {
        self.shared.metrics.refused_connections.inc();
        tracing::warn!(%peer, "refused at the TLS handshake: {why}");
    }

    async fn serve(&self, tls: TlsStream<TcpStream>, peer: SocketAddr, _: Self::Permit) {
        serve(tls, peer, self.shared.clone()).await;
    }
}

async fn serve(tls: TlsStream<TcpStream>, peer: SocketAddr, shared: Arc<Shared>) {
    let (mut rd, mut wr) = tokio::io::split(tls);
    let (tx, mut rx) = mpsc::channel::<Event>(256);
    let writer = tokio::spawn(async move {
        while let Some(e) = rx.recv().await {
            if frame::write(&mut wr, &e).await.is_err() {
                break;
            }
        }
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut wr).await;
    });
    let sink: Sink = Arc::new(tokio::sync::Mutex::new(Some(tx.clone())));
    let mut deadline = Duration::from_secs(shared.config.first_frame_seconds);
    loop {
        // Between frames a backend may be quiet for long; a frame once begun must arrive whole.
        let body = Duration::from_secs(shared.config.first_frame_seconds);
        let req: Request =
            match frame::read_in(&mut rd, shared.config.max_frame_bytes, deadline, body).await {
                Ok(r) => r,
                Err(FrameError::Closed) => break,
                Err(e) => {
                    shared.metrics.bad_frames.inc();
                    tracing::warn!(%peer, "closing the connection: {e}");
                    let _ = tx
                        .send(Event::Error {
                            session: None,
                            message: format!("closing the connection: {e}"),
                        })
                        .await;
                    break;
                }
            };
        deadline = IDLE;
        shared.heard_from_backend();
        handle(req, &shared, &sink, &tx).await;
    }
    // Sessions keep running; their events have nowhere to go until a backend speaks for them.
    *sink.lock().await = None;
    drop(tx);
    let _ = writer.await;
}

async fn handle(req: Request, shared: &Arc<Shared>, sink: &Sink, tx: &mpsc::Sender<Event>) {
    let err = |session: Option<String>, message: String| Event::Error { session, message };
    let session_id = match &req {
        Request::Open { session, .. }
        | Request::Execute { session, .. }
        | Request::Interrupt { session }
        | Request::Save { session, .. }
        | Request::File { session, .. }
        | Request::Close { session } => Some(session.clone()),
        Request::Ping | Request::Drain { .. } => None,
    };
    if let Some(s) = &session_id {
        if !valid_session_id(s) {
            let _ = tx
                .send(err(
                    None,
                    format!(
                        "invalid session id {s:?}: lowercase letters, digits and '-', at most 48"
                    ),
                ))
                .await;
            return;
        }
    }
    let existing = session_id
        .as_ref()
        .and_then(|s| shared.sessions.lock().unwrap().get(s).cloned());
    match req {
        Request::Drain { on } => {
            match super::drain::set(&shared.config.state_dir, on) {
                Ok(changed) => {
                    tracing::info!(
                        draining = on,
                        changed,
                        "drain flag set by a backend (an operator's action)"
                    )
                }
                Err(e) => {
                    let _ = tx
                        .send(err(None, format!("setting the drain flag: {e}")))
                        .await;
                    return;
                }
            }
            let _ = tx
                .send(Event::Pong {
                    sessions: shared.session_count(),
                    capacity: shared.config.max_sessions,
                })
                .await;
        }
        Request::Ping => {
            let _ = tx
                .send(Event::Pong {
                    sessions: shared.session_count(),
                    capacity: shared.config.max_sessions,
                })
                .await;
        }
        Request::Open {
            session,
            bundle,
            limits,
        } => {
            if existing.is_some() {
                let _ = tx
                    .send(err(Some(session), "this session is already open".into()))
                    .await;
                return;
            }
            if shared.session_count() >= shared.config.max_sessions {
                let _ = tx
                    .send(err(
                        Some(session),
                        format!(
                            "the worker is full ({} sessions)",
                            shared.config.max_sessions
                        ),
                    ))
                    .await;
                return;
            }
            let limits = limits.map_or(shared.config.limits.clone(), |l| {
                l.min(&shared.config.limits)
            });
            // Reserve the name now so a second open races nowhere; creation runs in the background.
            let (shared, tx, sink) = (shared.clone(), tx.clone(), sink.clone());
            let session_sink: Sink = Arc::new(tokio::sync::Mutex::new(sink.lock().await.clone()));
            let placeholder = Arc::new(session::Handle {
                tx: mpsc::channel(1).0,
                stop: Default::default(),
                sink: session_sink.clone(),
                pid: 0,
                uid: 0,
            });
            shared
                .sessions
                .lock()
                .unwrap()
                .insert(session.clone(), placeholder);
            tokio::spawn(async move {
                match session::open(
                    shared.clone(),
                    session.clone(),
                    bundle,
                    limits,
                    session_sink,
                )
                .await
                {
                    Ok((h, opened)) => {
                        let sink = h.sink.clone();
                        shared.sessions.lock().unwrap().insert(session, Arc::new(h));
                        let to = sink.lock().await.clone();
                        if let Some(to) = to {
                            let _ = to.send(opened).await;
                        }
                    }
                    Err(e) => {
                        shared.forget(&session);
                        tracing::warn!(session = %session, "open failed: {e}");
                        let _ = tx
                            .send(Event::Error {
                                session: Some(session),
                                message: format!("open failed: {e}"),
                            })
                            .await;
                    }
                }
            });
        }
        other => {
            let session = session_id.expect("every other request names a session");
            let Some(h) = existing.filter(|h| h.pid != 0) else {
                let _ = tx
                    .send(err(
                        Some(session),
                        "no such session on this worker (closed, or not open yet)".into(),
                    ))
                    .await;
                return;
            };
            // This connection now speaks for the session.
            *h.sink.lock().await = sink.lock().await.clone();
            let cmd = match other {
                Request::Execute { id, code, .. } => Cmd::Execute { id, code },
                Request::Save { message, .. } => Cmd::Save { message },
                Request::File { op, .. } => Cmd::File(op),
                Request::Close { .. } => {
                    // A running cell ends now; the close itself follows the queued commands.
                    h.stop.notify_one();
                    Cmd::Close {
                        reason: "closed by the backend".into(),
                    }
                }
                Request::Interrupt { .. } => {
                    let _ = killpg(Pid::from_raw(h.pid), Signal::SIGINT);
                    return;
                }
                Request::Open { .. } | Request::Ping | Request::Drain { .. } => {
                    unreachable!("handled above")
                }
            };
            if h.tx.send(cmd).await.is_err() {
                let _ = tx
                    .send(err(Some(session), "the session is closing".into()))
                    .await;
            }
        }
    }
}
