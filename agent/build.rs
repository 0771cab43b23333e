//! Compiles the C CO-RE programs in `ebpf/` with Debian's clang and leaves the objects in `OUT_DIR`,
//! where `probes.rs` embeds them. Decision and reasons: DESIGN.md §1. How they are compiled is in
//! `ebpf_build.rs`, which `cargo xtask test` shares to compile them for the other architecture too.

#[path = "ebpf_build.rs"]
mod ebpf_build;

use std::{env, path::PathBuf};

fn main() {
    let manifest =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let ebpf = manifest.join("../ebpf");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo:rerun-if-env-changed=LIBBPF_INCLUDE");
    println!("cargo:rerun-if-changed=ebpf_build.rs");
    for header in ["include/events.h", "vmlinux.h"] {
        println!("cargo:rerun-if-changed={}", ebpf.join(header).display());
    }
    let arch = match env::var("CARGO_CFG_TARGET_ARCH") {
        Ok(target) => ebpf_build::bpf_arch(&target).unwrap_or_else(|e| fail(&e)),
        Err(_) => "x86",
    };
    let clang = ebpf_build::find_clang().unwrap_or_else(|e| fail(&e));
    match ebpf_build::compile_all(&clang, &ebpf, arch, &out) {
        Ok(sources) => {
            for src in sources {
                println!("cargo:rerun-if-changed={}", src.display());
            }
        }
        Err(e) => fail(&e),
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1)
}
