//! Compiles `proto/ferry/v1/*.proto` with protox (pure Rust: no system protoc) into prost messages and the tonic
//! client and server of the CSR service.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["ferry/v1/resources.proto", "ferry/v1/identity.proto"], ["proto"])?;
    // BTreeMap for `map<>` fields: the encoding is deterministic, so a resource's version can be a digest of its bytes.
    tonic_prost_build::configure().build_server(true).build_client(true).btree_map(".").compile_fds(fds)?;
    Ok(())
}
