//! Prints the CustomResourceDefinitions of dpc-operator as YAML; `crds/crds.yaml` holds its
//! output. With `--helm` it prints the Helm chart's CRD template instead (kept on uninstall,
//! installed when `crds.install` is true); the chart holds that output.
fn main() {
    let helm = std::env::args().skip(1).any(|a| a == "--helm");
    if helm {
        print!("{}", dpc_operator_api::crds_helm_template());
    } else {
        print!("{}", dpc_operator_api::crds_yaml());
    }
}
