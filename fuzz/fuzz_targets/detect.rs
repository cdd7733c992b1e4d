//! Protocol detection on a connection's first bytes: never panics, and once bytes classify as HTTP/1 no prefix of
//! them is opaque (a slow sender cannot turn an HTTP request into opaque bytes that skip HTTP handling).
#![no_main]

use ferry::listen::detect::{Classification, Protocol, classify, partial_http1};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = classify(data);
    let _ = partial_http1(data);
    if whole == Classification::Known(Protocol::Http1) {
        for end in 0..data.len() {
            let prefix = &data[..end];
            assert_ne!(classify(prefix), Classification::Known(Protocol::Tcp), "{prefix:?} of an HTTP/1 request");
            if classify(prefix) == Classification::NeedMore && !prefix.is_empty() {
                assert!(partial_http1(prefix), "{prefix:?} of an HTTP/1 request is not partial HTTP/1");
            }
        }
    }
});
