//! Limits on sign-in and sign-up attempts, shared by every backend (rows in PostgreSQL, so a
//! client spreading its guesses over backends gains nothing): failed sign-ins per account and
//! per client address, sign-ups per client address, each within a sliding window. Past a limit
//! the attempt is refused with 429 and how long to wait, before any password is checked, and
//! logd is told. The client address is the one HAProxy saw (`X-Sagews-Client`, which HAProxy
//! sets, replacing whatever the client sent; only HAProxy can connect to a backend).
//! HAProxy also limits the rate of sign-in requests per address (stick table), which covers
//! floods that never reach a backend.

use std::net::IpAddr;

use axum::http::HeaderMap;

use super::{ApiError, Backend};

/// The header HAProxy sets to the client's address.
pub const CLIENT_HEADER: &str = "x-sagews-client";

/// The client's address as HAProxy saw it, if a HAProxy is in front.
pub fn client_address(headers: &HeaderMap) -> Option<IpAddr> {
    headers
        .get(CLIENT_HEADER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// What a client address is counted as: an IPv4 address itself (also when written as
/// IPv4-mapped IPv6), an IPv6 address by its /64, one host's usual share (a client rotating
/// addresses within its /64 gains nothing), as HAProxy's stick table does.
pub fn address_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                let net = std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
                format!("{net}/64")
            }
        },
    }
}

/// What is being counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    FailedSigninAccount,
    FailedSigninAddress,
    SignupAddress,
}

impl Kind {
    fn key(self, what: &str) -> String {
        match self {
            Kind::FailedSigninAccount => format!("signin-fail:account:{what}"),
            Kind::FailedSigninAddress => format!("signin-fail:addr:{what}"),
            Kind::SignupAddress => format!("signup:addr:{what}"),
        }
    }
}

impl Backend {
    fn limit(&self, kind: Kind) -> u32 {
        let a = &self.config.accounts;
        match kind {
            Kind::FailedSigninAccount => a.failed_signins_per_account,
            Kind::FailedSigninAddress => a.failed_signins_per_address,
            Kind::SignupAddress => a.signups_per_address,
        }
    }

    /// Refuses (429, with the seconds to wait) when any of `checks` is at its limit.
    pub async fn throttle(&self, checks: &[(Kind, &str)]) -> Result<(), ApiError> {
        self.over_limit(checks, 0).await
    }

    /// Counts an attempt for each of `keys` *before* it is made, then refuses (and uncounts it)
    /// when that puts any key over its limit: parallel attempts cannot all pass a check made
    /// before any of them is counted. The ids to `release` if the attempt turns out not to
    /// count (a right password).
    pub async fn reserve(&self, keys: &[(Kind, &str)]) -> Result<Vec<i64>, ApiError> {
        let mut ids = Vec::new();
        {
            let db = self.db().await?;
            for &(kind, what) in keys {
                let row = db
                    .query_one(
                        "INSERT INTO auth_events (key) VALUES ($1) RETURNING id",
                        &[&kind.key(what)],
                    )
                    .await?;
                ids.push(row.get::<_, i64>(0));
            }
        }
        if let Err(e) = self.over_limit(keys, 1).await {
            self.release(&ids).await;
            return Err(e);
        }
        Ok(ids)
    }

    /// Uncounts what `reserve` counted.
    pub async fn release(&self, ids: &[i64]) {
        if let Ok(db) = self.db().await
            && let Err(e) = db
                .execute("DELETE FROM auth_events WHERE id = ANY($1)", &[&ids])
                .await
        {
            tracing::warn!("uncounting a sign-in attempt: {e}");
        }
    }

    /// Refuses when a key has more than its limit of events in the window, `own` of them this
    /// attempt's.
    async fn over_limit(&self, checks: &[(Kind, &str)], own: i64) -> Result<(), ApiError> {
        let window = self.config.accounts.limit_window_seconds as f64;
        let db = self.db().await?;
        for &(kind, what) in checks {
            let max = i64::from(self.limit(kind)) + own;
            // The newest `max` events in the window: when there are `max`, the oldest of them
            // leaving the window is when the next attempt may come.
            let row = db
                .query_one(
                    "SELECT count(*), coalesce(extract(epoch FROM min(at) + make_interval(secs => $2) - now()), 0)::float8
                     FROM (SELECT at FROM auth_events WHERE key = $1 AND at > now() - make_interval(secs => $2)
                           ORDER BY at DESC LIMIT $3) newest",
                    &[&kind.key(what), &window, &max],
                )
                .await?;
            let (n, wait): (i64, f64) = (row.get(0), row.get(1));
            if n >= max {
                let wait = wait.ceil().max(1.0) as u64;
                self.metrics.inc(&self.metrics.throttled);
                self.audit_event(
                    "sign-in throttled",
                    serde_json::json!({"limit": format!("{kind:?}"), "key": what, "retry_after": wait}),
                );
                let what = match kind {
                    Kind::SignupAddress => "sign-ups from your address",
                    Kind::FailedSigninAccount => "failed sign-ins for this account",
                    Kind::FailedSigninAddress => "failed sign-ins from your address",
                };
                let mut e = ApiError::new(429, format!("too many {what}: try again in {wait} s"));
                e.retry_after = Some(wait);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Counts one event for each of `keys`.
    pub async fn count_attempt(&self, keys: &[(Kind, &str)]) -> Result<(), ApiError> {
        let db = self.db().await?;
        for &(kind, what) in keys {
            db.execute(
                "INSERT INTO auth_events (key) VALUES ($1)",
                &[&kind.key(what)],
            )
            .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod address_tests {
    use super::address_key;

    #[test]
    fn ipv6_counts_by_its_slash_64() {
        let key = |s: &str| address_key(s.parse().unwrap());
        assert_eq!(key("192.0.2.7"), "192.0.2.7");
        assert_eq!(key("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64");
        assert_eq!(
            key("2001:db8:1:2:bbbb:cccc:dddd:eeee"),
            key("2001:db8:1:2::9")
        );
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
    }
}
