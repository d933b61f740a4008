// Compiles proto/ with protox (a pure-Rust protobuf compiler), so no system `protoc` is needed.
// The same protos generate both infergate's server and its Triton client.
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/grpc_service.proto",
        "proto/model_config.proto",
        "proto/tasks.proto",
        "proto/externalscaler.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    // Reflection and proto→JSON need the descriptors of everything we serve.
    std::fs::write(
        out.join("inference_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}
