//! PostgreSQL's SCRAM-SHA-256 password verifiers (RFC 5802/7677), made and checked here so a
//! role's password is set from a verifier and never sent to the server in clear, and so `up`
//! can tell whether a role already has the generated password without logging in.

use ring::{digest, hmac, pbkdf2};
use std::num::NonZeroU32;

const ITERATIONS: u32 = 4096;

fn b64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn unb64(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

fn keys(password: &str, salt: &[u8], iterations: u32) -> (Vec<u8>, Vec<u8>) {
    let mut salted = [0u8; 32];
    let iters = NonZeroU32::new(iterations).expect("positive");
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        iters,
        salt,
        password.as_bytes(),
        &mut salted,
    );
    let key = hmac::Key::new(hmac::HMAC_SHA256, &salted);
    let client_key = hmac::sign(&key, b"Client Key");
    let stored = digest::digest(&digest::SHA256, client_key.as_ref());
    let server = hmac::sign(&key, b"Server Key");
    (stored.as_ref().to_vec(), server.as_ref().to_vec())
}

/// A verifier for `password` with `salt`, in PostgreSQL's `rolpassword` format.
pub fn verifier(password: &str, salt: &[u8]) -> String {
    let (stored, server) = keys(password, salt, ITERATIONS);
    format!(
        "SCRAM-SHA-256${ITERATIONS}:{}${}:{}",
        b64(salt),
        b64(&stored),
        b64(&server)
    )
}

/// Whether `stored` (a `rolpassword` value) is a SCRAM verifier of `password`.
pub fn matches(stored: &str, password: &str) -> bool {
    let parse = || -> Option<bool> {
        let rest = stored.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys_part) = rest.split_once('$')?;
        let (iters, salt) = params.split_once(':')?;
        let (stored_key, server_key) = keys_part.split_once(':')?;
        let (s, v) = keys(password, &unb64(salt)?, iters.parse().ok()?);
        Some(unb64(stored_key)? == s && unb64(server_key)? == v)
    };
    parse().unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for v in [&b""[..], b"f", b"fo", b"foo", b"foob", b"fooba", b"foobar"] {
            assert_eq!(unb64(&b64(v)).unwrap(), v);
        }
        assert_eq!(b64(b"foobar"), "Zm9vYmFy");
        assert_eq!(b64(b"fo"), "Zm8=");
    }

    #[test]
    fn verifier_matches_only_its_password() {
        let v = verifier("s3cret", b"0123456789abcdef");
        assert!(v.starts_with("SCRAM-SHA-256$4096:MDEyMzQ1Njc4OWFiY2RlZg==$"));
        assert!(matches(&v, "s3cret"));
        assert!(!matches(&v, "s3cret2"));
        assert!(!matches("md5abcdef", "s3cret"));
        assert!(!matches("", "s3cret"));
    }
}
