//! Least privilege: once the programs are loaded and attached and the maps are open, the agent drops
//! every capability it no longer needs.
//!
//! What the running agent still does, and what it needs for it:
//! - map updates, ring-buffer reads, program detach: nothing (the fds carry the access);
//! - read other processes' /proc entries (fds, sockets, namespaces, root): `CAP_SYS_PTRACE`, plus
//!   `CAP_DAC_READ_SEARCH` for processes of other users;
//! - read the hostname in another UTS namespace (setns): `CAP_SYS_ADMIN` — only if it was granted;
//! - write request logs where root may: `CAP_DAC_OVERRIDE`, only if it was granted.
//!
//! `CAP_BPF`, `CAP_PERFMON`, `CAP_SYS_RESOURCE`, `CAP_NET_*` and everything else go, from the effective,
//! permitted, inheritable, ambient and bounding sets. It must run before any other thread exists: Linux
//! capabilities are per thread, and threads inherit them when created.

use std::collections::HashSet;

use caps::{CapSet, Capability, CapsHashSet};

/// Capabilities kept after load (each only if the agent had it).
pub const KEPT: [Capability; 4] = [
    Capability::CAP_SYS_PTRACE,
    Capability::CAP_DAC_READ_SEARCH,
    Capability::CAP_SYS_ADMIN,
    Capability::CAP_DAC_OVERRIDE,
];

/// Drops all but [`KEPT`]; returns what is left in the effective set. Errors are returned for the
/// caller to log: running with more privileges than needed is not a reason to stop.
pub fn drop_after_load() -> Result<CapsHashSet, caps::errors::CapsError> {
    let kept: HashSet<Capability> = KEPT.into_iter().collect();
    // The bounding set first: shrinking it needs CAP_SETPCAP, which the next steps remove. The confined
    // deployments (deploy/: the DaemonSet, the systemd unit) do not grant CAP_SETPCAP, and there the
    // bounding set already holds only what was granted: skip it rather than fail, so that the steps
    // below still take CAP_BPF and CAP_PERFMON away.
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP)? {
        for cap in caps::read(None, CapSet::Bounding)? {
            if !kept.contains(&cap) {
                caps::drop(None, CapSet::Bounding, cap)?;
            }
        }
    }
    caps::clear(None, CapSet::Ambient)?;
    for set in [CapSet::Inheritable, CapSet::Effective, CapSet::Permitted] {
        let now = caps::read(None, set)?;
        let keep: CapsHashSet = now.intersection(&kept).copied().collect();
        caps::set(None, set, &keep)?;
    }
    caps::read(None, CapSet::Effective)
}
