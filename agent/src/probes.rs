//! Loads the eBPF object built from `ebpf/sockets.bpf.c`, attaches its tracepoints, and owns its maps.

use std::{
    collections::HashMap as StdHashMap,
    num::NonZeroU32,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context, bail};
use aya::{
    Btf, Ebpf, EbpfLoader, include_bytes_aligned,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        BtfTracePoint, TracePoint, UProbe,
        tp_btf::BtfTracePointLink,
        trace_point::TracePointLink,
        uprobe::{UProbeAttachLocation, UProbeLink, UProbeScope},
    },
};

use aya_obj::btf::BtfKind;
use serde::Serialize;

use crate::events::{
    ConnKey, LOSS_REASONS, PID_LIMIT, TARGET_TRACED, TARGET_WORKER, target_bits_slot,
};

/// How often the reader drains the ring buffer without being woken while records come (the kernel wakes
/// it only when an eighth of the ring is waiting: one wakeup per record would cost more than the tracing
/// itself). After silence the reader backs off (pipeline::DrainPause). Each timer wakeup costs the
/// agent tens of µs (timer, epoll, two context switches; hypervisor traps in a VM): at 10 ms they were
/// two thirds of its CPU under TorchServe (37-39 → 10-13 µs per request at 80 ms, docs/decisions.md
/// R26). Values carry the kernel's timestamps, so only how soon a count shows depends on this.
pub const DRAIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// The compiled objects, embedded at build time by `agent/build.rs`: the same source with a thread's
/// syscall state in task-local storage, and in an LRU hash for older kernels.
static OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sockets.bpf.o"));
static OBJECT_COMPAT: &[u8] =
    include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sockets_compat.bpf.o"));

/// Where the kernel programs keep a thread's state between a syscall's entry and its exit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ThreadState {
    /// Task-local storage if the kernel allows it in tracepoint programs, else the hash map.
    #[default]
    Auto,
    /// Task-local storage: no hashing and no delete per syscall (about half the cost per traced
    /// syscall, bench/RESULTS.md).
    TaskStorage,
    /// An LRU hash keyed by thread: works on every supported kernel (5.8+).
    Hash,
}

impl ThreadState {
    pub fn as_str(self) -> &'static str {
        match self {
            ThreadState::Auto => "auto",
            ThreadState::TaskStorage => "task-storage",
            ThreadState::Hash => "hash",
        }
    }
}

/// Where the kernel programs see the traced sockets' data (docs/decisions.md R39).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DataHooks {
    /// `sockets` where the kernel has them and no server is given by `--port`/`--pid`, else
    /// `syscalls`.
    #[default]
    Auto,
    /// Syscall tracepoints on read/write and the other data syscalls: every such call of every
    /// process on the host runs a program, which returns at once for the untraced ones. Keeps a
    /// blocking write's start (time to first byte) for servers given by `--port`/`--pid`.
    Syscalls,
    /// The `sock_send_length`/`sock_recv_length` tracepoints (Linux 6.3+), which fire for socket
    /// traffic only, plus a uprobe on libc's `write` in each TorchServe worker for its `[METRICS]`
    /// pipe. A response is stamped when its last write returned.
    Sockets,
}

impl DataHooks {
    pub fn as_str(self) -> &'static str {
        match self {
            DataHooks::Auto => "auto",
            DataHooks::Syscalls => "syscalls",
            DataHooks::Sockets => "sockets",
        }
    }

    /// What `Auto` means here: sockets when the kernel has the tracepoints, nothing needs a
    /// write's entry (`write_entries`: a server given by `--port`/`--pid`, R10) and the agent can
    /// attach the TorchServe workers' uprobes (`worker_uprobes`, [`may_attach_uprobes`]).
    pub fn resolve(self, write_entries: bool, worker_uprobes: bool) -> DataHooks {
        self.resolve_with(write_entries, worker_uprobes, socket_hooks_supported)
    }

    /// [`DataHooks::resolve`] with the kernel's answer from `supported`, asked only if it matters.
    fn resolve_with(
        self,
        write_entries: bool,
        worker_uprobes: bool,
        supported: impl FnOnce() -> bool,
    ) -> DataHooks {
        match self {
            DataHooks::Auto if !write_entries && worker_uprobes && supported() => {
                DataHooks::Sockets
            }
            DataHooks::Auto => DataHooks::Syscalls,
            chosen => chosen,
        }
    }
}

/// The socket tracepoints this kernel's BTF describes ([`DataHooks::Sockets`] needs both, and
/// `bpf_task_pt_regs` for the call's arguments, which every 6.3 kernel has).
const SOCKET_TRACEPOINTS: [&str; 2] = ["sock_send_length", "sock_recv_length"];

/// Whether the agent will be able to attach a uprobe after load, as [`DataHooks::Sockets`] does for
/// each TorchServe worker: the kernel asks for CAP_SYS_ADMIN there (CAP_PERFMON no longer suffices
/// since "perf: Require CAP_SYS_ADMIN for uprobes", 2025, backported to stable kernels), and the
/// agent keeps that capability after load when it was granted (privileges.rs).
pub fn may_attach_uprobes() -> bool {
    caps::has_cap(
        None,
        caps::CapSet::Effective,
        caps::Capability::CAP_SYS_ADMIN,
    )
    .unwrap_or(false)
}

/// Whether this kernel has the tracepoints of [`DataHooks::Sockets`] (6.3+): looked up in its BTF,
/// where each tracepoint has a `btf_trace_<name>` typedef.
pub fn socket_hooks_supported() -> bool {
    socket_hooks_in(Path::new(BTF_PATH))
}

/// [`socket_hooks_supported`] of the kernel whose BTF is at `btf` (the doctor's fixtures).
pub fn socket_hooks_in(btf: &Path) -> bool {
    Btf::parse_file(btf, aya::Endianness::default()).is_ok_and(|btf| has_socket_tracepoints(&btf))
}

fn has_socket_tracepoints(btf: &Btf) -> bool {
    SOCKET_TRACEPOINTS.iter().all(|tp| {
        btf.id_by_type_name_kind(&format!("btf_trace_{tp}"), BtfKind::Typedef)
            .is_ok()
    })
}

/// Which programs a run needs: those of the other classes are not even loaded, so their syscalls
/// cost nothing anywhere on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    Always,
    /// The exits of read/readv/write/writev/sendfile: the data path of [`DataHooks::Syscalls`].
    SyscallData,
    /// The socket tracepoints: the data path of [`DataHooks::Sockets`], and the end of a TCP
    /// connection there (`inet_sock_set_state`, `tcp_destroy_sock`). Every syscall data program (this and the classes
    /// below) is off then.
    SocketData,
    /// accept/accept4/close/dup2/dup3: where a connection of [`DataHooks::Syscalls`] begins and
    /// ends. The socket hooks tell a new connection by its socket and see its end in its TCP state,
    /// so that with them no syscall tracepoint at all is attached for TorchServe (any one puts every
    /// syscall of every process on the kernel's slow path).
    SyscallLifecycle,
    /// dup2(), of [`Need::SyscallLifecycle`]: a syscall of x86-64 alone. arm64 has only dup3,
    /// which its C libraries' dup2() calls, so there is no `sys_enter_dup2` to attach to.
    Dup2,
    /// recvfrom/sendto/recvmsg/sendmsg: servers found by `--port` may use them. TorchServe's frontend
    /// (Netty, JVM) reads and writes with read/readv/write/writev only, and its workers' socket
    /// reads are not needed (the kernel walks the frontend's frames), so without `--port` these
    /// programs — ~25 runs per request from a Python worker's field-by-field reads — stay out.
    SocketCalls,
    /// listen(): discovery by `--port`, with the syscall hooks (the socket hooks see it as a TCP
    /// state change, in `ss_sock_state`).
    Listen,
    /// The entry of read/readv: only on kernels without `bpf_task_pt_regs` (before 5.15). Elsewhere
    /// a read is decided at its exit from the saved registers: it needs no entry time, and one
    /// program run instead of two is what every read of every process on the host pays
    /// (docs/decisions.md R34).
    ReadEntry,
    /// The entry of recvfrom/recvmsg: both [`Need::SocketCalls`] and [`Need::ReadEntry`].
    SocketCallsReadEntry,
    /// The entry of write/writev/sendfile: where a response's write began ([`LoadOptions::write_entries`]).
    WriteEntry,
    /// The entry of sendto/sendmsg: both [`Need::SocketCalls`] and [`Need::WriteEntry`].
    SocketCallsWriteEntry,
}

/// A program's attach point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// A tracefs tracepoint: (category, name).
    Tracepoint(&'static str, &'static str),
    /// A BTF-typed raw tracepoint (`tp_btf`), by name.
    Btf(&'static str),
}

/// (program, attach point, when needed); every needed one must load and attach. The uprobe of
/// [`DataHooks::Sockets`] (`ss_worker_write`) is not here: it is attached per worker
/// ([`Probes::add_worker`]).
pub const PROGRAMS: [(&str, Hook, Need); 30] = [
    (
        "ss_enter_read",
        Hook::Tracepoint("syscalls", "sys_enter_read"),
        Need::ReadEntry,
    ),
    (
        "ss_exit_read",
        Hook::Tracepoint("syscalls", "sys_exit_read"),
        Need::SyscallData,
    ),
    (
        "ss_enter_readv",
        Hook::Tracepoint("syscalls", "sys_enter_readv"),
        Need::ReadEntry,
    ),
    (
        "ss_exit_readv",
        Hook::Tracepoint("syscalls", "sys_exit_readv"),
        Need::SyscallData,
    ),
    (
        "ss_enter_recvfrom",
        Hook::Tracepoint("syscalls", "sys_enter_recvfrom"),
        Need::SocketCallsReadEntry,
    ),
    (
        "ss_exit_recvfrom",
        Hook::Tracepoint("syscalls", "sys_exit_recvfrom"),
        Need::SocketCalls,
    ),
    (
        "ss_enter_recvmsg",
        Hook::Tracepoint("syscalls", "sys_enter_recvmsg"),
        Need::SocketCallsReadEntry,
    ),
    (
        "ss_exit_recvmsg",
        Hook::Tracepoint("syscalls", "sys_exit_recvmsg"),
        Need::SocketCalls,
    ),
    (
        "ss_enter_write",
        Hook::Tracepoint("syscalls", "sys_enter_write"),
        Need::WriteEntry,
    ),
    (
        "ss_exit_write",
        Hook::Tracepoint("syscalls", "sys_exit_write"),
        Need::SyscallData,
    ),
    (
        "ss_enter_writev",
        Hook::Tracepoint("syscalls", "sys_enter_writev"),
        Need::WriteEntry,
    ),
    (
        "ss_exit_writev",
        Hook::Tracepoint("syscalls", "sys_exit_writev"),
        Need::SyscallData,
    ),
    (
        "ss_enter_sendto",
        Hook::Tracepoint("syscalls", "sys_enter_sendto"),
        Need::SocketCallsWriteEntry,
    ),
    (
        "ss_exit_sendto",
        Hook::Tracepoint("syscalls", "sys_exit_sendto"),
        Need::SocketCalls,
    ),
    (
        "ss_enter_sendmsg",
        Hook::Tracepoint("syscalls", "sys_enter_sendmsg"),
        Need::SocketCallsWriteEntry,
    ),
    (
        "ss_exit_sendmsg",
        Hook::Tracepoint("syscalls", "sys_exit_sendmsg"),
        Need::SocketCalls,
    ),
    (
        "ss_enter_sendfile",
        Hook::Tracepoint("syscalls", "sys_enter_sendfile64"),
        Need::WriteEntry,
    ),
    (
        "ss_exit_sendfile",
        Hook::Tracepoint("syscalls", "sys_exit_sendfile64"),
        Need::SyscallData,
    ),
    (
        "ss_sock_send",
        Hook::Btf("sock_send_length"),
        Need::SocketData,
    ),
    (
        "ss_sock_recv",
        Hook::Btf("sock_recv_length"),
        Need::SocketData,
    ),
    (
        "ss_sock_state",
        Hook::Btf("inet_sock_set_state"),
        Need::SocketData,
    ),
    (
        "ss_sock_destroy",
        Hook::Btf("tcp_destroy_sock"),
        Need::SocketData,
    ),
    (
        "ss_exit_accept",
        Hook::Tracepoint("syscalls", "sys_exit_accept"),
        Need::SyscallLifecycle,
    ),
    (
        "ss_exit_accept4",
        Hook::Tracepoint("syscalls", "sys_exit_accept4"),
        Need::SyscallLifecycle,
    ),
    (
        "ss_enter_close",
        Hook::Tracepoint("syscalls", "sys_enter_close"),
        Need::SyscallLifecycle,
    ),
    (
        "ss_enter_dup2",
        Hook::Tracepoint("syscalls", "sys_enter_dup2"),
        Need::Dup2,
    ),
    (
        "ss_enter_dup3",
        Hook::Tracepoint("syscalls", "sys_enter_dup3"),
        Need::SyscallLifecycle,
    ),
    (
        "ss_enter_listen",
        Hook::Tracepoint("syscalls", "sys_enter_listen"),
        Need::Listen,
    ),
    (
        "ss_exec",
        Hook::Tracepoint("sched", "sched_process_exec"),
        Need::Always,
    ),
    (
        "ss_exit",
        Hook::Tracepoint("sched", "sched_process_exit"),
        Need::Always,
    ),
];

/// What to load the programs with.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Ring-buffer size in bytes (a power of two).
    pub ringbuf_bytes: u32,
    pub thread_state: ThreadState,
    /// Report every exec on the host (TorchServe discovery by command line).
    pub watch_exec: bool,
    /// Report every listen() on a TCP socket (discovery by `--port`).
    pub watch_listen: bool,
    /// Trace recvfrom/sendto/recvmsg/sendmsg too ([`Need::SocketCalls`]): needed for servers found
    /// by `--port`, not for TorchServe.
    pub socket_calls: bool,
    /// Attach the entry programs of the read syscalls ([`Need::ReadEntry`]): a property of the
    /// kernel, [`read_entries_needed`].
    pub read_entries: bool,
    /// Attach the entry programs of the write syscalls ([`Need::WriteEntry`]). They stamp a response
    /// when its write began, which differs from when it returned only if the write blocks: a
    /// thread-per-connection server sending more than the socket buffer holds to a slow client
    /// (time to first byte, docs/decisions.md R10). TorchServe's frontend (Netty) writes without
    /// blocking, and ~35 writes per request, most of them log lines, then run one program instead of
    /// two (R35). Kernels before 5.15 attach them regardless ([`read_entries_needed`]): there the
    /// exit cannot decide a call from the saved registers.
    pub write_entries: bool,
    /// Where the data is seen; `Auto` is resolved at load ([`DataHooks::resolve`] with
    /// `write_entries` and `worker_uprobes`).
    pub data_hooks: DataHooks,
    /// The agent can attach uprobes after load ([`may_attach_uprobes`]).
    pub worker_uprobes: bool,
    /// Every program returns at once (`--hooks-only`): the hooks' own cost, nothing traced.
    pub hooks_only: bool,
}

impl LoadOptions {
    /// Whether a program of class `need` is loaded and attached.
    pub fn needs(&self, need: Need) -> bool {
        let syscalls = self.data_hooks != DataHooks::Sockets;
        match need {
            Need::Always => true,
            Need::SocketData => !syscalls,
            _ if !syscalls => false,
            // With the socket hooks, ss_sock_state sees listen() (the socket's TCP_LISTEN state).
            Need::Listen => self.watch_listen,
            Need::SyscallData | Need::SyscallLifecycle => true,
            Need::Dup2 => cfg!(target_arch = "x86_64"),
            Need::SocketCalls => self.socket_calls,
            Need::ReadEntry => self.read_entries,
            Need::SocketCallsReadEntry => self.socket_calls && self.read_entries,
            Need::WriteEntry => self.write_entries || self.read_entries,
            Need::SocketCallsWriteEntry => {
                self.socket_calls && (self.write_entries || self.read_entries)
            }
        }
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            ringbuf_bytes: 4 * 1024 * 1024,
            thread_state: ThreadState::Auto,
            watch_exec: true,
            watch_listen: true,
            socket_calls: true,
            read_entries: read_entries_needed(),
            write_entries: true,
            data_hooks: DataHooks::Auto,
            worker_uprobes: true,
            hooks_only: false,
        }
    }
}

/// Whether this kernel lacks `bpf_task_pt_regs` (added in 5.15), with which the exit programs read a
/// syscall's arguments from the saved registers. An unreadable version counts as old: attaching the
/// entry programs is correct everywhere, only slower.
pub fn read_entries_needed() -> bool {
    !aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(5, 15, 0))
}

const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";
const TRACEFS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// Loaded and attached programs with the maps the agent drives. Dropping it detaches everything.
pub struct Probes {
    /// Keeps programs and maps alive.
    ebpf: Ebpf,
    /// The attachments, owned here so that dropping [`Probes`] detaches them all at once (see Drop).
    links: Vec<Link>,
    /// [`DataHooks::Auto`] resolved.
    data_hooks: DataHooks,
    /// With [`DataHooks::Sockets`]: each traced worker's uprobe on its libc's `write`.
    worker_pipes: StdHashMap<u32, UProbeLink>,
    /// Workers whose uprobe is still to be attached, with the attempts made.
    pipes_pending: StdHashMap<u32, u32>,
    /// [`Probes::write_site`] by the libc's (device, inode).
    write_sites: StdHashMap<(u64, u64), u64>,
    targets: HashMap<MapData, u32, u32>,
    /// The same flags by TGID, two bits each (events.h): what every call on the host asks first.
    target_bits: Array<MapData, u64>,
    /// Bumped after every change to `targets`: threads re-check their process then (sockets.bpf.c).
    targets_gen: Array<MapData, u64>,
    thread_state: ThreadState,
    /// `struct conn_info` values, opaque here (only the keys are read).
    conns: HashMap<MapData, ConnKey, [u8; 32]>,
    /// `struct sk_conn` by socket address (the socket hooks): (tgid, fd) first.
    sk_conns: HashMap<MapData, u64, [u8; 16]>,
    losses: PerCpuArray<MapData, u64>,
    ring: Option<RingBuf<MapData>>,
    cost: LoadCost,
    /// Held while the kernel's run-time statistics are on for us ([`enable_run_stats`]).
    run_stats: Option<std::os::fd::OwnedFd>,
}

/// What loading cost: the verifier's work per program and the wall time of load and attach.
///
/// The verifier's processed-instruction count is what start-up time follows, and it is fragile:
/// a copied struct that hid one constant from clang made `ss_exit_write` 12× costlier to verify and
/// start-up 5× slower without changing what the program does (docs/decisions.md R34). `servescope
/// doctor` reports it, and tests/tests/doctor.rs holds it to a budget.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LoadCost {
    /// Every loaded program, by name.
    pub programs: Vec<ProgramCost>,
    /// Wall time of loading and attaching everything, in milliseconds.
    pub took_ms: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProgramCost {
    pub name: String,
    /// Instructions the verifier processed (`verified_insns`, Linux 5.16+; absent before).
    pub verified_insns: Option<u32>,
}

impl LoadCost {
    /// Instructions the verifier processed for all programs (those whose count the kernel reports).
    pub fn total_insns(&self) -> u64 {
        self.programs
            .iter()
            .filter_map(|p| p.verified_insns)
            .map(u64::from)
            .sum()
    }

    /// The program that cost the verifier most, when the kernel reports counts.
    pub fn costliest(&self) -> Option<(&str, u32)> {
        self.programs
            .iter()
            .filter_map(|p| Some((p.name.as_str(), p.verified_insns?)))
            .max_by_key(|&(_, n)| n)
    }

    /// Adds the programs of another load that this one did not have, and its time.
    pub fn merge(&mut self, other: &LoadCost) {
        for p in &other.programs {
            if !self.programs.iter().any(|q| q.name == p.name) {
                self.programs.push(p.clone());
            }
        }
        self.programs.sort_by(|a, b| a.name.cmp(&b.name));
        self.took_ms += other.took_ms;
    }

    /// One line for logs and `servescope doctor`.
    pub fn summary(&self) -> String {
        match self.costliest() {
            Some((name, most)) => format!(
                "{} programs in {} ms; the verifier processed {} instructions (most: {name}, {most})",
                self.programs.len(),
                self.took_ms,
                self.total_insns()
            ),
            None => format!(
                "{} programs in {} ms (this kernel does not report the verifier's work)",
                self.programs.len(),
                self.took_ms
            ),
        }
    }
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

/// Returns the heap that loading freed to the kernel. The kernel's BTF (~6 MB of file, ~15 MB
/// parsed) is parsed by aya's loader, or for the socket hooks by the agent in its place (the
/// `tp_btf` programs need it); glibc keeps what is freed in its heap (its trim threshold rises with
/// the largest block freed), so an agent on the socket hooks idled at 33–35 MB of RSS against 21 MB
/// on the syscall hooks, 12 MB of it free heap. Called before the ring buffer is mapped, so the
/// two never add up to the peak.
fn release_freed_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only hands free pages of glibc's own arenas back to the kernel; it touches
    // no memory the program holds and may be called at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

impl Probes {
    /// Loads the object and attaches every program; any failure names the program and the fix. With
    /// [`ThreadState::Auto`] a kernel that refuses the task-storage build gets the hash-map build.
    pub fn load(opts: LoadOptions) -> anyhow::Result<Self> {
        preflight()?;
        if opts.data_hooks == DataHooks::Sockets && !opts.worker_uprobes {
            tracing::warn!(
                "--data-hooks sockets without CAP_SYS_ADMIN: TorchServe workers' stdout uprobes \
                 cannot be attached, so HandlerTime and PredictionTime are not reported"
            );
        }
        // Parsed here only to choose, and dropped before loading: see load_object.
        let data_hooks = opts
            .data_hooks
            .resolve(opts.write_entries, opts.worker_uprobes);
        if opts.data_hooks == DataHooks::Sockets && !socket_hooks_supported() {
            bail!(
                "--data-hooks sockets needs the sock_send_length and sock_recv_length \
                 tracepoints (Linux 6.3+), which this kernel's BTF does not have: use \
                 --data-hooks auto or syscalls"
            );
        }
        let opts = LoadOptions { data_hooks, ..opts };
        match opts.thread_state {
            ThreadState::Auto => match Self::load_object(opts, ThreadState::TaskStorage) {
                Ok(probes) => Ok(probes),
                Err(e) => {
                    tracing::info!(
                        "task-local storage is not available to tracepoint programs on this kernel \
                         ({e:#}); keeping per-thread syscall state in a hash map instead"
                    );
                    Self::load_object(opts, ThreadState::Hash)
                }
            },
            chosen => Self::load_object(opts, chosen),
        }
    }

    fn load_object(opts: LoadOptions, thread_state: ThreadState) -> anyhow::Result<Self> {
        let started = Instant::now();
        let ringbuf_bytes = opts.ringbuf_bytes;
        let object = match thread_state {
            ThreadState::Hash => OBJECT_COMPAT,
            _ => OBJECT,
        };
        // The tp_btf programs of the socket hooks are loaded against the kernel's BTF, which aya
        // cannot lend out of the loader; `EbpfLoader::new()` always parses a copy of its own for
        // CO-RE (~15 MB of heap). The loader's copy is dropped before ours is parsed, so that one
        // copy is alive at a time: with both, the agent's peak RSS was ~43 MB for a steady ~20.
        let kernel_btf: Option<Btf>;
        let mut ebpf = {
            let mut loader = EbpfLoader::new();
            if opts.data_hooks == DataHooks::Sockets {
                loader.btf(None);
                kernel_btf = Btf::from_sys_fs().ok();
                loader.btf(kernel_btf.as_ref());
            } else {
                kernel_btf = None;
            }
            loader
                // aya creates task-storage maps but has no typed wrapper for them (only the kernel
                // uses `tstate`).
                .allow_unsupported_maps()
                .map_max_entries("events", ringbuf_bytes)
                // TorchServe's frontend writes each job to its worker over a Unix socket: the
                // frame's request ids time the end of the queue (otf.rs).
                .override_global("trace_unix", &1u8, true)
                // Wake the reader early only when an eighth of the ring is waiting; it also drains
                // on its own every DRAIN_INTERVAL, so records wait at most that long.
                .override_global("wakeup_bytes", &u64::from(ringbuf_bytes / 8), true)
                // Discovery by events instead of polling /proc (pipeline::discover).
                .override_global("watch_exec", &u8::from(opts.watch_exec), true)
                .override_global("watch_listen", &u8::from(opts.watch_listen), true)
                .override_global("hooks_only", &u8::from(opts.hooks_only), true)
                .load(object)
                .context(
                    "loading the eBPF object failed: servescope needs root (or CAP_BPF + \
                     CAP_PERFMON), a kernel with BTF and BPF ring buffers (5.8+), and no lockdown \
                     in confidentiality mode",
                )?
        };
        let btf = kernel_btf.as_ref();
        let mut links = Vec::with_capacity(PROGRAMS.len());
        for (prog, hook, need) in PROGRAMS {
            if opts.needs(need) {
                links.push(attach(&mut ebpf, prog, hook, btf)?);
            }
        }
        if opts.data_hooks == DataHooks::Sockets {
            // Loaded now, so that a rejection stops the agent at start; attached per worker.
            let p: &mut UProbe = program(&mut ebpf, WORKER_WRITE)?
                .try_into()
                .with_context(|| format!("program `{WORKER_WRITE}` is not a uprobe"))?;
            p.load().with_context(|| {
                format!("the kernel rejected program `{WORKER_WRITE}` (verifier or permissions)")
            })?;
        }
        // Before the ring buffer is mapped (its pages, twice its size, count in RSS at once), so
        // that the freed BTF and the mapped ring are never in RSS together: the peak.
        drop(kernel_btf);
        release_freed_heap();
        let targets = HashMap::try_from(take(&mut ebpf, "targets")?).context("map `targets`")?;
        let target_bits =
            Array::try_from(take(&mut ebpf, "target_bits")?).context("map `target_bits`")?;
        let targets_gen =
            Array::try_from(take(&mut ebpf, "targets_gen")?).context("map `targets_gen`")?;
        let conns = HashMap::try_from(take(&mut ebpf, "conns")?).context("map `conns`")?;
        let sk_conns = HashMap::try_from(take(&mut ebpf, "sk_conns")?).context("map `sk_conns`")?;
        let losses = PerCpuArray::try_from(take(&mut ebpf, "losses")?).context("map `losses`")?;
        let ring = RingBuf::try_from(take(&mut ebpf, "events")?).context("map `events`")?;
        let mut programs: Vec<ProgramCost> = loaded_programs(&ebpf)
            .map(|(name, info)| ProgramCost {
                name: name.to_owned(),
                verified_insns: info.verified_instruction_count(),
            })
            .collect();
        programs.sort_by(|a, b| a.name.cmp(&b.name));
        let cost = LoadCost {
            programs,
            took_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        };
        tracing::debug!(
            thread_state = thread_state.as_str(),
            data_hooks = opts.data_hooks.as_str(),
            "eBPF programs attached"
        );
        Ok(Probes {
            ebpf,
            links,
            data_hooks: opts.data_hooks,
            worker_pipes: StdHashMap::new(),
            pipes_pending: StdHashMap::new(),
            write_sites: StdHashMap::new(),
            targets,
            target_bits,
            targets_gen,
            thread_state,
            conns,
            sk_conns,
            losses,
            ring: Some(ring),
            cost,
            run_stats: None,
        })
    }

    /// What loading these programs cost ([`LoadCost`]).
    pub fn load_cost(&self) -> &LoadCost {
        &self.cost
    }

    /// Where the loaded programs see the data ([`DataHooks::Auto`] resolved).
    pub fn data_hooks(&self) -> DataHooks {
        self.data_hooks
    }

    /// Where the loaded programs keep per-thread state ([`ThreadState::Auto`] resolved).
    pub fn thread_state(&self) -> ThreadState {
        self.thread_state
    }

    /// Tells the programs that `targets` changed, so every thread re-checks its process.
    fn bump_targets_gen(&mut self) -> anyhow::Result<()> {
        let generation = self.targets_gen.get(&0, 0).context("reading targets_gen")?;
        self.targets_gen
            .set(0, generation.wrapping_add(1), 0)
            .context("updating targets_gen")
    }

    /// Hands the ring buffer to its reader (once).
    pub fn take_ring(&mut self) -> Option<RingBuf<MapData>> {
        self.ring.take()
    }

    /// Sets `tgid`'s flags in `target_bits` (0: not traced). Only this process writes the array,
    /// one word at a time, so the read-modify-write races with nothing.
    fn set_target_bits(&mut self, tgid: u32, flags: u32) -> anyhow::Result<()> {
        anyhow::ensure!(
            tgid < PID_LIMIT,
            "pid {tgid} is past the kernel's PID_MAX_LIMIT"
        );
        let (word, shift) = target_bits_slot(tgid);
        let old = self
            .target_bits
            .get(&word, 0)
            .context("reading target_bits")?;
        let new = (old & !(0b11 << shift)) | (u64::from(flags) << shift);
        self.target_bits
            .set(word, new, 0)
            .context("updating target_bits")
    }

    /// Starts tracing `tgid` with `flags`: `targets` and its bits, then the generation, which makes
    /// every thread decide again (one that asked in between saw an untraced process).
    fn add_with_flags(&mut self, tgid: u32, flags: u32) -> anyhow::Result<()> {
        self.targets
            .insert(tgid, flags, 0)
            .with_context(|| format!("adding pid {tgid} to the kernel's target map"))?;
        self.set_target_bits(tgid, flags)?;
        self.bump_targets_gen()
    }

    /// Starts tracing `tgid`.
    pub fn add_target(&mut self, tgid: u32) -> anyhow::Result<()> {
        self.add_with_flags(tgid, TARGET_TRACED)
    }

    /// Starts tracing a TorchServe worker: its sockets and, unlike other targets, its pipe writes
    /// (the `[METRICS]` lines on its stdout).
    pub fn add_worker(&mut self, tgid: u32) -> anyhow::Result<()> {
        self.add_with_flags(tgid, TARGET_TRACED | TARGET_WORKER)
            .context("adding a worker")?;
        if self.data_hooks == DataHooks::Sockets && !self.worker_pipes.contains_key(&tgid) {
            self.try_worker_pipe(tgid, 0);
        }
        Ok(())
    }

    /// Attaches the uprobe of each worker whose earlier attempt failed ([`Probes::add_worker`]);
    /// the agent's housekeeping calls this once a second. A worker found right after its exec may
    /// not have mapped its libc yet.
    pub fn retry_worker_pipes(&mut self) {
        let pending: Vec<(u32, u32)> = self.pipes_pending.drain().collect();
        for (tgid, tries) in pending {
            self.try_worker_pipe(tgid, tries);
        }
    }

    /// One attempt at worker `tgid`'s uprobe, after `tries` failed ones. After [`PIPE_ATTEMPTS`],
    /// or once the process is gone, it gives up: the worker is still traced, only its `[METRICS]`
    /// lines (HandlerTime, PredictionTime) are missed, which the warning says.
    fn try_worker_pipe(&mut self, tgid: u32, tries: u32) {
        match self.attach_worker_pipe(tgid) {
            Ok(link) => {
                self.worker_pipes.insert(tgid, link);
                tracing::debug!(pid = tgid, "worker stdout uprobe attached");
            }
            Err(e)
                if tries + 1 >= PIPE_ATTEMPTS || !Path::new(&format!("/proc/{tgid}")).exists() =>
            {
                tracing::warn!(
                    pid = tgid,
                    error = format!("{e:#}"),
                    "cannot see this worker's stdout: its HandlerTime and PredictionTime are \
                     not reported"
                );
            }
            Err(e) => {
                tracing::debug!(
                    pid = tgid,
                    error = format!("{e:#}"),
                    "worker stdout uprobe: retrying"
                );
                self.pipes_pending.insert(tgid, tries + 1);
            }
        }
    }

    /// Workers whose stdout uprobe is attached (tests and diagnostics).
    pub fn worker_pipes(&self) -> usize {
        self.worker_pipes.len()
    }

    /// Where in the `write` of the libc at `path` the workers' uprobe goes: the offset of an
    /// instruction the kernel emulates (probe_site.rs: ~10× cheaper per hit here than a single
    /// step), else 0. Remembered per file, since every worker of a node maps the same one or two.
    fn write_site(&mut self, path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let key = std::fs::metadata(path).map(|m| (m.dev(), m.ino())).ok();
        if let Some(&at) = key.and_then(|k| self.write_sites.get(&k)) {
            return at;
        }
        let at = if cfg!(target_arch = "x86_64") {
            std::fs::read(path)
                .map_err(anyhow::Error::from)
                .and_then(|elf| crate::probe_site::function_bytes(&elf, "write", 64))
                .map(|code| crate::probe_site::emulated_offset(&code))
        } else {
            Ok(None)
        };
        let at = match at {
            Ok(Some(at)) => at,
            Ok(None) => {
                tracing::info!(
                    libc = %path.display(),
                    "no emulated instruction at the start of write(): the workers' uprobe is \
                     single-stepped (slower per [METRICS] line)"
                );
                0
            }
            Err(e) => {
                tracing::info!(
                    libc = %path.display(),
                    error = format!("{e:#}"),
                    "cannot read write() to place the workers' uprobe; it goes on its first byte"
                );
                0
            }
        };
        if let Some(k) = key {
            self.write_sites.insert(k, at);
        }
        at
    }

    /// Attaches `ss_worker_write` to `write` in the libc that worker `tgid` has mapped, for that
    /// process alone (the uprobe's breakpoint is set in no other process).
    fn attach_worker_pipe(&mut self, tgid: u32) -> anyhow::Result<UProbeLink> {
        let pid = NonZeroU32::new(tgid).context("pid 0")?;
        let maps = std::fs::read_to_string(format!("/proc/{tgid}/maps"))
            .with_context(|| format!("reading /proc/{tgid}/maps"))?;
        let libc = libc_in_maps(&maps).with_context(|| {
            format!("no C library (libc.so, ld-musl) in /proc/{tgid}/maps: a static binary")
        })?;
        // Through the process's root: in a container the path is the container's.
        let path =
            Path::new(&format!("/proc/{tgid}/root")).join(libc.strip_prefix("/").unwrap_or(&libc));
        let offset = self.write_site(&path);
        let p: &mut UProbe = program(&mut self.ebpf, WORKER_WRITE)?
            .try_into()
            .with_context(|| format!("program `{WORKER_WRITE}` is not a uprobe"))?;
        let id = p
            .attach(
                UProbeAttachLocation::SymbolOffset("write", offset),
                &path,
                UProbeScope::OneProcess(pid),
            )
            .with_context(|| format!("attaching to write() in {}", path.display()))?;
        p.take_link(id)
            .with_context(|| format!("taking the link of `{WORKER_WRITE}`"))
    }

    /// Stops tracing `tgid` and frees its connections' kernel state.
    pub fn remove_target(&mut self, tgid: u32) -> anyhow::Result<()> {
        // Detaches its uprobe, if it is a worker.
        self.worker_pipes.remove(&tgid);
        self.pipes_pending.remove(&tgid);
        if tgid < PID_LIMIT {
            self.set_target_bits(tgid, 0)?;
        }
        match self.targets.remove(&tgid) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => {
                return Err(e).with_context(|| format!("removing pid {tgid} from the target map"));
            }
        }
        self.bump_targets_gen()?;
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
        let stale: Vec<u64> = self
            .sk_conns
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| v[..4] == tgid.to_ne_bytes())
            .map(|(sk, _)| sk)
            .collect();
        for sk in stale {
            let _ = self.sk_conns.remove(&sk);
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

    /// Keeps the fd of [`enable_run_stats`] for as long as these probes live.
    pub fn keep_run_stats(&mut self, fd: std::os::fd::OwnedFd) {
        self.run_stats = Some(fd);
    }

    /// Each loaded program's run count and run time so far. The kernel counts only while BPF
    /// statistics are on ([`enable_run_stats`], or `kernel.bpf_stats_enabled`); else both
    /// stay 0. One `bpf(BPF_OBJ_GET_INFO_BY_FD)` per program.
    pub fn run_stats(&self) -> Vec<ProgramRuns> {
        loaded_programs(&self.ebpf)
            .map(|(name, info)| ProgramRuns {
                name: name.to_owned(),
                runs: info.run_count(),
                run_time: info.run_time(),
            })
            .collect()
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

/// Turns the kernel's BPF run-time statistics on for as long as the returned fd is open
/// (`BPF_ENABLE_STATS`, 5.8+). The kernel counts its holders, so closing ours never turns off
/// statistics that `kernel.bpf_stats_enabled` or another tool turned on, and a crash cannot leave
/// them on. Costs two clock reads around every program run on the whole host (~20–40 ns), so it is
/// opt-in (`--bpf-stats`). Needs CAP_SYS_ADMIN: ask before loading, so that a missing capability
/// stops the agent before it has loaded anything.
pub fn enable_run_stats() -> anyhow::Result<std::os::fd::OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).context(
        "enabling BPF run-time statistics (--bpf-stats; BPF_ENABLE_STATS needs Linux 5.8+ and \
         CAP_SYS_ADMIN)",
    )
}

/// One program's runs so far ([`Probes::run_stats`]).
#[derive(Clone, Debug, PartialEq)]
pub struct ProgramRuns {
    pub name: String,
    pub runs: u64,
    pub run_time: std::time::Duration,
}

/// The object's loaded programs with their kernel info (one `bpf(BPF_OBJ_GET_INFO_BY_FD)` each);
/// the ones these options did not need were never loaded and have none.
fn loaded_programs(ebpf: &Ebpf) -> impl Iterator<Item = (&str, aya::programs::ProgramInfo)> {
    ebpf.programs()
        .filter_map(|(name, p)| Some((name, p.info().ok()?)))
}

fn take(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<aya::maps::Map> {
    ebpf.take_map(name)
        .with_context(|| format!("the eBPF object has no map `{name}` (build mismatch)"))
}

/// The uprobe of [`DataHooks::Sockets`] on a worker's `write`.
const WORKER_WRITE: &str = "ss_worker_write";

/// Attempts at a worker's uprobe ([`Probes::retry_worker_pipes`]).
const PIPE_ATTEMPTS: u32 = 10;

/// One attachment of [`PROGRAMS`]; dropping it detaches.
enum Link {
    Tracepoint(#[expect(dead_code, reason = "held for its Drop, which detaches")] TracePointLink),
    Btf(#[expect(dead_code, reason = "held for its Drop, which detaches")] BtfTracePointLink),
    Uprobe(#[expect(dead_code, reason = "held for its Drop, which detaches")] UProbeLink),
}

fn program<'a>(ebpf: &'a mut Ebpf, prog: &str) -> anyhow::Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(prog)
        .with_context(|| format!("the eBPF object has no program `{prog}` (build mismatch)"))
}

fn attach(ebpf: &mut Ebpf, prog: &str, hook: Hook, btf: Option<&Btf>) -> anyhow::Result<Link> {
    let rejected = || format!("the kernel rejected program `{prog}` (verifier or permissions)");
    match hook {
        Hook::Tracepoint(category, tracepoint) => {
            let p: &mut TracePoint = program(ebpf, prog)?
                .try_into()
                .with_context(|| format!("program `{prog}` is not a tracepoint"))?;
            p.load().with_context(rejected)?;
            let id = p.attach(category, tracepoint).with_context(|| {
                format!("attaching `{prog}` to tracepoint {category}:{tracepoint}")
            })?;
            Ok(Link::Tracepoint(
                p.take_link(id)
                    .with_context(|| format!("taking the link of `{prog}`"))?,
            ))
        }
        Hook::Btf(tracepoint) => {
            let btf = btf.context("no BTF to load a tp_btf program with")?;
            let p: &mut BtfTracePoint = program(ebpf, prog)?
                .try_into()
                .with_context(|| format!("program `{prog}` is not a tp_btf program"))?;
            p.load(tracepoint, btf).with_context(rejected)?;
            let id = p
                .attach()
                .with_context(|| format!("attaching `{prog}` to tp_btf/{tracepoint}"))?;
            Ok(Link::Btf(
                p.take_link(id)
                    .with_context(|| format!("taking the link of `{prog}`"))?,
            ))
        }
    }
}

/// The C library mapped in a `/proc/<pid>/maps` text: glibc's `libc.so.6` (or an old
/// `libc-2.x.so`), or musl's `ld-musl-<arch>.so.1`, which holds its `write`.
fn libc_in_maps(maps: &str) -> Option<PathBuf> {
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| {
            let name = path.rsplit('/').next().unwrap_or(path);
            name.starts_with("libc.so")
                || (name.starts_with("libc-") && name.ends_with(".so"))
                || name.starts_with("ld-musl-")
        })
        .map(PathBuf::from)
}

impl Drop for Probes {
    /// Detaches every program concurrently. Each detach waits for an RCU grace period (~70 ms idle,
    /// far longer on a busy node); one after another, 21 of them held a rolling update or a SIGTERM
    /// for 1.5 s idle and 11–17 s under load. Concurrent waiters share grace periods.
    fn drop(&mut self) {
        let started = std::time::Instant::now();
        let mut links = std::mem::take(&mut self.links);
        links.extend(
            self.worker_pipes
                .drain()
                .map(|(_, link)| Link::Uprobe(link)),
        );
        let n = links.len();
        std::thread::scope(|scope| {
            for link in links {
                if let Err(e) = std::thread::Builder::new()
                    .name("detach".into())
                    .spawn_scoped(scope, move || drop(link))
                {
                    // No thread (resource limits): this one detaches in the caller instead, and
                    // the rest still go in parallel.
                    tracing::debug!("detaching on the calling thread: {e}");
                }
            }
        });
        tracing::debug!(programs = n, elapsed = ?started.elapsed(), "eBPF programs detached");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attached(opts: LoadOptions) -> Vec<&'static str> {
        PROGRAMS
            .iter()
            .filter(|(_, _, need)| opts.needs(*need))
            .map(|(prog, ..)| *prog)
            .collect()
    }

    /// Asserts that each of `names` is (`want`) or is not attached.
    fn assert_attached(progs: &[&str], names: &[&str], want: bool) {
        for name in names {
            assert_eq!(progs.contains(name), want, "{name} attached: {progs:?}");
        }
    }

    fn torchserve_only(read_entries: bool) -> LoadOptions {
        LoadOptions {
            watch_listen: false,
            socket_calls: false,
            read_entries,
            write_entries: false,
            ..LoadOptions::default()
        }
    }

    #[test]
    fn torchserve_alone_runs_one_program_per_read_and_write() {
        let progs = attached(torchserve_only(false));
        let entries = [
            "ss_enter_read",
            "ss_enter_readv",
            "ss_enter_write",
            "ss_enter_writev",
        ];
        assert_attached(&progs, &entries, false);
        let exits = [
            "ss_exit_read",
            "ss_exit_write",
            "ss_exit_writev",
            "ss_exit_accept4",
        ];
        assert_attached(&progs, &exits, true);
        // recv*/send* are not TorchServe's frontend's calls (Need::SocketCalls).
        let socket_calls = ["ss_enter_sendto", "ss_exit_sendto", "ss_exit_recvfrom"];
        assert_attached(&progs, &socket_calls, false);
    }

    #[test]
    fn socket_hooks_replace_every_data_syscall_program() {
        for write_entries in [false, true] {
            let progs = attached(LoadOptions {
                write_entries,
                read_entries: false,
                data_hooks: DataHooks::Sockets,
                ..LoadOptions::default()
            });
            let data_syscalls: Vec<&str> = PROGRAMS
                .iter()
                .filter(|(name, ..)| {
                    ["read", "write", "recv", "send"]
                        .iter()
                        .any(|call| name.contains(call))
                })
                .map(|(name, ..)| *name)
                .filter(|name| !name.starts_with("ss_sock_"))
                .collect();
            assert!(data_syscalls.len() >= 18, "{data_syscalls:?}");
            assert_attached(&progs, &data_syscalls, false);
            assert_attached(
                &progs,
                &[
                    "ss_sock_send",
                    "ss_sock_recv",
                    "ss_sock_state",
                    "ss_sock_destroy",
                ],
                true,
            );
            // Nor the connection life cycle's syscalls, nor listen() (ss_sock_state sees the
            // socket's TCP_LISTEN state): no syscall tracepoint at all. The process events are
            // sched tracepoints.
            let lifecycle = [
                "ss_exit_accept",
                "ss_exit_accept4",
                "ss_enter_close",
                "ss_enter_dup2",
                "ss_enter_dup3",
            ];
            assert_attached(&progs, &lifecycle, false);
            assert_attached(&progs, &["ss_exec", "ss_exit"], true);
            let syscall_hooks: Vec<&str> = PROGRAMS
                .iter()
                .filter(|(name, hook, _)| {
                    matches!(hook, Hook::Tracepoint("syscalls", _)) && progs.contains(name)
                })
                .map(|(name, ..)| *name)
                .collect();
            assert!(syscall_hooks.is_empty(), "{syscall_hooks:?}");
        }
        // And the syscall build attaches none of the socket hooks.
        let progs = attached(torchserve_only(false));
        assert_attached(&progs, &["ss_sock_send", "ss_sock_recv"], false);
    }

    #[test]
    fn auto_keeps_syscalls_where_a_write_entry_is_needed() {
        // A server given by --port may block in write: its time to first byte needs the entry.
        assert_eq!(DataHooks::Auto.resolve(true, true), DataHooks::Syscalls);
        // Without CAP_SYS_ADMIN the workers' uprobes cannot be attached after load.
        assert_eq!(DataHooks::Auto.resolve(false, false), DataHooks::Syscalls);
        assert_eq!(
            DataHooks::Syscalls.resolve(false, true),
            DataHooks::Syscalls
        );
        assert_eq!(DataHooks::Sockets.resolve(true, false), DataHooks::Sockets);
        // This kernel (6.18) has the tracepoints.
        assert!(socket_hooks_supported());
        assert_eq!(DataHooks::Auto.resolve(false, true), DataHooks::Sockets);
    }

    #[test]
    fn the_c_library_is_found_in_a_process_map() {
        let glibc = "\
55d0c0a00000-55d0c0a01000 r--p 00000000 fe:00 1 /usr/bin/python3.11
7f9df4000000-7f9df40c5000 r--p 00000000 fe:00 326305 /usr/lib/x86_64-linux-gnu/libcrypto.so.3
7f9df4c1e000-7f9df4c44000 r--p 00000000 fe:00 326279 /usr/lib/x86_64-linux-gnu/libc.so.6
7ffd1000-7ffd2000 rw-p 00000000 00:00 0 [stack]
";
        assert_eq!(
            libc_in_maps(glibc),
            Some(PathBuf::from("/usr/lib/x86_64-linux-gnu/libc.so.6"))
        );
        let old = "7f00-7f01 r-xp 00000000 08:01 2 /lib/x86_64-linux-gnu/libc-2.31.so\n";
        assert_eq!(
            libc_in_maps(old),
            Some(PathBuf::from("/lib/x86_64-linux-gnu/libc-2.31.so"))
        );
        let musl = "7f00-7f01 r-xp 00000000 08:01 2 /lib/ld-musl-x86_64.so.1\n";
        assert_eq!(
            libc_in_maps(musl),
            Some(PathBuf::from("/lib/ld-musl-x86_64.so.1"))
        );
        // A static binary, and names that only look alike.
        let none = "\
00400000-00401000 r-xp 00000000 08:01 3 /usr/local/bin/static-python
7f00-7f01 r-xp 00000000 08:01 4 /usr/lib/libcapstone.so.4
7f00-7f01 r-xp 00000000 08:01 5 /opt/lib/libc++.so.1
";
        assert_eq!(libc_in_maps(none), None);
        assert_eq!(libc_in_maps(""), None);
    }

    #[test]
    fn old_kernels_keep_every_entry_of_what_they_trace() {
        // Before 5.15 the exit cannot decide from the saved registers.
        let progs = attached(torchserve_only(true));
        let entries = [
            "ss_enter_read",
            "ss_enter_readv",
            "ss_enter_write",
            "ss_enter_writev",
        ];
        assert_attached(&progs, &entries, true);
        assert_attached(&progs, &["ss_enter_sendto"], false);
    }

    #[test]
    fn servers_given_by_port_get_write_entries_for_time_to_first_byte() {
        let progs = attached(LoadOptions {
            read_entries: false,
            ..LoadOptions::default()
        });
        let entries = [
            "ss_enter_write",
            "ss_enter_writev",
            "ss_enter_sendto",
            "ss_enter_sendmsg",
        ];
        assert_attached(&progs, &entries, true);
        assert_attached(&progs, &["ss_enter_read", "ss_enter_recvfrom"], false);
    }
}
