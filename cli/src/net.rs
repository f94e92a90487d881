//! Network value types: CIDR blocks, checked when parsed.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::Serialize;

/// An address block such as `10.77.0.0/24`; a bare address is a /32 (or /128).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    fn bits(&self) -> u8 {
        if self.addr.is_ipv4() { 32 } else { 128 }
    }

    fn to_u128(ip: IpAddr) -> u128 {
        match ip {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        }
    }

    fn mask(&self) -> u128 {
        let host_bits = u32::from(self.bits() - self.prefix);
        let all = if self.bits() == 32 {
            u128::from(u32::MAX)
        } else {
            u128::MAX
        };
        all.checked_shl(host_bits).unwrap_or(0) & all
    }

    /// Whether `ip` lies in this block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4()
            && Self::to_u128(ip) & self.mask() == Self::to_u128(self.addr)
    }

    /// Whether the two blocks share any address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }

    /// The `n`th address of the block, if the block has it.
    pub fn nth(&self, n: u128) -> Option<IpAddr> {
        let size = 1u128
            .checked_shl(u32::from(self.bits() - self.prefix))
            .unwrap_or(u128::MAX);
        if n >= size {
            return None;
        }
        let v = Self::to_u128(self.addr) + n;
        Some(match self.addr {
            IpAddr::V4(_) => IpAddr::V4((v as u32).into()),
            IpAddr::V6(_) => IpAddr::V6(v.into()),
        })
    }

    /// The last address (the broadcast address of an IPv4 block).
    pub fn last(&self) -> IpAddr {
        let v = Self::to_u128(self.addr)
            | (!self.mask()
                & if self.bits() == 32 {
                    u128::from(u32::MAX)
                } else {
                    u128::MAX
                });
        match self.addr {
            IpAddr::V4(_) => IpAddr::V4((v as u32).into()),
            IpAddr::V6(_) => IpAddr::V6(v.into()),
        }
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("`{0}` is not an IP address")]
    Address(String),
    #[error("prefix length `{0}` is not a number from 0 to {1}")]
    Prefix(String, u8),
    #[error("`{0}` has host bits set; the block starts at {1}")]
    HostBits(String, IpAddr),
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| CidrError::Address(a.to_string()))?;
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => bits,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= bits && !p.starts_with('+') => n,
                _ => return Err(CidrError::Prefix(p.to_string(), bits)),
            },
        };
        let c = Cidr { addr, prefix };
        let base = Cidr::to_u128(addr) & c.mask();
        if base != Cidr::to_u128(addr) {
            let start = Cidr { addr, prefix: bits }.with_value(base);
            return Err(CidrError::HostBits(s.to_string(), start));
        }
        Ok(c)
    }
}

impl Cidr {
    fn with_value(&self, v: u128) -> IpAddr {
        match self.addr {
            IpAddr::V4(_) => IpAddr::V4((v as u32).into()),
            IpAddr::V6(_) => IpAddr::V6(v.into()),
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_contains() {
        let n = c("10.77.0.0/24");
        assert!(n.contains("10.77.0.9".parse().unwrap()));
        assert!(!n.contains("10.77.1.9".parse().unwrap()));
        assert!(!n.contains("::1".parse().unwrap()));
        assert_eq!(n.nth(1).unwrap().to_string(), "10.77.0.1");
        assert_eq!(n.last().to_string(), "10.77.0.255");
        assert_eq!(c("127.0.0.2").to_string(), "127.0.0.2/32");
        assert!(c("0.0.0.0/0").contains("8.8.8.8".parse().unwrap()));
        assert!(c("fd00::/8").contains("fd12::1".parse().unwrap()));
    }

    #[test]
    fn refuses_bad_blocks() {
        assert_eq!(
            "10.0.0.1/24".parse::<Cidr>(),
            Err(CidrError::HostBits(
                "10.0.0.1/24".into(),
                "10.0.0.0".parse().unwrap()
            ))
        );
        assert!(matches!(
            "10.0.0.0/33".parse::<Cidr>(),
            Err(CidrError::Prefix(..))
        ));
        assert!(matches!(
            "10.0.0/8".parse::<Cidr>(),
            Err(CidrError::Address(..))
        ));
        assert!(matches!(
            "10.0.0.0/".parse::<Cidr>(),
            Err(CidrError::Prefix(..))
        ));
    }

    #[test]
    fn overlaps() {
        assert!(c("10.0.0.0/8").overlaps(&c("10.77.0.0/24")));
        assert!(!c("10.78.0.0/24").overlaps(&c("10.77.0.0/24")));
    }
}
