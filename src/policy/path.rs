//! Request paths as authorization sees them: a path rule can only be trusted on a path every common server resolves
//! the same way. `ambiguous` names the forms that servers (Tomcat, Spring, Jetty, nginx, Go's net/http, Node, IIS)
//! normalize differently — dot segments, matrix parameters, encoded separators, double encoding — so that a request
//! whose path holds one is refused where a rule matches on paths (400 `bad-request`, as Envoy's
//! `path_with_escaped_slashes_action: REJECT_REQUEST`), instead of being judged on a path the app never sees.

/// Pure: why `path` (as it came on the request line, without the query) is ambiguous, or `None` when every common
/// server reads it as written.
pub fn ambiguous(path: &str) -> Option<&'static str> {
    let bytes = path.as_bytes();
    if bytes.contains(&b';') {
        return Some("a `;` (Tomcat, Spring and Jetty drop `;` parameters from each segment)");
    }
    if bytes.contains(&b'\\') {
        return Some("a backslash (IIS and some Node routers take it for `/`)");
    }
    if path.contains("//") {
        return Some("an empty segment (nginx merges slashes)");
    }
    if path.split('/').any(|s| s == "." || s == "..") {
        return Some("a dot segment (servers resolve it before routing)");
    }
    // Percent-encodings: each must be two hex digits and decode to a byte that is not a separator, a dot, a `%`
    // (double encoding), a control character, or part of invalid UTF-8 (overlong forms of `.` and `/`).
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            decoded.push(bytes[i]);
            i += 1;
            continue;
        }
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) else {
            return Some("a `%` not followed by two hex digits (IIS `%u`, or servers that pass it on differently)");
        };
        match b {
            b'/' | b'\\' => return Some("an encoded `/` or `\\` (decoded before routing by some servers)"),
            b'.' => return Some("an encoded `.` (a dot segment once decoded)"),
            b';' => return Some("an encoded `;` (a `;` parameter once decoded)"),
            b'%' => return Some("an encoded `%` (double encoding: decoded twice by some apps)"),
            0..=0x1f | 0x7f => return Some("an encoded control character"),
            _ => decoded.push(b),
        }
        i += 3;
    }
    if std::str::from_utf8(&decoded).is_err() {
        return Some("encoded bytes that are not UTF-8 (overlong forms decode to `.` or `/` in lax decoders)");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::ambiguous;

    /// Each form, and what it guards against (`true`: refused where path rules apply).
    #[test]
    fn path_forms() {
        let cases: &[(&str, bool)] = &[
            // As written everywhere.
            ("/", false),
            ("/public", false),
            ("/public/a/b.css", false),
            ("/public/a-b_c~d", false),
            ("/public/%20space", false),  // an encoded space: decoded alike everywhere
            ("/public/caf%C3%A9", false), // UTF-8
            ("/public/%41", false),       // `A`
            ("/public/x.y", false),       // a dot inside a segment
            ("/public/...", false),       // three dots: a name, not a dot segment
            ("/public/.well-known", false),
            // Matrix parameters: Tomcat, Spring and Jetty strip `;...` from each segment.
            ("/public/..;/admin", true),
            ("/public;/admin", true),
            ("/admin;x=1", true),
            ("/public/x;jsessionid=1", true),
            // Encoded `;`: decoded, then stripped.
            ("/public/..%3b/admin", true),
            ("/public/..%3B/admin", true),
            // Double encoding: an app or a second proxy decodes again.
            ("/public/%252e%252e/admin", true),
            ("/public/%252F", true),
            ("/public/%25", true),
            // Dot segments, plain and encoded.
            ("/public/../admin", true),
            ("/public/./x", true),
            ("/public/..", true),
            ("/public/.", true),
            ("/public/%2e%2e/admin", true),
            ("/public/%2E%2E/admin", true),
            ("/public/.%2e/admin", true),
            ("/public/%2e./admin", true),
            ("/public/%2e", true),
            // Encoded separators: Go's net/http decodes for routing with some muxes, Tomcat with a flag.
            ("/public%2F..%2Fadmin", true),
            ("/public%2fadmin", true),
            ("/public%5c..%5cadmin", true),
            // Backslashes: IIS and some Node routers.
            ("/public\\..\\admin", true),
            ("/public\\admin", true),
            // Empty segments: nginx's merge_slashes.
            ("/public//x", true),
            ("//admin", true),
            // Percent signs that are not encodings: IIS `%u002e`, truncated escapes.
            ("/public/%u002e%u002e/admin", true),
            ("/public/%", true),
            ("/public/%2", true),
            ("/public/%zz", true),
            // Control characters.
            ("/public/%00/admin", true),
            ("/public/%0d%0a", true),
            ("/public/%7f", true),
            // Overlong UTF-8 for `.` and `/`: lax decoders map them to the ASCII character.
            ("/public/%c0%ae%c0%ae/admin", true),
            ("/public/%e0%80%ae", true),
            ("/public/%c0%af", true),
        ];
        assert!(cases.len() >= 40);
        for (path, refused) in cases {
            assert_eq!(ambiguous(path).is_some(), *refused, "{path}: {:?}", ambiguous(path));
        }
    }

    /// Reference normalisers, each written from the algorithm it names, over bytes.
    mod reference {
        /// Every `%XX` decoded (a malformed one kept as written).
        pub fn decode(p: &[u8]) -> Vec<u8> {
            let mut out = Vec::with_capacity(p.len());
            let mut i = 0;
            while i < p.len() {
                let hex = p.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
                match (p[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
                    (b'%', Some(b)) => {
                        out.push(b);
                        i += 3;
                    }
                    (c, _) => {
                        out.push(c);
                        i += 1;
                    }
                }
            }
            out
        }

        /// RFC 3986 §5.2.4 `remove_dot_segments`.
        pub fn remove_dot_segments(input: &[u8]) -> Vec<u8> {
            let (mut input, mut out) = (input.to_vec(), Vec::<u8>::new());
            let pop = |out: &mut Vec<u8>| {
                let cut = out.iter().rposition(|b| *b == b'/').unwrap_or(0);
                out.truncate(cut);
            };
            while !input.is_empty() {
                if input.starts_with(b"../") {
                    input.drain(..3);
                } else if input.starts_with(b"./") || input.starts_with(b"/./") {
                    input.drain(..2);
                } else if input == b"/." {
                    input = b"/".to_vec();
                } else if input.starts_with(b"/../") {
                    input.drain(..3);
                    pop(&mut out);
                } else if input == b"/.." {
                    input = b"/".to_vec();
                    pop(&mut out);
                } else if input == b"." || input == b".." {
                    input.clear();
                } else {
                    let start = usize::from(input[0] == b'/');
                    let end = input[start..].iter().position(|b| *b == b'/').map_or(input.len(), |e| e + start);
                    out.extend(input.drain(..end));
                }
            }
            out
        }

        /// nginx (`merge_slashes on`): decoded, slashes merged, dot segments resolved.
        pub fn nginx(p: &[u8]) -> Vec<u8> {
            let mut merged = decode(p);
            merged.dedup_by(|a, b| *a == b'/' && *b == b'/');
            remove_dot_segments(&merged)
        }

        /// Tomcat and Spring: `;` parameters dropped from each segment, then decoded and resolved.
        pub fn tomcat(p: &[u8]) -> Vec<u8> {
            let segments: Vec<&[u8]> =
                p.split(|b| *b == b'/').map(|s| s.split(|b| *b == b';').next().unwrap_or(s)).collect();
            remove_dot_segments(&decode(&segments.join(&b'/')))
        }

        /// IIS and Node routers: `\` read as `/`, then as nginx.
        pub fn iis(p: &[u8]) -> Vec<u8> {
            let slashed: Vec<u8> = decode(p).iter().map(|b| if *b == b'\\' { b'/' } else { *b }).collect();
            nginx(&slashed)
        }

        /// RFC 3986 normalisation of the path as written (dot segments on the raw form), then decoded: what a
        /// backend that routes on the raw path and an app that decodes later see.
        pub fn rfc3986(p: &[u8]) -> Vec<u8> {
            decode(&remove_dot_segments(p))
        }

        /// A second decoding pass (an app behind a decoding proxy).
        pub fn twice(p: &[u8]) -> Vec<u8> {
            decode(&decode(p))
        }
    }

    #[test]
    fn the_reference_normalisers_resolve_the_table_forms() {
        use reference::*;
        assert_eq!(remove_dot_segments(b"/a/b/c/./../../g"), b"/a/g");
        assert_eq!(remove_dot_segments(b"mid/content=5/../6"), b"mid/6");
        assert_eq!(nginx(b"/public/%2e%2e/admin"), b"/admin");
        assert_eq!(nginx(b"//admin"), b"/admin");
        assert_eq!(tomcat(b"/public/..;/admin"), b"/admin");
        assert_eq!(iis(b"/public\\..\\admin"), b"/admin");
        assert_eq!(twice(b"/public/%252e"), b"/public/.");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2048))]
        /// A path `ambiguous` lets through is read the same by every reference normaliser: as written, decoded.
        #[test]
        fn every_server_reads_an_unambiguous_path_as_written(
            parts in proptest::collection::vec(proptest::sample::select(vec![
                "/", ".", "..", ";", "a", "b", "~", "-", "%41", "%20", "%2e", "%2E", "%2f", "%2F", "%5c", "%25", "%3b",
                "%", "%4", "%zz", "\\", "%c0%ae", "%e2%82%ac", "%C3%A9", "%00", "%7f", "%u002e", ".a", "a.",
            ]), 0..12)
        ) {
            let path = format!("/{}", parts.concat());
            if ambiguous(&path).is_none() {
                let want = reference::decode(path.as_bytes());
                proptest::prop_assert!(std::str::from_utf8(&want).is_ok(), "{:?}", path);
                for (name, got) in [
                    ("nginx", reference::nginx(path.as_bytes())),
                    ("tomcat", reference::tomcat(path.as_bytes())),
                    ("iis", reference::iis(path.as_bytes())),
                    ("rfc3986", reference::rfc3986(path.as_bytes())),
                    ("twice", reference::twice(path.as_bytes())),
                ] {
                    proptest::prop_assert_eq!(&got, &want, "{} reads {:?} differently", name, path);
                }
            }
        }
    }
}
