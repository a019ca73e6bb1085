//! `dpc-operator import`: reads the environment connection overrides a DPC project already
//! holds and prints one ConnectionOverride per override, as YAML a team can commit. Applied
//! as printed, every object is `Ready` without a single write to DPC (ObserveOnly, or Manage:
//! an object's first pass adopts an override that already holds its spec as it is).
//!
//! Progress and problems go to stderr, the YAML alone to stdout. Exit codes: see [`Failure`].

mod cluster;
mod render;
mod yaml;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use crate::api::duration::parse_duration;
use crate::api::{AccountKind, CredentialsSecretRef, DpcAccountSpec, Region};
use crate::dpc::{
    AccountHandle, AccountKey, ClientSettings, Credentials, DpcClient, DpcError, Endpoint,
    ErrorClass, Rate, SecretString,
};

pub use render::{Found, Options, Rendered, object_names};

/// Where credentials come from when `--from-account` is not given.
pub const CLIENT_ID_ENV: &str = "DPC_CLIENT_ID";
/// The client secret's environment variable.
pub const CLIENT_SECRET_ENV: &str = "DPC_CLIENT_SECRET";

#[derive(Args, Clone, Debug)]
#[command(after_help = "\
Credentials come from DPC_CLIENT_ID and DPC_CLIENT_SECRET, or with --from-account from a
DpcAccount and its Secret in the cluster of the current kubeconfig (its region, URLs and
account id are used too).

Every value printed is what DPC holds, as a literal, whoever wrote it there: review the
output before committing it. With --from-account, overrides a ConnectionOverride in that
cluster already names are not printed (each is named on stderr) — unless that object is an
earlier import's output, applied as printed — and --with-account refuses to print a
DpcAccount or Secret that exists there.

Exit codes: 0 imported; 1 DPC failed or answered something unreadable; 2 wrong arguments,
no credentials, or an endpoint that is refused; 3 the Kubernetes side of --from-account;
4 DPC refused the credentials; 5 the project or an environment does not exist; 6 some
overrides cannot be described by a ConnectionOverride (named on stderr; the rest printed).")]
pub struct ImportArgs {
    /// The DPC project id (a lower-case UUID).
    #[arg(long, short = 'p')]
    pub project: String,
    /// Import only this environment (repeatable); default: every environment of the project.
    #[arg(long = "environment", short = 'e')]
    pub environments: Vec<String>,
    /// metadata.namespace of the objects (default: the --from-account namespace, else none).
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// The account the objects use: NAME, DpcAccount/NAME or ClusterDpcAccount/NAME
    /// (default: the --from-account name, else dpc-account).
    #[arg(long)]
    pub account_ref: Option<String>,
    /// managementPolicy Manage instead of ObserveOnly.
    #[arg(long)]
    pub manage: bool,
    /// Also print the DpcAccount and a Secret stub with placeholders for its credentials.
    #[arg(long)]
    pub with_account: bool,
    /// Call DPC as this DpcAccount (NAMESPACE/NAME) of the current kubeconfig's cluster.
    #[arg(long, conflicts_with_all = ["region", "api_url", "token_url", "audience", "account_id"])]
    pub from_account: Option<String>,
    /// A kubeconfig file for --from-account; default: $KUBECONFIG or ~/.kube/config.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The DPC region: eu1 or us1.
    #[arg(long, value_parser = ["eu1", "us1"])]
    pub region: Option<String>,
    /// The API base URL, instead of the region's.
    #[arg(long)]
    pub api_url: Option<String>,
    /// The OAuth2 token endpoint.
    #[arg(long)]
    pub token_url: Option<String>,
    /// The audience of the token request.
    #[arg(long)]
    pub audience: Option<String>,
    /// The DPC account id, sent as the account-id header.
    #[arg(long)]
    pub account_id: Option<String>,
    /// The hosts the API and token URLs may name, comma-separated (as the operator's flag).
    #[arg(long, value_delimiter = ',', default_value = "*.matillion.com")]
    pub dpc_allowed_hosts: Vec<String>,
    /// Allow plain-http URLs (the sandbox's simulator; never a real account).
    #[arg(long)]
    pub allow_insecure_http: bool,
    /// Timeout of one DPC request.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// Why an import failed; each has its exit code.
#[derive(Debug)]
pub enum Failure {
    /// 1: DPC failed, or answered something unreadable.
    Dpc(String),
    /// 2: the arguments, the credentials' absence, or a refused endpoint.
    Usage(String),
    /// 3: reading the account from the cluster.
    Kube(String),
    /// 4: DPC refused the credentials.
    Credentials(String),
    /// 5: the project or an environment does not exist.
    NotFound(String),
}

impl Failure {
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Dpc(_) => 1,
            Failure::Usage(_) => 2,
            Failure::Kube(_) => 3,
            Failure::Credentials(_) => 4,
            Failure::NotFound(_) => 5,
        }
    }

    fn message(&self) -> &str {
        match self {
            Failure::Dpc(m)
            | Failure::Usage(m)
            | Failure::Kube(m)
            | Failure::Credentials(m)
            | Failure::NotFound(m) => m,
        }
    }
}

/// Some overrides were left out of the output.
const SKIPPED_EXIT: u8 = 6;

/// Runs the command: YAML on stdout, progress on stderr.
pub async fn command(args: ImportArgs) -> ExitCode {
    crate::install_crypto_provider();
    match import(&args).await {
        Ok((text, rendered)) => {
            print!("{text}");
            for note in &rendered.notes {
                eprintln!("note: {note}");
            }
            for skipped in &rendered.already {
                eprintln!("not imported (already in the cluster): {skipped}");
            }
            for skipped in &rendered.skipped {
                eprintln!("not imported: {skipped}");
            }
            let printed = rendered.documents.len();
            eprintln!(
                "printed {printed} object(s){}",
                if rendered.skipped.is_empty() {
                    String::new()
                } else {
                    format!("; {} override(s) not imported", rendered.skipped.len())
                }
            );
            if rendered.skipped.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(SKIPPED_EXIT)
            }
        }
        Err(failure) => {
            eprintln!("dpc-operator import: {}", failure.message());
            ExitCode::from(failure.exit_code())
        }
    }
}

/// The whole import: the YAML text, and what went into it.
pub async fn import(args: &ImportArgs) -> Result<(String, Rendered), Failure> {
    let (project, account_ref) = checked_arguments(args)?;
    let settings = ClientSettings {
        allow_insecure_http: args.allow_insecure_http,
        request_timeout: args.timeout,
        // A command waits for its turn rather than giving up.
        max_admission_wait: Duration::from_secs(600),
        allowed_hosts: args.dpc_allowed_hosts.clone(),
        ..ClientSettings::default()
    };
    let source = account_source(args, &settings).await?;
    let namespace = args.namespace.clone().or(source.namespace.clone());
    if args.with_account
        && let Some(client) = &source.cluster
    {
        let secret = render::account_secret_name(&account_ref.name);
        let ns = namespace.as_deref().unwrap_or("default");
        cluster::refuse_replacing(client, ns, &account_ref.name, &secret).await?;
    }
    let client = DpcClient::new(settings);
    let handle = client.account(
        source.key.clone(),
        source.endpoint.clone(),
        source.credentials,
        source.rate,
    );
    eprintln!(
        "importing project {project} from {} (credentials from {})",
        source.endpoint.api_url, source.origin
    );
    let mut found = read_overrides(&handle, project, &args.environments, &source.origin).await?;
    let already = match &source.cluster {
        Some(client) => {
            let ns = namespace.as_deref().unwrap_or("default");
            let api = source.endpoint.api_url.as_str();
            cluster::drop_named(client, project, ns, api, &mut found).await?
        }
        None => Vec::new(),
    };
    let options = Options {
        project_id: project.to_string(),
        namespace,
        account: account_ref.clone(),
        manage: args.manage,
    };
    let mut rendered = render::overrides(&found, &options);
    rendered.already = already;
    let mut documents = Vec::new();
    if args.with_account {
        let spec = source.spec;
        documents.extend(render::account(
            &account_ref.name,
            options.namespace.as_deref(),
            &spec,
        ));
    }
    documents.append(&mut rendered.documents);
    let text = format!("{}{}", header(project, &found), yaml::stream(&documents));
    rendered.documents = documents;
    Ok((text, rendered))
}

/// The project id and the account reference, once the arguments are found sound.
fn checked_arguments(args: &ImportArgs) -> Result<(&str, crate::api::AccountRef), Failure> {
    let project = args.project.trim();
    if !is_project_id(project) {
        return Err(Failure::Usage(format!(
            "--project {project:?} is not a DPC project id (a lower-case UUID such as 3c90c3cc-0d44-4b50-8888-8dd25736052a)"
        )));
    }
    if let Some(namespace) = &args.namespace
        && (namespace.len() > 63 || namespace.contains('.') || !render::is_dns_subdomain(namespace))
    {
        return Err(Failure::Usage(format!(
            "--namespace {namespace:?} is not a valid namespace name (a DNS-1123 label: lower-case letters, digits and '-')"
        )));
    }
    let account_ref = match &args.account_ref {
        Some(text) => render::account_ref(text).map_err(Failure::Usage)?,
        None => render::account_ref(&default_account_name(args)).map_err(Failure::Usage)?,
    };
    if args.with_account && account_ref.kind == Some(AccountKind::ClusterDpcAccount) {
        return Err(Failure::Usage(
            "--with-account prints a DpcAccount; it cannot go with --account-ref ClusterDpcAccount/…".into(),
        ));
    }
    Ok((project, account_ref))
}

/// What the CRD's `PROJECT_ID_PATTERN` accepts: 8-4-4-4-12 lower-case hexadecimal digits.
fn is_project_id(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.len() == 5
        && groups.iter().zip([8, 4, 4, 4, 12]).all(|(g, n)| {
            g.len() == n
                && g.chars()
                    .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        })
}

fn default_account_name(args: &ImportArgs) -> String {
    args.from_account
        .as_deref()
        .and_then(|a| a.split_once('/'))
        .map(|(_, name)| name.to_string())
        .unwrap_or_else(|| "dpc-account".into())
}

fn header(project: &str, found: &[Found]) -> String {
    let environments: BTreeSet<&str> = found.iter().map(|f| f.environment.as_str()).collect();
    format!(
        "# Printed by `dpc-operator import --project {project}`: the environment connection\n# overrides DPC holds ({} in {} environment(s)). The same DPC state prints the same bytes.\n",
        found.len(),
        environments.len()
    )
}

/// The account the import calls DPC as.
struct Source {
    key: AccountKey,
    endpoint: Endpoint,
    credentials: Credentials,
    rate: Rate,
    /// The account spec, for `--with-account` (credentials reference replaced there).
    spec: DpcAccountSpec,
    /// Where the credentials came from, for messages.
    origin: String,
    /// The namespace of `--from-account`.
    namespace: Option<String>,
    /// The cluster of `--from-account`.
    cluster: Option<kube::Client>,
}

async fn account_source(args: &ImportArgs, settings: &ClientSettings) -> Result<Source, Failure> {
    if let Some(reference) = &args.from_account {
        return from_cluster(args, reference, settings).await;
    }
    let read = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let (Some(id), Some(secret)) = (read(CLIENT_ID_ENV), read(CLIENT_SECRET_ENV)) else {
        return Err(Failure::Usage(format!(
            "no credentials: set {CLIENT_ID_ENV} and {CLIENT_SECRET_ENV}, or use --from-account NAMESPACE/NAME"
        )));
    };
    let spec = DpcAccountSpec {
        region: args.region.as_deref().map(|r| match r {
            "us1" => Region::Us1,
            _ => Region::Eu1,
        }),
        api_url: args.api_url.clone(),
        token_url: args.token_url.clone(),
        audience: args.audience.clone(),
        // Not read: the credentials come from the environment.
        credentials_secret_ref: CredentialsSecretRef::named("unused"),
        account_id: args.account_id.clone(),
        requests_per_minute: None,
        request_burst: None,
    };
    if spec.region.is_none() && spec.api_url.is_none() {
        return Err(Failure::Usage(
            "say where DPC is: --region eu1|us1 or --api-url".into(),
        ));
    }
    let endpoint = Endpoint::for_account(&spec, settings).map_err(Failure::Usage)?;
    Ok(Source {
        key: AccountKey {
            namespace: None,
            name: "import".into(),
        },
        endpoint,
        credentials: Credentials {
            client_id: SecretString::new(id),
            client_secret: SecretString::new(secret),
        },
        rate: Rate {
            requests_per_minute: spec.requests_per_minute(),
            burst: spec.request_burst(),
        },
        spec,
        origin: format!("{CLIENT_ID_ENV}/{CLIENT_SECRET_ENV}"),
        namespace: None,
        cluster: None,
    })
}

async fn from_cluster(
    args: &ImportArgs,
    reference: &str,
    settings: &ClientSettings,
) -> Result<Source, Failure> {
    use crate::accounts::ResolveError;
    let Some((namespace, name)) = reference.split_once('/') else {
        return Err(Failure::Usage(format!(
            "--from-account {reference:?}: expected NAMESPACE/NAME of a DpcAccount"
        )));
    };
    let client = crate::kube_client(args.kubeconfig.as_ref())
        .await
        .map_err(Failure::Kube)?;
    let (account, spec) = crate::accounts::read_dpc_account(&client, namespace, name, settings)
        .await
        .map_err(|e| match e {
            ResolveError::AccountInvalid { .. } => Failure::Usage(e.to_string()),
            other => Failure::Kube(other.to_string()),
        })?;
    let secret = spec.credentials_secret_ref.name.clone();
    Ok(Source {
        key: account.key,
        endpoint: account.endpoint,
        credentials: account.credentials,
        rate: account.rate,
        spec,
        origin: format!("Secret {namespace}/{secret} of DpcAccount {namespace}/{name}"),
        namespace: Some(namespace.to_string()),
        cluster: Some(client),
    })
}

/// Lists the environments, checks the asked-for ones exist, then lists each one's overrides.
async fn read_overrides(
    handle: &AccountHandle,
    project: &str,
    wanted: &[String],
    origin: &str,
) -> Result<Vec<Found>, Failure> {
    let listed: BTreeSet<String> = patiently(|| handle.environments(project))
        .await
        .map_err(|e| explain(e, project, origin, "listing the project's environments"))?
        .into_iter()
        .collect();
    let environments: BTreeSet<String> = if wanted.is_empty() {
        listed.clone()
    } else {
        wanted.iter().cloned().collect()
    };
    if let Some(missing) = environments.iter().find(|e| !listed.contains(*e)) {
        return Err(Failure::NotFound(format!(
            "environment {missing:?} not found in project {project}; it has: {}",
            listed
                .iter()
                .map(|e| format!("{e:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let mut found = Vec::new();
    for environment in &environments {
        let overrides = patiently(|| handle.list(project, environment))
            .await
            .map_err(|e| {
                explain(
                    e,
                    project,
                    origin,
                    &format!("listing the overrides of environment {environment:?}"),
                )
            })?;
        eprintln!(
            "environment {environment:?}: {} override(s)",
            overrides.len()
        );
        found.extend(overrides.into_iter().map(|remote| Found {
            environment: environment.clone(),
            remote,
        }));
    }
    Ok(found)
}

/// A call, tried again on a rate limit or a transient failure (at most four times, waiting
/// as DPC asks or 1, 2, 4 s); an answer that does not parse is not asked again.
async fn patiently<T, F, Fut>(call: F) -> Result<T, DpcError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, DpcError>>,
{
    let mut delay = Duration::from_secs(1);
    for attempt in 1.. {
        match call().await {
            Err(e) if attempt < 4 && e.is_transient() && !matches!(e, DpcError::Decode { .. }) => {
                let wait = e
                    .retry_after()
                    .unwrap_or(delay)
                    .min(Duration::from_secs(60));
                eprintln!("{e}; trying again in {} s", wait.as_secs_f64().ceil());
                tokio::time::sleep(wait).await;
                delay *= 2;
            }
            other => return other,
        }
    }
    unreachable!("the loop returns")
}

fn explain(error: DpcError, project: &str, origin: &str, during: &str) -> Failure {
    let text = format!("{during} failed: {error}");
    match error.class() {
        ErrorClass::CredentialsRejected => {
            Failure::Credentials(format!("DPC refused the credentials from {origin}: {text}"))
        }
        ErrorClass::NotFound => Failure::NotFound(format!(
            "project {project} not found (or not visible to these credentials): {text}"
        )),
        ErrorClass::Misconfigured => Failure::Usage(text),
        _ => Failure::Dpc(text),
    }
}

#[cfg(test)]
mod tests;
