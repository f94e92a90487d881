//! Frames between agents: a 4-byte big-endian length, then that many bytes of JSON. A frame
//! larger than the connection's maximum is refused before anything is allocated for it, and
//! reads have deadlines (one for the quiet time before a frame, one for the frame itself once
//! begun), so a slow or hostile peer costs one connection, nothing more.

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {size} bytes is over the limit of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("the peer closed the connection")]
    Closed,
    #[error("the connection ended inside a frame")]
    Truncated,
    #[error("no complete frame within {0:?}")]
    Timeout(Duration),
    #[error("frame is not a valid message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads one frame's bytes: its first byte within `idle`, the rest within `body` of that.
/// `Closed` only when the peer ended cleanly between frames.
pub async fn read_raw<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
    idle: Duration,
    body: Duration,
) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    let n = tokio::time::timeout(idle, r.read(&mut len))
        .await
        .map_err(|_| FrameError::Timeout(idle))??;
    if n == 0 {
        return Err(FrameError::Closed);
    }
    let rest = async {
        let mut got = n;
        while got < 4 {
            let m = r.read(&mut len[got..]).await?;
            if m == 0 {
                return Err(FrameError::Truncated);
            }
            got += m;
        }
        let size = u32::from_be_bytes(len) as usize;
        if size > max {
            return Err(FrameError::TooLarge { size, max });
        }
        let mut buf = vec![0u8; size];
        r.read_exact(&mut buf).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                FrameError::Truncated
            } else {
                e.into()
            }
        })?;
        Ok(buf)
    };
    tokio::time::timeout(body, rest)
        .await
        .map_err(|_| FrameError::Timeout(body))?
}

/// Reads and decodes one message, waiting at most `deadline` before it and for it.
pub async fn read<T: DeserializeOwned, R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
    deadline: Duration,
) -> Result<T, FrameError> {
    read_in(r, max, deadline, deadline).await
}

/// Reads and decodes one message (see [`read_raw`] for the two deadlines).
pub async fn read_in<T: DeserializeOwned, R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
    idle: Duration,
    body: Duration,
) -> Result<T, FrameError> {
    let raw = read_raw(r, max, idle, body).await?;
    Ok(serde_json::from_slice(&raw)?)
}

/// Encodes and writes one message.
pub async fn write<T: Serialize, W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &T,
) -> Result<(), FrameError> {
    let body = serde_json::to_vec(msg)?;
    let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge {
        size: body.len(),
        max: u32::MAX as usize,
    })?;
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(1);

    #[tokio::test]
    async fn round_trip() {
        let mut buf = Vec::new();
        write(&mut buf, &serde_json::json!({"a": 1})).await.unwrap();
        assert_eq!(&buf[..4], &[0, 0, 0, 7]);
        let v: serde_json::Value = read(&mut &buf[..], 100, T).await.unwrap();
        assert_eq!(v["a"], 1);
    }

    #[tokio::test]
    async fn refuses_bad_frames() {
        let huge = [0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_raw(&mut &huge[..], 1024, T, T).await,
            Err(FrameError::TooLarge {
                size: 4294967295,
                max: 1024
            })
        ));
        let truncated = [0, 0, 0, 10, b'{'];
        assert!(matches!(
            read_raw(&mut &truncated[..], 1024, T, T).await,
            Err(FrameError::Truncated)
        ));
        let half_len = [0, 0];
        assert!(matches!(
            read_raw(&mut &half_len[..], 1024, T, T).await,
            Err(FrameError::Truncated)
        ));
        assert!(matches!(
            read_raw(&mut &[][..], 1024, T, T).await,
            Err(FrameError::Closed)
        ));
        let not_json = [0, 0, 0, 3, b'a', b'b', b'c'];
        assert!(matches!(
            read::<serde_json::Value, _>(&mut &not_json[..], 1024, T).await,
            Err(FrameError::Json(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn silent_and_slow_peers_time_out() {
        let (mut a, _b) = tokio::io::duplex(64);
        let r = read_raw(
            &mut a,
            1024,
            Duration::from_secs(30),
            Duration::from_secs(1),
        )
        .await;
        assert!(matches!(r, Err(FrameError::Timeout(d)) if d == Duration::from_secs(30)));
        // A frame begun and not finished: the body deadline, however long the idle one.
        let (mut a, mut b) = tokio::io::duplex(64);
        b.write_all(&[0, 0, 0, 9, b'{']).await.unwrap();
        let r = read_raw(
            &mut a,
            1024,
            Duration::from_secs(600),
            Duration::from_secs(2),
        )
        .await;
        assert!(matches!(r, Err(FrameError::Timeout(d)) if d == Duration::from_secs(2)));
    }
}
