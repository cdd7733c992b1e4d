//! Protocol detection: HTTP/1.x, HTTP/2 prior knowledge (h2c, gRPC), or opaque TCP, from a connection's first bytes.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The longest method token we wait for before calling the bytes opaque.
const MAX_METHOD_LEN: usize = 20;
/// The most bytes detection buffers: a whole TLS record (a ClientHello) and then some; more can only be empty lines.
const MAX_DETECT_BYTES: usize = 17 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// A TLS ClientHello (complete in the buffered bytes): a mesh peer, or an unmeshed client's own TLS.
    Tls,
    Tcp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "h2",
            Protocol::Tls => "tls",
            Protocol::Tcp => "tcp",
        }
    }
}

/// What the bytes seen so far say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Classification {
    Known(Protocol),
    NeedMore,
}

/// Pure: classifies a connection's first bytes. An HTTP/1 request starts with a method token and a space;
/// HTTP/2 prior knowledge with the 24-byte preface; TLS with a handshake record (`0x16 0x03 ..`), known once the whole
/// first record (the ClientHello, at most 16 KiB) is buffered so that its SNI and ALPN can be read; anything else is
/// opaque.
pub fn classify(buf: &[u8]) -> Classification {
    if buf.is_empty() {
        return Classification::NeedMore;
    }
    if buf[0] == 0x16 && buf.get(1).is_none_or(|b| *b == 0x03) {
        if buf.len() < 5 {
            return Classification::NeedMore;
        }
        let len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
        if len > 16 * 1024 + 256 {
            return Classification::Known(Protocol::Tcp);
        }
        return if buf.len() >= 5 + len { Classification::Known(Protocol::Tls) } else { Classification::NeedMore };
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if buf.len() >= H2_PREFACE.len() {
            Classification::Known(Protocol::Http2)
        } else {
            Classification::NeedMore
        };
    }
    // HTTP/1 servers skip empty lines before a request line (RFC 9112 §2.2), any number of them: so does detection,
    // so that such a request is still served (and its headers sanitized) as HTTP rather than passed on as bytes.
    let rest = &buf[buf.iter().take_while(|b| matches!(b, b'\r' | b'\n')).count()..];
    if rest.is_empty() {
        return Classification::NeedMore;
    }
    // A method is any token (RFC 9110 §5.6.2), in any case: servers such as Go's net/http take `get` or `G.T` as a
    // method, so anything they would parse as a request line must not pass as opaque bytes. Then a space, and a
    // request target as those servers take it: `/...`, `*`, an absolute URI (`scheme://`), or CONNECT's authority.
    let token = rest.iter().take(MAX_METHOD_LEN + 1).take_while(|b| is_tchar(**b)).count();
    if token == rest.len() {
        return if token > MAX_METHOD_LEN { Classification::Known(Protocol::Tcp) } else { Classification::NeedMore };
    }
    if token == 0 || token > MAX_METHOD_LEN || rest[token] != b' ' {
        return Classification::Known(Protocol::Tcp);
    }
    let target = &rest[token + 1..];
    match target.first() {
        None => Classification::NeedMore,
        Some(b'/' | b'*') => Classification::Known(Protocol::Http1),
        Some(_) if rest[..token].eq_ignore_ascii_case(b"CONNECT") => Classification::Known(Protocol::Http1),
        Some(_) => absolute_uri(target),
    }
}

/// An `scheme://` start, as hyper takes it (the `http` crate: up to 64 letters, digits, `+`, `-`, `.`, `~` in any
/// order; wider than RFC 3986 §3.1, and whatever hyper serves must not pass as opaque bytes).
fn absolute_uri(target: &[u8]) -> Classification {
    const MAX_SCHEME: usize = 64;
    let scheme = target
        .iter()
        .take(MAX_SCHEME + 1)
        .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.' | b'~'))
        .count();
    if scheme == 0 || scheme > MAX_SCHEME {
        return Classification::Known(Protocol::Tcp);
    }
    let sep = &target[scheme..];
    let n = sep.len().min(3);
    if sep[..n] != b"://"[..n] {
        Classification::Known(Protocol::Tcp)
    } else if n < 3 {
        Classification::NeedMore
    } else {
        Classification::Known(Protocol::Http1)
    }
}

/// A token character (RFC 9110 §5.6.2).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Pure: whether bytes that were still inconclusive when detection stopped waiting can begin an HTTP/1 request (empty
/// lines, a method token, the start of a request line). Such a connection is served as HTTP (hyper's header deadline
/// then applies), so that sending a request slowly cannot turn it into opaque bytes that skip HTTP handling. That
/// includes the start of the HTTP/2 preface (`P`, `PR`, ... could as well be `POST`): a preface sent that slowly gets
/// an HTTP error, never a pass-through. Nothing at all, or the start of a TLS record, is not.
pub fn partial_http1(buf: &[u8]) -> bool {
    !buf.is_empty() && buf[0] != 0x16 && classify(buf) == Classification::NeedMore
}

/// Why detection ended as it did (the `reason` label of `ferry_protocol_detections_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Detected,
    Timeout,
    /// The peer closed its side before the bytes were conclusive.
    Eof,
    OpaquePort,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Detected => "detected",
            Reason::Timeout => "timeout",
            Reason::Eof => "eof",
            Reason::OpaquePort => "opaque-port",
        }
    }
}

/// Reads until the first bytes are conclusive or `timeout` passes; on timeout the connection is TCP, never dropped.
/// Returns the protocol and the bytes read, which the caller must replay.
pub async fn detect<R: AsyncRead + Unpin>(
    io: &mut R,
    timeout: Duration,
) -> std::io::Result<(Protocol, Reason, BytesMut)> {
    let mut buf = BytesMut::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Err(_elapsed) if partial_http1(&buf) => return Ok((Protocol::Http1, Reason::Timeout, buf)),
            Err(_elapsed) => return Ok((Protocol::Tcp, Reason::Timeout, buf)),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(0)) => return Ok((Protocol::Tcp, Reason::Eof, buf)),
            Ok(Ok(_)) => {
                if let Classification::Known(p) = classify(&buf) {
                    return Ok((p, Reason::Detected, buf));
                }
                // Only empty lines keep detection reading this long: HTTP's to handle (hyper bounds the rest).
                if buf.len() > MAX_DETECT_BYTES {
                    return Ok((Protocol::Http1, Reason::Detected, buf));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Classification::*;

    #[test]
    fn classify_table() {
        let cases: &[(&[u8], Classification)] = &[
            (b"", NeedMore),
            (b"G", NeedMore),
            (b"GET", NeedMore),
            (b"GET / HTTP/1.1\r\n", Known(Protocol::Http1)),
            (b"POST /x HTTP/1.0\r\n", Known(Protocol::Http1)),
            (b"M-SEARCH * HTTP/1.1", Known(Protocol::Http1)),
            (b"GET /\x00\x01 garbage", Known(Protocol::Http1)), // malformed HTTP: hyper answers 400
            (b"PRI", NeedMore),
            (b"PRI * HTTP/2.0\r\n", NeedMore),
            (H2_PREFACE, Known(Protocol::Http2)),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00garbage", Known(Protocol::Http2)),
            (b"PRI * HTTP/1.1\r\n", Known(Protocol::Http1)),
            (b"\r\nGET / HTTP/1.1\r\n", Known(Protocol::Http1)), // empty lines before the request line
            (b"\r\n", NeedMore),
            (b"\r\n\r\n\r\n", NeedMore), // any number of empty lines
            (b"\r\n\r\n\r\n\r\nGET / HTTP/1.1", Known(Protocol::Http1)),
            (b"\n\n\n\n\n\n\n\n\nGET / HTTP/1.1", Known(Protocol::Http1)),
            (b"\x16\x03\x01\x00\x03", NeedMore), // TLS ClientHello record header: wait for the record
            (b"\x16\x03\x01\x00\x03abc", Known(Protocol::Tls)),
            (b"\x16\x03\x01\x00\x03ab", NeedMore),
            (b"\x16\x03", NeedMore),
            (b"\x16\x02", Known(Protocol::Tcp)),
            (b"\x16\x03\x01\xff\xff", Known(Protocol::Tcp)), // longer than any record
            (b"get / HTTP/1.1", Known(Protocol::Http1)),     // Go's net/http takes any token as a method
            (b"G.T /admin HTTP/1.1", Known(Protocol::Http1)),
            (b"GET ", NeedMore),
            (b"GET http", NeedMore),
            (b"GET http://api/x HTTP/1.1", Known(Protocol::Http1)),
            // Found by the reference property below: hyper (the `http` crate) takes `~` and a leading digit in a
            // scheme, so such an absolute-form target is a request, not opaque bytes.
            (b"X a+0-0a00~://- HTTP/1.1", Known(Protocol::Http1)),
            (b"GET 0a://h/ HTTP/1.1", Known(Protocol::Http1)),
            (b"GET https:/", NeedMore),
            (b"GET http:x", Known(Protocol::Tcp)),
            (b"CONNECT api:443 HTTP/1.1", Known(Protocol::Http1)),
            (b"OPTIONS * HTTP/1.1", Known(Protocol::Http1)),
            (b"SSH-2.0-OpenSSH_7.4 Debian-10\r\n", Known(Protocol::Tcp)), // a banner, not a request target
            (b"HELO mail.example\r\n", Known(Protocol::Tcp)),
            (b" GET", Known(Protocol::Tcp)),
            (b"SSH-2.0-OpenSSH", NeedMore),                              // a token so far
            (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", Known(Protocol::Tcp)), // postgres SSLRequest
            (b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", Known(Protocol::Tcp)),
            (b"ABCDEFGHIJKLMNOP", NeedMore),
        ];
        for (bytes, want) in cases {
            assert_eq!(classify(bytes), *want, "{:?}", String::from_utf8_lossy(bytes));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_timeout_a_silent_peer_is_tcp_and_a_slow_request_http() {
        use tokio::io::AsyncWriteExt;
        let (_client, mut server) = tokio::io::duplex(64);
        let (p, reason, buf) = detect(&mut server, Duration::from_secs(10)).await.unwrap();
        assert_eq!((p, reason, buf.len()), (Protocol::Tcp, Reason::Timeout, 0));
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"GE").await.unwrap();
        let (p, reason, buf) = detect(&mut server, Duration::from_secs(10)).await.unwrap();
        assert_eq!((p, reason, &buf[..]), (Protocol::Http1, Reason::Timeout, &b"GE"[..]));
        let cases = [
            (&b"\r\nPO"[..], true),
            // Found by the `detect` fuzz target: `P` stalled at the timeout went out as opaque bytes, and what
            // followed (`OST / HTTP/1.1` with any header, `ferry-client-id` included) reached the app unhandled.
            (b"P", true),
            (b"PRI * HT", true),
            (b"\x00\x01", false),
            (b"\x16\x03", false),
            (b"ABC1", true), // a token: it may still become a method
            (b"\r\n\r\n", true),
            (b"GET ", true),
            (b"get /x", false), // conclusive already
        ];
        for (bytes, http) in cases {
            assert_eq!(partial_http1(bytes), http, "{bytes:?}");
        }
    }

    #[tokio::test]
    async fn split_preface_is_reassembled() {
        use tokio::io::AsyncWriteExt;
        let (mut client, mut server) = tokio::io::duplex(64);
        let task = tokio::spawn(async move { detect(&mut server, Duration::from_secs(5)).await.unwrap() });
        client.write_all(&H2_PREFACE[..10]).await.unwrap();
        tokio::task::yield_now().await;
        client.write_all(&H2_PREFACE[10..]).await.unwrap();
        let (p, reason, buf) = task.await.unwrap();
        assert_eq!((p, reason, buf.len()), (Protocol::Http2, Reason::Detected, 24));
    }

    #[tokio::test]
    async fn early_close_is_tcp() {
        let (client, mut server) = tokio::io::duplex(64);
        drop(client);
        let (p, reason, _) = detect(&mut server, Duration::from_secs(5)).await.unwrap();
        assert_eq!((p, reason), (Protocol::Tcp, Reason::Eof));
    }

    /// Any request line the reference parser (httparse, as hyper uses it) takes, after any number of empty lines, is
    /// HTTP/1 to detection — and no prefix of it, as the bytes trickle in, is ever taken for opaque bytes (a request
    /// sent slowly or oddly must not skip HTTP handling).
    mod reference {
        use super::super::*;
        use proptest::prelude::*;

        fn method() -> impl Strategy<Value = String> {
            proptest::string::string_regex("[A-Za-z0-9!#$%&'*+.^_`|~-]{1,16}").unwrap()
        }

        fn target(method: &str) -> BoxedStrategy<String> {
            if method.eq_ignore_ascii_case("CONNECT") {
                return proptest::string::string_regex("[a-z0-9.-]{1,20}:[0-9]{1,5}").unwrap().boxed();
            }
            prop_oneof![
                proptest::string::string_regex("/[A-Za-z0-9._~%!$&'()*+,;=:@/?-]{0,40}").unwrap(),
                Just("*".to_string()),
                proptest::string::string_regex("[a-z][a-z0-9+.-]{0,8}://[a-z0-9.-]{1,20}(/[a-z0-9/]{0,10})?").unwrap(),
            ]
            .boxed()
        }

        fn request() -> impl Strategy<Value = Vec<u8>> {
            (proptest::collection::vec(prop_oneof![Just(b"\r\n".to_vec()), Just(b"\n".to_vec())], 0..8), method())
                .prop_flat_map(|(empty, method)| {
                    let target = target(&method);
                    (Just(empty), Just(method), target)
                })
                .prop_map(|(empty, method, target)| {
                    let mut bytes: Vec<u8> = empty.concat();
                    bytes.extend_from_slice(format!("{method} {target} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes());
                    bytes
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
            #[test]
            fn what_httparse_takes_is_http1_at_every_prefix(bytes in request()) {
                let mut headers = [httparse::EMPTY_HEADER; 4];
                let parsed = httparse::Request::new(&mut headers).parse(&bytes);
                // The generator's requests are valid to the reference; the property is about detection.
                prop_assume!(matches!(parsed, Ok(httparse::Status::Complete(_))));
                prop_assert_eq!(classify(&bytes), Classification::Known(Protocol::Http1));
                for end in 1..bytes.len() {
                    prop_assert_ne!(classify(&bytes[..end]), Classification::Known(Protocol::Tcp), "prefix {:?}", &bytes[..end]);
                }
            }

            #[test]
            fn mutated_requests_httparse_takes_are_never_opaque(
                bytes in request(),
                edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), any::<bool>()), 1..4),
            ) {
                // A valid request with a few bytes replaced or inserted: odd methods, targets and separators that the
                // reference may still take.
                let mut bytes = bytes;
                for (at, byte, insert) in edits {
                    let i = at.index(bytes.len());
                    if insert { bytes.insert(i, byte) } else { bytes[i] = byte }
                }
                let mut headers = [httparse::EMPTY_HEADER; 4];
                let mut req = httparse::Request::new(&mut headers);
                if let Ok(httparse::Status::Complete(_)) = req.parse(&bytes) {
                    let target = req.path.unwrap_or_default();
                    // What hyper then serves: a target it accepts as origin, asterisk or absolute form.
                    let served = target == "*"
                        || target.parse::<http::Uri>().is_ok_and(|u| u.path().starts_with('/') && (target.starts_with('/') || u.scheme().is_some()));
                    if served {
                        prop_assert_ne!(classify(&bytes), Classification::Known(Protocol::Tcp), "{:?}", String::from_utf8_lossy(&bytes));
                    }
                }
            }
        }
    }
}
