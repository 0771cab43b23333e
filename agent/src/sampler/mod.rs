//! Userspace samplers (DESIGN.md §9): TorchServe's system families from procfs and statvfs
//! ([`procfs`]) and its GPU families from NVML ([`nvml`]), written into the [`Registry`] every sample
//! interval, so a scrape always reads the last sample.
//!
//! TorchServe labels these families with its own hostname; one servescope serves many TorchServes
//! (pods), so each sample has one series per distinct hostname among the current targets, and none
//! while nothing is traced. Both samplers do their blocking work (file reads, statvfs of a possibly
//! remote model store, NVML calls) on the blocking pool, never on the threads that answer scrapes.

pub mod nvml;
pub mod procfs;

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    path::Path,
    time::Duration,
};

use anyhow::Context;
use procfs_core::FromRead as _;
use tokio::{sync::watch, time::Instant};

use self::{
    nvml::{GpuError, GpuReading, GpuSource},
    procfs::{CpuTimes, DiskStats, ProcRoot},
};
use crate::{
    registry::{GpuValues, Registry, SystemValues, WorkerUsageLabels},
    workers::WorkerMap,
};

/// A traced process as the samplers need it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SampleTarget {
    pub pid: u32,
    /// The hostname TorchServe prints (its UTS namespace's), the `Hostname` label.
    pub hostname: String,
}

/// The current targets, published by the discovery loop (`pipeline::discover`) whenever they change.
pub type TargetsRx = watch::Receiver<Vec<SampleTarget>>;

/// Delay of the first CPU figure after start: long enough for a meaningful delta, short enough that
/// CPUUtilization does not stay empty for a whole interval.
const FIRST_CPU_DELTA: Duration = Duration::from_secs(1);

/// Logs a failing reading once when it starts failing and once when it recovers, never per sample.
#[derive(Debug, Default)]
struct Complaints {
    failing: BTreeSet<&'static str>,
}

impl Complaints {
    fn check<T>(&mut self, what: &'static str, r: anyhow::Result<T>) -> Option<T> {
        match r {
            Ok(v) => {
                if self.failing.remove(what) {
                    tracing::info!(what, "system metric readable again");
                }
                Some(v)
            }
            Err(e) => {
                if self.failing.insert(what) {
                    tracing::warn!(
                        what,
                        error = format!("{e:#}"),
                        "system metric not readable; its family stays empty until it is"
                    );
                }
                None
            }
        }
    }
}

/// TorchServe's system families for the current targets.
#[derive(Debug)]
pub struct SystemSampler {
    proc: ProcRoot,
    prev_cpu: Option<CpuTimes>,
    cpu: Option<f64>,
    complaints: Complaints,
}

impl SystemSampler {
    pub fn new(proc: ProcRoot) -> Self {
        SystemSampler {
            proc,
            prev_cpu: None,
            cpu: None,
            complaints: Complaints::default(),
        }
    }

    /// Takes a CPU reading; CPUUtilization becomes the busy share since the previous one (none after
    /// the first).
    pub fn measure_cpu(&mut self) {
        let now = self.complaints.check("cpu", self.proc.cpu_times());
        self.cpu = match (&self.prev_cpu, &now) {
            (Some(before), Some(after)) => Some(procfs::cpu_percent(before, after)),
            _ => None,
        };
        self.prev_cpu = now;
    }

    /// The values for every hostname among `targets`: the last CPU figure, memory now, and the disk
    /// of that hostname's model store (of its lowest PID when several servers share a hostname).
    pub fn values(&mut self, targets: &[SampleTarget]) -> BTreeMap<String, SystemValues> {
        if targets.is_empty() {
            return BTreeMap::new();
        }
        let memory = self.complaints.check("memory", self.proc.memory());
        let mut out = BTreeMap::new();
        for (hostname, pid) in first_pid_by_hostname(targets) {
            let disk = self.disk_of(pid);
            out.insert(
                hostname,
                SystemValues {
                    cpu_utilization: self.cpu,
                    memory_used: memory.map(|m| m.used_mb()),
                    memory_available: memory.map(|m| m.available_mb()),
                    memory_utilization: memory.map(|m| m.utilization()),
                    disk_usage: disk.map(|d| d.usage_gb()),
                    disk_available: disk.map(|d| d.available_gb()),
                    disk_utilization: disk.map(|d| d.utilization()),
                },
            );
        }
        out
    }

    /// statvfs of `pid`'s model store; its root when the store is not reachable (deleted, or an
    /// unreadable mount); the agent's `/` when the process is gone.
    fn disk_of(&mut self, pid: u32) -> Option<DiskStats> {
        let store = self.proc.disk_path(pid);
        let r = DiskStats::of(&store).or_else(|e| {
            tracing::debug!(
                pid,
                error = format!("{e:#}"),
                "model store not measurable; using the process's root"
            );
            DiskStats::of(&self.proc.root_of(pid))
        });
        let r = r.or_else(|_| DiskStats::of(std::path::Path::new("/")));
        self.complaints.check("disk", r)
    }
}

/// The lowest PID of each hostname.
fn first_pid_by_hostname(targets: &[SampleTarget]) -> BTreeMap<String, u32> {
    let mut out: BTreeMap<String, u32> = BTreeMap::new();
    for t in targets {
        out.entry(t.hostname.clone())
            .and_modify(|p| *p = (*p).min(t.pid))
            .or_insert(t.pid);
    }
    out
}

/// Whether `pid` is a descendant of one of `ancestors` (TorchServe's workers are its frontend's
/// children, or grandchildren behind a shell), following `PPid` in `<proc>/<pid>/stat` up to 8
/// levels. A process that is gone or unreadable is not.
pub fn descends_from(proc: &Path, pid: u32, ancestors: &HashSet<u32>) -> bool {
    let mut current = pid;
    for _ in 0..8 {
        let Ok(stat) =
            procfs_core::process::Stat::from_file(proc.join(current.to_string()).join("stat"))
        else {
            return false;
        };
        let Ok(parent) = u32::try_from(stat.ppid) else {
            return false;
        };
        if ancestors.contains(&parent) {
            return true;
        }
        if parent <= 1 {
            return false;
        }
        current = parent;
    }
    false
}

fn hostnames(targets: &[SampleTarget]) -> Vec<String> {
    let set: BTreeSet<&str> = targets.iter().map(|t| t.hostname.as_str()).collect();
    set.into_iter().map(str::to_owned).collect()
}

/// Why a sampler loop resumes.
enum Wake {
    Tick,
    TargetsChanged,
    Shutdown,
}

/// Waits for the next tick, a change of the target set (so new targets get their series at once),
/// or shutdown.
async fn next(
    tick: &mut tokio::time::Interval,
    targets: &mut TargetsRx,
    watching: &mut bool,
    shutdown: &mut watch::Receiver<bool>,
) -> Wake {
    loop {
        tokio::select! {
            _ = shutdown.changed() => return Wake::Shutdown,
            _ = tick.tick() => return Wake::Tick,
            r = targets.changed(), if *watching => {
                if r.is_ok() {
                    return Wake::TargetsChanged;
                }
                // Discovery ended (the agent is stopping): keep the last set.
                *watching = false;
            }
        }
    }
}

/// Runs `job` on the blocking pool unless shutdown comes first (`None`).
async fn blocking<T: Send + 'static>(
    shutdown: &mut watch::Receiver<bool>,
    job: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<Option<T>> {
    tokio::select! {
        _ = shutdown.changed() => Ok(None),
        r = tokio::task::spawn_blocking(job) => Ok(Some(r.context("sampler task crashed")?)),
    }
}

fn interval_after_first_delta(every: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval_at(Instant::now() + FIRST_CPU_DELTA.min(every), every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// The system sampler over the host's `/proc`, until `shutdown` flips.
pub async fn run_system(
    every: Duration,
    registry: Registry,
    targets: TargetsRx,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    run_system_on(ProcRoot::default(), every, registry, targets, shutdown).await
}

/// The system sampler over the procfs tree `proc`: samples at once (memory and disk; CPU needs two
/// readings), after [`FIRST_CPU_DELTA`], then every `every`; and when the targets change, without a
/// new CPU reading so CPUUtilization always spans a whole interval.
pub async fn run_system_on(
    proc: ProcRoot,
    every: Duration,
    registry: Registry,
    mut targets: TargetsRx,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut sampler = SystemSampler::new(proc);
    let mut tick = interval_after_first_delta(every);
    let mut watching = true;
    let mut measure_cpu = true;
    loop {
        let current = targets.borrow_and_update().clone();
        let Some((s, values)) = blocking(&mut shutdown, move || {
            if measure_cpu {
                sampler.measure_cpu();
            }
            let values = sampler.values(&current);
            (sampler, values)
        })
        .await?
        else {
            return Ok(());
        };
        sampler = s;
        registry.set_system(&values);
        measure_cpu = match next(&mut tick, &mut targets, &mut watching, &mut shutdown).await {
            Wake::Tick => true,
            Wake::TargetsChanged => false,
            Wake::Shutdown => return Ok(()),
        };
    }
}

/// Each worker process's GPU memory with its model, for the processes the worker map knows (the
/// per-process family keeps the others by PID).
fn worker_gpu_rows(
    rows: &[nvml::ProcessMemory],
    workers: &WorkerMap,
    targets: &[SampleTarget],
) -> Vec<(WorkerUsageLabels, u32, u64)> {
    rows.iter()
        .filter_map(|p| {
            let id = workers.lookup(p.pid)?;
            let hostname = targets
                .iter()
                .find(|t| t.pid == id.frontend)
                .map(|t| t.hostname.clone())
                .unwrap_or_default();
            Some((
                WorkerUsageLabels {
                    model_name: id.model_name,
                    model_version: id.model_version,
                    worker_name: id.worker_name,
                    hostname,
                },
                p.device_id,
                p.bytes,
            ))
        })
        .collect()
}

/// The GPU sampler: opens its source with `open` (NVML in the agent: [`nvml::open_nvml`]), then
/// samples every `every` and when the targets change, until `shutdown` flips.
///
/// Without a source (no NVIDIA library or driver) it logs that once and idles: the GPU families print
/// HELP/TYPE only, as TorchServe's do on a host without GPU. A source that fails later is logged when
/// it starts and stops failing; its families are empty meanwhile.
pub async fn run_gpu<F>(
    open: F,
    every: Duration,
    registry: Registry,
    workers_by_pid: WorkerMap,
    mut targets: TargetsRx,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()>
where
    F: FnOnce() -> Result<Box<dyn GpuSource>, GpuError> + Send + 'static,
{
    let Some(opened) = blocking(&mut shutdown, open).await? else {
        return Ok(());
    };
    let mut source = match opened {
        Ok(s) => s,
        Err(e) => {
            tracing::info!("GPU metrics off: {e}");
            let _ = shutdown.changed().await;
            return Ok(());
        }
    };
    let mut tick = interval_after_first_delta(every);
    let mut watching = true;
    let mut announced = false;
    let mut failing = false;
    let mut xids_said = false;
    loop {
        let current = targets.borrow_and_update().clone();
        let pids: HashSet<u32> = current.iter().map(|t| t.pid).collect();
        let Some((s, readings)) = blocking(&mut shutdown, move || {
            let r = source.devices().map(|devices| {
                // Workers are the traced frontends' descendants; resolved here, off the runtime,
                // since it reads /proc.
                let workers = nvml::process_memory(&devices, |pid| {
                    descends_from(Path::new("/proc"), pid, &pids)
                });
                let xids = source.xid_events();
                (devices, workers, xids)
            });
            (source, r)
        })
        .await?
        else {
            return Ok(());
        };
        source = s;
        match readings {
            Ok((devices, workers, xids)) => {
                if !announced {
                    announced = true;
                    if devices.is_empty() {
                        tracing::info!(
                            "GPU metrics: NVML loaded but reports no GPU; GPU families stay empty"
                        );
                    } else {
                        tracing::info!(devices = devices.len(), "GPU metrics from NVML");
                    }
                }
                if failing {
                    failing = false;
                    tracing::info!("GPU readings available again");
                }
                let values: Vec<GpuValues> = devices.iter().map(GpuReading::values).collect();
                registry.set_gpu(&hostnames(&current), &values);
                registry.set_gpu_processes(&workers);
                registry.set_worker_gpu(&worker_gpu_rows(&workers, &workers_by_pid, &current));
                match xids {
                    Some(events) => registry.count_xids(&events),
                    None if !xids_said => {
                        xids_said = true;
                        tracing::info!(
                            "GPU XID events not available from this driver; servescope_gpu_xid_errors_total stays empty"
                        );
                    }
                    None => {}
                }
            }
            Err(e) => {
                if !failing {
                    failing = true;
                    tracing::warn!(error = %e, "GPU readings failed; GPU families empty until they work again");
                }
                registry.set_gpu(&[], &[]);
                registry.set_gpu_processes(&[]);
            }
        }
        if let Wake::Shutdown = next(&mut tick, &mut targets, &mut watching, &mut shutdown).await {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        fs,
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
    };

    use super::{nvml::FakeSource, *};
    use crate::exposition::torchserve::{Filter, encode};

    fn target(pid: u32, hostname: &str) -> SampleTarget {
        SampleTarget {
            pid,
            hostname: hostname.to_owned(),
        }
    }

    /// The lines of `family` (HELP, TYPE, samples) in the TorchServe exposition of `r`.
    fn family_text(r: &Registry, family: &str) -> Vec<String> {
        let text = encode(&r.gather(), &Filter::all());
        text.lines()
            .filter(|l| {
                l.strip_prefix("# HELP ")
                    .or_else(|| l.strip_prefix("# TYPE "))
                    .unwrap_or(l)
                    .split([' ', '{'])
                    .next()
                    == Some(family)
            })
            .map(str::to_owned)
            .collect()
    }

    fn samples(r: &Registry, family: &str) -> Vec<String> {
        family_text(r, family)
            .into_iter()
            .filter(|l| !l.starts_with('#'))
            .collect()
    }

    const MEMINFO: &str = "MemTotal:       24682416 kB\nMemFree:        21000000 kB\nMemAvailable:   24109556 kB\n\
Buffers:            1024 kB\nCached:          2000000 kB\nSwapCached:            0 kB\nActive:          1000000 kB\n\
Inactive:         900000 kB\nSwapTotal:             0 kB\nSwapFree:              0 kB\nDirty:                12 kB\n\
Writeback:             0 kB\nMapped:           200000 kB\nShmem:              8000 kB\nSlab:             150000 kB\n\
SReclaimable:     100000 kB\nCommitted_AS:    3000000 kB\nVmallocTotal:   34359738367 kB\nVmallocUsed:       40000 kB\n\
VmallocChunk:          0 kB\n";

    fn stat(user: u64, idle: u64) -> String {
        format!("cpu  {user} 0 0 {idle} 0 0 0 0 0 0\nctxt 1\nbtime 1\nprocesses 1\n")
    }

    /// A fixture /proc with stat, meminfo and two TorchServe-less processes.
    fn fixture() -> (tempfile::TempDir, ProcRoot) {
        let d = tempfile::tempdir().expect("temp dir");
        let p = d.path();
        fs::write(p.join("stat"), stat(100, 900)).expect("write");
        fs::write(p.join("meminfo"), MEMINFO).expect("write");
        for pid in [10, 20] {
            fs::create_dir_all(p.join(format!("{pid}/root"))).expect("mkdir");
            fs::write(p.join(format!("{pid}/cmdline")), "python3\0").expect("write");
        }
        let root = ProcRoot::new(p);
        (d, root)
    }

    #[test]
    fn system_families_in_torchserve_format() {
        let (d, proc) = fixture();
        let mut s = SystemSampler::new(proc);
        let r = Registry::new();

        // Nothing traced: HELP/TYPE only, like TorchServe before its first collector run.
        s.measure_cpu();
        r.set_system(&s.values(&[]));
        assert_eq!(
            family_text(&r, "MemoryUsed"),
            [
                "# HELP MemoryUsed Torchserve prometheus gauge metric with unit: Megabytes",
                "# TYPE MemoryUsed gauge"
            ]
        );

        // 300 of 1000 ticks busy since the first reading.
        fs::write(d.path().join("stat"), stat(400, 1600)).expect("write");
        s.measure_cpu();
        let targets = [target(20, "pod-b"), target(10, "vm"), target(11, "vm")];
        r.set_system(&s.values(&targets));
        assert_eq!(
            samples(&r, "CPUUtilization"),
            [
                "CPUUtilization{Level=\"Host\",Hostname=\"pod-b\",} 30.0",
                "CPUUtilization{Level=\"Host\",Hostname=\"vm\",} 30.0"
            ]
        );
        // The golden capture's values for the same meminfo.
        assert_eq!(
            samples(&r, "MemoryUsed"),
            [
                "MemoryUsed{Level=\"Host\",Hostname=\"pod-b\",} 559.43359375",
                "MemoryUsed{Level=\"Host\",Hostname=\"vm\",} 559.43359375"
            ]
        );
        assert_eq!(
            samples(&r, "MemoryAvailable")[1],
            "MemoryAvailable{Level=\"Host\",Hostname=\"vm\",} 23544.48828125"
        );
        assert_eq!(
            samples(&r, "MemoryUtilization")[1],
            "MemoryUtilization{Level=\"Host\",Hostname=\"vm\",} 2.3"
        );
        // Disk: the fixture's process roots are on the temp dir's filesystem.
        let expected = DiskStats::of(d.path()).expect("statvfs");
        assert_eq!(
            samples(&r, "DiskUtilization")[1],
            format!(
                "DiskUtilization{{Level=\"Host\",Hostname=\"vm\",}} {}",
                crate::exposition::torchserve::java_double(expected.utilization())
            )
        );
        for family in ["DiskUsage", "DiskAvailable"] {
            assert_eq!(samples(&r, family).len(), 2, "{family}");
        }

        // pod-b's server exits: its series go; no target left: every family is empty again.
        r.set_system(&s.values(&[target(10, "vm")]));
        assert_eq!(samples(&r, "CPUUtilization").len(), 1);
        assert!(samples(&r, "CPUUtilization")[0].contains("\"vm\""));
        r.set_system(&s.values(&[]));
        for family in [
            "CPUUtilization",
            "MemoryUsed",
            "MemoryAvailable",
            "MemoryUtilization",
            "DiskUsage",
            "DiskAvailable",
            "DiskUtilization",
        ] {
            assert!(samples(&r, family).is_empty(), "{family}");
            assert_eq!(family_text(&r, family).len(), 2, "{family} keeps HELP/TYPE");
        }
    }

    #[test]
    fn unreadable_proc_leaves_families_empty() {
        let d = tempfile::tempdir().expect("temp dir");
        let mut s = SystemSampler::new(ProcRoot::new(d.path()));
        s.measure_cpu();
        s.measure_cpu();
        let values = s.values(&[target(1, "vm")]);
        let v = &values["vm"];
        assert_eq!(v.cpu_utilization, None);
        assert_eq!(v.memory_used, None);
        // The process is gone too: disk falls back to the agent's `/`, which always exists.
        assert!(v.disk_usage.is_some());
    }

    fn gpu(index: u32, util: u32, used_mib: u64) -> GpuReading {
        GpuReading {
            index,
            utilization_percent: Some(util),
            memory_used_bytes: Some(used_mib * 1024 * 1024),
            memory_total_bytes: Some(16_384 * 1024 * 1024),
            temperature_celsius: Some(50 + index),
            power_milliwatts: Some(70_500),
            sm_clock_mhz: Some(1_500),
            ecc_corrected: Some(u64::from(index)),
            ecc_uncorrected: None,
            processes: Vec::new(),
        }
    }

    #[test]
    fn gpu_families_from_a_fake_source() {
        let r = Registry::new();
        let devices: Vec<GpuValues> = [gpu(0, 35, 4096), gpu(1, 0, 0)]
            .iter()
            .map(GpuReading::values)
            .collect();
        r.set_gpu(&["vm".to_owned()], &devices);
        assert_eq!(
            family_text(&r, "GPUUtilization"),
            [
                "# HELP GPUUtilization Torchserve prometheus gauge metric with unit: Percent",
                "# TYPE GPUUtilization gauge",
                "GPUUtilization{Level=\"Host\",DeviceId=\"0\",Hostname=\"vm\",} 35.0",
                "GPUUtilization{Level=\"Host\",DeviceId=\"1\",Hostname=\"vm\",} 0.0",
            ]
        );
        assert_eq!(
            samples(&r, "GPUMemoryUtilization"),
            [
                "GPUMemoryUtilization{Level=\"Host\",DeviceId=\"0\",Hostname=\"vm\",} 25.0",
                "GPUMemoryUtilization{Level=\"Host\",DeviceId=\"1\",Hostname=\"vm\",} 0.0",
            ]
        );
        assert_eq!(
            family_text(&r, "GPUMemoryUsed"),
            [
                "# HELP GPUMemoryUsed Torchserve prometheus gauge metric with unit: Megabytes",
                "# TYPE GPUMemoryUsed gauge",
                "GPUMemoryUsed{Level=\"Host\",DeviceId=\"0\",Hostname=\"vm\",} 4096.0",
                "GPUMemoryUsed{Level=\"Host\",DeviceId=\"1\",Hostname=\"vm\",} 0.0",
            ]
        );
        // servescope's own GPU families, in standard Prometheus text.
        let text = encode(&r.gather(), &Filter::all());
        for line in [
            "servescope_gpu_memory_used_bytes{device_id=\"0\",hostname=\"vm\"} 4294967296",
            "servescope_gpu_memory_total_bytes{device_id=\"1\",hostname=\"vm\"} 17179869184",
            "servescope_gpu_temperature_celsius{device_id=\"1\",hostname=\"vm\"} 51",
            "servescope_gpu_power_watts{device_id=\"0\",hostname=\"vm\"} 70.5",
            "# TYPE servescope_gpu_power_watts gauge",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }

        // Two hostnames get every device; none gets nothing.
        r.set_gpu(&["a".to_owned(), "b".to_owned()], &devices);
        assert_eq!(samples(&r, "GPUUtilization").len(), 4);
        r.set_gpu(&[], &devices);
        assert!(samples(&r, "GPUUtilization").is_empty());
        assert!(!encode(&r.gather(), &Filter::all()).contains("servescope_gpu_"));
    }

    async fn settle() {
        // Lets spawned tasks and the blocking pool make progress under a paused clock.
        for _ in 0..50 {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test]
    async fn gpu_sampler_follows_targets_and_stops_on_shutdown() {
        let r = Registry::new();
        let (targets_tx, targets_rx) = watch::channel(Vec::new());
        let (stop_tx, stop_rx) = watch::channel(false);
        let calls = Arc::new(AtomicUsize::new(0));
        // A child of this test process (a "worker" of the target below) and pid 1 (not one) use the GPU.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let worker = child.id();
        let mut reading = gpu(0, 90, 1024);
        reading.processes = vec![
            nvml::GpuProcess {
                pid: worker,
                used_bytes: Some(123 << 20),
            },
            nvml::GpuProcess {
                pid: 1,
                used_bytes: Some(7 << 20),
            },
        ];
        let source = FakeSource {
            readings: Some(vec![reading]),
            calls: calls.clone(),
            xids: Some(vec![
                nvml::XidEvent {
                    device_index: 0,
                    xid: Some(79),
                },
                nvml::XidEvent {
                    device_index: 0,
                    xid: Some(79),
                },
                nvml::XidEvent {
                    device_index: 0,
                    xid: None,
                },
            ]),
        };
        // The worker map (kept by the reader from TorchServe's load frames) knows the child.
        let workers = WorkerMap::default();
        workers.set(
            worker,
            Some(crate::workers::WorkerIdentity {
                model_name: "resnet".into(),
                model_version: "2.0".into(),
                worker_name: "W-9000-resnet_2.0".into(),
                frontend: std::process::id(),
                port: 9000,
                batch_size: None,
                gpu_id: Some(0),
                handler: None,
            }),
        );
        let task = tokio::spawn(run_gpu(
            move || Ok(Box::new(source) as Box<dyn GpuSource>),
            Duration::from_secs(3600),
            r.clone(),
            workers,
            targets_rx,
            stop_rx,
        ));
        settle().await;
        assert!(calls.load(Ordering::SeqCst) >= 1);
        assert!(samples(&r, "GPUUtilization").is_empty(), "no target yet");

        assert!(
            samples(&r, "servescope_gpu_process_memory_bytes").is_empty(),
            "no target, no workers"
        );

        // A target appears: its series come without waiting for the (hour-long) interval.
        targets_tx.send_replace(vec![target(std::process::id(), "pod-a")]);
        settle().await;
        assert_eq!(
            samples(&r, "GPUUtilization"),
            ["GPUUtilization{Level=\"Host\",DeviceId=\"0\",Hostname=\"pod-a\",} 90.0"]
        );
        assert_eq!(
            samples(&r, "servescope_gpu_process_memory_bytes"),
            [format!(
                "servescope_gpu_process_memory_bytes{{device_id=\"0\",pid=\"{worker}\"}} 128974848"
            )]
        );
        // Joined with the worker map: by model, version and worker; pid 1 is no worker.
        assert_eq!(
            samples(&r, "servescope_worker_gpu_memory_bytes"),
            [
                "servescope_worker_gpu_memory_bytes{device_id=\"0\",hostname=\"pod-a\",model_name=\"resnet\",model_version=\"2.0\",worker_name=\"W-9000-resnet_2.0\"} 128974848"
            ]
        );
        assert_eq!(
            samples(&r, "servescope_gpu_sm_clock_hertz"),
            ["servescope_gpu_sm_clock_hertz{device_id=\"0\",hostname=\"pod-a\"} 1500000000"]
        );
        // Handed out once by the fake, counted once whatever the number of samples since.
        assert_eq!(
            samples(&r, "servescope_gpu_xid_errors_total"),
            [
                "servescope_gpu_xid_errors_total{device_id=\"0\",xid=\"79\"} 2",
                "servescope_gpu_xid_errors_total{device_id=\"0\",xid=\"unknown\"} 1",
            ]
        );
        let _ = child.kill();
        let _ = child.wait();

        stop_tx.send_replace(true);
        let ended = tokio::time::timeout(Duration::from_secs(5), task).await;
        assert!(matches!(ended, Ok(Ok(Ok(())))), "{ended:?}");
    }

    #[test]
    fn descendants_of_the_targets() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let me = std::process::id();
        let proc = Path::new("/proc");
        assert!(descends_from(proc, child.id(), &HashSet::from([me])));
        // Not the target itself, not an unrelated process, not one that is gone.
        assert!(!descends_from(proc, me, &HashSet::from([me])));
        assert!(!descends_from(proc, 1, &HashSet::from([me])));
        assert!(!descends_from(proc, child.id(), &HashSet::new()));
        let _ = child.kill();
        let _ = child.wait();
        assert!(!descends_from(proc, child.id(), &HashSet::from([me])));
        // A missing /proc tree: no.
        assert!(!descends_from(
            Path::new("/nonexistent"),
            me,
            &HashSet::from([1])
        ));
    }

    #[tokio::test]
    async fn failing_gpu_source_empties_families_without_ending() {
        let r = Registry::new();
        let (_targets_tx, targets_rx) = watch::channel(vec![target(5, "vm")]);
        let (stop_tx, stop_rx) = watch::channel(false);
        let calls = Arc::new(AtomicUsize::new(0));
        let source = FakeSource {
            readings: None,
            calls: calls.clone(),
            xids: None,
        };
        let task = tokio::spawn(run_gpu(
            move || Ok(Box::new(source) as Box<dyn GpuSource>),
            Duration::from_millis(20),
            r.clone(),
            WorkerMap::default(),
            targets_rx,
            stop_rx,
        ));
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(
            calls.load(Ordering::SeqCst) >= 3,
            "keeps retrying each interval"
        );
        assert!(samples(&r, "GPUUtilization").is_empty());
        assert!(!task.is_finished());
        stop_tx.send_replace(true);
        let ended = tokio::time::timeout(Duration::from_secs(5), task).await;
        assert!(matches!(ended, Ok(Ok(Ok(())))), "{ended:?}");
    }

    /// The agent's path on this machine (no NVIDIA driver): NVML does not open, GPU families keep
    /// HELP/TYPE only, and the task idles until shutdown.
    #[tokio::test]
    async fn absent_nvml_leaves_gpu_families_empty_until_shutdown() {
        if std::path::Path::new("/dev/nvidiactl").exists() {
            return; // a GPU host: covered by nvml::tests::absent_library_is_an_error_value
        }
        let r = Registry::new();
        let (_targets_tx, targets_rx) = watch::channel(vec![target(5, "vm")]);
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run_gpu(
            nvml::open_nvml,
            Duration::from_millis(10),
            r.clone(),
            WorkerMap::default(),
            targets_rx,
            stop_rx,
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!task.is_finished(), "idles instead of ending");
        for family in ["GPUUtilization", "GPUMemoryUtilization", "GPUMemoryUsed"] {
            assert_eq!(family_text(&r, family).len(), 2, "{family}: HELP/TYPE only");
        }
        stop_tx.send_replace(true);
        let ended = tokio::time::timeout(Duration::from_secs(5), task).await;
        assert!(matches!(ended, Ok(Ok(Ok(())))), "{ended:?}");
    }

    #[tokio::test]
    async fn system_sampler_task_publishes_and_stops() {
        let (d, proc) = fixture();
        let r = Registry::new();
        let (targets_tx, targets_rx) = watch::channel(Vec::new());
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run_system_on(
            proc,
            Duration::from_millis(300),
            r.clone(),
            targets_rx,
            stop_rx,
        ));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(samples(&r, "MemoryUsed").is_empty(), "no target yet");
        targets_tx.send_replace(vec![target(10, "vm")]);
        // Memory at once (polled: a loaded machine may be slow to run the task); CPU only after a
        // full interval since the baseline.
        let deadline = Instant::now() + Duration::from_millis(250);
        while samples(&r, "MemoryUsed").is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(samples(&r, "MemoryUsed").len(), 1);
        assert!(samples(&r, "CPUUtilization").is_empty());
        fs::write(d.path().join("stat"), stat(600, 1400)).expect("write");
        let deadline = Instant::now() + Duration::from_secs(5);
        while samples(&r, "CPUUtilization").is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The first CPU figure spans baseline → first tick, which saw the rewritten stat.
        assert_eq!(
            samples(&r, "CPUUtilization"),
            ["CPUUtilization{Level=\"Host\",Hostname=\"vm\",} 50.0"]
        );
        targets_tx.send_replace(Vec::new());
        let deadline = Instant::now() + Duration::from_secs(5);
        while !samples(&r, "CPUUtilization").is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(samples(&r, "CPUUtilization").is_empty());
        stop_tx.send_replace(true);
        let ended = tokio::time::timeout(Duration::from_secs(5), task).await;
        assert!(matches!(ended, Ok(Ok(Ok(())))), "{ended:?}");
    }
}
