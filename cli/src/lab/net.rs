//! The lab's network: a bridge holding the subnet's first address, a veth per machine into its
//! own network namespace, and a firewall table keeping lab traffic between the box and its
//! machines (nothing is forwarded in or out).

use std::time::{Duration, Instant};

use super::{Lab, LabError};
use crate::net::Cidr;
use crate::sys;

fn table(lab: &Lab<'_>) -> String {
    format!("sagectl_lab_{}", lab.id)
}

/// Refuses a subnet that overlaps an address or route of this box (other than the lab's own
/// bridge): lab traffic must never leave for, or shadow, a real network.
pub fn check_subnet(lab: &Lab<'_>) -> Result<(), LabError> {
    let subnet = lab.settings.subnet;
    let bridge = lab.bridge();
    let overlap = |other: &str, dev: &str| LabError::Overlap {
        subnet: subnet.to_string(),
        other: other.to_string(),
        dev: dev.to_string(),
        file: lab.inv.file.clone(),
    };
    let addrs: serde_json::Value =
        serde_json::from_str(&sys::run(&["ip", "-j", "-4", "addr", "show"])?).unwrap_or_default();
    for link in addrs.as_array().into_iter().flatten() {
        let dev = link["ifname"].as_str().unwrap_or("?");
        if dev == bridge {
            continue;
        }
        for a in link["addr_info"].as_array().into_iter().flatten() {
            if let (Some(ip), Some(len)) = (a["local"].as_str(), a["prefixlen"].as_u64()) {
                let net = format!("{ip}/{len}");
                if let Ok(c) = network_of(ip, len as u8) {
                    if c.overlaps(&subnet) {
                        return Err(overlap(&net, &format!("interface {dev}")));
                    }
                }
            }
        }
    }
    let routes: serde_json::Value = serde_json::from_str(&sys::run(&[
        "ip", "-j", "-4", "route", "show", "table", "all",
    ])?)
    .unwrap_or_default();
    for r in routes.as_array().into_iter().flatten() {
        let dst = r["dst"].as_str().unwrap_or("default");
        let dev = r["dev"].as_str().unwrap_or("?");
        if dst == "default" || dev == bridge || dev == "lo" {
            continue;
        }
        let c = match dst.split_once('/') {
            Some((ip, len)) => len.parse().ok().and_then(|l| network_of(ip, l).ok()),
            None => dst.parse::<Cidr>().ok(),
        };
        if c.is_some_and(|c| c.overlaps(&subnet)) {
            return Err(overlap(dst, &format!("a route via {dev}")));
        }
    }
    Ok(())
}

/// The block of `ip/len` (host bits cleared).
fn network_of(ip: &str, len: u8) -> Result<Cidr, ()> {
    let addr: std::net::Ipv4Addr = ip.parse().map_err(|_| ())?;
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    };
    format!("{}/{len}", std::net::Ipv4Addr::from(u32::from(addr) & mask))
        .parse()
        .map_err(|_| ())
}

pub fn link_exists(name: &str) -> bool {
    sys::succeeds(&["ip", "link", "show", "dev", name])
}

pub fn ensure_bridge(lab: &Lab<'_>) -> Result<(), LabError> {
    let br = lab.bridge();
    let addr = format!(
        "{}/{}",
        lab.settings.gateway(),
        lab.settings.subnet.prefix()
    );
    if !link_exists(&br) {
        sys::run(&["ip", "link", "add", &br, "type", "bridge"])?;
    }
    let has_addr = sys::run(&["ip", "-4", "-o", "addr", "show", "dev", &br])?.contains(&addr);
    if !has_addr {
        sys::run(&["ip", "addr", "add", &addr, "dev", &br])?;
    }
    sys::run(&["ip", "link", "set", &br, "up"])?;
    // Nothing routed between the lab and any other interface, whatever ip_forward says.
    let t = table(lab);
    if !sys::succeeds(&["nft", "list", "table", "inet", &t]) {
        sys::run(&["nft", "add", "table", "inet", &t])?;
        sys::run(&[
            "nft",
            &format!(
                "add chain inet {t} forward {{ type filter hook forward priority -10; policy accept; }}"
            ),
        ])?;
        sys::run(&[
            "nft",
            &format!("add rule inet {t} forward iifname \"{br}\" oifname != \"{br}\" drop"),
        ])?;
        sys::run(&[
            "nft",
            &format!("add rule inet {t} forward oifname \"{br}\" iifname != \"{br}\" drop"),
        ])?;
    }
    Ok(())
}

pub fn remove_bridge(lab: &Lab<'_>) -> Result<(), LabError> {
    let br = lab.bridge();
    if link_exists(&br) {
        sys::run(&["ip", "link", "del", &br])?;
    }
    let t = table(lab);
    if sys::succeeds(&["nft", "list", "table", "inet", &t]) {
        sys::run(&["nft", "delete", "table", "inet", &t])?;
    }
    Ok(())
}

/// Deletes a link and waits until it is really gone (a veth can linger while connections to
/// its namespace close, and `up` right after `down` would then find its name taken).
pub fn delete_link(name: &str) -> Result<(), LabError> {
    if link_exists(name) {
        sys::run(&["ip", "link", "del", name])?;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while link_exists(name) {
        if Instant::now() > deadline {
            return Err(LabError::Machine {
                host: name.to_string(),
                what: "the link is still there 10s after deleting it".into(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::network_of;

    #[test]
    fn network_of_clears_host_bits() {
        assert_eq!(
            network_of("192.0.2.2", 24).unwrap().to_string(),
            "192.0.2.0/24"
        );
        assert_eq!(network_of("10.1.2.3", 8).unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(network_of("10.1.2.3", 0).unwrap().to_string(), "0.0.0.0/0");
    }
}
