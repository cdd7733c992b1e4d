//! The test pods' app and client (the `pods` suite mounts this binary into its containers):
//! `pod_app serve <port>...` answers every HTTP request with who called (`ferry-client-id`) and from where (a port
//! written `lo:<port>` is bound to 127.0.0.1 only); on SIGTERM it stops accepting, finishes what is in flight and
//! exits, as a well-behaved app does;
//! `pod_app get <url>` prints the status line, the `ferry-proxy-error` header and the body of one GET;
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
        _ => Err("usage: pod_app serve <port>... | pod_app get <url> | pod_app load <url> <count> <pause-ms>".into()),
    }
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

/// Serves until `stop` turns true; then every open connection finishes its request and closes.
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
            let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| async move {
                let caller = req.headers().get("ferry-client-id").and_then(|v| v.to_str().ok()).unwrap_or("none");
                let body = format!("app on {port}: caller {caller} from {}\n", from.ip().to_canonical());
                Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(body))))
            });
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
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
