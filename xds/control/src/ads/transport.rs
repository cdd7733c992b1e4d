//! The ADS endpoint as a plain tower service: each response framed into an exactly-sized buffer (from resource
//! encodings shared by every proxy), freed once written. (tonic's generated server keeps a per-stream encode buffer as large as the largest message it ever sent,
//! which for a proxy's initial sync doubled the control plane's memory per connected proxy.)

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::identity::serving::PeerInfo;
use bytes::Bytes;
use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use http::{HeaderMap, HeaderValue, Request, Response, header};
use http_body::Frame;
use prost::Message;
use tokio::sync::mpsc;
use tonic::Status;
use tonic::codec::{BufferSettings, DecodeBuf, Decoder, Streaming};

use super::Xds;
use super::session::Push;

const SERVICE: &str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
const DELTA_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
/// Requests (subscriptions, ACKs) are small; larger ones are refused.
const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// `DeltaAggregatedResources`, served by [`Xds`]; every other method of the service answers UNIMPLEMENTED.
#[derive(Clone)]
pub struct AdsService(pub Arc<Xds>);

impl tonic::server::NamedService for AdsService {
    const NAME: &'static str = SERVICE;
}

/// Decodes requests with a small initial buffer (it grows only for an unusually large request).
struct RequestDecoder;

impl Decoder for RequestDecoder {
    type Item = DeltaDiscoveryRequest;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        DeltaDiscoveryRequest::decode(src).map(Some).map_err(|e| Status::internal(format!("bad request message: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(512, 32 * 1024)
    }
}

/// Client certificate chain (verified by the TLS handshake against the trust bundle) and address.
pub struct Incoming {
    pub peer_certs: Option<Arc<Vec<rustls_pki_types::CertificateDer<'static>>>>,
    pub peer: Option<std::net::SocketAddr>,
    pub requests: Streaming<DeltaDiscoveryRequest>,
}

impl tower_service::Service<Request<tonic::body::Body>> for AdsService {
    type Response = Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<tonic::body::Body>) -> Self::Future {
        let xds = self.0.clone();
        Box::pin(async move {
            if req.uri().path() != DELTA_PATH {
                return Ok(trailers_only(Status::unimplemented(
                    "Ferry serves delta xDS only: use DeltaAggregatedResources",
                )));
            }
            let info = req.extensions().get::<PeerInfo>();
            let peer = info.and_then(|i| i.remote);
            let peer_certs = info.and_then(|i| i.certs.clone());
            let requests = Streaming::new_request(RequestDecoder, req.into_body(), None, Some(MAX_REQUEST_BYTES));
            match xds.open_stream(Incoming { peer_certs, peer, requests }) {
                Ok(responses) => Ok(grpc_response(tonic::body::Body::new(ResponseBody { rx: responses, done: false }))),
                Err(status) => Ok(trailers_only(status)),
            }
        })
    }
}

fn grpc_response(body: tonic::body::Body) -> Response<tonic::body::Body> {
    let mut resp = Response::new(body);
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    resp
}

/// A response that is only a status (in the headers, as gRPC's Trailers-Only form).
fn trailers_only(status: Status) -> Response<tonic::body::Body> {
    let mut resp = grpc_response(tonic::body::Body::empty());
    let _ = status.add_header(resp.headers_mut());
    resp
}

/// Each response message as one length-prefixed gRPC frame; the stream's end (or an error) as trailers.
struct ResponseBody {
    rx: mpsc::Receiver<Result<Box<Push>, Status>>,
    done: bool,
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let status = match self.rx.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(Ok(push))) => return Poll::Ready(Some(Ok(Frame::data(push.framed())))),
            Poll::Ready(Some(Err(status))) => status,
            Poll::Ready(None) => Status::ok(""),
        };
        self.done = true;
        let mut trailers = HeaderMap::new();
        let _ = status.add_header(&mut trailers);
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}
