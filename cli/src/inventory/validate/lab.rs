//! The `lab:` section: a Debian suite name, a subnet the lab can use, and host addresses
//! inside it, off its network, broadcast and gateway addresses.

use super::super::raw::RawInventory;
use super::super::{Cidr, Host, Lab};
use super::{V, is_label};
use crate::yaml::join;

const LAB_SUBNET_HINT: &str = "use an IPv4 block from /16 to /29, such as 10.77.0.0/24";

pub(super) fn check_lab(v: &mut V<'_>, raw: &RawInventory, hosts: &[Host]) -> Option<Lab> {
    let l = raw.lab.as_ref()?;
    if !is_label(&l.suite.v) {
        v.err(
            &l.suite.pos,
            "lab.suite",
            format!("`{}` is not a Debian suite name", l.suite.v),
            "such as bookworm".to_string(),
        );
    }
    let subnet = match l.subnet.v.parse::<Cidr>() {
        Ok(c) if c.addr().is_ipv4() && c.prefix() >= 16 && c.prefix() <= 29 => c,
        Ok(c) => {
            v.err(
                &l.subnet.pos,
                "lab.subnet",
                format!("{c} cannot be a lab subnet"),
                LAB_SUBNET_HINT.to_string(),
            );
            return None;
        }
        Err(e) => {
            v.err(
                &l.subnet.pos,
                "lab.subnet",
                format!("not a valid subnet: {e}"),
                LAB_SUBNET_HINT.to_string(),
            );
            return None;
        }
    };
    let lab = Lab {
        subnet,
        suite: l.suite.v.clone(),
    };
    for h in hosts {
        let pos = raw
            .hosts
            .iter()
            .find(|r| r.name.v == h.name)
            .and_then(|r| r.address.as_ref())
            .map_or(&h.pos, |a| &a.pos);
        let bad = if !subnet.contains(h.address) {
            Some("outside the lab subnet")
        } else if h.address == subnet.nth(0).expect("non-empty") || h.address == subnet.last() {
            Some("the network or broadcast address of the lab subnet")
        } else if h.address == lab.gateway() {
            Some("the lab bridge's own address")
        } else {
            None
        };
        if let Some(why) = bad {
            v.err(
                pos,
                &join(&join("hosts", &h.name), "address"),
                format!("{} is {why} ({subnet})", h.address),
                format!(
                    "lab hosts take addresses from {} up",
                    subnet.nth(2).expect("non-empty")
                ),
            );
        }
    }
    Some(lab)
}
