//! Generates a gRPC client for seqd's public API from the repository's proto,
//! so the bench does not depend on the `seqd` crate (and on RocksDB).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // protoc comes from crates.io: a fresh machine needs no system protoc.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // Build scripts run single-threaded; the variable reaches only this
    // process and the protoc it starts.
    std::env::set_var("PROTOC", protoc);

    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(&["../proto/seqd/v1/api.proto"], &["../proto"])?;
    println!("cargo:rerun-if-changed=../proto/seqd/v1/api.proto");
    Ok(())
}
