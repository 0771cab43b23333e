//! `servescope doctor`: checks everything the agent needs from the machine and says plainly what is
//! wrong and how to fix it, then does a dry run: loads and attaches every program and lists the
//! TorchServe instances it would trace.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
};

use serde::Serialize;

use crate::{
    discovery::{Hostnames, ProcFs, Selection},
    probes::LoadCost,
    sampler::nvml::{GpuError, GpuSource},
};

/// Outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Works, but something is worth knowing (e.g. a fallback will be used).
    Warn,
    /// The agent cannot run (or cannot do part of its job) until this is fixed.
    Fail,
}

#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    /// What to do about it, when not Ok.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Self {
        Check {
            name,
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }
    fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Check {
            name,
            status: Status::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Check {
            name,
            status: Status::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// A TorchServe frontend the agent would trace.
#[derive(Clone, Debug, Serialize)]
pub struct Instance {
    pub pid: u32,
    pub hostname: String,
    pub ports: Vec<u16>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
    pub torchserve: Vec<Instance>,
    /// What the dry run's load cost, per program (absent when it did not load).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load: Option<LoadCost>,
}

impl Report {
    /// Exit code: 0 when nothing failed, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        u8::from(self.checks.iter().any(|c| c.status == Status::Fail))
    }

    pub fn to_text(&self) -> String {
        let mut s = String::new();
        for c in &self.checks {
            let tag = match c.status {
                Status::Ok => "ok  ",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
            };
            let _ = writeln!(s, "[{tag}] {:<14} {}", c.name, c.detail);
            if let Some(fix) = &c.fix {
                let _ = writeln!(s, "       {:<14} fix: {fix}", "");
            }
        }
        if self.torchserve.is_empty() {
            let _ = writeln!(
                s,
                "TorchServe instances: none running now (they are picked up when they start)"
            );
        } else {
            let _ = writeln!(s, "TorchServe instances:");
            for i in &self.torchserve {
                let ports: Vec<String> = i.ports.iter().map(u16::to_string).collect();
                let _ = writeln!(
                    s,
                    "  pid {:<8} hostname {:<24} listening on {}",
                    i.pid,
                    i.hostname,
                    if ports.is_empty() {
                        "-".to_owned()
                    } else {
                        ports.join(", ")
                    }
                );
            }
        }
        let verdict = if self.exit_code() == 0 {
            "servescope can run here."
        } else {
            "servescope cannot run here until the FAIL lines are fixed."
        };
        let _ = writeln!(s, "{verdict}");
        s
    }
}

/// Where the checks look; tests point these at fixture trees.
#[derive(Clone, Debug)]
pub struct Env {
    pub osrelease: PathBuf,
    pub btf: PathBuf,
    pub tracefs: Vec<PathBuf>,
    pub bpffs: PathBuf,
    pub mounts: PathBuf,
    pub lockdown: PathBuf,
    pub self_status: PathBuf,
    pub proc: PathBuf,
}

impl Default for Env {
    fn default() -> Self {
        Env {
            osrelease: "/proc/sys/kernel/osrelease".into(),
            btf: "/sys/kernel/btf/vmlinux".into(),
            tracefs: vec![
                "/sys/kernel/tracing".into(),
                "/sys/kernel/debug/tracing".into(),
            ],
            bpffs: "/sys/fs/bpf".into(),
            mounts: "/proc/self/mounts".into(),
            lockdown: "/sys/kernel/security/lockdown".into(),
            self_status: "/proc/self/status".into(),
            proc: "/proc".into(),
        }
    }
}

/// Capabilities the agent cannot run without, by bit number (linux/capability.h).
const REQUIRED: [(u32, &str, &str); 3] = [
    (39, "CAP_BPF", "load programs and create maps"),
    (
        38,
        "CAP_PERFMON",
        "attach tracepoints and read kernel memory from programs",
    ),
    (
        19,
        "CAP_SYS_PTRACE",
        "read other processes' /proc entries (fds, sockets, namespaces)",
    ),
];

/// Capabilities without which part of the job is not done.
const RECOMMENDED: [(u32, &str, &str); 3] = [
    (
        2,
        "CAP_DAC_READ_SEARCH",
        "find TorchServe running as another user (the official image's model-server)",
    ),
    (
        21,
        "CAP_SYS_ADMIN",
        "label TorchServe in other UTS namespaces (pods) with their own hostnames, and attach the \
         TorchServe workers' uprobes of the socket data hooks",
    ),
    (
        23,
        "CAP_SYS_NICE",
        "run the ring-buffer reader ahead of the node's threads (--reader-nice), so that busy CPUs \
         do not make the kernel drop records",
    ),
];

/// Runs every static check; `dry_run` loads and attaches the programs (the real thing, needs
/// privileges) and says what that cost; `open_gpu` opens NVML (`sampler::nvml::open_nvml`, a fake
/// in tests).
pub fn run(
    env: &Env,
    dry_run: impl FnOnce() -> anyhow::Result<LoadCost>,
    open_gpu: impl FnOnce() -> Result<Box<dyn GpuSource>, GpuError>,
) -> Report {
    let mut checks = vec![
        kernel_version(env),
        btf(env),
        tracefs(env),
        bpffs(env),
        capabilities(env),
        lockdown(env),
        data_hooks(env),
    ];
    // Loading needs BTF and tracefs; without them the dry run would only repeat those failures.
    let prereqs_ok = checks
        .iter()
        .all(|c| c.status != Status::Fail || c.name == "capabilities");
    let mut load = None;
    checks.push(if prereqs_ok {
        match dry_run() {
            Ok(cost) => {
                let check = Check::ok(
                    "load+attach",
                    format!(
                        "every program loaded, passed the verifier and attached; ring buffer created ({})",
                        cost.summary()
                    ),
                );
                load = Some(cost);
                check
            }
            Err(e) => Check::fail(
                "load+attach",
                format!("{e:#}"),
                "run as root (or with the capabilities above); see the checks above",
            ),
        }
    } else {
        Check::fail(
            "load+attach",
            "skipped: fix the failures above first",
            "see the checks above",
        )
    });
    checks.push(nvml(open_gpu));
    Report {
        checks,
        torchserve: instances(&env.proc),
        load,
    }
}

/// NVML: the library, and the devices it lists. Never a failure: without it only the GPU families
/// stay empty.
fn nvml(open: impl FnOnce() -> Result<Box<dyn GpuSource>, GpuError>) -> Check {
    const NAME: &str = "nvml";
    const FIX: &str = "install the NVIDIA driver; in a container, mount libnvidia-ml.so.1 from the host \
                       (NVIDIA container toolkit: NVIDIA_DRIVER_CAPABILITIES=utility)";
    let mut source = match open() {
        Ok(s) => s,
        Err(e @ GpuError::NoLibrary(_)) => {
            return Check::warn(NAME, format!("not found: {e}"), FIX);
        }
        Err(e) => {
            return Check::warn(
                NAME,
                format!("library found, but {e}"),
                "check the driver with nvidia-smi",
            );
        }
    };
    match source.devices() {
        Ok(devices) if devices.is_empty() => Check::warn(
            NAME,
            "library found, no GPU listed; GPU families stay empty",
            "check the driver with nvidia-smi",
        ),
        Ok(devices) => {
            let list: Vec<String> = devices
                .iter()
                .map(|d| {
                    let mem = d
                        .memory_total_bytes
                        .map(|b| format!(" ({} MiB)", b / (1024 * 1024)))
                        .unwrap_or_default();
                    format!("GPU {}{mem}", d.index)
                })
                .collect();
            Check::ok(
                NAME,
                format!(
                    "library found, {} device(s): {}",
                    devices.len(),
                    list.join(", ")
                ),
            )
        }
        Err(e) => Check::warn(
            NAME,
            format!("library found, but listing devices failed: {e}"),
            "check the driver with nvidia-smi",
        ),
    }
}

/// Where the agent will see TorchServe's data (probes::DataHooks): a warning where it must use the
/// syscall tracepoints, which cost every process on the host something.
fn data_hooks(env: &Env) -> Check {
    const NAME: &str = "data hooks";
    if !crate::probes::socket_hooks_in(&env.btf) {
        return Check::warn(
            NAME,
            "syscalls: this kernel has no sock_send_length/sock_recv_length tracepoints, so every \
             read and write of every process on the host runs a program (that returns at once for \
             the untraced ones)",
            "Linux 6.3 or newer has them (docs/decisions.md R39)",
        );
    }
    if effective_caps(env).is_some_and(|eff| eff & (1 << 21) != 0) {
        Check::ok(
            NAME,
            "sockets: only socket traffic runs a program (sock_send_length/sock_recv_length), \
             and a uprobe on each TorchServe worker's libc write (with --port/--pid: syscalls)",
        )
    } else {
        Check::warn(
            NAME,
            "syscalls: the kernel has the socket tracepoints, but without CAP_SYS_ADMIN the \
             TorchServe workers' uprobes cannot be attached",
            "grant CAP_SYS_ADMIN (the DaemonSet and the systemd unit in deploy/ do)",
        )
    }
}

fn kernel_version(env: &Env) -> Check {
    const NAME: &str = "kernel";
    let Ok(release) = fs::read_to_string(&env.osrelease) else {
        return Check::warn(
            NAME,
            "cannot read the kernel release",
            "check that /proc is mounted",
        );
    };
    let release = release.trim();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty());
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    if (major, minor) >= (5, 8) {
        Check::ok(
            NAME,
            format!("Linux {release} (5.8+ has BPF ring buffers and CAP_BPF)"),
        )
    } else {
        Check::fail(
            NAME,
            format!("Linux {release} is older than 5.8"),
            "servescope needs Linux 5.8 or newer (BPF ring buffer)",
        )
    }
}

fn btf(env: &Env) -> Check {
    const NAME: &str = "btf";
    if env.btf.exists() {
        Check::ok(
            NAME,
            format!("{} present (CO-RE relocations)", env.btf.display()),
        )
    } else {
        Check::fail(
            NAME,
            format!("{} is missing", env.btf.display()),
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (standard on current distributions)",
        )
    }
}

fn tracefs(env: &Env) -> Check {
    const NAME: &str = "tracefs";
    match env
        .tracefs
        .iter()
        .find(|t| t.join("events/syscalls").is_dir())
    {
        Some(t) => Check::ok(
            NAME,
            format!(
                "syscall tracepoints at {}",
                t.join("events/syscalls").display()
            ),
        ),
        None => {
            let first = env
                .tracefs
                .first()
                .map_or_else(|| "/sys/kernel/tracing".into(), |p| p.display().to_string());
            Check::fail(
                NAME,
                "tracefs is not mounted: syscall tracepoints cannot be attached",
                format!(
                    "mount -t tracefs tracefs {first}  (in Kubernetes, mount the host's /sys/kernel/tracing)"
                ),
            )
        }
    }
}

fn bpffs(env: &Env) -> Check {
    const NAME: &str = "bpffs";
    let mounts = fs::read_to_string(&env.mounts).unwrap_or_default();
    let mounted = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.get(1) == Some(&env.bpffs.to_string_lossy().as_ref()) && f.get(2) == Some(&"bpf")
    });
    if mounted {
        Check::ok(NAME, format!("mounted at {}", env.bpffs.display()))
    } else {
        Check::warn(
            NAME,
            format!(
                "not mounted at {} (not needed today: nothing is pinned)",
                env.bpffs.display()
            ),
            format!("mount -t bpf bpf {}", env.bpffs.display()),
        )
    }
}

/// The effective capability set of this process (`CapEff` in its status file), as bits.
fn effective_caps(env: &Env) -> Option<u64> {
    let status = fs::read_to_string(&env.self_status).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

fn capabilities(env: &Env) -> Check {
    const NAME: &str = "capabilities";
    let Some(eff) = effective_caps(env) else {
        return Check::warn(
            NAME,
            "cannot read CapEff from /proc/self/status",
            "run as root",
        );
    };
    let has = |bit: u32| eff & (1u64 << bit) != 0;
    let missing = |caps: &[(u32, &str, &str)]| -> Vec<String> {
        caps.iter()
            // CAP_SYS_ADMIN implies what CAP_BPF and CAP_PERFMON grant (kernels before 5.8 only know it).
            .filter(|(bit, _, _)| !(has(*bit) || (matches!(*bit, 38 | 39) && has(21))))
            .map(|(_, name, why)| format!("{name} ({why})"))
            .collect()
    };
    let (required, recommended) = (missing(&REQUIRED), missing(&RECOMMENDED));
    if !required.is_empty() {
        Check::fail(
            NAME,
            format!(
                "missing {}",
                required
                    .iter()
                    .chain(&recommended)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "run as root, or grant CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE (+ CAP_DAC_READ_SEARCH, CAP_SYS_ADMIN, CAP_SYS_NICE) \
             (e.g. the DaemonSet's securityContext or the systemd unit in deploy/)",
        )
    } else if !recommended.is_empty() {
        Check::warn(
            NAME,
            format!("missing {}", recommended.join(", ")),
            "grant them for the full job; without them the agent runs with the limits named",
        )
    } else {
        Check::ok(
            NAME,
            "CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH, CAP_SYS_ADMIN and CAP_SYS_NICE \
             effective",
        )
    }
}

fn lockdown(env: &Env) -> Check {
    const NAME: &str = "lockdown";
    let Ok(text) = fs::read_to_string(&env.lockdown) else {
        return Check::ok(NAME, "no lockdown LSM");
    };
    // Format: "none [integrity] confidentiality": the bracketed mode is active.
    let active = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')))
        .unwrap_or("none");
    match active {
        "confidentiality" => Check::fail(
            NAME,
            "kernel lockdown is in confidentiality mode: BPF programs cannot read kernel or user memory",
            "boot with lockdown=integrity or none (or disable Secure Boot's lockdown) on hosts that run servescope",
        ),
        mode => Check::ok(NAME, format!("lockdown mode {mode}")),
    }
}

/// Running TorchServe frontends with their listening ports and hostnames.
fn instances(proc: &Path) -> Vec<Instance> {
    let procfs = ProcFs::new(proc);
    let found = procfs.scan(&Selection {
        torchserve: true,
        ..Selection::default()
    });
    let mut hostnames = Hostnames::default();
    found
        .keys()
        .map(|&pid| Instance {
            pid,
            hostname: hostnames.of(pid),
            ports: procfs.listening_ports(pid),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{probes::ProgramCost, sampler::nvml::GpuReading};

    /// NVML as a test wants it: a list of devices, or an error.
    struct Gpus(Result<Vec<GpuReading>, fn() -> GpuError>);

    impl GpuSource for Gpus {
        fn devices(&mut self) -> Result<Vec<GpuReading>, GpuError> {
            self.0.clone().map_err(|e| e())
        }

        fn xid_events(&mut self) -> Option<Vec<crate::sampler::nvml::XidEvent>> {
            None
        }
    }

    fn one_gpu() -> Result<Box<dyn GpuSource>, GpuError> {
        Ok(Box::new(Gpus(Ok(vec![GpuReading {
            index: 0,
            memory_total_bytes: Some(16 * 1024 * 1024 * 1024),
            ..GpuReading::default()
        }]))))
    }

    /// A fixture machine: everything present and fine unless a test breaks it.
    fn good_env(root: &Path) -> Env {
        let w = |p: &str, body: &str| {
            let path = root.join(p);
            fs::create_dir_all(path.parent().expect("has parent")).expect("mkdir");
            fs::write(&path, body).expect("write");
            path
        };
        let tracing = root.join("tracing");
        fs::create_dir_all(tracing.join("events/syscalls")).expect("mkdir");
        Env {
            osrelease: w("osrelease", "6.18.44-generic\n"),
            btf: {
                let path = root.join("btf/vmlinux");
                fs::create_dir_all(root.join("btf")).expect("mkdir");
                fs::write(&path, btf_with_typedefs(&SOCKET_TYPEDEFS)).expect("write");
                path
            },
            tracefs: vec![tracing],
            bpffs: "/sys/fs/bpf".into(),
            mounts: w("mounts", "bpf /sys/fs/bpf bpf rw 0 0\n"),
            lockdown: w("lockdown", "[none] integrity confidentiality\n"),
            self_status: w("status", "Name:\tservescope\nCapEff:\t000001ffffffffff\n"),
            proc: root.join("proc"),
        }
    }

    const SOCKET_TYPEDEFS: [&str; 2] = ["btf_trace_sock_send_length", "btf_trace_sock_recv_length"];

    /// A minimal little-endian BTF blob: one typedef of `void` per name (linux/btf.h layout).
    fn btf_with_typedefs(names: &[&str]) -> Vec<u8> {
        let mut strings = vec![0u8];
        let mut types = Vec::new();
        for name in names {
            let off = u32::try_from(strings.len()).expect("small");
            strings.extend_from_slice(name.as_bytes());
            strings.push(0);
            types.extend_from_slice(&off.to_le_bytes()); // name_off
            types.extend_from_slice(&(8u32 << 24).to_le_bytes()); // info: BTF_KIND_TYPEDEF
            types.extend_from_slice(&0u32.to_le_bytes()); // type: void
        }
        let len = |v: &Vec<u8>| u32::try_from(v.len()).expect("small");
        let mut out = Vec::new();
        out.extend_from_slice(&0xeb9fu16.to_le_bytes()); // magic
        out.extend_from_slice(&[1, 0]); // version, flags
        out.extend_from_slice(&24u32.to_le_bytes()); // hdr_len
        out.extend_from_slice(&0u32.to_le_bytes()); // type_off
        out.extend_from_slice(&len(&types).to_le_bytes());
        out.extend_from_slice(&len(&types).to_le_bytes()); // str_off
        out.extend_from_slice(&len(&strings).to_le_bytes());
        out.extend(types);
        out.extend(strings);
        out
    }

    #[test]
    fn data_hooks_follow_the_kernel_and_cap_sys_admin() {
        let d = tempfile::tempdir().expect("tempdir");
        let mut env = good_env(d.path());
        let r = run(&env, || Ok(LoadCost::default()), one_gpu);
        assert!(
            check(&r, "data hooks").detail.starts_with("sockets"),
            "{}",
            r.to_text()
        );
        // A kernel before 6.3: no socket tracepoints in its BTF.
        fs::write(&env.btf, btf_with_typedefs(&["btf_trace_sys_enter"])).expect("write");
        let r = run(&env, || Ok(LoadCost::default()), one_gpu);
        let c = check(&r, "data hooks");
        assert_eq!(c.status, Status::Warn, "{}", r.to_text());
        assert!(c.detail.starts_with("syscalls") && c.fix.as_deref().unwrap_or("").contains("6.3"));
        assert_eq!(r.exit_code(), 0, "a warning, not a failure");
        // The tracepoints, but no CAP_SYS_ADMIN (bit 21) for the workers' uprobes.
        fs::write(&env.btf, btf_with_typedefs(&SOCKET_TYPEDEFS)).expect("write");
        env.self_status = d.path().join("status-no-admin");
        fs::write(&env.self_status, "CapEff:\t000001ffffdfffff\n").expect("write");
        let r = run(&env, || Ok(LoadCost::default()), one_gpu);
        let c = check(&r, "data hooks");
        assert_eq!(c.status, Status::Warn, "{}", r.to_text());
        assert!(
            c.fix.as_deref().unwrap_or("").contains("CAP_SYS_ADMIN"),
            "{}",
            r.to_text()
        );
    }

    fn check<'a>(r: &'a Report, name: &str) -> &'a Check {
        r.checks
            .iter()
            .find(|c| c.name == name)
            .expect("check present")
    }

    #[test]
    fn all_good() {
        let d = tempfile::tempdir().expect("tempdir");
        let r = run(&good_env(d.path()), || Ok(LoadCost::default()), one_gpu);
        assert_eq!(r.exit_code(), 0, "{}", r.to_text());
        assert!(
            r.checks.iter().all(|c| c.status == Status::Ok),
            "{}",
            r.to_text()
        );
        assert!(r.to_text().contains("servescope can run here"));
    }

    #[test]
    fn missing_tracefs_offers_the_mount_command() {
        let d = tempfile::tempdir().expect("tempdir");
        let mut env = good_env(d.path());
        env.tracefs = vec![d.path().join("not-mounted")];
        let mut dry_run_called = false;
        let r = run(
            &env,
            || {
                dry_run_called = true;
                Ok(LoadCost::default())
            },
            one_gpu,
        );
        assert_eq!(r.exit_code(), 1);
        let c = check(&r, "tracefs");
        assert_eq!(c.status, Status::Fail);
        assert!(
            c.fix
                .as_deref()
                .is_some_and(|f| f.starts_with("mount -t tracefs tracefs"))
        );
        assert!(!dry_run_called, "no dry run without tracefs");
    }

    #[test]
    fn missing_btf_old_kernel_lockdown_and_caps_fail() {
        let d = tempfile::tempdir().expect("tempdir");
        let mut env = good_env(d.path());
        env.btf = d.path().join("nope");
        fs::write(&env.osrelease, "4.19.0-old\n").expect("write");
        fs::write(&env.lockdown, "none integrity [confidentiality]\n").expect("write");
        fs::write(&env.self_status, "CapEff:\t0000000000000000\n").expect("write");
        let r = run(&env, || Ok(LoadCost::default()), one_gpu);
        for name in ["btf", "kernel", "lockdown", "capabilities", "load+attach"] {
            assert_eq!(
                check(&r, name).status,
                Status::Fail,
                "{name}: {}",
                r.to_text()
            );
        }
        assert!(check(&r, "capabilities").detail.contains("CAP_BPF"));
    }

    #[test]
    fn dry_run_failure_is_reported_with_its_cause() {
        let d = tempfile::tempdir().expect("tempdir");
        let r = run(
            &good_env(d.path()),
            || anyhow::bail!("the kernel rejected program `ss_exit_read`"),
            one_gpu,
        );
        let c = check(&r, "load+attach");
        assert_eq!(c.status, Status::Fail);
        assert!(c.detail.contains("ss_exit_read"));
        assert_eq!(r.exit_code(), 1);
    }

    #[test]
    fn without_sys_admin_only_warns() {
        let d = tempfile::tempdir().expect("tempdir");
        let env = good_env(d.path());
        // CAP_BPF (39), CAP_PERFMON (38), CAP_SYS_PTRACE (19) only.
        let caps: u64 = (1 << 39) | (1 << 38) | (1 << 19);
        fs::write(&env.self_status, format!("CapEff:\t{caps:016x}\n")).expect("write");
        let r = run(&env, || Ok(LoadCost::default()), one_gpu);
        assert_eq!(check(&r, "capabilities").status, Status::Warn);
        assert_eq!(r.exit_code(), 0);
    }

    #[test]
    fn json_report_is_machine_readable() {
        let d = tempfile::tempdir().expect("tempdir");
        let cost = || {
            Ok(LoadCost {
                programs: vec![
                    ProgramCost {
                        name: "ss_exit_read".into(),
                        verified_insns: Some(9_000),
                    },
                    ProgramCost {
                        name: "ss_exit_write".into(),
                        verified_insns: Some(10_022),
                    },
                ],
                took_ms: 120,
            })
        };
        let r = run(&good_env(d.path()), cost, one_gpu);
        let v: serde_json::Value = serde_json::to_value(&r).expect("serialises");
        assert_eq!(v["checks"][0]["status"], "ok");
        assert!(v["torchserve"].is_array());
        assert_eq!(v["load"]["programs"][1]["name"], "ss_exit_write");
        assert_eq!(v["load"]["programs"][1]["verified_insns"], 10_022);
        assert_eq!(v["load"]["took_ms"], 120);
        assert_eq!(
            check(&r, "load+attach").detail,
            "every program loaded, passed the verifier and attached; ring buffer created (2 programs \
             in 120 ms; the verifier processed 19022 instructions (most: ss_exit_write, 10022))"
        );
    }

    #[test]
    fn kernels_without_verifier_counts_still_report_the_load() {
        let cost = LoadCost {
            programs: vec![ProgramCost {
                name: "ss_exit_read".into(),
                verified_insns: None,
            }],
            took_ms: 80,
        };
        assert_eq!(cost.total_insns(), 0);
        assert!(cost.costliest().is_none());
        assert_eq!(
            cost.summary(),
            "1 programs in 80 ms (this kernel does not report the verifier's work)"
        );
    }

    #[test]
    fn nvml_status() {
        let d = tempfile::tempdir().expect("tempdir");
        let env = good_env(d.path());
        let nvml_of = |open: fn() -> Result<Box<dyn GpuSource>, GpuError>| {
            let r = run(&env, || Ok(LoadCost::default()), open);
            assert_eq!(r.exit_code(), 0, "NVML never fails the doctor");
            check(&r, "nvml").clone()
        };

        let c = nvml_of(one_gpu);
        assert_eq!(c.status, Status::Ok);
        assert_eq!(c.detail, "library found, 1 device(s): GPU 0 (16384 MiB)");

        let c = nvml_of(|| {
            Err(GpuError::NoLibrary(
                "libnvidia-ml.so.1: cannot open shared object file".into(),
            ))
        });
        assert_eq!(c.status, Status::Warn);
        assert!(c.detail.starts_with("not found: "), "{}", c.detail);
        assert!(
            c.fix
                .as_deref()
                .is_some_and(|f| f.contains("libnvidia-ml.so.1"))
        );

        let c = nvml_of(|| Ok(Box::new(Gpus(Ok(Vec::new())))));
        assert_eq!(c.status, Status::Warn);
        assert!(c.detail.contains("no GPU"), "{}", c.detail);

        let c = nvml_of(|| {
            Ok(Box::new(Gpus(Err(|| GpuError::Nvml {
                what: "counting GPUs",
                source: nvml_wrapper::error::NvmlError::Unknown,
            }))))
        });
        assert_eq!(c.status, Status::Warn);
        assert!(c.detail.contains("counting GPUs"), "{}", c.detail);
    }
}
