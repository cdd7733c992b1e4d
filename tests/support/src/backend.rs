//! Real backends on loopback for the integration tests: an HTTP/1 + h2c app, a WebSocket echo, raw TCP servers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use ferry_api::hex;
use futures_util::StreamExt;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type TestBody = BoxBody<Bytes, BoxError>;

/// A server task on a loopback port; stopped when dropped.
pub struct Backend {
    pub addr: SocketAddr,
    /// Connections accepted so far (shows whether the proxy reuses pooled connections).
    pub connections: Arc<AtomicUsize>,
    /// HTTP requests the test app answered (HTTP backends only).
    pub requests: Arc<AtomicUsize>,
    /// Added to every answer of the HTTP test app (an endpoint made slow).
    pub delay_ms: Arc<AtomicU64>,
    /// When not 0, the HTTP test app answers every request with this status (a broken version of a Service).
    pub fail_status: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Backend {
    pub fn from_parts(addr: SocketAddr, task: JoinHandle<()>) -> Self {
        Backend {
            addr,
            connections: Default::default(),
            requests: Default::default(),
            delay_ms: Default::default(),
            fail_status: Default::default(),
            task,
        }
    }

    /// Kills the server as a crashed process would go: the listener and every open connection are closed.
    pub fn kill(&self) {
        self.task.abort();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn full(data: impl Into<Bytes>) -> TestBody {
    Full::new(data.into()).map_err(|e| match e {}).boxed()
}

/// Deterministic pseudo-random bytes: chunk `i` of a stream (xorshift), the same on both ends of a test.
pub fn pattern_chunk(i: u64, len: usize) -> Bytes {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out.into()
}

pub const CHUNK: usize = 64 * 1024;

/// A body of `total` pattern bytes, streamed in 64 KiB chunks (never held whole).
pub fn pattern_body(total: u64) -> TestBody {
    let chunks = total.div_ceil(CHUNK as u64);
    let stream = futures_util::stream::iter(0..chunks).map(move |i| {
        let len = (total - i * CHUNK as u64).min(CHUNK as u64) as usize;
        Ok::<_, BoxError>(Frame::data(pattern_chunk(i, len)))
    });
    BodyExt::boxed(StreamBody::new(stream))
}

pub fn pattern_sha256(total: u64) -> String {
    let mut h = Sha256::new();
    for i in 0..total.div_ceil(CHUNK as u64) {
        let len = (total - i * CHUNK as u64).min(CHUNK as u64) as usize;
        h.update(pattern_chunk(i, len));
    }
    hex(&h.finalize())
}

/// Reads a body frame by frame, hashing it: (length, sha256 hex).
pub async fn hash_body<B>(mut body: B) -> Result<(u64, String), B::Error>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
{
    let mut h = Sha256::new();
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            n += data.len() as u64;
            h.update(&data);
        }
    }
    Ok((n, hex(&h.finalize())))
}

fn query(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// Whether the `n`th request (0-based) of a backend fails at `percent` % with `seed`: a fixed pseudo-random pattern
/// (splitmix64), so a test sees the same failures on every run.
pub fn seeded_failure(seed: u64, n: u64, percent: u64) -> bool {
    let mut z = seed.wrapping_add(n.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) % 100 < percent
}

/// The test app. `/echo` streams the request body back; `/headers` lists the request's headers; `/sha256` hashes the body; `/download?bytes=N` streams N
/// pattern bytes; `/delay?ms=N` answers after N ms; `/stall?ms=N` sends its headers and a first chunk, the rest after
/// N ms; `/status?code=N` answers N; `/grpc-status?code=N` is a gRPC answer with
/// `grpc-status: N`; `/flaky?every=N` fails every Nth request of this backend with 503,
/// `/flaky?percent=P&seed=S` a seeded P % of them (with `&reset=1` by closing the connection instead); `/reset` closes the connection without an answer; anything else
/// says hello (after `?delay_ms=N`). Every response tells the HTTP version, Host/authority and `ferry-client-id` the
/// app saw (and any `ferry_client_id` spelling), and `x-backend` its port. `n` is the request's number at this backend.
async fn app(req: Request<Incoming>, n: u64, port: u16) -> Result<Response<TestBody>, std::io::Error> {
    let version = format!("{:?}", req.version());
    let host = req
        .headers()
        .get("host")
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let client_id = req.headers().get("ferry-client-id").cloned().unwrap_or(http::HeaderValue::from_static("none"));
    let seen = |name: &str| req.headers().get(name).cloned().unwrap_or(http::HeaderValue::from_static("none"));
    let request_id = seen("x-request-id");
    // A spelling CGI, WSGI and Rack map to the same variable as `ferry-client-id` (HTTP_FERRY_CLIENT_ID).
    let client_id_underscore = req
        .headers()
        .iter()
        .find(|(name, _)| name.as_str() != "ferry-client-id" && name.as_str().replace('_', "-") == "ferry-client-id")
        .map_or(http::HeaderValue::from_static("none"), |(_, v)| v.clone());
    let (traceparent, b3) = (seen("traceparent"), seen("b3"));
    let builder = Response::builder()
        .header("x-backend", port)
        .header("x-seen-version", version)
        .header("x-seen-host", host)
        .header("x-seen-client-id", client_id)
        .header("x-seen-client-id-underscore", client_id_underscore)
        .header("x-seen-request-id", request_id)
        .header("x-seen-traceparent", traceparent)
        .header("x-seen-b3", b3);
    let path = req.uri().path().to_string();
    let resp = match path.as_str() {
        "/echo" => builder.body(req.into_body().map_err(BoxError::from).boxed()),
        // Every request header, one `name: value` line each, in order.
        "/headers" => {
            let lines: String =
                req.headers().iter().map(|(n, v)| format!("{n}: {}\n", v.to_str().unwrap_or("?"))).collect();
            builder.body(full(lines))
        }
        "/sha256" => {
            let (n, sha) = hash_body(req.into_body()).await.unwrap_or((0, "error".into()));
            builder.body(full(format!("{n} {sha}")))
        }
        "/download" => builder.body(pattern_body(query(&req, "bytes").unwrap_or(0))),
        // A gRPC Trailers-Only answer with any `grpc-status` value, valid or not.
        "/grpc-status" => builder
            .header("content-type", "application/grpc")
            .header("grpc-status", query(&req, "code").unwrap_or(0))
            .body(full("")),
        "/delay" => {
            tokio::time::sleep(Duration::from_millis(query(&req, "ms").unwrap_or(0))).await;
            builder.body(full("delayed"))
        }
        "/status" => builder.status(query(&req, "code").unwrap_or(200) as u16).body(full("status")),
        "/flaky" => {
            let fails = match (query(&req, "every"), query(&req, "percent")) {
                (_, Some(percent)) => seeded_failure(query(&req, "seed").unwrap_or(0), n, percent),
                (every, None) => {
                    let every = every.unwrap_or(5).max(1);
                    n % every == every - 1
                }
            };
            match (fails, query(&req, "reset")) {
                // `reset=1`: the failure is a connection closed without an answer.
                (true, Some(1)) => return Err(std::io::Error::other("flaky reset")),
                (true, _) => builder.status(503).body(full("flaky failure")),
                (false, _) => builder.body(full("flaky ok")),
            }
        }
        // An error from the service makes hyper close the connection without a response.
        "/reset" => return Err(std::io::Error::other("reset by the test app")),
        "/stall" => {
            // Headers and a first chunk at once, the rest after `ms`: a body that stalls mid-stream.
            let ms = query(&req, "ms").unwrap_or(0);
            let chunks = futures_util::stream::unfold(0u8, move |step| async move {
                match step {
                    0 => Some((Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"start\n"))), 1)),
                    1 => {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        Some((Ok(Frame::data(Bytes::from_static(b"end\n"))), 2))
                    }
                    _ => None,
                }
            });
            builder.body(BodyExt::boxed(StreamBody::new(chunks)))
        }
        _ => {
            if let Some(ms) = query(&req, "delay_ms") {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            builder.body(full("hello from backend"))
        }
    };
    Ok(resp.unwrap())
}

/// The test app on HTTP/1.1 and h2c (prior knowledge), on a fresh loopback port.
pub async fn http_backend() -> Backend {
    http_backend_on(TcpListener::bind("127.0.0.1:0").await.unwrap())
}

/// The test app on `listener` (to bring a killed backend back on its port).
pub fn http_backend_on(listener: TcpListener) -> Backend {
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let accepted = connections.clone();
    let requests = Arc::new(AtomicUsize::new(0));
    let answered = requests.clone();
    let delay_ms = Arc::new(AtomicU64::new(0));
    let delay = delay_ms.clone();
    let fail_status = Arc::new(AtomicU64::new(0));
    let failing = fail_status.clone();
    let task = tokio::spawn(async move {
        // Connection tasks belong to the server: killing it closes them all.
        let mut open = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            accepted.fetch_add(1, Ordering::SeqCst);
            let (answered, delay, failing) = (answered.clone(), delay.clone(), failing.clone());
            while open.try_join_next().is_some() {}
            open.spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(
                        TokioIo::new(stream),
                        hyper::service::service_fn(move |req| {
                            let n = answered.fetch_add(1, Ordering::SeqCst) as u64;
                            let delay = Duration::from_millis(delay.load(Ordering::SeqCst));
                            let fail = failing.load(Ordering::SeqCst) as u16;
                            async move {
                                tokio::time::sleep(delay).await;
                                if fail != 0 {
                                    let resp = Response::builder().status(fail).header("x-backend", addr.port());
                                    return Ok(resp.body(full("failing")).unwrap());
                                }
                                app(req, n, addr.port()).await
                            }
                        }),
                    )
                    .await;
            });
        }
    });
    Backend { addr, connections, requests, delay_ms, fail_status, task }
}

/// A WebSocket server that echoes every message.
pub async fn websocket_backend() -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else { return };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_close() {
                        break;
                    }
                    if futures_util::SinkExt::send(&mut ws, msg).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Backend::from_parts(addr, task)
}

/// Reads until the client half-closes, then answers `echo N: <what it read>` and closes: proves half-close is relayed.
pub async fn half_close_backend() -> Backend {
    half_close_backend_on(TcpListener::bind("127.0.0.1:0").await.unwrap())
}

pub fn half_close_backend_on(listener: TcpListener) -> Backend {
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                if stream.read_to_end(&mut buf).await.is_ok() {
                    let mut answer = format!("echo {}: ", buf.len()).into_bytes();
                    answer.extend_from_slice(&buf);
                    let _ = stream.write_all(&answer).await;
                    let _ = stream.shutdown().await;
                }
            });
        }
    });
    Backend::from_parts(addr, task)
}

/// A server-speaks-first protocol (like SMTP or MySQL): greets on accept, then echoes lines.
pub async fn greeting_backend(listener: TcpListener) -> Backend {
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                if stream.write_all(b"220 ferry-test ready\r\n").await.is_err() {
                    return;
                }
                let mut buf = [0u8; 1024];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Backend::from_parts(addr, task)
}
