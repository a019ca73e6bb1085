//! Prints the CustomResourceDefinitions of dpc-operator as YAML; `crds/` holds its output.
fn main() {
    print!("{}", dpc_operator::api::crds_yaml());
}
