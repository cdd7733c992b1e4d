//! The attack suite: hostile clients against a real `ferry` process's inbound and outbound listeners while a
//! legitimate client keeps calling through both, each call on a new connection; every legitimate call, during the
//! attack and after it, must succeed. Each attack is bounded in time; traffic stays on loopback.

use ferry_test_support as support;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::backend::{self, Backend};
use support::h2raw;
use support::{Ferry, service_yaml};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// How long each attack runs.
const ATTACK: Duration = Duration::from_secs(3);
/// How long a flood from a peer that never reads may take to fill the buffers between it and the proxy.
const FLOOD: Duration = Duration::from_secs(30);
/// The connection cap of the proxies under attack (`FERRY_MAX_CONNECTIONS`); the floods open more than that.
const CAP: usize = 64;

/// A proxy with its app: `echo` on the outbound side and the inbound side's app, with tight timers so that the
/// attacks' effects show within seconds.
struct Site {
    ferry: Ferry,
    app: Backend,
}

impl Site {
    async fn start(config_extra: &str, env_extra: &[(&str, &str)], open_files: Option<u64>) -> Site {
        let app = backend::http_backend().await;
        let app_addr = app.addr.to_string();
        let cap = CAP.to_string();
        let mut env = vec![
            ("FERRY_HEADER_READ_TIMEOUT", "1s"),
            ("FERRY_IDLE_TIMEOUT", "2s"),
            ("FERRY_MAX_CONNECTIONS", cap.as_str()),
            ("FERRY_APP_ADDR", app_addr.as_str()),
            ("FERRY_SERVICE", "echo"),
            ("FERRY_LOG_LEVEL", "warn"),
        ];
        // An extra setting replaces the default; an empty one removes it (the proxy's own default then applies).
        for (key, value) in env_extra {
            env.retain(|(k, _)| k != key);
            if !value.is_empty() {
                env.push((key, value));
            }
        }
        let config = format!("{}{config_extra}", service_yaml("echo", 80, &[app.addr]));
        let ferry = tokio::task::block_in_place(|| Ferry::start_limited(Some(&config), &env, open_files));
        Site { ferry, app }
    }

    fn listeners(&self) -> [(&'static str, SocketAddr); 2] {
        [("outbound", self.ferry.outbound), ("inbound", self.ferry.inbound)]
    }

    /// The proxy's resident memory, in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.ferry.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    fn metric(&self, series: &str) -> f64 {
        tokio::task::block_in_place(|| self.ferry.metric(series))
    }

    /// Runs `attack` against both listeners, with the legitimate client calling through both from before it starts
    /// until a moment after it ends; fails the test if any legitimate call failed. Returns each listener's outcome.
    async fn under_attack<F, Fut>(&self, attack: F) -> Vec<(&'static str, Fut::Output)>
    where
        F: Fn(SocketAddr) -> Fut,
        Fut: Future + Send + 'static,
        Fut::Output: Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let mut legit = JoinSet::new();
        for (name, addr) in self.listeners() {
            legit.spawn(legitimate_client(name, addr, stop.clone()));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut attacks = JoinSet::new();
        for (name, addr) in self.listeners() {
            let attack = tokio::time::timeout(FLOOD + Duration::from_secs(15), attack(addr));
            attacks.spawn(async move { (name, attack.await.expect("the attack is bounded in time")) });
        }
        let outcomes = attacks.join_all().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::Relaxed);
        for (name, ok, failed) in legit.join_all().await {
            assert!(
                failed.is_empty(),
                "{name}: {} of {} legitimate calls failed: {failed:?}",
                failed.len(),
                ok + failed.len()
            );
            assert!(ok >= 5, "{name}: only {ok} legitimate calls were made");
        }
        outcomes
    }
}

/// Calls `GET /public/legit` through `addr` until `stop`, each call on a new connection; returns the successes and failures.
async fn legitimate_client(
    name: &'static str,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
) -> (&'static str, usize, Vec<String>) {
    let (mut ok, mut failed) = (0, Vec::new());
    while !stop.load(Ordering::Relaxed) {
        match call(addr).await {
            Ok(()) => ok += 1,
            Err(e) => failed.push(e),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (name, ok, failed)
}

async fn call(addr: SocketAddr) -> Result<(), String> {
    let attempt = async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        s.write_all(b"GET /public/legit HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.map_err(|e| format!("read: {e}"))?;
        let text = String::from_utf8_lossy(&out);
        match text.starts_with("HTTP/1.1 200") && text.ends_with("hello from backend") {
            true => Ok(()),
            false => Err(format!("answer: {:?}", text.lines().next().unwrap_or_default())),
        }
    };
    tokio::time::timeout(Duration::from_secs(5), attempt).await.map_err(|_| "no answer within 5 s".to_string())?
}

/// Opens `count` connections that each send `first`, then one byte of `trickle` (cycled) every `every` for
/// `ATTACK`, reading whatever comes back; returns how many of them the proxy closed by the end.
async fn hold(addr: SocketAddr, count: usize, first: &'static [u8], trickle: &'static [u8], every: Duration) -> usize {
    let mut held = JoinSet::new();
    for _ in 0..count {
        held.spawn(async move {
            let Ok(s) = TcpStream::connect(addr).await else { return true };
            let (mut read, mut write) = s.into_split();
            let writer = async move {
                if write.write_all(first).await.is_err() {
                    return;
                }
                let end = Instant::now() + ATTACK;
                for byte in trickle.iter().cycle() {
                    if Instant::now() >= end || write.write_all(&[*byte]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(every).await;
                }
                std::future::pending::<()>().await
            };
            let closed = async move {
                let mut buf = [0u8; 4096];
                loop {
                    match read.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            };
            // Closed by the proxy before the attack (and a second of grace for the timers) is over.
            tokio::select! {
                () = closed => true,
                () = writer => false,
                () = tokio::time::sleep(ATTACK + Duration::from_secs(5)) => false,
            }
        });
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    held.join_all().await.into_iter().filter(|closed| *closed).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_on_the_first_request() {
    // More connections than the cap, each trickling its first request's headers: cut at the header deadline, and
    // the oldest make room for newcomers before that.
    let site = Site::start("", &[], None).await;
    let count = 2 * CAP + 20;
    let outcomes = site
        .under_attack(move |addr| {
            hold(addr, count, b"GET / HTTP/1.1\r\nHost: echo\r\n", b"X-a: b\r\n", Duration::from_millis(300))
        })
        .await;
    for (name, closed) in outcomes {
        assert_eq!(closed, count, "{name}: slow-header connections left open");
        let evicted = site.metric(&format!(r#"ferry_tcp_connections_evicted_total{{direction="{name}"}}"#));
        assert!(evicted > 0.0, "{name}: the cap made no room");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_on_later_keep_alive_requests() {
    // One complete request, then the next one's headers trickled: each later request has its own header deadline.
    let site = Site::start("", &[], None).await;
    let count = CAP / 2;
    let outcomes = site
        .under_attack(move |addr| {
            hold(
                addr,
                count,
                b"GET / HTTP/1.1\r\nHost: echo\r\n\r\nGET / HTTP/1.1\r\nHost: echo\r\n",
                b"X-a: b\r\n",
                Duration::from_millis(300),
            )
        })
        .await;
    for (name, closed) in outcomes {
        assert_eq!(closed, count, "{name}: connections trickling a later request left open");
    }
    let cut = site.metric(r#"ferry_proxy_errors_total{direction="outbound",reason="bad-request"}"#);
    assert!(cut >= count as f64, "each was cut as a slow request: {cut}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_and_slow_readers_hold_no_more_than_their_connections() {
    // Requests whose bodies come a byte at a time, and responses of 64 MiB that are never read: the proxy streams
    // (no body is buffered whole) and pushes back, so its memory stays flat while others are served.
    let site = Site::start("", &[], None).await;
    let before = site.rss_kib();
    let count = CAP / 4;
    site.under_attack(move |addr| {
        hold(
            addr,
            count,
            b"POST /echo HTTP/1.1\r\nHost: echo\r\nContent-Length: 100000\r\n\r\n",
            b"x",
            Duration::from_millis(200),
        )
    })
    .await;
    site.under_attack(move |addr| {
        hold(
            addr,
            count,
            b"GET /download?bytes=67108864 HTTP/1.1\r\nHost: echo\r\n\r\n",
            b"",
            Duration::from_millis(200),
        )
    })
    .await;
    let grown = site.rss_kib().saturating_sub(before);
    // 2 x 16 readers of 64 MiB: buffered, that would be 2 GiB.
    assert!(grown < 64 * 1024, "the proxy grew by {grown} KiB under slow readers");
}

/// Runs `h2raw::attack` on a new connection to `addr` for `ATTACK`.
async fn h2_attack(
    addr: SocketAddr,
    read: bool,
    next: impl Fn(usize) -> Option<Vec<u8>> + Send + 'static,
) -> h2raw::Outcome {
    // A flood that never reads runs until the proxy stops taking its bytes (bounded by `FLOOD` and by the flood's
    // own frame count): how long the buffers between them take to fill depends on the machine's load.
    let bound = if read { ATTACK } else { FLOOD };
    // A peer that never reads takes small socket buffers (set before connecting, which stops the kernel growing
    // them): the proxy's answers back up after its own send buffer and 16 KiB, not after the megabytes autotuned
    // loopback buffers take, which a loaded machine could not always fill within the bound.
    let socket =
        if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }.unwrap();
    if !read {
        socket.set_recv_buffer_size(16 * 1024).unwrap();
        socket.set_send_buffer_size(16 * 1024).unwrap();
    }
    h2raw::attack(socket.connect(addr).await.unwrap(), read, bound, next).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_floods_are_cut_off() {
    let site = Site::start("", &[], None).await;
    let before = site.rss_kib();

    // Rapid reset (CVE-2023-44487): streams opened and cancelled at once, as fast as the socket takes them.
    let outcomes = site
        .under_attack(|addr| {
            h2_attack(addr, true, |i| {
                let stream = 2 * i as u32 + 1;
                let mut f =
                    h2raw::frame(h2raw::HEADERS, h2raw::END_HEADERS | h2raw::END_STREAM, stream, &h2raw::get_echo());
                f.extend(h2raw::frame(h2raw::RST_STREAM, 0, stream, &8u32.to_be_bytes()));
                (stream < 1 << 30).then_some(f)
            })
        })
        .await;
    for (name, o) in &outcomes {
        eprintln!("rapid reset, {name}: {o:?}");
        assert_eq!(o.goaway, Some(h2raw::ENHANCE_YOUR_CALM), "{name}: rapid resets were taken without end: {o:?}");
    }

    // CONTINUATION flood (CVE-2024-27316 and kin): one header block that never ends.
    let outcomes = site
        .under_attack(|addr| {
            h2_attack(addr, true, |i| {
                Some(match i {
                    0 => h2raw::frame(h2raw::HEADERS, h2raw::END_STREAM, 1, &h2raw::get_echo()),
                    _ => h2raw::frame(h2raw::CONTINUATION, 0, 1, &h2raw::filler()),
                })
            })
        })
        .await;
    for (name, o) in &outcomes {
        eprintln!("continuation, {name}: {o:?}");
        assert!(o.closed && o.goaway.is_some(), "{name}: a header block that never ends kept its connection: {o:?}");
    }

    // SETTINGS and PING floods from a peer that never reads the ACKs. The proxy lets an accepted connection queue
    // 128 KiB of unsent answers (`TCP_NOTSENT_LOWAT`), then stops writing and so reading: each flood gets at most
    // twice the frames whose answers that, the attacker's 16 KiB receive buffer and the proxy's write buffer hold,
    // plus what the kernel's buffers take unread. Without the limit the autotuned send buffer (up to `tcp_wmem`'s
    // maximum) took 435,000 SETTINGS before the proxy stopped reading, which a slow machine did not send in time.
    let queued = 128 * 1024 + 64 * 1024;
    for (what, kind, answer_len) in [("settings", h2raw::SETTINGS, 9), ("ping", h2raw::PING, 17)] {
        let most = 2 * queued / answer_len + 16 * 1024;
        let outcomes = site
            .under_attack(move |addr| {
                h2_attack(addr, false, move |i| {
                    (i < most).then(|| match kind {
                        h2raw::PING => h2raw::frame(h2raw::PING, 0, 0, b"pingping"),
                        _ => h2raw::frame(h2raw::SETTINGS, 0, 0, &[0, 4, 0, 1, 0, 0]),
                    })
                })
            })
            .await;
        for (name, o) in &outcomes {
            eprintln!("{what} flood, {name}: {o:?}");
            assert!(
                o.stalled || o.closed,
                "{name}: {}: {o:?}",
                if o.frames_sent >= most {
                    format!("the proxy kept reading {what} frames past the {most} its unsent limit could answer")
                } else {
                    format!("the proxy neither stopped reading nor closed within {FLOOD:?} (a machine too loaded?)")
                }
            );
        }
    }

    // A stream-count flood: requests the app holds for 4 s, far past the concurrent-stream limit.
    let outcomes = site
        .under_attack(|addr| {
            h2_attack(addr, true, |i| {
                let (stream, block) = (2 * i as u32 + 1, h2raw::get_echo_path("/delay?ms=4000"));
                (i < 1000).then(|| h2raw::frame(h2raw::HEADERS, h2raw::END_HEADERS | h2raw::END_STREAM, stream, &block))
            })
        })
        .await;
    for (name, o) in &outcomes {
        eprintln!("stream flood, {name}: {o:?}");
        assert!(o.refused >= 700 || o.goaway.is_some(), "{name}: streams past the limit were accepted: {o:?}");
    }

    let grown = site.rss_kib().saturating_sub(before);
    assert!(grown < 64 * 1024, "the proxy grew by {grown} KiB under the HTTP/2 floods");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_prefaces_past_the_cap_make_room() {
    // HTTP/2 connections that send their preface and nothing else, twice the cap: the oldest are closed as new ones
    // come, the rest at the idle timeout.
    let site = Site::start("", &[], None).await;
    let count = 2 * CAP;
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    let outcomes = site.under_attack(move |addr| hold(addr, count, preface, b"", Duration::from_millis(300))).await;
    for (name, closed) in outcomes {
        assert_eq!(closed, count, "{name}: preface-only connections left open");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_cannot_exhaust_file_descriptors() {
    // The proxy under `ulimit -n 512`, with its default cap (a fifth of what the limit leaves: 89 per listener);
    // idle sockets opened far past it on both listeners. The oldest are closed to make room; the proxy never runs
    // out of descriptors, and new callers are served.
    let prlimit = support::works("prlimit", &["--version"]);
    if !support::prerequisites("idle sockets under ulimit -n 512", &[("prlimit (util-linux)", prlimit)]) {
        return;
    }
    let site = Site::start("", &[("FERRY_MAX_CONNECTIONS", "")], Some(512)).await;
    let count = 400;
    let outcomes = site.under_attack(move |addr| hold(addr, count, b"", b"", Duration::from_millis(300))).await;
    for (name, closed) in outcomes {
        assert!(closed >= count - 89, "{name}: only {closed} of {count} idle sockets were closed");
        let evicted = site.metric(&format!(r#"ferry_tcp_connections_evicted_total{{direction="{name}"}}"#));
        assert!(evicted > 0.0, "{name}: the cap made no room");
    }
    assert!(!site.ferry.logs().contains("Too many open files"), "{}", site.ferry.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detection_bypasses_forged_identities_and_ambiguous_paths_are_refused() {
    // Finding 1: leading empty lines and a late first byte stay HTTP (the forged identity header is stripped);
    // finding 2: the underscore spelling is stripped too; finding 3: ambiguous paths are refused where a rule
    // matches on paths.
    let policy = "apiVersion: ferry.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: echo}\nspec: {targetRef: {kind: Service, name: echo}, defaultAction: deny, allow: [{to: {paths: [/public]}}]}\n";
    let site = Site::start(policy, &[("FERRY_DETECT_TIMEOUT", "1s")], None).await;
    let inbound = site.ferry.inbound;
    let forged = "ferry-client-id: spiffe://cluster.local/ns/default/sa/admin\r\nferry_client_id: spiffe://cluster.local/ns/default/sa/admin\r\n";
    let outcomes = site
        .under_attack(move |addr| async move {
            if addr != inbound {
                return Vec::new();
            }
            let mut answers = Vec::new();
            // (sent first, then a pause): empty lines; nothing for a while (under the detection timeout); the first
            // byte of `POST`, which is also the first of the HTTP/2 preface, past the detection timeout (found by
            // the `detect` fuzz target: it went out as opaque bytes, forged header included).
            for (first, pause) in [("\r\n\r\n\r\n\r\n\r\n\r\n", 0), ("", 300), ("P", 1500)] {
                let mut s = TcpStream::connect(addr).await.unwrap();
                s.write_all(first.as_bytes()).await.unwrap();
                tokio::time::sleep(Duration::from_millis(pause)).await;
                let rest = if first == "P" { "OST /public/x" } else { "GET /public/x" };
                let req =
                    format!("{rest} HTTP/1.1\r\nHost: echo\r\n{forged}Content-Length: 0\r\nConnection: close\r\n\r\n");
                s.write_all(req.as_bytes()).await.unwrap();
                let mut out = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
                answers.push(String::from_utf8_lossy(&out).to_string());
            }
            for path in ["/public/..;/admin", "/public/%252e%252e/admin", "/public/..%3b/admin", "/public/%2e%2e/admin"]
            {
                let mut s = TcpStream::connect(addr).await.unwrap();
                let req = format!("GET {path} HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n");
                s.write_all(req.as_bytes()).await.unwrap();
                let mut out = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
                answers.push(format!("{path} {}", String::from_utf8_lossy(&out)));
            }
            answers
        })
        .await;
    let answers: Vec<String> = outcomes.into_iter().flat_map(|(_, a)| a).collect();
    assert_eq!(answers.len(), 7);
    for answer in &answers[..3] {
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let lower = answer.to_ascii_lowercase();
        assert!(lower.contains("x-seen-client-id: none"), "a forged identity reached the app: {answer}");
        assert!(
            lower.contains("x-seen-client-id-underscore: none"),
            "the underscore spelling reached the app: {answer}"
        );
    }
    for answer in &answers[3..] {
        let first = answer.lines().next().unwrap_or_default();
        assert!(first.ends_with("HTTP/1.1 400 Bad Request"), "{first}");
    }
    let _ = &site.app;
}
