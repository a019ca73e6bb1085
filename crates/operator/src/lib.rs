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
pub mod import;
pub(crate) mod index;
pub(crate) mod intern;
pub(crate) mod key;
pub mod leader;
pub mod metrics;
pub(crate) mod reconcile;
#[cfg(feature = "sandbox")]
pub mod sandbox;
pub mod stored;
pub mod telemetry;
pub mod watch;

/// Installs rustls' ring crypto provider for the process (kube and reqwest share it).
/// Calling it again is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A Kubernetes client from `kubeconfig`, or from the usual places ($KUBECONFIG,
/// ~/.kube/config, the in-cluster configuration).
pub async fn kube_client(kubeconfig: Option<&std::path::PathBuf>) -> Result<kube::Client, String> {
    install_crypto_provider();
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("reading {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(|e| format!("using {}: {e}", path.display()))?
        }
        None => kube::Config::infer().await.map_err(|e| {
            format!("no Kubernetes configuration found (kubeconfig or in-cluster): {e}")
        })?,
    };
    kube::Client::try_from(config).map_err(|e| format!("building the Kubernetes client: {e}"))
}

/// Every object `api` lists, page by page (500 a page), so a large cluster is never held
/// in one answer.
pub(crate) async fn list_all_pages<K>(api: &kube::Api<K>) -> Result<Vec<K>, kube::Error>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut items = Vec::new();
    let mut params = kube::api::ListParams::default().limit(500);
    loop {
        let page = api.list(&params).await?;
        items.extend(page.items);
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(items),
        }
    }
}
