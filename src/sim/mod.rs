//! Test doubles that speak real HTTP, used by the tests, the sandbox and the benchmarks:
//! a DPC simulator and a Kubernetes API emulator (no cluster and no DPC account needed), and
//! the harness that runs a real control plane (kube-apiserver, etcd) for the tests.

pub mod dpc;

pub mod kube;

pub mod control_plane;
