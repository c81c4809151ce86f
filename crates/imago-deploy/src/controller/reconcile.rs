//! The reconcile steps of one service: observe its instances, ask [`next_step`], act (clean up
//! the dead, retire, stop what drained, launch, route), and the tear-down of a destroyed one.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use imago_runtime::{Instance, Status};

use super::launches::{Finished, is_pending};
use super::progress::describe_exit;
use super::stops::{Reason, Stopped};
use super::{Controller, LABEL_REVISION, ServicePass, instance_spec, stop_grace};
use crate::drift::SpecJudge;
use crate::error::DeployError;
use crate::rollout::{ObservedInstance, Phase, RolloutInput, next_step};
use crate::spec::Strategy;
use crate::state::{Release, ReleaseOutcome, now_ms};

impl Controller {
    /// Runs `body` with its database writes in one batch ([`crate::state::StateDb::begin_batch`]):
    /// committed before anything that depends on them happens (the endpoint is routed only
    /// after the batch that recorded its instances ready), rolled back if `body` failed.
    pub(super) fn batched<T>(
        &mut self,
        body: impl FnOnce(&mut Self) -> Result<T, DeployError>,
    ) -> Result<T, DeployError> {
        let started = self.db.begin_batch()?;
        let result = body(self);
        if started {
            self.db.end_batch(result.is_ok())?;
        }
        result
    }

    /// Stops every instance of a destroyed service and closes its endpoint. Stops run beside the
    /// loop (each takes up to the instance's grace period), so a pass never waits for one; a
    /// later pass removes what has exited. Only the database says the service is destroyed, so a
    /// restarted controller finishes a tear-down it did not start.
    pub(super) fn tear_down(
        &mut self,
        service: &str,
        own: &[&Instance],
    ) -> Result<ServicePass, DeployError> {
        let mut pass = ServicePass {
            service: service.to_owned(),
            ..ServicePass::default()
        };
        self.close_endpoint(service)?;
        // Launches under way finish and are listed, then stopped like the rest.
        self.launches.abandon_other_revisions(service, None);
        for instance in own {
            if self.stops.is_pending(&instance.id) {
                // Its stop is under way: nothing to look up or decide until it ends.
                continue;
            }
            let grace = if instance.is_active() {
                Some(stop_grace(&self.db, service, instance)?)
            } else {
                None
            };
            self.stops
                .start(service, &instance.id, grace, Reason::Destroyed);
        }
        pass.stopped = self.stopped_now.remove(service).unwrap_or_default();
        Ok(pass)
    }

    /// Takes the stops and removals that returned since the last pass, before the instances
    /// are listed: a removed instance is forgotten (its record marked removed), one that could
    /// not be removed is an event and handed over again by a later pass.
    pub(super) fn take_stops(&mut self) -> Result<(), DeployError> {
        self.stopped_now.clear();
        let finished = self.stops.take_finished();
        if finished.is_empty() {
            return Ok(());
        }
        self.batched(|c| {
            finished
                .into_iter()
                .try_for_each(|stopped| c.take_stop(stopped))
        })
    }

    fn take_stop(&mut self, stopped: Stopped) -> Result<(), DeployError> {
        let Stopped {
            id,
            service,
            reason,
            result,
            repeated,
        } = stopped;
        match (result, reason) {
            // Said already; retried after a delay (see `stops::Failures`).
            (Err(_), _) if repeated => Ok(()),
            (Ok(()), reason) => {
                self.forget_instance(&id)?;
                if reason == Reason::Drained {
                    self.db.event(
                        Some(&service),
                        "stop",
                        &format!("instance {id} drained and stopped"),
                        &self.actor,
                    )?;
                }
                self.stopped_now.entry(service).or_default().push(id);
                Ok(())
            }
            (Err(e), Reason::Drained) => self.db.event(
                Some(&service),
                "remove-failed",
                &format!("cannot remove instance {id} yet: {e}"),
                &self.actor,
            ),
            // `imago destroy` may be removing the same instances right now: retried on the
            // next pass.
            (Err(e), Reason::Destroyed) => self.db.event(
                Some(&service),
                "destroy",
                &format!("cannot remove {id} yet: {e}"),
                &self.actor,
            ),
        }
    }

    pub(super) fn remove_instance(&mut self, id: &str) -> Result<(), DeployError> {
        match self.provider.remove(id) {
            Ok(()) | Err(imago_runtime::RuntimeError::NoSuchInstance(_)) => {}
            Err(e) => return Err(DeployError::Runtime(e.to_string())),
        }
        self.forget_instance(id)
    }

    /// What this controller knows of a removed instance goes with it.
    fn forget_instance(&mut self, id: &str) -> Result<(), DeployError> {
        self.health.forget(id);
        if let Some(readiness) = self.readiness.as_mut() {
            readiness.remove(id);
        }
        if let Some(task) = self.probes.remove(id) {
            task.abort();
        }
        self.db.mark_removed(id)
    }

    pub(super) fn reconcile(
        &mut self,
        service: &str,
        own: &[&Instance],
        draining: &BTreeMap<String, u64>,
    ) -> Result<ServicePass, DeployError> {
        let mut pass = ServicePass {
            service: service.to_owned(),
            ..ServicePass::default()
        };
        let Some(release) = self.db.desired(service)? else {
            return Ok(pass);
        };
        pass.release = Some(release.number);
        // The parts of one service's pass (within the pass's "services" part).
        let mut clock = super::PartClock::start();
        let own = self.remove_interrupted_launches(service, own, &mut pass)?;
        let own = own.as_slice();
        let mut limits = release.spec.validate(service)?;
        // The rollback fast path: a release that restores a known-good one replaces everything in
        // one health-gated wave (surge = replicas) with no min_ready wait. The old release's
        // instances keep serving until the restored ones pass their checks.
        let fast_path = release.rollback_of.is_some();
        if fast_path {
            limits.max_surge = limits.max_surge.max(limits.replicas);
        }
        let expected = instance_spec(&release, self.engine)?;
        // Launches of a release no longer desired (a rollback or a new apply came during its
        // wave) start no more; those under way are retired as they finish.
        self.launches
            .abandon_other_revisions(service, Some(&release.revision));
        let now = now_ms();
        if let Err(e) = self.ensure_endpoint(service, &release) {
            // When another process holds the port, say which: a fault of the host, not of the
            // service's definition.
            for addr in release.spec.endpoint_addresses().unwrap_or_default() {
                crate::services::check_endpoint_free(service, addr, &[std::process::id()])?;
            }
            return Err(e);
        }

        let by_id: HashMap<&str, &Instance> = own.iter().map(|i| (i.id.as_str(), *i)).collect();
        let (releases, mut observed) =
            self.batched(|c| c.observe(service, &release, own, draining, &mut pass))?;
        // Launches under way count as starting instances of their revision: against the surge
        // and the desired count, never as available, so nothing old is retired on their account.
        let pending = self.launches.pending_instances(service);
        let launching_target = pending.iter().any(|p| p.revision == release.revision);
        observed.extend(pending);
        clock.lap("observe");
        let outcome = self.db.outcome_of(service, release.number)?;
        let failed_already = outcome
            .as_ref()
            .is_some_and(|o| o.outcome == ReleaseOutcome::Failed);
        let min_ready = if fast_path {
            Duration::ZERO
        } else {
            release.spec.rollout.min_ready
        };
        // The next pass should come when a ready instance becomes available.
        let min_ready_ms = min_ready.as_millis() as u64;
        if let Some(at) = observed
            .iter()
            .filter_map(|o| match o.phase {
                Phase::Ready { since_ms } => Some(since_ms.saturating_add(min_ready_ms)),
                _ => None,
            })
            .filter(|at| *at > now)
            .min()
        {
            self.health.wake.at(at);
        }
        let mut step = next_step(RolloutInput {
            limits,
            strategy: release.spec.rollout.strategy,
            min_ready,
            now_ms: now,
            target: &release.revision,
            instances: &observed,
        });
        clock.lap("next_step");
        if failed_already {
            // A failed release that could not be rolled back: hold still, keep serving what runs.
            step.launch = 0;
            step.retire.retain(|id| {
                observed.iter().any(|o| {
                    &o.id == id && o.phase == Phase::Unhealthy && o.revision == release.revision
                })
            });
        }
        // A paused service's rollout holds where it is (`imago pause`): recorded in the
        // database, so a restarted controller holds it too.
        let paused = self.db.paused(service)?.is_some();
        if paused {
            step = crate::rollout::paused(step, &observed);
        }
        if paused || failed_already {
            // Nothing more starts, including launches this release's wave still has queued
            // (a wave wider than the launch workers): a pause holds the rollout where it is.
            self.launches.hold(service);
        }
        // A launch under way is no instance yet: an abandoned one is retired when it is taken.
        step.retire.retain(|id| !is_pending(id));

        // The retirements of this pass are recorded in one batch, committed before the endpoint
        // stops routing to the retired instances.
        self.batched(|c| {
            if release.spec.rollout.strategy == Strategy::BlueGreen {
                let old_set: Vec<&str> = step
                    .retire
                    .iter()
                    .filter(|id| !draining.contains_key(*id))
                    .filter(|id| {
                        observed.iter().any(|o| {
                            &o.id == *id
                                && o.revision != release.revision
                                && o.phase != Phase::Unhealthy
                        })
                    })
                    .map(String::as_str)
                    .collect();
                if !old_set.is_empty() {
                    c.db.event(
                        Some(service),
                        "switch",
                        &format!(
                            "blue-green: all traffic switches to release {} ({}); draining the old set ({})",
                            release.number,
                            step.route_to.join(", "),
                            old_set.join(", ")
                        ),
                        &c.actor,
                    )?;
                }
            }
            // Retire: out of the endpoint now, stopped once drained.
            let deadline = now + release.spec.rollout.drain.as_millis() as u64;
            for id in &step.retire {
                if draining.contains_key(id) {
                    continue;
                }
                let revision = by_id
                    .get(id.as_str())
                    .and_then(|i| i.labels.get(LABEL_REVISION).cloned())
                    .unwrap_or_default();
                let release_no = releases
                    .get(&revision)
                    .and_then(Option::as_ref)
                    .map_or(0, |r| r.number);
                c.db
                    .mark_draining(id, service, release_no, &revision, deadline)?;
                if let Some(health) = c.health.get(id).filter(|h| h.tracker.unhealthy) {
                    let why = health.tracker.last_failure.unwrap_or_default();
                    c.db.event(
                        Some(service),
                        "unhealthy",
                        &format!("instance {id} is unhealthy ({why}): replacing it"),
                        &c.actor,
                    )?;
                } else {
                    c.db.event(
                        Some(service),
                        "retire",
                        &format!("instance {id} (release {release_no}) retired: draining"),
                        &c.actor,
                    )?;
                }
                pass.retired.push(id.clone());
            }
            Ok(())
        })?;
        clock.lap("retire");
        // Route before anything is stopped or removed: a removal gives the instance's address
        // lease back, and a launch beside the loop may take that address at once; were the
        // endpoint still routing there, new connections would reach the wrong instance. The
        // dead, the retired (unrouted by the pass that retired them, unless its routing
        // failed) and the drained are all out of `route_to`, and a pass whose routing fails
        // stops and removes nothing. Nor does it launch: the service's pass fails as a whole
        // (a fault, shown and retried every pass); replacements wait for a data plane that
        // routes, since until then they could not serve anyway.
        let targets: Vec<(String, SocketAddr)> = step
            .route_to
            .iter()
            .filter_map(|id| by_id.get(id.as_str()).copied())
            .filter_map(|i| self.address_of(i, &release).map(|a| (i.id.clone(), a)))
            .collect();
        // Only routes adopted from a data plane are checked against it: a set of every
        // instance's id built each pass was a tenth of a pass over 10,000 instances.
        let eligible: BTreeSet<String> = if self.adopted_routes.contains_key(service) {
            let retired: BTreeSet<&str> = step.retire.iter().map(String::as_str).collect();
            own.iter()
                .filter(|i| {
                    i.is_active()
                        && !draining.contains_key(&i.id)
                        && !retired.contains(i.id.as_str())
                })
                .map(|i| i.id.clone())
                .collect()
        } else {
            BTreeSet::new()
        };
        let targets = self.route(service, targets, &eligible, None)?;
        pass.routed = targets.into_iter().map(|(id, _)| id).collect();
        clock.lap("route");
        // Clean up the dead (replace, don't repair), unrouted now.
        for id in &step.remove_dead {
            if draining.contains_key(id) {
                // A retired instance that finished stopping: the drain loop below removes it.
                continue;
            }
            if self.stops.failures.waiting(id) {
                // Its removal failed: tried again after a delay.
                continue;
            }
            let retry = self.stops.failures.known(id);
            let instance = by_id.get(id.as_str()).copied();
            let detail = instance.map(describe_exit).unwrap_or_default();
            let message = format!("instance {id} {detail}: removing it");
            if !retry {
                self.db
                    .event(Some(service), "drift", &message, &self.actor)?;
            }
            pass.drift.push(message);
            if self.remove_or_report(service, id)? {
                pass.removed_dead.push(id.clone());
            }
        }
        self.stop_drained(service, &release, &by_id, &releases, draining, now)?;
        clock.lap("stop_drained");
        // Launch beside the loop: a wave takes seconds under load, and the pass goes on routing,
        // judging health, draining and stopping meanwhile. Later passes take the results.
        self.launches.start(
            &self.provider,
            &self.health.wake,
            service,
            &release.revision,
            release.number,
            &expected,
            step.launch as usize,
        );
        pass.launched = self.launched_now.remove(service).unwrap_or_default();
        // Under way at the start of the pass, or started by it.
        pass.launching = self
            .launches
            .under_way(service)
            .iter()
            .map(|(_, n)| n)
            .sum::<usize>()
            + step.launch as usize;
        clock.lap("launch");
        pass.counts = step.counts;
        pass.stopped = self.stopped_now.remove(service).unwrap_or_default();
        // Complete once what it retired is removed too, not only stopped; an exited instance
        // whose removal has kept failing for a while (see `FAILED_REMOVAL_HOLD`) holds it back
        // no longer: its `remove-failed` event stands and its removal is retried.
        let settled = step.complete
            || (step.complete_but_dead
                && step
                    .remove_dead
                    .iter()
                    .all(|id| self.stops.failures.given_up_holding(id)));
        pass.complete = settled
            && pass.launched.is_empty()
            && pass.launching == 0
            && !self.stops.any_pending(service);
        // Paused, nothing progresses: neither the deadline nor the health gate judge it until
        // it is resumed (resuming restarts the deadline).
        if !paused {
            self.track_progress(
                service,
                &release,
                &step,
                &observed,
                own,
                outcome.is_some(),
                // Stops and removals under way are progress too: the pass that removed them
                // itself used to see the counts change when it had.
                launching_target || self.stops.any_pending(service),
                &mut pass,
            )?;
        }
        clock.lap("progress");
        Ok(pass)
    }

    /// Takes the launches that finished since the last pass, before the instances are listed:
    /// an instance of its service's desired revision is probed from now on; one of a revision
    /// no longer desired (a rollback or a new apply came while it launched) is retired at once,
    /// never probed or routed; a failed launch is an event (its record, if any, is removed as
    /// dead and counts against its release as before).
    pub(super) fn take_launches(&mut self) -> Result<(), DeployError> {
        self.launched_now.clear();
        let finished = self.launches.take_finished();
        if finished.is_empty() {
            return Ok(());
        }
        self.batched(|c| {
            finished
                .into_iter()
                .try_for_each(|launch| c.take_launch(launch))
        })
    }

    fn take_launch(&mut self, launch: Finished) -> Result<(), DeployError> {
        let Finished {
            service,
            revision,
            release_number,
            result,
        } = launch;
        let instance = match result {
            Ok(instance) => instance,
            Err(e) => {
                return self.db.event(
                    Some(&service),
                    "launch-failed",
                    &format!("launch for release {release_number} failed: {e}"),
                    &self.actor,
                );
            }
        };
        match self
            .db
            .desired(&service)?
            .filter(|r| r.revision == revision && r.spec.cluster_target().is_none())
        {
            Some(release) => {
                self.db.event(
                    Some(&service),
                    "launch",
                    &format!(
                        "instance {} launched for release {} ({})",
                        instance.id, release.number, release.image_digest
                    ),
                    &self.actor,
                )?;
                self.ensure_probe(&instance, &release);
                self.launched_now
                    .entry(service)
                    .or_default()
                    .push(instance.id);
            }
            None => {
                // Drained from the start (nothing was ever routed to it), so it is stopped on
                // the next pass.
                self.db.mark_draining(
                    &instance.id,
                    &service,
                    release_number,
                    &revision,
                    now_ms(),
                )?;
                self.db.event(
                    Some(&service),
                    "retire",
                    &format!(
                        "instance {} launched for release {release_number}, which is no longer desired: retired without serving",
                        instance.id
                    ),
                    &self.actor,
                )?;
            }
        }
        Ok(())
    }

    /// Hands the retired instances of a service that have drained (or ran out of drain time)
    /// to the background stops ([`super::stops`]), and those that have exited to be removed.
    fn stop_drained(
        &mut self,
        service: &str,
        release: &Release,
        by_id: &HashMap<&str, &Instance>,
        releases: &HashMap<String, Option<Release>>,
        draining: &BTreeMap<String, u64>,
        now: u64,
    ) -> Result<(), DeployError> {
        // Stop what has drained (or ran out of drain time). Stopping takes up to the grace
        // period and removing works the kernel, so both run beside the loop; the instance
        // still counts (it still holds its resources) while it is listed.
        // Connections the kernel balanced to a draining instance bypass the proxy's counts: they
        // are counted from the host's socket table, one dump for all of them.
        let mut drain_addresses = BTreeMap::new();
        for id in draining.keys() {
            let Some(instance) = by_id.get(id.as_str()).copied() else {
                continue;
            };
            let own_release = instance
                .labels
                .get(LABEL_REVISION)
                .and_then(|r| releases.get(r))
                .and_then(Option::as_ref)
                .unwrap_or(release);
            if let Some(SocketAddr::V4(addr)) = self.address_of(instance, own_release) {
                drain_addresses.insert(id.clone(), addr);
            }
        }
        let kernel_open = self.kernel_open_connections(service, &drain_addresses);
        self.balanced_peers
            .extend(drain_addresses.values().copied());
        // The proxy's counts of every draining instance in one request to the data plane, not
        // one each (a wave of hundreds retired at once asked hundreds of times a pass).
        let live_draining: Vec<String> = draining
            .keys()
            .filter(|id| by_id.get(id.as_str()).is_some_and(|i| i.is_active()))
            .cloned()
            .collect();
        let proxied: HashMap<&str, usize> =
            match self.plane.lock().connections(service, &live_draining) {
                Ok(counts) if counts.len() == live_draining.len() => live_draining
                    .iter()
                    .map(String::as_str)
                    .zip(counts)
                    .collect(),
                _ => HashMap::new(),
            };
        for (id, drain_deadline) in draining {
            let Some(instance) = by_id.get(id.as_str()).copied() else {
                // Not this service's, or already gone (stopped just before a crash).
                continue;
            };
            if self.stops.is_pending(id) {
                continue;
            }
            if !instance.is_active() {
                self.stops.start(service, id, None, Reason::Drained);
                continue;
            }
            // A count the data plane cannot give counts as open: the drain ends at its deadline.
            let proxied = proxied.get(id.as_str()).copied().unwrap_or(1);
            let open = proxied + kernel_open.get(id).copied().unwrap_or(0);
            if open == 0 || now >= *drain_deadline {
                // The grace period the instance was launched with, not the new release's.
                let grace = instance
                    .labels
                    .get(LABEL_REVISION)
                    .and_then(|r| releases.get(r))
                    .and_then(Option::as_ref)
                    .map_or(release.spec.stop_grace_period, |r| r.spec.stop_grace_period);
                self.stops.start(service, id, Some(grace), Reason::Drained);
            }
        }
        Ok(())
    }

    /// Observes a service's instances for [`next_step`]: each is judged by the health check of
    /// the release it runs, and one that runs something other than its revision says (another
    /// spec, a modified root filesystem) is drift. Also keeps probes running, readiness recorded
    /// and "ready" announced. Returns the releases the instances run, by revision.
    #[allow(clippy::type_complexity)]
    fn observe(
        &mut self,
        service: &str,
        release: &Release,
        own: &[&Instance],
        draining: &BTreeMap<String, u64>,
        pass: &mut ServicePass,
    ) -> Result<(HashMap<String, Option<Release>>, Vec<ObservedInstance>), DeployError> {
        let mut releases: HashMap<String, Option<Release>> = HashMap::new();
        releases.insert(release.revision.clone(), Some(release.clone()));
        for instance in own {
            let label = instance
                .labels
                .get(LABEL_REVISION)
                .map(String::as_str)
                .unwrap_or_default();
            if !releases.contains_key(label) {
                let found = self.db.release_with_revision(service, label)?;
                releases.insert(label.to_owned(), found);
            }
        }
        let mut observed = Vec::with_capacity(own.len());
        let mut judge = SpecJudge::new(release.clone());
        for instance in own {
            let revision = instance
                .labels
                .get(LABEL_REVISION)
                .cloned()
                .unwrap_or_default();
            let own_release: &Release = releases
                .get(&revision)
                .and_then(Option::as_ref)
                .unwrap_or(release);
            let mut revision_seen = revision.clone();
            let mut drifted = false;
            if let Some(when) = self.tainted.get(&instance.image)
                && instance.created_ms <= *when
                && instance.is_active()
            {
                // Its root filesystem was modified after unpacking: replace it.
                revision_seen = format!("modified-{}", instance.id);
                drifted = true;
                if !draining.contains_key(&instance.id) {
                    let message = format!(
                        "instance {} runs from a modified copy of {}: replacing it",
                        instance.id, instance.image
                    );
                    self.announce_drift(service, &instance.id, &message)?;
                    pass.drift.push(message);
                }
            } else if revision == release.revision
                && instance.is_active()
                && let Some(wrong) = judge.judge(instance)?
            {
                // Labelled as the desired revision but running something else: drift.
                revision_seen = format!("drifted-{}", instance.id);
                drifted = true;
                let message = format!(
                    "instance {} runs {} with spec {}, but release {} wants {} with spec {}: replacing it",
                    instance.id,
                    wrong.image,
                    wrong.spec_hash,
                    wrong.release,
                    wrong.wanted_image,
                    wrong.wanted_spec_hash
                );
                if !draining.contains_key(&instance.id) {
                    self.announce_drift(service, &instance.id, &message)?;
                    pass.drift.push(message);
                }
            }
            let phase = match instance.status {
                Status::Exited | Status::Failed | Status::Lost => Phase::Exited,
                Status::Created | Status::Running => self.phase_of(instance, own_release),
            };
            if own_release.spec.health.is_some() {
                self.keep_readiness(&instance.id, phase)?;
            }
            if matches!(phase, Phase::Ready { .. })
                && own_release.spec.health.is_some()
                && !draining.contains_key(&instance.id)
                && self.announced_ready.insert(instance.id.clone())
            {
                // Recorded before the endpoint can route to it, so the log shows that every
                // instance that served passed its check first.
                self.db.event(
                    Some(service),
                    "ready",
                    &format!(
                        "instance {} (release {}) passes its health check",
                        instance.id, own_release.number
                    ),
                    &self.actor,
                )?;
            }
            observed.push(ObservedInstance {
                id: instance.id.clone(),
                revision: revision_seen,
                phase,
                draining: draining.contains_key(&instance.id),
                drifted,
            });
            if instance.status == Status::Running && !draining.contains_key(&instance.id) {
                self.ensure_probe(instance, own_release);
            }
        }
        Ok((releases, observed))
    }

    pub(super) fn phase_of(&self, instance: &Instance, release: &Release) -> Phase {
        let started = instance.started_ms.unwrap_or(instance.created_ms);
        if release.spec.health.is_none() {
            // Without a health check, a running process is ready.
            return Phase::Ready { since_ms: started };
        }
        if let Some(since) = self.readiness.as_ref().and_then(|r| r.get(&instance.id)) {
            self.health.seed_ready(&instance.id, *since);
        }
        match self.health.get(&instance.id) {
            Some(h) if h.tracker.unhealthy => Phase::Unhealthy,
            Some(h) if h.tracker.healthy => Phase::Ready {
                since_ms: h.ready_since_ms.unwrap_or(started),
            },
            _ if instance.created_ms < self.started_ms => Phase::Unprobed,
            _ => Phase::Starting,
        }
    }

    /// Removes `id`; a failure is reported as an event (once per distinct error) and retried
    /// by a later pass after a delay, rather than ending the pass of the whole service. Returns
    /// whether it was removed.
    fn remove_or_report(&mut self, service: &str, id: &str) -> Result<bool, DeployError> {
        match self.remove_instance(id) {
            Ok(()) => {
                self.stops.failures.succeeded(id);
                Ok(true)
            }
            Err(e) => {
                if self.stops.failures.failed(id, None, &e.to_string()) {
                    self.db.event(
                        Some(service),
                        "remove-failed",
                        &format!("cannot remove instance {id} yet: {e}"),
                        &self.actor,
                    )?;
                }
                Ok(false)
            }
        }
    }

    /// Keeps the database's record of since when `id` passes its checks in step with `phase`.
    fn keep_readiness(&mut self, id: &str, phase: Phase) -> Result<(), DeployError> {
        let Some(readiness) = self.readiness.as_mut() else {
            return Ok(());
        };
        match phase {
            Phase::Ready { since_ms } => {
                if readiness.get(id) != Some(&since_ms) {
                    self.db.record_ready(id, since_ms)?;
                    readiness.insert(id.to_owned(), since_ms);
                }
            }
            Phase::Starting | Phase::Unhealthy | Phase::Exited => {
                if readiness.remove(id).is_some() {
                    self.db.forget_ready(id)?;
                }
            }
            Phase::Unprobed => {}
        }
        Ok(())
    }

    /// Removes the instances whose launch was cut short by the death of their launcher (a
    /// controller killed mid-launch): that is no fault of their release, so they never reach
    /// the health gate, and the rollout launches their replacements like any missing instance.
    fn remove_interrupted_launches<'a>(
        &mut self,
        service: &str,
        own: &[&'a Instance],
        pass: &mut ServicePass,
    ) -> Result<Vec<&'a Instance>, DeployError> {
        let mut kept = Vec::with_capacity(own.len());
        for instance in own {
            if !instance.launch_interrupted() {
                kept.push(*instance);
                continue;
            }
            let message = match self.remove_instance(&instance.id) {
                Ok(()) => {
                    pass.removed_dead.push(instance.id.clone());
                    format!(
                        "the launch of instance {} was interrupted (its launcher stopped before it started): removed; it does not count against its release",
                        instance.id
                    )
                }
                Err(e) => format!(
                    "the launch of instance {} was interrupted (its launcher stopped before it started), and it cannot be removed yet: {e}",
                    instance.id
                ),
            };
            self.db
                .event(Some(service), "launch-interrupted", &message, &self.actor)?;
        }
        Ok(kept)
    }

    pub(super) fn address_of(&self, instance: &Instance, release: &Release) -> Option<SocketAddr> {
        let port = release.spec.instance_port()?;
        let ip = match instance.network {
            imago_runtime::NetworkMode::Private => IpAddr::V4(instance.address?),
            imago_runtime::NetworkMode::Host => IpAddr::V4(Ipv4Addr::LOCALHOST),
        };
        Some(SocketAddr::new(ip, port))
    }
}

#[cfg(test)]
mod tests {
    //! The order of unrouting and releasing: no instance is stopped or removed (which gives its
    //! address lease back) while the data plane still sends new connections to it.

    use std::collections::{BTreeMap, BTreeSet};
    use std::net::{SocketAddr, SocketAddrV4};
    use std::sync::{Arc, Mutex, MutexGuard};
    use std::time::Duration;

    use imago_oci::Digest;
    use imago_runtime::{
        Engine, FakeProvider, Instance, InstanceSpec, Provider, RuntimeError, Status,
    };

    use super::super::{Controller, LABEL_SERVICE};
    use crate::dataplane::{DataPlane, EndpointStatus, Listening};
    use crate::error::DeployError;
    use crate::router::Routing;
    use crate::spec::ServiceSpec;

    /// A small xorshift generator: the seed is printed, so a failing run can be replayed.
    struct Rng(u64);

    impl Rng {
        fn new() -> Rng {
            let seed = std::env::var("IMAGO_TEST_SEED")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| {
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(1, |d| d.as_nanos() as u64)
                        | 1
                });
            println!("seed {seed} (IMAGO_TEST_SEED replays it)");
            Rng(seed)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// What the fake data plane routes, shared with the provider that checks it.
    #[derive(Default)]
    struct Seen {
        /// By open endpoint: the instances new connections go to.
        routed: BTreeMap<String, BTreeSet<String>>,
        /// Stops and removals of instances that were routed at that moment.
        violations: Vec<String>,
        removed: usize,
        stopped: usize,
        failed_routes: usize,
        failed_closes: usize,
    }

    fn lock(seen: &Mutex<Seen>) -> MutexGuard<'_, Seen> {
        seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A data plane that keeps only what it was asked, and fails a route or a close (nothing
    /// changed) when its dice say so, or the next close when told.
    struct Plane {
        seen: Arc<Mutex<Seen>>,
        rng: Rng,
        /// One route or close in this many fails.
        fail_one_in: u64,
        fail_next_close: Arc<std::sync::atomic::AtomicBool>,
    }

    impl DataPlane for Plane {
        fn listen(
            &mut self,
            service: &str,
            _addrs: &[SocketAddr],
            _routing: &Routing,
        ) -> Result<Listening, DeployError> {
            lock(&self.seen)
                .routed
                .entry(service.to_owned())
                .or_default();
            Ok(Listening::default())
        }

        fn close(&mut self, service: &str) -> Result<(), DeployError> {
            let told = self
                .fail_next_close
                .swap(false, std::sync::atomic::Ordering::SeqCst);
            let mut seen = lock(&self.seen);
            if told || self.rng.below(self.fail_one_in) == 0 {
                seen.failed_closes += 1;
                return Err(DeployError::Runtime(format!(
                    "test: the data plane did not close {service}"
                )));
            }
            seen.routed.remove(service);
            Ok(())
        }

        fn route(
            &mut self,
            service: &str,
            targets: &[(String, SocketAddr)],
        ) -> Result<(), DeployError> {
            let mut seen = lock(&self.seen);
            if self.rng.below(self.fail_one_in) == 0 {
                seen.failed_routes += 1;
                return Err(DeployError::Runtime(format!(
                    "test: the data plane did not route {service}"
                )));
            }
            seen.routed.insert(
                service.to_owned(),
                targets.iter().map(|(id, _)| id.clone()).collect(),
            );
            Ok(())
        }

        fn connections(
            &mut self,
            _service: &str,
            ids: &[String],
        ) -> Result<Vec<usize>, DeployError> {
            Ok(vec![0; ids.len()])
        }

        fn keep_peers(&mut self, _keep: &BTreeSet<SocketAddrV4>) -> Result<(), DeployError> {
            Ok(())
        }

        fn kernel_balancing(&self) -> bool {
            false
        }

        fn take_kernel_failures(&mut self) -> Vec<String> {
            Vec::new()
        }

        fn adopted(&self) -> Vec<EndpointStatus> {
            Vec::new()
        }
    }

    /// The fake provider, checking at every stop and removal that the plane no longer routes
    /// the instance.
    struct Checked {
        fake: FakeProvider,
        seen: Arc<Mutex<Seen>>,
    }

    impl Checked {
        fn check(&self, id: &str, what: &str) {
            let mut seen = lock(&self.seen);
            let routing: Vec<String> = seen
                .routed
                .iter()
                .filter(|(_, ids)| ids.contains(id))
                .map(|(service, _)| service.clone())
                .collect();
            if !routing.is_empty() {
                seen.violations
                    .push(format!("{what} {id} while {routing:?} routed to it"));
            }
        }
    }

    impl Provider for Checked {
        fn launch(&self, spec: &InstanceSpec) -> Result<Instance, RuntimeError> {
            self.fake.launch(spec)
        }
        fn stop(&self, id: &str, grace: Duration) -> Result<Instance, RuntimeError> {
            self.check(id, "stopped");
            lock(&self.seen).stopped += 1;
            self.fake.stop(id, grace)
        }
        fn remove(&self, id: &str) -> Result<(), RuntimeError> {
            self.check(id, "removed");
            let result = self.fake.remove(id);
            if result.is_ok() {
                lock(&self.seen).removed += 1;
            }
            result
        }
        fn list(&self) -> Result<Vec<Instance>, RuntimeError> {
            self.fake.list()
        }
        fn inspect(&self, id: &str) -> Result<Instance, RuntimeError> {
            self.fake.inspect(id)
        }
        fn logs(&self, id: &str) -> Result<Vec<u8>, RuntimeError> {
            self.fake.logs(id)
        }
    }

    fn running(provider: &Checked) -> Vec<String> {
        provider
            .fake
            .list()
            .unwrap()
            .into_iter()
            .filter(|i| {
                i.status == Status::Running
                    && i.labels.get(LABEL_SERVICE).map(String::as_str) == Some("web")
            })
            .map(|i| i.id)
            .collect()
    }

    /// Instances die, releases replace them and the service is destroyed, at random points,
    /// while the data plane fails some of its routes and closes: every instance is unrouted
    /// (or its endpoint closed) before it is stopped or removed. Before, a dead instance was
    /// removed (its lease given back) in the pass before that pass unrouted it; a drained one
    /// was stopped by the pass after a failed unrouting; and a destroyed service whose close
    /// failed was stopped by the next pass with its endpoint still routing.
    #[test]
    fn nothing_is_stopped_or_removed_while_it_is_routed() {
        let (_dir, db, runtime) = super::super::test_support::db_and_runtime();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let provider = Arc::new(Checked {
            fake: FakeProvider::new(),
            seen: seen.clone(),
        });
        let fail_next_close = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut rng = Rng::new();
        let plane = Plane {
            seen: seen.clone(),
            rng: Rng(rng.below(u64::MAX) | 1),
            fail_one_in: 4,
            fail_next_close: fail_next_close.clone(),
        };
        let mut controller = Controller::new(
            db,
            provider.clone(),
            runtime.handle().clone(),
            Engine::Embedded,
        )
        .with_data_plane(Box::new(plane));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let spec = |version: u64| -> ServiceSpec {
            serde_json::from_value(serde_json::json!({
                "image": "web", "replicas": 4, "network": "host", "port": port,
                "env": {"V": version.to_string()},
                "rollout": {"max_surge": 2, "max_unavailable": 1, "drain": "0s"},
            }))
            .unwrap()
        };
        let release = |controller: &mut Controller, version: u64| {
            controller
                .db
                .record_release(
                    "web",
                    &spec(version),
                    &Digest::of(b"web"),
                    "apply",
                    None,
                    "t",
                )
                .unwrap();
        };
        let mut version = 1;
        release(&mut controller, version);
        let mut killed = 0;
        for _ in 0..100 {
            match rng.below(10) {
                0..=2 => {
                    let live = running(&provider);
                    if !live.is_empty() {
                        let id = &live[rng.below(live.len() as u64) as usize];
                        provider.fake.exit(id, 1).unwrap();
                        killed += 1;
                    }
                }
                3 => {
                    version += 1;
                    release(&mut controller, version);
                }
                _ => {}
            }
            controller.pass().unwrap();
            // Launches and stops run beside the loop: sometimes the next pass comes before
            // they return, sometimes after.
            std::thread::sleep(Duration::from_millis(rng.below(4)));
        }
        // The tear-down of a service that is routed (so that its close matters), its first
        // close failing. A new release first: the last one may have failed (its instances
        // were killed) and hold still with none. The bounds below are for a hung controller
        // only: passes and launches take what they take.
        release(&mut controller, version + 1);
        let deadline = std::time::Instant::now() + Duration::from_secs(240);
        while lock(&seen).routed.get("web").is_none_or(|r| r.len() < 4) {
            assert!(
                std::time::Instant::now() < deadline,
                "the service was never routed to 4 instances"
            );
            controller.pass().unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        fail_next_close.store(true, std::sync::atomic::Ordering::SeqCst);
        controller.db.destroy("web", "t").unwrap();
        while !provider.fake.list().unwrap().is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the destroyed service's instances were never removed"
            );
            controller.pass().unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        let seen = lock(&seen);
        assert!(
            seen.violations.is_empty(),
            "stopped or removed while routed: {:#?}",
            seen.violations
        );
        // The run did what it is meant to check.
        assert!(killed > 0 && seen.removed > killed, "{killed} killed");
        assert!(seen.stopped > 0 && seen.failed_routes > 0 && seen.failed_closes > 0);
    }
}
