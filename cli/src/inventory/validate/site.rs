//! The site's TLS settings: a public name that is a DNS name (when there is a loadbalancer),
//! and the user's own certificate and key, both or neither, read as `render` reads them.

use std::path::{Path, PathBuf};

use super::super::Tls;
use super::super::raw::{RawInventory, Sp};
use super::{V, is_label, resolve};
use crate::yaml::join;

fn is_dns_name(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(|l| is_label(&l.to_ascii_lowercase()))
}

pub(super) fn check_tls(v: &mut V<'_>, raw: &RawInventory, has_loadbalancer: bool) -> Tls {
    let public_name = match &raw.public_name {
        Some(n) => v.accepted(
            n,
            is_dns_name,
            "tls.public_name",
            "a DNS name",
            "the name browsers use, such as sagews.example.org",
        ),
        None => {
            if has_loadbalancer && !v.reported("tls.public_name") && !v.reported("tls") {
                v.err(
                    &raw.top,
                    "tls.public_name",
                    "the site has no public name",
                    "add `tls: {public_name: sagews.example.org}`: HAProxy's certificate is made for it".to_string(),
                );
            }
            String::new()
        }
    };
    let dir = raw.file.parent().unwrap_or(Path::new(".")).to_path_buf();
    let mut tls_file = |f: &Option<Sp<String>>, key: &str, pem: &str| -> Option<PathBuf> {
        let f = f.as_ref()?;
        let p = resolve(&dir, &f.v);
        // Read as `render` will, so a file that validates is one it can read.
        match super::super::files::read_text(&p, super::super::files::MAX_INVENTORY_FILE) {
            Ok(text) if text.contains(pem) => {}
            Ok(_) => v.err(
                &f.pos,
                &join("tls", key),
                format!("{} holds no `{pem}`", p.display()),
                "give the PEM file HAProxy is to serve".to_string(),
            ),
            Err(e) => v.err(
                &f.pos,
                &join("tls", key),
                format!("cannot read {}: {e}", p.display()),
                "the path is relative to the inventory file".to_string(),
            ),
        }
        Some(p)
    };
    let certificate = tls_file(
        &raw.certificate,
        "certificate",
        "-----BEGIN CERTIFICATE-----",
    );
    let key = tls_file(&raw.key, "key", "PRIVATE KEY-----");
    if certificate.is_some() != key.is_some() {
        let pos = raw
            .certificate
            .as_ref()
            .or(raw.key.as_ref())
            .map_or(raw.top.clone(), |s| s.pos.clone());
        v.err(
            &pos,
            "tls",
            "give both `certificate` and `key`, or neither",
            None,
        );
    }
    Tls {
        public_name,
        certificate,
        key,
    }
}
