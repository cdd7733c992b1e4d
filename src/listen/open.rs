//! The open downstream connections: what `/config_dump` lists, the cap per listener, and which connection is closed
//! to make room at the cap (the oldest that has not sent a request yet, else the oldest with none in flight).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::Notify;

use super::io::Activity;
use super::target::ConnInfo;
use crate::body::{BoxError, ProxyBody};
use crate::direction::Direction;

/// What the server side and the cap need to know about one connection.
#[derive(Debug, Default)]
pub struct ConnState {
    /// Requests started on it.
    pub requests: AtomicUsize,
    /// Requests whose response has ended (its body done or dropped).
    finished: AtomicUsize,
    /// Opaque TCP: never closed to make room (its bytes cannot be told idle from a quiet session).
    opaque: std::sync::atomic::AtomicBool,
    pub first_request: Notify,
    /// Closed to make room for a newer connection.
    pub evicted: Notify,
    /// HTTP/1: a response's end starts the wait for the next request's headers on the stream's `Activity`.
    http1: std::sync::atomic::AtomicBool,
    activity: Arc<Activity>,
}

impl ConnState {
    /// The state of a connection whose stream reports to `activity`.
    pub fn new(activity: Arc<Activity>) -> Self {
        ConnState { activity, ..Default::default() }
    }

    pub fn set_http1(&self) {
        self.http1.store(true, Ordering::Relaxed);
    }

    pub fn request_started(&self) {
        if self.http1.load(Ordering::Relaxed) {
            self.activity.head_done();
        }
        if self.requests.fetch_add(1, Ordering::Relaxed) == 0 {
            // notify_one keeps a permit if nobody waits yet.
            self.first_request.notify_one();
        }
    }

    /// A response has ended (its body done or dropped); on HTTP/1 with nothing else in flight the next bytes begin
    /// the next request, whose headers have their own deadline.
    pub fn request_finished(&self) {
        let finished = self.finished.fetch_add(1, Ordering::Relaxed) + 1;
        if self.http1.load(Ordering::Relaxed) && finished == self.requests.load(Ordering::Relaxed) {
            self.activity.await_head();
        }
    }

    /// Requests started whose responses have not ended.
    pub fn in_flight(&self) -> usize {
        let finished = self.finished.load(Ordering::Relaxed);
        self.requests.load(Ordering::Relaxed).saturating_sub(finished)
    }

    /// How long the pending HTTP/1 request's headers have been coming in, if one is pending.
    pub fn head_pending_for(&self) -> Option<std::time::Duration> {
        self.activity.head_pending_for()
    }

    /// The idle timer's mark: the requests seen, while none is in flight.
    pub fn idle_mark(&self) -> Option<u64> {
        (self.in_flight() == 0).then(|| self.requests.load(Ordering::Relaxed) as u64)
    }

    pub fn set_opaque(&self) {
        self.opaque.store(true, Ordering::Relaxed);
    }

    /// How willing the cap is to close it: 0 not yet requested, 1 nothing in flight, None busy or opaque.
    fn eviction_class(&self) -> Option<u8> {
        if self.opaque.load(Ordering::Relaxed) {
            return None;
        }
        match (self.requests.load(Ordering::Relaxed), self.in_flight()) {
            (0, _) => Some(0),
            (_, 0) => Some(1),
            _ => None,
        }
    }
}

/// A response as a server connection sends it: its end (body done, failed or dropped) tells the connection that the
/// request is no longer in flight. No allocation: the body moves in, with one reference to the connection's state.
pub struct Responding {
    body: ProxyBody,
    conn: Option<Arc<ConnState>>,
}

impl Responding {
    pub fn new(body: ProxyBody, conn: Arc<ConnState>) -> Self {
        Responding { body, conn: Some(conn) }
    }

    fn end(&mut self) {
        if let Some(conn) = self.conn.take() {
            conn.request_finished();
        }
    }
}

impl Drop for Responding {
    fn drop(&mut self) {
        self.end();
    }
}

impl http_body::Body for Responding {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.body).poll_frame(cx);
        if let std::task::Poll::Ready(None | Some(Err(_))) = &polled {
            this.end();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The open connections of both listeners, each listener holding at most `cap`.
pub struct OpenConnections {
    cap: usize,
    next_id: AtomicU64,
    /// Per listener (`Direction as usize`).
    open: Mutex<[Listener; 2]>,
}

/// One listener's connections by ID, which is also their age order.
#[derive(Default)]
struct Listener {
    entries: BTreeMap<u64, Entry>,
    /// The IDs of connections not seen with a request yet (pruned lazily, when a victim is looked for): the first
    /// candidates, found in O(log n).
    unrequested: BTreeSet<u64>,
}

struct Entry {
    shown: OpenConnection,
    state: Arc<ConnState>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OpenConnection {
    #[serde(flatten)]
    pub info: ConnInfo,
    pub protocol: &'static str,
}

/// Why a connection could not be admitted.
#[derive(Debug, thiserror::Error)]
#[error("{0} connections open on this listener, each busy with a request or opaque: at the cap")]
pub struct AtCap(pub usize);

/// Removes its connection from the table when dropped.
pub struct OpenGuard<'a> {
    table: &'a OpenConnections,
    direction: Direction,
    id: u64,
}

impl Listener {
    /// The connection that least deserves its place: the oldest not yet requested, else the oldest with nothing in
    /// flight (a scan from the oldest, only when no connection is waiting for its first request).
    fn victim(&mut self) -> Option<u64> {
        while let Some(id) = self.unrequested.pop_first() {
            if self.entries.get(&id).is_some_and(|e| e.state.eviction_class() == Some(0)) {
                return Some(id);
            }
        }
        self.entries.iter().find(|(_, e)| e.state.eviction_class() == Some(1)).map(|(id, _)| *id)
    }
}

impl OpenConnections {
    pub fn new(cap: usize) -> Self {
        OpenConnections { cap, next_id: AtomicU64::new(0), open: Mutex::default() }
    }

    /// Admits a new connection; at the cap, first closes the connection of the same listener that least deserves its
    /// place (`true`: one was closed, for the metric).
    pub fn admit(&self, info: ConnInfo, state: Arc<ConnState>) -> Result<(OpenGuard<'_>, bool), AtCap> {
        let direction = info.direction;
        let mut open = self.open.lock().expect("connections lock");
        let listener = &mut open[direction as usize];
        let mut evicted = false;
        if listener.entries.len() >= self.cap {
            let Some(id) = listener.victim() else { return Err(AtCap(self.cap)) };
            if let Some(entry) = listener.entries.remove(&id) {
                entry.state.evicted.notify_one();
                evicted = true;
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let shown = OpenConnection { info, protocol: "detecting" };
        listener.entries.insert(id, Entry { shown, state });
        listener.unrequested.insert(id);
        Ok((OpenGuard { table: self, direction, id }, evicted))
    }

    pub fn list(&self) -> Vec<OpenConnection> {
        let open = self.open.lock().expect("connections lock");
        open.iter().flat_map(|l| l.entries.values().map(|e| e.shown.clone())).collect()
    }

    /// Open connections on one listener.
    pub fn count(&self, direction: Direction) -> usize {
        self.open.lock().expect("connections lock")[direction as usize].entries.len()
    }
}

impl OpenGuard<'_> {
    /// What the connection turned out to speak, and who it is after a mesh handshake.
    pub fn update(&self, info: &ConnInfo, protocol: &'static str) {
        let mut open = self.table.open.lock().expect("connections lock");
        if let Some(e) = open[self.direction as usize].entries.get_mut(&self.id) {
            e.shown = OpenConnection { info: info.clone(), protocol };
        }
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().expect("connections lock");
        let listener = &mut open[self.direction as usize];
        listener.entries.remove(&self.id);
        listener.unrequested.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(direction: Direction) -> ConnInfo {
        let addr = "127.0.0.1:1".parse().unwrap();
        ConnInfo {
            direction,
            mode: super::super::target::Mode::Explicit,
            peer: addr,
            local: addr,
            original_dst: None,
            peer_identity: None,
            peer_spiffe: None,
            sni_port: None,
            peer_not_after: None,
            activity: Default::default(),
        }
    }

    #[test]
    fn at_the_cap_the_oldest_unrequested_goes_first_then_the_oldest_idle_and_busy_ones_stay() {
        let table = OpenConnections::new(3);
        let (busy, idle, fresh) = (Arc::new(ConnState::default()), Arc::new(ConnState::default()), Arc::default());
        busy.request_started();
        idle.request_started();
        idle.request_finished();
        let _a = table.admit(conn(Direction::Inbound), busy.clone()).unwrap();
        let _b = table.admit(conn(Direction::Inbound), idle.clone()).unwrap();
        let _c = table.admit(conn(Direction::Inbound), Arc::clone(&fresh)).unwrap();
        // The other listener has its own cap.
        let _out = table.admit(conn(Direction::Outbound), Arc::default()).unwrap();
        assert_eq!(table.count(Direction::Inbound), 3);

        let (_d, evicted) = table.admit(conn(Direction::Inbound), Arc::new(ConnState::default())).unwrap();
        assert!(evicted);
        assert!(futures_ready(&fresh.evicted), "the connection that never sent a request is closed first");
        let unrequested = |e: &&Entry| e.state.requests.load(Ordering::Relaxed) == 0;
        let left = table.open.lock().unwrap()[Direction::Inbound as usize].entries.values().filter(unrequested).count();
        assert_eq!(left, 1, "only the newcomer has no request yet");

        let (_e, evicted) = table
            .admit(conn(Direction::Inbound), {
                let s = Arc::new(ConnState::default());
                s.request_started();
                s
            })
            .unwrap();
        assert!(evicted);
        // Not-yet-requested beats idle: the connection admitted just before (no request yet) went, not `idle`.
        assert!(!futures_ready(&idle.evicted));

        let (_f, _) = table.admit(conn(Direction::Inbound), Arc::default()).unwrap();
        assert!(futures_ready(&idle.evicted), "then the one with nothing in flight");
        assert_eq!(table.count(Direction::Inbound), 3);

        // Busy and opaque connections are never closed to make room: the newcomer is refused.
        let opaque = Arc::new(ConnState::default());
        opaque.set_opaque();
        let full = OpenConnections::new(2);
        let _g = full.admit(conn(Direction::Inbound), busy.clone()).unwrap();
        let _h = full.admit(conn(Direction::Inbound), opaque).unwrap();
        assert!(full.admit(conn(Direction::Inbound), Arc::default()).is_err());
        assert!(!futures_ready(&busy.evicted));
    }

    /// Whether a permit is waiting on `n`.
    fn futures_ready(n: &Notify) -> bool {
        let notified = n.notified();
        tokio::pin!(notified);
        let waker = std::task::Waker::noop();
        let ready = notified.as_mut().poll(&mut std::task::Context::from_waker(waker)).is_ready();
        if ready {
            n.notify_one(); // put the permit back
        }
        ready
    }

    use std::future::Future;
}
