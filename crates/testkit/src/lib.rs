//! Test doubles that speak real HTTP, used by the tests, the sandbox and the benchmarks:
//! a DPC simulator and a Kubernetes API emulator (no cluster and no DPC account needed), and
//! the harness that runs a real control plane (kube-apiserver, etcd) for the tests.

pub mod control_plane;
pub mod dpc;
pub mod kube;

/// Installs rustls' ring crypto provider for the process (kube and reqwest share it).
/// Calling it again is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
