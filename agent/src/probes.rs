//! Loads the eBPF object built from `ebpf/sockets.bpf.c`, attaches its tracepoints, and owns its maps.

use std::path::Path;

use anyhow::{Context, bail};
use aya::{
    Ebpf, EbpfLoader, include_bytes_aligned,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
};

use crate::events::{ConnKey, LOSS_REASONS, TARGET_TRACED, TARGET_WORKER};

/// How often the reader drains the ring buffer without being woken (the kernel wakes it only when an
/// eighth of the ring is waiting: one wakeup per record would cost more than the tracing itself).
pub const DRAIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(10);

/// The compiled object, embedded at build time by `agent/build.rs`.
static OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sockets.bpf.o"));

/// (program, syscall tracepoint) pairs; every one must load and attach.
pub const PROGRAMS: [(&str, &str); 21] = [
    ("ss_enter_read", "sys_enter_read"),
    ("ss_exit_read", "sys_exit_read"),
    ("ss_enter_readv", "sys_enter_readv"),
    ("ss_exit_readv", "sys_exit_readv"),
    ("ss_enter_recvfrom", "sys_enter_recvfrom"),
    ("ss_exit_recvfrom", "sys_exit_recvfrom"),
    ("ss_enter_recvmsg", "sys_enter_recvmsg"),
    ("ss_exit_recvmsg", "sys_exit_recvmsg"),
    ("ss_enter_write", "sys_enter_write"),
    ("ss_exit_write", "sys_exit_write"),
    ("ss_enter_writev", "sys_enter_writev"),
    ("ss_exit_writev", "sys_exit_writev"),
    ("ss_enter_sendto", "sys_enter_sendto"),
    ("ss_exit_sendto", "sys_exit_sendto"),
    ("ss_enter_sendmsg", "sys_enter_sendmsg"),
    ("ss_exit_sendmsg", "sys_exit_sendmsg"),
    ("ss_enter_sendfile", "sys_enter_sendfile64"),
    ("ss_exit_sendfile", "sys_exit_sendfile64"),
    ("ss_exit_accept", "sys_exit_accept"),
    ("ss_exit_accept4", "sys_exit_accept4"),
    ("ss_enter_close", "sys_enter_close"),
];

const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";
const TRACEFS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// Loaded and attached programs with the maps the agent drives. Dropping it detaches everything.
pub struct Probes {
    /// Keeps programs and links alive.
    _ebpf: Ebpf,
    targets: HashMap<MapData, u32, u32>,
    conns: HashMap<MapData, ConnKey, [u8; 16]>,
    losses: PerCpuArray<MapData, u64>,
    ring: Option<RingBuf<MapData>>,
}

/// Checks what the kernel must offer before loading, so the error names the fix.
pub fn preflight() -> anyhow::Result<()> {
    if !Path::new(BTF_PATH).exists() {
        bail!(
            "{BTF_PATH} is missing: servescope needs a kernel built with CONFIG_DEBUG_INFO_BTF=y (Linux 5.8+; \
             standard on current Debian, Ubuntu, RHEL and GKE/EKS/AKS node images)"
        );
    }
    let tracefs: Vec<std::io::Result<std::fs::Metadata>> = TRACEFS
        .iter()
        .map(|t| std::fs::metadata(Path::new(t).join("events/syscalls")))
        .collect();
    if !tracefs.iter().any(Result::is_ok) {
        // tracefs is often mounted but unreadable to a confined, non-root agent: say which it is.
        if tracefs.iter().any(|r| {
            r.as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied)
        }) {
            bail!(
                "tracefs is mounted but not readable (permission denied): run as root, or grant \
                 CAP_DAC_READ_SEARCH (see deploy/ for the DaemonSet and systemd settings)"
            );
        }
        bail!(
            "tracefs is not mounted, so syscall tracepoints cannot be attached: run \
             `mount -t tracefs tracefs /sys/kernel/tracing` (in Kubernetes, mount the host's \
             /sys/kernel/tracing into the pod)"
        );
    }
    Ok(())
}

impl Probes {
    /// Loads the object and attaches every program; any failure names the program and the fix.
    pub fn load(ringbuf_bytes: u32) -> anyhow::Result<Self> {
        preflight()?;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("events", ringbuf_bytes)
            // TorchServe's frontend writes each job to its worker over a Unix socket: the frame's
            // request ids time the end of the queue (otf.rs).
            .override_global("trace_unix", &1u8, true)
            // Wake the reader early only when an eighth of the ring is waiting; it also drains on
            // its own every DRAIN_INTERVAL, so records wait at most that long.
            .override_global("wakeup_bytes", &u64::from(ringbuf_bytes / 8), true)
            .load(OBJECT)
            .context(
                "loading the eBPF object failed: servescope needs root (or CAP_BPF + CAP_PERFMON), a kernel \
                 with BTF and BPF ring buffers (5.8+), and no lockdown in confidentiality mode",
            )?;
        for (prog, tracepoint) in PROGRAMS {
            attach(&mut ebpf, prog, tracepoint)?;
        }
        let targets = HashMap::try_from(take(&mut ebpf, "targets")?).context("map `targets`")?;
        let conns = HashMap::try_from(take(&mut ebpf, "conns")?).context("map `conns`")?;
        let losses = PerCpuArray::try_from(take(&mut ebpf, "losses")?).context("map `losses`")?;
        let ring = RingBuf::try_from(take(&mut ebpf, "events")?).context("map `events`")?;
        Ok(Probes {
            _ebpf: ebpf,
            targets,
            conns,
            losses,
            ring: Some(ring),
        })
    }

    /// Hands the ring buffer to its reader (once).
    pub fn take_ring(&mut self) -> Option<RingBuf<MapData>> {
        self.ring.take()
    }

    /// Starts tracing `tgid`.
    pub fn add_target(&mut self, tgid: u32) -> anyhow::Result<()> {
        self.targets
            .insert(tgid, TARGET_TRACED, 0)
            .with_context(|| format!("adding pid {tgid} to the kernel's target map"))
    }

    /// Starts tracing a TorchServe worker: its sockets and, unlike other targets, its pipe writes
    /// (the `[METRICS]` lines on its stdout).
    pub fn add_worker(&mut self, tgid: u32) -> anyhow::Result<()> {
        self.targets
            .insert(tgid, TARGET_TRACED | TARGET_WORKER, 0)
            .with_context(|| format!("adding worker pid {tgid} to the kernel's target map"))
    }

    /// Stops tracing `tgid` and frees its connections' kernel state.
    pub fn remove_target(&mut self, tgid: u32) -> anyhow::Result<()> {
        match self.targets.remove(&tgid) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => {
                return Err(e).with_context(|| format!("removing pid {tgid} from the target map"));
            }
        }
        let stale: Vec<ConnKey> = self
            .conns
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.tgid == tgid)
            .collect();
        for k in stale {
            // A concurrent close may already have removed it.
            let _ = self.conns.remove(&k);
        }
        Ok(())
    }

    /// Kernel connection-map entries of `tgid` (tests and diagnostics).
    pub fn kernel_conns_of(&self, tgid: u32) -> usize {
        self.conns
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.tgid == tgid)
            .count()
    }

    /// Totals of the kernel's per-CPU loss counters, by reason name.
    pub fn losses(&self) -> Vec<(&'static str, u64)> {
        LOSS_REASONS
            .iter()
            .map(|&(idx, name)| {
                let total = self
                    .losses
                    .get(&idx, 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0);
                (name, total)
            })
            .collect()
    }
}

fn take(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<aya::maps::Map> {
    ebpf.take_map(name)
        .with_context(|| format!("the eBPF object has no map `{name}` (build mismatch)"))
}

fn attach(ebpf: &mut Ebpf, prog: &str, tracepoint: &str) -> anyhow::Result<()> {
    let p: &mut TracePoint = ebpf
        .program_mut(prog)
        .with_context(|| format!("the eBPF object has no program `{prog}` (build mismatch)"))?
        .try_into()
        .with_context(|| format!("program `{prog}` is not a tracepoint"))?;
    p.load().with_context(|| {
        format!("the kernel rejected program `{prog}` (verifier or permissions)")
    })?;
    p.attach("syscalls", tracepoint)
        .with_context(|| format!("attaching `{prog}` to tracepoint syscalls:{tracepoint}"))?;
    Ok(())
}
