//! The test pods' app and client (the `pods` suite mounts this binary into its containers):
//! `pod_app serve <port>...` answers every HTTP request with who called (`ferry-client-id`) and from where (a port
//! written `lo:<port>` is bound to 127.0.0.1 only);
//! `pod_app get <url>` prints the status line, the `ferry-proxy-error` header and the body of one GET;
//! `pod_app load <url> <count> <pause-ms>` makes that many GETs in sequence and prints how many failed, and how.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => {
            let mut servers = Vec::new();
            for port in &args[1..] {
                // `lo:<port>`: a listener the app keeps to itself, on loopback only.
                let (host, port) = match port.strip_prefix("lo:") {
                    Some(port) => ("127.0.0.1", port),
                    None => ("0.0.0.0", port.as_str()),
                };
                let listener = tokio::net::TcpListener::bind((host, port.parse::<u16>()?)).await?;
                servers.push(tokio::spawn(serve(listener)));
            }
            for server in servers {
                server.await?;
            }
            Ok(())
        }
        Some("get") if args.len() == 2 => get(&args[1]).await,
        Some("load") if args.len() == 4 => {
            // `load <url> <count> <pause-ms>`: sequential GETs, each on its own connection, bounded in count; prints
            // how many answered 200 and every other outcome.
            let (count, pause): (usize, u64) = (args[2].parse()?, args[3].parse()?);
            let (mut ok, mut failed) = (0usize, Vec::new());
            for _ in 0..count {
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
        _ => Err("usage: pod_app serve <port>... | pod_app get <url> | pod_app load <url> <count> <pause-ms>".into()),
    }
}

async fn serve(listener: tokio::net::TcpListener) {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
    loop {
        let Ok((stream, from)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| async move {
                let caller = req.headers().get("ferry-client-id").and_then(|v| v.to_str().ok()).unwrap_or("none");
                let body = format!("app on {port}: caller {caller} from {}\n", from.ip().to_canonical());
                Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(body))))
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

async fn get(url: &str) -> Result<(), Box<dyn std::error::Error>> {
    let (status, error, body) = fetch(url).await?;
    println!("{status} {error}\n{}", body.trim_end());
    Ok(())
}

/// One GET: (status, `ferry-proxy-error`, body).
async fn fetch(url: &str) -> Result<(u16, String, String), Box<dyn std::error::Error>> {
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
