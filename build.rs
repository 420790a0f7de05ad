//! Compiles the protos with the protoc vendored from crates.io, so a fresh
//! machine needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY-free: build scripts are single-threaded, setting the variable
    // only affects this process and its children (prost-build runs protoc).
    std::env::set_var("PROTOC", protoc);

    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // Invalid UTF-8 in a string field answered INVALID_ARGUMENT (src/codec.rs).
        .codec_path("crate::codec::Codec")
        // Its batch stays encoded, for the node to read (src/pb.rs).
        .extern_path(".seqd.v1.NextStreamRequest", "crate::pb::NextStreamRequest")
        .file_descriptor_set_path(out_dir.join("seqd_descriptor.bin"))
        .compile_protos(
            &[
                "proto/seqd/v1/api.proto",
                "proto/seqd/v1/peer.proto",
                "proto/seqd/v1/state.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
