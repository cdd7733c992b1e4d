//! The test pods' app and client (the `pods` suite mounts this binary into its containers):
//! `pod_app serve <port>...` answers every HTTP/1.1 or HTTP/2 request with who called (`ferry-client-id`) and from
//! where, a gRPC call to `test.Echo/Unary` with its echo, a WebSocket with an echo of each message (a port written
//! `lo:<port>` is bound to 127.0.0.1 only; `tcp:<port>` echoes raw bytes, no HTTP); on SIGTERM it stops accepting,
//! finishes what is in flight and exits, as a well-behaved app does;
//! `pod_app get <url>` prints the status line, the `ferry-proxy-error` header and the body of one GET;
//! `pod_app grpc <url> <text>`, `pod_app ws <url> <text>`, `pod_app tcp <host:port> <text>` print the echo, or how
//! the call was refused; every client call gives up after 10 s;
//! `pod_app load <url> <count> <pause-ms>` makes that many GETs in sequence (fewer if SIGTERM comes first) and prints
//! how many failed, and how.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => {
            let (stop, stopped) = tokio::sync::watch::channel(false);
            let mut servers = Vec::new();
            for port in &args[1..] {
                // `lo:<port>`: a listener the app keeps to itself, on loopback only.
                let (host, port) = match port.strip_prefix("lo:") {
                    Some(port) => ("127.0.0.1", port),
                    None => ("0.0.0.0", port.as_str()),
                };
                if let Some(port) = port.strip_prefix("tcp:") {
                    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port.parse::<u16>()?)).await?;
                    servers.push(tokio::spawn(echo_tcp(listener, stopped.clone())));
                    continue;
                }
                let listener = tokio::net::TcpListener::bind((host, port.parse::<u16>()?)).await?;
                servers.push(tokio::spawn(serve(listener, stopped.clone())));
            }
            terminated().await?;
            let _ = stop.send(true);
            // Every connection closes once its in-flight request is answered; 10 s at most.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), async {
                for server in servers {
                    let _ = server.await;
                }
            })
            .await;
            Ok(())
        }
        Some("get") if args.len() == 2 => get(&args[1]).await,
        Some("grpc") if args.len() == 3 => within(async {
            let endpoint = tonic::transport::Endpoint::from_shared(args[1].clone())?;
            let mut grpc = tonic::client::Grpc::new(endpoint.connect().await?);
            grpc.ready().await?;
            let path = http::uri::PathAndQuery::from_static("/test.Echo/Unary");
            let request = tonic::Request::new(Msg { text: args[2].clone() });
            match grpc.unary(request, path, tonic_prost::ProstCodec::<Msg, Msg>::default()).await {
                Ok(reply) => println!("OK {}", reply.into_inner().text),
                Err(status) => println!("{:?} {}", status.code(), status.message()),
            }
            Ok(())
        })
        .await,
        Some("ws") if args.len() == 3 => within(async {
            use futures_util::{SinkExt, StreamExt};
            use tokio_tungstenite::tungstenite::{Error, Message};
            match tokio_tungstenite::connect_async(args[1].as_str()).await {
                Ok((mut ws, _)) => {
                    ws.send(Message::text(args[2].clone())).await?;
                    match ws.next().await {
                        Some(Ok(Message::Text(text))) => println!("{text}"),
                        other => println!("no echo: {other:?}"),
                    }
                }
                Err(Error::Http(response)) => println!("refused {}", response.status().as_u16()),
                Err(e) => println!("failed {e}"),
            }
            Ok(())
        })
        .await,
        Some("tcp") if args.len() == 3 => within(async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = tokio::net::TcpStream::connect(args[1].as_str()).await?;
            let _ = stream.write_all(args[2].as_bytes()).await;
            let mut reply = Vec::new();
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read_to_end(&mut reply)).await;
            match (read, reply.is_empty()) {
                (_, false) => println!("{}", String::from_utf8_lossy(&reply)),
                (Ok(_), true) => println!("closed"),
                (Err(_), true) => println!("no answer"),
            }
            Ok(())
        })
        .await,
        Some("load") if args.len() == 4 => {
            // `load <url> <count> <pause-ms>`: sequential GETs, each on its own connection, bounded in count; prints
            // how many answered 200 and every other outcome.
            let (count, pause): (usize, u64) = (args[2].parse()?, args[3].parse()?);
            let (mut ok, mut failed) = (0usize, Vec::new());
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            for _ in 0..count {
                if futures_util::FutureExt::now_or_never(term.recv()).is_some() {
                    break;
                }
                match fetch(&args[1]).await {
                    Ok((200, _, _)) => ok += 1,
                    Ok((status, error, _)) => failed.push(format!("{status} {error}")),
                    Err(e) => failed.push(e.to_string()),
                }
                tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
            }
            println!("ok {ok} failed {}", failed.len());
            for f in failed {
                println!("{f}");
            }
            Ok(())
        }
        _ => Err("usage: pod_app serve <port>... | get <url> | grpc <url> <text> | ws <url> <text> | tcp <host:port> <text> \
                  | load <url> <count> <pause-ms>"
            .into()),
    }
}

/// How long a client waits for one call (connection, request and answer) before it gives up with an error.
const CALL_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A client call bounded by [`CALL_LIMIT`]: a call that hangs is an error, never a hung test.
async fn within<T>(
    call: impl std::future::Future<Output = Result<T, Box<dyn std::error::Error>>>,
) -> Result<T, Box<dyn std::error::Error>> {
    tokio::time::timeout(CALL_LIMIT, call).await.map_err(|_| format!("no answer within {CALL_LIMIT:?}"))?
}

/// SIGTERM (or SIGINT).
async fn terminated() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// The one message of the test gRPC service `test.Echo/Unary`.
#[derive(Clone, PartialEq, prost::Message)]
struct Msg {
    #[prost(string, tag = "1")]
    text: String,
}

/// `test.Echo/Unary`: the text back, with who called.
struct Echo;

impl tonic::server::UnaryService<Msg> for Echo {
    type Response = Msg;
    type Future = std::future::Ready<Result<tonic::Response<Msg>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<Msg>) -> Self::Future {
        let caller = request.metadata().get("ferry-client-id").and_then(|v| v.to_str().ok()).unwrap_or("none");
        let text = format!("echo {} caller {caller}", request.get_ref().text);
        std::future::ready(Ok(tonic::Response::new(Msg { text })))
    }
}

/// One request: gRPC, a WebSocket upgrade, or plain HTTP.
async fn answer(
    mut req: http::Request<hyper::body::Incoming>,
    port: u16,
    from: std::net::SocketAddr,
) -> Result<http::Response<tonic::body::Body>, Infallible> {
    let header = |name: http::header::HeaderName| req.headers().get(name).and_then(|v| v.to_str().ok());
    let caller = header(http::header::HeaderName::from_static("ferry-client-id")).unwrap_or("none").to_string();
    if header(http::header::CONTENT_TYPE).is_some_and(|t| t.starts_with("application/grpc")) {
        let codec = tonic_prost::ProstCodec::<Msg, Msg>::default();
        return Ok(tonic::server::Grpc::new(codec).unary(Echo, req).await);
    }
    if header(http::header::UPGRADE).is_some_and(|u| u.eq_ignore_ascii_case("websocket")) {
        let key = header(http::header::SEC_WEBSOCKET_KEY).unwrap_or_default().as_bytes().to_vec();
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(&key);
        tokio::spawn(async move {
            use futures_util::{SinkExt, StreamExt};
            use tokio_tungstenite::tungstenite::{Message, protocol::Role};
            let Ok(upgraded) = hyper::upgrade::on(&mut req).await else { return };
            let mut ws =
                tokio_tungstenite::WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            while let Some(Ok(Message::Text(text))) = ws.next().await {
                if ws.send(Message::text(format!("echo {text} caller {caller}"))).await.is_err() {
                    break;
                }
            }
        });
        let response = http::Response::builder()
            .status(http::StatusCode::SWITCHING_PROTOCOLS)
            .header(http::header::UPGRADE, "websocket")
            .header(http::header::CONNECTION, "Upgrade")
            .header(http::header::SEC_WEBSOCKET_ACCEPT, accept)
            .body(tonic::body::Body::empty())
            .expect("valid response");
        return Ok(response);
    }
    let body = format!("app on {port}: caller {caller} from {}\n", from.ip().to_canonical());
    Ok(http::Response::new(tonic::body::Body::new(Full::new(Bytes::from(body)))))
}

/// Serves HTTP/1.1 (with upgrades) and HTTP/2 until `stop` turns true; then every open connection finishes its
/// request and closes.
async fn serve(listener: tokio::net::TcpListener, mut stop: tokio::sync::watch::Receiver<bool>) {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, from) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => continue,
            },
            _ = stop.wait_for(|s| *s) => break,
        };
        let mut stop = stop.clone();
        connections.spawn(async move {
            let svc = hyper::service::service_fn(move |req| answer(req, port, from));
            let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = stop.wait_for(|s| *s) => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        });
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// Echoes the first bytes of each connection, prefixed `echo `, then closes it.
async fn echo_tcp(listener: tokio::net::TcpListener, mut stop: tokio::sync::watch::Receiver<bool>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let mut stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            if let Ok(n @ 1..) = stream.read(&mut buf).await {
                let _ = stream.write_all(&[b"echo ", &buf[..n]].concat()).await;
            }
        });
    }
}

async fn get(url: &str) -> Result<(), Box<dyn std::error::Error>> {
    let (status, error, body) = fetch(url).await?;
    println!("{status} {error}\n{}", body.trim_end());
    Ok(())
}

/// One GET, within [`CALL_LIMIT`]: (status, `ferry-proxy-error`, body).
async fn fetch(url: &str) -> Result<(u16, String, String), Box<dyn std::error::Error>> {
    within(fetch_unbounded(url)).await
}

async fn fetch_unbounded(url: &str) -> Result<(u16, String, String), Box<dyn std::error::Error>> {
    let uri: http::Uri = url.parse()?;
    let authority = uri.authority().ok_or("the URL has no host")?.clone();
    let port = authority.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((authority.host(), port)).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let req = http::Request::get(path).header(http::header::HOST, authority.as_str()).body(Empty::<Bytes>::new())?;
    let resp = send.send_request(req).await?;
    let status = resp.status().as_u16();
    let error = resp.headers().get("ferry-proxy-error").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, error, String::from_utf8_lossy(&body).into_owned()))
}
