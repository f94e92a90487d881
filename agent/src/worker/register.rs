//! Announcing the worker to a backend: a TLS connection to the backend's worker port (the
//! backend must hold the `backend` role), a `register` frame, then a heartbeat with the load
//! (and whether the worker is draining, `drain.rs`) every few seconds, each acknowledged. Reconnects with backoff; every acknowledgement counts as
//! hearing from a backend (for autostop).

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use super::Shared;
use crate::config::Peer;
use crate::frame;
use crate::proto::{Announce, AnnounceReply};
use crate::tls::Identity;

async fn session(
    shared: &Shared,
    identity: &Identity,
    b: &Peer,
    registered: &mut bool,
) -> anyhow::Result<()> {
    let cfg = identity.client_config(&["backend"])?;
    let name = ServerName::try_from(b.name.clone())?;
    let tcp = tokio::time::timeout(
        Duration::from_secs(10),
        connect_from(shared.config.listen.ip(), &b.address),
    )
    .await??;
    tcp.set_nodelay(true)?;
    let mut s = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
    )
    .await??;
    let c = &shared.config;
    let engines = vec![c.engine.clone()];
    frame::write(
        &mut s,
        &Announce::Register {
            host: c.host.clone(),
            address: c.listen.to_string(),
            capacity: c.max_sessions,
            engines,
            draining: shared.draining(),
        },
    )
    .await?;
    let AnnounceReply::Ack = frame::read(&mut s, 1 << 16, Duration::from_secs(10)).await?;
    shared.heard_from_backend();
    *registered = true;
    tracing::info!(backend = %b.name, "registered");
    loop {
        tokio::time::sleep(Duration::from_secs(c.heartbeat_seconds)).await;
        let sessions = shared.session_count();
        let load = f64::from(sessions) / f64::from(c.max_sessions.max(1));
        let draining = shared.draining();
        frame::write(
            &mut s,
            &Announce::Heartbeat {
                sessions,
                load,
                draining,
            },
        )
        .await?;
        let AnnounceReply::Ack = frame::read(&mut s, 1 << 16, Duration::from_secs(10)).await?;
        shared.heard_from_backend();
    }
}

/// Connects to `address` from `ip` (the address the worker announces and listens on), so the
/// backend sees the connection come from the address it is told to use: on a host with several
/// addresses the kernel's choice could differ, and the backend refuses a mismatch.
async fn connect_from(ip: std::net::IpAddr, address: &str) -> std::io::Result<TcpStream> {
    let to = tokio::net::lookup_host(address)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{address}: no address")))?;
    let socket = if to.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if !ip.is_unspecified() && ip.is_ipv4() == to.is_ipv4() {
        socket.bind(std::net::SocketAddr::new(ip, 0))?;
    }
    socket.connect(to).await
}

pub async fn announce(shared: Arc<Shared>, identity: Identity, b: Peer) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let mut registered = false;
        if let Err(e) = session(&shared, &identity, &b, &mut registered).await {
            tracing::debug!(backend = %b.name, "announcing failed: {e:#}");
        }
        // A backend that took us and then went away (a restart) is retried promptly.
        if registered {
            backoff = Duration::from_secs(1);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}
