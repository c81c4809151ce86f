//! Drift the controller notices outside a service's own instances: modified unpacked images
//! (set aside, so their instances are replaced) and instances nobody deployed.

use std::collections::BTreeSet;
use std::time::Duration;

use imago_runtime::Instance;

use super::{Controller, LABEL_SERVICE};
use crate::error::DeployError;
use crate::state::{StateDb, now_ms};

impl Controller {
    /// Checks the unpacked images of running instances for modifications every `every`
    /// (a metadata pass; `imago drift --deep` hashes contents).
    pub fn with_rootfs_checks(
        mut self,
        cache: imago_runtime::RootfsCache,
        every: Duration,
    ) -> Controller {
        self.rootfs = Some((cache, every));
        self
    }

    pub(super) fn check_rootfs(&mut self, instances: &[Instance]) -> Result<(), DeployError> {
        let Some((cache, every)) = &self.rootfs else {
            return Ok(());
        };
        if self.last_rootfs_check.is_some_and(|t| t.elapsed() < *every) {
            return Ok(());
        }
        self.last_rootfs_check = Some(std::time::Instant::now());
        let digests: BTreeSet<&imago_oci::Digest> = instances
            .iter()
            .filter(|i| i.is_active() && i.labels.contains_key(LABEL_SERVICE))
            .map(|i| &i.image)
            .collect();
        let mut failed = Vec::new();
        for digest in digests {
            // One image that cannot be checked must not stop the checks of the others, nor
            // the pass: said once, like a tree that cannot be set aside.
            let problems = match cache.verify(digest, false) {
                Ok(problems) => problems,
                Err(e) => {
                    failed.push((
                        digest.clone(),
                        format!("cannot check the unpacked image {digest}: {e}"),
                    ));
                    continue;
                }
            };
            if problems.is_empty() {
                continue;
            }
            // A tree that cannot be moved must not stop the reconciling of every service: its
            // instances are replaced anyway (the taint is recorded first). Said once.
            match set_aside_modified(cache, &self.db, digest, false, &self.actor) {
                Ok(_) => {
                    self.set_aside_failed.remove(digest);
                }
                Err(e) => failed.push((
                    digest.clone(),
                    format!("cannot set the modified unpacked image {digest} aside: {e}"),
                )),
            }
        }
        for (digest, message) in failed {
            if self.set_aside_failed.insert(digest.clone()) {
                self.db.event(
                    None,
                    "drift",
                    &format!("{message}; retrying every check"),
                    &self.actor,
                )?;
            }
        }
        Ok(())
    }

    pub(super) fn report_unknown(
        &mut self,
        instances: &[Instance],
        known: &BTreeSet<&str>,
        destroyed: &BTreeSet<&str>,
    ) -> Result<(), DeployError> {
        for instance in instances.iter().filter(|i| i.is_active()) {
            let label = instance.labels.get(LABEL_SERVICE);
            let unknown = match label {
                None => true,
                Some(service) => {
                    !known.contains(service.as_str()) && !destroyed.contains(service.as_str())
                }
            };
            if unknown && self.reported_unknown.insert(instance.id.clone()) {
                let what = match label {
                    None => "was not launched by a deployment".to_string(),
                    Some(s) => format!("claims service {s}, which is not deployed"),
                };
                self.db.event(
                    None,
                    "drift",
                    &format!(
                        "unknown instance {} ({}) {what}",
                        instance.id, instance.image
                    ),
                    &self.actor,
                )?;
            }
        }
        Ok(())
    }

    /// Records a drift event for `id`, once per instance (per controller run).
    pub(super) fn announce_drift(
        &mut self,
        service: &str,
        id: &str,
        message: &str,
    ) -> Result<(), DeployError> {
        if self.announced_drift.insert(id.to_owned()) {
            self.db
                .event(Some(service), "drift", message, &self.actor)?;
        }
        Ok(())
    }
}

/// Sets the modified unpacked tree of `digest` aside and records it, so that every instance
/// created from it is replaced: by the running controller, a restarted one, or the next one
/// when `imago drift` found it. Returns the event's message.
pub fn set_aside_modified(
    cache: &imago_runtime::RootfsCache,
    db: &StateDb,
    digest: &imago_oci::Digest,
    deep: bool,
    actor: &str,
) -> Result<Option<String>, DeployError> {
    let runtime = |e: imago_runtime::RuntimeError| DeployError::Runtime(e.to_string());
    // Checked again under the entry's lock: the controller and `imago drift` may both have
    // found the old tree modified, and the first to set it aside may already have had a fresh,
    // intact tree unpacked in its place, which the second must leave alone.
    let _entry = cache.lock_entry(digest).map_err(runtime)?;
    let problems = cache.verify(digest, deep).map_err(runtime)?;
    if problems.is_empty() {
        return Ok(None);
    }
    let shown: Vec<&str> = problems.iter().take(5).map(String::as_str).collect();
    let message = format!(
        "the unpacked image {digest} was modified ({}{}): setting it aside and replacing its instances",
        shown.join(", "),
        if problems.len() > 5 {
            format!(", and {} more", problems.len() - 5)
        } else {
            String::new()
        }
    );
    // Recorded before the tree is moved, so a crash in between still replaces the instances
    // (and the next check finds the tree again); and again after, so an instance launched
    // from the modified tree in between is replaced too.
    db.record_taint(digest, now_ms())?;
    cache.taint(digest).map_err(runtime)?;
    db.record_taint(digest, now_ms())?;
    db.event(None, "drift", &message, actor)?;
    Ok(Some(message))
}
