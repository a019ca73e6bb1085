//! Ownership: what proves that an object may write over, and delete, the override it names,
//! and the marks that record it in the cluster before a write goes out.
//!
//! An object owns the override it names once DPC accepted a write of it (`POST` or `PUT`
//! answered 2xx) or once it adopted it as it was (DPC already held the spec): status records
//! that (`appliedHash`, `managedOverride`), and this process remembers it until the watch
//! shows that status. Status is written after the write, so a `POST` is preceded by the
//! annotation `dpc-operator.io/create-pending` (the API URL it goes to), on the same patch
//! that adds the cleanup finalizer: a crash between the `POST` and the status write still
//! leaves the proof that this object may have created the override. DPC refusing that `POST`
//! removes the annotation again. A `PUT` over an override this object does not own yet needs
//! no such mark: should the process die before recording it, the override stays in DPC
//! (it was there before the object).
//!
//! Everything else owns nothing: its deletion calls DPC not at all.

use crate::api::{
    CREATE_PENDING_ANNOTATION, ConnectionOverride, DeletionPolicy, FINALIZER,
    FORCE_ORPHAN_ANNOTATION, ManagementPolicy,
};
use crate::context::Context;
use crate::dpc::Operation;
use crate::key::key_of;

use super::Error;
use super::act::BeforeWrite;
use super::write;

/// How an object came to own the override it may delete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum How {
    /// DPC accepted its write, or it adopted the override as DPC held it.
    Recorded,
    /// Its `POST` may have created the override; the outcome was never recorded.
    CreatePending,
}

/// The override an object may delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owned {
    /// The API URL the override lives behind; `None`: wherever the account calls (status
    /// written before the operator recorded it).
    pub api_url: Option<String>,
    pub project: String,
    pub environment: String,
    pub connection: String,
    pub how: How,
}

/// The create-pending annotation as the object carries it, or as this process last wrote it
/// when the watch has not shown that write yet.
fn create_pending(obj: &ConnectionOverride, ctx: &Context) -> Option<Option<String>> {
    let annotated = obj
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(CREATE_PENDING_ANNOTATION))
        .filter(|url| !url.is_empty())
        .cloned();
    let uid = obj.metadata.uid.as_deref().unwrap_or_default();
    match ctx.objects.pending(&key_of(&obj.metadata), uid) {
        Some(false) => None,
        Some(true) => Some(annotated),
        None => annotated.map(Some),
    }
}

/// Whether the object owns its override for sure: DPC accepted a write of it, or it was
/// adopted as DPC held it (status says so, or this process did it).
pub fn recorded(obj: &ConnectionOverride, ctx: &Context) -> bool {
    let status = obj.status.as_ref();
    let uid = obj.metadata.uid.as_deref().unwrap_or_default();
    status.is_some_and(|s| s.applied_hash.is_some() || s.managed_override.is_some())
        || ctx.objects.applied(&key_of(&obj.metadata), uid).is_some()
}

/// The override this object may delete, if it owns one.
pub fn owned(obj: &ConnectionOverride, ctx: &Context) -> Option<Owned> {
    let spec = &obj.spec;
    let named = |api_url, how| Owned {
        api_url,
        project: spec.project_id.clone(),
        environment: spec.environment_name.clone(),
        connection: spec.connection_name.clone(),
        how,
    };
    if let Some(m) = obj
        .status
        .as_ref()
        .and_then(|s| s.managed_override.as_ref())
    {
        return Some(Owned {
            api_url: Some(m.api_url.clone()),
            project: m.project_id.clone(),
            environment: m.environment_name.clone(),
            connection: m.connection_name.clone(),
            how: How::Recorded,
        });
    }
    if recorded(obj, ctx) {
        return Some(named(None, How::Recorded));
    }
    create_pending(obj, ctx).map(|url| named(url, How::CreatePending))
}

/// Whether deleting this object will call DPC through its account: it holds the cleanup
/// finalizer, its policies let it delete, and it owns an override. An account waits for
/// these objects only.
pub fn will_delete(obj: &ConnectionOverride, ctx: &Context) -> bool {
    let spec = &obj.spec;
    let forced = obj
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(FORCE_ORPHAN_ANNOTATION))
        .is_some_and(|v| v == "true");
    obj.metadata
        .finalizers
        .iter()
        .flatten()
        .any(|f| f == FINALIZER)
        && !forced
        && spec.deletion_policy() == DeletionPolicy::Delete
        && spec.management_policy() == ManagementPolicy::Manage
        && owned(obj, ctx).is_some()
}

/// The marks of one live pass: the cleanup finalizer before any write (and before an
/// adoption is recorded), the create-pending annotation before a `POST` of an override the
/// object does not own yet, removed before a `PUT` of one (a `409` showed the `POST` created
/// nothing) and when DPC refused the `POST`.
pub struct Marks<'a> {
    obj: &'a ConnectionOverride,
    ctx: &'a Context,
    api_url: String,
    owned: bool,
    finalizer: bool,
    pending: bool,
}

impl<'a> Marks<'a> {
    pub fn new(obj: &'a ConnectionOverride, ctx: &'a Context, api_url: &str) -> Self {
        Self {
            obj,
            ctx,
            api_url: api_url.trim_end_matches('/').to_string(),
            owned: recorded(obj, ctx),
            finalizer: obj
                .metadata
                .finalizers
                .iter()
                .flatten()
                .any(|f| f == FINALIZER),
            pending: create_pending(obj, ctx).is_some(),
        }
    }

    /// The cleanup finalizer, before the object records an override it owns.
    pub async fn ensure_finalizer(&mut self) -> Result<(), Error> {
        if !self.finalizer {
            write::ensure_finalizer(self.obj, self.ctx).await?;
            self.finalizer = true;
        }
        Ok(())
    }

    /// DPC refused the write, and no `POST` of it may have created anything: the object
    /// has not created the override, and its deletion must not delete it.
    pub async fn refused(&mut self) -> Result<(), Error> {
        if self.pending && !self.owned {
            write::set_pending(self.ctx, &self.obj.metadata, None).await?;
            self.pending = false;
        }
        Ok(())
    }
}

impl BeforeWrite for Marks<'_> {
    fn needs(&self, operation: Operation) -> bool {
        let mark = match operation {
            Operation::Create => !self.owned && !self.pending,
            Operation::Update => !self.owned && self.pending,
            _ => false,
        };
        mark || !self.finalizer
    }

    async fn before(&mut self, operation: Operation) -> Result<(), Error> {
        match operation {
            Operation::Create if !self.owned && !self.pending => {
                if self.finalizer {
                    write::set_pending(self.ctx, &self.obj.metadata, Some(&self.api_url)).await?;
                } else {
                    write::add_finalizer_and_pending(self.obj, self.ctx, &self.api_url).await?;
                    self.finalizer = true;
                }
                self.pending = true;
            }
            Operation::Update if !self.owned && self.pending => {
                self.ensure_finalizer().await?;
                write::set_pending(self.ctx, &self.obj.metadata, None).await?;
                self.pending = false;
            }
            _ => {}
        }
        self.ensure_finalizer().await
    }
}
