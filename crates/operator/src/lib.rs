//! dpc-operator keeps Matillion Data Productivity Cloud environment connection overrides in
//! line with `ConnectionOverride` resources. The binary in `main.rs` is thin; everything it
//! runs lives here so tests reach it.

pub use dpc_operator_api as api;

pub(crate) mod accounts;
pub mod admin;
pub(crate) mod claims;
pub mod config;
pub mod context;
pub mod controller;
pub mod dpc;
pub(crate) mod drift;
pub(crate) mod index;
pub(crate) mod key;
pub mod leader;
pub mod metrics;
pub(crate) mod reconcile;
#[cfg(feature = "sandbox")]
pub mod sandbox;
pub mod telemetry;

/// Installs rustls' ring crypto provider for the process (kube and reqwest share it).
/// Calling it again is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
