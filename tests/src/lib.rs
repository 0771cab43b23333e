//! Harness for servescope's root integration tests (and `cargo xtask demo`, which drives the same pieces).
//!
//! The tests treat the agent as a user does: they run the `servescope` binary, talk HTTP to real servers
//! through their sockets and read the agent's `/metrics`. Nothing here links the agent crate, so a test can
//! only pass if the built binary, its BPF programs and the kernel really work together.
//!
//! Every process a test starts is owned by a guard that stops it on drop, also when the test fails or
//! panics, and is registered in [`cleanup`] so a signal handler (the demo's Ctrl-C) can stop it too.

pub mod agent;
pub mod cleanup;
pub mod h1;
pub mod http;
pub mod kernel;
pub mod metrics;
pub mod netns;
pub mod process;
pub mod server;
pub mod torchserve;

use std::{
    env, fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

pub use crate::{
    agent::Agent,
    metrics::{Metrics, Series},
    server::ServerProcess,
    torchserve::{TorchServe, TorchServeHome, Traffic},
};

/// The workspace root (the directory holding the top-level `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    // This crate lives in `<root>/tests`; the path is fixed at compile time, which is what we want: the
    // harness always belongs to the checkout it was built from.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// Cargo's target directory: `CARGO_TARGET_DIR` if set, else `<root>/target`.
pub fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        _ => workspace_root().join("target"),
    }
}

/// The agent's two sets of data hooks (`--data-hooks`): the syscall tracepoints, which `auto`
/// takes for servers given by `--port`/`--pid`, and the socket tracepoints, which it takes for
/// TorchServe on 6.3+ kernels (docs/decisions.md R39). A test of traffic that either may see runs
/// on both ([`on_both_hooks!`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hooks {
    Syscalls,
    Sockets,
}

impl Hooks {
    /// The value of `--data-hooks`, and of the start-up log's `data_hooks=`.
    pub fn name(self) -> &'static str {
        match self {
            Hooks::Syscalls => "syscalls",
            Hooks::Sockets => "sockets",
        }
    }

    /// The agent's arguments that choose this set.
    pub fn args(self) -> [&'static str; 2] {
        ["--data-hooks", self.name()]
    }

    /// Fails unless `agent` says in its start-up log that it attached this set: a forced set that
    /// silently became the other would test the wrong hooks.
    pub fn ensure_attached(self, agent: &Agent) -> Result<()> {
        let log = fs::read_to_string(agent.log_path())
            .with_context(|| format!("reading {}", agent.log_path().display()))?;
        let want = format!("data_hooks=\"{}\"", self.name());
        anyhow::ensure!(
            log.contains(&want),
            "the agent's log does not say {want}:\n{log}"
        );
        Ok(())
    }
}

/// For each named test function taking a [`Hooks`], one `#[test]` per set of data hooks:
/// `syscalls::<name>` and `sockets::<name>` (so `cargo test sockets::` runs one set).
#[macro_export]
macro_rules! on_both_hooks {
    ($($name:ident),+ $(,)?) => {
        mod syscalls {
            $(
                #[test]
                fn $name() -> ::anyhow::Result<()> {
                    super::$name($crate::Hooks::Syscalls)
                }
            )+
        }
        mod sockets {
            $(
                #[test]
                fn $name() -> ::anyhow::Result<()> {
                    super::$name($crate::Hooks::Sockets)
                }
            )+
        }
    };
}

/// A fresh directory for one test's logs: `target/integration/<name>/` (emptied first, so the files always
/// describe the last run).
pub fn log_dir(name: &str) -> Result<PathBuf> {
    let dir = target_dir().join("integration").join(name);
    if dir.exists() {
        fs::remove_dir_all(&dir)
            .with_context(|| format!("removing old logs in {}", dir.display()))?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Fails unless the effective user is root. The agent loads BPF programs, which needs root (or
/// CAP_BPF + CAP_PERFMON + CAP_SYS_PTRACE); a test that cannot do its job fails, it never skips.
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        bail!(
            "the integration tests run the eBPF agent and must run as root (euid is {euid}); \
             run `sudo -E cargo xtask test` (CI runs as root)"
        );
    }
    Ok(())
}

/// Checks what the agent needs from the kernel and mounts the pseudo file systems that are missing:
/// BTF for CO-RE (`/sys/kernel/btf/vmlinux`), tracefs (the syscall tracepoints are attached through it)
/// and bpffs. Needs root for the mounts.
pub fn ensure_kernel_prereqs() -> Result<()> {
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!(
            "/sys/kernel/btf/vmlinux is missing: servescope needs a kernel built with CONFIG_DEBUG_INFO_BTF=y \
             (Linux >= 5.8; Debian, Ubuntu, Fedora and RHEL kernels have it)"
        );
    }
    mount_if_absent("tracefs", "/sys/kernel/tracing", "events")?;
    mount_if_absent("bpf", "/sys/fs/bpf", "")?;
    Ok(())
}

/// Mounts file system `fstype` at `target` unless it is mounted there already (per /proc/self/mounts) or,
/// for tracefs, reachable through the old debugfs path. `probe` is a path inside the mount that proves it
/// works once mounted.
fn mount_if_absent(fstype: &str, target: &str, probe: &str) -> Result<()> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    let mounted = mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let (_, point, kind) = (fields.next(), fields.next(), fields.next());
        point == Some(target) && kind == Some(fstype)
    });
    if mounted || (fstype == "tracefs" && Path::new("/sys/kernel/debug/tracing/events").exists()) {
        return Ok(());
    }
    fs::create_dir_all(target).with_context(|| format!("creating mount point {target}"))?;
    let status = std::process::Command::new("mount")
        .args(["-t", fstype, fstype, target])
        .status()
        .with_context(|| format!("running `mount -t {fstype} {fstype} {target}`"))?;
    if !status.success() {
        bail!(
            "`mount -t {fstype} {fstype} {target}` failed ({status}); servescope needs {fstype} mounted there"
        );
    }
    if !probe.is_empty() && !Path::new(target).join(probe).exists() {
        bail!("{fstype} mounted at {target} but {target}/{probe} is missing");
    }
    eprintln!("mounted {fstype} at {target}");
    Ok(())
}

/// The last `max_lines` lines of a (log) file, for error messages; a note if it cannot be read.
pub fn tail(path: &Path, max_lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(max_lines);
            let mut out = String::new();
            if start > 0 {
                out.push_str(&format!(
                    "[... {start} earlier lines in {}]\n",
                    path.display()
                ));
            }
            for line in &lines[start..] {
                out.push_str(line);
                out.push('\n');
            }
            out
        }
        Err(e) => format!("[cannot read {}: {e}]\n", path.display()),
    }
}
