//! Generates prost messages and tonic services from `proto/` with protox:
//! no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/raft.proto",
        "proto/transport.proto",
        "proto/admin.proto",
        "proto/objects.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        // Block frames and entries are large: share buffers instead of copying.
        .bytes(".lifeboat.raft")
        .compile_fds(descriptors)?;
    Ok(())
}
