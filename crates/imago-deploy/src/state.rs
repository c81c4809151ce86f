//! The deployment state: one SQLite database file under the imago home.
//!
//! Releases and events are append-only: a release row is never updated, and what happens to a
//! release (completed, failed, rolled back) is recorded as a new outcome row and event. WAL mode
//! and `synchronous = FULL` make every committed transaction survive kill -9 and power loss.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use imago_oci::{Digest, to_canonical_json};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::Serialize;

use crate::error::DeployError;
use crate::spec::ServiceSpec;

/// Migrations, applied in order; the index + 1 is the schema version.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE releases (
    service      TEXT NOT NULL,
    number       INTEGER NOT NULL,
    image_digest TEXT NOT NULL,
    config_hash  TEXT NOT NULL,
    revision     TEXT NOT NULL,
    spec_json    TEXT NOT NULL,
    created_ms   INTEGER NOT NULL,
    reason       TEXT NOT NULL,
    rollback_of  INTEGER,
    PRIMARY KEY (service, number)
) STRICT;
CREATE TABLE release_outcomes (
    service  TEXT NOT NULL,
    number   INTEGER NOT NULL,
    outcome  TEXT NOT NULL,
    detail   TEXT NOT NULL,
    at_ms    INTEGER NOT NULL,
    FOREIGN KEY (service, number) REFERENCES releases(service, number)
) STRICT;
CREATE TABLE services (
    name            TEXT PRIMARY KEY,
    desired_release INTEGER,
    destroyed       INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE TABLE instances (
    id           TEXT PRIMARY KEY,
    service      TEXT NOT NULL,
    release      INTEGER NOT NULL,
    revision     TEXT NOT NULL,
    image_digest TEXT NOT NULL,
    address      TEXT,
    state        TEXT NOT NULL,
    created_ms   INTEGER NOT NULL,
    updated_ms   INTEGER NOT NULL,
    drain_deadline_ms INTEGER
) STRICT;
CREATE TABLE rollouts (
    service          TEXT PRIMARY KEY,
    target_release   INTEGER NOT NULL,
    started_ms       INTEGER NOT NULL,
    last_progress_ms INTEGER NOT NULL,
    counts_json      TEXT NOT NULL
) STRICT;
CREATE TABLE events (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms    INTEGER NOT NULL,
    service  TEXT,
    kind     TEXT NOT NULL,
    message  TEXT NOT NULL,
    actor    TEXT NOT NULL
) STRICT;
"#,
    r#"
CREATE TABLE tainted_images (
    image_digest TEXT PRIMARY KEY,
    at_ms        INTEGER NOT NULL
) STRICT;
"#,
    // Since when each instance passes its health check, so that a restarted controller
    // neither takes a serving instance for a starting one nor restarts its min_ready.
    r#"
CREATE TABLE instance_ready (
    id       TEXT PRIMARY KEY,
    since_ms INTEGER NOT NULL
) STRICT;
CREATE TABLE service_faults (
    service  TEXT PRIMARY KEY,
    reason   TEXT NOT NULL,
    since_ms INTEGER NOT NULL
) STRICT;
"#,
    // `restart`: how often the release's instances were asked to be replaced by new ones of the
    // same image and configuration (part of the revision, not of the configuration hash).
    // `paused_services`: services whose rollouts launch and retire nothing until resumed.
    r#"
ALTER TABLE releases ADD COLUMN restart INTEGER NOT NULL DEFAULT 0;
CREATE TABLE paused_services (
    service  TEXT PRIMARY KEY,
    since_ms INTEGER NOT NULL,
    actor    TEXT NOT NULL
) STRICT;
"#,
];

/// One immutable release: a service pinned to an image digest and its full configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Release {
    pub service: String,
    pub number: u64,
    pub image_digest: Digest,
    /// sha256 of the canonical JSON of the configuration (with the image resolved to its digest).
    pub config_hash: Digest,
    /// sha256 over digest + config hash: instances with equal revisions are interchangeable.
    pub revision: String,
    pub spec: ServiceSpec,
    pub created_ms: u64,
    /// Why it was made: "apply", "rollback to 2", "automatic rollback: ...".
    pub reason: String,
    pub rollback_of: Option<u64>,
    /// The restart generation: 0, or how many times `imago restart` asked for new instances of
    /// the same image and configuration. It changes the revision (so every instance is
    /// replaced, and old ones are of another revision until then) but not the configuration
    /// hash; a later release keeps it, so an unchanged `apply` after a restart changes nothing.
    pub restart: u64,
}

/// What a release's rollout ended as. The database records `Complete` and `Failed`;
/// [`StateDb::settled`] adds what the automatic rollback after a failure became. Shown and
/// serialized as "complete", "failed", "rolled back", "failed, and rollback failed".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReleaseOutcome {
    Complete,
    Failed,
    /// Failed, and the automatic rollback completed.
    RolledBack,
    /// Failed, and so did the automatic rollback.
    RollbackFailed,
}

impl ReleaseOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            ReleaseOutcome::Complete => "complete",
            ReleaseOutcome::Failed => "failed",
            ReleaseOutcome::RolledBack => "rolled back",
            ReleaseOutcome::RollbackFailed => "failed, and rollback failed",
        }
    }

    fn parse(text: &str) -> Option<ReleaseOutcome> {
        [
            ReleaseOutcome::Complete,
            ReleaseOutcome::Failed,
            ReleaseOutcome::RolledBack,
            ReleaseOutcome::RollbackFailed,
        ]
        .into_iter()
        .find(|o| o.as_str() == text)
    }
}

impl std::fmt::Display for ReleaseOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ReleaseOutcome {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl rusqlite::types::ToSql for ReleaseOutcome {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(self.as_str().into())
    }
}

impl rusqlite::types::FromSql for ReleaseOutcome {
    fn column_result(
        value: rusqlite::types::ValueRef<'_>,
    ) -> rusqlite::types::FromSqlResult<ReleaseOutcome> {
        let text = value.as_str()?;
        ReleaseOutcome::parse(text).ok_or_else(|| {
            rusqlite::types::FromSqlError::Other(format!("unknown release outcome {text:?}").into())
        })
    }
}

/// How a release's rollout ended, following the automatic rollback after a failure
/// ([`StateDb::settled`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    pub outcome: ReleaseOutcome,
    /// The release's own outcome detail (why it failed).
    pub detail: String,
    /// The release an automatic rollback restored.
    pub rolled_back_to: Option<u64>,
}

/// What a release's rollout ended as.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outcome {
    pub number: u64,
    pub outcome: ReleaseOutcome,
    pub detail: String,
    pub at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    pub seq: u64,
    pub at_ms: u64,
    pub service: Option<String>,
    pub kind: String,
    pub message: String,
    pub actor: String,
}

/// The configuration hash and revision of `spec` pinned to `digest`. The `tls` files are left
/// out: they are the endpoint's, read by the data plane's front, never by an instance, so a
/// change of their paths (the same imago.toml applied from another checkout) or of their
/// content replaces no instance.
pub fn fingerprint(spec: &ServiceSpec, digest: &Digest) -> Result<(Digest, String), DeployError> {
    let mut pinned = spec.clone();
    pinned.image = digest.to_string();
    pinned.tls = None;
    let bytes = to_canonical_json(&pinned).map_err(|e| DeployError::Encode {
        what: "service configuration",
        source: serde_json::Error::io(std::io::Error::other(e.to_string())),
    })?;
    let config_hash = Digest::of(&bytes);
    let revision =
        Digest::of(format!("{digest}\n{config_hash}").as_bytes()).hex()[..16].to_string();
    Ok((config_hash, revision))
}

/// The revision of a release whose plain revision is `revision` at restart generation
/// `restart`: generation 0 is the plain revision, so no release recorded before restarts
/// existed changes its revision.
pub fn restarted_revision(revision: &str, restart: u64) -> String {
    if restart == 0 {
        return revision.to_owned();
    }
    Digest::of(format!("{revision}\nrestart {restart}").as_bytes()).hex()[..16].to_string()
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A paused service: since when, and who paused it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Paused {
    pub since_ms: u64,
    pub actor: String,
}

/// A rollout in progress, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RolloutRow {
    pub target_release: u64,
    pub started_ms: u64,
    pub last_progress_ms: u64,
    pub counts_json: String,
}

pub struct StateDb {
    path: PathBuf,
    conn: Connection,
}

impl StateDb {
    /// Opens (creating and migrating) the database at `path`.
    pub fn open(path: &Path) -> Result<StateDb, DeployError> {
        let db_err = |source| DeployError::Database {
            path: path.to_path_buf(),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| DeployError::Database {
                path: path.to_path_buf(),
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            })?;
        }
        let mut conn = Connection::open(path).map_err(db_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(db_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db_err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db_err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(db_err)?;
        let known = MIGRATIONS.len() as i64;
        // Readers (status, the API, gc roots) open the database often: a schema that is already
        // current needs no write transaction (and no fsync).
        let current: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(db_err)?;
        if current == known {
            return Ok(StateDb {
                path: path.to_path_buf(),
                conn,
            });
        }
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db_err)?;
        // Read again under the write lock: another process may have migrated meanwhile.
        let version: i64 = tx
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(db_err)?;
        if version > known {
            return Err(DeployError::SchemaTooNew {
                path: path.to_path_buf(),
                found: version,
                known,
            });
        }
        for migration in &MIGRATIONS[version as usize..] {
            tx.execute_batch(migration).map_err(db_err)?;
        }
        tx.pragma_update(None, "user_version", known)
            .map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        Ok(StateDb {
            path: path.to_path_buf(),
            conn,
        })
    }

    /// One row of `sql`, through the connection's statement cache: the API builds an
    /// overview from several queries per service, and preparing them anew each time was most
    /// of its cost.
    fn row<T, P: rusqlite::Params>(
        &self,
        sql: &str,
        params: P,
        f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        self.conn.prepare_cached(sql)?.query_row(params, f)
    }

    fn err(&self, source: rusqlite::Error) -> DeployError {
        DeployError::Database {
            path: self.path.clone(),
            source,
        }
    }

    /// Runs `body` in one immediate transaction and commits what it wrote.
    fn in_transaction<T>(
        &mut self,
        body: impl FnOnce(&rusqlite::Transaction<'_>, &Path) -> Result<T, DeployError>,
    ) -> Result<T, DeployError> {
        let path = self.path.clone();
        let db_err = |source| DeployError::Database {
            path: path.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db_err)?;
        let value = body(&tx, &path)?;
        tx.commit().map_err(db_err)?;
        Ok(value)
    }

    /// Records a new release for `service` unless its latest release already pins the same
    /// digest and configuration. Returns the release and whether it is new.
    pub fn record_release(
        &mut self,
        service: &str,
        spec: &ServiceSpec,
        digest: &Digest,
        reason: &str,
        rollback_of: Option<u64>,
        actor: &str,
    ) -> Result<(Release, bool), DeployError> {
        let new = self.in_transaction(|tx, path| {
            insert_release(
                tx,
                path,
                service,
                spec,
                digest,
                reason,
                rollback_of,
                actor,
                None,
            )
        })?;
        match new {
            NewRelease::Recorded(release) => Ok((*release, true)),
            NewRelease::Unchanged(current) => Ok((self.release(service, current)?, false)),
        }
    }

    /// Records the release that restores `target` (a manual rollback): its image,
    /// configuration and restart generation, so that its instances that still run count.
    pub fn record_restored(
        &mut self,
        target: &Release,
        reason: &str,
        actor: &str,
    ) -> Result<Release, DeployError> {
        let new = self.in_transaction(|tx, path| {
            insert_release(
                tx,
                path,
                &target.service,
                &target.spec,
                &target.image_digest,
                reason,
                Some(target.number),
                actor,
                Some(target.restart),
            )
        })?;
        match new {
            NewRelease::Recorded(release) => Ok(*release),
            NewRelease::Unchanged(current) => self.release(&target.service, current),
        }
    }

    /// Records a restart of `service`: a release of the desired one's image and configuration
    /// at the next restart generation, which the controller rolls out like an update.
    pub fn record_restart(&mut self, service: &str, actor: &str) -> Result<Release, DeployError> {
        let new = self.in_transaction(|tx, path| {
            let current = tx
                .query_row(
                    "SELECT r.service, r.number, r.image_digest, r.config_hash, r.revision, r.spec_json,
                            r.created_ms, r.reason, r.rollback_of, r.restart
                     FROM releases r JOIN services s ON s.name = r.service AND s.desired_release = r.number
                     WHERE r.service = ?1 AND s.destroyed = 0",
                    [service],
                    Self::row_to_release,
                )
                .optional()
                .map_err(|source| DeployError::Database {
                    path: path.to_path_buf(),
                    source,
                })?
                .ok_or_else(|| DeployError::NoService(service.to_owned()))?;
            insert_release(
                tx,
                path,
                service,
                &current.spec,
                &current.image_digest,
                &format!("restart of release {}", current.number),
                None,
                actor,
                Some(current.restart + 1),
            )
        })?;
        match new {
            NewRelease::Recorded(release) => Ok(*release),
            NewRelease::Unchanged(current) => self.release(service, current),
        }
    }

    /// Pauses the rollouts of `service`: the controller launches and retires nothing for it
    /// until [`StateDb::resume`]. Returns whether it was running (not paused already).
    pub fn pause(&self, service: &str, actor: &str) -> Result<bool, DeployError> {
        let now = now_ms();
        let changed = self
            .conn
            .execute(
                "INSERT INTO paused_services (service, since_ms, actor) VALUES (?1, ?2, ?3)
                 ON CONFLICT(service) DO NOTHING",
                params![service, now, actor],
            )
            .map_err(|e| self.err(e))?;
        if changed > 0 {
            self.event(
                Some(service),
                "pause",
                "rollouts paused: nothing is launched or retired until resumed",
                actor,
            )?;
        }
        Ok(changed > 0)
    }

    /// Resumes the rollouts of `service`. The progress deadline of a rollout in progress counts
    /// from now: time spent paused is not a rollout that stopped progressing. Returns whether
    /// it was paused.
    pub fn resume(&self, service: &str, actor: &str) -> Result<bool, DeployError> {
        let changed = self
            .conn
            .execute("DELETE FROM paused_services WHERE service = ?1", [service])
            .map_err(|e| self.err(e))?;
        if changed > 0 {
            self.conn
                .execute(
                    "UPDATE rollouts SET last_progress_ms = ?2 WHERE service = ?1",
                    params![service, now_ms()],
                )
                .map_err(|e| self.err(e))?;
            self.event(Some(service), "resume", "rollouts resumed", actor)?;
        }
        Ok(changed > 0)
    }

    /// Since when and by whom `service`'s rollouts are paused, if they are.
    pub fn paused(&self, service: &str) -> Result<Option<Paused>, DeployError> {
        self.row(
            "SELECT since_ms, actor FROM paused_services WHERE service = ?1",
            [service],
            |r| {
                Ok(Paused {
                    since_ms: r.get(0)?,
                    actor: r.get(1)?,
                })
            },
        )
        .optional()
        .map_err(|e| self.err(e))
    }

    /// Records that release `failed` of `service` failed and, with `rollback_to`, the release
    /// that rolls back to it, in ONE transaction: whoever sees the failure also sees the
    /// rollback, and a controller killed in between cannot lose the rollback (it would find a
    /// failed release with nothing to roll back to and hold still).
    pub fn record_failure(
        &mut self,
        service: &str,
        failed: u64,
        detail: &str,
        rollback_to: Option<&Release>,
        actor: &str,
    ) -> Result<Option<Release>, DeployError> {
        self.in_transaction(|tx, path| {
            let db_err = |source| DeployError::Database {
                path: path.to_path_buf(),
                source,
            };
            insert_outcome(tx, service, failed, ReleaseOutcome::Failed, detail, actor)
                .map_err(db_err)?;
            let Some(good) = rollback_to else {
                return Ok(None);
            };
            let reason = format!("automatic rollback: release {failed} failed");
            let NewRelease::Recorded(rollback) = insert_release(
                tx,
                path,
                service,
                &good.spec,
                &good.image_digest,
                &reason,
                Some(good.number),
                actor,
                // Its own generation: the good release's instances that still run are its own.
                Some(good.restart),
            )?
            else {
                return Ok(None);
            };
            tx.execute(
                "INSERT INTO events (at_ms, service, kind, message, actor) VALUES (?1, ?2, 'rollback', ?3, ?4)",
                params![
                    now_ms(),
                    service,
                    format!(
                        "rolled back to release {} (as release {}) after release {failed} failed",
                        good.number, rollback.number
                    ),
                    actor
                ],
            )
            .map_err(db_err)?;
            Ok(Some(*rollback))
        })
    }

    fn row_to_release(row: &rusqlite::Row<'_>) -> rusqlite::Result<Release> {
        fn column<T, E: std::error::Error + Send + Sync + 'static>(
            index: usize,
            value: Result<T, E>,
        ) -> rusqlite::Result<T> {
            value.map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(
                    index,
                    rusqlite::types::Type::Text,
                    Box::new(e),
                )
            })
        }
        Ok(Release {
            service: row.get(0)?,
            number: row.get(1)?,
            image_digest: column(2, row.get::<_, String>(2)?.parse::<Digest>())?,
            config_hash: column(3, row.get::<_, String>(3)?.parse::<Digest>())?,
            revision: row.get(4)?,
            spec: column(
                5,
                ServiceSpec::from_recorded_json(&row.get::<_, String>(5)?),
            )?,
            created_ms: row.get(6)?,
            reason: row.get(7)?,
            rollback_of: row.get(8)?,
            restart: row.get(9)?,
        })
    }

    pub fn release(&self, service: &str, number: u64) -> Result<Release, DeployError> {
        self.row(
                "SELECT service, number, image_digest, config_hash, revision, spec_json, created_ms, reason, rollback_of, restart
                 FROM releases WHERE service = ?1 AND number = ?2",
                params![service, number],
                Self::row_to_release,
            )
            .optional()
            .map_err(|e| self.err(e))?
            .ok_or_else(|| DeployError::UnknownRelease { service: service.to_owned(), number })
    }

    /// The newest release of `service` with `revision`, if any.
    pub fn release_with_revision(
        &self,
        service: &str,
        revision: &str,
    ) -> Result<Option<Release>, DeployError> {
        self.row(
                "SELECT service, number, image_digest, config_hash, revision, spec_json, created_ms, reason, rollback_of, restart
                 FROM releases WHERE service = ?1 AND revision = ?2 ORDER BY number DESC LIMIT 1",
                params![service, revision],
                Self::row_to_release,
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Every release of `service`, oldest first.
    pub fn history(&self, service: &str) -> Result<Vec<Release>, DeployError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT service, number, image_digest, config_hash, revision, spec_json, created_ms, reason, rollback_of, restart
                 FROM releases WHERE service = ?1 ORDER BY number",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([service], Self::row_to_release)
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    /// The release `service` should run, if it exists and was not destroyed.
    pub fn desired(&self, service: &str) -> Result<Option<Release>, DeployError> {
        let number: Option<u64> = self
            .row(
                "SELECT desired_release FROM services WHERE name = ?1 AND destroyed = 0",
                [service],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?
            .flatten();
        number.map(|n| self.release(service, n)).transpose()
    }

    /// Services that are deployed (not destroyed), by name.
    pub fn services(&self) -> Result<Vec<String>, DeployError> {
        let mut stmt = self
            .conn
            .prepare("SELECT name FROM services WHERE destroyed = 0 ORDER BY name")
            .map_err(|e| self.err(e))?;
        let names = stmt
            .query_map([], |r| r.get(0))
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<String>, _>>()
            .map_err(|e| self.err(e))?;
        Ok(names)
    }

    /// Records what became of a release's rollout.
    pub fn record_outcome(
        &mut self,
        service: &str,
        number: u64,
        outcome: ReleaseOutcome,
        detail: &str,
        actor: &str,
    ) -> Result<(), DeployError> {
        self.in_transaction(|tx, path| {
            insert_outcome(tx, service, number, outcome, detail, actor).map_err(|source| {
                DeployError::Database {
                    path: path.to_path_buf(),
                    source,
                }
            })
        })
    }

    /// How the rollout of release `number` ended, once it has: a failure that an automatic
    /// rollback followed is settled when the rollback is, as "rolled back" (or "failed, and
    /// rollback OUTCOME"). `None` while either is still under way.
    pub fn settled(&self, service: &str, number: u64) -> Result<Option<Settled>, DeployError> {
        let Some(outcome) = self.outcome_of(service, number)? else {
            return Ok(None);
        };
        let own = Settled {
            outcome: outcome.outcome,
            detail: outcome.detail,
            rolled_back_to: None,
        };
        if outcome.outcome != ReleaseOutcome::Failed {
            return Ok(Some(own));
        }
        let rollback = self
            .history(service)?
            .into_iter()
            .find(|r| r.number > number && r.rollback_of.is_some());
        let Some(rollback) = rollback else {
            return Ok(Some(own));
        };
        Ok(self.outcome_of(service, rollback.number)?.map(|o| Settled {
            outcome: if o.outcome == ReleaseOutcome::Complete {
                ReleaseOutcome::RolledBack
            } else {
                ReleaseOutcome::RollbackFailed
            },
            rolled_back_to: rollback.rollback_of,
            ..own
        }))
    }

    pub fn outcomes(&self, service: &str) -> Result<Vec<Outcome>, DeployError> {
        let mut stmt = self
            .conn
            .prepare("SELECT number, outcome, detail, at_ms FROM release_outcomes WHERE service = ?1 ORDER BY rowid")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([service], |r| {
                Ok(Outcome {
                    number: r.get(0)?,
                    outcome: r.get(1)?,
                    detail: r.get(2)?,
                    at_ms: r.get(3)?,
                })
            })
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    /// The newest release of `service` whose rollout completed: where automatic rollback goes.
    pub fn last_completed(&self, service: &str) -> Result<Option<Release>, DeployError> {
        let number: Option<u64> = self.row(
                "SELECT number FROM release_outcomes WHERE service = ?1 AND outcome = 'complete' ORDER BY rowid DESC LIMIT 1",
                [service],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        number.map(|n| self.release(service, n)).transpose()
    }

    /// The release a manual rollback of `current`'s service restores: release `to` when it is
    /// given, else the highest-numbered release whose last outcome is "complete" and whose
    /// image or configuration differs from `current`'s (so a second rollback undoes the first,
    /// and a restart, which changes neither, is never the target). Unlike
    /// [`StateDb::last_completed`] (where an automatic rollback goes), a release that completed
    /// and later failed is passed over, and so is one that runs what `current` already runs.
    pub fn rollback_target(
        &self,
        current: &Release,
        to: Option<u64>,
    ) -> Result<Release, DeployError> {
        let service = &current.service;
        if let Some(number) = to {
            return self.release(service, number);
        }
        for release in self.history(service)?.into_iter().rev() {
            if (&release.image_digest, &release.config_hash)
                != (&current.image_digest, &current.config_hash)
                && self
                    .outcome_of(service, release.number)?
                    .is_some_and(|o| o.outcome == ReleaseOutcome::Complete)
            {
                return Ok(release);
            }
        }
        Err(DeployError::NothingToRollBackTo(service.clone()))
    }

    /// Every recorded rollout end, oldest first: service, outcome and how long it took from
    /// its release's creation (the metrics' rollout counters and duration histogram).
    pub fn rollout_ends(&self) -> Result<Vec<(String, ReleaseOutcome, u64)>, DeployError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT o.service, o.outcome, MAX(o.at_ms - r.created_ms, 0)
                 FROM release_outcomes o JOIN releases r
                   ON r.service = o.service AND r.number = o.number
                 ORDER BY o.at_ms",
            )
            .map_err(|e| self.err(e))?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))
    }

    /// How many events of `kind` each service has (the metrics' drift counter; the overview's
    /// drift count).
    pub fn event_counts(&self, kind: &str) -> Result<BTreeMap<String, u64>, DeployError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT COALESCE(service, ''), COUNT(*) FROM events WHERE kind = ?1
                 GROUP BY service",
            )
            .map_err(|e| self.err(e))?;
        stmt.query_map([kind], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|e| self.err(e))?
            .collect::<Result<BTreeMap<_, _>, _>>()
            .map_err(|e| self.err(e))
    }

    /// Starts a batch: the writes until [`StateDb::end_batch`] commit together, with one wait
    /// for the disk instead of one per statement (a pass that records hundreds of instances
    /// ready or retired waited for hundreds). Returns false, starting nothing, inside a batch
    /// or transaction already open.
    pub fn begin_batch(&self) -> Result<bool, DeployError> {
        if !self.conn.is_autocommit() {
            return Ok(false);
        }
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(|e| self.err(e))?;
        Ok(true)
    }

    /// Ends the batch [`StateDb::begin_batch`] started: commits it, or with `keep = false`
    /// (the work it recorded failed midway) rolls it back.
    pub fn end_batch(&self, keep: bool) -> Result<(), DeployError> {
        if self.conn.is_autocommit() {
            return Ok(());
        }
        let sql = if keep { "COMMIT" } else { "ROLLBACK" };
        self.conn.execute_batch(sql).map_err(|e| self.err(e))
    }

    /// Counts this connection's commits from now on (tests that count transactions).
    #[cfg(test)]
    pub(crate) fn count_commits(&mut self) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = count.clone();
        let hooked = self.conn.commit_hook(Some(move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            false
        }));
        assert!(hooked.is_ok(), "cannot hook commits: {hooked:?}");
        count
    }

    /// Appends an event.
    pub fn event(
        &self,
        service: Option<&str>,
        kind: &str,
        message: &str,
        actor: &str,
    ) -> Result<(), DeployError> {
        self.conn
            .execute(
                "INSERT INTO events (at_ms, service, kind, message, actor) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![now_ms(), service, kind, message, actor],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// The sequence number of the newest event (0 when there is none).
    pub fn last_event_seq(&self) -> Result<u64, DeployError> {
        self.row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| r.get(0))
            .map_err(|e| self.err(e))
    }

    /// Events after `since` (a sequence number), oldest first.
    pub fn events(&self, service: Option<&str>, since: u64) -> Result<Vec<Event>, DeployError> {
        self.query_events(
            "SELECT seq, at_ms, service, kind, message, actor FROM events
             WHERE seq > ?1 AND (?2 IS NULL OR service = ?2) ORDER BY seq",
            params![since, service],
        )
    }

    /// The last `n` events of `service`, oldest first (without reading its whole history).
    pub fn recent_events(&self, service: &str, n: u64) -> Result<Vec<Event>, DeployError> {
        let mut events = self.query_events(
            "SELECT seq, at_ms, service, kind, message, actor FROM events
             WHERE service = ?1 ORDER BY seq DESC LIMIT ?2",
            params![service, n],
        )?;
        events.reverse();
        Ok(events)
    }

    fn query_events(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<Event>, DeployError> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params, |r| {
                Ok(Event {
                    seq: r.get(0)?,
                    at_ms: r.get(1)?,
                    service: r.get(2)?,
                    kind: r.get(3)?,
                    message: r.get(4)?,
                    actor: r.get(5)?,
                })
            })
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    /// Image digests of the newest `keep` releases of every service: gc roots, so that any
    /// retained release can be rolled back to.
    pub fn retained_digests(&self, keep: u64) -> Result<Vec<Digest>, DeployError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT DISTINCT image_digest FROM releases r
                 WHERE number > (SELECT MAX(number) FROM releases WHERE service = r.service) - ?1",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([keep], |r| r.get::<_, String>(0))
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        let mut digests = Vec::new();
        for text in rows {
            digests.push(text.parse().map_err(|e: imago_oci::DigestError| {
                self.err(rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
            })?);
        }
        digests.sort();
        Ok(digests)
    }

    /// Records that the unpacked tree of `digest` was found modified at `at_ms` and set aside:
    /// every instance created until then runs from the modified tree and is replaced. Kept in
    /// the database so that a restarted controller, or one that was not running when
    /// `imago drift` found it, still replaces them.
    pub fn record_taint(&self, digest: &Digest, at_ms: u64) -> Result<(), DeployError> {
        self.conn
            .execute(
                "INSERT INTO tainted_images (image_digest, at_ms) VALUES (?1, ?2)
                 ON CONFLICT(image_digest) DO UPDATE SET at_ms = MAX(at_ms, excluded.at_ms)",
                params![digest.to_string(), at_ms],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Images whose unpacked tree was set aside as modified, and when (the latest time).
    pub fn tainted(&self) -> Result<HashMap<Digest, u64>, DeployError> {
        let mut tainted = HashMap::new();
        for (text, at_ms) in
            self.text_and_number("SELECT image_digest, at_ms FROM tainted_images")?
        {
            let digest = text.parse().map_err(|e: imago_oci::DigestError| {
                self.err(rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
            })?;
            tainted.insert(digest, at_ms);
        }
        Ok(tainted)
    }

    /// The latest outcome recorded for release `number` of `service`.
    pub fn outcome_of(&self, service: &str, number: u64) -> Result<Option<Outcome>, DeployError> {
        self.row(
            "SELECT number, outcome, detail, at_ms FROM release_outcomes
                 WHERE service = ?1 AND number = ?2 ORDER BY rowid DESC LIMIT 1",
            params![service, number],
            |r| {
                Ok(Outcome {
                    number: r.get(0)?,
                    outcome: r.get(1)?,
                    detail: r.get(2)?,
                    at_ms: r.get(3)?,
                })
            },
        )
        .optional()
        .map_err(|e| self.err(e))
    }

    /// Records that the controller took `id` out of the endpoint and will stop it once drained
    /// or at `deadline_ms`. Kept across controller restarts, so draining resumes.
    pub fn mark_draining(
        &self,
        id: &str,
        service: &str,
        release: u64,
        revision: &str,
        deadline_ms: u64,
    ) -> Result<(), DeployError> {
        self.conn
            .execute(
                "INSERT INTO instances (id, service, release, revision, image_digest, address, state, created_ms, updated_ms, drain_deadline_ms)
                 VALUES (?1, ?2, ?3, ?4, '', NULL, 'draining', ?6, ?6, ?5)
                 ON CONFLICT(id) DO UPDATE SET state = 'draining', updated_ms = excluded.updated_ms,
                   drain_deadline_ms = excluded.drain_deadline_ms",
                params![id, service, release, revision, deadline_ms, now_ms()],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Instances being drained: id -> deadline (ms).
    pub fn draining(&self) -> Result<BTreeMap<String, u64>, DeployError> {
        Ok(self
            .text_and_number(
                "SELECT id, drain_deadline_ms FROM instances WHERE state = 'draining'",
            )?
            .into_iter()
            .collect())
    }

    /// The rows of a query that selects a text and a number.
    fn text_and_number(&self, sql: &str) -> Result<Vec<(String, u64)>, DeployError> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?)))
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    /// Records that `id` is gone.
    pub fn mark_removed(&self, id: &str) -> Result<(), DeployError> {
        self.conn
            .execute(
                "UPDATE instances SET state = 'removed', updated_ms = ?2 WHERE id = ?1",
                params![id, now_ms()],
            )
            .map_err(|e| self.err(e))?;
        self.forget_ready(id)
    }

    /// Records that `id` has passed its health check since `since_ms`.
    pub fn record_ready(&self, id: &str, since_ms: u64) -> Result<(), DeployError> {
        self.conn
            .execute(
                "INSERT INTO instance_ready (id, since_ms) VALUES (?1, ?2)
                 ON CONFLICT(id) DO UPDATE SET since_ms = excluded.since_ms",
                params![id, since_ms],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Records that `id` no longer passes its health check (or is gone).
    pub fn forget_ready(&self, id: &str) -> Result<(), DeployError> {
        self.conn
            .execute("DELETE FROM instance_ready WHERE id = ?1", [id])
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Records why the controller cannot reconcile `service` (its other services go on).
    /// Returns whether that is news: the first fault, or a different one.
    pub fn set_fault(&self, service: &str, reason: &str) -> Result<bool, DeployError> {
        self.conn
            .execute(
                "INSERT INTO service_faults (service, reason, since_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT(service) DO UPDATE SET reason = excluded.reason,
                   since_ms = excluded.since_ms
                 WHERE reason != excluded.reason",
                params![service, reason, now_ms()],
            )
            .map(|changed| changed > 0)
            .map_err(|e| self.err(e))
    }

    /// Records that `service` reconciles again; returns whether it had a fault.
    pub fn clear_fault(&self, service: &str) -> Result<bool, DeployError> {
        self.conn
            .execute("DELETE FROM service_faults WHERE service = ?1", [service])
            .map(|changed| changed > 0)
            .map_err(|e| self.err(e))
    }

    /// Why the controller cannot reconcile `service` right now, and since when (ms).
    pub fn service_fault(&self, service: &str) -> Result<Option<(String, u64)>, DeployError> {
        self.row(
            "SELECT reason, since_ms FROM service_faults WHERE service = ?1",
            [service],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(|e| self.err(e))
    }

    /// Every instance recorded as passing its health check: id -> since (ms).
    pub fn readiness(&self) -> Result<HashMap<String, u64>, DeployError> {
        Ok(self
            .text_and_number("SELECT id, since_ms FROM instance_ready")?
            .into_iter()
            .collect())
    }

    /// The rollout in progress for `service`: (target release, started, last progress, counts).
    pub fn rollout(&self, service: &str) -> Result<Option<RolloutRow>, DeployError> {
        self.row(
                "SELECT target_release, started_ms, last_progress_ms, counts_json FROM rollouts WHERE service = ?1",
                [service],
                |r| {
                    Ok(RolloutRow {
                        target_release: r.get(0)?,
                        started_ms: r.get(1)?,
                        last_progress_ms: r.get(2)?,
                        counts_json: r.get(3)?,
                    })
                },
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    pub fn put_rollout(&self, service: &str, row: &RolloutRow) -> Result<(), DeployError> {
        self.conn
            .execute(
                "INSERT INTO rollouts (service, target_release, started_ms, last_progress_ms, counts_json)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(service) DO UPDATE SET target_release = excluded.target_release,
                   started_ms = excluded.started_ms, last_progress_ms = excluded.last_progress_ms,
                   counts_json = excluded.counts_json",
                params![service, row.target_release, row.started_ms, row.last_progress_ms, row.counts_json],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    pub fn clear_rollout(&self, service: &str) -> Result<(), DeployError> {
        self.conn
            .execute("DELETE FROM rollouts WHERE service = ?1", [service])
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Names of every service ever deployed, destroyed ones included.
    pub fn all_services(&self) -> Result<Vec<(String, bool)>, DeployError> {
        let mut stmt = self
            .conn
            .prepare("SELECT name, destroyed FROM services ORDER BY name")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? != 0))
            })
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    /// Marks `service` destroyed; its history stays.
    pub fn destroy(&mut self, service: &str, actor: &str) -> Result<(), DeployError> {
        let changed = self
            .conn
            .execute(
                "UPDATE services SET destroyed = 1 WHERE name = ?1 AND destroyed = 0",
                [service],
            )
            .map_err(|e| self.err(e))?;
        if changed == 0 {
            return Err(DeployError::NoRelease(service.to_owned()));
        }
        self.event(
            Some(service),
            "destroy",
            &format!("service {service} destroyed"),
            actor,
        )
    }
}

/// What [`insert_release`] did.
enum NewRelease {
    Recorded(Box<Release>),
    /// The desired release already pins this digest and configuration (its number).
    Unchanged(u64),
}

/// The body of [`StateDb::record_release`], inside the caller's transaction.
#[allow(clippy::too_many_arguments)]
fn insert_release(
    tx: &rusqlite::Transaction<'_>,
    path: &Path,
    service: &str,
    spec: &ServiceSpec,
    digest: &Digest,
    reason: &str,
    rollback_of: Option<u64>,
    actor: &str,
    restart: Option<u64>,
) -> Result<NewRelease, DeployError> {
    let db_err = |source| DeployError::Database {
        path: path.to_path_buf(),
        source,
    };
    let encode = |spec: &ServiceSpec| {
        serde_json::to_string(spec).map_err(|source| DeployError::Encode {
            what: "service spec",
            source,
        })
    };
    let (config_hash, plain_revision) = fingerprint(spec, digest)?;
    let desired: Option<u64> = tx
        .query_row(
            "SELECT desired_release FROM services WHERE name = ?1 AND destroyed = 0",
            [service],
            |r| r.get(0),
        )
        .optional()
        .map_err(db_err)?
        .flatten();
    let mut current_restart = 0;
    let mut same = None;
    let mut current_spec: Option<ServiceSpec> = None;
    if let Some(current) = desired {
        let row: Option<(String, u64, String)> = tx
            .query_row(
                "SELECT revision, restart, spec_json FROM releases WHERE service = ?1 AND number = ?2",
                params![service, current],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(db_err)?;
        if let Some((revision, restart, spec_json)) = row {
            current_restart = restart;
            same = Some(revision);
            current_spec = ServiceSpec::from_recorded_json(&spec_json).ok();
        }
    }
    // The endpoint's TLS files are the endpoint's, not a release's: a rollback restores an
    // image and configuration, and the front keeps serving the certificate files it has.
    let mut spec = spec.clone();
    if rollback_of.is_some()
        && let Some(current) = &current_spec
    {
        spec.tls = current.tls.clone();
    }
    let spec = &spec;
    let spec_json = encode(spec)?;
    // A new release keeps the restart generation of the one it follows: instances are
    // replaced for a new image or configuration, never because an older restart was asked.
    let restart = restart.unwrap_or(current_restart);
    let revision = restarted_revision(&plain_revision, restart);
    if let Some(current) = desired
        && same.as_deref() == Some(revision.as_str())
        && rollback_of.is_none()
    {
        // Only the TLS files changed (or nothing): the desired release takes them in place,
        // no instance is replaced, and the controller's next pass hands them to the front.
        if let Some(current_spec) = current_spec
            && current_spec.tls != spec.tls
        {
            tx.execute(
                "UPDATE releases SET spec_json = ?1 WHERE service = ?2 AND number = ?3",
                params![spec_json, service, current],
            )
            .map_err(db_err)?;
            let files = spec.tls.as_ref().map_or_else(
                || "none".to_owned(),
                |t| format!("{} and {}", t.cert, t.key),
            );
            tx.execute(
                "INSERT INTO events (at_ms, service, kind, message, actor) VALUES (?1, ?2, 'endpoint', ?3, ?4)",
                params![now_ms(), service, format!("release {current}: TLS files now {files} (the endpoint's; no instance is replaced)"), actor],
            )
            .map_err(db_err)?;
        }
        return Ok(NewRelease::Unchanged(current));
    }
    let number: u64 = tx
        .query_row(
            "SELECT COALESCE(MAX(number), 0) + 1 FROM releases WHERE service = ?1",
            [service],
            |r| r.get(0),
        )
        .map_err(db_err)?;
    let created_ms = now_ms();
    tx.execute(
        "INSERT INTO releases (service, number, image_digest, config_hash, revision, spec_json, created_ms, reason, rollback_of, restart)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        params![service, number, digest.to_string(), config_hash.to_string(), revision, spec_json, created_ms, reason, rollback_of, restart],
    )
    .map_err(db_err)?;
    tx.execute(
        "INSERT INTO services (name, desired_release, destroyed) VALUES (?1, ?2, 0)
         ON CONFLICT(name) DO UPDATE SET desired_release = excluded.desired_release, destroyed = 0",
        params![service, number],
    )
    .map_err(db_err)?;
    tx.execute(
        "INSERT INTO events (at_ms, service, kind, message, actor) VALUES (?1, ?2, 'release', ?3, ?4)",
        params![created_ms, service, format!("release {number}: {digest} ({reason})"), actor],
    )
    .map_err(db_err)?;
    Ok(NewRelease::Recorded(Box::new(Release {
        service: service.to_owned(),
        number,
        image_digest: digest.clone(),
        config_hash,
        revision,
        spec: spec.clone(),
        created_ms,
        reason: reason.to_owned(),
        rollback_of,
        restart,
    })))
}

/// The body of [`StateDb::record_outcome`], inside the caller's transaction.
fn insert_outcome(
    tx: &rusqlite::Transaction<'_>,
    service: &str,
    number: u64,
    outcome: ReleaseOutcome,
    detail: &str,
    actor: &str,
) -> rusqlite::Result<()> {
    let at = now_ms();
    tx.execute(
        "INSERT INTO release_outcomes (service, number, outcome, detail, at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![service, number, outcome, detail, at],
    )?;
    let message = if detail.is_empty() {
        format!("release {number}: {outcome}")
    } else {
        format!("release {number}: {outcome}: {detail}")
    };
    tx.execute(
        "INSERT INTO events (at_ms, service, kind, message, actor) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![at, service, outcome.as_str(), message, actor],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(image: &str, env: &str) -> ServiceSpec {
        serde_json::from_value(serde_json::json!({"image": image, "env": {"V": env}})).unwrap()
    }

    fn db() -> (tempfile::TempDir, StateDb) {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(&dir.path().join("state.db")).unwrap();
        (dir, db)
    }

    #[test]
    fn an_unchanged_apply_makes_no_new_release() {
        let (_d, mut db) = db();
        let d1 = Digest::of(b"image v1");
        let (r1, new) = db
            .record_release("web", &spec("web", "1"), &d1, "apply", None, "test")
            .unwrap();
        assert!(new);
        assert_eq!(r1.number, 1);
        let (again, new) = db
            .record_release("web", &spec("web", "1"), &d1, "apply", None, "test")
            .unwrap();
        assert!(!new);
        assert_eq!(again.number, 1);
        let (r2, new) = db
            .record_release("web", &spec("web", "2"), &d1, "apply", None, "test")
            .unwrap();
        assert!(new, "a config change alone is a new release");
        assert_eq!(r2.number, 2);
        assert_ne!(r1.config_hash, r2.config_hash);
        assert_eq!(db.desired("web").unwrap().unwrap().number, 2);
    }

    /// A kubernetes release keeps the image's declared volumes in its spec: one recorded by an
    /// earlier imago loads with them, and one loaded is the configuration it was recorded as.
    #[test]
    fn a_recorded_release_keeps_the_image_volumes_of_its_spec() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let d = Digest::of(b"x");
        let mut with_volumes = spec("web", "1");
        with_volumes.image_volumes = vec!["/data".to_owned()];
        {
            let mut db = StateDb::open(&path).unwrap();
            db.record_release("web", &with_volumes, &d, "apply", None, "test")
                .unwrap();
            // As an earlier imago wrote it, whose spec is the same JSON.
            db.conn
                .execute(
                    "INSERT INTO releases (service, number, image_digest, config_hash, revision, spec_json, created_ms, reason, rollback_of, restart)
                     VALUES ('old', 1, ?1, ?1, 'r', ?2, 0, 'apply', NULL, 0)",
                    params![
                        d.to_string(),
                        r#"{"image":"old","replicas":2,"image_volumes":["/var/lib/old"]}"#
                    ],
                )
                .unwrap();
        }
        let mut db = StateDb::open(&path).unwrap();
        let old = db.release("old", 1).unwrap();
        assert_eq!(old.spec.image_volumes, ["/var/lib/old"]);
        assert_eq!(old.spec.replicas, 2);
        let loaded = db.release("web", 1).unwrap();
        assert_eq!(loaded.spec, with_volumes);
        let (again, new) = db
            .record_release("web", &loaded.spec, &d, "apply", None, "test")
            .unwrap();
        assert!(!new, "release {} made from an unchanged spec", again.number);
    }

    #[test]
    fn other_tls_files_reach_a_release_whose_spec_records_image_volumes() {
        // The recorded spec is read as recorded (`image_volumes` included, which the file's
        // form refuses): plain serde read it as nothing, and the new files never reached it.
        let (_d, mut db) = db();
        let d1 = Digest::of(b"image v1");
        let with_tls = |dir: &str| -> ServiceSpec {
            let mut spec: ServiceSpec = serde_json::from_value(serde_json::json!({
                "image": "web", "port": 443,
                "tls": {"cert": format!("{dir}/shop.pem"), "key": format!("{dir}/shop.key")}}))
            .unwrap();
            spec.image_volumes = vec!["/data".to_owned()];
            spec
        };
        db.record_release("web", &with_tls("/srv/a"), &d1, "apply", None, "test")
            .unwrap();
        let (_, new) = db
            .record_release("web", &with_tls("/srv/b"), &d1, "apply", None, "test")
            .unwrap();
        assert!(!new);
        let desired = db.desired("web").unwrap().unwrap();
        assert_eq!(desired.spec.tls.unwrap().cert, "/srv/b/shop.pem");
        assert_eq!(desired.spec.image_volumes, ["/data"]);
    }

    #[test]
    fn other_tls_files_make_no_new_release_and_the_desired_one_takes_them() {
        let (_d, mut db) = db();
        let d1 = Digest::of(b"image v1");
        let with_tls = |dir: &str| -> ServiceSpec {
            serde_json::from_value(serde_json::json!({"image": "web", "port": 443,
                "tls": {"cert": format!("{dir}/shop.pem"), "key": format!("{dir}/shop.key")}}))
            .unwrap()
        };
        let (r1, _) = db
            .record_release("web", &with_tls("/srv/a"), &d1, "apply", None, "test")
            .unwrap();
        // The same file applied from another checkout: the paths differ, nothing else.
        let (again, new) = db
            .record_release("web", &with_tls("/srv/b"), &d1, "apply", None, "test")
            .unwrap();
        assert!(!new, "a new release for other TLS paths");
        assert_eq!((again.number, &again.revision), (r1.number, &r1.revision));
        let desired = db.desired("web").unwrap().unwrap();
        assert_eq!(desired.spec.tls.unwrap().cert, "/srv/b/shop.pem");
        let events = db.events(None, 0).unwrap();
        assert!(
            events
                .iter()
                .any(|e| e.kind == "endpoint" && e.message.contains("/srv/b/shop.pem")),
            "{events:?}"
        );
        // A configuration change is a release; a rollback to release 1 keeps the endpoint's
        // current files, not the ones release 1 was recorded with.
        let mut changed = with_tls("/srv/c");
        changed.replicas = 3;
        let (r2, new) = db
            .record_release("web", &changed, &d1, "apply", None, "test")
            .unwrap();
        assert!(new);
        let target = db.release("web", r1.number).unwrap();
        let restored = db.record_restored(&target, "rollback", "test").unwrap();
        assert_eq!(restored.revision, r1.revision);
        assert_eq!(restored.spec.tls.unwrap().cert, "/srv/c/shop.pem");
        assert!(restored.number > r2.number);
    }

    #[test]
    fn the_image_name_is_not_part_of_the_identity_only_the_digest() {
        let d = Digest::of(b"same");
        let a = fingerprint(&spec("web:v1", "x"), &d).unwrap();
        let b = fingerprint(&spec("web:latest", "x"), &d).unwrap();
        assert_eq!(a, b);
        let c = fingerprint(&spec("web", "x"), &Digest::of(b"other")).unwrap();
        assert_ne!(a.1, c.1);
    }

    #[test]
    fn releases_survive_reopening_and_keep_their_spec() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let d = Digest::of(b"x");
        {
            let mut db = StateDb::open(&path).unwrap();
            db.record_release("web", &spec("web", "7"), &d, "apply", None, "test")
                .unwrap();
            db.record_outcome("web", 1, ReleaseOutcome::Complete, "", "test")
                .unwrap();
        }
        let db = StateDb::open(&path).unwrap();
        let history = db.history("web").unwrap();
        assert_eq!(history.len(), 1);
        assert_eq!(history[0].spec.env.get("V").map(String::as_str), Some("7"));
        assert_eq!(db.last_completed("web").unwrap().unwrap().number, 1);
        let kinds: Vec<String> = db
            .events(Some("web"), 0)
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(kinds, vec!["release", "complete"]);
    }

    #[test]
    fn retained_digests_cover_the_history_limit() {
        let (_d, mut db) = db();
        for i in 0..5u8 {
            db.record_release(
                "web",
                &spec("web", &i.to_string()),
                &Digest::of(&[i]),
                "apply",
                None,
                "t",
            )
            .unwrap();
        }
        let kept = db.retained_digests(2).unwrap();
        let mut expected = vec![Digest::of(&[3]), Digest::of(&[4])];
        expected.sort();
        assert_eq!(kept, expected);
        assert_eq!(db.retained_digests(10).unwrap().len(), 5);
    }

    #[test]
    fn a_manual_rollback_goes_to_the_newest_completed_release_of_another_revision() {
        let (_d, mut db) = db();
        let record = |db: &mut StateDb, v: &str, reason: &str, rollback_of: Option<u64>| {
            let digest = Digest::of(v.as_bytes());
            db.record_release("web", &spec("web", v), &digest, reason, rollback_of, "t")
                .unwrap()
                .0
        };
        let r1 = record(&mut db, "1", "apply", None);
        let r2 = record(&mut db, "2", "apply", None);
        let r3 = record(&mut db, "3", "apply", None);
        for (number, outcome) in [
            (1, ReleaseOutcome::Complete),
            (2, ReleaseOutcome::Complete),
            (3, ReleaseOutcome::Failed),
        ] {
            db.record_outcome("web", number, outcome, "", "t").unwrap();
        }
        assert_eq!(
            db.rollback_target(&r3, None).unwrap(),
            r2,
            "a failed release is passed over"
        );
        let r4 = record(&mut db, "1", "rollback to release 1", Some(1));
        assert_eq!(r4.revision, r1.revision);
        db.record_outcome("web", 4, ReleaseOutcome::Complete, "", "t")
            .unwrap();
        assert_eq!(
            db.rollback_target(&r4, None).unwrap(),
            r2,
            "rolling back again undoes the rollback: release 1 runs what release 4 runs"
        );
        assert_eq!(
            db.last_completed("web").unwrap(),
            Some(r4.clone()),
            "where an automatic rollback would go instead"
        );
        assert_eq!(db.rollback_target(&r4, Some(3)).unwrap(), r3);
        assert_eq!(
            db.rollback_target(&r4, Some(9)).unwrap_err().to_string(),
            "service web has no release 9"
        );
        // Release 2 failed after it had completed: no longer a place to go back to.
        db.record_outcome("web", 2, ReleaseOutcome::Failed, "", "t")
            .unwrap();
        assert_eq!(
            db.rollback_target(&r4, None).unwrap_err().to_string(),
            "service web has no earlier completed release to roll back to"
        );
    }

    #[test]
    fn a_failure_and_its_rollback_are_recorded_together() {
        let (_d, mut db) = db();
        let releases: Vec<Release> = ["1", "2"]
            .into_iter()
            .map(|v| {
                let digest = Digest::of(v.as_bytes());
                db.record_release("web", &spec("web", v), &digest, "apply", None, "t")
                    .unwrap()
                    .0
            })
            .collect();
        db.record_outcome("web", 1, ReleaseOutcome::Complete, "", "t")
            .unwrap();
        let good = &releases[0];
        let rollback = db
            .record_failure("web", 2, "unhealthy", Some(good), "t")
            .unwrap()
            .unwrap();
        assert_eq!((rollback.number, rollback.rollback_of), (3, Some(1)));
        assert_eq!(rollback.revision, good.revision);
        assert_eq!(
            db.outcome_of("web", 2).unwrap().unwrap().outcome,
            ReleaseOutcome::Failed
        );
        assert_eq!(db.desired("web").unwrap().unwrap().number, 3);
        let events: Vec<String> = db
            .events(Some("web"), 0)
            .unwrap()
            .into_iter()
            .map(|e| e.message)
            .collect();
        assert!(
            events
                .iter()
                .any(|e| e.contains("rolled back to release 1 (as release 3)")),
            "{events:?}"
        );
        // Release 2 is settled once its rollback is.
        assert_eq!(db.settled("web", 2).unwrap(), None);
        db.record_outcome("web", 3, ReleaseOutcome::Complete, "", "t")
            .unwrap();
        assert_eq!(
            db.settled("web", 2).unwrap(),
            Some(Settled {
                outcome: ReleaseOutcome::RolledBack,
                detail: "unhealthy".into(),
                rolled_back_to: Some(1),
            })
        );
        assert_eq!(
            db.settled("web", 1).unwrap().unwrap().outcome,
            ReleaseOutcome::Complete
        );
        // Without a release to roll back to, only the failure is recorded.
        assert!(
            db.record_failure("web", 3, "x", None, "t")
                .unwrap()
                .is_none()
        );
        assert_eq!(db.desired("web").unwrap().unwrap().number, 3);
    }

    #[test]
    fn taints_survive_a_reopen_and_keep_the_latest_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        // A database of the first schema, as an older imago left it, gains the table.
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
        }
        let image = Digest::of(b"image");
        {
            let db = StateDb::open(&path).unwrap();
            db.record_taint(&image, 200).unwrap();
            db.record_taint(&image, 100).unwrap();
        }
        let db = StateDb::open(&path).unwrap();
        let tainted = db.tainted().unwrap();
        assert_eq!(tainted.len(), 1);
        assert_eq!(tainted.get(&image), Some(&200));
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        drop(StateDb::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let err = StateDb::open(&path).err().unwrap().to_string();
        assert!(err.contains("schema 99"), "{err}");
    }
}
