//! The controller's data plane, shared with the task watches of cluster services: a watch
//! routes the tasks it finds routable the moment it sees a change (a retired task out, a new
//! one in), without waiting for the next pass ([`SharedPlane::route_looked`]), and a pass that
//! looked at the engine before the watch did cannot put a retired task back
//! ([`SharedPlane::route_seen`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::dataplane::DataPlane;
use crate::error::DeployError;

/// A [`DataPlane`] behind a lock, cloned into each task watch. Every call holds the lock for
/// the data plane's own call only.
#[derive(Clone)]
pub(super) struct SharedPlane(Arc<Mutex<Shared>>);

struct Shared {
    plane: Box<dyn DataPlane>,
    /// What each endpoint routes, as last sent to the data plane.
    routed: BTreeMap<String, Vec<(String, SocketAddr)>>,
    /// Per cluster service, the tasks the latest look of its watch found routable (with their
    /// addresses), and when that look ended.
    watched: BTreeMap<String, (Instant, Vec<(String, SocketAddr)>)>,
}

impl SharedPlane {
    pub(super) fn new(plane: Box<dyn DataPlane>) -> SharedPlane {
        SharedPlane(Arc::new(Mutex::new(Shared {
            plane,
            routed: BTreeMap::new(),
            watched: BTreeMap::new(),
        })))
    }

    fn shared(&self) -> MutexGuard<'_, Shared> {
        // A panic in a data plane call leaves the maps as they were before it: keep going.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The data plane, for any call but routing and closing (held until the guard is dropped).
    pub(super) fn lock(&self) -> PlaneGuard<'_> {
        PlaneGuard(self.shared())
    }

    /// Closes `service`'s endpoint ([`DataPlane::close`]) and forgets its routes.
    pub(super) fn close(&self, service: &str) -> Result<(), DeployError> {
        let mut shared = self.shared();
        shared.plane.close(service)?;
        shared.routed.remove(service);
        Ok(())
    }

    /// Points `service`'s endpoint at `targets`, as a pass decided from what it saw of the
    /// engine starting at `seen` (`None`: a local service, no watch). When the service's watch
    /// looked later (its look ended at or after `seen`), the watch's routes stand instead: its
    /// look may be newer than the pass's, and a retired task routed again would get
    /// connections until the next pass, past the engine's stop. Only a look that is surely
    /// older than the pass's (it ended before the pass began to look) is set aside. Returns
    /// what is routed.
    pub(super) fn route_seen(
        &self,
        service: &str,
        mut targets: Vec<(String, SocketAddr)>,
        seen: Option<Instant>,
    ) -> Result<Vec<(String, SocketAddr)>, DeployError> {
        let mut shared = self.shared();
        if let Some(seen) = seen {
            match shared.watched.get(service) {
                Some((looked, routable)) if *looked >= seen => targets = routable.clone(),
                Some(_) => {
                    shared.watched.remove(service);
                }
                None => {}
            }
        }
        shared.plane.route(service, &targets)?;
        shared.routed.insert(service.to_owned(), targets.clone());
        Ok(targets)
    }

    /// What a watch of `service` found routable in a look that ended at `looked`: the endpoint
    /// routes exactly those from now on, a retired task out and a new one in, without waiting
    /// for a pass (only once a pass has routed the endpoint: the watch opens none). Returns
    /// whether the routes changed.
    pub(super) fn route_looked(
        &self,
        service: &str,
        looked: Instant,
        routable: Vec<(String, SocketAddr)>,
    ) -> Result<bool, DeployError> {
        let mut shared = self.shared();
        if shared
            .watched
            .get(service)
            .is_some_and(|(earlier, _)| *earlier > looked)
        {
            return Ok(false);
        }
        shared
            .watched
            .insert(service.to_owned(), (looked, routable.clone()));
        if shared.routed.get(service).is_none_or(|r| *r == routable) {
            return Ok(false);
        }
        shared.plane.route(service, &routable)?;
        shared.routed.insert(service.to_owned(), routable);
        Ok(true)
    }

    /// Forgets what a watch of `service` saw (the watch is gone).
    pub(super) fn unwatch(&self, service: &str) {
        self.shared().watched.remove(service);
    }
}

/// The locked data plane of a [`SharedPlane`].
pub(super) struct PlaneGuard<'a>(MutexGuard<'a, Shared>);

impl std::ops::Deref for PlaneGuard<'_> {
    type Target = dyn DataPlane;
    fn deref(&self) -> &Self::Target {
        self.0.plane.as_ref()
    }
}

impl std::ops::DerefMut for PlaneGuard<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.0.plane.as_mut()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::BTreeSet;
    use std::net::SocketAddrV4;
    use std::time::Duration;

    use super::*;
    use crate::dataplane::{EndpointStatus, Listening, LocalPlane};
    use crate::router::Routing;

    /// Records every route the data plane is sent; the rest is an in-process plane's.
    struct Recording(Arc<Mutex<Vec<Vec<String>>>>, LocalPlane);

    impl DataPlane for Recording {
        fn route(&mut self, _: &str, targets: &[(String, SocketAddr)]) -> Result<(), DeployError> {
            let ids = targets.iter().map(|(id, _)| id.clone()).collect();
            self.0.lock().unwrap().push(ids);
            Ok(())
        }
        fn listen(
            &mut self,
            name: &str,
            at: &[SocketAddr],
            how: &Routing,
        ) -> Result<Listening, DeployError> {
            self.1.listen(name, at, how)
        }
        fn close(&mut self, service: &str) -> Result<(), DeployError> {
            self.1.close(service)
        }
        fn connections(
            &mut self,
            service: &str,
            ids: &[String],
        ) -> Result<Vec<usize>, DeployError> {
            self.1.connections(service, ids)
        }
        fn keep_peers(&mut self, keep: &BTreeSet<SocketAddrV4>) -> Result<(), DeployError> {
            self.1.keep_peers(keep)
        }
        fn kernel_balancing(&self) -> bool {
            self.1.kernel_balancing()
        }
        fn take_kernel_failures(&mut self) -> Vec<String> {
            self.1.take_kernel_failures()
        }
        fn adopted(&self) -> Vec<EndpointStatus> {
            self.1.adopted()
        }
    }

    fn recording() -> (SharedPlane, Arc<Mutex<Vec<Vec<String>>>>) {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let plane = Recording(sent.clone(), LocalPlane::new(None));
        (SharedPlane::new(Box::new(plane)), sent)
    }

    fn targets(ids: &[&str]) -> Vec<(String, SocketAddr)> {
        ids.iter()
            .enumerate()
            .map(|(n, id)| {
                (
                    (*id).to_owned(),
                    SocketAddr::from(([127, 0, 0, 1], 9000 + n as u16)),
                )
            })
            .collect()
    }

    fn later(than: Instant) -> Instant {
        // Instants taken one after the other may be equal: wait until the clock moves.
        loop {
            let now = Instant::now();
            if now > than {
                return now;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The race the watch closes: a pass looks (a, b routable), the watch then finds b retired
    /// and takes it out at once, and the pass routes what it saw afterwards: b stays out. The
    /// watch adds a new task too; a pass that looked after the watch's look routes what it saw.
    #[test]
    fn a_task_the_watch_retired_stays_out_of_a_pass_that_looked_before_it() {
        let (plane, sent) = recording();
        let first = Instant::now();
        plane
            .route_seen("web", targets(&["a", "b"]), Some(first))
            .unwrap();
        let pass_looked = later(first);
        let watch_looked = later(pass_looked);
        assert!(
            plane
                .route_looked("web", watch_looked, targets(&["a"]))
                .unwrap(),
            "taken out by the watch itself"
        );
        let routed = plane
            .route_seen("web", targets(&["a", "b"]), Some(pass_looked))
            .unwrap();
        assert_eq!(
            routed,
            targets(&["a"]),
            "the stale pass does not put b back"
        );
        let sent_ids = |n: usize| sent.lock().unwrap()[n].clone();
        assert_eq!(sent_ids(1), vec!["a".to_owned()]);
        assert_eq!(sent_ids(2), vec!["a".to_owned()]);
        // A look older than the watch's latest changes nothing.
        assert!(
            !plane
                .route_looked("web", pass_looked, targets(&[]))
                .unwrap()
        );
        assert_eq!(sent.lock().unwrap().len(), 3, "nothing sent");
        // A new task is routed by the watch too, without waiting for a pass.
        let newer = later(watch_looked);
        assert!(
            plane
                .route_looked("web", newer, targets(&["a", "c"]))
                .unwrap()
        );
        assert_eq!(sent_ids(3), vec!["a".to_owned(), "c".into()]);
        let pass_after = later(newer);
        let routed = plane
            .route_seen("web", targets(&["a", "b", "c"]), Some(pass_after))
            .unwrap();
        assert_eq!(
            routed,
            targets(&["a", "b", "c"]),
            "a pass that looked after the watch decides (a pod ready again)"
        );
        // The watch opens no endpoint: a service no pass routed gets nothing from it.
        assert!(
            !plane
                .route_looked("api", later(pass_after), targets(&["z"]))
                .unwrap()
        );
        // Local services (no look) are routed as asked.
        plane.route_seen("local", targets(&["x"]), None).unwrap();
        assert_eq!(sent.lock().unwrap().last().unwrap(), &vec!["x".to_owned()]);
        assert_eq!(sent.lock().unwrap().len(), 6);
    }

    /// A pass and a watch side by side, each at random moments: whenever the watch's look that
    /// retired a task has returned, no route sent afterwards holds it, whichever pass sends it.
    #[test]
    fn no_route_sent_after_a_retirement_holds_the_retired_task() {
        let (plane, sent) = recording();
        let ids: Vec<String> = (0..40).map(|n| format!("t{n}")).collect();
        // Task n is routable from look n/2 until look n/2 + 3 (a rolling update): the engine's
        // state at "time" k is the window [2k-6, 2k].
        let state = |k: usize| -> BTreeSet<String> {
            ids.iter()
                .enumerate()
                .filter(|(n, _)| *n <= 2 * k && 2 * k < n + 7)
                .map(|(_, id)| id.clone())
                .collect()
        };
        let clock = Arc::new(Mutex::new(0usize));
        let retired_at: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
        std::thread::scope(|scope| {
            let (plane_w, clock_w, retired_w) = (plane.clone(), clock.clone(), retired_at.clone());
            let (state_w, sent_w) = (state, sent.clone());
            scope.spawn(move || {
                for k in 1..20 {
                    *clock_w.lock().unwrap() = k;
                    let now = state_w(k);
                    let looked = Instant::now();
                    let routable: Vec<_> = now
                        .iter()
                        .map(|id| (id.clone(), SocketAddr::from(([127, 0, 0, 1], 9000))))
                        .collect();
                    plane_w.route_looked("web", looked, routable).unwrap();
                    let mut retired = retired_w.lock().unwrap();
                    for n in 0..40 {
                        let id = format!("t{n}");
                        if n < 2 * k && !now.contains(&id) {
                            retired.entry(id).or_insert(sent_len(&sent_w));
                        }
                    }
                    drop(retired);
                    std::thread::sleep(Duration::from_micros(300 + (k as u64 * 37) % 500));
                }
            });
            let (plane_p, clock_p) = (plane.clone(), clock.clone());
            scope.spawn(move || {
                for round in 0..60u64 {
                    let seen = Instant::now();
                    let k = *clock_p.lock().unwrap();
                    let saw = state(k);
                    // A slow pass: it routes well after its look.
                    std::thread::sleep(Duration::from_micros(200 + (round * 53) % 900));
                    let targets: Vec<_> = saw
                        .iter()
                        .map(|id| (id.clone(), SocketAddr::from(([127, 0, 0, 1], 9000))))
                        .collect();
                    plane_p.route_seen("web", targets, Some(seen)).unwrap();
                }
            });
        });
        let sent = sent.lock().unwrap();
        let retired = retired_at.lock().unwrap();
        assert!(!retired.is_empty());
        for (id, from) in retired.iter() {
            for (n, route) in sent.iter().enumerate().skip(*from) {
                assert!(
                    !route.contains(id),
                    "route {n} holds {id}, retired before route {from}: {route:?}"
                );
            }
        }
    }

    fn sent_len(sent: &Arc<Mutex<Vec<Vec<String>>>>) -> usize {
        sent.lock().unwrap().len()
    }
}
