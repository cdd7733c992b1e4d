//! The body type of every proxied or proxy-made message: streamed from a peer, or a small in-memory body; a
//! response body may carry the request's deadline, which ends it with an error when it passes mid-stream, and a body
//! may be observed (its size and trailers reported when it ends, for metrics).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The request timeout passed while the response body was still streaming.
#[derive(Debug, thiserror::Error)]
#[error("the request timeout ({0:?}) passed while the response body was streaming")]
pub struct BodyTimeout(pub Duration);

/// Streams are never buffered whole: `Incoming` passes each frame (data or trailers) through as it arrives.
#[derive(Debug)]
pub enum ProxyBody {
    Incoming(Incoming),
    Full(Option<Bytes>),
    /// A body that must be done by a deadline (the request timeout covers the body too).
    Timed(Box<Timed>),
    /// A body whose size (and trailers) are reported once it ends or is dropped.
    Observed(Box<Observed>),
    /// A body whose data is also copied, up to a limit, for mirrored requests.
    Teed(Box<Tee>),
}

/// Copies a body's data as it streams by, up to `limit` bytes: once the body ends, each receiver gets the whole
/// copy; a body over the limit, failed or dropped before its end leaves the receivers without one.
#[derive(Debug)]
pub struct Tee {
    inner: ProxyBody,
    copy: bytes::BytesMut,
    limit: usize,
    to: Vec<tokio::sync::oneshot::Sender<Bytes>>,
}

impl Tee {
    fn see(&mut self, polled: &Poll<Option<Result<Frame<Bytes>, BoxError>>>) {
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if self.copy.len() + data.len() > self.limit {
                        self.to.clear();
                        self.copy = bytes::BytesMut::new();
                    } else if !self.to.is_empty() {
                        self.copy.extend_from_slice(data);
                    }
                }
                if self.inner.is_end_stream() {
                    self.finish();
                }
            }
            Poll::Ready(None) => self.finish(),
            Poll::Ready(Some(Err(_))) => self.to.clear(),
            Poll::Pending => {}
        }
    }

    fn finish(&mut self) {
        let copy = std::mem::take(&mut self.copy).freeze();
        for to in self.to.drain(..) {
            let _ = to.send(copy.clone());
        }
    }
}

/// Called once with the data bytes a body carried and its trailers, if any.
pub type OnEnd = Box<dyn FnOnce(u64, Option<&http::HeaderMap>) + Send>;

pub struct Observed {
    inner: ProxyBody,
    bytes: u64,
    on_end: Option<OnEnd>,
}

impl Observed {
    fn end(&mut self, trailers: Option<&http::HeaderMap>) {
        if let Some(f) = self.on_end.take() {
            f(self.bytes, trailers);
        }
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        self.end(None);
    }
}

impl std::fmt::Debug for Observed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observed").field("inner", &self.inner).field("bytes", &self.bytes).finish()
    }
}

#[derive(Debug)]
pub struct Timed {
    inner: ProxyBody,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
}

impl ProxyBody {
    pub fn empty() -> Self {
        ProxyBody::Full(None)
    }

    pub fn full(data: impl Into<Bytes>) -> Self {
        let data = data.into();
        ProxyBody::Full((!data.is_empty()).then_some(data))
    }

    /// This body, ended with `BodyTimeout` if it is not done by `deadline` (`timeout` says which one, for the error).
    pub fn with_deadline(self, deadline: tokio::time::Instant, timeout: Duration) -> Self {
        if self.is_end_stream() {
            return self;
        }
        ProxyBody::Timed(Box::new(Timed {
            inner: self,
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            timeout,
        }))
    }
}

impl ProxyBody {
    /// This body, with `on_end` called once with its data bytes and trailers when it ends (or is dropped).
    pub fn observed(self, on_end: impl FnOnce(u64, Option<&http::HeaderMap>) + Send + 'static) -> Self {
        ProxyBody::Observed(Box::new(Observed { inner: self, bytes: 0, on_end: Some(Box::new(on_end)) }))
    }
}

impl ProxyBody {
    /// This body, its data also copied (up to `limit` bytes) for `receivers` copies: see [`Tee`].
    pub fn teed(self, limit: usize, receivers: usize) -> (Self, Vec<tokio::sync::oneshot::Receiver<Bytes>>) {
        let (to, from) = (0..receivers).map(|_| tokio::sync::oneshot::channel()).unzip();
        let tee = Tee { inner: self, copy: bytes::BytesMut::new(), limit, to };
        (ProxyBody::Teed(Box::new(tee)), from)
    }
}

impl From<Incoming> for ProxyBody {
    fn from(body: Incoming) -> Self {
        ProxyBody::Incoming(body)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Incoming(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            ProxyBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ProxyBody::Timed(t) => match Pin::new(&mut t.inner).poll_frame(cx) {
                Poll::Pending => match t.deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(BodyTimeout(t.timeout).into()))),
                    Poll::Pending => Poll::Pending,
                },
                ready => ready,
            },
            ProxyBody::Observed(o) => {
                let polled = Pin::new(&mut o.inner).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => match frame.trailers_ref() {
                        Some(trailers) => o.end(Some(trailers)),
                        None => o.bytes += frame.data_ref().map_or(0, |d| d.len() as u64),
                    },
                    Poll::Ready(None | Some(Err(_))) => o.end(None),
                    Poll::Pending => {}
                }
                polled
            }
            ProxyBody::Teed(t) => {
                let polled = Pin::new(&mut t.inner).poll_frame(cx);
                t.see(&polled);
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Incoming(body) => body.is_end_stream(),
            ProxyBody::Full(data) => data.is_none(),
            ProxyBody::Timed(t) => t.inner.is_end_stream(),
            ProxyBody::Observed(o) => o.inner.is_end_stream(),
            ProxyBody::Teed(t) => t.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Incoming(body) => body.size_hint(),
            ProxyBody::Full(Some(d)) => SizeHint::with_exact(d.len() as u64),
            ProxyBody::Full(None) => SizeHint::with_exact(0),
            ProxyBody::Timed(t) => t.inner.size_hint(),
            ProxyBody::Observed(o) => o.inner.size_hint(),
            ProxyBody::Teed(t) => t.inner.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::{Arc, Mutex};

    #[tokio::test]
    async fn an_observed_body_reports_its_size_once() {
        // Read to the end: the data bytes, no trailers.
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let body = ProxyBody::full("hello").observed(move |n, t| s.lock().unwrap().push((n, t.is_some())));
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
        assert_eq!(*seen.lock().unwrap(), [(5, false)]);
        // Dropped before the end (a client that went away): still reported, once.
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let body = ProxyBody::full("abc").observed(move |n, t| s.lock().unwrap().push((n, t.is_some())));
        drop(body);
        assert_eq!(*seen.lock().unwrap(), [(0, false)]);
    }

    #[tokio::test]
    async fn a_teed_body_is_copied_whole_or_not_at_all() {
        // Read to the end within the limit: both receivers get the copy, the reader the body.
        let (body, receivers) = ProxyBody::full("hello").teed(8, 2);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
        for rx in receivers {
            assert_eq!(rx.await.unwrap(), "hello");
        }
        // Over the limit: the reader still gets it all, the copy is gone.
        let (body, mut receivers) = ProxyBody::full("hello").teed(4, 1);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
        assert!(receivers.remove(0).await.is_err());
        // Dropped before its end: no copy.
        let (body, mut receivers) = ProxyBody::full("abc").teed(8, 1);
        drop(body);
        assert!(receivers.remove(0).await.is_err());
    }
}
