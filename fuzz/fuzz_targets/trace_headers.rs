//! Trace context extraction (W3C and both B3 forms) from header values: never panics, and a context read from a
//! request reads back the same from the headers Ferry writes for the next hop.
#![no_main]

use ferry::telemetry::trace::{B3, B3_SPAN_ID, B3_TRACE_ID, TRACEPARENT, child, extract, inject};
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Up to four header values, split on newlines, to the four names extraction reads.
    let mut headers = HeaderMap::new();
    for (name, value) in [TRACEPARENT, B3, B3_TRACE_ID, B3_SPAN_ID].into_iter().zip(data.split(|b| *b == b'\n')) {
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.append(name, value);
        }
    }
    let (parent, formats) = extract(&headers);
    let next = child(parent.as_ref(), 0.5, 0.25, [7u8; 24]);
    inject(&mut headers, &next, parent.map(|p| p.span_id), formats);
    assert_eq!(extract(&headers).0, Some(next), "{headers:?}");
    if let Some(p) = parent {
        assert_eq!((next.trace_id, next.sampled), (p.trace_id, p.sampled));
    }
});
