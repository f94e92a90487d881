//! TLS 1.3 between agents with the deployment's CA (made by sagectl). A certificate carries its
//! host's roles as DNS names `<role>.role.sagectl.invalid`; the verifiers here check the chain
//! with webpki and then that the peer holds an allowed role, during the handshake, so a peer with
//! the wrong role never gets a session.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;

/// The suffix of the role names in certificates (see sagectl's pki module).
pub const ROLE_SUFFIX: &str = "role.sagectl.invalid";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {why}")]
    File { path: String, why: String },
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS setup: {0}")]
    Verifier(String),
}

/// Installs ring as rustls's crypto provider (once per process; later calls are no-ops).
pub fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Certificates and key of this host, and the CA.
pub struct Identity {
    pub roots: Arc<RootCertStore>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            roots: self.roots.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

fn file_err(path: &Path, why: impl ToString) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        why: why.to_string(),
    }
}

impl Identity {
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Identity, TlsError> {
        init();
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca).map_err(|e| file_err(ca, e))? {
            roots
                .add(c.map_err(|e| file_err(ca, e))?)
                .map_err(|e| file_err(ca, e))?;
        }
        let chain = CertificateDer::pem_file_iter(cert)
            .map_err(|e| file_err(cert, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| file_err(cert, e))?;
        if chain.is_empty() {
            return Err(file_err(cert, "no certificate in the file"));
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, e))?;
        Ok(Identity {
            roots: Arc::new(roots),
            chain,
            key,
        })
    }

    /// A server that accepts only clients holding one of `roles`.
    pub fn server_config(&self, roles: &[&str]) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let inner = WebPkiClientVerifier::builder(self.roots.clone())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let verifier = RoleVerifier::new(inner, roles);
        let cfg = rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        Ok(Arc::new(cfg))
    }

    /// A client presenting this host's certificate to servers holding one of `roles`.
    pub fn client_config(&self, roles: &[&str]) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let inner = rustls::client::WebPkiServerVerifier::builder(self.roots.clone())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let verifier = RoleVerifier::new(inner, roles);
        let cfg = rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        Ok(Arc::new(cfg))
    }
}

/// The first of `roles` the certificate holds.
pub fn role_of(cert: &CertificateDer<'_>, roles: &[String]) -> Option<String> {
    let ee = webpki::EndEntityCert::try_from(cert).ok()?;
    roles
        .iter()
        .find(|r| {
            let name = format!("{r}.{ROLE_SUFFIX}");
            ServerName::try_from(name.as_str())
                .is_ok_and(|n| ee.verify_is_valid_for_subject_name(&n).is_ok())
        })
        .cloned()
}

fn wrong_role(roles: &[String]) -> rustls::Error {
    rustls::Error::General(format!(
        "peer certificate holds none of the roles {}",
        roles.join(", ")
    ))
}

/// The verifier of both sides: webpki's chain check (`inner`), then the role check, in the
/// handshake. One struct and one check; the two trait impls only say which call is the chain's.
#[derive(Debug)]
struct RoleVerifier<V: ?Sized> {
    inner: Arc<V>,
    roles: Vec<String>,
}

impl<V: ?Sized> RoleVerifier<V> {
    fn new(inner: Arc<V>, roles: &[&str]) -> Arc<RoleVerifier<V>> {
        Arc::new(RoleVerifier {
            inner,
            roles: roles.iter().map(|r| r.to_string()).collect(),
        })
    }

    /// `chain`, the inner verifier's verdict, stands only if the certificate holds a role.
    fn check<T>(
        &self,
        end_entity: &CertificateDer<'_>,
        chain: Result<T, rustls::Error>,
    ) -> Result<T, rustls::Error> {
        let ok = chain?;
        role_of(end_entity, &self.roles)
            .map(|_| ok)
            .ok_or_else(|| wrong_role(&self.roles))
    }
}

/// The handshake-signature checks, which both sides leave to the inner verifier.
macro_rules! signatures_by_inner {
    () => {
        signatures_by_inner!(verify_tls12_signature);
        signatures_by_inner!(verify_tls13_signature);

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.inner.supported_verify_schemes()
        }
    };
    ($check:ident) => {
        fn $check(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.$check(message, cert, dss)
        }
    };
}

impl ClientCertVerifier for RoleVerifier<dyn ClientCertVerifier> {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(
            end_entity,
            self.inner
                .verify_client_cert(end_entity, intermediates, now),
        )
    }

    signatures_by_inner!();
}

impl ServerCertVerifier for RoleVerifier<rustls::client::WebPkiServerVerifier> {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(
            end_entity,
            self.inner
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now),
        )
    }

    signatures_by_inner!();
}
