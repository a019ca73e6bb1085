//! The integration tests of the operator, one binary, one module per behaviour. Everything
//! that touches Kubernetes runs on the real kube-apiserver of the test run (see `common`).

mod common;

mod accounts;
mod adoption;
mod api_server;
mod binary;
mod claims;
mod client;
mod deletion;
mod deploy;
mod drift;
mod failures;
mod hostile;
mod kubectl;
mod rate_limit;
mod requests;
mod secrets;
mod soak;
mod writes;
