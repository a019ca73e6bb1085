//! What only a real kube-apiserver can show: the CRDs install (structural schemas, CEL rules
//! that compile within their cost limits) and refuse invalid objects with the schema's and the
//! rules' messages; the Helm chart installs, upgrades and uninstalls; the plain manifests and
//! the quickstart apply. kubectl and helm, the clients users run, drive it all.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;
use dpc_testkit::control_plane::{self, ControlPlane, Endpoint};

/// Runs kubectl or helm with a kubeconfig; returns (exit code, stdout, stderr).
fn run(
    program: &Path,
    kubeconfig: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> (i32, String, String) {
    use std::io::Write;
    let mut child = Command::new(program)
        .env("KUBECONFIG", kubeconfig)
        .args(args)
        .current_dir(
            std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR for tests")
                + "/../..",
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e}", program.display()));
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let output = child.wait_with_output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

struct Cli {
    kubeconfig: PathBuf,
}

impl Cli {
    fn for_endpoint(endpoint: &Endpoint) -> Self {
        Self {
            kubeconfig: endpoint.kubeconfig.clone(),
        }
    }

    fn kubectl(&self, args: &[&str]) -> String {
        self.kubectl_in(args, None)
    }

    fn kubectl_in(&self, args: &[&str], stdin: Option<&str>) -> String {
        let (code, out, err) = run(Path::new("kubectl"), &self.kubeconfig, args, stdin);
        assert_eq!(code, 0, "kubectl {} failed:\n{err}\n{out}", args.join(" "));
        out
    }

    /// kubectl that must fail; returns what it printed on stderr.
    fn kubectl_refused(&self, args: &[&str], stdin: &str) -> String {
        let (code, out, err) = run(Path::new("kubectl"), &self.kubeconfig, args, Some(stdin));
        assert_ne!(code, 0, "kubectl {} succeeded:\n{out}", args.join(" "));
        err
    }

    /// Every object of a Helm release exists (`kubectl get -f` fails on any missing one),
    /// among them `expected`.
    fn assert_release_created(&self, release: &str, namespace: &str, expected: &[&str]) {
        let manifest = self.helm(&["get", "manifest", release, "-n", namespace]);
        let listed = self.kubectl_in(&["get", "-f", "-", "-o", "name"], Some(&manifest));
        for object in expected {
            assert!(listed.contains(object), "{object} not created:\n{listed}");
        }
    }

    fn helm(&self, args: &[&str]) -> String {
        let (code, out, err) = run(&tools::tool("helm"), &self.kubeconfig, args, None);
        assert_eq!(code, 0, "helm {} failed:\n{err}\n{out}", args.join(" "));
        out
    }
}

fn cov(namespace: &str, name: &str, spec_tail: &str) -> String {
    format!(
        "apiVersion: dpc-operator.io/v1alpha1\nkind: ConnectionOverride\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  accountRef: {{name: acct}}\n  environmentName: PROD\n  connectionName: Salesforce\n{spec_tail}"
    )
}

const PROPERTIES: &str =
    "  connectionOverrides:\n    connectionProperties: {secretName: prod/sf}\n";

#[tokio::test]
async fn the_crds_install_and_the_api_server_refuses_invalid_objects() {
    let cluster = control_plane::shared().await;
    assert_eq!(cluster.version, "v1.36.3", "the API server of the run");
    let k = Cli::for_endpoint(cluster);
    let out = k.kubectl(&["apply", "--server-side", "--force-conflicts", "-f", "crds/"]);
    for kind in ["connectionoverrides", "dpcaccounts", "clusterdpcaccounts"] {
        assert!(
            out.contains(&format!("{kind}.dpc-operator.io serverside-applied")),
            "{out}"
        );
    }
    k.kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/connectionoverrides.dpc-operator.io",
        "crd/dpcaccounts.dpc-operator.io",
        "crd/clusterdpcaccounts.dpc-operator.io",
        "--timeout=30s",
    ]);
    let ns = unique_name("admission-");
    k.kubectl(&["create", "namespace", &ns]);
    let uuid = "  projectId: 3c90c3cc-0d44-4b50-8888-8dd25736052a\n";
    let apply = ["apply", "-f", "-"];

    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "a projectId that is not a UUID",
            cov(
                &ns,
                "bad-uuid",
                &format!("  projectId: not-a-uuid\n{PROPERTIES}"),
            ),
            vec![
                "The ConnectionOverride \"bad-uuid\" is invalid",
                "spec.projectId: Invalid value: \"not-a-uuid\": spec.projectId in body should match",
            ],
        ),
        (
            "an unknown authType",
            cov(
                &ns,
                "bad-enum",
                &format!("{uuid}  authType: FOO\n{PROPERTIES}"),
            ),
            vec!["spec.authType: Unsupported value: \"FOO\": supported values: \"GENERIC_SECRET\""],
        ),
        (
            "both secretKeyRef and configMapKeyRef",
            cov(
                &ns,
                "both-refs",
                &format!(
                    "{uuid}  connectionOverrides:\n    connectionPropertiesFrom:\n    - property: secretKey\n      secretKeyRef: {{name: s, key: k}}\n      configMapKeyRef: {{name: c, key: k}}\n"
                ),
            ),
            vec!["exactly one of secretKeyRef and configMapKeyRef must be set"],
        ),
        (
            "neither secretKeyRef nor configMapKeyRef",
            cov(
                &ns,
                "no-ref",
                &format!(
                    "{uuid}  connectionOverrides:\n    connectionPropertiesFrom:\n    - property: secretKey\n"
                ),
            ),
            vec!["exactly one of secretKeyRef and configMapKeyRef must be set"],
        ),
        (
            "a property named twice",
            cov(
                &ns,
                "twice",
                &format!(
                    "{uuid}  connectionOverrides:\n    connectionProperties: {{secretKey: x}}\n    connectionPropertiesFrom:\n    - property: secretKey\n      secretKeyRef: {{name: s, key: k}}\n"
                ),
            ),
            vec![
                "a property may not be set both in connectionProperties and in connectionPropertiesFrom",
            ],
        ),
        (
            "a syncInterval under 30s",
            cov(
                &ns,
                "fast",
                &format!("{uuid}  syncInterval: 5s\n{PROPERTIES}"),
            ),
            vec!["spec.syncInterval: Invalid value: \"5s\": syncInterval must be at least 30s"],
        ),
        (
            "a syncInterval over 24h",
            cov(
                &ns,
                "slow",
                &format!("{uuid}  syncInterval: 25h\n{PROPERTIES}"),
            ),
            vec!["spec.syncInterval: Invalid value: \"25h\": syncInterval must be at most 24h"],
        ),
        (
            "a deletionTimeout no clock can hold",
            cov(
                &ns,
                "forever",
                &format!("{uuid}  deletionTimeout: 9999999999999999h\n{PROPERTIES}"),
            ),
            vec![
                "spec.deletionTimeout: Invalid value: \"string\": type conversion error",
                "evaluating rule: deletionTimeout must be at most 8760h",
            ],
        ),
        (
            "a deletionTimeout over a year",
            cov(
                &ns,
                "long",
                &format!("{uuid}  deletionTimeout: 8761h\n{PROPERTIES}"),
            ),
            vec!["deletionTimeout must be at most 8760h"],
        ),
        (
            "a connection name with a comma",
            cov(&ns, "comma", &format!("{uuid}{PROPERTIES}"))
                .replace("connectionName: Salesforce", "connectionName: 'Sales, EU'"),
            vec![
                "spec.connectionName: Invalid value: \"Sales, EU\": connectionName may not contain a comma",
            ],
        ),
    ];
    for (what, manifest, messages) in &cases {
        let err = k.kubectl_refused(&apply, manifest);
        for message in messages {
            assert!(err.contains(message), "{what}: {message:?} not in:\n{err}");
        }
    }

    // Immutable fields: created valid, then each key field changed.
    k.kubectl_in(
        &apply,
        Some(&cov(&ns, "keyed", &format!("{uuid}{PROPERTIES}"))),
    );
    for (field, value, message) in [
        (
            "projectId",
            "4c90c3cc-0d44-4b50-8888-8dd25736052a",
            "projectId is immutable",
        ),
        ("environmentName", "DEV", "environmentName is immutable"),
        ("connectionName", "Other", "connectionName is immutable"),
    ] {
        let patch = format!("{{\"spec\":{{\"{field}\":\"{value}\"}}}}");
        let err = k.kubectl_refused(
            &[
                "patch",
                "cov",
                "keyed",
                "-n",
                &ns,
                "--type=merge",
                "-p",
                &patch,
            ],
            "",
        );
        assert!(
            err.contains(&format!(
                "spec.{field}: Invalid value: \"{value}\": {message}"
            )),
            "{field}: {err}"
        );
    }
    // An account needs a region or an apiUrl.
    let account = format!(
        "apiVersion: dpc-operator.io/v1alpha1\nkind: DpcAccount\nmetadata: {{name: acct, namespace: {ns}}}\nspec:\n  credentialsSecretRef: {{name: creds}}\n"
    );
    let err = k.kubectl_refused(&apply, &account);
    assert!(
        err.contains("one of region and apiUrl is required"),
        "{err}"
    );
    k.kubectl(&["delete", "namespace", &ns, "--wait=false"]);
}

/// A cluster of the test's own: Helm installs the CRDs, which the shared API server of the run
/// already has (Helm refuses to adopt objects it did not create).
#[tokio::test]
async fn helm_installs_upgrades_and_uninstalls_the_chart_and_keeps_the_crds_and_objects() {
    let plane = ControlPlane::start(None).await.expect("a control plane");
    let k = Cli::for_endpoint(&plane.endpoint);
    let chart = "deploy/helm/dpc-operator";

    // Default values.
    k.helm(&[
        "install",
        "dpc-operator",
        chart,
        "-n",
        "dpc-operator",
        "--create-namespace",
        "--wait=false",
    ]);
    k.assert_release_created(
        "dpc-operator",
        "dpc-operator",
        &[
            "customresourcedefinition.apiextensions.k8s.io/connectionoverrides.dpc-operator.io",
            "deployment.apps/dpc-operator",
            "serviceaccount/dpc-operator",
            "clusterrole.rbac.authorization.k8s.io/dpc-operator",
            "clusterrolebinding.rbac.authorization.k8s.io/dpc-operator",
            "service/dpc-operator",
        ],
    );
    k.kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/connectionoverrides.dpc-operator.io",
        "--timeout=30s",
    ]);
    let quickstart = k.kubectl(&["apply", "-f", "deploy/examples/quickstart.yaml"]);
    assert!(
        quickstart.contains("connectionoverride.dpc-operator.io/salesforce-prod created"),
        "{quickstart}"
    );

    // An upgrade with a changed value reaches the Deployment.
    k.helm(&[
        "upgrade",
        "dpc-operator",
        chart,
        "-n",
        "dpc-operator",
        "--set",
        "concurrency=3",
        "--wait=false",
    ]);
    let env = k.kubectl(&[
        "get",
        "deployment",
        "dpc-operator",
        "-n",
        "dpc-operator",
        "-o",
        "jsonpath={.spec.template.spec.containers[0].env[?(@.name==\"DPC_OPERATOR_CONCURRENCY\")].value}",
    ]);
    assert_eq!(env, "3");

    // Uninstall: the operator goes, the CRDs and every ConnectionOverride stay.
    k.helm(&[
        "uninstall",
        "dpc-operator",
        "-n",
        "dpc-operator",
        "--wait=false",
    ]);
    let (code, _, err) = run(
        Path::new("kubectl"),
        &k.kubeconfig,
        &["get", "deployment", "dpc-operator", "-n", "dpc-operator"],
        None,
    );
    assert_ne!(code, 0);
    assert!(err.contains("NotFound"), "{err}");
    let covs = k.kubectl(&["get", "cov", "-n", "data-platform", "-o", "name"]);
    assert!(
        covs.contains("salesforce-prod") && covs.contains("warehouse-password-prod"),
        "{covs}"
    );
    k.kubectl(&["get", "crd", "connectionoverrides.dpc-operator.io"]);

    // The plain manifests apply over what is left.
    let applied = k.kubectl(&["apply", "-f", "deploy/manifests/dpc-operator.yaml"]);
    assert!(
        applied.contains("deployment.apps/dpc-operator created"),
        "{applied}"
    );

    // The production-like values: two replicas, Roles in two namespaces, the Prometheus
    // Operator's kinds (their CRDs stand in for an installed Prometheus Operator).
    k.kubectl(&["create", "namespace", "analytics"]);
    k.kubectl_in(&["apply", "-f", "-"], Some(&prometheus_operator_crds()));
    k.kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/servicemonitors.monitoring.coreos.com",
        "crd/prometheusrules.monitoring.coreos.com",
        "--timeout=30s",
    ]);
    k.helm(&[
        "install",
        "dpc-ha",
        chart,
        "-n",
        "dpc-ha",
        "--create-namespace",
        "-f",
        "deploy/helm/test-values/ha-namespaced.yaml",
        "--set",
        "crds.install=false",
        "--wait=false",
    ]);
    k.assert_release_created(
        "dpc-ha",
        "dpc-ha",
        &[
            "deployment.apps/dpc-ha-dpc-operator",
            "role.rbac.authorization.k8s.io/dpc-ha-dpc-operator-leader-election",
            "servicemonitor.monitoring.coreos.com/dpc-ha-dpc-operator",
            "prometheusrule.monitoring.coreos.com/dpc-ha-dpc-operator",
            "networkpolicy.networking.k8s.io/dpc-ha-dpc-operator",
            "poddisruptionbudget.policy/dpc-ha-dpc-operator",
        ],
    );
    let roles = k.kubectl(&[
        "get",
        "role",
        "-A",
        "-o",
        "custom-columns=NS:.metadata.namespace",
        "--no-headers",
    ]);
    for ns in ["data-platform", "analytics"] {
        assert!(
            roles.lines().any(|l| l.trim() == ns),
            "no Role in {ns}:\n{roles}"
        );
    }
    k.helm(&["uninstall", "dpc-ha", "-n", "dpc-ha", "--wait=false"]);
}

/// The two Prometheus Operator kinds the chart can create, with open schemas: enough for the
/// API server to accept them, as on a cluster that runs the Prometheus Operator.
fn prometheus_operator_crds() -> String {
    [
        ("ServiceMonitor", "servicemonitor"),
        ("PrometheusRule", "prometheusrule"),
    ]
    .iter()
    .map(|(kind, singular)| {
        format!(
            "apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {{name: {singular}s.monitoring.coreos.com}}
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {{kind: {kind}, plural: {singular}s, singular: {singular}, listKind: {kind}List}}
  versions:
  - name: v1
    served: true
    storage: true
    schema: {{openAPIV3Schema: {{type: object, x-kubernetes-preserve-unknown-fields: true}}}}
"
        )
    })
    .collect::<Vec<_>>()
    .join("---\n")
}
