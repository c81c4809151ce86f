//! The controller's HTTP API on a local address: status, releases and events as JSON. Every
//! request reads the state database afresh, so the API never disagrees with the CLI, and it does
//! so on tokio's blocking pool: SQLite and the instance listing never hold up the async workers
//! that run the health probes.

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use imago_runtime::{Instance, Provider};
use serde::{Deserialize, Serialize};

use crate::DeployError;
use crate::state::{Event, StateDb};
use crate::status::{self, service_status};

#[derive(Clone)]
struct Api {
    db_path: PathBuf,
    provider: Arc<dyn Provider>,
}

impl Api {
    fn instances(&self) -> Result<Vec<Instance>, DeployError> {
        self.provider
            .list()
            .map_err(|e| DeployError::Runtime(e.to_string()))
    }
}

/// The API's routes over the database at `db_path` and the instances `provider` lists.
pub fn router(db_path: PathBuf, provider: Arc<dyn Provider>) -> Router {
    Router::new()
        .route("/v1/status", get(status_document))
        .route("/v1/services", get(services))
        .route("/v1/services/{name}", get(service))
        .route("/v1/services/{name}/releases", get(releases))
        .route("/v1/events", get(events))
        .with_state(Api { db_path, provider })
}

/// Runs `query` on a fresh connection, on the blocking pool, and answers with its JSON, a 404
/// for `Ok(None)`, or a 500 naming the problem.
async fn answer<T, Q>(api: Api, query: Q) -> Response
where
    T: Serialize + Send + 'static,
    Q: FnOnce(&Api, &StateDb) -> Result<Option<T>, DeployError> + Send + 'static,
{
    let result = tokio::task::spawn_blocking(move || {
        StateDb::open(&api.db_path).and_then(|db| query(&api, &db))
    })
    .await;
    match result {
        Ok(Ok(Some(value))) => Json(value).into_response(),
        Ok(Ok(None)) => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"error": "not found"})),
        )
            .into_response(),
        Ok(Err(e)) => internal_error(e.to_string()),
        Err(e) => internal_error(format!("request task failed: {e}")),
    }
}

fn internal_error(message: String) -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        Json(serde_json::json!({"error": message})),
    )
        .into_response()
}

/// The same document as `imago status --json`; the controller answering is the one running.
async fn status_document(State(api): State<Api>) -> Response {
    answer(api, |api, db| {
        let instances = api.instances()?;
        Ok(Some(status::status_document(db, None, &instances, true)?))
    })
    .await
}

async fn services(State(api): State<Api>) -> Response {
    answer(api, |api, db| {
        let instances = api.instances()?;
        Ok(Some(
            status::status_document(db, None, &instances, true)?.services,
        ))
    })
    .await
}

async fn service(State(api): State<Api>, Path(name): Path<String>) -> Response {
    answer(api, move |api, db| {
        if db.desired(&name)?.is_none() {
            return Ok(None);
        }
        let instances = api.instances()?;
        Ok(Some(service_status(db, &name, &instances)?))
    })
    .await
}

async fn releases(State(api): State<Api>, Path(name): Path<String>) -> Response {
    answer(api, move |_, db| Ok(Some(db.history(&name)?))).await
}

#[derive(Deserialize)]
struct EventQuery {
    #[serde(default)]
    since: u64,
    service: Option<String>,
}

async fn events(State(api): State<Api>, Query(q): Query<EventQuery>) -> Response {
    answer(api, move |_, db| {
        let events: Vec<Event> = db.events(q.service.as_deref(), q.since)?;
        Ok(Some(events))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::instance_spec;
    use crate::spec::ServiceSpec;
    use imago_oci::Digest;
    use imago_runtime::{Engine, FakeProvider, InstanceSpec, RuntimeError};
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    async fn get(addr: SocketAddr, path: &str) -> (String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        (head.lines().next().unwrap().to_owned(), body.to_owned())
    }

    /// A database with one completed release of `web` and a provider running one of its
    /// instances.
    fn web_deployed(dir: &std::path::Path) -> (PathBuf, Arc<FakeProvider>) {
        let path = dir.join("state.db");
        let mut db = StateDb::open(&path).unwrap();
        let spec: ServiceSpec =
            serde_json::from_value(serde_json::json!({"image": "web"})).unwrap();
        let (release, _) = db
            .record_release("web", &spec, &Digest::of(b"v1"), "apply", None, "test")
            .unwrap();
        db.record_outcome("web", 1, crate::state::ReleaseOutcome::Complete, "", "test")
            .unwrap();
        let fake = Arc::new(FakeProvider::new());
        fake.launch(&instance_spec(&release, Engine::default()).unwrap())
            .unwrap();
        (path, fake)
    }

    async fn serve(router: Router) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        addr
    }

    #[tokio::test]
    async fn serves_status_releases_and_events_as_json() {
        let dir = tempfile::tempdir().unwrap();
        let (path, fake) = web_deployed(dir.path());
        let addr = serve(router(path.clone(), fake.clone())).await;

        let (status, body) = get(addr, "/v1/services/web").await;
        assert!(status.contains("200"), "{status}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["desired"]["number"], 1);
        assert_eq!(json["outcome"]["outcome"], "complete");
        assert_eq!(json["instances"].as_array().unwrap().len(), 1, "{json}");
        let array_len = |body: &str| {
            serde_json::from_str::<serde_json::Value>(body)
                .unwrap()
                .as_array()
                .unwrap()
                .len()
        };
        let (_, body) = get(addr, "/v1/services/web/releases").await;
        assert_eq!(array_len(&body), 1);
        let (_, body) = get(addr, "/v1/events?since=0").await;
        assert_eq!(array_len(&body), 2);
        let (status, _) = get(addr, "/v1/services/nope").await;
        assert!(status.contains("404"), "{status}");

        // /v1/status is the document `imago status --json` prints, built by the same code.
        let (_, body) = get(addr, "/v1/status").await;
        let served: serde_json::Value = serde_json::from_str(&body).unwrap();
        let db = StateDb::open(&path).unwrap();
        let local = status::status_document(&db, None, &fake.list().unwrap(), true).unwrap();
        assert_eq!(served, serde_json::to_value(&local).unwrap());
        assert_eq!(served["services"][0]["instances"][0]["status"], "running");
    }

    /// Lists instances only after a delay, like a slow disk under the instance directories.
    struct SlowList(Arc<FakeProvider>, Duration);

    impl Provider for SlowList {
        fn launch(&self, spec: &InstanceSpec) -> Result<Instance, RuntimeError> {
            self.0.launch(spec)
        }
        fn stop(&self, id: &str, grace: Duration) -> Result<Instance, RuntimeError> {
            self.0.stop(id, grace)
        }
        fn remove(&self, id: &str) -> Result<(), RuntimeError> {
            self.0.remove(id)
        }
        fn list(&self) -> Result<Vec<Instance>, RuntimeError> {
            std::thread::sleep(self.1);
            self.0.list()
        }
        fn inspect(&self, id: &str) -> Result<Instance, RuntimeError> {
            self.0.inspect(id)
        }
        fn logs(&self, id: &str) -> Result<Vec<u8>, RuntimeError> {
            self.0.logs(id)
        }
    }

    /// The controller's runtime also runs the health probes: a slow request must not stall
    /// them. On a single-threaded runtime, a timer keeps ticking while requests that take
    /// 300 ms each are answered.
    #[tokio::test(flavor = "current_thread")]
    async fn slow_requests_never_block_the_runtime_they_are_served_on() {
        let dir = tempfile::tempdir().unwrap();
        let (path, fake) = web_deployed(dir.path());
        let slow = Arc::new(SlowList(fake, Duration::from_millis(300)));
        let addr = serve(router(path, slow)).await;

        let requests = tokio::spawn(async move {
            for _ in 0..3 {
                let (status, _) = get(addr, "/v1/status").await;
                assert!(status.contains("200"), "{status}");
            }
        });
        let mut longest = Duration::ZERO;
        while !requests.is_finished() {
            let before = Instant::now();
            tokio::time::sleep(Duration::from_millis(10)).await;
            longest = longest.max(before.elapsed());
        }
        requests.await.unwrap();
        assert!(
            longest < Duration::from_millis(150),
            "a 10 ms timer waited {longest:?} behind an API request"
        );
    }
}
