//! The Data Productivity Cloud REST client: token cache, the environment connection override
//! endpoints, wire types, problem details and error classes. What the API documents and what
//! it leaves open is in `docs/dpc-api.md`; where it is open, this client accepts every
//! plausible variant.

pub mod client;
pub mod error;
pub mod limiter;
pub mod secret;
pub mod types;

pub use client::{
    AccountHandle, AccountKey, CallObserver, ClientSettings, Credentials, DpcClient, Endpoint,
    Place, Rate, WriteAnswer, WriteEffect, WriteObserver,
};
pub use error::{DpcError, ErrorClass, Operation};
pub use secret::SecretString;
pub use types::{OverrideRequest, OverrideValues, Problem, RemoteOverride};
