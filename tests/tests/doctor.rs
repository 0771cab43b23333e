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
