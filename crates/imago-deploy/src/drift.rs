//! Drift: how the instances that run differ from the releases they claim. One judgment,
//! used by the controller (which replaces what drifted) and by `imago drift` (which reports it
//! and sets modified unpacked images aside), so the two can never disagree.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::fmt;

use imago_oci::Digest;
use imago_runtime::{Engine, Instance, RootfsCache};
use serde::Serialize;

use crate::cluster::ClusterEngine;
use crate::controller::{LABEL_REVISION, LABEL_SERVICE, instance_spec, set_aside_modified};
use crate::error::DeployError;
use crate::spec::ResolvedTarget;
use crate::state::{Release, StateDb};

/// An instance that runs another image or spec than the release of its revision asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrongSpec {
    pub image: Digest,
    pub spec_hash: Digest,
    pub release: u64,
    pub wanted_image: Digest,
    pub wanted_spec_hash: Digest,
}

/// Compares instances with `release`, the release whose revision they are labelled with. The
/// spec an instance should run is computed for its own engine (which engine runs an instance
/// is not part of a release, nor of its revision, so it is no drift), once per engine, not once
/// per instance (a pass over 10,000 instances spent most of its time hashing the same spec).
pub struct SpecJudge {
    release: Release,
    wanted: Vec<(Engine, Digest)>,
}

impl SpecJudge {
    pub fn new(release: Release) -> Self {
        SpecJudge {
            release,
            wanted: Vec::new(),
        }
    }

    pub fn judge(&mut self, instance: &Instance) -> Result<Option<WrongSpec>, DeployError> {
        let wanted_spec_hash = match self.wanted.iter().find(|(e, _)| *e == instance.engine) {
            Some((_, hash)) => hash.clone(),
            None => {
                let hash = instance_spec(&self.release, instance.engine)?
                    .spec_hash()
                    .map_err(|e| DeployError::Runtime(e.to_string()))?;
                self.wanted.push((instance.engine, hash.clone()));
                hash
            }
        };
        if instance.image == self.release.image_digest && instance.spec_hash == wanted_spec_hash {
            return Ok(None);
        }
        Ok(Some(WrongSpec {
            image: instance.image.clone(),
            spec_hash: instance.spec_hash.clone(),
            release: self.release.number,
            wanted_image: self.release.image_digest.clone(),
            wanted_spec_hash,
        }))
    }
}

/// What kind of drift a [`Finding`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FindingKind {
    /// Not launched by a deployed service, or claiming a revision no release has.
    Unknown,
    /// An instance of a service that is no longer running.
    Dead,
    WrongSpec,
    /// Its unpacked image was changed after it was unpacked.
    ModifiedRootfs,
}

impl fmt::Display for FindingKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FindingKind::Unknown => "unknown",
            FindingKind::Dead => "dead",
            FindingKind::WrongSpec => "wrong-spec",
            FindingKind::ModifiedRootfs => "modified-rootfs",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub instance: String,
    pub service: Option<String>,
    pub kind: FindingKind,
    pub detail: String,
}

/// The result of [`check`].
#[derive(Debug, Default)]
pub struct DriftCheck {
    pub findings: Vec<Finding>,
    /// The events recorded for unpacked images that were set aside, one per image.
    pub set_aside: Vec<String>,
}

/// Judges every instance against the release of its revision, and checks (with `deep`,
/// hashes) the unpacked image of every running one. Replace, don't repair: a modified tree is
/// set aside and recorded, so the controller replaces every instance that runs from it.
pub fn check(
    db: &StateDb,
    instances: &[Instance],
    cache: &RootfsCache,
    deep: bool,
    actor: &str,
) -> Result<DriftCheck, DeployError> {
    let services = db.services()?;
    let mut findings = Vec::new();
    // Instances of one image share its unpacked tree: check (and, deep, hash) it once.
    let mut rootfs_problems: BTreeMap<Digest, Vec<String>> = BTreeMap::new();
    let mut judges: BTreeMap<(String, String), Option<SpecJudge>> = BTreeMap::new();
    for instance in instances {
        let service = instance.labels.get(LABEL_SERVICE).cloned();
        let finding = |kind: FindingKind, detail: String| Finding {
            instance: instance.id.clone(),
            service: service.clone(),
            kind,
            detail,
        };
        let Some(name) = service.as_ref().filter(|s| services.contains(s)) else {
            if instance.is_active() {
                findings.push(finding(
                    FindingKind::Unknown,
                    "not launched by any deployed service".into(),
                ));
            }
            continue;
        };
        if !instance.is_active() {
            findings.push(finding(
                FindingKind::Dead,
                format!("{} (exit code {:?})", instance.status, instance.exit_code),
            ));
            continue;
        }
        let Some(revision) = instance.labels.get(LABEL_REVISION) else {
            findings.push(finding(
                FindingKind::Unknown,
                "has no revision label".into(),
            ));
            continue;
        };
        // One lookup and one spec hash per release, however many instances run it.
        let judge = match judges.entry((name.clone(), revision.clone())) {
            Entry::Occupied(known) => known.into_mut(),
            Entry::Vacant(new) => new.insert(
                db.release_with_revision(name, revision)?
                    .map(SpecJudge::new),
            ),
        };
        let Some(judge) = judge else {
            findings.push(finding(
                FindingKind::Unknown,
                format!("revision {revision} belongs to no release"),
            ));
            continue;
        };
        if let Some(wrong) = judge.judge(instance)? {
            findings.push(finding(
                FindingKind::WrongSpec,
                format!(
                    "runs {} / spec {}, release {} wants {} / {}",
                    wrong.image,
                    wrong.spec_hash,
                    wrong.release,
                    wrong.wanted_image,
                    wrong.wanted_spec_hash
                ),
            ));
        }
        if !rootfs_problems.contains_key(&instance.image) {
            let problems = cache
                .verify(&instance.image, deep)
                .map_err(|e| DeployError::Runtime(e.to_string()))?;
            rootfs_problems.insert(instance.image.clone(), problems);
        }
        for problem in rootfs_problems.get(&instance.image).into_iter().flatten() {
            findings.push(finding(FindingKind::ModifiedRootfs, problem.clone()));
        }
    }
    let mut set_aside = Vec::new();
    for digest in rootfs_problems
        .iter()
        .filter(|(_, p)| !p.is_empty())
        .map(|(d, _)| d)
    {
        // None: set aside by someone else meanwhile (the controller), and reported there.
        set_aside.extend(set_aside_modified(cache, db, digest, deep, actor)?);
    }
    Ok(DriftCheck {
        findings,
        set_aside,
    })
}

/// The engines a command talks to, one per target endpoint, each connected on first use: a
/// command about 50 services on one swarm connects (and negotiates the API version) once.
pub struct ClusterEngines<'a> {
    factory: &'a crate::controller::EngineFactory,
    made: BTreeMap<String, Box<dyn ClusterEngine>>,
}

impl<'a> ClusterEngines<'a> {
    pub fn new(factory: &'a crate::controller::EngineFactory) -> Self {
        ClusterEngines {
            factory,
            made: BTreeMap::new(),
        }
    }

    /// The engine of `target`.
    pub fn engine(
        &mut self,
        target: &ResolvedTarget,
    ) -> Result<&mut dyn ClusterEngine, DeployError> {
        let key = format!(
            "{}:{}",
            target.spec.engine,
            target.spec.endpoint.as_deref().unwrap_or_default()
        );
        let engine = match self.made.entry(key) {
            Entry::Occupied(made) => made.into_mut(),
            Entry::Vacant(new) => new.insert((self.factory)(target)?),
        };
        Ok(engine.as_mut())
    }
}

/// Judges every deployed service on a cluster target against its release, through the engine
/// `engines` makes: a missing service, one that runs another release, fields changed out of
/// band, and (once its rollout is over) a running task on another image. The controller finds
/// the same and applies the release again; this only reports.
pub fn check_cluster(
    db: &StateDb,
    engines: &crate::controller::EngineFactory,
) -> Result<Vec<Finding>, DeployError> {
    let mut engines = ClusterEngines::new(engines);
    let mut findings = Vec::new();
    for name in db.services()? {
        let Some(release) = db.desired(&name)? else {
            continue;
        };
        let Some(target) = release.spec.cluster_target() else {
            continue;
        };
        let desired = crate::controller::cluster_service(&release, target);
        let settled = db.outcome_of(&name, release.number)?.is_some();
        let finding = |instance: &str, kind: FindingKind, detail: String| Finding {
            instance: instance.to_owned(),
            service: Some(name.clone()),
            kind,
            detail,
        };
        let Some(observed) = engines.engine(target)?.observe(&desired)? else {
            findings.push(finding(
                &name,
                FindingKind::Dead,
                format!("{} service {name} is missing", target.spec.engine),
            ));
            continue;
        };
        if settled && observed.revision.as_deref() != Some(release.revision.as_str()) {
            findings.push(finding(
                &name,
                FindingKind::WrongSpec,
                format!(
                    "runs revision {}, release {} wants {}",
                    observed.revision.as_deref().unwrap_or("none"),
                    release.number,
                    release.revision
                ),
            ));
        }
        for difference in &observed.differences {
            findings.push(finding(&name, FindingKind::WrongSpec, difference.clone()));
        }
        if settled {
            for task in observed.tasks.iter().filter(|t| {
                t.desired_running
                    && t.phase == imago_spec::cluster::TaskPhase::Running
                    && t.image != desired.image
            }) {
                findings.push(finding(
                    &task.id,
                    FindingKind::WrongSpec,
                    format!(
                        "runs {}, release {} wants {}",
                        task.image, release.number, desired.image
                    ),
                ));
            }
        }
    }
    Ok(findings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::ServiceSpec;
    use imago_runtime::{Engine, InstanceSpec, Status};

    /// An image without layers: its unpack is an empty tree with the mount points.
    struct EmptyImage;

    impl imago_runtime::ImageSource for EmptyImage {
        fn image(
            &self,
            _: &imago_oci::Digest,
        ) -> Result<imago_runtime::ImageInfo, imago_runtime::RuntimeError> {
            Ok(imago_runtime::ImageInfo {
                config: imago_oci::spec::ImageConfiguration::default(),
                layers: Vec::new(),
            })
        }
        fn open_layer(
            &self,
            image: &imago_oci::Digest,
            _: &imago_oci::spec::Descriptor,
        ) -> Result<Box<dyn std::io::Read + '_>, imago_runtime::RuntimeError> {
            Err(imago_runtime::RuntimeError::ImageNotFound {
                digest: image.clone(),
                reason: "no layers".into(),
            })
        }
    }

    #[test]
    fn a_second_finder_leaves_the_fresh_tree_of_a_set_aside_image_alone() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(&dir.path().join("state.db")).unwrap();
        let cache = RootfsCache::new(dir.path().join("rootfs"));
        let digest = imago_oci::Digest::of(b"image");
        let info = imago_runtime::ImageSource::image(&EmptyImage, &digest).unwrap();
        let root = cache.ensure(&EmptyImage, &digest, &info).unwrap();
        std::fs::write(root.join("tmp/planted"), b"x").unwrap();
        // The controller and `imago drift` both find the tree modified.
        assert!(!cache.verify(&digest, false).unwrap().is_empty());
        // The first sets it aside, and a launch unpacks the image afresh.
        let first = set_aside_modified(&cache, &db, &digest, false, "controller").unwrap();
        assert!(first.is_some_and(|m| m.contains("/tmp/planted was added")));
        let fresh = cache.ensure(&EmptyImage, &digest, &info).unwrap();
        assert!(!fresh.join("tmp/planted").exists());
        // The second finds the fresh tree intact and leaves it where it is.
        let second = set_aside_modified(&cache, &db, &digest, false, "drift").unwrap();
        assert_eq!(second, None);
        assert!(cache.path(&digest).is_dir(), "the fresh tree was set aside");
        assert!(cache.verify(&digest, false).unwrap().is_empty());
        let set_aside = db
            .events(None, 0)
            .unwrap()
            .into_iter()
            .filter(|e| e.message.contains("setting it aside"))
            .count();
        assert_eq!(set_aside, 1);
    }

    #[test]
    fn a_modified_tree_that_cannot_be_moved_does_not_stop_the_controller() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = StateDb::open(&dir.path().join("state.db")).unwrap();
        let digest = release(&mut db, b"v1").image_digest;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let cache = RootfsCache::new(dir.path().join("rootfs"));
        let fake = std::sync::Arc::new(imago_runtime::FakeProvider::new());
        let mut controller = crate::controller::Controller::new(
            db,
            fake,
            runtime.handle().clone(),
            Engine::Embedded,
        )
        .with_rootfs_checks(cache.clone(), std::time::Duration::ZERO);
        controller.pass().unwrap();
        let info = imago_runtime::ImageSource::image(&EmptyImage, &digest).unwrap();
        let root = cache.ensure(&EmptyImage, &digest, &info).unwrap();
        std::fs::write(root.join("tmp/planted"), b"x").unwrap();
        // A mount point cannot be renamed (EBUSY): the tree cannot be set aside.
        struct Unmount<'a>(&'a std::path::Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = rustix::mount::unmount(self.0, rustix::mount::UnmountFlags::DETACH);
            }
        }
        rustix::mount::mount_bind(&root, &root).unwrap();
        let mounted = Unmount(&root);
        for _ in 0..3 {
            controller
                .pass()
                .expect("a pass failed on the tree it cannot move");
        }
        let messages = |db: &StateDb| -> Vec<String> {
            db.events(None, 0)
                .unwrap()
                .into_iter()
                .map(|e| e.message)
                .collect()
        };
        let said = messages(controller.db());
        let cannot = said
            .iter()
            .filter(|m| m.contains("cannot set the modified unpacked image"))
            .count();
        assert_eq!(cannot, 1, "{said:?}");
        drop(mounted);
        controller.pass().unwrap();
        assert!(!cache.path(&digest).exists());
        assert!(
            messages(controller.db())
                .iter()
                .any(|m| m.contains("setting it aside")),
        );
    }

    fn release(db: &mut StateDb, image: &[u8]) -> Release {
        let spec: ServiceSpec =
            serde_json::from_value(serde_json::json!({"image": "web", "replicas": 1})).unwrap();
        db.record_release("web", &spec, &Digest::of(image), "apply", None, "test")
            .unwrap()
            .0
    }

    fn running(id: &str, spec: &InstanceSpec) -> Instance {
        let mut instance = Instance::new(id.into(), spec).unwrap();
        instance.status = Status::Running;
        instance
    }

    #[test]
    fn wrong_spec_compares_image_and_spec_but_not_the_engine() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = StateDb::open(&dir.path().join("state.db")).unwrap();
        let release = release(&mut db, b"v1");
        let wanted = instance_spec(&release, Engine::Embedded).unwrap();
        assert_eq!(
            SpecJudge::new(release.clone())
                .judge(&running("a", &wanted))
                .unwrap(),
            None
        );
        let runc = instance_spec(&release, Engine::Runc).unwrap();
        assert_ne!(runc.spec_hash().unwrap(), wanted.spec_hash().unwrap());
        assert_eq!(
            SpecJudge::new(release.clone())
                .judge(&running("b", &runc))
                .unwrap(),
            None
        );

        let mut debug = wanted.clone();
        debug.env.insert("DEBUG".into(), "1".into());
        let wrong = SpecJudge::new(release.clone())
            .judge(&running("c", &debug))
            .unwrap()
            .expect("another env is drift");
        assert_eq!(wrong.spec_hash, debug.spec_hash().unwrap());
        assert_eq!(wrong.wanted_spec_hash, wanted.spec_hash().unwrap());
        assert_eq!(wrong.release, release.number);

        let mut other = wanted.clone();
        other.image = Digest::of(b"other");
        let wrong = SpecJudge::new(release.clone())
            .judge(&running("d", &other))
            .unwrap()
            .expect("another image is drift");
        assert_eq!(wrong.image, Digest::of(b"other"));
        assert_eq!(wrong.wanted_image, Digest::of(b"v1"));
    }

    #[test]
    fn check_reports_each_kind_of_drift() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = StateDb::open(&dir.path().join("state.db")).unwrap();
        let release = release(&mut db, b"v1");
        let wanted = instance_spec(&release, Engine::Embedded).unwrap();
        let mut debug = wanted.clone();
        debug.env.insert("DEBUG".into(), "1".into());
        let mut dead = running("dead", &wanted);
        dead.status = Status::Exited;
        dead.exit_code = Some(3);
        let stray = running("stray", &InstanceSpec::new(Digest::of(b"v1")));
        let mut unlabelled = wanted.clone();
        unlabelled.labels.remove(LABEL_REVISION);
        let mut forged = wanted.clone();
        forged
            .labels
            .insert(LABEL_REVISION.into(), "no-such-revision".into());
        let instances = [
            running("good", &wanted),
            running("debug", &debug),
            dead,
            stray,
            running("unlabelled", &unlabelled),
            running("forged", &forged),
        ];
        let cache = RootfsCache::new(dir.path().join("rootfs"));
        let checked = check(&db, &instances, &cache, false, "test").unwrap();
        let kinds: Vec<(&str, String)> = checked
            .findings
            .iter()
            .map(|f| (f.instance.as_str(), f.kind.to_string()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("debug", "wrong-spec".to_owned()),
                ("dead", "dead".to_owned()),
                ("stray", "unknown".to_owned()),
                ("unlabelled", "unknown".to_owned()),
                ("forged", "unknown".to_owned()),
            ]
        );
        assert!(checked.findings[0].detail.contains("release 1 wants"));
        assert_eq!(
            serde_json::to_value(&checked.findings[0]).unwrap()["kind"],
            "wrong-spec"
        );
        assert!(checked.set_aside.is_empty());
    }
}
