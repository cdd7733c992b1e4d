//! One proxy's stream, from opening to end: authenticated by its workload certificate, bound to its Workload (in
//! Kubernetes mode the pod its certificate names, in local mode the Services it declares), served the pushes its
//! session says are due as the model changes, and closed when it stops reading, its certificate expires, its token
//! is revoked or its pod goes away.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use tokio::sync::{mpsc, watch};
use tonic::{Status, Streaming};

use super::Xds;
use super::model::{Bound, local_workload_name};
use super::registry::NodeClaim;
use super::session::{Push, Session};
use super::status::ProxyStatus;
use super::transport::Incoming;
use crate::identity::certify::{Authenticated, by_certificate};
use ferry_api::identity::{Identity, unix_now};
use ferry_api::protocol::short_type;
use ferry_api::workload::pod_workload_name;

/// Why a stream was closed for a newer one.
const SUPERSEDED: &str = "closed: newer streams opened with the same client certificate";
/// A new stream must send its first request within this long.
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A proxy that has not taken a push for this long (its connection is up but it does not read) is disconnected.
const SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a pod-bound stream may wait for its pod to appear in the model.
const POD_UNKNOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// Open ADS streams per client certificate: a proxy needs one; a reconnect may overlap the stream it replaces. A new
/// stream beyond this closes the oldest (a reconnect is never refused). Per certificate, not per identity: the
/// replicas of a Deployment share an identity, each with its own certificate.
pub(super) const STREAMS_PER_CERTIFICATE: usize = 4;

/// One certificate's open streams, oldest first: (ticket, the stream's `superseded`).
pub(super) type CertificateStreams = std::collections::VecDeque<(u64, Arc<tokio::sync::Notify>)>;

/// A stream's place among its certificate's streams; `superseded` fires when a newer stream takes it.
pub(super) struct StreamSlot {
    xds: Arc<Xds>,
    digest: [u8; 32],
    ticket: u64,
    pub superseded: Arc<tokio::sync::Notify>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut by = self.xds.by_certificate.lock().expect("certificates lock");
        if let Some(open) = by.get_mut(&self.digest) {
            open.retain(|(t, _)| *t != self.ticket);
            if open.is_empty() {
                by.remove(&self.digest);
            }
        }
    }
}

/// A connected proxy's stream; dropping it disconnects the proxy (see `Xds::disconnect`).
struct Connected {
    xds: Arc<Xds>,
    id: u64,
    revoked: bool,
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.xds.disconnect(self.id, self.revoked);
    }
}

/// How a stream's push loop ended early.
enum Ended {
    Closed,
    Stuck,
    Revoked,
}

/// What authenticated a stream: the identity and certificate, and a view of token revocations since the check.
struct Credential {
    authenticated: Authenticated,
    revocations: watch::Receiver<u64>,
    slot: StreamSlot,
}

impl Xds {
    fn refuse(&self, reason: &str, peer: Option<SocketAddr>, message: &str) {
        tracing::warn!(peer = ?peer, reason, "xDS connection refused: {message}");
        self.metrics.xds_refused.with_label_values(&[reason]).inc();
    }

    /// Authenticates a new stream and starts serving it; the receiver yields its responses.
    pub fn open_stream(
        self: &Arc<Self>,
        incoming: Incoming,
    ) -> Result<mpsc::Receiver<Result<Box<Push>, Status>>, Status> {
        // Subscribed before the check, so a revocation after it is never missed.
        let revocations = self.revocations.subscribe();
        let chain = incoming.peer_certs.as_deref().map(Vec::as_slice).unwrap_or_default();
        let authenticated = by_certificate(&self.tokens, chain).map_err(|r| {
            let message = match r.reason {
                "missing" => "no client certificate: get a workload certificate from the CSR service first".to_string(),
                _ => r.message,
            };
            self.refuse(r.reason, incoming.peer, &message);
            Status::unauthenticated(message)
        })?;
        let slot = self.take_slot(&chain[0]);
        // (Boxed: the channel's block holds 32 slots whatever its capacity, 3 KiB a stream with the push inline.)
        let (tx, rx) = mpsc::channel(1);
        let credential = Credential { authenticated, revocations, slot };
        tokio::spawn(self.clone().serve_stream(credential, incoming.peer, incoming.requests, tx));
        Ok(rx)
    }

    /// Registers a new stream of the certificate `leaf`; the oldest of its streams beyond `STREAMS_PER_CERTIFICATE`
    /// is told to close.
    fn take_slot(self: &Arc<Self>, leaf: &rustls_pki_types::CertificateDer<'_>) -> StreamSlot {
        use sha2::Digest;
        let digest: [u8; 32] = sha2::Sha256::digest(leaf.as_ref()).into();
        let ticket = self.next_id.fetch_add(1, Ordering::Relaxed);
        let superseded = Arc::new(tokio::sync::Notify::new());
        let mut by = self.by_certificate.lock().expect("certificates lock");
        let open = by.entry(digest).or_default();
        open.push_back((ticket, superseded.clone()));
        while open.len() > STREAMS_PER_CERTIFICATE {
            if let Some((_, oldest)) = open.pop_front() {
                oldest.notify_one();
                self.metrics.xds_refused.with_label_values(&["superseded"]).inc();
            }
        }
        StreamSlot { xds: self.clone(), digest, ticket, superseded }
    }

    /// One proxy's stream, from its first request to its end.
    async fn serve_stream(
        self: Arc<Self>,
        credential: Credential,
        peer: Option<SocketAddr>,
        mut inbound: Streaming<DeltaDiscoveryRequest>,
        tx: mpsc::Sender<Result<Box<Push>, Status>>,
    ) {
        let Credential { authenticated, mut revocations, slot } = credential;
        let identity = authenticated.identity.clone();
        let token_id = authenticated.token_id.clone();
        let superseded = || Status::aborted(SUPERSEDED);
        let first = tokio::select! {
            first = tokio::time::timeout(FIRST_REQUEST_TIMEOUT, inbound.message()) => first,
            () = slot.superseded.notified() => {
                let _ = tx.try_send(Err(superseded()));
                return;
            }
        };
        let first = match first {
            Ok(Ok(Some(m))) => m,
            Ok(Err(status)) => {
                let _ = tx.try_send(Err(status));
                return;
            }
            Ok(Ok(None)) => return,
            Err(_) => {
                let _ = tx.try_send(Err(Status::deadline_exceeded("no request within 30 s of opening the stream")));
                return;
            }
        };
        if let Some(token_id) = &token_id
            && self.tokens.lock().expect("tokens lock").is_revoked(token_id)
        {
            let message = format!("token {token_id} was revoked");
            self.refuse("revoked", peer, &message);
            let _ = tx.try_send(Err(Status::unauthenticated(message)));
            return;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let node = first.node.clone().unwrap_or_default();
        let claim = NodeClaim::of(&node);
        let kubernetes = self.source.lock().expect("source lock").is_some();
        let pod = authenticated.pod.clone();
        // Which Workload the stream is bound to: the pod its certificate was issued for (Kubernetes mode: never a
        // claim of the proxy's), or the Services it declared (local mode, each checked against its identities).
        let (service, workload) = match (&pod, kubernetes) {
            (Some(pod), _) => {
                if let Some(claim) = &claim {
                    tracing::info!(node = %node.id, declared = ?claim.services, "ignoring the Services a pod's proxy declares: the pod's Services are those that select it");
                }
                (None, pod_workload_name(&identity.namespace, &pod.name))
            }
            (None, true) => {
                let message = "the certificate names no pod: request one with the pod's ServiceAccount token";
                self.refuse("no-pod", peer, &format!("{} ({}): {message}", node.id, identity.spiffe()));
                let _ = tx.send(Err(Status::unauthenticated(message))).await;
                return;
            }
            (None, false) => {
                let registered = match (&claim, peer) {
                    (None, _) => Ok(Vec::new()),
                    (Some(claim), Some(peer)) => self.register(id, &identity, peer, claim),
                    (Some(_), None) => Err("the connection has no peer address".to_string()),
                };
                match registered {
                    Ok(services) => {
                        let name = local_workload_name(&services);
                        ((!services.is_empty()).then(|| services.join(",")), name)
                    }
                    Err(message) => {
                        self.refuse("service", peer, &format!("{} ({}): {message}", node.id, identity.spiffe()));
                        let _ = tx.send(Err(Status::permission_denied(message))).await;
                        return;
                    }
                }
            }
        };
        let workload: Arc<str> = workload.into();
        let status = Arc::new(ProxyStatus {
            node: node.id.clone(),
            identity: identity.clone(),
            certificate_expiry: authenticated.not_after,
            address: peer,
            service: service.clone(),
            workload: workload.clone(),
            connected_since: unix_now(),
            types: Mutex::new(BTreeMap::new()),
        });
        self.proxies.lock().expect("proxies lock").insert(id, status.clone());
        self.metrics.xds_connected.inc();
        if !kubernetes {
            // Local mode: a new set of declared Services needs its workload in the model.
            self.changed();
        }
        // From here on, however the task ends (even by a panic), the proxy is unlisted and its endpoint released.
        let mut connected = Connected { xds: self.clone(), id, revoked: false };
        tracing::info!(node = %node.id, identity = %identity.spiffe(), peer = ?peer, service = ?service, "proxy connected");

        // A stream lives no longer than the certificate that opened it (the proxy reconnects with its renewed one).
        let left = authenticated.not_after.map(|t| t.saturating_sub(unix_now()).max(0) as u64);
        let expiry = tokio::time::sleep(left.map_or(Duration::MAX / 4, Duration::from_secs));
        tokio::pin!(expiry);
        let mut model_rx = self.published.subscribe();
        let mut session = Session { id, workload, served: BTreeSet::new(), types: HashMap::new(), nonces: 0 };
        let mut next = Some(first);
        // A pod-bound stream waits this long for its pod to appear in the model (a watch event behind the TokenReview's
        // own lookup); a pod that never appears, or that leaves, ends the stream.
        let mut pod_seen = false;
        let mut unbound_reason: Option<String> = None;
        let unknown_pod = tokio::time::sleep(POD_UNKNOWN_TIMEOUT);
        tokio::pin!(unknown_pod);
        loop {
            if let Some(request) = next.take()
                && let Err(refused) = session.on_request(request, &status, &self.metrics, &node.id)
            {
                tracing::warn!(node = %node.id, error = %refused.message(), "closing an xDS stream");
                let _ = tx.try_send(Err(refused));
                break;
            }
            let model = model_rx.borrow_and_update().clone();
            if let Some(pod) = &pod {
                match model.bound.get(&session.workload).map(|b| check_pod(b, pod, peer)) {
                    Some(Ok(())) => pod_seen = true,
                    // Seen before: the pod was replaced or moved. Never seen: the model may lag the pod watcher (a
                    // pod recreated under the same name); the stream waits, bounded, as for an unknown pod.
                    Some(Err(message)) if pod_seen => {
                        self.close_stream("no-pod", &node.id, &identity, peer, &message, &tx);
                        break;
                    }
                    Some(Err(message)) => unbound_reason = Some(message),
                    None if pod_seen => {
                        let message = format!("pod {}/{} was deleted", identity.namespace, pod.name);
                        self.close_stream("no-pod", &node.id, &identity, peer, &message, &tx);
                        break;
                    }
                    None => {}
                }
            }
            let mut end = None;
            for response in session.due(&model, &status) {
                self.metrics.xds_pushes.with_label_values(&[short_type(response.type_url)]).inc();
                // A proxy that stops reading must not pin this task: wait for room, but not past a revocation or
                // SEND_TIMEOUT.
                let permit = tokio::select! {
                    permit = tokio::time::timeout(SEND_TIMEOUT, tx.reserve()) => permit,
                    _ = self.revoked(token_id.as_deref(), &mut revocations) => {
                        end = Some(Ended::Revoked);
                        break;
                    }
                };
                match permit {
                    Ok(Ok(permit)) => permit.send(Ok(Box::new(response))),
                    Ok(Err(_)) => end = Some(Ended::Closed),
                    Err(_) => end = Some(Ended::Stuck),
                }
                if end.is_some() {
                    break;
                }
            }
            match end {
                None => {}
                Some(Ended::Closed) => break,
                Some(Ended::Stuck) => {
                    tracing::warn!(node = %node.id, "proxy has not read a push for {SEND_TIMEOUT:?}; closing its stream");
                    break;
                }
                Some(Ended::Revoked) => {
                    self.close_revoked(token_id.as_deref().unwrap_or_default(), peer, &node.id, &identity, &tx);
                    connected.revoked = true;
                    break;
                }
            }
            tokio::select! {
                m = inbound.message() => match m {
                    Ok(Some(request)) => next = Some(request),
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(node = %node.id, error = %status, "xDS stream error");
                        let _ = tx.try_send(Err(status));
                        break;
                    }
                },
                r = model_rx.changed() => if r.is_err() { break },
                _ = &mut unknown_pod, if pod.is_some() && !pod_seen => {
                    let message = unbound_reason.take().unwrap_or_else(|| format!(
                        "pod {}/{} is not a meshed pod the control plane knows",
                        identity.namespace,
                        pod.as_ref().map_or("", |p| p.name.as_str())
                    ));
                    self.close_stream("no-pod", &node.id, &identity, peer, &message, &tx);
                    break;
                }
                () = slot.superseded.notified() => {
                    tracing::info!(node = %node.id, identity = %identity.spiffe(), "{SUPERSEDED}");
                    let _ = tx.try_send(Err(superseded()));
                    break;
                }
                _ = &mut expiry => {
                    let message = "the certificate this stream was opened with expired; reconnect with the renewed one";
                    tracing::info!(node = %node.id, identity = %identity.spiffe(), "{message}");
                    let _ = tx.try_send(Err(Status::unauthenticated(message)));
                    break;
                }
                _ = self.revoked(token_id.as_deref(), &mut revocations) => {
                    self.close_revoked(token_id.as_deref().unwrap_or_default(), peer, &node.id, &identity, &tx);
                    connected.revoked = true;
                    break;
                }
            }
        }
        tracing::info!(node = %node.id, identity = %identity.spiffe(), "proxy disconnected");
    }

    /// Resolves when `token_id` is revoked (checked at each revocation anywhere); never without a token.
    async fn revoked(&self, token_id: Option<&str>, revocations: &mut watch::Receiver<u64>) {
        let Some(token_id) = token_id else { return std::future::pending().await };
        loop {
            if revocations.changed().await.is_err() {
                return std::future::pending().await;
            }
            if self.tokens.lock().expect("tokens lock").is_revoked(token_id) {
                return;
            }
        }
    }

    /// Ends a stream whose credential no longer holds (`reason`, the refusal metric's label): logged, counted, and
    /// answered UNAUTHENTICATED with `message`.
    fn close_stream(
        &self,
        reason: &'static str,
        node: &str,
        identity: &Identity,
        peer: Option<SocketAddr>,
        message: &str,
        tx: &mpsc::Sender<Result<Box<Push>, Status>>,
    ) {
        self.refuse(reason, peer, &format!("{node} ({}): {message}; closing its stream", identity.spiffe()));
        let _ = tx.try_send(Err(Status::unauthenticated(message.to_string())));
    }

    fn close_revoked(
        &self,
        token_id: &str,
        peer: Option<SocketAddr>,
        node: &str,
        identity: &Identity,
        tx: &mpsc::Sender<Result<Box<Push>, Status>>,
    ) {
        self.close_stream("revoked", node, identity, peer, &format!("token {token_id} was revoked"), tx);
    }
}

/// Pure: whether the pod a stream's certificate names is the one the model holds (same uid) and, when both are
/// known, the stream comes from one of its IPs.
pub(super) fn check_pod(
    bound: &Bound,
    pod: &ferry_api::identity::PodRef,
    peer: Option<SocketAddr>,
) -> Result<(), String> {
    let Some(binding) = &bound.pod else { return Err("the Workload is not a pod's".into()) };
    if binding.uid != pod.uid {
        return Err(format!("pod {} was replaced (uid {} is not {})", pod.name, binding.uid, pod.uid));
    }
    match peer {
        Some(peer) if !binding.ips.is_empty() && !binding.ips.contains(&peer.ip().to_canonical()) => {
            Err(format!("the stream comes from {}, and pod {} has the IPs {:?}", peer.ip(), pod.name, binding.ips))
        }
        _ => Ok(()),
    }
}
