//! The state directory `.sagectl/<inventory name>/` beside the inventory: the deployment's CA, a
//! certificate per host, sagectl's own client certificate and the generated passwords. Created on
//! first use, reused after; the directory is 0700 and every file 0600, written atomically.
//!
//! Roles are recorded in certificates as DNS names `<role>.role.sagectl.invalid` (the `.invalid`
//! top-level domain can never be a real name, RFC 2606), so an agent checks a peer's role with
//! the same name verification rustls/webpki already does, with no X.509 parsing of its own.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

/// The suffix of the DNS names that carry roles in certificates.
pub const ROLE_SUFFIX: &str = "role.sagectl.invalid";

/// The DNS name standing for `role` in a certificate.
pub fn role_name(role: &str) -> String {
    format!("{role}.{ROLE_SUFFIX}")
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("state directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state directory {path}: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("making a certificate for {subject}: {source}")]
    Cert {
        subject: String,
        source: rcgen::Error,
    },
}

/// A secret string: never shown by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A secret from a known string (tests).
    #[doc(hidden)]
    pub fn new_for_tests(s: &str) -> Secret {
        Secret(s.to_string())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A certificate (with the CA's after it) and its private key, in PEM.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub chain_pem: String,
    pub key_pem: Secret,
}

/// An open state directory.
pub struct State {
    dir: PathBuf,
    ca_cert_pem: String,
    ca: Issuer<'static, KeyPair>,
}

/// Names of the generated secrets, fixed so templates can name them.
pub const SECRET_NAMES: [&str; 4] = [
    "postgres_backend_password",
    "postgres_logd_password",
    // The standby's replication role (`database.standby`).
    "postgres_replica_password",
    // The password operators' accounts (`backend.admins`) are made with.
    "admin_password",
];

impl State {
    /// Opens the state directory `dir` of the deployment `name`, creating it and the CA on
    /// first use.
    pub fn open_at(dir: &Path, name: &str) -> Result<State, PkiError> {
        let io = |source| PkiError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir.join("hosts")).map_err(io)?;
        for d in [dir.to_path_buf(), dir.join("hosts")] {
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        }
        let params = ca_params(name);
        let (cert_path, key_path) = (dir.join("ca.crt"), dir.join("ca.key"));
        let (ca_cert_pem, key) = match (read_opt(&cert_path)?, read_opt(&key_path)?) {
            (Some(cert), Some(key)) => {
                let key = KeyPair::from_pem(&key).map_err(|e| PkiError::Corrupt {
                    path: key_path.clone(),
                    what: format!("unreadable CA key: {e}"),
                })?;
                (cert, key)
            }
            (None, None) => {
                let key = KeyPair::generate().map_err(|source| PkiError::Cert {
                    subject: "CA".into(),
                    source,
                })?;
                let cert = params.self_signed(&key).map_err(|source| PkiError::Cert {
                    subject: "CA".into(),
                    source,
                })?;
                write_private(&key_path, key.serialize_pem().as_bytes())?;
                write_private(&cert_path, cert.pem().as_bytes())?;
                (cert.pem(), key)
            }
            _ => {
                return Err(PkiError::Corrupt {
                    path: dir.to_path_buf(),
                    what: "one of ca.crt and ca.key is missing; restore it from a backup (a new CA would invalidate every deployed certificate)".into(),
                });
            }
        };
        // The issuer is rebuilt from the same parameters and key: the subject and key identifier
        // it writes into host certificates match the stored CA certificate's.
        let ca = Issuer::new(params, key);
        Ok(State {
            dir: dir.to_path_buf(),
            ca_cert_pem,
            ca,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn ca_cert_pem(&self) -> &str {
        &self.ca_cert_pem
    }

    /// The certificate of a host, made (or remade when its names changed) on demand. Its names:
    /// the host name, its address and one role name per role. Never shown to browsers: the
    /// public site has its own key ([`State::site`]).
    pub fn host<'a>(
        &self,
        name: &str,
        roles: impl IntoIterator<Item = &'a str>,
        address: std::net::IpAddr,
    ) -> Result<Credentials, PkiError> {
        let mut dns = vec![name.to_string()];
        dns.extend(roles.into_iter().map(role_name));
        self.issue(&format!("hosts/{name}"), name, dns, vec![address])
    }

    /// The public site's certificate (when the inventory brings none): its own key pair, the
    /// public name only, server use only. HAProxy's identity toward nginx and the backends is
    /// its host certificate, a different key; the internal role names and private address are
    /// never shown to browsers.
    pub fn site(&self, public_name: &str) -> Result<Credentials, PkiError> {
        self.make(
            "site",
            public_name,
            vec![public_name.to_string()],
            Vec::new(),
            false,
        )
    }

    /// sagectl's own client certificate (role `admin`), for `sagectl logs` and health checks.
    pub fn admin(&self) -> Result<Credentials, PkiError> {
        self.issue("admin", "sagectl", vec![role_name("admin")], Vec::new())
    }

    /// A certificate named `stem` in the state directory for `cn`, valid for the DNS names
    /// `dns` (role names included: see [`role_name`]) and the addresses `ips`; remade only when
    /// those names change.
    pub fn issue(
        &self,
        stem: &str,
        cn: &str,
        dns: Vec<String>,
        ips: Vec<std::net::IpAddr>,
    ) -> Result<Credentials, PkiError> {
        self.make(stem, cn, dns, ips, true)
    }

    /// [`State::issue`], for client use too or for server use only.
    fn make(
        &self,
        stem: &str,
        cn: &str,
        dns: Vec<String>,
        ips: Vec<std::net::IpAddr>,
        client: bool,
    ) -> Result<Credentials, PkiError> {
        let (cert_path, key_path, names_path) = (
            self.dir.join(format!("{stem}.crt")),
            self.dir.join(format!("{stem}.key")),
            self.dir.join(format!("{stem}.names")),
        );
        let names: Vec<String> = dns
            .iter()
            .cloned()
            .chain(ips.iter().map(ToString::to_string))
            .collect();
        let names_line = names.join("\n") + "\n";
        if let (Some(cert), Some(key), Some(old)) = (
            read_opt(&cert_path)?,
            read_opt(&key_path)?,
            read_opt(&names_path)?,
        ) {
            if old == names_line {
                return Ok(Credentials {
                    chain_pem: format!("{cert}{}", self.ca_cert_pem),
                    key_pem: Secret(key),
                });
            }
        }
        let err = |source| PkiError::Cert {
            subject: cn.to_string(),
            source,
        };
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        dn.push(DnType::OrganizationName, "sagectl");
        params.distinguished_name = dn;
        for d in &dns {
            params
                .subject_alt_names
                .push(SanType::DnsName(d.clone().try_into().map_err(err)?));
        }
        params
            .subject_alt_names
            .extend(ips.into_iter().map(SanType::IpAddress));
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        if client {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        params.serial_number = Some(SerialNumber::from_slice(&random_bytes::<16>()?));
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(3600)).into();
        params.not_after = (now + Duration::from_secs(825 * 86400)).into();
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(err)?;
        let cert = params.signed_by(&key, &self.ca).map_err(err)?;
        write_private(&key_path, key.serialize_pem().as_bytes())?;
        write_private(&cert_path, cert.pem().as_bytes())?;
        write_private(&names_path, names_line.as_bytes())?;
        Ok(Credentials {
            chain_pem: format!("{}{}", cert.pem(), self.ca_cert_pem),
            key_pem: Secret(key.serialize_pem()),
        })
    }

    /// The generated passwords and keys, made on first use.
    pub fn secrets(&self) -> Result<BTreeMap<String, Secret>, PkiError> {
        let path = self.dir.join("secrets.json");
        let mut map: BTreeMap<String, String> = match read_opt(&path)? {
            Some(text) => serde_json::from_str(&text).map_err(|e| PkiError::Corrupt {
                path: path.clone(),
                what: format!("not a JSON object of strings: {e}"),
            })?,
            None => BTreeMap::new(),
        };
        let mut changed = false;
        for name in SECRET_NAMES {
            if !map.contains_key(name) {
                map.insert(name.to_string(), random_token(32)?);
                changed = true;
            }
        }
        if changed {
            let text = serde_json::to_string_pretty(&map).expect("strings serialize");
            write_private(&path, text.as_bytes())?;
        }
        Ok(map.into_iter().map(|(k, v)| (k, Secret(v))).collect())
    }
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("sagectl CA for {name}"));
    dn.push(DnType::OrganizationName, "sagectl");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + Duration::from_secs(10 * 365 * 86400)).into();
    params
}

fn read_opt(path: &Path) -> Result<Option<String>, PkiError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PkiError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Writes a 0600 file atomically: a temp file beside it, synced, then renamed over it.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io)?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

fn random_bytes<const N: usize>() -> Result<[u8; N], PkiError> {
    let mut buf = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|source| PkiError::Io {
            path: "/dev/urandom".into(),
            source,
        })?;
    Ok(buf)
}

/// A random token of letters and digits (safe in any config syntax without quoting).
fn random_token(len: usize) -> Result<String, PkiError> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = String::with_capacity(len);
    while out.len() < len {
        for b in random_bytes::<64>()? {
            // 248 = 4 * 62: rejecting above it keeps every character equally likely.
            if b < 248 && out.len() < len {
                out.push(ALPHABET[usize::from(b) % 62] as char);
            }
        }
    }
    Ok(out)
}
