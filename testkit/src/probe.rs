//! Firewall probes: which TCP ports a machine listens on (beyond loopback), and what a connection
//! to each finds from another machine: open, refused or dropped. The lab test compares the
//! result with the arrows of ARCHITECTURE §1.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

/// How long a probe waits for an answer before calling the port dropped.
pub const WAIT: Duration = Duration::from_millis(1500);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reach {
    Open,
    Refused,
    Dropped,
}

/// The TCP ports in `ss -Htln` output that listen on an address other machines can reach
/// (anything but loopback).
pub fn listening(ss: &str) -> BTreeSet<u16> {
    ss.lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|local| {
            let (addr, port) = local.rsplit_once(':')?;
            let addr = addr.trim_start_matches('[').trim_end_matches(']');
            let addr = addr.split('%').next().unwrap_or(addr);
            let loopback = addr.parse::<IpAddr>().is_ok_and(|a| a.is_loopback());
            (!loopback).then(|| port.parse().ok()).flatten()
        })
        .collect()
}

/// A bash script that probes every `(address, port)` at once (bash's /dev/tcp, no other tool)
/// and prints `address port open|refused|dropped` for each.
pub fn script(targets: &[(IpAddr, u16)]) -> String {
    let mut s = String::from(
        "probe() {\n  out=$(timeout 1.5 bash -c \"exec 3<>/dev/tcp/$1/$2\" 2>&1); rc=$?\n  if [ $rc = 0 ]; then echo \"$1 $2 open\"; elif [ $rc = 124 ]; then echo \"$1 $2 dropped\"; elif echo \"$out\" | grep -q refused; then echo \"$1 $2 refused\"; else echo \"$1 $2 dropped\"; fi\n}\n",
    );
    for (a, p) in targets {
        s.push_str(&format!("probe {a} {p} &\n"));
    }
    s.push_str("wait\n");
    s
}

/// The lines [`script`] printed.
pub fn parse(out: &str) -> Vec<(IpAddr, u16, Reach)> {
    out.lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let reach = match *w.get(2)? {
                "open" => Reach::Open,
                "refused" => Reach::Refused,
                _ => Reach::Dropped,
            };
            Some((w[0].parse().ok()?, w[1].parse().ok()?, reach))
        })
        .collect()
}

/// The same probes from this machine, in parallel.
pub fn from_here(targets: &[(IpAddr, u16)]) -> Vec<(IpAddr, u16, Reach)> {
    std::thread::scope(|s| {
        let handles: Vec<_> = targets
            .iter()
            .map(|&(a, p)| {
                s.spawn(move || {
                    let reach = match TcpStream::connect_timeout(&SocketAddr::new(a, p), WAIT) {
                        Ok(_) => Reach::Open,
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                            Reach::Refused
                        }
                        Err(_) => Reach::Dropped,
                    };
                    (a, p, reach)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_skips_loopback() {
        let ss = "LISTEN 0 128 0.0.0.0:22 0.0.0.0:*\nLISTEN 0 128 127.0.0.1:7001 0.0.0.0:*\nLISTEN 0 128 [::]:22 [::]:*\nLISTEN 0 128 [::1]:5432 [::]:*\nLISTEN 0 128 10.81.0.10:8443 0.0.0.0:*\nLISTEN 0 128 *:80 *:*\n";
        assert_eq!(listening(ss), BTreeSet::from([22, 80, 8443]));
    }

    #[test]
    fn parses_what_the_script_prints() {
        let out = "10.0.0.1 22 open\n10.0.0.1 5432 refused\n10.0.0.2 7000 dropped\n";
        let p = parse(out);
        assert_eq!(p.len(), 3);
        assert_eq!(p[1].2, Reach::Refused);
        assert!(script(&[("10.0.0.1".parse().unwrap(), 22)]).contains("probe 10.0.0.1 22 &"));
    }

    #[test]
    fn probes_from_here_tell_open_from_refused() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let open = l.local_addr().unwrap().port();
        let closed = {
            let t = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            t.local_addr().unwrap().port()
        };
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let r = from_here(&[(lo, open), (lo, closed)]);
        assert_eq!(r, [(lo, open, Reach::Open), (lo, closed, Reach::Refused)]);
    }
}
