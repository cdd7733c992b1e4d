//! Raw HTTP/2 frames (RFC 9113 section 4.1) and a bounded attack runner, for the floods no well-behaved client library
//! would send (the proxy's and the control plane's attack tests).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const HEADERS: u8 = 1;
pub const RST_STREAM: u8 = 3;
pub const SETTINGS: u8 = 4;
pub const PING: u8 = 6;
pub const GOAWAY: u8 = 7;
pub const CONTINUATION: u8 = 9;
pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
/// The GOAWAY code of a peer that misbehaves (RFC 9113 section 7).
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A request header block in HPACK without Huffman coding or indexing: `:method` (GET, static 2, or POST, static 3),
/// `:scheme` (static 6: http, 7: https), `:path` and `:authority` literals with static names 4 and 1, then `extra`
/// literal headers with new names.
pub fn request(post: bool, https: bool, path: &str, authority: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut block = vec![if post { 0x83 } else { 0x82 }, if https { 0x87 } else { 0x86 }];
    literal(&mut block, 0x04, path);
    literal(&mut block, 0x01, authority);
    for (name, value) in extra {
        block.extend_from_slice(&[0x00, name.len() as u8]);
        block.extend_from_slice(name.as_bytes());
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    block
}

/// A literal without indexing whose name is static entry `index` (values under 127 bytes).
fn literal(block: &mut Vec<u8>, index: u8, value: &str) {
    block.extend_from_slice(&[index, value.len() as u8]);
    block.extend_from_slice(value.as_bytes());
}

/// `GET /` to `echo`: the smallest request block.
pub fn get_echo() -> Vec<u8> {
    request(false, false, "/", "echo", &[])
}

/// `GET <path>` to `echo`.
pub fn get_echo_path(path: &str) -> Vec<u8> {
    request(false, false, path, "echo", &[])
}

/// A literal header `x-a: <16 bytes>` (new name, not indexed), 21 bytes: CONTINUATION padding.
pub fn filler() -> Vec<u8> {
    let mut block = vec![0x00, 3];
    block.extend_from_slice(b"x-a");
    block.push(16);
    block.extend_from_slice(b"aaaaaaaaaaaaaaaa");
    block
}

/// What an HTTP/2 connection saw from the server.
#[derive(Debug, Default)]
pub struct Outcome {
    pub frames_sent: usize,
    /// The GOAWAY's error code, if one came.
    pub goaway: Option<u32>,
    /// RST_STREAMs with REFUSED_STREAM (7).
    pub refused: usize,
    /// RST_STREAMs with any other code, and HEADERS frames (answers) the server sent.
    pub reset: usize,
    pub answered: usize,
    /// The server closed the connection.
    pub closed: bool,
    /// A write was not taken by the end of the attack: the server stopped reading (back-pressure).
    pub stalled: bool,
}

/// How long a write may wait, for a peer that never reads, before the server counts as no longer reading.
const STALL: Duration = Duration::from_secs(1);

/// Sends the preface and an empty SETTINGS, then `next(i)`'s frames until it says None, the connection ends or
/// `duration` is over; reads what the server sends if `read` (else never reads: its writes back up, and the attack
/// ends as `stalled` once a write has waited `STALL`). Then waits up to 2 s for the server's last frames.
pub async fn attack<S>(
    stream: S,
    read: bool,
    duration: Duration,
    next: impl Fn(usize) -> Option<Vec<u8>> + Send + 'static,
) -> Outcome
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rx, mut tx) = tokio::io::split(stream);
    let seen = Arc::new(Mutex::new(Outcome::default()));
    let record = seen.clone();
    let reader = tokio::spawn(async move {
        if !read {
            return std::future::pending().await;
        }
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match rx.read(&mut chunk).await {
                Ok(0) | Err(_) => {
                    record.lock().unwrap().closed = true;
                    return;
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            while buf.len() >= 9 {
                let len = (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
                if buf.len() < 9 + len {
                    break;
                }
                let payload = &buf[9..9 + len];
                let mut seen = record.lock().unwrap();
                match buf[3] {
                    GOAWAY if len >= 8 => seen.goaway = Some(u32::from_be_bytes(payload[4..8].try_into().unwrap())),
                    RST_STREAM if payload == 7u32.to_be_bytes() => seen.refused += 1,
                    RST_STREAM => seen.reset += 1,
                    HEADERS => seen.answered += 1,
                    _ => {}
                }
                drop(seen);
                buf.drain(..9 + len);
            }
        }
    });
    let (mut sent, mut stalled) = (0, false);
    let end = Instant::now() + duration;
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    let mut i = 0;
    while Instant::now() < end {
        // Frames go out in batches of about 16 KiB; a write the server does not take within the attack ends it.
        while out.len() < 16 * 1024 {
            match next(i) {
                Some(frame) => {
                    out.extend(frame);
                    i += 1;
                }
                None => break,
            }
        }
        if out.is_empty() {
            break;
        }
        // A peer that never reads ends the attack once the server has not taken a write for `STALL`, however long
        // the machine took to fill the buffers between them.
        let left = end.saturating_duration_since(Instant::now());
        let wait = if read { left } else { left.min(STALL) };
        match tokio::time::timeout(wait, tx.write_all(&out)).await {
            Ok(Ok(())) => sent = i,
            Ok(Err(_)) => break,
            Err(_) => {
                stalled = !read && wait == STALL;
                break;
            }
        }
        out.clear();
        tokio::task::yield_now().await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), reader).await;
    let mut seen = std::mem::take(&mut *seen.lock().unwrap());
    (seen.frames_sent, seen.stalled) = (sent, stalled);
    seen
}
