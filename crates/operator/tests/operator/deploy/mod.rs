//! What ships besides the binary: the Helm chart and its rendering, the Argo CD health
//! check, the Dockerfile.

mod argocd;
mod chart;
mod dockerfile;
