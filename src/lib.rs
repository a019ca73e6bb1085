//! dpc-operator keeps Matillion Data Productivity Cloud environment connection overrides in
//! line with `ConnectionOverride` resources. The binary in `main.rs` is thin; everything it
//! runs lives here so tests reach it.

pub mod api;
