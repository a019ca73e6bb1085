//! Test doubles that speak real HTTP, used by the tests, the sandbox and the benchmarks:
//! a DPC simulator and a Kubernetes API emulator. No cluster and no DPC account are needed.

pub mod dpc;

pub mod kube;
