//! The seam between "what should run" and "how it runs": every engine (local containers today,
//! Kubernetes or Swarm later) implements [`Provider`], and the deploy logic is tested with
//! [`FakeProvider`].

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::{Instance, InstanceSpec, RuntimeError, Status};

/// Launches, stops and observes instances. Implementations are shared between threads.
pub trait Provider: Send + Sync {
    /// Starts a new instance of `spec` and returns it once its process is running.
    fn launch(&self, spec: &InstanceSpec) -> Result<Instance, RuntimeError>;
    /// Asks the instance to stop (SIGTERM), kills it after `grace`, and returns its final state.
    fn stop(&self, id: &str, grace: Duration) -> Result<Instance, RuntimeError>;
    /// Removes a stopped instance and everything it used.
    fn remove(&self, id: &str) -> Result<(), RuntimeError>;
    /// All known instances, running or not, oldest first.
    fn list(&self) -> Result<Vec<Instance>, RuntimeError>;
    fn inspect(&self, id: &str) -> Result<Instance, RuntimeError>;
    /// The instance's captured stdout and stderr (what is still retained).
    fn logs(&self, id: &str) -> Result<Vec<u8>, RuntimeError>;
    /// Takes back what no `remove` will ever name (the leftovers of launches and cleanups that
    /// were killed midway). Costs a pass over everything the provider holds: callers run it
    /// once in a while, never once per instance. Only a hint; nothing to do by default.
    fn sweep(&self) {}
}

/// An in-memory provider for unit tests of code built on [`Provider`]. Instances "run" until
/// stopped or until a test calls [`FakeProvider::exit`].
#[derive(Debug, Default)]
pub struct FakeProvider {
    inner: Mutex<FakeState>,
}

#[derive(Debug, Default)]
struct FakeState {
    next: u64,
    instances: BTreeMap<String, (Instance, Vec<u8>)>,
    fail_next_launch: Option<String>,
}

impl FakeProvider {
    pub fn new() -> FakeProvider {
        FakeProvider::default()
    }

    /// Makes the next `launch` fail with `reason` (recorded as a failed instance).
    pub fn fail_next_launch(&self, reason: &str) {
        self.lock().fail_next_launch = Some(reason.to_owned());
    }

    /// Simulates the instance's process exiting with `code`.
    pub fn exit(&self, id: &str, code: i32) -> Result<(), RuntimeError> {
        let mut st = self.lock();
        let (inst, _) = st
            .instances
            .get_mut(id)
            .ok_or_else(|| RuntimeError::NoSuchInstance(id.to_owned()))?;
        inst.status = Status::Exited;
        inst.exit_code = Some(code);
        inst.finished_ms = Some(crate::state::now_ms());
        Ok(())
    }

    /// Appends to the instance's log.
    pub fn write_log(&self, id: &str, bytes: &[u8]) -> Result<(), RuntimeError> {
        let mut st = self.lock();
        let (_, log) = st
            .instances
            .get_mut(id)
            .ok_or_else(|| RuntimeError::NoSuchInstance(id.to_owned()))?;
        log.extend_from_slice(bytes);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        // A test that panicked while holding the lock already failed; keep going with its data.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Provider for FakeProvider {
    fn launch(&self, spec: &InstanceSpec) -> Result<Instance, RuntimeError> {
        spec.validate()?;
        let mut st = self.lock();
        st.next += 1;
        let id = format!("fake{:08x}", st.next);
        let mut inst = Instance::new(id.clone(), spec)?;
        if let Some(reason) = st.fail_next_launch.take() {
            inst.status = Status::Failed;
            inst.error = Some(reason.clone());
            st.instances.insert(id.clone(), (inst, Vec::new()));
            return Err(RuntimeError::StartFailed { id, reason });
        }
        inst.status = Status::Running;
        // No pid: a made-up one could name a real host process that a caller then signals or
        // enters (command health checks nsenter by pid).
        inst.pid = None;
        inst.started_ms = Some(inst.created_ms);
        st.instances.insert(id, (inst.clone(), Vec::new()));
        Ok(inst)
    }

    fn stop(&self, id: &str, _grace: Duration) -> Result<Instance, RuntimeError> {
        let mut st = self.lock();
        let (inst, _) = st
            .instances
            .get_mut(id)
            .ok_or_else(|| RuntimeError::NoSuchInstance(id.to_owned()))?;
        if inst.status == Status::Running {
            inst.status = Status::Exited;
            inst.stop_requested = true;
            inst.exit_code = Some(128 + 15);
            inst.finished_ms = Some(crate::state::now_ms());
        }
        Ok(inst.clone())
    }

    fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let mut st = self.lock();
        let status = st
            .instances
            .get(id)
            .map(|(i, _)| i.status)
            .ok_or_else(|| RuntimeError::NoSuchInstance(id.to_owned()))?;
        if matches!(status, Status::Running | Status::Created) {
            return Err(RuntimeError::WrongState {
                id: id.to_owned(),
                status: status.to_string(),
                reason: "stop it before removing it",
            });
        }
        st.instances.remove(id);
        Ok(())
    }

    fn list(&self) -> Result<Vec<Instance>, RuntimeError> {
        let st = self.lock();
        Ok(st.instances.values().map(|(i, _)| i.clone()).collect())
    }

    fn inspect(&self, id: &str) -> Result<Instance, RuntimeError> {
        let st = self.lock();
        st.instances
            .get(id)
            .map(|(i, _)| i.clone())
            .ok_or_else(|| RuntimeError::NoSuchInstance(id.to_owned()))
    }

    fn logs(&self, id: &str) -> Result<Vec<u8>, RuntimeError> {
        let st = self.lock();
        st.instances
            .get(id)
            .map(|(_, l)| l.clone())
            .ok_or_else(|| RuntimeError::NoSuchInstance(id.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imago_oci::Digest;

    #[test]
    fn fake_lifecycle() {
        let p = FakeProvider::new();
        let spec = InstanceSpec::new(Digest::of(b"img"));
        let a = p.launch(&spec).unwrap();
        assert_eq!(a.status, Status::Running);
        assert_eq!(a.spec_hash, spec.spec_hash().unwrap());
        assert!(p.remove(&a.id).is_err());
        let s = p.stop(&a.id, Duration::from_secs(1)).unwrap();
        assert_eq!(s.status, Status::Exited);
        p.remove(&a.id).unwrap();
        assert!(p.list().unwrap().is_empty());
        p.fail_next_launch("boom");
        assert!(p.launch(&spec).is_err());
        assert_eq!(p.list().unwrap()[0].status, Status::Failed);
    }
}
