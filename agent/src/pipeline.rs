//! The running agent: the ring-buffer reader (events → http → registry) and the discovery loop that
//! keeps the kernel's target map in step with the processes on the host.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, oneshot, watch},
};

use crate::{
    FastMap,
    config::Config,
    discovery::{Hostnames, ProcFs, Selection, Target},
    events::{Direction, Event, FAMILY_UNIX, Kind},
    http::{ConnTable, Exchange, ParseStats},
    probes::Probes,
    registry::WorkerUsage,
    registry::{Flavor, Registry, copied_index},
    routing,
    sampler::{SampleTarget, procfs::ProcRoot},
    sink::Sinks,
    workers::{self, WorkerMap, WorkerProcess, WorkerTracker},
};

/// How the reader labels and counts a traced process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetInfo {
    pub hostname: String,
    pub flavor: Flavor,
}

/// Discovery → reader: target set changes. Sent *before* the kernel map changes, so the reader knows
/// a process before its first record can arrive.
#[derive(Debug)]
pub enum Update {
    Added(u32, TargetInfo),
    Removed(u32),
    /// A TorchServe worker of a traced frontend (traced itself, pipes included).
    WorkerAdded(WorkerProcess),
    WorkerRemoved(u32),
}

/// How long a scrape waits for the reader to drain the ring before it renders what the registry
/// holds: the reader answers within microseconds unless it is busy with a large backlog, and a scrape
/// must not hang on it (Prometheus' default timeout is 10 s; dashboards poll every few seconds).
const FRESH_WAIT: std::time::Duration = std::time::Duration::from_millis(250);

/// Scrapes that may wait for one drain at once; more are answered with what is counted already.
const DRAIN_QUEUE: usize = 16;

/// A scrape's request to the reader: drain what the kernel holds now, answered once it is counted.
pub type DrainRequest = oneshot::Sender<()>;

/// The /metrics side of the scrape-triggered drain (docs/decisions.md R30): the reader drains on its
/// own only every [`crate::probes::DRAIN_INTERVAL`], so without this a scrape could miss the
/// requests of the last 100 ms, answered before the scrape was sent.
#[derive(Clone, Debug)]
pub struct DrainHandle(Option<mpsc::Sender<DrainRequest>>);

/// A connected pair: the handle for the metrics server, the receiver for [`ReaderLinks::drains`].
pub fn drain_requests() -> (DrainHandle, mpsc::Receiver<DrainRequest>) {
    let (tx, rx) = mpsc::channel(DRAIN_QUEUE);
    (DrainHandle(Some(tx)), rx)
}

impl DrainHandle {
    /// A handle with no reader behind it: [`DrainHandle::fresh`] returns at once (tests of the server).
    pub fn detached() -> Self {
        DrainHandle(None)
    }

    /// Asks the reader to drain the ring buffer and waits until it has, at most [`FRESH_WAIT`].
    /// Returns whether it did: false when the reader is busy past that, stopped, or too many scrapes
    /// are already waiting (each then renders what is counted).
    pub async fn fresh(&self) -> bool {
        let Some(tx) = &self.0 else {
            return false;
        };
        let (done, answered) = oneshot::channel();
        if tx.try_send(done).is_err() {
            return false;
        }
        matches!(tokio::time::timeout(FRESH_WAIT, answered).await, Ok(Ok(())))
    }
}

/// What flows into and out of the reader besides the ring buffer.
pub struct ReaderLinks {
    /// Scrapes asking for a drain before they render (R30).
    pub drains: mpsc::Receiver<DrainRequest>,
    /// Discovery's target changes.
    pub updates: mpsc::UnboundedReceiver<Update>,
    /// Request-log sinks replacing the running ones (SIGHUP).
    pub new_sinks: mpsc::UnboundedReceiver<Sinks>,
    /// The kernel's process events, for discovery.
    pub proc_events: ProcEventSender,
    /// PID → TorchServe worker identity, kept here and read by discovery's per-worker sampling.
    pub worker_map: WorkerMap,
}

/// Drains the ring buffer until `shutdown` flips, turning records into counted exchanges, each also
/// offered to the request-log `sinks` (replaced by each one `links.new_sinks` brings: SIGHUP).
pub async fn read_events(
    ring: RingBuf<MapData>,
    registry: Registry,
    sinks: Sinks,
    links: ReaderLinks,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let ReaderLinks {
        mut drains,
        mut updates,
        mut new_sinks,
        proc_events,
        worker_map,
    } = links;
    // SAFETY: RingBuf owns its map fd for its whole life and always returns that same fd; the
    // AsyncFd owns the RingBuf, so the fd stays open until the AsyncFd is dropped.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("registering the ring buffer with the reactor: {e}"))?;
    let mut reader = Reader {
        table: ConnTable::new(),
        targets: FastMap::default(),
        exported: ParseStats::default(),
        exported_evicted: 0,
        registry,
        sinks,
        proc_events,
        workers: WorkerTracker::new(worker_map),
        exchanges: Vec::new(),
    };
    // The kernel wakes this task only when much is waiting (probes::DRAIN_INTERVAL): drain on a timer
    // too, backing off while nothing comes so an idle agent does not wake 100 times a second.
    let mut pause = DrainPause::default();
    let tick = tokio::time::sleep(pause.current());
    tokio::pin!(tick);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => return Ok(()),
            // Before any record: discovery announces a process before the kernel may trace it.
            Some(update) = updates.recv() => match update {
                Update::Added(pid, info) => {
                    reader.targets.insert(pid, info);
                }
                Update::Removed(pid) => {
                    reader.targets.remove(&pid);
                    reader.table.forget_process(pid);
                    reader.workers.frontend_removed(pid);
                }
                Update::WorkerAdded(w) => {
                    let host = reader
                        .targets
                        .get(&w.frontend)
                        .map(|t| t.hostname.clone())
                        .unwrap_or_default();
                    reader.workers.added(w, &reader.registry, &host);
                }
                Update::WorkerRemoved(pid) => reader.workers.removed(pid),
            },
            // Dropping the old sinks lets their threads write what is queued and exit.
            Some(sinks) = new_sinks.recv() => reader.sinks = sinks,
            // A scrape: what the kernel holds now is counted before it renders.
            Some(done) = drains.recv() => {
                if reader.drain(ring.get_mut()) > 0 {
                    pause.saw_records(true);
                }
                // The scrape may have given up waiting (FRESH_WAIT): nothing to tell it then.
                let _ = done.send(());
            }
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                reader.drain(guard.get_inner_mut());
                guard.clear_ready();
                pause.saw_records(true);
            }
            () = &mut tick => {
                let n = reader.drain(ring.get_mut());
                pause.saw_records(n > 0);
                tick.as_mut().reset(tokio::time::Instant::now() + pause.current());
            }
        }
    }
}

/// Time between timer drains: [`crate::probes::DRAIN_INTERVAL`] while records come, doubling up to
/// [`DrainPause::IDLE_MAX`] while none do. Scrapes drain first ([`DrainHandle`]), so this bounds only
/// how late sinks and the in-flight gauge see records; timestamps are the kernel's, so no value
/// depends on when a record is read.
#[derive(Debug)]
struct DrainPause(std::time::Duration);

impl DrainPause {
    const IDLE_MAX: std::time::Duration = std::time::Duration::from_millis(400);

    fn current(&self) -> std::time::Duration {
        self.0
    }

    fn saw_records(&mut self, any: bool) {
        self.0 = if any {
            crate::probes::DRAIN_INTERVAL
        } else {
            (self.0 * 2).min(Self::IDLE_MAX)
        };
    }
}

impl Default for DrainPause {
    fn default() -> Self {
        DrainPause(crate::probes::DRAIN_INTERVAL)
    }
}

/// The state of the ring-buffer reader.
struct Reader {
    table: ConnTable,
    targets: FastMap<u32, TargetInfo>,
    /// Parser counters already added to the registry.
    exported: ParseStats,
    /// `table.evicted` already added to the registry.
    exported_evicted: u64,
    registry: Registry,
    sinks: Sinks,
    proc_events: ProcEventSender,
    workers: WorkerTracker,
    /// The exchanges one record completed; kept between records so that handing them over does not
    /// allocate for each response.
    exchanges: Vec<Exchange>,
}

impl Reader {
    /// The hostname a process is labelled with: its own target's, or a worker's frontend's. A free
    /// function over the two fields, so that the caller can lend `workers` mutably next to it (this
    /// runs for every record of a worker; it used to clone the string each time).
    fn hostname<'a>(
        targets: &'a FastMap<u32, TargetInfo>,
        workers: &WorkerTracker,
        pid: u32,
    ) -> &'a str {
        let target = workers.frontend_of(pid).unwrap_or(pid);
        targets.get(&target).map_or("", |t| t.hostname.as_str())
    }

    /// Handles every record waiting in the ring buffer; returns how many there were.
    fn drain(&mut self, rb: &mut RingBuf<MapData>) -> usize {
        let mut n = 0;
        // Head bytes the kernel copied (registry::copied_index): added once per drain.
        let mut copied = [0u64; 6];
        while let Some(item) = rb.next() {
            n += 1;
            let decoded = Event::decode(&item);
            if let Ok(ev) = &decoded
                && ev.kind == Kind::Data
            {
                copied[copied_index(ev.dir == Direction::Egress, ev.family)] +=
                    ev.head.len() as u64;
            }
            match decoded {
                Ok(ev) if ev.kind.is_process_event() => self.proc_events.send(match ev.kind {
                    Kind::Exec => ProcEvent::Exec(ev.tgid),
                    Kind::Exit => ProcEvent::Exit(ev.tgid),
                    _ => ProcEvent::Listen(ev.tgid, u16::try_from(ev.len).unwrap_or(0)),
                }),
                Ok(ev) if self.workers.is_worker(ev.tgid) => {
                    let host = Self::hostname(&self.targets, &self.workers, ev.tgid);
                    self.workers.on_worker(&ev, &self.registry, host);
                }
                Ok(ev) => {
                    if ev.family == FAMILY_UNIX && self.targets.contains_key(&ev.tgid) {
                        let host = Self::hostname(&self.targets, &self.workers, ev.tgid);
                        self.workers.on_frontend(&ev, &self.registry, host);
                    }
                    let mut exchanges = std::mem::take(&mut self.exchanges);
                    self.table.apply(&ev, &mut exchanges);
                    for ex in exchanges.drain(..) {
                        match self.targets.get(&ex.tgid) {
                            Some(t) => {
                                let dispatched = ex
                                    .response
                                    .request_id
                                    .as_deref()
                                    .and_then(|id| self.table.take_dispatch(id));
                                // Routed once for the registry and the sinks.
                                let route = ex.request.as_ref().map(|r| routing::route(&r.target));
                                self.registry.record_routed(
                                    &ex,
                                    route.as_ref(),
                                    &t.hostname,
                                    t.flavor,
                                    dispatched,
                                );
                                if let Some(id) = ex.response.request_id.as_deref() {
                                    self.workers.on_response(
                                        id,
                                        ex.response.start_ns,
                                        &self.registry,
                                        &t.hostname,
                                    );
                                }
                                // Never waits: a full sink queue drops the record, counted.
                                self.sinks.offer_routed(&ex, route.as_ref(), &t.hostname);
                            }
                            // Records still in flight from a process just removed.
                            None => {
                                tracing::debug!(tgid = ex.tgid, "exchange of an untracked process")
                            }
                        }
                    }
                    self.exchanges = exchanges;
                }
                Err(e) => {
                    self.registry.decode_errors.inc();
                    tracing::debug!(error = %e, "undecodable ring-buffer record");
                }
            }
        }
        let s = self.table.stats;
        let r = &self.registry;
        for (counter, n) in r.copied_bytes.iter().zip(copied) {
            counter.inc_by(n);
        }
        r.parse_errors
            .inc_by(s.parse_errors - self.exported.parse_errors);
        r.unmatched_responses
            .inc_by(s.unmatched_responses - self.exported.unmatched_responses);
        r.dropped_requests
            .inc_by(s.dropped_requests - self.exported.dropped_requests);
        r.framing_mismatches
            .inc_by(s.framing_mismatches - self.exported.framing_mismatches);
        // As of this batch: a sum over the connections, cheap next to the batch's own parsing.
        r.in_flight
            .set(i64::try_from(self.table.in_flight()).unwrap_or(i64::MAX));
        self.exported = s;
        r.evicted_connections
            .inc_by(self.table.evicted - self.exported_evicted);
        self.exported_evicted = self.table.evicted;
        n
    }
}

/// Discovery: keeps the kernel's target map, the reader and the samplers in step with the processes on
/// the host. New targets come from the kernel's process events (exec, listen; [`ProcEvent`]) as they
/// happen; a full /proc scan runs at start and every `cfg.discovery_interval` as the safety net (and at
/// once after the event queue overflowed). Once a second it exports the kernel's loss counters and
/// confirms the exits the kernel reported. Runs until `shutdown` flips.
pub async fn discover(
    cfg: Config,
    probes: Probes,
    registry: Registry,
    links: DiscoveryLinks,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let DiscoveryLinks {
        updates,
        sampled,
        mut events,
        worker_map,
    } = links;
    let mut d = Discovery {
        proc: ProcFs::default(),
        sel: Selection {
            torchserve: cfg.discover_torchserve,
            pids: cfg.pids.clone(),
            ports: cfg.ports.clone(),
        },
        hostnames: Hostnames::default(),
        current: BTreeMap::new(),
        exited: Vec::new(),
        workers: BTreeMap::new(),
        workers_dirty: false,
        proc_root: ProcRoot::default(),
        worker_map,
        registry: registry.clone(),
        probes,
        updates,
        warned_empty: false,
        own_pid: std::process::id(),
        warned_self: false,
    };
    let mut lost_exported: HashMap<&'static str, u64> = HashMap::new();
    let mut rescan = tokio::time::interval(cfg.discovery_interval);
    rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut housekeeping = tokio::time::interval(HOUSEKEEPING_INTERVAL);
    housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return Ok(()),
            _ = rescan.tick() => d.rescan(),
            Some(ev) = events.rx.recv() => d.on_event(ev),
            _ = housekeeping.tick() => {
                if events.overflowed.swap(false, Ordering::Relaxed) {
                    tracing::warn!("process events were dropped (queue full): rescanning /proc");
                    d.rescan();
                }
                d.confirm_exits();
                d.probes.retry_worker_pipes();
                d.sample_workers();
                d.sample_self(&registry);
                for (reason, total) in d.probes.losses() {
                    let prev = lost_exported.insert(reason, total).unwrap_or(0);
                    if total > prev {
                        registry
                            .kernel_lost
                            .with_label_values(&[reason])
                            .inc_by(total - prev);
                        tracing::warn!(reason, lost = total - prev, "kernel dropped records");
                    }
                }
            }
        }
        if std::mem::take(&mut d.workers_dirty) {
            d.sync_workers();
        }
        d.publish(&registry, &sampled);
    }
}

/// What flows into and out of discovery.
pub struct DiscoveryLinks {
    /// Target changes, to the reader (sent before the kernel map changes).
    pub updates: mpsc::UnboundedSender<Update>,
    /// The current targets, to the samplers.
    pub sampled: watch::Sender<Vec<SampleTarget>>,
    /// The kernel's process events, from the reader.
    pub events: ProcEvents,
    pub worker_map: WorkerMap,
}

/// How often exits are confirmed and the kernel's loss counters exported.
const HOUSEKEEPING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// Process events waiting for discovery; beyond this they are dropped and /proc is rescanned instead.
const PROC_EVENTS_QUEUE: usize = 4096;

/// What the kernel saw a process do, for discovery (events.h SS_EV_EXEC/EXIT/LISTEN).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcEvent {
    Exec(u32),
    Exit(u32),
    Listen(u32, u16),
}

/// The reader's end of the process-event queue.
#[derive(Clone, Debug)]
pub struct ProcEventSender {
    tx: mpsc::Sender<ProcEvent>,
    overflowed: Arc<AtomicBool>,
}

impl ProcEventSender {
    /// Never waits: when discovery is behind, the event is dropped and discovery rescans /proc.
    fn send(&self, ev: ProcEvent) {
        if self.tx.try_send(ev).is_err() {
            self.overflowed.store(true, Ordering::Relaxed);
        }
    }
}

/// Discovery's end of the process-event queue.
#[derive(Debug)]
pub struct ProcEvents {
    rx: mpsc::Receiver<ProcEvent>,
    overflowed: Arc<AtomicBool>,
}

/// The queue of process events from the ring-buffer reader to discovery.
pub fn proc_events() -> (ProcEventSender, ProcEvents) {
    let (tx, rx) = mpsc::channel(PROC_EVENTS_QUEUE);
    let overflowed = Arc::new(AtomicBool::new(false));
    (
        ProcEventSender {
            tx,
            overflowed: overflowed.clone(),
        },
        ProcEvents { rx, overflowed },
    )
}

/// Discovery's state: what is traced and how to change it.
struct Discovery {
    proc: ProcFs,
    sel: Selection,
    hostnames: Hostnames,
    current: BTreeMap<u32, Target>,
    /// Targets whose main thread the kernel saw exit: confirmed against /proc at the next housekeeping.
    exited: Vec<u32>,
    /// TorchServe workers of the traced frontends (traced themselves, pipes included).
    workers: BTreeMap<u32, WorkerProcess>,
    /// Something that can change the worker set happened (a frontend tracked or gone, an exec by a
    /// frontend's child, a worker's exit, a rescan): look for workers again.
    workers_dirty: bool,
    proc_root: ProcRoot,
    worker_map: WorkerMap,
    registry: Registry,
    probes: Probes,
    updates: mpsc::UnboundedSender<Update>,
    warned_empty: bool,
    /// The agent's own PID, never traced: its metrics listener can sit on a selected port (`--port`
    /// naming it, or another address family's server sharing the number), and tracing it would count
    /// every scrape as a request.
    own_pid: u32,
    warned_self: bool,
}

impl Discovery {
    /// Full /proc scan: adds what `sel` asks for, removes what is gone or was replaced by a new process.
    fn rescan(&mut self) {
        let found = self.proc.scan(&self.sel);
        // Gone, or the PID now belongs to another process (restart reused it).
        let stale: Vec<u32> = self
            .current
            .iter()
            .filter(|(pid, t)| found.get(pid).is_none_or(|f| f.start_time != t.start_time))
            .map(|(pid, _)| *pid)
            .collect();
        for pid in stale {
            self.untrack(pid);
        }
        for (pid, t) in found {
            if !self.current.contains_key(&pid) {
                self.track(t);
            }
        }
        self.workers_dirty = true;
    }

    fn on_event(&mut self, ev: ProcEvent) {
        match ev {
            ProcEvent::Exec(pid) => {
                if self.sel.torchserve
                    && !self.current.contains_key(&pid)
                    && self.proc.is_torchserve(pid)
                {
                    self.track_pid(pid, Flavor::TorchServe);
                } else if self
                    .proc
                    .ppid(pid)
                    .is_some_and(|p| self.current.contains_key(&p))
                {
                    // A traced frontend started a program: a worker, most likely.
                    self.workers_dirty = true;
                }
            }
            ProcEvent::Listen(pid, port) => {
                if self.sel.ports.contains(&port) && !self.current.contains_key(&pid) {
                    let flavor = if self.proc.is_torchserve(pid) {
                        Flavor::TorchServe
                    } else {
                        Flavor::Generic
                    };
                    self.track_pid(pid, flavor);
                }
            }
            ProcEvent::Exit(pid) => {
                if self.current.contains_key(&pid) {
                    self.exited.push(pid);
                }
                if self.workers.contains_key(&pid) {
                    self.workers_dirty = true;
                }
            }
        }
    }

    /// Untracks the reported exits that /proc confirms: the process is gone or is another one now. (A
    /// main thread can end while the others run on; such a process stays traced.)
    fn confirm_exits(&mut self) {
        for pid in std::mem::take(&mut self.exited) {
            let Some(t) = self.current.get(&pid) else {
                continue;
            };
            let alive = self.proc.start_time(pid) == Some(t.start_time)
                && self.proc.state(pid).is_some_and(|s| s != 'Z' && s != 'X');
            if !alive {
                self.untrack(pid);
            }
        }
    }

    fn track_pid(&mut self, pid: u32, flavor: Flavor) {
        if let Some(start_time) = self.proc.start_time(pid) {
            self.track(Target {
                pid,
                start_time,
                flavor,
            });
        }
    }

    fn track(&mut self, t: Target) {
        let pid = t.pid;
        if pid == self.own_pid {
            if !std::mem::replace(&mut self.warned_self, true) {
                tracing::warn!(
                    pid,
                    "a --pid or --port selects the agent itself; not tracing it (its own scrapes \
                     would count as requests)"
                );
            }
            return;
        }
        let info = TargetInfo {
            hostname: self.hostnames.of(pid),
            flavor: t.flavor,
        };
        tracing::info!(pid, hostname = %info.hostname, kind = ?info.flavor, "tracing target");
        let _ = self.updates.send(Update::Added(pid, info));
        if let Err(e) = self.probes.add_target(pid) {
            tracing::warn!(pid, error = format!("{e:#}"), "could not trace target");
            let _ = self.updates.send(Update::Removed(pid));
            return;
        }
        self.current.insert(pid, t);
        self.workers_dirty = true;
    }

    fn untrack(&mut self, pid: u32) {
        self.current.remove(&pid);
        self.workers_dirty = true;
        if let Err(e) = self.probes.remove_target(pid) {
            tracing::warn!(
                pid,
                error = format!("{e:#}"),
                "could not untrack a vanished target"
            );
        }
        let _ = self.updates.send(Update::Removed(pid));
        tracing::info!(pid, "target exited; no longer traced");
    }

    /// Finds the workers of the traced TorchServe frontends, traces new ones (pipes included) and
    /// untraces gone ones. One /proc pass, run only when something could have changed the set.
    fn sync_workers(&mut self) {
        let torchserve: BTreeSet<u32> = self
            .current
            .iter()
            .filter(|(_, t)| t.flavor == Flavor::TorchServe)
            .map(|(pid, _)| *pid)
            .collect();
        let found = workers::scan(&self.proc, &torchserve);
        let stale: Vec<u32> = self
            .workers
            .iter()
            .filter(|(pid, w)| found.get(pid).is_none_or(|f| f.start_time != w.start_time))
            .map(|(pid, _)| *pid)
            .collect();
        for pid in stale {
            self.workers.remove(&pid);
            if let Err(e) = self.probes.remove_target(pid) {
                tracing::debug!(
                    pid,
                    error = format!("{e:#}"),
                    "could not untrack a vanished worker"
                );
            }
            let _ = self.updates.send(Update::WorkerRemoved(pid));
            tracing::info!(pid, "worker exited");
        }
        for (pid, w) in found {
            if self.workers.contains_key(&pid) {
                continue;
            }
            tracing::info!(
                pid,
                frontend = w.frontend,
                port = w.port,
                "tracing TorchServe worker"
            );
            let _ = self.updates.send(Update::WorkerAdded(w.clone()));
            if let Err(e) = self.probes.add_worker(pid) {
                tracing::warn!(pid, error = format!("{e:#}"), "could not trace worker");
                let _ = self.updates.send(Update::WorkerRemoved(pid));
                continue;
            }
            self.workers.insert(pid, w);
        }
        self.sample_workers();
    }

    /// Each known worker's CPU time and resident memory, by model (servescope_worker_*).
    fn sample_workers(&mut self) {
        let usage: Vec<WorkerUsage> = self
            .workers
            .values()
            .filter_map(|w| {
                let id = self.worker_map.lookup(w.pid)?;
                let (cpu_seconds, rss_bytes) = self.proc_root.process_usage(w.pid).ok()?;
                Some(WorkerUsage {
                    model_name: id.model_name,
                    model_version: id.model_version,
                    worker_name: id.worker_name,
                    hostname: self.hostnames.of(w.frontend),
                    cpu_seconds,
                    rss_bytes,
                })
            })
            .collect();
        self.registry.set_worker_usage(&usage);
    }

    /// The agent's own CPU, memory and kernel program statistics (`servescope_agent_*`,
    /// `servescope_bpf_program_*`): what it costs the node, on the node's own dashboards.
    fn sample_self(&mut self, registry: &Registry) {
        match self.proc_root.process_usage(self.own_pid) {
            Ok((cpu_seconds, rss_bytes)) => {
                registry.set_agent_usage(cpu_seconds, rss_bytes, &self.probes.run_stats());
            }
            // Only a broken /proc gets here, and the worker families say so too.
            Err(e) => tracing::debug!("sampling the agent's own usage: {e:#}"),
        }
    }

    /// The target count, and the target set for the samplers when it changed.
    fn publish(&mut self, registry: &Registry, sampled: &watch::Sender<Vec<SampleTarget>>) {
        if self.current.is_empty() && !self.warned_empty {
            tracing::info!(
                torchserve = self.sel.torchserve,
                pids = ?self.sel.pids,
                ports = ?self.sel.ports,
                "no target process found yet; still looking"
            );
        }
        self.warned_empty = self.current.is_empty();
        registry
            .targets
            .set(i64::try_from(self.current.len()).unwrap_or(i64::MAX));
        // The samplers label system/GPU families per target hostname and need the whole current set,
        // not a stream of changes: a watch holds the latest set and wakes them only when it changed.
        // `hostnames` caches by UTS namespace, so this costs a readlink per target.
        let now: Vec<SampleTarget> = self
            .current
            .keys()
            .map(|&pid| SampleTarget {
                pid,
                hostname: self.hostnames.of(pid),
            })
            .collect();
        sampled.send_if_modified(|prev| {
            let changed = *prev != now;
            if changed {
                *prev = now;
            }
            changed
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_scrape_waits_for_the_reader_and_not_longer_than_fresh_wait() {
        assert!(!DrainHandle::detached().fresh().await);

        let (handle, mut drains) = drain_requests();
        let reader = tokio::spawn(async move {
            // Answers the first request, then holds the second without answering.
            let first = drains.recv().await.expect("a request");
            first.send(()).expect("the scrape waits");
            let _held = drains.recv().await.expect("a second request");
            std::future::pending::<()>().await;
        });
        assert!(handle.fresh().await, "answered drain");
        let started = tokio::time::Instant::now();
        assert!(!handle.fresh().await, "unanswered drain");
        let waited = started.elapsed();
        assert!(
            waited >= FRESH_WAIT && waited < FRESH_WAIT * 4,
            "waited {waited:?}"
        );
        reader.abort();
    }

    #[tokio::test]
    async fn a_stopped_reader_or_a_full_queue_does_not_hold_the_scrape() {
        let (handle, drains) = drain_requests();
        drop(drains);
        assert!(!handle.fresh().await);

        let (handle, _drains) = drain_requests();
        let waiting: Vec<_> = (0..DRAIN_QUEUE)
            .map(|_| {
                let h = handle.clone();
                tokio::spawn(async move { h.fresh().await })
            })
            .collect();
        tokio::task::yield_now().await;
        let started = tokio::time::Instant::now();
        // The queue is full of scrapes the (absent) reader never answers: this one renders at once.
        while tokio::time::Instant::now() < started + FRESH_WAIT / 2 {
            if handle.0.as_ref().is_some_and(|tx| tx.capacity() == 0) {
                break;
            }
            tokio::task::yield_now().await;
        }
        let t = tokio::time::Instant::now();
        assert!(!handle.fresh().await);
        assert!(t.elapsed() < FRESH_WAIT / 2, "{:?}", t.elapsed());
        for w in waiting {
            assert!(!w.await.expect("scrape task"));
        }
    }
}
