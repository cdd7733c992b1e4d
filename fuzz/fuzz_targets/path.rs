//! Path ambiguity: never panics, and a path it lets through decodes to UTF-8 with no dot segment, separator or `%`
//! that decoding would add.
#![no_main]

use ferry::policy::path::ambiguous;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else { return };
    if ambiguous(path).is_some() {
        return;
    }
    let mut decoded = Vec::new();
    let mut bytes = path.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex: Vec<u8> = bytes.by_ref().take(2).collect();
            let text = std::str::from_utf8(&hex).expect("a passed path has two hex digits after each %");
            decoded.push(u8::from_str_radix(text, 16).expect("two hex digits"));
        } else {
            decoded.push(b);
        }
    }
    let decoded = String::from_utf8(decoded).expect("a passed path decodes to UTF-8");
    for segment in decoded.split('/') {
        assert!(segment != "." && segment != "..", "{path:?} decodes to a dot segment");
    }
    assert_eq!(decoded.matches('/').count(), path.matches('/').count(), "{path:?}: decoding added a separator");
    assert!(!decoded.contains(['\\', ';', '%']), "{path:?} decodes to {decoded:?}");
});
