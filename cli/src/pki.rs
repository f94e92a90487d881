//! The deployment's PKI (crate `sagews-pki`) tied to an inventory: its state directory
//! `.sagectl/<inventory name>/` beside the inventory file, a host's certificate from its roles and
//! address, the public site's from the inventory's public name.

use std::path::PathBuf;

pub use sagews_pki::*;

use crate::inventory::{Host, Inventory};

/// `.sagectl/<name>/` beside the inventory file.
pub fn dir_for(inv: &Inventory) -> PathBuf {
    inv.dir().join(".sagectl").join(&inv.name)
}

/// Opens the state directory of `inv`, creating it and the CA on first use.
pub fn open(inv: &Inventory) -> Result<State, PkiError> {
    State::open_at(&dir_for(inv), &inv.name)
}

/// The certificate of `host` (see [`State::host`]).
pub fn host(state: &State, host: &Host) -> Result<Credentials, PkiError> {
    state.host(&host.name, host.all_roles().map(|r| r.name()), host.address)
}

/// The public site's certificate when the inventory brings none (see [`State::site`]).
pub fn site(state: &State, inv: &Inventory) -> Result<Credentials, PkiError> {
    state.site(&inv.tls.public_name)
}
