//! Which web pages may use this backend with a person's credentials: only the site's own
//! origin(s) (`https://<public name>` from the inventory, or the config's `origins`). Browsers
//! send `Origin` on every cross-origin request, on every POST and on websocket upgrades, and
//! `Sec-Fetch-Site` on everything; a request without either is not from a browser page (curl,
//! the load generator), so it cannot be a forged cross-site request. The session cookie's
//! SameSite=Strict stays as a second line, not the only one.

use axum::http::{HeaderMap, HeaderValue, header};

use super::{ApiError, Config};

/// The origins this backend serves: the config's list, or the public name's HTTPS origin.
pub fn allowed(config: &Config) -> Vec<String> {
    if config.origins.is_empty() {
        vec![format!("https://{}", config.public_name)]
    } else {
        config.origins.clone()
    }
}

/// The request's `Origin` if it is one of ours; `None` when there is none.
pub fn ours<'h>(
    allowed: &[String],
    headers: &'h HeaderMap,
) -> Result<Option<&'h HeaderValue>, ApiError> {
    if let Some(site) = headers.get("sec-fetch-site") {
        // "same-site" is another origin of the same site (a sibling subdomain): still foreign.
        if site == "cross-site" || site == "same-site" {
            return Err(refused(headers));
        }
    }
    match headers.get(header::ORIGIN) {
        None => Ok(None),
        Some(o) => {
            let s = o.to_str().unwrap_or("");
            if allowed.iter().any(|a| a.eq_ignore_ascii_case(s)) {
                Ok(Some(o))
            } else {
                Err(refused(headers))
            }
        }
    }
}

fn refused(headers: &HeaderMap) -> ApiError {
    let origin = headers
        .get(header::ORIGIN)
        .map(|o| String::from_utf8_lossy(o.as_bytes()).into_owned())
        .unwrap_or_else(|| "another site".into());
    ApiError::new(
        403,
        format!("requests from {origin:?} are refused: open the site's own page"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.insert(*k, HeaderValue::from_static(v));
        }
        m
    }

    #[test]
    fn only_our_origin_passes() {
        let a = vec!["https://sagews.example".to_string()];
        assert!(ours(&a, &h(&[])).unwrap().is_none());
        assert!(
            ours(&a, &h(&[("origin", "https://sagews.example")]))
                .unwrap()
                .is_some()
        );
        assert!(
            ours(&a, &h(&[("origin", "HTTPS://SAGEWS.EXAMPLE")]))
                .unwrap()
                .is_some()
        );
        for bad in [
            "https://evil.example",
            "null",
            "http://sagews.example",
            "https://sagews.example:444",
            "https://sagews.example.evil",
        ] {
            let e = ours(&a, &h(&[("origin", bad)])).unwrap_err();
            assert_eq!(e.status, 403, "{bad}");
        }
        assert!(ours(&a, &h(&[("sec-fetch-site", "cross-site")])).is_err());
        assert!(ours(&a, &h(&[("sec-fetch-site", "same-site")])).is_err());
        assert!(ours(&a, &h(&[("sec-fetch-site", "same-origin")])).is_ok());
        assert!(ours(&a, &h(&[("sec-fetch-site", "none")])).is_ok());
    }
}
