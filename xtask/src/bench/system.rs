//! What the bench reads from the machine: a process's CPU time and RSS (procfs), the kernel-side run time
//! of the agent's BPF programs (`bpf_stats_enabled` + bpftool) and the machine facts RESULTS.md records.
//! (The agent's connection map is read with the harness's `kernel::conns_keys`.)

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{Read as _, Write as _},
    net::TcpListener,
    os::unix::net::UnixStream,
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::Value;
use servescope_integration::cleanup::{self, Registration};

/// A process's CPU time at one moment, for the time it used over a window ([`CpuSample::since`]).
///
/// `/proc/PID/stat` counts in clock ticks (10 ms): at TorchServe's rates the agent uses a few tens
/// of milliseconds over a run, so a tick either way moved its per-1k figure by a third (quick runs
/// read 0.0 and 2.2 %/1k back to back). Each thread's `schedstat` counts nanoseconds on CPU.
#[derive(Debug, Clone)]
pub struct CpuSample {
    /// utime + stime of the whole process, dead threads included, in seconds.
    ticks_s: f64,
    /// Nanoseconds on CPU of each live thread (`/proc/PID/task/TID/schedstat`, first field).
    threads: BTreeMap<u32, u64>,
}

impl CpuSample {
    /// Seconds of CPU the process used since `earlier`: exact from the threads' nanoseconds when
    /// every thread of `earlier` is still alive (a new thread counts whole); otherwise from the ticks,
    /// since a thread that exited took its nanoseconds with it.
    pub fn since(&self, earlier: &CpuSample) -> f64 {
        let mut ns = 0u64;
        for (tid, was) in &earlier.threads {
            match self.threads.get(tid) {
                Some(now) => ns += now.saturating_sub(*was),
                None => return self.ticks_s - earlier.ticks_s,
            }
        }
        for (tid, now) in &self.threads {
            if !earlier.threads.contains_key(tid) {
                ns += now;
            }
        }
        ns as f64 / 1e9
    }
}

/// [`CpuSample`] of `pid` now.
pub fn cpu_sample(pid: u32) -> Result<CpuSample> {
    let ticks_s = cpu_seconds(pid)?;
    let dir = format!("/proc/{pid}/task");
    let mut threads = BTreeMap::new();
    for tid in numbered_entries(&dir)? {
        // A thread that exits between the listing and the read is simply not in the sample.
        let Ok(text) = fs::read_to_string(format!("{dir}/{tid}/schedstat")) else {
            continue;
        };
        let ns = text
            .split_whitespace()
            .next()
            .and_then(|f| f.parse::<u64>().ok())
            .with_context(|| format!("unexpected {dir}/{tid}/schedstat: {text}"))?;
        threads.insert(tid, ns);
    }
    Ok(CpuSample { ticks_s, threads })
}

/// The names of `dir`'s entries that are numbers: the pids of /proc, the tids of /proc/PID/task.
/// An entry that vanishes while listed is left out.
fn numbered_entries(dir: &str) -> Result<Vec<u32>> {
    Ok(fs::read_dir(dir)
        .with_context(|| format!("listing {dir}"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .collect())
}

/// Field `n` (numbered from 1 as in proc(5)) of a `/proc/PID/stat` line, as a number. Field 2 (comm)
/// is in parentheses and may contain spaces: fields are counted after the last ')', where field 3
/// (state) begins.
fn stat_field(stat: &str, n: usize) -> Option<f64> {
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(n.checked_sub(3)?)?
        .parse()
        .ok()
}

/// CPU time a process has used so far, in seconds (utime + stime of all its threads, /proc/PID/stat).
fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let tick = |n: usize| -> Result<f64> {
        stat_field(&text, n).with_context(|| format!("no field {n} in {path}: {text}"))
    };
    // utime and stime, in clock ticks.
    Ok((tick(14)? + tick(15)?) / clock_ticks())
}

/// Seconds since this process started. `cargo xtask bench` compiles xtask and then runs it by exec
/// (`cargo run` replaces itself on Unix), so from a clean checkout this counts that compile too:
/// part of the bench's time, which nothing else in the process could see. None if /proc says nothing.
pub fn seconds_since_process_started() -> Option<f64> {
    // starttime, in clock ticks since boot.
    let start_ticks = stat_field(&fs::read_to_string("/proc/self/stat").ok()?, 22)?;
    let uptime: f64 = fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((uptime - start_ticks / clock_ticks()).max(0.0))
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Resident set size of a process in KiB (VmRSS from /proc/PID/status).
pub fn rss_kib(pid: u32) -> Result<u64> {
    status_kib(pid, "VmRSS:")
}

/// Peak resident set size in KiB (VmHWM).
pub fn peak_rss_kib(pid: u32) -> Result<u64> {
    status_kib(pid, "VmHWM:")
}

/// The part of a process's RSS that is BPF map memory mapped into it (the ring buffer: the kernel maps
/// its data pages twice, back to back, so readers never see a wrapped record, and RSS counts both), in
/// KiB, from /proc/PID/smaps.
pub fn bpf_map_rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/smaps");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let mut in_bpf_map = false;
    let mut kib = 0;
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            // A mapping header: `start-end perms offset dev inode [name]`.
            in_bpf_map = line.ends_with("anon_inode:bpf-map");
        } else if in_bpf_map && first == "Rss:" {
            kib += fields
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(kib)
}

fn status_kib(pid: u32, key: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {key} in {path}"))
}

/// The BPF program and map ids a process holds open, from the `prog_id:` / `map_id:` lines of its fds'
/// fdinfo. This identifies *our* agent's objects even when other agents (concurrent tests) have loaded
/// programs with the same names; Debian's bpftool does not report owning PIDs.
fn bpf_ids(pid: u32, key: &str) -> Result<BTreeSet<u64>> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut ids = BTreeSet::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        let Ok(entry) = entry else { continue };
        // An fd may close between listing and reading: skip it.
        let Ok(text) = fs::read_to_string(entry.path()) else {
            continue;
        };
        for line in text.lines() {
            if let Some(v) = line.strip_prefix(key)
                && let Ok(id) = v.trim().parse()
            {
                ids.insert(id);
            }
        }
    }
    Ok(ids)
}

fn bpftool_json(args: &[&str]) -> Result<Value> {
    let out = Command::new("bpftool")
        .args(args)
        .arg("-j")
        .output()
        .context("running bpftool (Debian: `apt-get install bpftool`)")?;
    if !out.status.success() {
        bail!(
            "`bpftool {} -j` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("parsing the output of `bpftool {} -j`", args.join(" ")))
}

/// Processes that hold BPF programs named `ss_*`, as `pid (comm)`; called before the bench starts an
/// agent of its own: another servescope would tax the agent-off runs as much as the agent-on ones.
pub fn other_agents() -> Result<Vec<String>> {
    let all = bpftool_json(&["prog", "show"])?;
    let ids: BTreeSet<u64> = all
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"].as_str().is_some_and(|n| n.starts_with("ss_")))
        .filter_map(|p| p["id"].as_u64())
        .collect();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut holders = Vec::new();
    for pid in numbered_entries("/proc")? {
        // A process may exit while it is read: then it holds nothing.
        let Ok(held) = bpf_ids(pid, "prog_id:") else {
            continue;
        };
        if !held.is_disjoint(&ids) {
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            holders.push(format!("{pid} ({})", comm.trim()));
        }
    }
    if holders.is_empty() {
        // Loaded but held by no process: pinned, or links left in bpffs.
        holders.push(format!("no process (program ids {ids:?}; pinned?)"));
    }
    Ok(holders)
}

/// Run statistics of one BPF program (kept by the kernel while `kernel.bpf_stats_enabled` is 1).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProgStats {
    pub name: String,
    pub run_cnt: u64,
    pub run_time_ns: u64,
}

/// Run statistics of the agent's programs (names starting `ss_`), by program name.
pub fn prog_stats(agent_pid: u32) -> Result<BTreeMap<String, ProgStats>> {
    let ours = bpf_ids(agent_pid, "prog_id:")?;
    let all = bpftool_json(&["prog", "show"])?;
    let mut stats = BTreeMap::new();
    for p in all.as_array().into_iter().flatten() {
        let id = p["id"].as_u64().unwrap_or(0);
        let name = p["name"].as_str().unwrap_or_default();
        if !ours.contains(&id) || !name.starts_with("ss_") {
            continue;
        }
        stats.insert(
            name.to_owned(),
            ProgStats {
                name: name.to_owned(),
                run_cnt: p["run_cnt"].as_u64().unwrap_or(0),
                run_time_ns: p["run_time_ns"].as_u64().unwrap_or(0),
            },
        );
    }
    if stats.is_empty() {
        bail!("agent pid {agent_pid} holds no BPF programs named ss_*");
    }
    Ok(stats)
}

/// `after - before` per program.
pub fn prog_delta(
    before: &BTreeMap<String, ProgStats>,
    after: &BTreeMap<String, ProgStats>,
) -> Vec<ProgStats> {
    let mut out: Vec<ProgStats> = after
        .values()
        .map(|a| {
            let b = before.get(&a.name).cloned().unwrap_or_default();
            ProgStats {
                name: a.name.clone(),
                run_cnt: a.run_cnt.saturating_sub(b.run_cnt),
                run_time_ns: a.run_time_ns.saturating_sub(b.run_time_ns),
            }
        })
        .filter(|p| p.run_cnt > 0)
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.run_time_ns));
    out
}

/// Turns on `kernel.bpf_stats_enabled` while alive and restores the previous value afterwards (also on
/// Ctrl-C, through the cleanup registry). The kernel then times every BPF program run, which itself
/// costs a little, so the bench enables it only for the runs that report program run time.
pub struct BpfStats {
    _restore: Registration,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    pub fn enable() -> Result<BpfStats> {
        let old = fs::read_to_string(BPF_STATS)
            .with_context(|| format!("reading {BPF_STATS}"))?
            .trim()
            .to_owned();
        fs::write(BPF_STATS, "1").with_context(|| format!("writing 1 to {BPF_STATS}"))?;
        let restore = cleanup::register(move || {
            if let Err(e) = fs::write(BPF_STATS, &old) {
                eprintln!("could not restore {BPF_STATS} to {old}: {e}");
            }
        });
        Ok(BpfStats { _restore: restore })
    }
}

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr().context("reading the bound address")?.port())
}

/// Mean cost of one syscall made by a process the agent does not trace, ns.
#[derive(Clone, Copy, Debug)]
pub struct SyscallNs {
    /// Nothing but the syscall entry/exit path.
    pub getppid: f64,
    /// 64 bytes to /dev/null: hooked at entry and exit, the programs find no target and return.
    pub write: f64,
    /// 64 bytes from /dev/zero: hooked at exit only on 5.15+ (docs/decisions.md R34).
    pub read: f64,
    /// 64 bytes written to one end of a unix socketpair and read from the other: two socket calls,
    /// which run the socket hooks' programs too (they stop at the thread's state, R43).
    pub socket: f64,
}

/// [`bystander_syscall_ns`] times the socketpair round this many times fewer than the other calls.
pub const SOCKET_SHARE: u32 = 5;

/// Times syscalls of this process, which the agent does not trace ([`SyscallNs`]). Each figure is the
/// median of five batches of `iterations`, so a batch that was preempted does not set it.
pub fn bystander_syscall_ns(iterations: u32) -> Result<SyscallNs> {
    let mut null = fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .context("opening /dev/null")?;
    let mut zero = fs::File::open("/dev/zero").context("opening /dev/zero")?;
    let mut buf = [0u8; 64];
    let per_call_of = |iterations: u32, f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        let mut batches = Vec::with_capacity(5);
        for _ in 0..5 {
            let t0 = Instant::now();
            for _ in 0..iterations {
                f()?;
            }
            batches.push(t0.elapsed().as_nanos() as f64 / f64::from(iterations));
        }
        batches.sort_by(f64::total_cmp);
        Ok(batches[2])
    };
    let per_call = |f: &mut dyn FnMut() -> Result<()>| per_call_of(iterations, f);
    // glibc does not cache getppid: every call is a syscall.
    let getppid = per_call(&mut || {
        std::hint::black_box(std::os::unix::process::parent_id());
        Ok(())
    })?;
    let write = per_call(&mut || {
        // `write`, not `write_all`: one syscall per call; /dev/null takes all 64 bytes.
        let n = null
            .write(std::hint::black_box(&buf))
            .context("writing to /dev/null")?;
        if n != buf.len() {
            bail!("/dev/null took {n} of {} bytes", buf.len());
        }
        Ok(())
    })?;
    let read = per_call(&mut || {
        // `read`, not `read_exact`: one syscall per call; /dev/zero fills all 64 bytes.
        let n = zero
            .read(std::hint::black_box(&mut buf))
            .context("reading /dev/zero")?;
        if n != buf.len() {
            bail!("/dev/zero gave {n} of {} bytes", buf.len());
        }
        Ok(())
    })?;
    let (mut tx, mut rx) = UnixStream::pair().context("creating a unix socketpair")?;
    // A fifth as many: a socketpair round is ~10 times a getppid, and the full bench runs this 30
    // times (5 pairs, 3 ways of running the agent).
    let socket = per_call_of((iterations / SOCKET_SHARE).max(1), &mut || {
        // One write and one read, each a single syscall: the pair's buffer takes 64 bytes at once
        // and the read finds all of them queued.
        let n = tx
            .write(std::hint::black_box(&buf))
            .context("writing to a unix socket")?;
        let m = rx
            .read(std::hint::black_box(&mut buf))
            .context("reading from a unix socket")?;
        if n != buf.len() || m != buf.len() {
            bail!(
                "a unix socketpair moved {n} then {m} of {} bytes",
                buf.len()
            );
        }
        Ok(())
    })?;
    Ok(SyscallNs {
        getppid,
        write,
        read,
        socket,
    })
}

/// Facts about the machine and the checkout, recorded with the results.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub kernel: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub memory_gib: f64,
    pub date_utc: String,
    pub git_commit: String,
    pub wrk: String,
    /// 1-minute load average when the bench started and when it ended: other work on the machine
    /// shows up here and makes the numbers noisier.
    pub loadavg_start: String,
    pub loadavg_end: String,
    /// Share of the machine's CPU time the hypervisor gave to other guests during the run (steal):
    /// on a shared VM the same commit measures far apart when this is high.
    pub steal_percent: Option<f64>,
    /// `/proc/stat`'s (steal, total) ticks when the bench started.
    #[serde(skip)]
    pub cpu_ticks_start: Option<(u64, u64)>,
}

impl Machine {
    pub fn collect() -> Machine {
        let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
        let cpu_model = read("/proc/cpuinfo")
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, m)| m.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let memory_gib = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
        let commit = command_line("git", &["rev-parse", "--short=12", "HEAD"]);
        let dirty =
            !command_line("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
        Machine {
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            cpu_model,
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            memory_gib: (memory_gib * 10.0).round() / 10.0,
            date_utc: command_line("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]),
            git_commit: if dirty {
                format!("{commit} (with uncommitted changes)")
            } else {
                commit
            },
            wrk: command_line("wrk", &["--version"])
                .split_whitespace()
                .nth(1)
                .unwrap_or("?")
                .to_owned(),
            loadavg_start: loadavg(),
            loadavg_end: String::new(),
            steal_percent: None,
            cpu_ticks_start: cpu_ticks(),
        }
    }

    /// Called when the bench ends: the steal over the whole run.
    pub fn finish(&mut self) {
        self.loadavg_end = loadavg();
        self.steal_percent = self.cpu_ticks_start.zip(cpu_ticks()).and_then(
            |((steal0, total0), (steal1, total1))| {
                let total = total1.checked_sub(total0).filter(|t| *t > 0)?;
                #[expect(clippy::cast_precision_loss, reason = "tick counts, a percentage")]
                Some(steal1.saturating_sub(steal0) as f64 * 100.0 / total as f64)
            },
        );
    }
}

/// The first line a command prints (stdout or stderr; wrk prints its version on stderr), or "".
fn command_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .current_dir(servescope_integration::workspace_root())
        .output()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

/// (steal, total) CPU ticks of the whole machine, from the `cpu` line of /proc/stat (user, nice,
/// system, idle, iowait, irq, softirq, steal; guest time is already inside user).
fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let ticks = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .take(8)
        .map(|f| f.parse::<u64>().ok())
        .collect::<Option<Vec<_>>>()?;
    (ticks.len() == 8).then(|| (ticks[7], ticks.iter().sum()))
}

/// The three load averages from /proc/loadavg.
pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use std::{thread, time::Duration};

    use super::*;

    fn sample(ticks_s: f64, threads: &[(u32, u64)]) -> CpuSample {
        CpuSample {
            ticks_s,
            threads: threads.iter().copied().collect(),
        }
    }

    #[test]
    fn cpu_windows_count_nanoseconds_and_fall_back_to_ticks_when_a_thread_is_gone() {
        let a = sample(1.00, &[(10, 5_000_000), (11, 1_000)]);
        // Both threads alive, one new: 2 ms + 1 µs + 0.5 ms, not the ticks' 0 or 10 ms.
        let b = sample(1.00, &[(10, 7_000_000), (11, 2_000), (12, 500_000)]);
        assert!((b.since(&a) - 0.002_501).abs() < 1e-9, "{}", b.since(&a));
        // Thread 11 exited: its nanoseconds are lost, the process's ticks are not.
        let c = sample(1.03, &[(10, 9_000_000)]);
        assert!((c.since(&a) - 0.03).abs() < 1e-9, "{}", c.since(&a));
    }

    #[test]
    fn cpu_sample_of_a_busy_thread_tracks_its_time() {
        let pid = std::process::id();
        let before = cpu_sample(pid).expect("sampling");
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed().as_millis() < 50 {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        std::hint::black_box(x);
        let used = cpu_sample(pid).expect("sampling").since(&before);
        // 50 ms of spinning, give or take other tests' threads and a preempted slice.
        assert!((0.02..5.0).contains(&used), "{used} s");
    }

    #[test]
    fn time_since_the_process_started_counts_what_ran_before() {
        let before = seconds_since_process_started().expect("reading /proc");
        let t0 = Instant::now();
        thread::sleep(Duration::from_millis(300));
        let after = seconds_since_process_started().expect("reading /proc");
        // The boot clock and ticks of 10 ms: the sleep shows, within two ticks; the process is
        // younger than an hour.
        let slept = t0.elapsed().as_secs_f64();
        assert!(
            (after - before - slept).abs() < 0.03 && after < 3600.0,
            "{before} s then {after} s since start, {slept} s apart"
        );
    }

    #[test]
    fn bystander_syscalls_cost_a_plausible_time() {
        let c = bystander_syscall_ns(2_000).expect("measuring");
        // A syscall takes 50 ns to tens of µs on any machine this runs on; 0, NaN or seconds mean
        // the loop measured nothing or the wrong unit.
        for (name, ns) in [
            ("getppid", c.getppid),
            ("write", c.write),
            ("read", c.read),
            ("socket", c.socket),
        ] {
            assert!(
                ns.is_finite() && (20.0..100_000.0).contains(&ns),
                "{name}: {ns} ns"
            );
        }
    }
}
