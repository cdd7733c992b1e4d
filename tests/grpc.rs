//! gRPC through a real `ferry` process: a tonic bidirectional stream with trailers and large messages.

mod support;

use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use http::uri::PathAndQuery;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::{Ferry, service_yaml};
use tonic::{Code, Request, Response, Status, Streaming, metadata::MetadataMap};

/// The one message of the test service `test.Echo/Bidi`.
#[derive(Clone, PartialEq, prost::Message)]
struct Chunk {
    #[prost(uint32, tag = "1")]
    seq: u32,
    #[prost(bytes = "vec", tag = "2")]
    data: Vec<u8>,
}

type Codec = tonic_prost::ProstCodec<Chunk, Chunk>;
const MAX_MESSAGE: usize = 8 * 1024 * 1024;

/// Echoes every message as it arrives, then ends with ABORTED carrying an `x-echo-count` trailer.
struct Echo;

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

async fn grpc_backend() -> support::backend::Backend {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    let mut grpc = tonic::server::Grpc::new(Codec::default())
                        .max_decoding_message_size(MAX_MESSAGE)
                        .max_encoding_message_size(MAX_MESSAGE);
                    Ok::<_, std::convert::Infallible>(grpc.streaming(Echo, req).await)
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    support::backend::Backend::from_parts(addr, task)
}

async fn client(ferry: &Ferry, origin: &'static str) -> tonic::client::Grpc<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", ferry.outbound))
        .unwrap()
        .origin(http::Uri::from_static(origin))
        .connect()
        .await
        .unwrap();
    tonic::client::Grpc::new(channel).max_decoding_message_size(MAX_MESSAGE).max_encoding_message_size(MAX_MESSAGE)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidirectional_stream_with_trailers_and_large_messages() {
    let app = grpc_backend().await;
    let ferry = Ferry::start(Some(&service_yaml("echo-grpc", 50051, &[app.addr])), &[]);
    let mut grpc = client(&ferry, "http://echo-grpc:50051").await;
    grpc.ready().await.unwrap();

    // The client sends as the server answers: a channel drives the request stream.
    let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(4);
    let request = Request::new(tokio_stream_from(rx));
    let response =
        grpc.streaming(request, PathAndQuery::from_static("/test.Echo/Bidi"), Codec::default()).await.unwrap();
    let mut replies = response.into_inner();
    for seq in 0..20u32 {
        // Interleaved: each reply arrives before the next message is sent (true bidirectional streaming).
        let size = if seq == 10 { 4 * 1024 * 1024 } else { 100 + seq as usize };
        let data: Vec<u8> = (0..size).map(|i| (i as u32 ^ seq) as u8).collect();
        tx.send(Chunk { seq, data: data.clone() }).await.unwrap();
        let reply = replies.message().await.unwrap().expect("reply");
        assert_eq!((reply.seq, reply.data.len()), (seq, size));
        assert_eq!(reply.data, data);
    }
    drop(tx);
    let end = replies.message().await.expect_err("the stream ends with the server's status");
    assert_eq!(end.code(), Code::Aborted);
    assert_eq!(end.message(), "echo finished");
    assert_eq!(end.metadata().get("x-echo-count").unwrap(), "20", "custom trailer relayed");
    assert_eq!(
        ferry.metric(r#"ferry_requests_total{direction="outbound",service="echo-grpc.default",status_class="2xx"}"#),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_errors_reach_grpc_callers_as_status() {
    let ferry = Ferry::start(None, &[]);
    let mut grpc = client(&ferry, "http://nowhere:50051").await;
    grpc.ready().await.unwrap();
    let request = Request::new(futures_util::stream::iter(vec![Chunk { seq: 1, data: vec![] }]));
    let status =
        grpc.streaming(request, PathAndQuery::from_static("/test.Echo/Bidi"), Codec::default()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(status.metadata().get("ferry-proxy-error").unwrap(), "no-route");
}

/// An mpsc receiver as a Stream (no tokio-stream dependency for one adapter).
fn tokio_stream_from(rx: tokio::sync::mpsc::Receiver<Chunk>) -> impl Stream<Item = Chunk> + Send + 'static {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
}
