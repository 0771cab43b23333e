//! The metrics endpoint: an HTTP/1 server that answers like TorchServe's metrics port (FACTS.md §2, §5).
//!
//! Any path whose first segment is `metrics`, with any method, gets the exposition of
//! [`super::torchserve::encode`] with TorchServe's response headers, in TorchServe's order and case;
//! everything else gets TorchServe's 404 JSON and a closed connection.
//!
//! When [`Access`] says so, connections start with a TLS handshake and requests without the bearer
//! token get `401` (whatever the path) and a closed connection. [`serve`] reads the current
//! [`Access`] for every new connection, so a reload applies to the next scrape.

use std::{
    convert::Infallible,
    future::Future,
    hash::{BuildHasher, RandomState},
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::{
    HeaderMap, Request, Response, StatusCode,
    body::{Body, Frame, Incoming, SizeHint},
    header::{self, HeaderName, HeaderValue},
    http::Extensions,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
};

use super::{
    access::Access,
    text::Format,
    torchserve::{Filter, render_into},
};
use crate::{pipeline::DrainHandle, registry::Registry};

/// TorchServe's `TextFormat.CONTENT_TYPE_004` (simpleclient 0.9).
pub const CONTENT_TYPE_METRICS: &str = "text/plain; version=0.0.4; charset=utf-8";

/// TorchServe's 404 body: Gson pretty-printed `ErrorResponse` plus `\n` (`NettyUtils.sendJsonResponse`).
pub const NOT_FOUND_BODY: &str = "{\n  \"code\": 404,\n  \"type\": \"ResourceNotFoundException\",\n  \"message\": \"Requested resource is not found, please refer to API document.\"\n}\n";

/// Request bodies are read (so the connection stays usable) up to this size; a scrape sends none.
const MAX_BODY: usize = 64 * 1024;

/// How long [`serve`] waits for open connections to finish their response after `shutdown`.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// A TLS handshake that takes longer is dropped: a client that connects and stalls holds a task.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request head (also the idle time allowed between requests
/// on a kept-alive connection): a slowloris client cannot hold connections open on the metrics port.
/// Prometheus reconnects when its scrape interval is longer.
#[cfg(not(test))]
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
#[cfg(test)]
const HEADER_READ_TIMEOUT: Duration = Duration::from_millis(300);

/// The `WWW-Authenticate` challenge of a `401` (RFC 6750 §3).
pub const BEARER_CHALLENGE: &str = "Bearer realm=\"servescope\"";

/// Why the metrics port could not be bound, phrased with the fix.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error(
        "{addr} is already in use (is TorchServe's own metrics API on it? set metrics_address elsewhere or run \
         servescope with --listen {alternative})"
    )]
    InUse {
        addr: SocketAddr,
        alternative: SocketAddr,
    },
    #[error(
        "not permitted to listen on {addr} (ports below 1024 need root or CAP_NET_BIND_SERVICE; run servescope \
         with --listen {alternative})"
    )]
    PermissionDenied {
        addr: SocketAddr,
        alternative: SocketAddr,
    },
    #[error(
        "{addr} is not an address of this machine (give a local address with --listen, e.g. --listen {alternative})"
    )]
    AddrNotAvailable {
        addr: SocketAddr,
        alternative: SocketAddr,
    },
    #[error("cannot listen on {addr}: {source} (choose another address with --listen)")]
    Other {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Binds the metrics port.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    let std = bind_std(addr)?;
    TcpListener::from_std(std).map_err(|source| BindError::Other { addr, source })
}

/// As [`bind`], before any async runtime exists (the agent binds, loads its programs and drops its
/// privileges while it still has one thread). The socket is non-blocking, ready for
/// `TcpListener::from_std`.
pub fn bind_std(addr: SocketAddr) -> Result<std::net::TcpListener, BindError> {
    let listener = std::net::TcpListener::bind(addr).map_err(|source| match source.kind() {
        io::ErrorKind::AddrInUse => BindError::InUse {
            addr,
            alternative: alternative(addr),
        },
        io::ErrorKind::PermissionDenied => BindError::PermissionDenied {
            addr,
            alternative: alternative(addr),
        },
        io::ErrorKind::AddrNotAvailable => BindError::AddrNotAvailable {
            addr,
            alternative: SocketAddr::from(([127, 0, 0, 1], alternative(addr).port())),
        },
        _ => BindError::Other { addr, source },
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| BindError::Other { addr, source })?;
    Ok(listener)
}

/// An address to suggest instead of `addr`: same IP, TorchServe's metrics port moved up by 1000
/// (8082 → 9082), and an unprivileged port for privileged ones.
fn alternative(addr: SocketAddr) -> SocketAddr {
    let port = addr.port();
    let port = match port {
        0..1024 => 9082,
        1024..=64535 => port + 1000,
        _ => port - 1000,
    };
    SocketAddr::new(addr.ip(), port)
}

/// Open metrics connections at most. A scraper needs one (Prometheus keeps it alive between scrapes);
/// the cap keeps idle or hostile clients from taking the agent's descriptors and memory. Over it, a
/// new connection is closed at once and counted (`servescope_metrics_connections_rejected_total`).
#[cfg(not(test))]
const MAX_CONNECTIONS: usize = 256;
#[cfg(test)]
const MAX_CONNECTIONS: usize = 4;
/// Rejections are logged at most this often (a client retrying in a loop must not flood the log).
const REJECT_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Shared by every connection.
struct State {
    registry: Registry,
    /// Asks the ring-buffer reader to count what the kernel holds before each /metrics render.
    drain: DrainHandle,
    /// A hyper header-case map spelling `Pragma`, `Cache-Control` and `Expires` as TorchServe does.
    header_case: Option<Extensions>,
    /// The last /metrics body, whose buffer the next scrape renders into once hyper has sent it
    /// ([`State::body_buffer`]).
    last_body: Mutex<Option<Bytes>>,
}

impl State {
    /// An empty String for a /metrics body: the last body's buffer when nothing else holds it any
    /// more (hyper drops its copy once the response is written), else a new one.
    ///
    /// A body at 1,000 models is ~3 MB. Allocated afresh for every scrape, glibc's malloc kept each
    /// such block it freed (its mmap threshold rises to the largest block freed, and each of the
    /// runtime's threads has its own arena): RSS at 1,000 models grew from 26 to 32 MB over the first
    /// ten scrapes. A fixed mmap threshold kept it flat but made every render fault its ~800 pages
    /// in again (2.9 → 4.3–5.1 ms here). One buffer kept and reused does neither.
    fn body_buffer(&self) -> String {
        let last = self
            .last_body
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        last.and_then(|b| b.try_into_mut().ok())
            .map(|mut b| {
                // Emptied first, so that turning it into a Vec copies nothing.
                b.clear();
                // Empty, so valid UTF-8 whatever it held.
                String::from_utf8(Vec::from(b)).unwrap_or_default()
            })
            .unwrap_or_default()
    }

    /// Keeps `body` (a cheap reference-counted copy) for [`State::body_buffer`].
    fn keep_body(&self, body: &Bytes) {
        *self
            .last_body
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(body.clone());
    }
}

/// Serves the metrics endpoint on `listener` until `shutdown` completes, each new connection under
/// the [`Access`] `access` holds at the time (TLS, token).
///
/// Connections are kept alive (idle ones end at the header-read timeout), up to [`MAX_CONNECTIONS`] at once.
/// After `shutdown`, no connection is accepted and open ones get [`SHUTDOWN_GRACE`] to finish the response they are writing.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    drain: DrainHandle,
    access: watch::Receiver<Arc<Access>>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let state = Arc::new(State {
        registry,
        drain,
        header_case: header_case_template().await,
        last_body: Mutex::new(None),
    });
    let mut http = http1::Builder::new();
    // TorchServe sends no Date header.
    http.auto_date_header(false);
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let (stop_tx, stop_rx) = watch::channel(());
    let mut conns = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut last_reject_log: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            // Reap finished connection tasks so the set does not grow with every scrape.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    while conns.try_join_next().is_some() {}
                    if conns.len() >= MAX_CONNECTIONS {
                        // Dropping the stream closes it: the client sees the connection end unserved.
                        drop(stream);
                        state.registry.metrics_connections_rejected.inc();
                        if last_reject_log.is_none_or(|t| t.elapsed() >= REJECT_LOG_INTERVAL) {
                            last_reject_log = Some(tokio::time::Instant::now());
                            tracing::warn!(
                                %peer,
                                open = conns.len(),
                                "metrics endpoint holds its maximum of open connections; closing new ones \
                                 (servescope_metrics_connections_rejected_total counts them)"
                            );
                        }
                        continue;
                    }
                    let access = Arc::clone(&access.borrow());
                    conns.spawn(connection(http.clone(), stream, peer, Arc::clone(&state), access, stop_rx.clone()));
                }
                Err(e) => accept_failed(&e).await,
            },
        }
    }
    drop(listener);
    // Receivers see the send (or the sender's drop) as the signal for a graceful close.
    let _ = stop_tx.send(());
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::debug!(
            open = conns.len(),
            "metrics connections still open at shutdown; dropped"
        );
    }
    Ok(())
}

async fn accept_failed(e: &io::Error) {
    // Out of descriptors or memory: the listener stays readable, so back off instead of spinning.
    let exhausted = matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    );
    if exhausted {
        tracing::warn!(error = %e, "cannot accept metrics connections; retrying in 100 ms");
        tokio::time::sleep(Duration::from_millis(100)).await;
    } else {
        tracing::debug!(error = %e, "accepting a metrics connection failed");
    }
}

async fn connection(
    http: http1::Builder,
    stream: TcpStream,
    peer: SocketAddr,
    state: Arc<State>,
    access: Arc<Access>,
    stop: watch::Receiver<()>,
) {
    // TorchServe sets TCP_NODELAY on every accepted socket (FACTS.md §5); a scrape is one small write.
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(%peer, error = %e, "TCP_NODELAY not set");
    }
    match access.tls() {
        None => exchange(http, stream, peer, state, access, stop).await,
        Some(tls) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
            Ok(Ok(stream)) => exchange(http, stream, peer, state, access, stop).await,
            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
        },
    }
}

/// Serves the requests of one connection (plain or TLS).
async fn exchange<S>(
    http: http1::Builder,
    stream: S,
    peer: SocketAddr,
    state: Arc<State>,
    access: Arc<Access>,
    mut stop: watch::Receiver<()>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let state = Arc::clone(&state);
        let access = Arc::clone(&access);
        async move { Ok::<_, Infallible>(handle(&state, &access, req).await) }
    });
    let conn = http.serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "metrics connection ended with an error");
    }
}

/// TorchServe's routing of the metrics port: `segments[1] == "metrics"` after splitting the decoded
/// path on `/` (so `/metrics`, `/metrics/`, `/metrics/extra`; not `//metrics` or `/metricsx`).
fn is_metrics_path(path: &str) -> bool {
    crate::routing::percent_decode(path).split('/').nth(1) == Some("metrics")
}

async fn handle(state: &State, access: &Access, req: Request<Incoming>) -> Response<Payload> {
    if !access.authorized(req.headers()) {
        // Whatever the path: an unauthenticated client learns nothing, not even what exists. The
        // body is not read, so the connection ends here.
        let mut resp = response(
            state,
            StatusCode::UNAUTHORIZED,
            "text/plain; charset=utf-8",
            Bytes::from_static(
                b"401 Unauthorized: send the bearer token (Authorization: Bearer <token>)\n",
            ),
            true,
        );
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(BEARER_CHALLENGE),
        );
        return resp;
    }
    let metrics = is_metrics_path(req.uri().path());
    let filter = Filter::from_query(req.uri().query());
    // OpenMetrics only when the scraper asks for it (Prometheus does by default); TorchServe's own
    // text otherwise.
    let format = Format::negotiate(
        req.headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok()),
    );
    let mut close = wants_close(&req);
    // Read the body (TorchServe aggregates it too) so the next request on the connection parses; one
    // too large or broken ends the connection after this response.
    if Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .is_err()
    {
        close = true;
    }

    let (status, content_type, body) = if metrics {
        // Requests answered before this scrape was sent are counted in it, not ~100 ms later.
        if !state.drain.fresh().await {
            tracing::trace!("rendering without a fresh drain (none wired, or the reader is busy)");
        }
        let started = std::time::Instant::now();
        let mut body = state.body_buffer();
        render_into(&mut body, &state.registry, &filter, format);
        // Shown by the next scrape: this body is already written.
        state
            .registry
            .metrics_render_seconds
            .set(started.elapsed().as_secs_f64());
        let body = Bytes::from(body);
        state.keep_body(&body);
        (StatusCode::OK, format.content_type(), body)
    } else {
        // TorchServe closes the connection after every response of status >= 400.
        close = true;
        (
            StatusCode::NOT_FOUND,
            "application/json",
            Bytes::from_static(NOT_FOUND_BODY.as_bytes()),
        )
    };
    response(state, status, content_type, body, close)
}

/// Whether the client asked for the connection to end (hyper then closes it whatever we answer, so the
/// response says so rather than TorchServe's unconditional `keep-alive`).
fn wants_close<B>(req: &Request<B>) -> bool {
    let tokens = |value: &HeaderValue| {
        value
            .to_str()
            .unwrap_or("")
            .split(',')
            .map(|t| t.trim().to_ascii_lowercase())
            .collect::<Vec<_>>()
    };
    let connection: Vec<String> = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(tokens)
        .collect();
    if connection.iter().any(|t| t == "close") {
        return true;
    }
    req.version() == hyper::Version::HTTP_10 && !connection.iter().any(|t| t == "keep-alive")
}

/// A response with TorchServe's headers in TorchServe's order (`NettyUtils.sendHttpResponse`).
fn response(
    state: &State,
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
    close: bool,
) -> Response<Payload> {
    let mut headers = HeaderMap::with_capacity(7);
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // A UUID is hex and dashes: always a valid header value.
    if let Ok(id) = HeaderValue::from_str(&request_id()) {
        headers.insert(HeaderName::from_static("x-request-id"), id);
    }
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache; no-store, must-revalidate, private"),
    );
    headers.insert(
        header::EXPIRES,
        HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 UTC"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    headers.insert(
        header::CONNECTION,
        HeaderValue::from_static(if close { "close" } else { "keep-alive" }),
    );

    let mut resp = Response::new(Payload(Some(body)));
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    if let Some(case) = &state.header_case {
        *resp.extensions_mut() = case.clone();
    }
    resp
}

/// A complete response body that hyper always treats as a body of known length.
///
/// hyper drops an explicit `content-length: 0` when the body reports itself finished up front (as an
/// empty `Full` does) and appends its own after `connection`, out of TorchServe's header order; this
/// body only ends when polled, so the header stays where it was put.
struct Payload(Option<Bytes>);

impl Body for Payload {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(
            self.0
                .take()
                .filter(|b| !b.is_empty())
                .map(|b| Ok(Frame::data(b))),
        )
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(
            self.0
                .as_ref()
                .map_or(0, |b| u64::try_from(b.len()).unwrap_or(u64::MAX)),
        )
    }
}

/// hyper writes header names lowercase unless the response carries its (private) header-case map,
/// which it documents as recorded from a request by `preserve_header_case` and honoured on any
/// response. One synthetic request through an in-memory connection records the spellings TorchServe
/// uses; names absent from the map stay lowercase, as TorchServe's other headers are. `None` (names
/// all lowercase, equally valid HTTP) if hyper does not cooperate.
async fn header_case_template() -> Option<Extensions> {
    const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nPragma: x\r\nCache-Control: x\r\nExpires: x\r\nconnection: close\r\n\r\n";
    let (mut client, server) = tokio::io::duplex(4096);
    let slot: Arc<Mutex<Option<Extensions>>> = Arc::default();
    let seen = Arc::clone(&slot);
    let service = service_fn(move |req: Request<Incoming>| {
        if let Ok(mut slot) = seen.lock() {
            *slot = Some(req.extensions().clone());
        }
        async { Ok::<_, Infallible>(Response::new(Payload(None))) }
    });
    let mut http = http1::Builder::new();
    http.preserve_header_case(true);
    let conn = http.serve_connection(TokioIo::new(server), service);
    // In memory and tiny; the bound only guards start-up against a hyper that waits for more.
    let exchange = tokio::time::timeout(Duration::from_secs(1), async {
        let (written, served) = tokio::join!(client.write_all(REQUEST), conn);
        written?;
        served.map_err(io::Error::other)
    })
    .await;
    match exchange {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "header case template not built; header names stay lowercase")
        }
        Err(_) => tracing::debug!("header case template timed out; header names stay lowercase"),
    }
    slot.lock().ok().and_then(|mut s| s.take())
}

/// A random (version 4) UUID, like TorchServe's `x-request-id`.
fn request_id() -> String {
    let mut b = random_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

fn random_bytes() -> [u8; 16] {
    let mut b = [0u8; 16];
    // SAFETY: the pointer and length describe `b`, which is valid for writes of its whole length.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), libc::GRND_NONBLOCK) };
    if usize::try_from(n).is_ok_and(|n| n == b.len()) {
        return b;
    }
    // Entropy pool not ready yet (early boot) or no getrandom: the id only needs to be unique, and
    // std's per-process random hash keys mixed with the time give that.
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let hi = RandomState::new().hash_one(nanos);
    let lo = RandomState::new().hash_one(nanos.wrapping_add(1));
    b[..8].copy_from_slice(&hi.to_le_bytes());
    b[8..].copy_from_slice(&lo.to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;
    use crate::{
        http::{Exchange, Request as HttpRequest, Response as HttpResponse},
        registry::Flavor,
    };

    #[test]
    fn each_scrape_renders_into_the_last_body_once_it_was_sent() {
        let state = State {
            registry: Registry::new(),
            drain: DrainHandle::detached(),
            header_case: None,
            last_body: Mutex::new(None),
        };
        let render = |text: &str| {
            let mut body = state.body_buffer();
            assert!(body.is_empty(), "handed out empty");
            body.push_str(text);
            let body = Bytes::from(body);
            state.keep_body(&body);
            body
        };
        assert_eq!(state.body_buffer().capacity(), 0, "nothing to reuse yet");

        let first = render(&"x".repeat(100_000));
        // Still being written (hyper holds it): the next scrape gets a buffer of its own.
        let second = render("y");
        assert_ne!(second.as_ptr(), first.as_ptr());
        // Only the newest body is kept: once hyper drops both, the first one's memory is freed.
        let (ptr, len) = (second.as_ptr(), second.len());
        drop(first);
        drop(second);

        // A body hyper has dropped is the next render's buffer: the same memory, nothing copied.
        let third = state.body_buffer();
        assert_eq!(third.as_ptr(), ptr, "the same allocation");
        assert!(third.capacity() >= len);
        // Taken: a scrape meanwhile allocates its own.
        assert_eq!(state.body_buffer().capacity(), 0);
    }

    const GOLDEN_HEADERS: &str =
        include_str!("../../../tests/golden/torchserve-0.12/metrics_headers.txt");
    const GOLDEN_UNKNOWN_HEADERS: &str =
        include_str!("../../../tests/golden/torchserve-0.12/metrics_unknown_name_headers.txt");

    /// Every test exchange is bounded: a hung server fails the test instead of the run.
    const IO_LIMIT: Duration = Duration::from_secs(5);

    struct Reply {
        status_line: String,
        /// (name as written, value), in wire order.
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    /// Starts a server on an ephemeral port; dropping the sender stops it.
    async fn start(
        registry: Registry,
    ) -> (
        SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<anyhow::Result<()>>,
    ) {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind an ephemeral port");
        let addr = listener.local_addr().expect("local address");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (keep, access) = watch::channel(Arc::new(Access::open()));
        let task = tokio::spawn(async move {
            let _keep = keep;
            serve(
                listener,
                registry,
                DrainHandle::detached(),
                access,
                async move {
                    let _ = rx.await;
                },
            )
            .await
        });
        (addr, tx, task)
    }

    /// Starts a server under `access`; the returned sender reloads it. The server stops when the test
    /// ends (its runtime is dropped).
    async fn start_with(access: Access) -> (SocketAddr, watch::Sender<Arc<Access>>) {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind an ephemeral port");
        let addr = listener.local_addr().expect("local address");
        let (tx, rx) = watch::channel(Arc::new(access));
        tokio::spawn(serve(
            listener,
            Registry::new(),
            DrainHandle::detached(),
            rx,
            std::future::pending::<()>(),
        ));
        (addr, tx)
    }

    fn token_access(dir: &std::path::Path, token: &str) -> Access {
        let file = dir.join(format!("token-{token}"));
        std::fs::write(&file, format!("{token}\n")).expect("write token");
        Access::load(&crate::exposition::access::AccessConfig {
            tls: None,
            token_file: Some(file),
        })
        .expect("token loads")
    }

    async fn get_with(addr: SocketAddr, target: &str, auth: Option<&str>) -> Reply {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let auth = auth.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
        roundtrip(
            &mut stream,
            &format!("GET {target} HTTP/1.1\r\nHost: x\r\n{auth}\r\n"),
            false,
        )
        .await
    }

    /// Over the connection cap a new connection is closed unserved and counted; once a connection
    /// ends, new ones are served again. Held connections keep being served meanwhile.
    #[tokio::test]
    async fn connections_over_the_cap_are_closed_and_counted() {
        use tokio::io::AsyncReadExt as _;
        let registry = Registry::new();
        let (addr, _stop, _task) = start(registry.clone()).await;
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            // A full exchange proves the server accepted it; the connection stays open (keep-alive).
            let reply = roundtrip(
                &mut stream,
                "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
                false,
            )
            .await;
            assert_eq!(reply.status_line, "HTTP/1.1 200 OK");
            held.push(stream);
        }
        let mut over = TcpStream::connect(addr)
            .await
            .expect("the kernel completes the handshake");
        let _ = over
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await;
        let mut got = Vec::new();
        let _ = tokio::time::timeout(IO_LIMIT, over.read_to_end(&mut got))
            .await
            .expect("closed at once, not left hanging");
        assert!(
            got.is_empty(),
            "served over the cap: {:?}",
            String::from_utf8_lossy(&got)
        );
        assert_eq!(registry.metrics_connections_rejected.get(), 1);

        // The held connections are still served.
        let reply = roundtrip(
            &mut held[0],
            "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
            false,
        )
        .await;
        assert_eq!(reply.status_line, "HTTP/1.1 200 OK");
        assert!(
            String::from_utf8_lossy(&reply.body)
                .contains("servescope_metrics_connections_rejected_total 1")
        );

        // One ends: a new connection is served (the server notices the close asynchronously).
        drop(held.pop());
        let deadline = tokio::time::Instant::now() + IO_LIMIT;
        loop {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            let _ = stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await;
            let mut got = Vec::new();
            let _ = tokio::time::timeout(IO_LIMIT, stream.read_to_end(&mut got)).await;
            if got.starts_with(b"HTTP/1.1 200 OK") {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no connection served after one closed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A client that never finishes its request head is disconnected (slowloris on /metrics).
    #[tokio::test]
    async fn an_unfinished_request_head_is_cut_off() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (addr, _stop, _task) = start(Registry::new()).await;
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("send part of a head");
        let mut buf = Vec::new();
        let closed =
            tokio::time::timeout(HEADER_READ_TIMEOUT * 10, stream.read_to_end(&mut buf)).await;
        assert!(
            matches!(closed, Ok(Ok(_))),
            "the server must close the connection: {closed:?}"
        );
        assert!(
            !String::from_utf8_lossy(&buf).contains("# TYPE"),
            "no metrics for an unfinished request"
        );
        // A complete request right after is served as usual.
        let reply = get_with(addr, "/metrics", None).await;
        assert_eq!(reply.status_line, "HTTP/1.1 200 OK");
    }

    #[tokio::test]
    async fn bearer_token_guards_every_path() {
        let d = tempfile::tempdir().expect("tempdir");
        let (addr, reload) = start_with(token_access(d.path(), "t0ken")).await;
        for (target, auth) in [
            ("/metrics", None),
            ("/metrics", Some("Bearer wrong")),
            ("/metrics", Some("Basic dDB rZW4=")),
            ("/ping", None),
        ] {
            let reply = get_with(addr, target, auth).await;
            assert_eq!(
                reply.status_line, "HTTP/1.1 401 Unauthorized",
                "{target} {auth:?}"
            );
            assert_eq!(reply.header("www-authenticate"), Some(BEARER_CHALLENGE));
            assert_eq!(reply.header("connection"), Some("close"));
            assert!(!String::from_utf8_lossy(&reply.body).contains("# TYPE"));
        }
        let reply = get_with(addr, "/metrics", Some("Bearer t0ken")).await;
        assert_eq!(reply.status_line, "HTTP/1.1 200 OK");
        assert!(String::from_utf8_lossy(&reply.body).contains("# TYPE Requests2XX counter"));
        // Authenticated, other paths keep TorchServe's 404.
        let reply = get_with(addr, "/ping", Some("Bearer t0ken")).await;
        assert_eq!(reply.status_line, "HTTP/1.1 404 Not Found");

        // A reload applies to the next connection: the old token stops working.
        reload
            .send(Arc::new(token_access(d.path(), "n3w")))
            .expect("server alive");
        let reply = get_with(addr, "/metrics", Some("Bearer t0ken")).await;
        assert_eq!(reply.status_line, "HTTP/1.1 401 Unauthorized");
        let reply = get_with(addr, "/metrics", Some("Bearer n3w")).await;
        assert_eq!(reply.status_line, "HTTP/1.1 200 OK");
    }

    #[tokio::test]
    async fn tls_with_a_self_signed_certificate() {
        use rustls::pki_types::ServerName;

        let d = tempfile::tempdir().expect("tempdir");
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        let (cert_path, key_path) = (d.path().join("c.pem"), d.path().join("k.pem"));
        std::fs::write(&cert_path, cert.cert.pem()).expect("write cert");
        std::fs::write(&key_path, cert.signing_key.serialize_pem()).expect("write key");
        let token = d.path().join("token");
        std::fs::write(&token, "tls-t0ken").expect("write token");
        let access = Access::load(&crate::exposition::access::AccessConfig {
            tls: Some((cert_path, key_path)),
            token_file: Some(token),
        })
        .expect("TLS loads");
        let (addr, _reload) = start_with(access).await;

        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.cert.der().clone()).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let name = ServerName::try_from("localhost").expect("name");
        let mut tls = tokio::time::timeout(IO_LIMIT, connector.connect(name, tcp))
            .await
            .expect("handshake in time")
            .expect("handshake");
        let reply = roundtrip(
            &mut tls,
            "GET /metrics HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer tls-t0ken\r\n\r\n",
            false,
        )
        .await;
        assert_eq!(reply.status_line, "HTTP/1.1 200 OK");
        assert!(String::from_utf8_lossy(&reply.body).contains("# TYPE Requests2XX counter"));
        let reply = roundtrip(
            &mut tls,
            "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n",
            false,
        )
        .await;
        assert_eq!(reply.status_line, "HTTP/1.1 401 Unauthorized");

        // Plain HTTP to the TLS port gets no HTTP answer: the handshake fails and the socket closes.
        let mut plain = TcpStream::connect(addr).await.expect("connect");
        plain
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut got = Vec::new();
        let _ = tokio::time::timeout(IO_LIMIT, plain.read_to_end(&mut got))
            .await
            .expect("closed in time");
        assert!(!got.starts_with(b"HTTP/1.1 200"), "{got:?}");
    }

    /// Writes `request` and reads one response (no body for HEAD).
    async fn roundtrip<S: AsyncRead + AsyncWrite + Unpin>(
        stream: &mut S,
        request: &str,
        head: bool,
    ) -> Reply {
        tokio::time::timeout(IO_LIMIT, async {
            stream
                .write_all(request.as_bytes())
                .await
                .expect("write request");
            let mut buf = Vec::new();
            let end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk).await.expect("read response head");
                assert!(n > 0, "connection closed before the response head: {buf:?}");
                buf.extend_from_slice(&chunk[..n]);
            };
            let text = String::from_utf8(buf[..end].to_vec()).expect("ASCII head");
            let mut lines = text.split("\r\n").filter(|l| !l.is_empty());
            let status_line = lines.next().unwrap_or_default().to_owned();
            let headers: Vec<(String, String)> = lines
                .map(|l| {
                    let (n, v) = l.split_once(": ").expect("header line");
                    (n.to_owned(), v.to_owned())
                })
                .collect();
            let mut reply = Reply {
                status_line,
                headers,
                body: buf[end..].to_vec(),
            };
            let len: usize = if head {
                0
            } else {
                reply
                    .header("content-length")
                    .expect("content-length")
                    .parse()
                    .expect("numeric length")
            };
            while reply.body.len() < len {
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk).await.expect("read body");
                assert!(n > 0, "connection closed inside the body");
                reply.body.extend_from_slice(&chunk[..n]);
            }
            assert_eq!(reply.body.len(), len, "bytes beyond the announced length");
            reply
        })
        .await
        .expect("response within the time limit")
    }

    async fn get(addr: SocketAddr, target: &str) -> Reply {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        roundtrip(
            &mut stream,
            &format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\n\r\n"),
            false,
        )
        .await
    }

    /// Header lines of a golden capture: (name, value) in order.
    fn golden_headers(text: &str) -> Vec<(&str, &str)> {
        text.lines()
            .skip(1)
            .map(|l| l.trim_end_matches('\r'))
            .filter(|l| !l.is_empty())
            .filter_map(|l| l.split_once(": "))
            .collect()
    }

    fn is_uuid_v4(s: &str) -> bool {
        let groups: Vec<&str> = s.split('-').collect();
        groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
            && s.chars()
                .all(|c| c == '-' || matches!(c, '0'..='9' | 'a'..='f'))
            && groups[2].starts_with('4')
            && groups[3].starts_with(['8', '9', 'a', 'b'])
    }

    fn ping(registry: &Registry) {
        let ex = Exchange {
            tgid: 1,
            conn_id: 1,
            peer: None,
            request: Some(HttpRequest {
                method: "GET".into(),
                target: "/ping".into(),
                first_byte_ns: 1_000,
                complete_ns: 2_000,
                bytes: 40,
            }),
            response: HttpResponse {
                status: 200,
                reason: "OK".into(),
                request_id: Some("id".into()),
                start_ns: 3_000,
                end_ns: Some(4_000),
                bytes: 100,
            },
        };
        registry.record(&ex, "vm", Flavor::TorchServe);
    }

    /// A body without its `servescope_metrics_render_seconds` sample, which each scrape moves (it
    /// shows the previous render's time).
    fn without_render_time(body: &[u8]) -> String {
        String::from_utf8_lossy(body)
            .lines()
            .filter(|l| !l.starts_with("servescope_metrics_render_seconds "))
            .map(|l| format!("{l}\n"))
            .collect()
    }

    #[tokio::test]
    async fn the_render_time_of_the_previous_scrape_is_served() {
        let registry = Registry::new();
        let (addr, _stop, _task) = start(registry.clone()).await;
        let value = |reply: &Reply| {
            String::from_utf8_lossy(&reply.body)
                .lines()
                .find_map(|l| l.strip_prefix("servescope_metrics_render_seconds "))
                .and_then(|v| v.parse::<f64>().ok())
        };
        assert_eq!(value(&get(addr, "/metrics").await), Some(0.0));
        let second = value(&get(addr, "/metrics").await);
        assert!(second.is_some_and(|s| s > 0.0 && s < 1.0), "{second:?}");
    }

    #[tokio::test]
    async fn metrics_reply_has_torchserve_headers() {
        let registry = Registry::new();
        let (addr, _stop, _task) = start(registry.clone()).await;
        let reply = get(addr, "/metrics").await;

        assert_eq!(
            Some(reply.status_line.as_str()),
            GOLDEN_HEADERS.lines().next()
        );
        let golden = golden_headers(GOLDEN_HEADERS);
        let names: Vec<&str> = reply.headers.iter().map(|(n, _)| n.as_str()).collect();
        let golden_names: Vec<&str> = golden.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names, golden_names,
            "names, order and case as TorchServe writes them"
        );
        for ((name, value), (_, want)) in reply.headers.iter().zip(&golden) {
            match name.as_str() {
                "x-request-id" => assert!(is_uuid_v4(value), "{value}"),
                "content-length" => assert_eq!(value.parse::<usize>().ok(), Some(reply.body.len())),
                _ => assert_eq!(value, want, "{name}"),
            }
        }
        assert_eq!(
            without_render_time(&reply.body),
            without_render_time(
                super::super::torchserve::encode(&registry.gather(), &Filter::all()).as_bytes()
            )
        );
    }

    #[tokio::test]
    async fn openmetrics_when_the_scraper_asks() {
        let registry = Registry::new();
        ping(&registry);
        let (addr, _stop, _task) = start(registry.clone()).await;
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        // Prometheus 2.42's scrape request header.
        let accept = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        let reply = roundtrip(
            &mut stream,
            &format!(
                "GET /metrics?name[]=Requests2XX HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\n\r\n"
            ),
            false,
        )
        .await;
        assert_eq!(
            reply.header("content-type"),
            Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
        );
        assert_eq!(
            String::from_utf8_lossy(&reply.body),
            "# TYPE Requests2XX unknown\n\
             # HELP Requests2XX Torchserve prometheus counter metric with unit: Count\n\
             Requests2XX{Level=\"Host\",Hostname=\"vm\"} 1.0\n\
             # EOF\n"
        );
        // Same connection, no Accept: TorchServe's text again.
        let reply = roundtrip(
            &mut stream,
            "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
            false,
        )
        .await;
        assert_eq!(reply.header("content-type"), Some(CONTENT_TYPE_METRICS));
        assert_eq!(
            without_render_time(&reply.body),
            without_render_time(
                super::super::torchserve::encode(&registry.gather(), &Filter::all()).as_bytes()
            )
        );
    }

    #[tokio::test]
    async fn name_filter_end_to_end() {
        let registry = Registry::new();
        ping(&registry);
        let (addr, _stop, _task) = start(registry).await;

        let want = "# HELP Requests2XX Torchserve prometheus counter metric with unit: Count\n\
                    # TYPE Requests2XX counter\n\
                    Requests2XX{Level=\"Host\",Hostname=\"vm\",} 1.0\n";
        for target in [
            "/metrics?name[]=Requests2XX",
            "/metrics?name%5B%5D=Requests2XX&name[]=Requests4XX",
        ] {
            let reply = get(addr, target).await;
            assert_eq!(String::from_utf8_lossy(&reply.body), want, "{target}");
        }

        // Unknown name: 200 with an empty body and the same headers as the golden capture.
        let reply = get(addr, "/metrics?name[]=no_such_metric").await;
        assert!(reply.body.is_empty());
        let golden = golden_headers(GOLDEN_UNKNOWN_HEADERS);
        for ((name, value), (want_name, want)) in reply.headers.iter().zip(&golden) {
            assert_eq!(name, want_name);
            if name != "x-request-id" {
                assert_eq!(value, want, "{name}");
            }
        }
        assert_eq!(reply.headers.len(), golden.len());

        // `name=` without brackets is ignored: the full exposition.
        let reply = get(addr, "/metrics?name=Requests2XX").await;
        assert!(String::from_utf8_lossy(&reply.body).contains("# TYPE GPUUtilization gauge\n"));
    }

    #[tokio::test]
    async fn any_metrics_path_and_method_on_one_connection() {
        let (addr, _stop, _task) = start(Registry::new()).await;
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let post = "POST /metrics/extra HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello";
        let reply = roundtrip(&mut stream, post, false).await;
        assert_eq!(reply.status_line, "HTTP/1.1 200 OK");
        assert_eq!(reply.header("connection"), Some("keep-alive"));
        assert!(String::from_utf8_lossy(&reply.body).starts_with("# HELP Requests2XX "));

        // HEAD: same headers, announced length, no body; the connection stays usable.
        let reply = roundtrip(
            &mut stream,
            "HEAD /metrics/ HTTP/1.1\r\nHost: x\r\n\r\n",
            true,
        )
        .await;
        assert_eq!(reply.status_line, "HTTP/1.1 200 OK");
        assert!(
            reply
                .header("content-length")
                .and_then(|l| l.parse::<usize>().ok())
                .is_some_and(|l| l > 0)
        );
        assert!(reply.body.is_empty());

        let reply = roundtrip(
            &mut stream,
            "GET /metrics?name[]=nothing HTTP/1.1\r\nHost: x\r\n\r\n",
            false,
        )
        .await;
        assert_eq!(reply.header("content-length"), Some("0"));

        // The client asking to close gets an honest `connection: close`.
        let reply = roundtrip(
            &mut stream,
            "GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n",
            false,
        )
        .await;
        assert_eq!(reply.header("connection"), Some("close"));
    }

    #[tokio::test]
    async fn other_paths_get_torchserve_404_and_close() {
        let (addr, _stop, _task) = start(Registry::new()).await;
        for target in ["/ping", "/", "/metricsx", "//metrics", "/api/metrics"] {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            let reply = roundtrip(
                &mut stream,
                &format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n"),
                false,
            )
            .await;
            assert_eq!(reply.status_line, "HTTP/1.1 404 Not Found", "{target}");
            assert_eq!(reply.header("content-type"), Some("application/json"));
            assert_eq!(reply.header("connection"), Some("close"));
            assert!(reply.header("x-request-id").is_some_and(is_uuid_v4));
            assert_eq!(String::from_utf8_lossy(&reply.body), NOT_FOUND_BODY);
            let mut rest = Vec::new();
            let eof = tokio::time::timeout(IO_LIMIT, stream.read_to_end(&mut rest)).await;
            assert!(
                matches!(eof, Ok(Ok(0))),
                "{target}: server keeps the connection after a 404"
            );
        }
    }

    #[tokio::test]
    async fn shutdown_stops_accepting() {
        let (addr, stop, task) = start(Registry::new()).await;
        let mut idle = TcpStream::connect(addr).await.expect("connect");
        let _ = roundtrip(&mut idle, "GET /metrics HTTP/1.1\r\n\r\n", false).await;
        drop(stop);
        let outcome = tokio::time::timeout(IO_LIMIT, task).await;
        assert!(
            matches!(outcome, Ok(Ok(Ok(())))),
            "serve returns Ok after shutdown"
        );
        assert!(TcpStream::connect(addr).await.is_err(), "listener closed");
    }

    #[tokio::test]
    async fn taken_port_names_the_fix() {
        let taken = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind an ephemeral port");
        let addr = taken.local_addr().expect("local address");
        let err = bind(addr).await.expect_err("second bind fails");
        assert!(matches!(err, BindError::InUse { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("already in use"), "{msg}");
        assert!(
            msg.contains(&format!("--listen {}", alternative(addr))),
            "{msg}"
        );
    }

    #[test]
    fn bind_messages() {
        let addr = SocketAddr::from(([127, 0, 0, 1], 8082));
        let err = BindError::InUse {
            addr,
            alternative: alternative(addr),
        };
        assert_eq!(
            err.to_string(),
            "127.0.0.1:8082 is already in use (is TorchServe's own metrics API on it? set metrics_address \
             elsewhere or run servescope with --listen 127.0.0.1:9082)"
        );
        assert_eq!(
            alternative(SocketAddr::from(([0, 0, 0, 0], 80))).to_string(),
            "0.0.0.0:9082"
        );
        assert_eq!(
            alternative(SocketAddr::from(([127, 0, 0, 1], 65000))).port(),
            64000
        );
    }

    #[test]
    fn metrics_paths() {
        for p in [
            "/metrics",
            "/metrics/",
            "/metrics/extra",
            "/%6detrics",
            "/metrics%2Fx",
        ] {
            assert!(is_metrics_path(p), "{p}");
        }
        for p in [
            "/",
            "",
            "/metricsx",
            "//metrics",
            "/Metrics",
            "/api/metrics",
            "metrics",
        ] {
            assert!(!is_metrics_path(p), "{p}");
        }
    }

    #[test]
    fn request_ids_are_random_uuid_v4() {
        let ids: std::collections::BTreeSet<String> = (0..1000).map(|_| request_id()).collect();
        assert_eq!(ids.len(), 1000);
        assert!(ids.iter().all(|id| is_uuid_v4(id)), "{ids:?}");
    }
}
