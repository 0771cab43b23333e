//! The running agent: the ring-buffer reader (events → http → registry) and the discovery loop that
//! keeps the kernel's target map in step with the processes on the host.

use std::collections::{BTreeMap, HashMap};

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, watch},
};

use crate::{
    config::Config,
    discovery::{Hostnames, ProcFs, Selection, Target},
    events::Event,
    http::{ConnTable, ParseStats},
    probes::Probes,
    registry::{Flavor, Registry},
    sampler::SampleTarget,
    sink::Sinks,
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
}

/// Drains the ring buffer until `shutdown` flips, turning records into counted exchanges, each also
/// offered to the request-log `sinks` (replaced by each one `new_sinks` brings: SIGHUP).
pub async fn read_events(
    ring: RingBuf<MapData>,
    registry: Registry,
    sinks: Sinks,
    mut new_sinks: mpsc::UnboundedReceiver<Sinks>,
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
                }
            },
            // Dropping the old sinks lets their threads write what is queued and exit.
            Some(sinks) = new_sinks.recv() => reader.sinks = sinks,
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
}

impl Reader {
    /// Handles every record waiting in the ring buffer.
    fn drain(&mut self, rb: &mut RingBuf<MapData>) {
        while let Some(item) = rb.next() {
            match Event::decode(&item) {
                Ok(ev) => {
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
