//! Which processes to trace: TorchServe frontends found in /proc, plus explicit `--pid` / `--port`
//! targets; and each target's hostname as TorchServe prints it (its own UTS namespace's hostname).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs,
    path::PathBuf,
};

use crate::registry::Flavor;

/// What identifies a TorchServe frontend on its command line.
pub const TORCHSERVE_MAIN_CLASS: &str = "org.pytorch.serve.ModelServer";

/// A process to trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub pid: u32,
    /// Process start time (clock ticks since boot): a PID reused by a new process is a new target.
    pub start_time: u64,
    pub flavor: Flavor,
}

/// Reads a procfs tree (`/proc`, or a fixture directory in tests).
#[derive(Clone, Debug)]
pub struct ProcFs {
    root: PathBuf,
}

impl Default for ProcFs {
    fn default() -> Self {
        ProcFs::new("/proc")
    }
}

/// What the operator asked to trace.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    pub torchserve: bool,
    pub pids: Vec<u32>,
    pub ports: Vec<u16>,
}

impl ProcFs {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ProcFs { root: root.into() }
    }

    fn path(&self, pid: u32, rest: &str) -> PathBuf {
        self.root.join(pid.to_string()).join(rest)
    }

    /// Every numeric entry of the proc root.
    pub fn pids(&self) -> Vec<u32> {
        let Ok(dir) = fs::read_dir(&self.root) else {
            return Vec::new();
        };
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect()
    }

    /// Start time of `pid` (field 22 of /proc/PID/stat), or `None` when it is gone.
    pub fn start_time(&self, pid: u32) -> Option<u64> {
        let stat = fs::read_to_string(self.path(pid, "stat")).ok()?;
        // The command name (field 2) may hold spaces and parentheses: fields resume after the last ')'.
        let after = &stat[stat.rfind(')')? + 1..];
        after.split_whitespace().nth(19)?.parse().ok()
    }

    /// Process state (field 3 of /proc/PID/stat: R, S, Z, ...), or `None` when it is gone.
    pub fn state(&self, pid: u32) -> Option<char> {
        let stat = fs::read_to_string(self.path(pid, "stat")).ok()?;
        stat[stat.rfind(')')? + 1..].trim_start().chars().next()
    }

    /// Parent PID of `pid` (field 4 of /proc/PID/stat), or `None` when it is gone.
    pub fn ppid(&self, pid: u32) -> Option<u32> {
        let stat = fs::read_to_string(self.path(pid, "stat")).ok()?;
        let after = &stat[stat.rfind(')')? + 1..];
        after.split_whitespace().nth(1)?.parse().ok()
    }

    /// `rest` under the process's directory (e.g. `cwd/MAR-INF/MANIFEST.json`).
    pub fn file(&self, pid: u32, rest: &str) -> PathBuf {
        self.path(pid, rest)
    }

    pub fn cmdline(&self, pid: u32) -> Option<Vec<String>> {
        let raw = fs::read(self.path(pid, "cmdline")).ok()?;
        Some(
            raw.split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect(),
        )
    }

    /// A JVM (`java`, any path) whose arguments name TorchServe's main class. The JVM check keeps out
    /// the processes that only *mention* the class, such as `pgrep -f` / `grep` in a liveness probe or
    /// a start script (TorchServe's own launcher checks its frontend that way).
    pub fn is_torchserve(&self, pid: u32) -> bool {
        self.cmdline(pid).is_some_and(|args| {
            let jvm = args.first().is_some_and(|a| {
                std::path::Path::new(a)
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("java"))
            });
            jvm && args.iter().any(|a| a == TORCHSERVE_MAIN_CLASS)
        })
    }

    /// Socket inodes listening on any of `ports` in `pid`'s network namespace.
    fn listening_inodes(&self, pid: u32, ports: &[u16]) -> HashSet<u64> {
        let mut out = HashSet::new();
        for table in ["net/tcp", "net/tcp6"] {
            let Ok(text) = fs::read_to_string(self.path(pid, table)) else {
                continue;
            };
            out.extend(parse_listeners(&text, ports));
        }
        out
    }

    /// Socket inodes among `pid`'s open fds.
    fn socket_inodes(&self, pid: u32) -> HashSet<u64> {
        let Ok(dir) = fs::read_dir(self.path(pid, "fd")) else {
            return HashSet::new();
        };
        dir.filter_map(|e| {
            let link = fs::read_link(e.ok()?.path()).ok()?;
            let s = link.to_str()?;
            s.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
    }

    /// TCP ports `pid` itself listens on (its own sockets, in its own network namespace), sorted.
    pub fn listening_ports(&self, pid: u32) -> Vec<u16> {
        let own = self.socket_inodes(pid);
        let mut ports: Vec<u16> = ["net/tcp", "net/tcp6"]
            .iter()
            .filter_map(|t| fs::read_to_string(self.path(pid, t)).ok())
            .flat_map(|text| listen_table(&text).collect::<Vec<_>>())
            .filter(|(_, inode)| own.contains(inode))
            .map(|(port, _)| port)
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    fn net_ns(&self, pid: u32) -> Option<PathBuf> {
        fs::read_link(self.path(pid, "ns/net")).ok()
    }

    /// The processes `sel` asks for, keyed by PID.
    pub fn scan(&self, sel: &Selection) -> BTreeMap<u32, Target> {
        let mut found = BTreeMap::new();
        let pids = self.pids();
        let mut add = |pid: u32, flavor: Flavor| {
            if let Some(start_time) = self.start_time(pid) {
                found.entry(pid).or_insert(Target {
                    pid,
                    start_time,
                    flavor,
                });
            }
        };
        if sel.torchserve {
            for &pid in &pids {
                // A child the frontend is spawning (a worker, the metrics collector) shows the
                // frontend's command line from fork until its exec: not a frontend of its own.
                if self.is_torchserve(pid)
                    && !self
                        .ppid(pid)
                        .is_some_and(|parent| self.is_torchserve(parent))
                {
                    add(pid, Flavor::TorchServe);
                }
            }
        }
        for &pid in &sel.pids {
            let flavor = if self.is_torchserve(pid) {
                Flavor::TorchServe
            } else {
                Flavor::Generic
            };
            add(pid, flavor);
        }
        if !sel.ports.is_empty() {
            // One listener table per network namespace, then the processes holding those sockets.
            let mut seen_ns = HashSet::new();
            let mut inodes = HashSet::new();
            for &pid in &pids {
                if let Some(ns) = self.net_ns(pid)
                    && seen_ns.insert(ns)
                {
                    inodes.extend(self.listening_inodes(pid, &sel.ports));
                }
            }
            if !inodes.is_empty() {
                for &pid in &pids {
                    if !self.socket_inodes(pid).is_disjoint(&inodes) {
                        let flavor = if self.is_torchserve(pid) {
                            Flavor::TorchServe
                        } else {
                            Flavor::Generic
                        };
                        add(pid, flavor);
                    }
                }
            }
        }
        found
    }
}

/// Inodes of LISTEN (state 0A) sockets on `ports` in a /proc/net/tcp{,6} table.
fn parse_listeners(text: &str, ports: &[u16]) -> Vec<u64> {
    listen_table(text)
        .filter(|(port, _)| ports.contains(port))
        .map(|(_, inode)| inode)
        .collect()
}

/// (port, inode) of every LISTEN (state 0A) socket in a /proc/net/tcp{,6} table.
fn listen_table(text: &str) -> impl Iterator<Item = (u16, u64)> + '_ {
    text.lines().skip(1).filter_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (local, state, inode) = (f.get(1)?, f.get(3)?, f.get(9)?);
        if *state != "0A" {
            return None;
        }
        let port = u16::from_str_radix(local.rsplit(':').next()?, 16).ok()?;
        Some((port, inode.parse().ok()?))
    })
}

/// Hostnames by UTS namespace, so a DaemonSet labels each pod's TorchServe with the pod's name.
#[derive(Debug, Default)]
pub struct Hostnames {
    by_ns: HashMap<PathBuf, String>,
}

impl Hostnames {
    /// The hostname `pid` sees (what TorchServe prints in `Hostname`), falling back to the agent's own
    /// when the namespace cannot be entered.
    pub fn of(&mut self, pid: u32) -> String {
        let ns = fs::read_link(format!("/proc/{pid}/ns/uts")).ok();
        let own = fs::read_link("/proc/self/ns/uts").ok();
        if let Some(ns) = &ns
            && let Some(h) = self.by_ns.get(ns)
        {
            return h.clone();
        }
        let name = if ns.is_some() && ns != own {
            hostname_in_ns_of(pid).unwrap_or_else(|e| {
                tracing::warn!(pid, error = %e, "cannot read the hostname of the target's UTS namespace; using the agent's own");
                own_hostname()
            })
        } else {
            own_hostname()
        };
        if let Some(ns) = ns {
            self.by_ns.insert(ns, name.clone());
        }
        name
    }
}

/// The agent's hostname (`uname -n`).
pub fn own_hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned())
}

/// Reads the hostname inside `pid`'s UTS namespace from a short-lived thread that joins it: setns on a
/// UTS namespace changes only the calling thread, so the agent itself is untouched.
fn hostname_in_ns_of(pid: u32) -> std::io::Result<String> {
    use std::os::fd::AsRawFd;
    let ns = fs::File::open(format!("/proc/{pid}/ns/uts"))?;
    std::thread::spawn(move || {
        // SAFETY: setns on a valid namespace fd; affects only this thread, which ends right after.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWUTS) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_owned())
    })
    .join()
    .map_err(|_| std::io::Error::other("hostname thread panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0000000000000000FFFF00000100007F:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0000000000000000FFFF00000100007F:1F90 0000000000000000FFFF00000100007F:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 20 4 30 10 -1
   2: 0000000000000000FFFF00000100007F:1F91 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn listeners_by_port() {
        assert_eq!(parse_listeners(TCP6, &[8080]), vec![4242]);
        assert_eq!(parse_listeners(TCP6, &[8081, 8080]), vec![4242, 4444]);
        assert!(parse_listeners(TCP6, &[9999]).is_empty());
        assert!(parse_listeners("garbage\nmore garbage", &[8080]).is_empty());
    }

    fn fixture() -> (tempfile::TempDir, ProcFs) {
        let d = tempfile::tempdir().expect("temp dir");
        let p = d.path().to_path_buf();
        // 100: TorchServe frontend; 200: a python worker; 300: something else; 400: a child the
        // frontend is spawning, between fork and exec (still the frontend's command line); 500: a
        // script looking for the frontend by its class name.
        let ts = "java\0-Dmodel_server_home=/x\0-cp\0a.jar\0org.pytorch.serve.ModelServer\0";
        for (pid, cmd, comm, ppid) in [
            (100, ts, "java", 1),
            (200, "python\0ts/model_service_worker.py\0", "python", 100),
            (300, "nginx\0", "ng (x) y", 1),
            (400, ts, "java", 100),
            (500, "grep\0-q\0org.pytorch.serve.ModelServer\0", "grep", 1),
        ] {
            let dir = p.join(pid.to_string());
            fs::create_dir_all(dir.join("fd")).expect("mkdir");
            fs::write(dir.join("cmdline"), cmd).expect("write");
            fs::write(
                dir.join("stat"),
                format!(
                    "{pid} ({comm}) S {ppid} 1 1 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 {} 1 1",
                    pid * 10
                ),
            )
            .expect("write");
        }
        (d, ProcFs::new(&p))
    }

    #[test]
    fn finds_torchserve_and_explicit_pids() {
        let (_d, proc) = fixture();
        let sel = Selection {
            torchserve: true,
            pids: vec![300, 999],
            ports: vec![],
        };
        let found = proc.scan(&sel);
        assert_eq!(
            found.keys().copied().collect::<Vec<_>>(),
            vec![100, 300],
            "neither the frontend's child between fork and exec (400) nor grep (500) is a frontend"
        );
        assert_eq!(proc.ppid(400), Some(100));
        assert_eq!(found[&100].flavor, Flavor::TorchServe);
        assert_eq!(found[&100].start_time, 1000);
        assert_eq!(found[&300].flavor, Flavor::Generic);
        assert_eq!(
            found[&300].start_time, 3000,
            "comm with spaces and parentheses"
        );
        let none = proc.scan(&Selection::default());
        assert!(none.is_empty());
    }
}
