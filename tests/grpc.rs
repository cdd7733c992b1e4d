//! gRPC through a real `ferry` process: a tonic bidirectional stream with trailers and large messages.

use ferry_test_support as support;

use http::uri::PathAndQuery;
use support::grpc::{Chunk, Codec, MAX_MESSAGE, grpc_backend, tokio_stream_from};
use support::{Ferry, service_yaml};
use tonic::{Code, Request};

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
    // Counted when the stream ended, with the gRPC status from its trailers (ABORTED = 10).
    assert_eq!(
        ferry.metric(
            r#"ferry_requests_total{direction="outbound",service="echo-grpc.default",protocol="grpc",status_class="2xx",grpc_status="10"}"#
        ),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstreams_grpc_status_cannot_mint_metric_series() {
    let app = support::backend::http_backend().await;
    let ferry = Ferry::start(Some(&service_yaml("grpc-codes", 80, &[app.addr])), &[]);
    // Codes 0-16 are gRPC's; anything else an upstream sends is `other`, however many values it makes up.
    for code in [5, 16, 17, 999, 65535] {
        let (status, _) = tokio::task::block_in_place(|| {
            support::http_exchange(
                ferry.outbound,
                "POST",
                &format!("/grpc-status?code={code}"),
                &[("Host", "grpc-codes"), ("content-type", "application/grpc")],
                "",
            )
        })
        .expect("an answer");
        assert_eq!(status, 200);
    }
    let series = |grpc_status: &str| {
        ferry.metric(&format!(
            r#"ferry_requests_total{{direction="outbound",service="grpc-codes.default",protocol="grpc",status_class="2xx",grpc_status="{grpc_status}"}}"#
        ))
    };
    assert_eq!((series("5"), series("16"), series("other")), (1.0, 1.0, 3.0));
    assert_eq!(series("999"), 0.0);
}
