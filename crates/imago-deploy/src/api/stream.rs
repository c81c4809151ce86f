//! `/v1/events/stream`: server-sent events for the console. An `event` message for every new
//! event of the log (filtered like `/v1/events`), and an `overview` message whenever the
//! overview changed (readiness flips and instance counts that no event records).
//!
//! One poller per API reads the database and the instance list every 500 ms while any stream
//! is open, and fans what it found out to every stream (a broadcast channel): fifty open
//! consoles cost the controller one read per interval, not fifty.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use tokio::sync::broadcast;

use super::{Api, EventQuery, blocking, overview_rows};
use crate::state::Event;

/// How often the poller looks for news. The database and the instance list are read on the
/// blocking pool, never on the workers that run the health probes.
const POLL: Duration = Duration::from_millis(500);

/// What one poll found: every event after sequence number `from` up to `to`, and the
/// overview.
#[derive(Debug)]
pub(super) struct News {
    from: u64,
    to: u64,
    events: Vec<Event>,
    overview: Arc<String>,
}

/// The shared poller of one API, started by the first stream.
#[derive(Default)]
pub(super) struct Hub {
    sender: Mutex<Option<broadcast::Sender<Arc<News>>>>,
}

impl Hub {
    fn subscribe(&self, api: &Api) -> broadcast::Receiver<Arc<News>> {
        let mut slot = self.sender.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sender) = slot.as_ref() {
            return sender.subscribe();
        }
        let (sender, receiver) = broadcast::channel(64);
        *slot = Some(sender.clone());
        tokio::spawn(poll(api.clone(), sender));
        receiver
    }
}

/// Reads the news every [`POLL`] while anyone listens, from the newest event on.
async fn poll(api: Api, sender: broadcast::Sender<Arc<News>>) {
    let mut since: Option<u64> = None;
    loop {
        if sender.receiver_count() == 0 {
            // Nobody listens: read nothing, and start from the newest event next time.
            since = None;
            tokio::time::sleep(POLL).await;
            continue;
        }
        // A (re)started poller finds its starting point at once, so that it most likely
        // precedes the first reads of the streams that woke it (a stream that read before it
        // fills the gap with one read of its own).
        if since.is_some() {
            tokio::time::sleep(POLL).await;
        }
        let from = since;
        let news = blocking(api.clone(), move |api, db| {
            let events = match from {
                Some(seq) => db.events(None, seq)?,
                None => Vec::new(),
            };
            let last = events
                .last()
                .map(|e| Ok(e.seq))
                .unwrap_or_else(|| match from {
                    Some(seq) => Ok(seq),
                    None => db.last_event_seq(),
                })?;
            // The first read only finds where to start: the streams read the overview.
            let overview = match from {
                Some(_) => overview_rows(db, &api.instances()?)?,
                None => Vec::new(),
            };
            Ok((events, last, overview))
        })
        .await;
        // A failed read is tried again at the next poll; the streams stay open.
        let Ok((events, last, overview)) = news else {
            continue;
        };
        since = Some(last);
        if from.is_none() {
            continue;
        }
        let Ok(overview) = serde_json::to_string(&overview) else {
            continue;
        };
        let _ = sender.send(Arc::new(News {
            from: from.unwrap_or(last),
            to: last,
            events,
            overview: Arc::new(overview),
        }));
    }
}

struct Cursor {
    api: Api,
    query: EventQuery,
    news: broadcast::Receiver<Arc<News>>,
    last_overview: Option<Arc<String>>,
    /// Every event up to this sequence number has been looked at (sent or filtered out).
    covered: u64,
    pending: VecDeque<SseEvent>,
    /// The first read (this stream's own, with its `limit`) is done.
    started: bool,
}

impl Cursor {
    fn wants(&self, event: &Event) -> bool {
        event.seq > self.query.since
            && self
                .query
                .service
                .as_ref()
                .is_none_or(|s| event.service.as_ref() == Some(s))
            && self.query.kind.as_ref().is_none_or(|k| &event.kind == k)
    }

    fn push_events(&mut self, events: impl IntoIterator<Item = Event>) {
        for event in events {
            if !self.wants(&event) {
                continue;
            }
            self.query.since = event.seq;
            if let Ok(message) = SseEvent::default()
                .event("event")
                .id(event.seq.to_string())
                .json_data(&event)
            {
                self.pending.push_back(message);
            }
        }
    }

    fn push_overview(&mut self, overview: Arc<String>) {
        if self.last_overview.as_deref() != Some(&*overview) {
            self.pending.push_back(
                SseEvent::default()
                    .event("overview")
                    .data(overview.as_str()),
            );
            self.last_overview = Some(overview);
        }
    }

    /// This stream's own read: its first (with its `limit`), and after it fell behind the
    /// shared poller (a lagging receiver lost news).
    async fn read_directly(&mut self) {
        let query = self.query.clone();
        let news = blocking(self.api.clone(), move |api, db| {
            // Read before the events: whatever is newer comes with the poller's next news.
            let newest = db.last_event_seq()?;
            let events = query.run(db)?;
            let overview = overview_rows(db, &api.instances()?)?;
            Ok((newest, events, overview))
        })
        .await;
        if let Ok((newest, events, overview)) = news {
            self.covered = self.covered.max(newest);
            // `limit` picks the newest events of the first read only; after it, every one.
            self.query.limit = None;
            self.push_events(events);
            if let Ok(text) = serde_json::to_string(&overview) {
                self.push_overview(Arc::new(text));
            }
        }
    }
}

pub(super) async fn events_stream(
    State(api): State<Api>,
    Query(query): Query<EventQuery>,
) -> Response {
    // Subscribed before the first read: whatever the poller finds after it reaches this
    // stream, and the first read covers everything before.
    let news = api.hub.subscribe(&api);
    let cursor = Cursor {
        api,
        query,
        news,
        last_overview: None,
        covered: 0,
        pending: VecDeque::new(),
        started: false,
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
            if !cursor.started {
                cursor.started = true;
                cursor.read_directly().await;
                continue;
            }
            match cursor.news.recv().await {
                Ok(news) => {
                    // News that starts after what this stream has covered leaves a gap (the
                    // poller started, or restarted, after this stream's own read): fill it.
                    if news.from > cursor.covered {
                        cursor.read_directly().await;
                    }
                    cursor.push_events(news.events.iter().cloned());
                    cursor.covered = cursor.covered.max(news.to);
                    cursor.push_overview(news.overview.clone());
                }
                Err(broadcast::error::RecvError::Lagged(_)) => cursor.read_directly().await,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
}
