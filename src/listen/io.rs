//! An accepted connection's stream: replays the bytes read during detection, counts bytes each way, tells when the
//! connection has been idle for a while, and when a client starts sending after a response (the next header deadline).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A TCP stream with a replay prefix and byte counters (read = from the peer, written = to the peer).
pub struct ConnIo {
    prefix: BytesMut,
    stream: TcpStream,
    pub read: u64,
    pub written: u64,
    on_close: Option<Box<dyn FnOnce(u64, u64) + Send>>,
    activity: Option<Arc<Activity>>,
}

/// What the connection's timers watch on its stream.
#[derive(Debug, Default)]
pub struct Activity {
    /// Bytes moved either way so far (opaque TCP's idle timeout).
    moved: AtomicU64,
    /// Set when an HTTP/1 response has ended: the next bytes read begin the next request.
    awaiting_head: AtomicBool,
    /// When they came (milliseconds since `EPOCH`, 0: no request head pending): its header deadline runs from
    /// there. Read by the connection's periodic check, so the request path pays no timer and no wake-up.
    head_since: AtomicU64,
}

/// The origin of `Activity::head_since`.
static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

fn now_ms() -> u64 {
    // +1: 0 means "none".
    EPOCH.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64 + 1
}

impl Activity {
    pub fn moved(&self) -> u64 {
        self.moved.load(Ordering::Relaxed)
    }

    /// The connection has nothing in flight: the next bytes the client sends begin a request.
    pub fn await_head(&self) {
        self.awaiting_head.store(true, Ordering::Relaxed);
    }

    /// A request has begun: its headers are complete.
    pub fn head_done(&self) {
        self.awaiting_head.store(false, Ordering::Relaxed);
        self.head_since.store(0, Ordering::Relaxed);
    }

    /// How long the pending request's headers have been coming in, if one is pending.
    pub fn head_pending_for(&self) -> Option<Duration> {
        match self.head_since.load(Ordering::Relaxed) {
            0 => None,
            since => Some(Duration::from_millis(now_ms().saturating_sub(since))),
        }
    }

    /// The client sent bytes: after a response, they start the next request's header deadline.
    fn client_sent(&self) {
        if self.awaiting_head.load(Ordering::Relaxed) && self.awaiting_head.swap(false, Ordering::Relaxed) {
            self.head_since.store(now_ms(), Ordering::Relaxed);
        }
    }

    /// Completes once no bytes have moved either way for `timeout` (opaque TCP's idle timeout); checked every quarter
    /// of it.
    pub async fn quiet_for(&self, timeout: Duration) {
        let step = (timeout / 4).max(Duration::from_millis(50));
        let (mut last, mut since) = (self.moved(), tokio::time::Instant::now());
        loop {
            tokio::time::sleep(step).await;
            let now = self.moved();
            if now != last {
                (last, since) = (now, tokio::time::Instant::now());
            } else if since.elapsed() >= timeout {
                return;
            }
        }
    }
}

impl ConnIo {
    pub fn new(stream: TcpStream) -> Self {
        ConnIo { prefix: BytesMut::new(), stream, read: 0, written: 0, on_close: None, activity: None }
    }

    /// Makes the next reads return `bytes` (already read, and counted, during detection) before the socket's.
    pub fn replay(&mut self, bytes: BytesMut) {
        debug_assert!(self.prefix.is_empty());
        self.prefix = bytes;
    }

    /// Keeps `activity` up to date with this stream.
    pub fn tracking(mut self, activity: Arc<Activity>) -> Self {
        self.activity = Some(activity);
        self
    }

    fn moved(&self) {
        if let Some(a) = &self.activity {
            a.moved.store(self.read + self.written, Ordering::Relaxed);
        }
    }

    /// `f(read, written)` runs once, when the stream is dropped (wherever it ended up, even inside an upgrade).
    pub fn on_close(mut self, f: impl FnOnce(u64, u64) + Send + 'static) -> Self {
        self.on_close = Some(Box::new(f));
        self
    }
}

impl Drop for ConnIo {
    fn drop(&mut self) {
        if let Some(f) = self.on_close.take() {
            f(self.read, self.written);
        }
    }
}

impl AsyncRead for ConnIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let res = Pin::new(&mut this.stream).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            this.read += n;
            this.moved();
            if let Some(a) = &this.activity {
                a.client_sent();
            }
        }
        res
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.stream).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = res {
            self.written += n as u64;
            self.moved();
        }
        res
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = res {
            self.written += n as u64;
            self.moved();
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
