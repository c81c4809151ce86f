//! The controller's HTTP API on a local address: status, releases and events as JSON. Every
//! request reads the state database afresh, so the API never disagrees with the CLI.

use std::path::PathBuf;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::state::{Event, Outcome, Release, StateDb};

#[derive(Clone)]
struct Api {
    db_path: PathBuf,
}

/// The API's routes over the database at `db_path`.
pub fn router(db_path: PathBuf) -> Router {
    Router::new()
        .route("/v1/services", get(services))
        .route("/v1/services/{name}", get(service))
        .route("/v1/services/{name}/releases", get(releases))
        .route("/v1/events", get(events))
        .with_state(Api { db_path })
}

/// Runs `query` on a fresh connection and answers with its JSON, a 404 for `Ok(None)`, or a
/// 500 naming the problem.
fn answer<T: Serialize>(
    api: &Api,
    query: impl FnOnce(&StateDb) -> Result<Option<T>, crate::DeployError>,
) -> Response {
    let result = StateDb::open(&api.db_path).and_then(|db| query(&db));
    match result {
        Ok(Some(value)) => Json(value).into_response(),
        Ok(None) => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"error": "not found"})),
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(serde_json::json!({"error": e.to_string()})),
        )
            .into_response(),
    }
}

#[derive(Serialize)]
pub struct ServiceStatus {
    pub name: String,
    pub desired: Option<Release>,
    pub outcome: Option<Outcome>,
    pub last_completed: Option<u64>,
}

/// The status of one service as the database records it.
pub fn service_status(db: &StateDb, name: &str) -> Result<ServiceStatus, crate::DeployError> {
    let desired = db.desired(name)?;
    let outcome = match &desired {
        Some(r) => db.outcome_of(name, r.number)?,
        None => None,
    };
    Ok(ServiceStatus {
        name: name.to_owned(),
        last_completed: db.last_completed(name)?.map(|r| r.number),
        desired,
        outcome,
    })
}

async fn services(State(api): State<Api>) -> Response {
    answer(&api, |db| {
        let statuses = db
            .services()?
            .iter()
            .map(|name| service_status(db, name))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(statuses))
    })
}

async fn service(State(api): State<Api>, Path(name): Path<String>) -> Response {
    answer(&api, |db| {
        Ok(Some(service_status(db, &name)?).filter(|s| s.desired.is_some()))
    })
}

async fn releases(State(api): State<Api>, Path(name): Path<String>) -> Response {
    answer(&api, |db| Ok(Some(db.history(&name)?)))
}

#[derive(Deserialize)]
struct EventQuery {
    #[serde(default)]
    since: u64,
    service: Option<String>,
}

async fn events(State(api): State<Api>, Query(q): Query<EventQuery>) -> Response {
    answer(&api, |db| {
        let events: Vec<Event> = db.events(q.service.as_deref(), q.since)?;
        Ok(Some(events))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::ServiceSpec;
    use imago_oci::Digest;

    #[tokio::test]
    async fn serves_status_releases_and_events_as_json() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let mut db = StateDb::open(&path).unwrap();
        let spec: ServiceSpec =
            serde_json::from_value(serde_json::json!({"image": "web"})).unwrap();
        db.record_release("web", &spec, &Digest::of(b"v1"), "apply", None, "test")
            .unwrap();
        db.record_outcome("web", 1, crate::state::ReleaseOutcome::Complete, "", "test")
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router(path)).await });

        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            let (head, body) = out.split_once("\r\n\r\n").unwrap();
            (head.lines().next().unwrap().to_owned(), body.to_owned())
        };
        let (status, body) = get("/v1/services/web").await;
        assert!(status.contains("200"), "{status}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["desired"]["number"], 1);
        assert_eq!(json["outcome"]["outcome"], "complete");
        let array_len = |body: &str| {
            serde_json::from_str::<serde_json::Value>(body)
                .unwrap()
                .as_array()
                .unwrap()
                .len()
        };
        let (_, body) = get("/v1/services/web/releases").await;
        assert_eq!(array_len(&body), 1);
        let (_, body) = get("/v1/events?since=0").await;
        assert_eq!(array_len(&body), 2);
        let (status, _) = get("/v1/services/nope").await;
        assert!(status.contains("404"), "{status}");
    }
}
