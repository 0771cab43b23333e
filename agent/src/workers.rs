//! TorchServe's Python workers: which process serves which model, and what their own traffic says.
//!
//! A worker is a child of a traced frontend running `ts/model_service_worker.py --sock-name
//! /tmp/.ts.sock.<port>` (or `--port <port>`) with the unpacked archive (`/tmp/models/<hex>`) as its
//! working directory (TorchServe's `WorkerLifeCycle`). Its identity comes from, best first:
//! - the load frame the frontend wrote on the connection to `/tmp/.ts.sock.<port>` (the kernel names
//!   the connection's peer path in its open record): the registered model name, batch size, handler,
//!   GPU; the version from the archive's `MAR-INF/MANIFEST.json` (not in the frame);
//! - else (the agent started after the worker loaded) the manifest in the worker's working directory.
//!
//! TorchServe names the worker `W-<port>-<model>_<version>`. A restarted worker is a new process on a
//! new port (TorchServe never reuses one), so it is a new worker here too; scaling down ends the
//! process, which discovery notices.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    fs,
    path::Path,
    sync::{Arc, PoisonError, RwLock},
};

use serde::Deserialize;

use crate::{
    FastMap, FastSet,
    discovery::ProcFs,
    events::{BatchStatus, Direction, Event, FAMILY_PIPE, FAMILY_UNIX, Kind},
    metric_lines::{self, LineSplitter},
    otf::{self, LoadFrame},
    recent_ids::RecentIds,
    registry::Registry,
};

/// What marks a TorchServe worker's command line.
const WORKER_SCRIPT: &str = "ts/model_service_worker.py";
/// Most load frames remembered (one per live worker; a bound against a flood of junk frames).
const MAX_LOADS: usize = 4096;
/// Most batch replies remembered until their first HTTP response is written.
const MAX_REPLIED: usize = 65_536;
/// Most worker-side connections (sockets and pipes) decoded at once; a worker whose handler opens
/// pipes without end cannot grow the agent past it (the kernel's connection map is bounded too).
const MAX_WORKER_CONNS: usize = 65_536;
/// Worker metric lines servescope serves, with TorchServe's meaning (FACTS.md §3).
const MODEL_METRICS: [&str; 2] = ["HandlerTime", "PredictionTime"];

/// A worker process found in /proc.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerProcess {
    pub pid: u32,
    /// Clock ticks since boot (/proc/PID/stat field 22).
    pub start_time: u64,
    /// The frontend that started it.
    pub frontend: u32,
    /// Its socket's port: `/tmp/.ts.sock.<port>`.
    pub port: u16,
    /// From `MAR-INF/MANIFEST.json` in its working directory, when readable.
    pub manifest: Option<Manifest>,
}

/// The parts of a model archive's manifest servescope uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub model_name: String,
    pub model_version: String,
}

#[derive(Deserialize)]
struct RawManifest {
    model: RawManifestModel,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifestModel {
    model_name: String,
    #[serde(default)]
    model_version: Option<String>,
}

/// Parses `MAR-INF/MANIFEST.json`. TorchServe's default version when the archive has none is "1.0"
/// (`ModelArchive`'s manifest default), which is what its worker names then carry.
pub fn parse_manifest(text: &str) -> Option<Manifest> {
    let m: RawManifest = serde_json::from_str(text).ok()?;
    (!m.model.model_name.is_empty()).then(|| Manifest {
        model_name: m.model.model_name,
        model_version: m
            .model
            .model_version
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "1.0".to_owned()),
    })
}

fn read_manifest(path: &Path) -> Option<Manifest> {
    // A manifest is small; a huge file is not one (and must not be read whole).
    let meta = fs::metadata(path).ok()?;
    if meta.len() > 1 << 20 {
        return None;
    }
    parse_manifest(&fs::read_to_string(path).ok()?)
}

/// The port of a worker command line: `--sock-name …/.ts.sock.<port>` or `--port <port>`.
pub fn worker_port(args: &[String]) -> Option<u16> {
    if !args.iter().any(|a| a.ends_with(WORKER_SCRIPT)) {
        return None;
    }
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
    };
    if let Some(sock) = value("--sock-name") {
        return socket_port(sock);
    }
    value("--port")?.parse().ok()
}

/// The port in a worker socket path (`/tmp/.ts.sock.9000` → 9000).
pub fn socket_port(path: &str) -> Option<u16> {
    path.rsplit_once(".ts.sock.")?.1.parse().ok()
}

/// Worker processes of the `frontends`, keyed by PID.
pub fn scan(proc: &ProcFs, frontends: &BTreeSet<u32>) -> BTreeMap<u32, WorkerProcess> {
    let mut found = BTreeMap::new();
    if frontends.is_empty() {
        return found;
    }
    for pid in proc.pids() {
        let Some(frontend) = proc.ppid(pid).filter(|p| frontends.contains(p)) else {
            continue;
        };
        let Some(port) = proc.cmdline(pid).as_deref().and_then(worker_port) else {
            continue;
        };
        let Some(start_time) = proc.start_time(pid) else {
            continue;
        };
        found.insert(
            pid,
            WorkerProcess {
                pid,
                start_time,
                frontend,
                port,
                manifest: read_manifest(&proc.file(pid, "cwd/MAR-INF/MANIFEST.json")),
            },
        );
    }
    found
}

/// Who a worker process is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerIdentity {
    pub model_name: String,
    pub model_version: String,
    /// TorchServe's `W-<port>-<model>_<version>`.
    pub worker_name: String,
    pub frontend: u32,
    pub port: u16,
    /// From the load frame, when it was seen.
    pub batch_size: Option<i32>,
    pub gpu_id: Option<i32>,
    pub handler: Option<String>,
}

/// PID → worker identity, shared by the ring-buffer reader (which keeps it) and anyone who labels
/// per-process data by model (procfs usage here; NVML per-process GPU memory can join on it).
#[derive(Clone, Debug, Default)]
pub struct WorkerMap(Arc<RwLock<FastMap<u32, WorkerIdentity>>>);

impl WorkerMap {
    pub fn lookup(&self, pid: u32) -> Option<WorkerIdentity> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&pid)
            .cloned()
    }

    /// Every known worker, by PID.
    pub fn snapshot(&self) -> BTreeMap<u32, WorkerIdentity> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect()
    }

    pub(crate) fn set(&self, pid: u32, id: Option<WorkerIdentity>) {
        let mut m = self.0.write().unwrap_or_else(PoisonError::into_inner);
        match id {
            Some(id) => m.insert(pid, id),
            None => m.remove(&pid),
        };
    }
}

/// A load frame seen on the frontend's side, for the worker on `port`.
#[derive(Debug)]
struct Load {
    frame: LoadFrame,
    version: Option<String>,
    /// Kernel time the frontend read the worker's successful load reply.
    loaded_ns: Option<u64>,
    /// WorkerLoadTime was set for this load.
    reported: bool,
}

/// Per-pipe decoding state of the worker side (the kernel sends a worker's pipe writes only).
#[derive(Debug, Default)]
struct WorkerConn {
    tgid: u32,
    lines: LineSplitter,
}

/// The reader's view of the workers: feeds on the frontend's worker connections (its frames and the
/// kernel's walk of them) and on the workers' pipes, and keeps [`WorkerMap`].
#[derive(Debug, Default)]
pub struct WorkerTracker {
    map: WorkerMap,
    procs: FastMap<u32, WorkerProcess>,
    /// Frontend connection id → (frontend, worker port), from the open record's peer path.
    conn_port: FastMap<u64, (u32, u16)>,
    /// Frontend connections that sent a load frame and wait for its reply.
    awaiting_load: FastSet<u64>,
    loads: FastMap<(u32, u16), Load>,
    /// Frontend connection → first request id of the inference frame it wrote, until the reply.
    cycle: FastMap<u64, (String, u64)>,
    /// Request id → kernel time the frontend read its batch's reply, until the request's HTTP
    /// response is seen; at most [`MAX_REPLIED`].
    replied: RecentIds<u64, MAX_REPLIED>,
    /// Worker pipes by connection id.
    conns: FastMap<u64, WorkerConn>,
}

impl WorkerTracker {
    pub fn new(map: WorkerMap) -> Self {
        WorkerTracker {
            map,
            ..Self::default()
        }
    }

    /// The frontend that started worker `pid`.
    pub fn frontend_of(&self, pid: u32) -> Option<u32> {
        self.procs.get(&pid).map(|w| w.frontend)
    }

    pub fn is_worker(&self, pid: u32) -> bool {
        self.procs.contains_key(&pid)
    }

    pub fn added(&mut self, w: WorkerProcess, registry: &Registry, hostname: &str) {
        let pid = w.pid;
        self.procs.insert(pid, w);
        self.refresh(pid, registry, hostname);
    }

    pub fn removed(&mut self, pid: u32) {
        // Its load stays: TorchServe restarts a dead worker on the same port (same worker thread),
        // and the replacement's load frame may arrive before this removal is noticed.
        self.procs.remove(&pid);
        self.map.set(pid, None);
        // A killed process's fds close without a close() record: drop its connections here.
        self.conns.retain(|_, c| c.tgid != pid);
    }

    /// Forgets the worker connections of a frontend that is no longer traced.
    pub fn frontend_removed(&mut self, frontend: u32) {
        self.conn_port.retain(|_, (f, _)| *f != frontend);
        self.loads.retain(|(f, _), _| *f != frontend);
    }

    /// The identity of `pid` from what is known now (load frame first, then its manifest).
    fn identity(&self, pid: u32) -> Option<WorkerIdentity> {
        let w = self.procs.get(&pid)?;
        let load = self.loads.get(&(w.frontend, w.port));
        let (model_name, model_version) = match (load, &w.manifest) {
            (Some(l), m) => (
                l.frame.model_name.clone(),
                l.version
                    .clone()
                    .or_else(|| m.as_ref().map(|m| m.model_version.clone()))?,
            ),
            (None, Some(m)) => (m.model_name.clone(), m.model_version.clone()),
            (None, None) => return None,
        };
        Some(WorkerIdentity {
            worker_name: format!("W-{}-{model_name}_{model_version}", w.port),
            model_name,
            model_version,
            frontend: w.frontend,
            port: w.port,
            batch_size: load.map(|l| l.frame.batch_size),
            gpu_id: load.map(|l| l.frame.gpu_id),
            handler: load.map(|l| l.frame.handler.clone()),
        })
    }

    /// Updates the shared map for `pid` and reports its load time once both ends are known.
    fn refresh(&mut self, pid: u32, registry: &Registry, hostname: &str) {
        let id = self.identity(pid);
        self.map.set(pid, id.clone());
        let (Some(id), Some(w)) = (id, self.procs.get(&pid)) else {
            return;
        };
        let Some(load) = self.loads.get_mut(&(w.frontend, w.port)) else {
            return;
        };
        if load.reported {
            return;
        }
        let (Some(loaded_ns), Some(started_ns)) =
            (load.loaded_ns, start_monotonic_ns(w.start_time))
        else {
            return;
        };
        load.reported = true;
        #[expect(
            clippy::cast_precision_loss,
            reason = "millisecond spans fit f64 exactly"
        )]
        let ms = (loaded_ns.saturating_sub(started_ns) / 1_000_000) as f64;
        registry.set_worker_load_time(&id.worker_name, hostname, ms);
    }

    fn pid_of(&self, frontend: u32, port: u16) -> Option<u32> {
        self.procs
            .values()
            .find(|w| w.frontend == frontend && w.port == port)
            .map(|w| w.pid)
    }

    /// A record of a frontend's unix socket (its end of a worker connection).
    pub fn on_frontend(&mut self, ev: &Event<'_>, registry: &Registry, hostname: &str) {
        if ev.family != FAMILY_UNIX {
            return;
        }
        match ev.kind {
            Kind::Open => {
                if let Some(port) = ev.unix_peer_path().and_then(socket_port) {
                    self.conn_port.insert(ev.conn_id, (ev.tgid, port));
                }
            }
            Kind::Close => {
                self.conn_port.remove(&ev.conn_id);
                self.awaiting_load.remove(&ev.conn_id);
                self.cycle.remove(&ev.conn_id);
            }
            Kind::Data => {
                let Some(&(frontend, port)) = self.conn_port.get(&ev.conn_id) else {
                    return;
                };
                match ev.dir {
                    Direction::Egress => {
                        let Some(frame) = otf::load_frame(ev.head) else {
                            if let Some(first) = otf::first_request_id(ev.head) {
                                self.cycle.insert(ev.conn_id, (first, ev.ts_ns));
                            }
                            return;
                        };
                        if self.loads.len() >= MAX_LOADS
                            && !self.loads.contains_key(&(frontend, port))
                        {
                            // Full: forget loads of ports no live worker holds (scaled down).
                            let live: HashSet<(u32, u16)> =
                                self.procs.values().map(|w| (w.frontend, w.port)).collect();
                            self.loads.retain(|k, _| live.contains(k));
                            if self.loads.len() >= MAX_LOADS {
                                return;
                            }
                        }
                        let version = read_manifest(
                            &crate::sampler::procfs::ProcRoot::default()
                                .root_of(frontend)
                                .join(frame.model_path.trim_start_matches('/'))
                                .join("MAR-INF/MANIFEST.json"),
                        )
                        .map(|m| m.model_version);
                        self.loads.insert(
                            (frontend, port),
                            Load {
                                frame,
                                version,
                                loaded_ns: None,
                                reported: false,
                            },
                        );
                        self.awaiting_load.insert(ev.conn_id);
                        if let Some(pid) = self.pid_of(frontend, port) {
                            self.refresh(pid, registry, hostname);
                        }
                    }
                    Direction::Ingress => {
                        if !self.awaiting_load.remove(&ev.conn_id) {
                            // The first read after an inference frame: its batch reply arrived.
                            if let Some((id, written)) = self.cycle.remove(&ev.conn_id) {
                                self.note_reply(&id, ev.ts_ns);
                                if let Some(w) =
                                    self.pid_of(frontend, port).and_then(|p| self.map.lookup(p))
                                {
                                    #[expect(
                                        clippy::cast_precision_loss,
                                        reason = "nanosecond spans fit f64's 52-bit mantissa"
                                    )]
                                    let held = ev.ts_ns.saturating_sub(written) as f64 / 1e9;
                                    registry.observe_backend(
                                        &w.model_name,
                                        &w.model_version,
                                        hostname,
                                        held,
                                    );
                                }
                            }
                            return;
                        }
                        // Reply: int32 code, message, int32 -1. Only a 200 ends a load.
                        if ev.head.get(..4) != Some(&200i32.to_be_bytes()[..]) {
                            return;
                        }
                        if let Some(load) = self.loads.get_mut(&(frontend, port)) {
                            load.loaded_ns = Some(ev.ts_ns);
                        }
                        if let Some(pid) = self.pid_of(frontend, port) {
                            self.refresh(pid, registry, hostname);
                        }
                    }
                }
            }
            // The kernel's walk of an inference frame the frontend wrote: the batch's size.
            Kind::Batch => {
                let Some(batch) = ev.batch() else {
                    registry.otf_corrupt.inc();
                    return;
                };
                match batch.status {
                    BatchStatus::Ok => {
                        let Some(&(frontend, port)) = self.conn_port.get(&ev.conn_id) else {
                            return;
                        };
                        // With every id of the frame here the kernel sends no data record of the
                        // write (R45): the batch starts the worker cycle. Otherwise the data
                        // record, sent after the batch, does (`Direction::Egress` above).
                        if let Some(first) = batch.ids.first()
                            && batch.ids.len() == usize::try_from(batch.requests).unwrap_or(0)
                        {
                            self.cycle
                                .insert(ev.conn_id, ((*first).to_owned(), ev.ts_ns));
                        }
                        if let Some(id) =
                            self.pid_of(frontend, port).and_then(|p| self.map.lookup(p))
                        {
                            registry.observe_batch(
                                &id.model_name,
                                &id.model_version,
                                hostname,
                                batch.requests,
                            );
                        }
                    }
                    BatchStatus::Corrupt => registry.otf_corrupt.inc(),
                    // A frame too long to walk in the kernel's step budget: its size is unknown.
                    BatchStatus::Unfinished => {
                        tracing::debug!(
                            requests = batch.requests,
                            "inference frame not walked to its end"
                        );
                    }
                }
            }
            // Discovery's records; the reader hands them over before this.
            Kind::Exec | Kind::Exit | Kind::Listen => {}
        }
    }

    fn note_reply(&mut self, id: &str, ts_ns: u64) {
        self.replied.insert(id, ts_ns);
    }

    /// An HTTP response with `x-request-id: id` started at `start_ns`. For the first request of a
    /// batch this ends TorchServe's WorkerThreadTime cycle as seen from outside: TorchServe measures
    /// its worker thread's time around the backend wait (writing the frame, then handing the replies
    /// to Netty); the frame's write is one syscall, so what remains is reply read → response write.
    pub fn on_response(&mut self, id: &str, start_ns: u64, registry: &Registry, hostname: &str) {
        let Some(replied) = self.replied.take(id) else {
            return;
        };
        #[expect(
            clippy::cast_precision_loss,
            reason = "whole milliseconds fit f64 exactly"
        )]
        let ms = (start_ns.saturating_sub(replied) / 1_000_000) as f64;
        registry.set_worker_thread_time(hostname, ms);
    }

    /// A record of a worker process: its pipe writes (its stdout/stderr, where `[METRICS]` lines go).
    pub fn on_worker(&mut self, ev: &Event<'_>, registry: &Registry, hostname: &str) {
        if ev.kind == Kind::Close {
            self.conns.remove(&ev.conn_id);
            return;
        }
        if ev.kind != Kind::Data || ev.family != FAMILY_PIPE || ev.dir != Direction::Egress {
            return;
        }
        if self.conns.len() >= MAX_WORKER_CONNS && !self.conns.contains_key(&ev.conn_id) {
            return;
        }
        let conn = self.conns.entry(ev.conn_id).or_insert_with(|| WorkerConn {
            tgid: ev.tgid,
            ..WorkerConn::default()
        });
        let map = &self.map;
        conn.lines.feed(ev.head, ev.len, |line| {
            let Some(m) = metric_lines::parse(line) else {
                return;
            };
            if !MODEL_METRICS.contains(&m.name) {
                return;
            }
            // TorchServe's gauge takes its dimensions from the line (the worker knows its model's
            // registered name); the mapped identity only fills a missing one.
            let fallback;
            let model = match m.dim("ModelName") {
                Some(model) => model,
                None => {
                    fallback = map.lookup(ev.tgid).map(|i| i.model_name);
                    let Some(model) = fallback.as_deref() else {
                        return;
                    };
                    model
                }
            };
            let level = m.dim("Level").unwrap_or("Model");
            registry.set_model_metric(m.name, model, level, hostname, m.value);
        });
    }
}

/// A process start time (clock ticks since boot) on the kernel's monotonic clock, which the ring
/// buffer's timestamps use (`bpf_ktime_get_ns`). Boot time counts suspend, monotonic time does not.
fn start_monotonic_ns(start_ticks: u64) -> Option<u64> {
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok()?;
    let clock = |id| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid clock id and a valid out pointer.
        (unsafe { libc::clock_gettime(id, &mut ts) } == 0).then(|| {
            u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000
                + u64::try_from(ts.tv_nsec).unwrap_or(0)
        })
    };
    let suspended = clock(libc::CLOCK_BOOTTIME)?.saturating_sub(clock(libc::CLOCK_MONOTONIC)?);
    Some((start_ticks.checked_mul(1_000_000_000)? / hz.max(1)).saturating_sub(suspended))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|a| (*a).to_owned()).collect()
    }

    #[test]
    fn worker_ports_from_command_lines() {
        let unix = s(&[
            "/venv/bin/python",
            "/venv/lib/python3.11/site-packages/ts/model_service_worker.py",
            "--sock-type",
            "unix",
            "--sock-name",
            "/tmp/.ts.sock.9003",
            "--metrics-config",
            "/x/metrics.yaml",
        ]);
        assert_eq!(worker_port(&unix), Some(9003));
        let tcp = s(&[
            "python",
            "ts/model_service_worker.py",
            "--sock-type",
            "tcp",
            "--port",
            "9001",
        ]);
        assert_eq!(worker_port(&tcp), Some(9001));
        assert_eq!(
            worker_port(&s(&[
                "python",
                "ts/metrics/metric_collector.py",
                "--gpu",
                "0"
            ])),
            None
        );
        assert_eq!(
            worker_port(&s(&[
                "python",
                "ts/model_service_worker.py",
                "--sock-name",
                "/tmp/x"
            ])),
            None
        );
        assert_eq!(
            worker_port(&s(&["python", "ts/model_service_worker.py", "--sock-name"])),
            None
        );
    }

    #[test]
    fn manifests() {
        let m = parse_manifest(
            r#"{"createdOn":"x","runtime":"python","model":{"modelName":"echo","handler":"echo_handler.py","modelVersion":"2.0"},"archiverVersion":"0.12.0"}"#,
        );
        assert_eq!(
            m,
            Some(Manifest {
                model_name: "echo".into(),
                model_version: "2.0".into()
            })
        );
        let m = parse_manifest(r#"{"model":{"modelName":"echo"}}"#).expect("no version");
        assert_eq!(m.model_version, "1.0");
        assert_eq!(parse_manifest(r#"{"model":{"modelName":""}}"#), None);
        assert_eq!(parse_manifest("not json"), None);
    }

    /// A procfs fixture: frontend 100 with workers 200 (echo) and 201 (no manifest), a worker-looking
    /// process 300 of another parent, and the frontend's metric collector 202.
    #[test]
    fn scan_finds_the_frontends_workers() {
        let d = tempfile::tempdir().expect("temp dir");
        let p = d.path();
        let mk = |pid: u32, ppid: u32, cmd: &str| {
            let dir = p.join(pid.to_string());
            fs::create_dir_all(dir.join("cwd/MAR-INF")).expect("mkdir");
            fs::write(dir.join("cmdline"), cmd).expect("write");
            fs::write(
                dir.join("stat"),
                format!(
                    "{pid} (python) S {ppid} 1 1 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 {} 1 1",
                    pid * 10
                ),
            )
            .expect("write");
        };
        let worker = |port: u32| {
            format!(
                "python\0/v/ts/model_service_worker.py\0--sock-type\0unix\0--sock-name\0/tmp/.ts.sock.{port}\0"
            )
        };
        mk(100, 1, "java\0org.pytorch.serve.ModelServer\0");
        mk(200, 100, &worker(9000));
        fs::write(
            p.join("200/cwd/MAR-INF/MANIFEST.json"),
            r#"{"model":{"modelName":"echo","modelVersion":"1.0"}}"#,
        )
        .expect("write");
        mk(201, 100, &worker(9001));
        mk(
            202,
            100,
            "python\0ts/metrics/metric_collector.py\0--gpu\0\x30\0",
        );
        mk(300, 1, &worker(9005));
        let found = scan(&ProcFs::new(p), &BTreeSet::from([100]));
        assert_eq!(found.keys().copied().collect::<Vec<_>>(), vec![200, 201]);
        assert_eq!(found[&200].port, 9000);
        assert_eq!(found[&200].start_time, 2000);
        assert_eq!(
            found[&200].manifest.as_ref().map(|m| m.model_name.as_str()),
            Some("echo")
        );
        assert_eq!(found[&201].manifest, None);
        assert!(scan(&ProcFs::new(p), &BTreeSet::new()).is_empty());
    }

    fn rec(h: crate::events::RawHeader, data: &[u8]) -> Vec<u8> {
        crate::events::encode_for_test(h, data)
    }

    fn text(v: &mut Vec<u8>, x: &[u8]) {
        v.extend(i32::try_from(x.len()).expect("short").to_be_bytes());
        v.extend(x);
    }

    /// Load frame on the frontend's connection to the worker's socket → identity, load time; then the
    /// worker's own reads give batch sizes and its pipe the model metrics.
    #[test]
    fn frontend_load_frame_names_the_worker_and_its_traffic_is_counted() {
        use crate::events::RawHeader;
        let reg = Registry::new();
        let map = WorkerMap::default();
        let mut t = WorkerTracker::new(map.clone());
        t.added(
            WorkerProcess {
                pid: 200,
                start_time: 0,
                frontend: 100,
                port: 9004,
                manifest: Some(Manifest {
                    model_name: "archive-name".into(),
                    model_version: "3.0".into(),
                }),
            },
            &reg,
            "vm",
        );
        assert_eq!(
            map.lookup(200).map(|i| i.worker_name),
            Some("W-9004-archive-name_3.0".to_owned()),
            "manifest until a load frame is seen"
        );
        let fe = |kind: u8, dir: u8, ts: u64, data: &[u8]| {
            rec(
                RawHeader {
                    ts_ns: ts,
                    conn_id: 7,
                    len: data.len() as u64,
                    tgid: 100,
                    kind,
                    dir,
                    family: FAMILY_UNIX,
                    ..Default::default()
                },
                data,
            )
        };
        let apply = |t: &mut WorkerTracker, r: &[u8]| {
            t.on_frontend(&Event::decode(r).expect("valid"), &reg, "vm");
        };
        let scrape = || {
            crate::exposition::torchserve::encode(
                &reg.gather(),
                &crate::exposition::torchserve::Filter::all(),
            )
        };
        apply(&mut t, &fe(2, 1, 1, b"/tmp/.ts.sock.9004\0"));
        let mut load = vec![b'L'];
        text(&mut load, b"batched");
        text(&mut load, b"/nonexistent/models/abc");
        load.extend(4i32.to_be_bytes());
        text(&mut load, b"echo_handler.py");
        load.extend((-1i32).to_be_bytes());
        text(&mut load, b"");
        load.push(0);
        apply(&mut t, &fe(1, 1, 2, &load));
        let id = map.lookup(200).expect("known");
        assert_eq!(
            id.worker_name, "W-9004-batched_3.0",
            "frame's name, manifest's version"
        );
        assert_eq!(id.batch_size, Some(4));
        let mut reply = 200i32.to_be_bytes().to_vec();
        text(&mut reply, b"loaded");
        reply.extend((-1i32).to_be_bytes());
        apply(&mut t, &fe(1, 0, 5_000_000_000, &reply));
        let text_out = scrape();
        assert!(
            text_out.contains(
                "WorkerLoadTime{WorkerName=\"W-9004-batched_3.0\",Level=\"Host\",Hostname=\"vm\",}"
            ),
            "{text_out}"
        );

        // WorkerThreadTime: the frontend writes a frame, reads the reply 2 s later, and the first
        // request's HTTP response leaves 3 ms after that.
        let mut inf = vec![b'I'];
        text(&mut inf, b"rid-1");
        inf.extend((-1i32).to_be_bytes());
        inf.extend((-1i32).to_be_bytes());
        inf.extend((-1i32).to_be_bytes());
        apply(&mut t, &fe(1, 1, 6_000_000_000, &inf));
        apply(&mut t, &fe(1, 0, 8_000_000_000, b"\0\0\0\xc8"));
        t.on_response("other", 8_001_000_000, &reg, "vm");
        t.on_response("rid-1", 8_003_500_000, &reg, "vm");
        let out = scrape();
        assert!(
            out.contains("WorkerThreadTime{Level=\"Host\",Hostname=\"vm\",} 3.0"),
            "{out}"
        );
        // The worker held the batch from the frame's write (6 s) to the reply's read (8 s).
        let held = "{hostname=\"vm\",model_name=\"batched\",model_version=\"3.0\"}";
        assert!(
            out.contains(&format!(
                "servescope_worker_backend_duration_seconds_sum{held} 2\n"
            )),
            "{out}"
        );
        assert!(
            out.contains(&format!(
                "servescope_worker_backend_duration_seconds_count{held} 1\n"
            )),
            "{out}"
        );

        // The kernel's walk of a batch of two the frontend wrote: its size (one corrupt walk is
        // counted, not observed).
        let batch = |requests: u32, status: u8| {
            let mut p = requests.to_ne_bytes().to_vec();
            p.extend_from_slice(&[status, 2, 0, 0, 1, b'a', 1, b'b']);
            p
        };
        apply(&mut t, &fe(7, 1, 9_000_000_000, &batch(2, 0)));
        apply(&mut t, &fe(7, 1, 9_500_000_000, &batch(1, 1)));
        assert_eq!(reg.otf_corrupt.get(), 1);
        // The worker's pipe: its [METRICS] line.
        let wk = |conn: u64, family: u8, dir: u8, data: &[u8], len: u64| {
            rec(
                RawHeader {
                    ts_ns: 9,
                    conn_id: conn,
                    len,
                    tgid: 200,
                    kind: 1,
                    dir,
                    family,
                    ..Default::default()
                },
                data,
            )
        };
        let line = b"[METRICS]PredictionTime.Milliseconds:0.47|#ModelName:batched,Level:Model|#type:GAUGE|#hostname:vm,1795457674,a\n";
        t.on_worker(
            &Event::decode(&wk(9, FAMILY_PIPE, 1, line, line.len() as u64)).expect("valid"),
            &reg,
            "vm",
        );
        let out = scrape();
        assert!(
            out.contains("servescope_batch_size_bucket{hostname=\"vm\",model_name=\"batched\",model_version=\"3.0\",le=\"2\"} 1"),
            "{out}"
        );
        assert!(
            out.contains(
                "PredictionTime{ModelName=\"batched\",Level=\"Model\",Hostname=\"vm\",} 0.47"
            ),
            "{out}"
        );
        assert!(!out.contains("HandlerTime{"), "no line, no sample: {out}");

        // A batch record (a frame of `requests`, `id` kept) at `at_ns`, the worker's reply a second
        // later and the HTTP response `after_ms` after that.
        let batch_cycle =
            |t: &mut WorkerTracker, requests: u32, id: &str, at_ns: u64, after_ms: u64| {
                let payload = crate::events::batch_payload(requests, 0, &[id.as_bytes()]);
                apply(t, &fe(crate::events::KIND_BATCH, 1, at_ns, &payload));
                let reply_ns = at_ns + 1_000_000_000;
                apply(t, &fe(1, 0, reply_ns, b"\0\0\0\xc8"));
                t.on_response(id, reply_ns + after_ms * 1_000_000, &reg, "vm");
            };
        // Since R45 the kernel sends no data record for an inference frame whose batch record holds
        // every id: the batch alone starts the cycle (frame at 10 s, reply at 11 s, response 7 ms on).
        batch_cycle(&mut t, 1, "rid-2", 10_000_000_000, 7);
        let out = scrape();
        assert!(
            out.contains("WorkerThreadTime{Level=\"Host\",Hostname=\"vm\",} 7.0"),
            "{out}"
        );
        assert!(
            out.contains(&format!(
                "servescope_worker_backend_duration_seconds_count{held} 2\n"
            )),
            "{out}"
        );
        // A batch whose ids were not all kept (too long for the record) starts no cycle: its data
        // record, which the kernel still sends, does.
        batch_cycle(&mut t, 2, "rid-3", 12_000_000_000, 9);
        let out = scrape();
        assert!(
            out.contains("WorkerThreadTime{Level=\"Host\",Hostname=\"vm\",} 7.0"),
            "a partial batch started a cycle:\n{out}"
        );

        t.removed(200);
        assert_eq!(map.lookup(200), None);
    }
}
