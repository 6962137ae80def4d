//! The one way this daemon listens: the metrics listener and the notify listener are both
//! [`serve`]d by this accept loop, with limits a slow or hostile client cannot get around.
//!
//! - A request's headers must arrive within `header_timeout` (hyper's header-read timeout,
//!   driven by a tokio timer). A keep-alive connection waiting for its next request is
//!   waiting for headers too: it is closed after the same time.
//! - A request is answered within [`REQUEST_TIMEOUT`] (503 otherwise; a notification is never
//!   acknowledged before its commit, so WeChat retries it).
//! - At most `max_connections` at once. At the cap a new connection takes the place of the
//!   oldest one that is not in a request (half-open, still sending its headers, or idle between
//!   requests); when every connection is in a request, the new one is closed at once. Either
//!   way it is counted in `listener_refused_connections_total{listener}`. Nothing queues.
//! - An accept error (EMFILE, ENFILE, ENOMEM…) waits [`ACCEPT_BACKOFF`] before the next
//!   accept, and is logged at most once per [`LOG_EVERY`].
//!
//! On `stop` the listener closes, idle connections close at once, requests in flight finish,
//! and a connection that has not finished sending its request is dropped: the caller's drain
//! deadline bounds the rest.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::telemetry::Telemetry;

/// How long one request may take from its headers to its answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The pause after a failed accept (the error stays until a descriptor is free).
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one log line per kind of listener trouble in this long.
pub const LOG_EVERY: Duration = Duration::from_secs(10);
/// The largest request head (and read buffer) a connection keeps.
const MAX_BUF_BYTES: usize = 64 * 1024;

/// Which listener (the label type lives with the metrics it labels).
pub use crate::telemetry::Listener;

/// The limits of one listener (`[metrics]` / `[notify]` `max_connections`,
/// `header_timeout_seconds`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
}

/// One open connection, as the accept loop sees it.
struct Slot {
    /// Requests in progress, from their headers until their answer's body is handed over.
    busy: AtomicUsize,
    /// Cancelled to close the connection at once (its place was given to a newer one).
    evict: CancellationToken,
}

/// The open connections, oldest first.
#[derive(Default)]
struct Slots {
    open: Mutex<BTreeMap<u64, Arc<Slot>>>,
}

impl Slots {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Slot>>> {
        // A panic while holding this lock leaves a map that is still consistent.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a place for connection `id`: a free one, else the oldest connection not in a
    /// request is evicted for it. `None` when every place is in a request.
    fn admit(&self, id: u64, max: usize) -> Option<(Arc<Slot>, bool)> {
        let mut open = self.lock();
        let mut evicted = false;
        if open.len() >= max {
            let victim = open
                .iter()
                .find(|(_, s)| s.busy.load(Ordering::Acquire) == 0)
                .map(|(id, _)| *id)?;
            if let Some(slot) = open.remove(&victim) {
                slot.evict.cancel();
            }
            evicted = true;
        }
        let slot = Arc::new(Slot {
            busy: AtomicUsize::new(0),
            evict: CancellationToken::new(),
        });
        open.insert(id, slot.clone());
        Some((slot, evicted))
    }

    fn release(&self, id: u64) {
        self.lock().remove(&id);
    }
}

/// Logs at most once per [`LOG_EVERY`], with how many were not logged in between.
struct RateLimitedLog {
    last_ms: AtomicI64,
    suppressed: AtomicUsize,
}

impl RateLimitedLog {
    fn new() -> RateLimitedLog {
        RateLimitedLog {
            last_ms: AtomicI64::new(i64::MIN),
            suppressed: AtomicUsize::new(0),
        }
    }

    /// `Some(suppressed since the last line)` when this one may be logged.
    fn admit(&self) -> Option<usize> {
        let now = chrono::Utc::now().timestamp_millis();
        let every = i64::try_from(LOG_EVERY.as_millis()).unwrap_or(i64::MAX);
        let last = self.last_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= every
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Connections closed at `max_connections`: each counted, and logged at most once per
/// [`LOG_EVERY`].
struct Refusals {
    which: Listener,
    max: usize,
    telemetry: Telemetry,
    log: RateLimitedLog,
}

impl Refusals {
    fn refuse(&self, why: &'static str) {
        self.telemetry.listener_refused(self.which.as_str());
        if let Some(suppressed) = self.log.admit() {
            tracing::warn!(
                listener = self.which.as_str(),
                max_connections = self.max,
                suppressed,
                "{why}"
            );
        }
    }
}

/// Serves `app` on `listener` within `limits` until `stop`; returns once every connection is
/// closed (the caller bounds that with its drain deadline and may abort the task: the
/// connections are tasks of this future and go with it).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    which: Listener,
    limits: Limits,
    telemetry: Telemetry,
    stop: CancellationToken,
) {
    let slots = Arc::new(Slots::default());
    let mut connections = JoinSet::new();
    let accept_log = RateLimitedLog::new();
    let max = limits.max_connections.max(1);
    let refusals = Refusals {
        which,
        max,
        telemetry,
        log: RateLimitedLog::new(),
    };
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_BUF_BYTES);
    let mut next_id: u64 = 0;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            _ = stop.cancelled() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) if is_connection_error(&error) => continue,
            Err(error) => {
                if let Some(suppressed) = accept_log.admit() {
                    tracing::warn!(listener = which.as_str(), %error, suppressed, "cannot accept a connection; pausing the listener briefly");
                }
                tokio::select! {
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    _ = stop.cancelled() => break,
                }
                continue;
            }
        };
        next_id += 1;
        let id = next_id;
        let Some((slot, evicted)) = slots.admit(id, max) else {
            drop(stream);
            refusals.refuse(
                "connection limit reached with every connection in a request; closing new connections",
            );
            continue;
        };
        if evicted {
            refusals.refuse(
                "connection limit reached; closing the oldest connection that was not in a request",
            );
        }
        let connection = serve_connection(
            stream,
            http.clone(),
            app.clone(),
            slot,
            stop.clone(),
            limits.header_timeout,
        );
        let slots = slots.clone();
        connections.spawn(async move {
            connection.await;
            slots.release(id);
        });
    }
    // No new connections from here on; the open ones finish their requests.
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// Accept errors that concern one connection only (the next accept is fine).
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset | Interrupted
    )
}

async fn serve_connection(
    stream: TcpStream,
    http: hyper::server::conn::http1::Builder,
    app: Router,
    slot: Arc<Slot>,
    stop: CancellationToken,
    header_timeout: Duration,
) {
    let busy = slot.clone();
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let guard = Busy::enter(busy.clone());
        let app = app.clone();
        async move {
            let answer = tokio::time::timeout(REQUEST_TIMEOUT, app.oneshot(request.map(Body::new)))
                .await
                .unwrap_or_else(|_| {
                    Ok(Response::builder()
                        .status(StatusCode::SERVICE_UNAVAILABLE)
                        .body(Body::from("request took too long\n"))
                        .unwrap_or_default())
                });
            answer.map(|response| {
                response.map(|body| {
                    Body::new(Tracked {
                        body,
                        _guard: guard,
                    })
                })
            })
        }
    });
    let connection = http.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        // Errors here are the client's (a reset, a header timeout, a bad request).
        _ = connection.as_mut() => return,
        _ = slot.evict.cancelled() => return,
        _ = stop.cancelled() => {}
    }
    // Stopping: an idle connection closes now, one in a request after its answer; one still
    // sending its request is dropped as soon as it is seen not to be in a request.
    connection.as_mut().graceful_shutdown();
    let check = header_timeout.min(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = connection.as_mut() => return,
            _ = slot.evict.cancelled() => return,
            _ = tokio::time::sleep(check) => {
                if slot.busy.load(Ordering::Acquire) == 0 {
                    return;
                }
            }
        }
    }
}

/// Marks a connection as in a request while alive.
struct Busy(Arc<Slot>);

impl Busy {
    fn enter(slot: Arc<Slot>) -> Busy {
        slot.busy.fetch_add(1, Ordering::AcqRel);
        Busy(slot)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An answer's body that keeps its connection marked busy until hyper has taken all of it.
struct Tracked {
    body: Body,
    _guard: Busy,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_cap_the_oldest_connection_not_in_a_request_makes_room() {
        let slots = Slots::default();
        let (first, evicted) = slots.admit(1, 2).unwrap();
        assert!(!evicted);
        let (second, _) = slots.admit(2, 2).unwrap();
        // The oldest is in a request: the next oldest goes.
        let busy = Busy::enter(first.clone());
        let (_third, evicted) = slots.admit(3, 2).unwrap();
        assert!(evicted);
        assert!(second.evict.is_cancelled() && !first.evict.is_cancelled());
        assert_eq!(slots.lock().keys().copied().collect::<Vec<_>>(), [1, 3]);
        // Every place in a request: the new connection is refused, nothing is evicted.
        let _busy_too = Busy::enter(slots.lock()[&3].clone());
        assert!(slots.admit(4, 2).is_none());
        assert_eq!(slots.lock().len(), 2);
        // A finished request makes its connection evictable again.
        drop(busy);
        assert!(slots.admit(5, 2).unwrap().1);
        assert!(first.evict.is_cancelled());
        slots.release(5);
        assert_eq!(slots.lock().keys().copied().collect::<Vec<_>>(), [3]);
    }

    #[tokio::test]
    async fn a_full_size_notification_body_and_large_headers_pass_oversized_headers_do_not() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route(
            "/",
            axum::routing::post(|body: Bytes| async move { body.len().to_string() }),
        );
        let stop = CancellationToken::new();
        let limits = Limits {
            max_connections: 4,
            header_timeout: Duration::from_secs(5),
        };
        let server = tokio::spawn(serve(
            listener,
            app,
            Listener::Notify,
            limits,
            Telemetry::new([]),
            stop.clone(),
        ));
        let client = crate::wxpay::client::http_client_builder().build().unwrap();
        let post = |header: usize, body: usize| {
            client
                .post(format!("http://{addr}/"))
                .header("x-pad", "a".repeat(header))
                .body(vec![b'x'; body])
                .send()
        };
        let ok = post(16 * 1024, crate::wxpay::xml::MAX_BODY_BYTES)
            .await
            .unwrap();
        assert_eq!(ok.status(), 200);
        assert_eq!(
            ok.text().await.unwrap(),
            crate::wxpay::xml::MAX_BODY_BYTES.to_string()
        );
        let refused = post(MAX_BUF_BYTES + 1, 10).await.unwrap();
        assert_eq!(refused.status(), 431);
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
    }

    #[test]
    fn a_rate_limited_log_logs_the_first_and_counts_the_rest() {
        let log = RateLimitedLog::new();
        assert_eq!(log.admit(), Some(0));
        assert_eq!(log.admit(), None);
        assert_eq!(log.admit(), None);
        assert_eq!(log.suppressed.load(Ordering::Relaxed), 2);
    }
}
