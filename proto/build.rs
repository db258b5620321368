//! Generates the tonic client and server for `proto/mesh/v1/registry.proto` (needs `protoc`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure().compile_protos(&["proto/mesh/v1/registry.proto"], &["proto"])?;
    Ok(())
}
