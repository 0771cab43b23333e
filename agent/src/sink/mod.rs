//! Per-request logs: every exchange the registry counts can also go to a JSON-lines file
//! ([`file`]), syslog ([`syslog`]) and a latency CSV ([`csv`]).
//!
//! The ring-buffer reader must never wait for a disk or a syslog server, so [`Sinks::offer`] turns
//! an exchange into one owned [`Record`] and hands it to each sink's bounded channel with
//! `try_send`; a full channel drops the record and counts it in
//! `servescope_log_dropped_total{sink}`. Each sink writes on its own thread (plain blocking I/O,
//! away from the async runtime that runs the reader), draining whatever is queued into one write.

pub mod clock;
pub mod config;
pub mod csv;
pub mod file;
pub mod filter;
pub mod rotate;
pub mod syslog;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use prometheus::IntCounter;
use tokio::sync::mpsc;

use crate::{
    http::Exchange,
    registry::Registry,
    routing::{self, Route},
    sink::{clock::WallClock, config::SinksConfig, filter::Filter, rotate::RotatingFile},
};

/// What one request log line says about an exchange. Owned, so the reader can hand it off; never
/// holds body bytes (an [`Exchange`] has none).
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// Wall-clock time the exchange completed (the response's last write, or its status line when
    /// the connection closed first), in nanoseconds since the Unix epoch.
    pub unix_ns: i128,
    /// UTS hostname of the traced process's namespace (the pod name in Kubernetes).
    pub hostname: String,
    /// The traced server process.
    pub pid: u32,
    pub client: Option<SocketAddr>,
    /// `None` when the response could not be paired with a request.
    pub method: Option<String>,
    /// The request target's path, without the query string (queries can carry secrets).
    pub path: Option<String>,
    pub api: Api,
    pub model: Option<String>,
    pub version: Option<String>,
    pub status: u16,
    /// TorchServe's latency: request complete → response status line.
    pub latency_us: Option<f64>,
    /// Request's first byte → response's last byte.
    pub total_us: Option<f64>,
    pub request_bytes: Option<u64>,
    pub response_bytes: u64,
    /// The `x-request-id` the server answered with.
    pub request_id: Option<String>,
    /// Whether the response was written to its end.
    pub complete: bool,
}

/// Which kind of API an exchange addressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    /// An inference route (predictions, explanations, KServe v1/v2, SageMaker `/invocations`).
    Inference,
    /// Anything else: ping, management, metrics, unknown paths.
    Other,
    /// The response had no request the agent could pair it with.
    Unknown,
}

impl Api {
    pub fn as_str(self) -> &'static str {
        match self {
            Api::Inference => "inference",
            Api::Other => "other",
            Api::Unknown => "unknown",
        }
    }
}

impl Record {
    /// The record of one exchange of process `pid`, whose namespace is called `hostname`.
    pub fn from_exchange(ex: &Exchange, hostname: &str, clock: &mut WallClock) -> Record {
        let route = ex.request.as_ref().map(|r| routing::route(&r.target));
        Self::from_routed(ex, route.as_ref(), hostname, clock)
    }

    /// [`Record::from_exchange`] with the request's route already taken.
    pub fn from_routed(
        ex: &Exchange,
        route: Option<&Route>,
        hostname: &str,
        clock: &mut WallClock,
    ) -> Record {
        let resp = &ex.response;
        let req = ex.request.as_ref();
        let (api, model, version) = match route {
            None => (Api::Unknown, None, None),
            Some(Route::Inference { model, version }) => (
                Api::Inference,
                Some(model.to_string()),
                Some(version.to_string()),
            ),
            Some(Route::InferenceWithoutModel) => (Api::Inference, None, None),
            Some(Route::Other) => (Api::Other, None, None),
        };
        Record {
            unix_ns: clock.to_unix_ns(resp.end_ns.unwrap_or(resp.start_ns)),
            hostname: hostname.to_owned(),
            pid: ex.tgid,
            client: ex.peer,
            method: req.map(|r| r.method.to_string()),
            path: req.map(|r| {
                let path = r
                    .target
                    .split_once('?')
                    .map_or(r.target.as_str(), |(p, _)| p);
                path.to_owned()
            }),
            api,
            model,
            version,
            status: resp.status,
            latency_us: ex.latency_us(),
            total_us: ex.total_us(),
            request_bytes: req.map(|r| r.bytes),
            response_bytes: resp.bytes,
            request_id: resp.request_id.clone(),
            complete: resp.end_ns.is_some(),
        }
    }

    /// Status class 1–5 (`2` for 2xx); `None` outside 100–599.
    pub fn status_class(&self) -> Option<u8> {
        matches!(self.status, 100..=599).then(|| u8::try_from(self.status / 100).unwrap_or(0))
    }

    /// Whether this is a completed inference request: the latency CSV's rows. OPTIONS on an inference
    /// path is answered by the frontend without inference.
    pub fn is_completed_inference(&self) -> bool {
        self.api == Api::Inference
            && self.model.is_some()
            && self.complete
            && self.latency_us.is_some()
            && !self
                .method
                .as_deref()
                .is_some_and(|m| m.eq_ignore_ascii_case("OPTIONS"))
    }
}

/// RFC 3339 in UTC with microseconds, e.g. `2025-01-02T03:04:05.123456Z`.
pub fn rfc3339_micros(unix_ns: i128) -> String {
    const FORMAT: &[time::format_description::BorrowedFormatItem<'_>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(unix_ns)
        .ok()
        .and_then(|t| t.format(FORMAT).ok())
        // Only for times outside years -9999..=9999, which a clock cannot produce.
        .unwrap_or_else(|| "1970-01-01T00:00:00.000000Z".to_owned())
}

/// The three sinks, by the name they carry in metrics (`sink` label) and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SinkName {
    RequestLog,
    Syslog,
    LatencyCsv,
}

impl SinkName {
    pub fn as_str(self) -> &'static str {
        match self {
            SinkName::RequestLog => "request_log",
            SinkName::Syslog => "syslog",
            SinkName::LatencyCsv => "latency_csv",
        }
    }
}

/// Reader → sink thread.
#[derive(Debug)]
pub(crate) enum Msg {
    Record(Arc<Record>),
    /// Wakes an idle sink once a second: time-based rotation, SIGHUP reopen, flushing.
    Tick,
}

/// A sink's counters (`servescope_log_*_total{sink}`).
#[derive(Clone)]
pub(crate) struct SinkMetrics {
    pub written: IntCounter,
    pub dropped: IntCounter,
    pub errors: IntCounter,
}

impl SinkMetrics {
    pub(crate) fn new(registry: &Registry, name: SinkName) -> Self {
        let label = [name.as_str()];
        SinkMetrics {
            written: registry.log_written.with_label_values(&label),
            dropped: registry.log_dropped.with_label_values(&label),
            errors: registry.log_errors.with_label_values(&label),
        }
    }

    /// Adds what `now` has beyond `exported` and remembers it.
    pub(crate) fn export(&self, now: Tally, exported: &mut Tally) {
        self.written
            .inc_by(now.written.saturating_sub(exported.written));
        self.dropped
            .inc_by(now.dropped.saturating_sub(exported.dropped));
        self.errors
            .inc_by(now.errors.saturating_sub(exported.errors));
        *exported = now;
    }
}

/// Cumulative outcome of a sink's writes; the sink thread exports the growth to [`SinkMetrics`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Records written (lines, datagrams, frames).
    pub written: u64,
    /// Records that reached the sink but could not be written (disk full, server gone at shutdown).
    pub dropped: u64,
    /// Failed writes, opens, renames and connects.
    pub errors: u64,
}

/// One sink as the reader sees it.
struct Output {
    name: SinkName,
    tx: mpsc::Sender<Msg>,
    filter: Filter,
    /// Which records this sink takes at all (the CSV only completed inference requests).
    wants: fn(&Record) -> bool,
    dropped: IntCounter,
}

/// The reader's side of the sinks: filters, samples and enqueues; never blocks.
pub struct Sinks {
    outputs: Vec<Output>,
    clock: WallClock,
}

impl Sinks {
    /// No sink configured: [`Sinks::offer`] does nothing.
    pub fn none() -> Sinks {
        Sinks {
            outputs: Vec::new(),
            clock: WallClock::fixed(0),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.outputs.is_empty()
    }

    /// Hands the record of `ex` to every sink that wants it. A full queue drops it, counted.
    pub fn offer(&mut self, ex: &Exchange, hostname: &str) {
        let route = ex.request.as_ref().map(|r| routing::route(&r.target));
        self.offer_routed(ex, route.as_ref(), hostname);
    }

    /// [`Sinks::offer`] with the request's route already taken.
    pub fn offer_routed(&mut self, ex: &Exchange, route: Option<&Route>, hostname: &str) {
        if self.outputs.is_empty() {
            return;
        }
        let record = Arc::new(Record::from_routed(ex, route, hostname, &mut self.clock));
        for out in &mut self.outputs {
            if !(out.wants)(&record) || !out.filter.admit(&record) {
                continue;
            }
            if let Err(e) = out.tx.try_send(Msg::Record(Arc::clone(&record))) {
                out.dropped.inc();
                if matches!(e, mpsc::error::TrySendError::Closed(_)) {
                    tracing::debug!(sink = out.name.as_str(), "sink stopped; record dropped");
                }
            }
        }
    }
}

/// The sink threads; [`Workers::finish`] lets them write what is queued before the agent exits.
pub struct Workers {
    done: mpsc::Receiver<()>,
    names: Vec<&'static str>,
    reopen: Reopen,
}

impl Workers {
    /// Makes the file sinks reopen their paths (logrotate's rename, then SIGHUP). The agent's SIGHUP
    /// handler calls it when the request-log configuration did not change.
    pub fn reopen_files(&self) {
        self.reopen.request();
    }

    /// Waits (at most `timeout`) until every sink thread has written its queue and exited. The threads
    /// exit once the [`Sinks`] they serve is dropped (the reader stopped).
    pub async fn finish(mut self, timeout: Duration) {
        if self.names.is_empty() {
            return;
        }
        // recv() yields None once every thread has dropped its sender, i.e. exited.
        if tokio::time::timeout(timeout, self.done.recv())
            .await
            .is_err()
        {
            tracing::warn!(
                sinks = ?self.names,
                "request-log sinks did not finish writing within {timeout:?}; the rest is lost"
            );
        }
    }
}

/// Bumped on SIGHUP ([`Workers::reopen_files`]): file sinks reopen their path (logrotate's
/// rename-then-HUP).
#[derive(Clone, Debug, Default)]
pub(crate) struct Reopen(Arc<AtomicU64>);

impl Reopen {
    pub(crate) fn generation(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    pub(crate) fn request(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }
}

/// Opens the configured sinks and starts their threads. Must run inside the tokio runtime (it
/// starts the once-a-second tick). A path that cannot be opened, or a syslog
/// address that does not parse, is an error here; a syslog server that is not up yet is not.
pub fn start(cfg: &SinksConfig, registry: &Registry) -> anyhow::Result<(Sinks, Workers)> {
    let (done_tx, done) = mpsc::channel::<()>(1);
    let reopen = Reopen::default();
    let mut outputs = Vec::new();
    let mut names = Vec::new();
    let mut spawn = |name: SinkName,
                     queue: usize,
                     filter: Filter,
                     wants: fn(&Record) -> bool,
                     run: Box<dyn FnOnce(mpsc::Receiver<Msg>) + Send>|
     -> anyhow::Result<()> {
        let (tx, rx) = mpsc::channel(queue);
        let done_tx = done_tx.clone();
        std::thread::Builder::new()
            .name(format!("sink-{}", name.as_str()))
            .spawn(move || {
                run(rx);
                drop(done_tx);
            })
            .with_context(|| format!("starting the {} sink thread", name.as_str()))?;
        let metrics = SinkMetrics::new(registry, name);
        outputs.push(Output {
            name,
            tx,
            filter,
            wants,
            dropped: metrics.dropped,
        });
        names.push(name.as_str());
        Ok(())
    };

    if let Some(c) = &cfg.request_log {
        let out = RotatingFile::open(&c.path, c.rotation.clone(), None)
            .with_context(|| format!("opening the request log {}", c.path.display()))?;
        let (metrics, reopen) = (
            SinkMetrics::new(registry, SinkName::RequestLog),
            reopen.clone(),
        );
        tracing::info!(path = %c.path.display(), "writing the request log (JSON lines)");
        spawn(
            SinkName::RequestLog,
            c.queue,
            c.filter.clone(),
            |_| true,
            Box::new(move |rx| file::run(rx, out, file::json_line, &reopen, &metrics)),
        )?;
    }
    if let Some(c) = &cfg.latency_csv {
        let out = RotatingFile::open(&c.path, c.rotation.clone(), Some(csv::HEADER.as_bytes()))
            .with_context(|| format!("opening the latency CSV {}", c.path.display()))?;
        let (metrics, reopen) = (
            SinkMetrics::new(registry, SinkName::LatencyCsv),
            reopen.clone(),
        );
        tracing::info!(path = %c.path.display(), "writing the latency CSV");
        spawn(
            SinkName::LatencyCsv,
            c.queue,
            c.filter.clone(),
            Record::is_completed_inference,
            Box::new(move |rx| file::run(rx, out, csv::row, &reopen, &metrics)),
        )?;
    }
    if let Some(c) = &cfg.syslog {
        let (c2, metrics) = (c.clone(), SinkMetrics::new(registry, SinkName::Syslog));
        tracing::info!(address = %c.address, format = ?c.format, "sending request logs to syslog");
        spawn(
            SinkName::Syslog,
            c.queue,
            c.filter.clone(),
            |_| true,
            Box::new(move |rx| syslog::run(rx, &c2, &metrics)),
        )?;
    }

    if !outputs.is_empty() {
        let weak: Vec<_> = outputs.iter().map(|o| o.tx.downgrade()).collect();
        tokio::spawn(tick(weak));
    }
    Ok((
        Sinks {
            outputs,
            clock: WallClock::new(),
        },
        Workers {
            done,
            names,
            reopen,
        },
    ))
}

/// Once a second, wakes every sink (rotation, reopening, flushing). Holds only weak senders, so it
/// never keeps a sink alive; it ends when all sinks are gone.
async fn tick(sinks: Vec<mpsc::WeakSender<Msg>>) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let mut alive = false;
        for s in &sinks {
            if let Some(tx) = s.upgrade() {
                alive = true;
                // A full queue means the sink is busy and will look at the clock anyway.
                let _ = tx.try_send(Msg::Tick);
            }
        }
        if !alive {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{Request, Response};

    pub(crate) fn exchange(target: &str, status: u16) -> Exchange {
        Exchange {
            tgid: 4242,
            conn_id: 7,
            peer: Some(SocketAddr::from(([127, 0, 0, 1], 50_000))),
            request: Some(Request {
                method: "POST".into(),
                target: target.into(),
                first_byte_ns: 1_000_000,
                complete_ns: 1_500_000,
                bytes: 321,
            }),
            response: Response {
                status,
                reason: "OK".into(),
                request_id: Some("b7c1-42".into()),
                start_ns: 13_845_500,
                end_ns: Some(14_000_000),
                bytes: 1_234,
            },
        }
    }

    #[test]
    fn record_of_an_inference() {
        let mut clock = WallClock::fixed(1_700_000_000_000_000_000);
        let r = Record::from_exchange(
            &exchange("/predictions/echo/2.0?x=secret", 200),
            "vm",
            &mut clock,
        );
        assert_eq!(r.unix_ns, 1_700_000_000_014_000_000);
        assert_eq!(r.api, Api::Inference);
        assert_eq!(r.model.as_deref(), Some("echo"));
        assert_eq!(r.version.as_deref(), Some("2.0"));
        assert_eq!(r.path.as_deref(), Some("/predictions/echo/2.0"));
        assert_eq!(r.latency_us, Some(12_345.5));
        assert_eq!(r.total_us, Some(13_000.0));
        assert_eq!(r.pid, 4242);
        assert!(r.is_completed_inference());
        assert_eq!(r.status_class(), Some(2));
    }

    #[test]
    fn what_the_csv_takes() {
        let mut clock = WallClock::fixed(0);
        let mut rec = |ex: &Exchange| Record::from_exchange(ex, "h", &mut clock);
        assert!(!rec(&exchange("/ping", 200)).is_completed_inference());
        let mut options = exchange("/predictions/m", 200);
        if let Some(r) = options.request.as_mut() {
            r.method = "OPTIONS".into();
        }
        assert!(!rec(&options).is_completed_inference());
        let mut cut = exchange("/predictions/m", 200);
        cut.response.end_ns = None;
        assert!(!rec(&cut).is_completed_inference());
        let mut unpaired = exchange("/predictions/m", 200);
        unpaired.request = None;
        let r = rec(&unpaired);
        assert_eq!((r.api, r.method.as_deref()), (Api::Unknown, None));
        assert!(!r.is_completed_inference());
        assert!(rec(&exchange("/predictions/m", 503)).is_completed_inference());
    }

    #[test]
    fn timestamps_are_utc_micros() {
        assert_eq!(rfc3339_micros(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339_micros(1_700_000_000_123_456_789),
            "2023-11-14T22:13:20.123456Z"
        );
    }

    #[tokio::test]
    async fn full_queue_drops_and_counts() -> anyhow::Result<()> {
        let registry = Registry::new();
        let (tx, _rx) = mpsc::channel(2);
        let mut sinks = Sinks {
            outputs: vec![Output {
                name: SinkName::RequestLog,
                tx,
                filter: Filter::default(),
                wants: |_| true,
                dropped: registry.log_dropped.with_label_values(&["request_log"]),
            }],
            clock: WallClock::fixed(0),
        };
        for _ in 0..5 {
            sinks.offer(&exchange("/predictions/m", 200), "h");
        }
        assert_eq!(
            registry
                .log_dropped
                .with_label_values(&["request_log"])
                .get(),
            3
        );
        Ok(())
    }
}
