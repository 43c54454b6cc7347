//! Compiles `proto/` with protox (pure Rust), so building needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = "../../proto";
    let file = "switchyard/routing/v1/routing.proto";
    println!("cargo:rerun-if-changed={proto_root}/{file}");
    let descriptors = protox::compile([file], [proto_root])?;
    tonic_prost_build::configure()
        // Holds a provider's secret: its Debug (lib.rs) never prints the value.
        .skip_debug(["switchyard.routing.v1.ProviderCredential"])
        // Ordered, so equal content encodes to equal bytes (versions are content hashes).
        .btree_map(".switchyard.routing.v1.Endpoint.labels")
        .compile_fds(descriptors)?;
    Ok(())
}
