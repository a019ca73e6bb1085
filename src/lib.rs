//! dpc-operator keeps Matillion Data Productivity Cloud environment connection overrides in
//! line with `ConnectionOverride` resources. The binary in `main.rs` is thin; everything it
//! runs lives here so tests reach it.

pub mod api;
pub mod dpc;

/// Installs rustls' ring crypto provider for the process (kube and reqwest share it).
/// Calling it again is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
pub mod admin;
pub mod bench;
pub mod claims;
pub mod controller;
pub mod drift;
pub mod duration;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod reconcile;
pub mod sandbox;
pub mod sim;
pub mod soak;
pub mod telemetry;
