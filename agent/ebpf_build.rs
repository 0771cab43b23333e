//! How the C CO-RE programs in `ebpf/` are compiled: used by `build.rs` for the architecture being
//! built, and by `cargo xtask test` for every architecture the agent supports, so that the one this
//! machine does not build (arm64 on x86 CI) still compiles. One module, included by both by path,
//! so the two never compile with different flags.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// (source, object, extra clang flags). `sockets` is built twice: with per-thread state in task-local
/// storage (the fast path), and with it in an LRU hash for kernels whose tracepoint programs cannot use
/// task storage; `probes.rs` loads the first that the kernel accepts.
pub const PROGRAMS: &[(&str, &str, &[&str])] = &[
    ("sockets", "sockets", &["-DSS_TASK_STORAGE"]),
    ("sockets", "sockets_compat", &[]),
];

/// The architectures the programs are built for (`__TARGET_ARCH_<name>`), by Rust's
/// `target_arch` name.
pub const ARCHES: &[(&str, &str)] = &[("x86_64", "x86"), ("aarch64", "arm64")];

/// The BPF architecture name of a Rust `target_arch`.
pub fn bpf_arch(target_arch: &str) -> Result<&'static str, String> {
    ARCHES
        .iter()
        .find(|(rust, _)| *rust == target_arch)
        .map(|(_, bpf)| *bpf)
        .ok_or_else(|| {
            format!("unsupported target architecture for the eBPF programs: {target_arch}")
        })
}

/// Compiles every program of [`PROGRAMS`] in `ebpf` (the `ebpf/` directory) for `arch` into `out`;
/// returns the sources it read (for cargo's rerun-if-changed).
pub fn compile_all(
    clang: &Path,
    ebpf: &Path,
    arch: &str,
    out: &Path,
) -> Result<Vec<PathBuf>, String> {
    if !Path::new("/usr/include/bpf/bpf_helpers.h").exists()
        && std::env::var_os("LIBBPF_INCLUDE").is_none()
    {
        return Err(
            "libbpf headers (bpf/bpf_helpers.h) not found: `apt-get install libbpf-dev` (or set LIBBPF_INCLUDE)"
                .to_owned(),
        );
    }
    let mut sources = Vec::new();
    for (prog, object, flags) in PROGRAMS {
        let src = ebpf.join(format!("{prog}.bpf.c"));
        let obj = out.join(format!("{object}.bpf.o"));
        let mut cmd = Command::new(clang);
        cmd.args([
            "-target", "bpf", "-O2", "-g", "-mcpu=v3", "-Wall", "-Werror",
        ])
        .arg(format!("-D__TARGET_ARCH_{arch}"))
        .args(*flags)
        .arg("-I")
        .arg(ebpf.join("include"))
        .arg("-I")
        .arg(ebpf);
        if let Some(inc) = std::env::var_os("LIBBPF_INCLUDE") {
            cmd.arg("-I").arg(inc);
        }
        cmd.arg("-c").arg(&src).arg("-o").arg(&obj);
        match cmd.status() {
            Ok(s) if s.success() => {}
            Ok(s) => {
                return Err(format!(
                    "{} failed ({s}) compiling {} for {arch}",
                    clang.display(),
                    src.display()
                ));
            }
            Err(e) => return Err(format!("could not run {}: {e}", clang.display())),
        }
        sources.push(src);
    }
    Ok(sources)
}

/// Debian installs clang as `clang-<N>`; honour `CLANG`, then try the usual names.
pub fn find_clang() -> Result<PathBuf, String> {
    if let Some(c) = std::env::var_os("CLANG") {
        return Ok(PathBuf::from(c));
    }
    for name in [
        "clang", "clang-19", "clang-18", "clang-17", "clang-16", "clang-15", "clang-14",
    ] {
        if Command::new(name)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Ok(PathBuf::from(name));
        }
    }
    Err(
        "no clang found to compile the eBPF programs: `apt-get install clang-19 libbpf-dev` (or set CLANG=/path/to/clang)"
            .to_owned(),
    )
}
