//! `sage-agent probe`: runs one cell on a worker through the worker's own protocol, with a
//! backend's certificate, and prints what it wrote. `sagectl up`'s health check runs it on a
//! backend host for each worker, so a worker that cannot run its engine is a failed deploy,
//! not a surprise for the first user.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use rustls::pki_types::ServerName;

use crate::frame;
use crate::proto::{Event, Request, Status};
use crate::tls::Identity;

/// Opens a session on the worker `name` at `address`, runs `code`, closes; the cell's stdout,
/// the engine's name and the time the session took to open.
pub async fn run(
    tls: (&Path, &Path, &Path),
    name: &str,
    address: &str,
    code: &str,
) -> anyhow::Result<(String, String, Duration)> {
    let identity = Identity::load(tls.0, tls.1, tls.2)?;
    let cfg = identity.client_config(&["worker"])?;
    let tcp = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(address),
    )
    .await
    .with_context(|| format!("connecting to {address}: timed out"))?
    .with_context(|| format!("connecting to {address}"))?;
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from(name.to_string())?, tcp)
        .await
        .with_context(|| format!("TLS with {name}"))?;
    let (mut rd, mut wr) = tokio::io::split(tls);
    let session = format!("probe-{}", std::process::id());
    let started = Instant::now();
    frame::write(
        &mut wr,
        &Request::Open {
            session: session.clone(),
            bundle: None,
            limits: None,
        },
    )
    .await?;
    let mut engine = String::new();
    let mut opened = Duration::ZERO;
    let mut stdout = String::new();
    let mut stderr = String::new();
    let result = loop {
        let ev: Event = frame::read(&mut rd, 16 << 20, Duration::from_secs(300))
            .await
            .context("waiting for the worker")?;
        match ev {
            Event::Opened { engine: e, .. } => {
                engine = e;
                opened = started.elapsed();
                frame::write(
                    &mut wr,
                    &Request::Execute {
                        session: session.clone(),
                        id: 1,
                        code: code.to_string(),
                    },
                )
                .await?;
            }
            Event::Stdout { data, .. } => stdout.push_str(&data),
            Event::Stderr { data, .. } => stderr.push_str(&data),
            Event::Done {
                status, message, ..
            } => {
                break match status {
                    Status::Ok => Ok(()),
                    s => Err(anyhow::anyhow!(
                        "the cell ended {s:?}: {}{}",
                        message.unwrap_or_default(),
                        stderr.trim()
                    )),
                };
            }
            Event::Error { message, .. } => break Err(anyhow::anyhow!("{message}")),
            Event::Closed { reason, .. } => {
                break Err(anyhow::anyhow!("the session closed: {reason}"));
            }
            _ => {}
        }
    };
    let _ = frame::write(&mut wr, &Request::Close { session }).await;
    result.map(|()| (stdout, engine, opened))
}
