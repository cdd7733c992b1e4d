//! Compiles `proto/ferry/v1/*.proto` with protox (pure Rust: no system protoc) into prost messages.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["ferry/v1/resources.proto"], ["proto"])?;
    // BTreeMap for `map<>` fields: the encoding is deterministic, so a resource's version can be a digest of its bytes.
    tonic_prost_build::configure().build_server(false).build_client(false).btree_map(".").compile_fds(fds)?;
    Ok(())
}
