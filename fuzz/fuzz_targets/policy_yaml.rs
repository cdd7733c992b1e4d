//! The policy and Service YAML documents (`ferryctl apply`, the proxy's file source): never panics, and what is
//! accepted reads back the same from its canonical JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(yaml) = std::str::from_utf8(data) else { return };
    let Ok(docs) = ferry_api::parse_documents(yaml) else { return };
    let json: Vec<serde_json::Value> = docs.iter().map(ferry_api::document_json).collect();
    let text = json.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("\n---\n");
    let again = ferry_api::parse_documents(&text).unwrap_or_else(|e| panic!("{text}\nwas accepted once, then: {e}"));
    let json_again: Vec<serde_json::Value> = again.iter().map(ferry_api::document_json).collect();
    assert_eq!(json, json_again);
});
