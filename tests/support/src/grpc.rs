//! A tonic test service, `test.Echo`: `Bidi` echoes each message of a bidirectional stream, then ends with a trailer;
//! the unary `Say` and `Shout` answer with the server's name and the method (what a route chose).

use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tonic::{Code, Request, Response, Status, Streaming, metadata::MetadataMap};

use super::backend::Backend;

/// The one message of the test service `test.Echo/Bidi`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Chunk {
    #[prost(uint32, tag = "1")]
    pub seq: u32,
    #[prost(bytes = "vec", tag = "2")]
    pub data: Vec<u8>,
}

pub type Codec = tonic_prost::ProstCodec<Chunk, Chunk>;
pub const MAX_MESSAGE: usize = 8 * 1024 * 1024;

/// Echoes every message as it arrives, then ends with ABORTED carrying an `x-echo-count` trailer.
pub struct Echo;

impl tonic::server::StreamingService<Chunk> for Echo {
    type Response = Chunk;
    type ResponseStream = Pin<Box<dyn Stream<Item = Result<Chunk, Status>> + Send>>;
    type Future = std::future::Ready<Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<Streaming<Chunk>>) -> Self::Future {
        let inbound = request.into_inner();
        let stream = futures_util::stream::unfold((inbound, 0u32, false), |(mut inbound, count, done)| async move {
            if done {
                return None;
            }
            match inbound.next().await {
                Some(Ok(chunk)) => Some((Ok(chunk), (inbound, count + 1, false))),
                Some(Err(status)) => Some((Err(status), (inbound, count, true))),
                None => {
                    let mut md = MetadataMap::new();
                    md.insert("x-echo-count", count.to_string().parse().unwrap());
                    Some((Err(Status::with_metadata(Code::Aborted, "echo finished", md)), (inbound, count, true)))
                }
            }
        });
        std::future::ready(Ok(Response::new(Box::pin(stream) as Self::ResponseStream)))
    }
}

/// `Say` and `Shout`: one message back, its data `<server name>/<method>`.
struct Named {
    server: &'static str,
    method: &'static str,
}

impl tonic::server::UnaryService<Chunk> for Named {
    type Response = Chunk;
    type Future = std::future::Ready<Result<Response<Chunk>, Status>>;

    fn call(&mut self, request: Request<Chunk>) -> Self::Future {
        let data = format!("{}/{}", self.server, self.method).into_bytes();
        std::future::ready(Ok(Response::new(Chunk { seq: request.into_inner().seq, data })))
    }
}

pub async fn grpc_backend() -> Backend {
    grpc_backend_named("echo").await
}

/// The echo service, its unary answers naming `server`.
pub async fn grpc_backend_named(server: &'static str) -> Backend {
    grpc_backend_on_named(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(), server)
}

/// The echo service on `listener` (HTTP/2 only, as gRPC servers are).
pub fn grpc_backend_on(listener: tokio::net::TcpListener) -> Backend {
    grpc_backend_on_named(listener, "echo")
}

fn grpc_backend_on_named(listener: tokio::net::TcpListener, server: &'static str) -> Backend {
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| async move {
                    let mut grpc = tonic::server::Grpc::new(Codec::default())
                        .max_decoding_message_size(MAX_MESSAGE)
                        .max_encoding_message_size(MAX_MESSAGE);
                    let response = match req.uri().path() {
                        "/test.Echo/Say" => grpc.unary(Named { server, method: "Say" }, req).await,
                        "/test.Echo/Shout" => grpc.unary(Named { server, method: "Shout" }, req).await,
                        "/test.Echo/Bidi" => grpc.streaming(Echo, req).await,
                        _ => Status::unimplemented("no such method").into_http(),
                    };
                    Ok::<_, std::convert::Infallible>(response)
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Backend::from_parts(addr, task)
}

/// An mpsc receiver as a Stream (no tokio-stream dependency for one adapter).
pub fn tokio_stream_from(rx: tokio::sync::mpsc::Receiver<Chunk>) -> impl Stream<Item = Chunk> + Send + 'static {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
}

/// One unary call of `test.Echo/<method>` with `metadata`: the answering server's `<name>/<method>`, or the status.
pub async fn unary(
    grpc: &mut tonic::client::Grpc<tonic::transport::Channel>,
    method: &str,
    metadata: &[(&'static str, &'static str)],
) -> Result<String, tonic::Status> {
    grpc.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path: http::uri::PathAndQuery = format!("/test.Echo/{method}").parse().unwrap();
    let mut request = Request::new(Chunk { seq: 1, data: Vec::new() });
    for (k, v) in metadata {
        request.metadata_mut().insert(*k, v.parse().unwrap());
    }
    let reply = grpc.unary(request, path, Codec::default()).await?;
    Ok(String::from_utf8_lossy(&reply.into_inner().data).into_owned())
}

/// Runs one `test.Echo/Bidi` call of `messages` small messages; returns how many came back and the final status.
pub async fn bidi_roundtrip(
    mut grpc: tonic::client::Grpc<tonic::transport::Channel>,
    messages: u32,
) -> (u32, tonic::Status) {
    grpc.ready().await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(4);
    let path = http::uri::PathAndQuery::from_static("/test.Echo/Bidi");
    let response = grpc.streaming(Request::new(tokio_stream_from(rx)), path, Codec::default()).await.unwrap();
    let mut replies = response.into_inner();
    let mut echoed = 0;
    for seq in 0..messages {
        tx.send(Chunk { seq, data: vec![seq as u8; 64] }).await.unwrap();
        let reply = replies.message().await.unwrap().expect("reply");
        assert_eq!(reply.seq, seq);
        echoed += 1;
    }
    drop(tx);
    let end = replies.message().await.expect_err("ends with the server's status");
    (echoed, end)
}
