//! Compiles the C CO-RE programs in `ebpf/` with Debian's clang and leaves the objects in `OUT_DIR`,
//! where `probes.rs` embeds them. Decision and reasons: DESIGN.md §1.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

/// (source, object, extra clang flags). `sockets` is built twice: with per-thread state in task-local
/// storage (the fast path), and with it in an LRU hash for kernels whose tracepoint programs cannot use
/// task storage; `probes.rs` loads the first that the kernel accepts.
const PROGRAMS: &[(&str, &str, &[&str])] = &[
    ("sockets", "sockets", &["-DSS_TASK_STORAGE"]),
    ("sockets", "sockets_compat", &[]),
];

fn main() {
    let manifest =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let ebpf = manifest.join("../ebpf");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-env-changed=CLANG");
    println!(
        "cargo:rerun-if-changed={}",
        ebpf.join("include/events.h").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        ebpf.join("vmlinux.h").display()
    );

    let clang = find_clang();
    if !Path::new("/usr/include/bpf/bpf_helpers.h").exists()
        && env::var_os("LIBBPF_INCLUDE").is_none()
    {
        fail(
            "libbpf headers (bpf/bpf_helpers.h) not found: `apt-get install libbpf-dev` (or set LIBBPF_INCLUDE)",
        );
    }
    let arch = match env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("x86_64") => "x86",
        Ok("aarch64") => "arm64",
        Ok(other) => fail(&format!(
            "unsupported target architecture for the eBPF programs: {other}"
        )),
        Err(_) => "x86",
    };
    for (prog, object, flags) in PROGRAMS {
        let src = ebpf.join(format!("{prog}.bpf.c"));
        println!("cargo:rerun-if-changed={}", src.display());
        let obj = out.join(format!("{object}.bpf.o"));
        let mut cmd = Command::new(&clang);
        cmd.args([
            "-target", "bpf", "-O2", "-g", "-mcpu=v3", "-Wall", "-Werror",
        ])
        .arg(format!("-D__TARGET_ARCH_{arch}"))
        .args(*flags)
        .arg("-I")
        .arg(ebpf.join("include"))
        .arg("-I")
        .arg(&ebpf);
        if let Some(inc) = env::var_os("LIBBPF_INCLUDE") {
            cmd.arg("-I").arg(inc);
        }
        cmd.arg("-c").arg(&src).arg("-o").arg(&obj);
        match cmd.status() {
            Ok(s) if s.success() => {}
            Ok(s) => fail(&format!(
                "{} failed ({s}) compiling {}",
                clang.display(),
                src.display()
            )),
            Err(e) => fail(&format!("could not run {}: {e}", clang.display())),
        }
    }
}

/// Debian installs clang as `clang-<N>`; honour `CLANG`, then try the usual names.
fn find_clang() -> PathBuf {
    if let Some(c) = env::var_os("CLANG") {
        return PathBuf::from(c);
    }
    for name in [
        "clang", "clang-19", "clang-18", "clang-17", "clang-16", "clang-15", "clang-14",
    ] {
        if Command::new(name)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return PathBuf::from(name);
        }
    }
    fail(
        "no clang found to compile the eBPF programs: `apt-get install clang-19 libbpf-dev` (or set CLANG=/path/to/clang)",
    )
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1)
}
