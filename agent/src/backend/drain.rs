//! Moving workspaces off a draining worker (`sage-agent drain` on its host; the worker says so in
//! its heartbeats, `workers.rs`). Each workspace this backend has open there moves between
//! cells: running cells are let finish (interrupted past [`CELL_WAIT`]), then, holding the
//! workspace so no request slips in, it is saved (a commit only if something changed), reopened
//! on another worker from that save, closed on the draining one, and its viewers are told
//! `moved`. Nothing is closed before the new session is up: with no room elsewhere, or a save
//! or an open that fails, the workspace stays where it is and is tried again at the worker's
//! next heartbeat.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use super::Backend;
use super::msg::BrowserEvent;
use super::open::OpenWs;
use crate::proto::Request;

/// How long running cells may go on before the move interrupts them.
const CELL_WAIT: Duration = Duration::from_secs(30);
/// How long interrupted cells get to end; past it the save waits behind them in the worker's
/// queue (a cell that ignores SIGINT ends at its wall-clock limit at the latest).
const INTERRUPT_WAIT: Duration = Duration::from_secs(10);
/// Workspaces moved at once, per draining worker.
const AT_ONCE: usize = 4;
/// The commit message of the save made for the move.
const SAVE_MESSAGE: &str = "Saved before moving off a draining worker";

impl Backend {
    /// Moves every workspace this backend has open on `host` to other workers; what cannot
    /// move now stays, with a warning.
    pub async fn move_workspaces_off(self: &Arc<Self>, host: &str) {
        // Those busy now (opening, saving...) are looked at once they are free.
        let there = self.open.all().into_iter().filter(|ws| {
            ws.state
                .try_lock()
                .map_or(true, |st| st.link.as_ref().is_some_and(|l| l.host == host))
        });
        futures_util::stream::iter(there)
            .for_each_concurrent(AT_ONCE, |ws| async move {
                if let Err(e) = self.move_off(&ws, host).await {
                    tracing::warn!(workspace = %ws.id, worker = %host, "not moved off the draining worker yet (tried again at its next heartbeat): {e}");
                }
            })
            .await;
    }

    /// Moves `ws` off `from` if it is open there.
    async fn move_off(self: &Arc<Self>, ws: &Arc<OpenWs>, from: &str) -> Result<(), String> {
        if ws.worker().await.as_deref() != Some(from) || ws.viewers() == 0 {
            return Ok(());
        }
        // Checked first so a workspace with nowhere to go is not saved at every heartbeat.
        if !self.workers.room_elsewhere(from) {
            return Err("no other worker has room".into());
        }
        let started = Instant::now();
        // Between cells: wait, without holding the workspace (its viewers can still interrupt),
        // until nothing runs; then hold it, so nothing new starts before the move.
        let deadline = started + CELL_WAIT;
        let mut st = loop {
            while ws.running() > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let st = ws.state.lock().await;
            if ws.running() == 0 || Instant::now() >= deadline {
                break st;
            }
        };
        let Some(old) = st
            .link
            .clone()
            .filter(|l| !l.is_dead() && l.host == from && !st.closing)
        else {
            return Ok(()); // closed or moved meanwhile
        };
        let interrupted = ws.running() > 0;
        if interrupted {
            let _ = old
                .send(Request::Interrupt {
                    session: ws.id.clone(),
                })
                .await;
            let until = Instant::now() + INTERRUPT_WAIT;
            while ws.running() > 0 && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let changed = self
            .save_locked(ws, &st, SAVE_MESSAGE)
            .await
            .map_err(|e| format!("saving before the move: {}", e.message))?;
        if let Err(e) = self
            .place(ws, &mut st, std::slice::from_ref(&old.host))
            .await
        {
            // Keep the session where it is: its events flow to a new pump again.
            self.watch(ws, &mut st, &old);
            st.link = Some(old.clone());
            st.closing = false;
            if let Err(e) = self.record_open(ws, from).await {
                tracing::warn!(workspace = %ws.id, "recording the open session: {}", e.message);
            }
            return Err(format!("reopening elsewhere: {}", e.message));
        }
        // The new session is up: end the old one (its answer goes nowhere).
        old.unroute(&ws.id);
        let _ = old
            .send(Request::Close {
                session: ws.id.clone(),
            })
            .await;
        self.metrics.inc(&self.metrics.drain_moves);
        let to = st.link.as_ref().map(|l| l.host.clone());
        let ms = started.elapsed().as_millis() as u64;
        tracing::info!(workspace = %ws.id, from, to = to.as_deref().unwrap_or("?"), changed, interrupted, ms, "moved off a draining worker");
        ws.broadcast(BrowserEvent::Moved {
            workspace: ws.id.clone(),
            message: format!(
                "worker {from} is being drained: the workspace was saved and reopened on worker {}{}",
                to.as_deref().unwrap_or("?"),
                if interrupted {
                    format!(
                        " (its running cell was interrupted after {} s)",
                        CELL_WAIT.as_secs()
                    )
                } else {
                    String::new()
                }
            ),
            worker: to,
        });
        Ok(())
    }
}
