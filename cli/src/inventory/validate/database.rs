//! The database settings: which of the (one or two) `database` hosts is the standby, and
//! scheduled backups with a schedule systemd reads and a directory that is a plain path.

use super::super::raw::RawInventory;
use super::super::{Backups, DatabaseSettings, Host, Role};
use super::V;
use crate::diag::suggest;
use crate::yaml::join;

/// `roles_complete`: every host and role was understood, so counting database hosts means
/// something.
pub(super) fn check_database(
    v: &mut V<'_>,
    raw: &RawInventory,
    hosts: &[Host],
    roles_complete: bool,
) -> DatabaseSettings {
    let d = &raw.database;
    let dbs: Vec<&Host> = hosts.iter().filter(|h| h.has(Role::Database)).collect();
    let mut standby = None;
    match &d.standby {
        _ if !roles_complete => {}
        Some(s) => match dbs.iter().find(|h| h.name == s.v) {
            Some(_) if dbs.len() == 2 => standby = Some(s.v.clone()),
            Some(_) => v.err(
                &s.pos,
                "database.standby",
                format!(
                    "a standby needs exactly two database hosts, found {}",
                    dbs.len()
                ),
                "give the role `database` to the primary and to the standby".to_string(),
            ),
            None => {
                let known: Vec<&str> = dbs.iter().map(|h| h.name.as_str()).collect();
                let hint = if hosts.iter().any(|h| h.name == s.v) {
                    format!("give `{}` the role `database` too", s.v)
                } else {
                    suggest(&s.v, &known)
                };
                v.err(
                    &s.pos,
                    "database.standby",
                    format!("`{}` is not a host with the database role", s.v),
                    Some(hint),
                );
            }
        },
        None if dbs.len() == 2 => {
            let h = dbs[1];
            v.err(
                &h.pos,
                &join("hosts", &h.name),
                "two database hosts without `database.standby`",
                format!(
                    "name the standby in `database: {{standby: {}}}` (it streams from the other)",
                    h.name
                ),
            );
        }
        None => {}
    }
    let primary = dbs
        .iter()
        .find(|h| Some(&h.name) != standby.as_ref())
        .map(|h| h.name.clone())
        .unwrap_or_default();
    let backups = d.backups.as_ref().and_then(|b| {
        let b = &b.v;
        let mut ok = true;
        if !calendar_ok(&b.schedule.v) {
            ok = false;
            v.err(
                &b.schedule.pos,
                "database.backups.schedule",
                format!("`{}` is not a schedule sagectl accepts", b.schedule.v),
                "write systemd's OnCalendar= form: hourly, daily, weekly, or like `*-*-* 03:00:00` (letters, digits, spaces and * - : / , . only)".to_string(),
            );
        }
        if !dir_ok(&b.dir.v) {
            ok = false;
            v.err(
                &b.dir.pos,
                "database.backups.dir",
                format!("`{}` is not a directory sagectl writes backups to", b.dir.v),
                "an absolute path under /var or /srv of letters, digits and / . _ - (not / itself)".to_string(),
            );
        }
        ok.then(|| Backups {
            schedule: b.schedule.v.clone(),
            keep: b.keep,
            dir: b.dir.v.trim_end_matches('/').to_string(),
        })
    });
    DatabaseSettings {
        primary,
        standby,
        backups,
    }
}

/// systemd calendar expressions in a form that cannot break out of a unit file line; systemd
/// itself has the last word when the timer loads (`sagectl up` reports a timer that fails).
fn calendar_ok(s: &str) -> bool {
    !s.trim().is_empty()
        && s.len() <= 100
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || " *-:/,.~".contains(c))
}

fn dir_ok(s: &str) -> bool {
    let parts: Vec<&str> = s.trim_end_matches('/').split('/').collect();
    (s.starts_with("/var/") || s.starts_with("/srv/"))
        && parts.len() >= 3
        && parts[1..].iter().all(|p| {
            !p.is_empty()
                && *p != "."
                && *p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_and_dirs() {
        for ok in [
            "daily",
            "hourly",
            "*-*-* 03:00:00",
            "Mon..Fri 02:30",
            "*:0/15",
        ] {
            assert!(calendar_ok(ok), "{ok}");
        }
        for bad in ["", "daily\nExecStart=/bin/sh", "$(reboot)", "daily;x"] {
            assert!(!calendar_ok(bad), "{bad:?}");
        }
        for ok in ["/var/backups/sagews", "/srv/pg-backups/", "/var/lib/x_y.z"] {
            assert!(dir_ok(ok), "{ok}");
        }
        for bad in [
            "/var",
            "/var/",
            "/etc/x",
            "var/x",
            "/var/../etc",
            "/var/a b",
            "/var//x",
        ] {
            assert!(!dir_ok(bad), "{bad:?}");
        }
    }
}
