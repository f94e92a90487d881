//! A small HTTP/1.1 client over any byte stream (the agents' TLS connections): one request at a
//! time on a kept-alive connection, bodies by Content-Length or chunked. Enough for publishing
//! to nginx and for logd's webhooks; not a general client.

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn bad(why: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, why.into())
}

/// Percent-encodes a path for a request line: keeps unreserved characters and '/'.
pub fn encode_path(p: &str) -> String {
    let mut s = String::with_capacity(p.len());
    for b in p.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// Sends one request and reads its response (at most `max_body` bytes of body).
pub async fn request<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut BufReader<S>,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    max_body: usize,
) -> std::io::Result<Response> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
    for (k, v) in headers {
        if k.contains(['\r', '\n', ':']) || v.contains(['\r', '\n']) {
            return Err(bad("header with a line break"));
        }
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || matches!(method, "POST" | "PUT") {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let w = s.get_mut();
    w.write_all(head.as_bytes()).await?;
    w.write_all(body).await?;
    w.flush().await?;
    read_response(s, method == "HEAD", max_body).await
}

pub async fn read_response<S: AsyncRead + Unpin>(
    s: &mut BufReader<S>,
    head_only: bool,
    max_body: usize,
) -> std::io::Result<Response> {
    let mut line = String::new();
    if s.read_line(&mut line).await? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed before a response",
        ));
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad(format!("not an HTTP status line: {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        s.read_line(&mut line).await?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if headers.len() > 200 {
            return Err(bad("too many headers"));
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let mut r = Response {
        status,
        headers,
        body: Vec::new(),
    };
    if head_only || status == 204 || status == 304 || (100..200).contains(&status) {
        return Ok(r);
    }
    if r.header("transfer-encoding")
        .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
    {
        loop {
            line.clear();
            s.read_line(&mut line).await?;
            let n = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| bad(format!("bad chunk size {line:?}")))?;
            if n == 0 {
                line.clear();
                s.read_line(&mut line).await?;
                break;
            }
            if r.body.len() + n > max_body {
                return Err(bad("response body over the limit"));
            }
            let at = r.body.len();
            r.body.resize(at + n + 2, 0);
            s.read_exact(&mut r.body[at..]).await?;
            r.body.truncate(at + n);
        }
    } else if let Some(n) = r.header("content-length") {
        let n: usize = n.parse().map_err(|_| bad("bad Content-Length"))?;
        if n > max_body {
            return Err(bad("response body over the limit"));
        }
        r.body.resize(n, 0);
        s.read_exact(&mut r.body).await?;
    } else {
        (&mut *s)
            .take(max_body as u64 + 1)
            .read_to_end(&mut r.body)
            .await?;
        if r.body.len() > max_body {
            return Err(bad("response body over the limit"));
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn chunked_and_length() {
        let (a, mut b) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move {
            let mut buf = vec![0u8; 1024];
            let n = b.read(&mut buf).await.unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).starts_with("PUT /a%20b HTTP/1.1\r\n"));
            b.write_all(b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await
                .unwrap();
            b
        });
        let mut s = BufReader::new(a);
        let r = request(&mut s, "PUT", "h", &encode_path("/a b"), &[], b"x", 100)
            .await
            .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (201, b"abcde".as_slice()));
        let r = read_response(&mut s, false, 100).await.unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, b"ok".as_slice()));
        let _ = server.await;
        assert_eq!(encode_path("/pub/w1/ä;x"), "/pub/w1/%C3%A4%3Bx");
    }
}
