//! xDS resources as a proxy unpacks them (`ferry_api::protocol::decode`: the `ferry.v1` Service, TrafficPolicy,
//! AuthorizationPolicy, RouteSet, TrustBundle and Workload messages): never panics, and what is accepted packs back to a
//! resource that unpacks the same. Input: a length byte, the resource's name, then a `google.protobuf.Any`.
#![no_main]

use envoy_types::pb::google::protobuf::Any;
use ferry_api::protocol::{Received, decode, encode, encode_mesh, encode_routes, encode_workload};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&len, rest)) = data.split_first() else { return };
    let Some((name, any)) = rest.split_at_checked(usize::from(len).min(rest.len())) else { return };
    let (Ok(name), Ok(any)) = (std::str::from_utf8(name), Any::decode(any)) else { return };
    let Ok(received) = decode(name, &any) else { return };
    let packed = match &received {
        Received::Document(doc) => encode(doc).expect("a received document has a resource form"),
        Received::Mesh(mesh) => encode_mesh(mesh),
        Received::Workload(workload) => encode_workload(workload),
        Received::Routes(set) => encode_routes(set),
    };
    assert_eq!(decode(name, &packed).as_ref(), Ok(&received), "{name}");
});
