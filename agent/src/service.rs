//! The skeleton the three agents share. A [`Service`] owns one cancellation token and one task
//! tracker: every background task (accept loops, connections, reapers, retention, replication,
//! logd's writer, HTTP servers) is spawned through it and ends when the service stops; stopping
//! cancels, closes the tracker and waits, bounded, for every task. TLS listeners accept with a
//! handshake deadline and back off on accept errors (EMFILE: sleep, doubling, capped, logged
//! once per burst); HTTP endpoints are axum servers that stop with the token; metrics are one
//! prometheus-client registry rendered one way. SIGTERM and SIGINT are one stop signal.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::response::{IntoResponse, Response};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A TLS handshake must be done within this long after the TCP accept.
pub const HANDSHAKE: Duration = Duration::from_secs(10);

/// Completes on SIGTERM (systemd's stop) or SIGINT (Ctrl-C): the agents' one stop signal.
pub async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

/// The background tasks of one agent, and the token that tells them to stop.
#[derive(Clone, Default)]
pub struct Service {
    token: CancellationToken,
    tracker: TaskTracker,
}

impl Service {
    pub fn new() -> Service {
        Service::default()
    }

    /// Cancelled when the service stops.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// A part of the service that can stop before the rest (a listener closed first, while
    /// open connections are handed over): its tasks are tracked with the service's, and end
    /// when either the part or the whole service stops.
    pub fn part(&self) -> Service {
        Service {
            token: self.token.child_token(),
            tracker: self.tracker.clone(),
        }
    }

    /// Runs `task` in the background until it ends or the service stops (then it is dropped at
    /// its next await point).
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let token = self.token.clone();
        self.tracker.spawn(async move {
            token.run_until_cancelled_owned(task).await;
        });
    }

    /// Cancels every task and waits up to `within` for all of them to finish; says how many did
    /// (the tests look for `stopped: N tasks finished`). False if some were still running.
    pub async fn stop(&self, within: Duration) -> bool {
        self.token.cancel();
        self.tracker.close();
        let n = self.tracker.len();
        if tokio::time::timeout(within, self.tracker.wait())
            .await
            .is_ok()
        {
            tracing::info!("stopped: {n} tasks finished");
            true
        } else {
            let left = self.tracker.len();
            tracing::error!("stopped: {left} of {n} tasks still running after {within:?}");
            false
        }
    }

    /// Accepts TLS connections on `listener` until the service stops: `handler` admits each
    /// peer before the handshake, hears of failed handshakes, and serves the others, each in a
    /// task of the service.
    pub fn accept_tls<H: Handler>(
        &self,
        what: &'static str,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        handler: H,
    ) {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let handler = Arc::new(handler);
        let service = self.clone();
        self.spawn(async move {
            let mut backoff = Backoff::default();
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        let (pause, first) = backoff.failed();
                        if first {
                            tracing::warn!(
                                "{what}: accept failed ({e}): pausing, doubling up to {:?}",
                                Backoff::MAX
                            );
                        }
                        tokio::time::sleep(pause).await;
                        continue;
                    }
                };
                if let Some(errors) = backoff.succeeded() {
                    tracing::info!("{what}: accepting again after {errors} failed accepts");
                }
                let Some(permit) = handler.admit(peer) else {
                    continue;
                };
                // Small frames go out at once (Nagle's algorithm would hold each for 40 ms).
                let _ = tcp.set_nodelay(true);
                let (acceptor, handler) = (acceptor.clone(), handler.clone());
                service.spawn(async move {
                    match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => handler.serve(tls, peer, permit).await,
                        Ok(Err(e)) => handler.refused(peer, &e.to_string()),
                        Err(_) => {
                            handler.refused(peer, &format!("no handshake within {HANDSHAKE:?}"))
                        }
                    }
                });
            }
        });
    }

    /// A TLS listener for axum: handshakes run in tasks of their own (a slow client holds up no
    /// one), finished connections are handed to the server.
    pub fn tls_listener(
        &self,
        what: &'static str,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
    ) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(256);
        self.accept_tls(what, listener, tls, ToHttp(tx));
        Ok(TlsListener { rx, local })
    }

    /// Serves `app` until the service stops; connections still open then get `grace` to end
    /// (browsers keep long polls and websockets: without it a stop would wait for them).
    pub fn serve_http<L>(&self, what: &'static str, listener: L, app: axum::Router, grace: Duration)
    where
        L: axum::serve::Listener,
        L::Addr: std::fmt::Debug,
    {
        let server = axum::serve(listener, app.into_make_service())
            .with_graceful_shutdown(self.token.clone().cancelled_owned())
            .into_future();
        self.serve_until_stopped(what, server, grace);
    }

    /// [`Service::serve_http`] over TLS, each request able to see its client's certificate
    /// (`ConnectInfo<ClientCert>`), for an endpoint whose answers depend on the caller's role.
    pub fn serve_https_with_certs(
        &self,
        what: &'static str,
        listener: TlsListener,
        app: axum::Router,
        grace: Duration,
    ) {
        let server = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<ClientCert>(),
        )
        .with_graceful_shutdown(self.token.clone().cancelled_owned())
        .into_future();
        self.serve_until_stopped(what, server, grace);
    }

    fn serve_until_stopped(
        &self,
        what: &'static str,
        server: impl Future<Output = std::io::Result<()>> + Send + 'static,
        grace: Duration,
    ) {
        let token = self.token.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                r = server => if let Err(e) = r {
                    tracing::error!("{what}: {e}");
                },
                _ = async {
                    token.cancelled().await;
                    tokio::time::sleep(grace).await;
                } => tracing::info!("{what}: connections still open {grace:?} after the stop: closed"),
            }
        });
    }
}

/// What an accept loop does with its connections.
pub trait Handler: Send + Sync + 'static {
    /// Held by the connection while it lives (a connection cap's permit, or `()`).
    type Permit: Send + 'static;

    /// Before the handshake: whether to take a connection from `peer`.
    fn admit(&self, peer: SocketAddr) -> Option<Self::Permit>;

    /// A handshake that failed (the verifier refused the certificate) or timed out.
    fn refused(&self, peer: SocketAddr, why: &str) {
        tracing::warn!(%peer, "refused at the TLS handshake: {why}");
    }

    /// Serves one connection.
    fn serve(
        &self,
        tls: TlsStream<TcpStream>,
        peer: SocketAddr,
        permit: Self::Permit,
    ) -> impl Future<Output = ()> + Send;
}

/// The pause after failed accepts (EMFILE, ENFILE, ENOBUFS: the loop must not spin): doubles
/// from `MIN` up to `MAX`; the burst is reported once, at its first error and at its end.
#[derive(Debug, Default)]
pub struct Backoff {
    pause: Duration,
    errors: u32,
}

impl Backoff {
    pub const MIN: Duration = Duration::from_millis(10);
    pub const MAX: Duration = Duration::from_secs(1);

    /// One more failure: how long to pause, and whether it began a burst.
    pub fn failed(&mut self) -> (Duration, bool) {
        self.errors += 1;
        self.pause = (self.pause * 2).clamp(Backoff::MIN, Backoff::MAX);
        (self.pause, self.errors == 1)
    }

    /// A success: the number of failures it ended, if it ended a burst.
    pub fn succeeded(&mut self) -> Option<u32> {
        let errors = std::mem::take(&mut self.errors);
        self.pause = Duration::ZERO;
        (errors > 0).then_some(errors)
    }
}

/// Hands finished handshakes to an axum server.
struct ToHttp(mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>);

impl Handler for ToHttp {
    type Permit = ();

    fn admit(&self, _: SocketAddr) -> Option<()> {
        Some(())
    }

    fn refused(&self, peer: SocketAddr, why: &str) {
        tracing::debug!(%peer, "TLS refused: {why}");
    }

    async fn serve(&self, tls: TlsStream<TcpStream>, peer: SocketAddr, _: ()) {
        let _ = self.0.send((tls, peer)).await;
    }
}

/// The client certificate of a TLS connection (its first, the client's own), for handlers of
/// [`Service::serve_https_with_certs`].
#[derive(Clone, Debug)]
pub struct ClientCert(pub Option<rustls::pki_types::CertificateDer<'static>>);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>>
    for ClientCert
{
    fn connect_info(s: axum::serve::IncomingStream<'_, TlsListener>) -> ClientCert {
        let cert = s
            .io()
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.clone().into_owned());
        ClientCert(cert)
    }
}

/// TLS connections for axum, from [`Service::tls_listener`].
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(x) => x,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// A registry's metrics as an HTTP response (OpenMetrics text, which Prometheus reads).
pub fn metrics_response(registry: &prometheus_client::registry::Registry) -> Response {
    let mut body = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut body, registry) {
        tracing::error!("metrics: {e}");
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::Backoff;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn accept_errors_back_off_doubling_capped_and_report_a_burst_once() {
        let mut b = Backoff::default();
        assert_eq!(b.succeeded(), None);
        let pauses: Vec<(Duration, bool)> = (0..10).map(|_| b.failed()).collect();
        assert_eq!(pauses[0], (Backoff::MIN, true));
        assert_eq!(pauses[1], (Backoff::MIN * 2, false));
        assert!(pauses[1..].iter().all(|(_, first)| !first));
        assert_eq!(pauses[9].0, Backoff::MAX);
        assert_eq!(b.succeeded(), Some(10));
        assert_eq!(b.failed(), (Backoff::MIN, true));
    }

    #[tokio::test]
    async fn stop_waits_for_every_task() {
        let s = super::Service::new();
        struct Count(Arc<AtomicUsize>);
        impl Drop for Count {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let done = Arc::new(AtomicUsize::new(0));
        for _ in 0..3 {
            // Held by the task's future: dropped when the task ends, polled or not.
            let c = Count(done.clone());
            s.spawn(async move {
                let _c = c;
                std::future::pending::<()>().await
            });
        }
        assert!(s.stop(Duration::from_secs(1)).await);
        assert_eq!(done.load(Ordering::SeqCst), 3);
    }
}
