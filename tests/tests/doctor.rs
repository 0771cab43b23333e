//! `servescope doctor` on this machine, and with the machine broken on purpose: each failure is faked
//! for real (a mount namespace without tracefs, an unprivileged user) and must be reported with its fix.

use std::process::Command;

use anyhow::{Context, Result, ensure};
use servescope_integration::{Agent, require_root};

fn doctor(prefix: &[&str], json: bool) -> Result<(i32, String)> {
    let bin = Agent::binary()?;
    let mut cmd = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(&bin);
            c
        }
        None => Command::new(&bin),
    };
    cmd.arg("doctor");
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().context("running servescope doctor")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.code().unwrap_or(-1), text))
}

#[test]
fn healthy_machine_passes_with_a_real_dry_run() -> Result<()> {
    require_root()?;
    let (code, text) = doctor(&[], false)?;
    ensure!(code == 0, "doctor failed on the CI machine:\n{text}");
    ensure!(
        text.contains("load+attach") && text.contains("every program loaded"),
        "{text}"
    );
    // NVML as this machine has it: a GPU host lists its devices, any other says the library is missing
    // (a warning: the agent runs, its GPU families stay empty).
    if std::path::Path::new("/dev/nvidiactl").exists() {
        ensure!(
            text.contains("[ok  ] nvml") && text.contains("device(s): GPU 0"),
            "{text}"
        );
    } else {
        ensure!(
            text.contains("[WARN] nvml") && text.contains("not found"),
            "{text}"
        );
        ensure!(
            text.contains("libnvidia-ml.so.1"),
            "no fix offered:\n{text}"
        );
    }
    let (code, json) = doctor(&[], true)?;
    ensure!(code == 0);
    let v: serde_json::Value = serde_json::from_str(&json).context("doctor --json is JSON")?;
    ensure!(
        v["checks"]
            .as_array()
            .is_some_and(|a| a.iter().all(|c| c["status"] != "fail")),
        "{json}"
    );
    Ok(())
}

#[test]
fn missing_tracefs_in_a_mount_namespace_is_a_failure_with_the_mount_command() -> Result<()> {
    require_root()?;
    // A private mount namespace where tracefs (and the debugfs fallback) are unmounted: the host keeps
    // its mounts.
    let script = "umount -l /sys/kernel/tracing 2>/dev/null; umount -l /sys/kernel/debug 2>/dev/null; exec \"$0\" doctor";
    let bin = Agent::binary()?;
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .arg(&bin)
        .output()
        .context("running doctor in a mount namespace")?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.code() == Some(1),
        "expected exit 1, got {:?}:\n{text}",
        out.status
    );
    ensure!(text.contains("[FAIL] tracefs"), "{text}");
    ensure!(
        text.contains("mount -t tracefs tracefs /sys/kernel/tracing"),
        "no fix offered:\n{text}"
    );
    Ok(())
}

#[test]
fn unprivileged_user_is_told_which_capabilities_are_missing() -> Result<()> {
    require_root()?;
    let (code, text) = doctor(
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ],
        false,
    )?;
    ensure!(
        code == 1,
        "expected exit 1 without privileges, got {code}:\n{text}"
    );
    ensure!(
        text.contains("[FAIL] capabilities") && text.contains("CAP_BPF"),
        "{text}"
    );
    ensure!(text.contains("[FAIL] load+attach"), "{text}");
    ensure!(!text.contains("panicked"), "{text}");
    Ok(())
}

/// Most instructions the verifier may process for any one program, and for all of them. The
/// verifier's work is most of the agent's start-up, and it can grow tenfold from a change that does
/// not alter what a program does: R34 (docs/decisions.md) copied the thread state before a switch on
/// its syscall number, clang could no longer fold the switch, and `ss_exit_write` went from 8,977 to
/// 120,812 processed instructions, start-up from 135 to 659 ms; R37's first build, 106,313. Measured
/// on 6.18: at most 14,492 for one program (`ss_sock_send`, whose frame walk is verified step by
/// step until its states converge), 69,237 for the 27 the doctor loads (both hook sets) since R44;
/// since R50 and R51 (the kernel's HTTP framing, a global function each data program carries, and
/// its call in every data path) 22,212 and 116,319, agent start-up 243–306 ms. The budgets leave
/// room for features, not for blow-ups like those.
const PER_PROGRAM_BUDGET: u64 = 30_000;
const TOTAL_BUDGET: u64 = 150_000;

#[test]
fn verifier_work_per_program_stays_within_budget() -> Result<()> {
    require_root()?;
    let (code, json) = doctor(&[], true)?;
    ensure!(code == 0, "doctor failed:\n{json}");
    let v: serde_json::Value = serde_json::from_str(&json).context("doctor --json is JSON")?;
    let programs = v["load"]["programs"]
        .as_array()
        .with_context(|| format!("no load.programs in the report:\n{json}"))?;
    // Every program the default options attach (reads have no entry programs on 5.15+).
    ensure!(
        programs.len() >= 20,
        "only {} programs reported:\n{json}",
        programs.len()
    );
    let mut total = 0;
    let mut over = Vec::new();
    for p in programs {
        let name = p["name"].as_str().unwrap_or("?");
        // 6.18 reports verified_insns (5.16+): a missing count is a broken report, not an old kernel.
        let insns = p["verified_insns"]
            .as_u64()
            .with_context(|| format!("{name}: no verified_insns in {p}"))?;
        ensure!(name.starts_with("ss_"), "unexpected program {name}");
        total += insns;
        if insns > PER_PROGRAM_BUDGET {
            over.push(format!("{name}: {insns}"));
        }
    }
    ensure!(
        over.is_empty(),
        "programs over the verifier budget of {PER_PROGRAM_BUDGET} instructions: {over:?}"
    );
    ensure!(
        total <= TOTAL_BUDGET,
        "the verifier processed {total} instructions in all, budget {TOTAL_BUDGET}:\n{json}"
    );
    Ok(())
}
