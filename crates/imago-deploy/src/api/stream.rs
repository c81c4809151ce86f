//! `/v1/events/stream`: server-sent events for the console. An `event` message for every new
//! event of the log (filtered like `/v1/events`), and an `overview` message whenever the
//! overview changed (readiness flips and instance counts that no event records).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;

use super::{Api, EventQuery, blocking, overview_rows};

/// How often a stream looks for news. The database and the instance list are read on the
/// blocking pool, never on the workers that run the health probes.
const POLL: Duration = Duration::from_millis(500);

struct Cursor {
    api: Api,
    query: EventQuery,
    last_overview: Option<String>,
    pending: VecDeque<SseEvent>,
    polled: bool,
}

pub(super) async fn events_stream(
    State(api): State<Api>,
    Query(query): Query<EventQuery>,
) -> Response {
    let cursor = Cursor {
        api,
        query,
        last_overview: None,
        pending: VecDeque::new(),
        polled: false,
    };
    Sse::new(messages(cursor))
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn messages(cursor: Cursor) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    futures::stream::unfold(cursor, |mut cursor| async move {
        loop {
            if let Some(message) = cursor.pending.pop_front() {
                return Some((Ok(message), cursor));
            }
            if cursor.polled {
                tokio::time::sleep(POLL).await;
            }
            let query = cursor.query.clone();
            let news = blocking(cursor.api.clone(), move |api, db| {
                let events = query.run(db)?;
                let overview = overview_rows(db, &api.instances()?)?;
                Ok((events, overview))
            })
            .await;
            // A failed read is tried again at the next poll; the stream stays open.
            cursor.polled = true;
            let Ok((events, overview)) = news else {
                continue;
            };
            // `limit` picks the newest events of the first read only; after it, every one.
            cursor.query.limit = None;
            for event in events {
                cursor.query.since = cursor.query.since.max(event.seq);
                if let Ok(message) = SseEvent::default()
                    .event("event")
                    .id(event.seq.to_string())
                    .json_data(&event)
                {
                    cursor.pending.push_back(message);
                }
            }
            if let Ok(text) = serde_json::to_string(&overview)
                && cursor.last_overview.as_ref() != Some(&text)
            {
                cursor
                    .pending
                    .push_back(SseEvent::default().event("overview").data(&text));
                cursor.last_overview = Some(text);
            }
        }
    })
}
