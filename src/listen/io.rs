//! An accepted connection's stream: replays the bytes read during detection, and counts bytes each way.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

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
}

impl ConnIo {
    pub fn new(stream: TcpStream) -> Self {
        ConnIo { prefix: BytesMut::new(), stream, read: 0, written: 0, on_close: None }
    }

    /// Makes the next reads return `bytes` (already read, and counted, during detection) before the socket's.
    pub fn replay(&mut self, bytes: BytesMut) {
        debug_assert!(self.prefix.is_empty());
        self.prefix = bytes;
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
        this.read += (buf.filled().len() - before) as u64;
        res
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.stream).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = res {
            self.written += n as u64;
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
