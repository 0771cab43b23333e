//! The agent's kernel state as the kernel holds it, read with `bpftool`: tests assert that connection
//! state is freed (closed connections, exited processes), which the agent's own metrics cannot show.

use std::{fs, process::Command};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Keys `(tgid, fd)` of the connections in the `conns` map (struct ss_conn_key) of the agent process
/// `agent_pid`. Entries that only remember an untraced fd of a target (a log file; `family` 0,
/// FAMILY_IGNORED in sockets.bpf.c) are not connections and are left out.
///
/// The map is found through the agent's own file descriptors (`/proc/PID/fdinfo/*` names each BPF map's
/// id), so other servescope agents running on the machine, with maps of the same name, do not interfere.
pub fn conns_keys(agent_pid: u32) -> Result<Vec<(u32, i32)>> {
    let id = map_id(agent_pid, "conns")?;
    let out = bpftool(&["map", "dump", "id", &id.to_string()])?;
    let entries = out
        .as_array()
        .context("bpftool map dump: not a JSON array")?;
    entries
        .iter()
        .filter(|e| e["formatted"]["value"]["family"].as_u64() != Some(0))
        .map(|e| {
            let key = &e["formatted"]["key"];
            let tgid = key["tgid"]
                .as_u64()
                .context("no formatted key.tgid (map without BTF?)")?;
            let fd = key["fd"].as_i64().context("no formatted key.fd")?;
            Ok((u32::try_from(tgid)?, i32::try_from(fd)?))
        })
        .collect()
}

/// How many entries the agent's map called `name` holds (e.g. `args`: syscalls of traced threads
/// between their enter and exit; `targets`: traced processes).
pub fn map_len(agent_pid: u32, name: &str) -> Result<usize> {
    let id = map_id(agent_pid, name)?;
    let out = bpftool(&["map", "dump", "id", &id.to_string()])?;
    Ok(out
        .as_array()
        .context("bpftool map dump: not a JSON array")?
        .len())
}

/// Entries of `tgid` in the agent's `conns` map.
pub fn conns_of(agent_pid: u32, tgid: u32) -> Result<usize> {
    Ok(conns_keys(agent_pid)?
        .iter()
        .filter(|(t, _)| *t == tgid)
        .count())
}

/// The id of the BPF map called `name` among `pid`'s file descriptors.
fn map_id(pid: u32, name: &str) -> Result<u64> {
    let dir = format!("/proc/{pid}/fdinfo");
    for entry in fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        let Ok(text) = fs::read_to_string(entry?.path()) else {
            continue; // fd closed meanwhile
        };
        let Some(id) = text
            .lines()
            .find_map(|l| l.strip_prefix("map_id:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
        else {
            continue;
        };
        let info = bpftool(&["map", "show", "id", &id.to_string()])?;
        if info["name"].as_str() == Some(name) {
            return Ok(id);
        }
    }
    bail!("process {pid} holds no BPF map named {name:?}")
}

fn bpftool(args: &[&str]) -> Result<Value> {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .context("running bpftool (Debian package `bpftool`)")?;
    if !out.status.success() {
        bail!(
            "bpftool {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("parsing bpftool {}", args.join(" ")))
}
