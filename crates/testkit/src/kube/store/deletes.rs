//! Deletion: finalizers, namespaces that empty themselves, and removal.

use super::*;

impl Store {
    pub(super) fn remove(&mut self, rt: &ResourceType, key: &(String, String)) -> Option<Value> {
        let mut object = self.objects_mut(rt).remove(key)?;
        self.rv += 1;
        meta_mut(&mut object).insert("resourceVersion".into(), Value::String(self.rv.to_string()));
        self.record(rt.key(), ChangeKind::Deleted, object.clone(), None);
        if rt.is_crd() {
            self.unregister_crd(&object);
        }
        if rt.namespaced {
            self.finish_namespace_if_done(&key.0);
        }
        Some(object)
    }

    pub(super) fn namespace_empty(&self, ns: &str) -> bool {
        self.types.values().all(|t| {
            !t.versions.values().next().is_some_and(|rt| rt.namespaced)
                || !t.objects.keys().any(|(n, _)| n == ns)
        })
    }

    pub(super) fn finish_namespace_if_done(&mut self, ns: &str) {
        let ns_type = self
            .resolve("", "v1", "namespaces")
            .expect("namespaces are built in");
        let key = (String::new(), ns.to_string());
        let terminating = self
            .objects(&ns_type)
            .get(&key)
            .is_some_and(|n| meta_str(n, "deletionTimestamp").is_some());
        if terminating && self.namespace_empty(ns) {
            self.remove(&ns_type, &key);
        }
    }

    /// Deletes an object: with finalizers it gets a `deletionTimestamp` and stays until they
    /// are removed.
    pub fn delete(
        &mut self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        preconditions: Option<&Value>,
        options: &WriteOptions,
    ) -> ApiResult<Value> {
        let key = (Self::namespace_of(rt, ns), name.to_string());
        let current = self
            .objects(rt)
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(rt, name))?;
        if let Some(pre) = preconditions {
            if let Some(uid) = pre.get("uid").and_then(Value::as_str)
                && Some(uid) != meta_str(&current, "uid")
            {
                return Err(conflict(rt, name));
            }
            if let Some(rv) = pre.get("resourceVersion").and_then(Value::as_str)
                && Some(rv) != meta_str(&current, "resourceVersion")
            {
                return Err(conflict(rt, name));
            }
        }
        if options.dry_run {
            return Ok(current);
        }
        if rt.is_namespace() {
            return self.delete_namespace(rt, key, current);
        }
        if finalizers(&current).is_empty() {
            return Ok(self.remove(rt, &key).expect("present"));
        }
        if meta_str(&current, "deletionTimestamp").is_some() {
            return Ok(current);
        }
        let mut new = current.clone();
        {
            let m = meta_mut(&mut new);
            m.insert("deletionTimestamp".into(), Value::String(now_rfc3339()));
            m.insert("deletionGracePeriodSeconds".into(), json!(0));
            if rt.tracks_generation() {
                let generation = m.get("generation").and_then(Value::as_i64).unwrap_or(1);
                m.insert("generation".into(), json!(generation + 1));
            }
        }
        self.commit(rt, key, Some(current), new, options)
    }

    pub(super) fn delete_namespace(
        &mut self,
        rt: &ResourceType,
        key: (String, String),
        current: Value,
    ) -> ApiResult<Value> {
        let ns = key.1.clone();
        if meta_str(&current, "deletionTimestamp").is_none() {
            let mut new = current.clone();
            meta_mut(&mut new).insert("deletionTimestamp".into(), Value::String(now_rfc3339()));
            new["status"] = json!({"phase": "Terminating"});
            self.commit(
                rt,
                key.clone(),
                Some(current.clone()),
                new,
                &WriteOptions::default(),
            )?;
        }
        // Delete the content; objects with finalizers stay until released.
        let content: Vec<(Arc<ResourceType>, String)> = self
            .types
            .values()
            .filter_map(|t| t.versions.values().next().cloned())
            .filter(|rt| rt.namespaced)
            .flat_map(|rt| {
                self.objects(&rt)
                    .keys()
                    .filter(|(n, _)| *n == ns)
                    .map(|(_, name)| (rt.clone(), name.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        for (rt, name) in content {
            let _ = self.delete(&rt, Some(&ns), &name, None, &WriteOptions::default());
        }
        self.finish_namespace_if_done(&ns);
        Ok(self
            .objects(rt)
            .get(&key)
            .cloned()
            .unwrap_or_else(|| Self::present(rt, &current)))
    }
}
