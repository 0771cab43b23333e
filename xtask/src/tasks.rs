//! build, vmlinux and test.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use servescope_integration::{
    TorchServeHome, ensure_kernel_prereqs, require_root, target_dir, workspace_root,
};

// The agent's own description of how its eBPF programs are compiled (agent/build.rs uses it too).
#[path = "../../agent/ebpf_build.rs"]
mod ebpf_build;

/// The package name of the integration tests; excluded from the unit-test run because they need root.
const INTEGRATION_PACKAGE: &str = "servescope-integration";

/// `cargo` as invoked by the user (the same toolchain that runs xtask).
pub fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// Compiles the eBPF programs for every architecture the agent supports but this machine does not
/// build (its own is compiled by every agent build): arm64 on x86 CI, where nothing else would notice
/// that an architecture-specific part of the C (saved registers, syscall numbers) no longer
/// compiles. Into `target/ebpf-check/<arch>/`.
fn ebpf_for_other_arches() -> Result<()> {
    let clang = ebpf_build::find_clang().map_err(|e| anyhow!(e))?;
    let ebpf = workspace_root().join("ebpf");
    let host = ebpf_build::bpf_arch(env::consts::ARCH).ok();
    for (rust, bpf) in ebpf_build::ARCHES {
        if host == Some(*bpf) {
            continue;
        }
        let out = target_dir().join("ebpf-check").join(bpf);
        fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        eprintln!("$ clang -target bpf -D__TARGET_ARCH_{bpf} … (agent/ebpf_build.rs)");
        ebpf_build::compile_all(&clang, &ebpf, bpf, &out)
            .map_err(|e| anyhow!(e))
            .with_context(|| format!("the eBPF programs do not compile for {rust}"))?;
    }
    Ok(())
}

/// Runs `cmd`, echoing it first; an error if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = show(cmd);
    eprintln!("$ {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("could not run `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

fn show(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program())
        .file_name()
        .unwrap_or(cmd.get_program())
        .to_string_lossy();
    std::iter::once(program.into_owned())
        .chain(cmd.get_args().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Builds the agent and returns the path of its binary.
pub fn build(release: bool) -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["build", "--package", "servescope", "--bin", "servescope"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd).context("building the agent")?;
    let bin = target_dir()
        .join(if release { "release" } else { "debug" })
        .join("servescope");
    if !bin.is_file() {
        bail!("the build succeeded but {} does not exist", bin.display());
    }
    Ok(bin)
}

/// Regenerates `ebpf/vmlinux.h` (or `out`) from the running kernel's BTF. Written to a temporary file
/// first so a failed dump never leaves a truncated header behind.
pub fn vmlinux(out: Option<PathBuf>) -> Result<()> {
    const BTF: &str = "/sys/kernel/btf/vmlinux";
    if !Path::new(BTF).exists() {
        bail!("{BTF} is missing: this kernel was built without BTF (CONFIG_DEBUG_INFO_BTF)");
    }
    let out = out.unwrap_or_else(|| workspace_root().join("ebpf/vmlinux.h"));
    let output = Command::new("bpftool")
        .args(["btf", "dump", "file", BTF, "format", "c"])
        .output()
        .context(
            "could not run bpftool: `apt-get install bpftool` (Debian) or linux-tools (Ubuntu)",
        )?;
    if !output.status.success() {
        bail!(
            "bpftool failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let old = fs::read(&out).ok();
    let tmp = out.with_extension("h.tmp");
    fs::write(&tmp, &output.stdout).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &out)
        .with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
    let lines = output.stdout.iter().filter(|&&b| b == b'\n').count();
    let change = if old.as_deref() == Some(output.stdout.as_slice()) {
        "unchanged"
    } else {
        "updated"
    };
    println!("{} {change}: {lines} lines from {BTF}", out.display());
    Ok(())
}

/// `cargo xtask test`: the quick checks first (format, clippy, unit tests), then the root integration
/// tests, which build the agent and install TorchServe under target/ if needed.
pub fn test(unit: bool, integration: bool, test_args: &[String]) -> Result<()> {
    let mut phases: Vec<(&str, Duration)> = Vec::new();
    let mut timed = |name: &'static str, f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
        let start = Instant::now();
        f().with_context(|| format!("{name} failed"))?;
        phases.push((name, start.elapsed()));
        Ok(())
    };
    if unit {
        timed("rustfmt", &mut || {
            run(cargo().args(["fmt", "--all", "--check"]))
        })?;
        timed("eBPF for the other architectures", &mut || {
            ebpf_for_other_arches()
        })?;
        timed("clippy", &mut || {
            run(cargo().args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))
        })?;
        timed("unit tests", &mut || {
            run(cargo().args(["test", "--workspace", "--exclude", INTEGRATION_PACKAGE]))?;
            // The harness's own unit tests (metrics parser, HTTP client) need no root.
            run(cargo().args(["test", "--package", INTEGRATION_PACKAGE, "--lib"]))
        })?;
    }
    if integration {
        // Checked here, after the checks that need no root, so a developer still gets those results.
        timed("preflight", &mut || {
            require_root()?;
            ensure_kernel_prereqs()
        })?;
        let mut bin = PathBuf::new();
        timed("agent build", &mut || {
            bin = build(false)?;
            Ok(())
        })?;
        timed("TorchServe setup", &mut || {
            setup_torchserve(&TorchServeHome::default())
        })?;
        timed("integration tests", &mut || {
            let mut cmd = cargo();
            // One at a time: the tests use TorchServe's fixed ports.
            // --no-fail-fast: a failure in one test file must not hide the results of the others.
            cmd.args([
                "test",
                "--no-fail-fast",
                "--package",
                INTEGRATION_PACKAGE,
                "--test",
                "*",
                "--",
                "--test-threads=1",
            ])
            .args(test_args)
            .env("SERVESCOPE_BIN", &bin);
            // A failing test reports its differences and the agent's log; anyhow's backtrace of the
            // test function would only bury them. RUST_BACKTRACE still applies to panics.
            if env::var_os("RUST_LIB_BACKTRACE").is_none() {
                cmd.env("RUST_LIB_BACKTRACE", "0");
            }
            run(&mut cmd)
        })?;
    }
    eprintln!("cargo xtask test: all passed");
    for (name, took) in &phases {
        eprintln!("  {name:<18} {:>6.1}s", took.as_secs_f64());
    }
    Ok(())
}

/// Installs TorchServe into its cache (target/torchserve) if needed; the log goes to target/.
pub fn setup_torchserve(home: &TorchServeHome) -> Result<()> {
    let logs = target_dir().join("integration");
    fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let log = logs.join("torchserve-setup.log");
    let _ = fs::remove_file(&log);
    eprintln!(
        "$ bash tests/torchserve/setup.sh {}   (log: {})",
        home.home.display(),
        log.display()
    );
    home.setup(&log)
}
