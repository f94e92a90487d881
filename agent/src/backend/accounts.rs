//! Accounts and sign-in sessions. Passwords are hashed with argon2id (off the async threads);
//! a session token is 32 random bytes, given to the browser in a Secure, HttpOnly, SameSite
//! cookie and stored only as its SHA-256 in PostgreSQL, with memcached in front (a lost cache
//! entry costs one query).

use std::net::IpAddr;
use std::time::Duration;

use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use base64::Engine;
use ring::rand::SecureRandom;

use super::throttle::Kind;
use super::{ApiError, Backend};

pub const COOKIE: &str = "sagews_session";

/// Who a connection or request speaks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub id: i64,
    pub name: String,
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("the system's random source works");
    b
}

fn token_hash(token: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
        .as_ref()
        .to_vec()
}

fn cache_key(hash: &[u8]) -> String {
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("sess:{hex}")
}

/// Account names: 3 to 32 of a-z, 0-9, '_', '-', '.'; they show in URLs and logs.
pub fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = (3..=32).contains(&name.len())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-' || b == b'.'
        });
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad(
            "an account name is 3 to 32 characters: lowercase letters, digits, '_', '-' or '.'",
        ))
    }
}

fn hasher() -> argon2::Argon2<'static> {
    // argon2id with the crate's defaults (OWASP's second set: 19 MiB, 2 passes, 1 lane).
    argon2::Argon2::default()
}

/// Hashes at once at most: each takes 19 MiB and a core for ~20 ms, so a burst of sign-ins
/// queues here instead of taking the machine's memory.
static HASHING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

pub async fn hash_password(password: String) -> Result<String, ApiError> {
    let _permit = HASHING.acquire().await.expect("never closed");
    tokio::task::spawn_blocking(move || {
        let salt = random_bytes::<16>();
        hasher()
            .hash_password_with_salt(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| ApiError::internal(format!("hashing the password: {e}")))
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
}

async fn verify_password(password: String, hash: String) -> bool {
    let _permit = HASHING.acquire().await.expect("never closed");
    tokio::task::spawn_blocking(move || {
        hasher()
            .verify_password(password.as_bytes(), hash.as_str())
            .is_ok()
    })
    .await
    .unwrap_or(false)
}

/// A hash that matches nothing, verified when the account does not exist so that a sign-in
/// takes as long whether or not the name is known.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FnZXdzc2FnZXdzc2FnZQ$OT7QmRxfT6BqE4zpN0sO1eB9YF1Jj8wQvQ2fzjG7C2Q";

impl Backend {
    /// Creates an account; `client` is the browser's address (limits sign-ups per address).
    pub async fn signup(
        &self,
        name: &str,
        password: &str,
        client: Option<IpAddr>,
    ) -> Result<(Account, String), ApiError> {
        if !self.config.accounts.signup {
            return Err(ApiError::forbidden("sign-up is closed on this service"));
        }
        check_name(name)?;
        // An operator's account is made by the deployment, never taken by whoever signs up first.
        if self.config.admins.iter().any(|a| a == name) {
            return Err(ApiError::conflict(format!(
                "the account name {name:?} is taken"
            )));
        }
        let addr = client.map(|a| a.to_string());
        // Counted per address, per /64 for IPv6 (`address_key`); logged as it is.
        let counted = client.map(super::throttle::address_key);
        let keys: Vec<(Kind, &str)> = counted
            .iter()
            .map(|a| (Kind::SignupAddress, a.as_str()))
            .collect();
        self.throttle(&keys).await?;
        let min = self.config.accounts.min_password_length as usize;
        if password.chars().count() < min {
            return Err(ApiError::bad(format!(
                "the password must have at least {min} characters"
            )));
        }
        if password.len() > 1024 {
            return Err(ApiError::bad("the password is longer than 1024 bytes"));
        }
        let hash = hash_password(password.to_string()).await?;
        let db = self.db().await?;
        let row = db
            .query_opt(
                "INSERT INTO accounts (name, password_hash) VALUES ($1, $2)
                 ON CONFLICT (name) DO NOTHING RETURNING id",
                &[&name, &hash],
            )
            .await?;
        drop(db);
        let Some(row) = row else {
            return Err(ApiError::conflict(format!(
                "the account name {name:?} is taken"
            )));
        };
        let account = Account {
            id: row.get(0),
            name: name.to_string(),
        };
        self.metrics.inc(&self.metrics.signups);
        self.count_attempt(&keys).await?;
        self.audit(
            "account created",
            &account,
            serde_json::json!({"address": addr}),
        );
        let token = self.new_session(&account).await?;
        Ok((account, token))
    }

    /// Checks a password; `client` is the browser's address. Failed attempts are limited per
    /// account and per address (`throttle.rs`), checked before the password is.
    pub async fn signin(
        &self,
        name: &str,
        password: &str,
        client: Option<IpAddr>,
    ) -> Result<(Account, String), ApiError> {
        let denied = || ApiError::unauthorized("wrong account name or password");
        if name.len() > 64 || password.len() > 1024 {
            return Err(denied());
        }
        let addr = client.map(|a| a.to_string());
        let counted = client.map(super::throttle::address_key);
        let mut keys = vec![(Kind::FailedSigninAccount, name)];
        if let Some(a) = &counted {
            keys.push((Kind::FailedSigninAddress, a.as_str()));
        }
        // Counted as a failure now, uncounted below if the password is right.
        let reserved = self.reserve(&keys).await?;
        let row = self
            .db()
            .await?
            .query_opt(
                "SELECT id, password_hash FROM accounts WHERE name = $1",
                &[&name],
            )
            .await?;
        let (id, hash) = match &row {
            Some(r) => (r.get::<_, i64>(0), r.get::<_, String>(1)),
            None => (0, DUMMY_HASH.to_string()),
        };
        if !verify_password(password.to_string(), hash).await || row.is_none() {
            self.metrics.inc(&self.metrics.signin_failures);
            self.audit_event(
                "sign-in failed",
                serde_json::json!({"account": name, "address": addr}),
            );
            return Err(denied());
        }
        self.release(&reserved).await;
        let account = Account {
            id,
            name: name.to_string(),
        };
        self.metrics.inc(&self.metrics.signins);
        self.audit("signed in", &account, serde_json::json!({"address": addr}));
        let token = self.new_session(&account).await?;
        Ok((account, token))
    }

    async fn new_session(&self, account: &Account) -> Result<String, ApiError> {
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes::<32>());
        let days = i32::try_from(self.config.accounts.session_days).unwrap_or(30);
        self.db()
            .await?
            .execute(
                "INSERT INTO sessions (token_hash, account_id, expires)
                 VALUES ($1, $2, now() + make_interval(days => $3))",
                &[&token_hash(&token), &account.id, &days],
            )
            .await?;
        Ok(token)
    }

    /// The account a session token belongs to, if the session is live.
    pub async fn session_account(&self, token: &str) -> Result<Option<Account>, ApiError> {
        if token.is_empty() || token.len() > 128 {
            return Ok(None);
        }
        let hash = token_hash(token);
        let key = cache_key(&hash);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        if let Some(v) = self.cache.get(&key).await {
            // "<id> <expires unix> <name>"
            let text = String::from_utf8_lossy(&v);
            let mut it = text.splitn(3, ' ');
            if let (Some(Ok(id)), Some(Ok(exp)), Some(name)) = (
                it.next().map(str::parse::<i64>),
                it.next().map(str::parse::<i64>),
                it.next(),
            ) {
                self.metrics.inc(&self.metrics.cache_hits);
                if exp > now {
                    return Ok(Some(Account {
                        id,
                        name: name.to_string(),
                    }));
                }
                return Ok(None);
            }
        }
        self.metrics.inc(&self.metrics.cache_misses);
        let row = self
            .db()
            .await?
            .query_opt(
                "SELECT a.id, a.name, extract(epoch FROM s.expires)::int8
                 FROM sessions s JOIN accounts a ON a.id = s.account_id
                 WHERE s.token_hash = $1 AND s.expires > now()",
                &[&hash],
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        let account = Account {
            id: row.get(0),
            name: row.get(1),
        };
        let exp: i64 = row.get(2);
        let value = format!("{} {exp} {}", account.id, account.name);
        let ttl = Duration::from_secs((exp - now).clamp(1, 3600) as u64);
        self.cache.set(&key, value.as_bytes(), ttl).await;
        Ok(Some(account))
    }

    pub async fn signout(&self, token: &str) -> Result<(), ApiError> {
        let hash = token_hash(token);
        self.db()
            .await?
            .execute("DELETE FROM sessions WHERE token_hash = $1", &[&hash])
            .await?;
        self.cache.delete(&cache_key(&hash)).await;
        Ok(())
    }

    /// The Set-Cookie value for a new session (or, with `None`, one that clears it).
    pub fn cookie(&self, token: Option<&str>) -> String {
        match token {
            Some(t) => format!(
                "{COOKIE}={t}; Path=/; Max-Age={}; Secure; HttpOnly; SameSite=Strict",
                u64::from(self.config.accounts.session_days) * 86400
            ),
            None => format!("{COOKIE}=; Path=/; Max-Age=0; Secure; HttpOnly; SameSite=Strict"),
        }
    }
}

/// The session token in a Cookie header, if any.
pub fn token_from_cookies(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passwords_hash_and_verify() {
        let h = hash_password("correct horse".into()).await.unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(verify_password("correct horse".into(), h.clone()).await);
        assert!(!verify_password("wrong horse".into(), h).await);
        assert!(!verify_password("anything".into(), DUMMY_HASH.into()).await);
    }

    #[test]
    fn names() {
        assert!(check_name("alice").is_ok());
        assert!(check_name("a'; DROP TABLE accounts; --").is_err());
        assert!(check_name("ab").is_err());
        assert!(check_name("Alice").is_err());
    }

    #[test]
    fn cookies() {
        let mut h = axum::http::HeaderMap::new();
        h.insert("cookie", "a=1; sagews_session=tok; b=2".parse().unwrap());
        assert_eq!(token_from_cookies(&h).as_deref(), Some("tok"));
    }
}
