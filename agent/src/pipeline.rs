//! The running agent: the ring-buffer reader (events → http → registry) and the discovery loop that
//! keeps the kernel's target map in step with the processes on the host.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, watch},
};

use crate::{
    config::Config,
    discovery::{Hostnames, ProcFs, Selection, Target},
    events::{Event, FAMILY_UNIX},
    http::{ConnTable, ParseStats},
    probes::Probes,
    registry::WorkerUsage,
    registry::{Flavor, Registry},
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

/// Drains the ring buffer until `shutdown` flips, turning records into counted exchanges, each also
/// offered to the request-log `sinks`.
pub async fn read_events(
    ring: RingBuf<MapData>,
    registry: Registry,
    sinks: Sinks,
    worker_map: WorkerMap,
    mut updates: mpsc::UnboundedReceiver<Update>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // SAFETY: RingBuf owns its map fd for its whole life and always returns that same fd; the
    // AsyncFd owns the RingBuf, so the fd stays open until the AsyncFd is dropped.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("registering the ring buffer with the reactor: {e}"))?;
    let mut reader = Reader {
        table: ConnTable::new(),
        targets: HashMap::new(),
        exported: ParseStats::default(),
        registry,
        sinks,
        workers: WorkerTracker::new(worker_map),
    };
    // The kernel wakes this task only when much is waiting (probes::DRAIN_INTERVAL): drain on a timer too.
    let mut tick = tokio::time::interval(crate::probes::DRAIN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                    let host = reader.targets.get(&w.frontend).map(|t| t.hostname.clone()).unwrap_or_default();
                    reader.workers.added(w, &reader.registry, &host);
                }
                Update::WorkerRemoved(pid) => reader.workers.removed(pid),
            },
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                reader.drain(guard.get_inner_mut());
                guard.clear_ready();
            }
            _ = tick.tick() => reader.drain(ring.get_mut()),
        }
    }
}

/// The state of the ring-buffer reader.
struct Reader {
    table: ConnTable,
    targets: HashMap<u32, TargetInfo>,
    /// Parser counters already added to the registry.
    exported: ParseStats,
    registry: Registry,
    sinks: Sinks,
    workers: WorkerTracker,
}

impl Reader {
    /// The hostname a process is labelled with: its own target's, or a worker's frontend's.
    fn hostname(&self, pid: u32) -> String {
        let target = self.workers.frontend_of(pid).unwrap_or(pid);
        self.targets
            .get(&target)
            .map(|t| t.hostname.clone())
            .unwrap_or_default()
    }

    /// Handles every record waiting in the ring buffer.
    fn drain(&mut self, rb: &mut RingBuf<MapData>) {
        while let Some(item) = rb.next() {
            match Event::decode(&item) {
                Ok(ev) if self.workers.is_worker(ev.tgid) => {
                    let host = self.hostname(ev.tgid);
                    // Every request of a batch, also those beyond the frontend frame's copied head.
                    for (id, at) in self.workers.on_worker(&ev, &self.registry, &host) {
                        self.table.note_worker_dispatch(id, at);
                    }
                }
                Ok(ev) => {
                    if ev.family == FAMILY_UNIX && self.targets.contains_key(&ev.tgid) {
                        let host = self.hostname(ev.tgid);
                        self.workers.on_frontend(&ev, &self.registry, &host);
                    }
                    for ex in self.table.apply(&ev) {
                        match self.targets.get(&ex.tgid) {
                            Some(t) => {
                                let dispatched = ex
                                    .response
                                    .request_id
                                    .as_deref()
                                    .and_then(|id| self.table.take_dispatch(id));
                                self.registry.record_with_dispatch(
                                    &ex,
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
                                self.sinks.offer(&ex, &t.hostname);
                            }
                            // Records still in flight from a process just removed.
                            None => {
                                tracing::debug!(tgid = ex.tgid, "exchange of an untracked process")
                            }
                        }
                    }
                }
                Err(e) => {
                    self.registry.decode_errors.inc();
                    tracing::debug!(error = %e, "undecodable ring-buffer record");
                }
            }
        }
        let s = self.table.stats;
        let r = &self.registry;
        r.parse_errors
            .inc_by(s.parse_errors - self.exported.parse_errors);
        r.unmatched_responses
            .inc_by(s.unmatched_responses - self.exported.unmatched_responses);
        r.dropped_requests
            .inc_by(s.dropped_requests - self.exported.dropped_requests);
        self.exported = s;
    }
}

/// Every `cfg.discovery_interval`: finds targets, updates the kernel map and the reader, publishes the
/// target set to the samplers (`sampled`), exports the kernel's loss counters. Runs until `shutdown`
/// flips.
pub async fn discover(
    cfg: Config,
    mut probes: Probes,
    registry: Registry,
    worker_map: WorkerMap,
    updates: mpsc::UnboundedSender<Update>,
    sampled: watch::Sender<Vec<SampleTarget>>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let proc = ProcFs::default();
    let sel = Selection {
        torchserve: cfg.discover_torchserve,
        pids: cfg.pids.clone(),
        ports: cfg.ports.clone(),
    };
    let mut hostnames = Hostnames::default();
    let mut current: BTreeMap<u32, Target> = BTreeMap::new();
    let mut current_workers: BTreeMap<u32, WorkerProcess> = BTreeMap::new();
    let proc_root = ProcRoot::default();
    let mut lost_exported: HashMap<&'static str, u64> = HashMap::new();
    let mut tick = tokio::time::interval(cfg.discovery_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned_empty = false;
    loop {
        tokio::select! {
            _ = shutdown.changed() => return Ok(()),
            _ = tick.tick() => {}
        }
        let found = proc.scan(&sel);
        // Gone, or the PID now belongs to another process (restart reused it).
        let stale: Vec<u32> = current
            .iter()
            .filter(|(pid, t)| found.get(pid).is_none_or(|f| f.start_time != t.start_time))
            .map(|(pid, _)| *pid)
            .collect();
        for pid in stale {
            current.remove(&pid);
            if let Err(e) = probes.remove_target(pid) {
                tracing::warn!(
                    pid,
                    error = format!("{e:#}"),
                    "could not untrack a vanished target"
                );
            }
            let _ = updates.send(Update::Removed(pid));
            tracing::info!(pid, "target exited; no longer traced");
        }
        for (pid, t) in found {
            if current.contains_key(&pid) {
                continue;
            }
            let info = TargetInfo {
                hostname: hostnames.of(pid),
                flavor: t.flavor,
            };
            tracing::info!(pid, hostname = %info.hostname, kind = ?info.flavor, "tracing target");
            let _ = updates.send(Update::Added(pid, info));
            if let Err(e) = probes.add_target(pid) {
                tracing::warn!(pid, error = format!("{e:#}"), "could not trace target");
                let _ = updates.send(Update::Removed(pid));
                continue;
            }
            current.insert(pid, t);
        }
        sync_workers(
            &proc,
            &proc_root,
            &current,
            &mut current_workers,
            &mut probes,
            &updates,
            &worker_map,
            &mut hostnames,
            &registry,
        );
        if current.is_empty() && !warned_empty {
            tracing::info!(
                torchserve = sel.torchserve,
                pids = ?sel.pids,
                ports = ?sel.ports,
                "no target process found yet; still looking"
            );
        }
        warned_empty = current.is_empty();
        registry
            .targets
            .set(i64::try_from(current.len()).unwrap_or(i64::MAX));
        // The samplers label system/GPU families per target hostname and need the whole current set,
        // not a stream of changes: a watch holds the latest set and wakes them only when it changed.
        // `hostnames` caches by UTS namespace, so this costs a readlink per target.
        let now: Vec<SampleTarget> = current
            .keys()
            .map(|&pid| SampleTarget {
                pid,
                hostname: hostnames.of(pid),
            })
            .collect();
        sampled.send_if_modified(|prev| {
            let changed = *prev != now;
            if changed {
                *prev = now;
            }
            changed
        });
        for (reason, total) in probes.losses() {
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

/// Finds the workers of the traced TorchServe frontends, traces new ones (pipes included) and
/// untraces gone ones, then samples each worker's CPU time and resident memory.
#[expect(
    clippy::too_many_arguments,
    reason = "one step of the discovery loop, over the loop's own state"
)]
fn sync_workers(
    proc: &ProcFs,
    proc_root: &ProcRoot,
    frontends: &BTreeMap<u32, Target>,
    current: &mut BTreeMap<u32, WorkerProcess>,
    probes: &mut Probes,
    updates: &mpsc::UnboundedSender<Update>,
    worker_map: &WorkerMap,
    hostnames: &mut Hostnames,
    registry: &Registry,
) {
    let torchserve: BTreeSet<u32> = frontends
        .iter()
        .filter(|(_, t)| t.flavor == Flavor::TorchServe)
        .map(|(pid, _)| *pid)
        .collect();
    let found = workers::scan(proc, &torchserve);
    let stale: Vec<u32> = current
        .iter()
        .filter(|(pid, w)| found.get(pid).is_none_or(|f| f.start_time != w.start_time))
        .map(|(pid, _)| *pid)
        .collect();
    for pid in stale {
        current.remove(&pid);
        if let Err(e) = probes.remove_target(pid) {
            tracing::debug!(
                pid,
                error = format!("{e:#}"),
                "could not untrack a vanished worker"
            );
        }
        let _ = updates.send(Update::WorkerRemoved(pid));
        tracing::info!(pid, "worker exited");
    }
    for (pid, w) in found {
        if current.contains_key(&pid) {
            continue;
        }
        tracing::info!(
            pid,
            frontend = w.frontend,
            port = w.port,
            "tracing TorchServe worker"
        );
        let _ = updates.send(Update::WorkerAdded(w.clone()));
        if let Err(e) = probes.add_worker(pid) {
            tracing::warn!(pid, error = format!("{e:#}"), "could not trace worker");
            let _ = updates.send(Update::WorkerRemoved(pid));
            continue;
        }
        current.insert(pid, w);
    }
    let usage: Vec<WorkerUsage> = current
        .values()
        .filter_map(|w| {
            let id = worker_map.lookup(w.pid)?;
            let (cpu_seconds, rss_bytes) = proc_root.process_usage(w.pid).ok()?;
            Some(WorkerUsage {
                model_name: id.model_name,
                model_version: id.model_version,
                worker_name: id.worker_name,
                hostname: hostnames.of(w.frontend),
                cpu_seconds,
                rss_bytes,
            })
        })
        .collect();
    registry.set_worker_usage(&usage);
}
