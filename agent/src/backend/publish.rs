//! Publishing: the files of a workspace's last save (or one path in it) are pushed to every
//! static host's nginx (WebDAV PUT over TLS with this backend's certificate; nginx accepts only
//! backends there) under `/pub/<workspace>/`, which nginx then serves to everyone through
//! HAProxy, whether or not any backend is up. Pushing (rather than an nginx cache in front of
//! the backends) means a snapshot never expires and a static host never asks a backend.

use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio::io::BufReader;
use tokio::net::TcpStream;

use super::git::Blob;
use super::msg::Published;
use super::{ApiError, Backend};
use crate::config::Peer;
use crate::http1;

const MAX_FILES: usize = 10_000;
/// What one publish may read and push (the bundle is size-limited, but compresses).
const MAX_BYTES: u64 = 64 << 20;

impl Backend {
    pub async fn publish(self: &Arc<Self>, ws: &str, path: &str) -> Result<Published, ApiError> {
        let sub = crate::proto::workspace_path(path).map_err(ApiError::bad)?;
        if self.config.static_hosts.is_empty() {
            return Err(ApiError::busy(
                "this deployment has no static host to publish to",
            ));
        }
        let bundle = self
            .stored_bundle(ws)
            .await?
            .ok_or_else(|| ApiError::not_found("nothing to publish: save the workspace first"))?;
        // Read from the saved commit's objects, never from a checkout (git.rs says why).
        let list = super::git::files(
            &bundle,
            &sub,
            super::git::FileLimits {
                max_files: MAX_FILES,
                max_bytes: MAX_BYTES,
            },
        )
        .await?;
        let mut pushed = Vec::new();
        for host in &self.config.static_hosts {
            self.push(host, ws, &list)
                .await
                .map_err(|e| ApiError::busy(format!("publishing to {}: {e:#}", host.name)))?;
            pushed.push(host.name.clone());
        }
        self.db()
            .await?
            .execute(
                "UPDATE workspaces SET published = now() WHERE id = $1",
                &[&ws],
            )
            .await?;
        self.metrics.inc(&self.metrics.publishes);
        Ok(Published {
            workspace: ws.to_string(),
            url: format!("https://{}/pub/{ws}/", self.config.public_name),
            files: list.into_iter().map(|b| b.path).collect(),
            hosts: pushed,
        })
    }

    /// Replaces `/pub/<ws>/` on one static host with `list`.
    async fn push(&self, host: &Peer, ws: &str, list: &[Blob]) -> anyhow::Result<()> {
        let cfg = self.identity.client_config(&["static"])?;
        let tcp = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            TcpStream::connect(&host.address),
        )
        .await??;
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(ServerName::try_from(host.name.clone())?, tcp)
            .await?;
        let mut s = BufReader::new(tls);
        let dir = format!("/pub/{ws}/");
        let r = http1::request(&mut s, "DELETE", &host.name, &dir, &[], &[], 1 << 16).await?;
        anyhow::ensure!(
            r.status < 300 || r.status == 404,
            "DELETE {dir} answered {}",
            r.status
        );
        for f in list {
            let p = http1::encode_path(&format!("{dir}{}", f.path));
            let r = http1::request(&mut s, "PUT", &host.name, &p, &[], &f.data, 1 << 16).await?;
            anyhow::ensure!(r.status < 300, "PUT {p} answered {}", r.status);
        }
        Ok(())
    }
}
