//! TorchServe's system families from procfs and statvfs, with the definitions of TorchServe's
//! collector.
//!
//! TorchServe 0.12 runs `ts/metrics/metric_collector.py` every `metric_time_interval` (60 s), which
//! reads psutil (7.x as installed by its wheel). The definitions, from `ts/metrics/system_metrics.py`
//! and psutil's Linux code:
//!
//! | family | TorchServe | here |
//! |---|---|---|
//! | CPUUtilization | `psutil.cpu_percent()`: busy share of all CPU time since the previous call, rounded to 0.1 | the same formula over the sample interval |
//! | MemoryUsed | `virtual_memory().used / 2^20`, `used = MemTotal - MemAvailable` | the same |
//! | MemoryAvailable | `virtual_memory().available / 2^20` (`MemAvailable`) | the same |
//! | MemoryUtilization | `virtual_memory().percent`, `(total - available) / total`, rounded to 0.1 | the same |
//! | DiskUsage | `disk_usage('/').used / 2^30`, `used = (f_blocks - f_bfree) * f_frsize` | the same, of the model store's filesystem |
//! | DiskAvailable | `disk_usage('/').free / 2^30`, `free = f_bavail * f_frsize` | the same |
//! | DiskUtilization | `disk_usage('/').percent`, `used / (used + free)`, rounded to 0.1 | the same |
//!
//! TorchServe's collector is a new Python process each time, so its `cpu_percent()` compares the CPU
//! times of module import with those a few milliseconds later and mostly says `0.0` or `100.0`; here
//! the delta spans the whole sample interval. Disk figures describe the filesystem of the target's
//! model store (where its archives and unpacked models grow) instead of `/`; when the store cannot be
//! found, the target's own `/`, as TorchServe measures it.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use anyhow::Context;
use procfs_core::{ExplicitSystemInfo, FromRead, FromReadSI, KernelStats, Meminfo};

use crate::discovery::TORCHSERVE_MAIN_CLASS;

const MIB: f64 = 1024.0 * 1024.0;
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Python's `round(x, 1)`: correctly rounded, ties to even on the exact binary value, as Rust's
/// fixed-precision formatting.
pub fn round1(x: f64) -> f64 {
    format!("{x:.1}").parse().unwrap_or(x)
}

/// psutil's `usage_percent(used, total, round_=1)`: 0.0 for an empty total.
fn usage_percent(used: u64, total: u64) -> f64 {
    if total == 0 {
        return 0.0;
    }
    #[expect(
        clippy::cast_precision_loss,
        reason = "byte and tick counts stay far below 2^53, where f64 is exact"
    )]
    round1(used as f64 / total as f64 * 100.0)
}

#[expect(
    clippy::cast_precision_loss,
    reason = "byte counts stay far below 2^53 (8 PiB), where f64 is exact"
)]
fn bytes_f64(b: u64) -> f64 {
    b as f64
}

/// Cumulative CPU time of the whole machine in clock ticks: the `cpu` line of /proc/stat.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTimes {
    pub user: u64,
    pub nice: u64,
    pub system: u64,
    pub idle: u64,
    pub iowait: u64,
    pub irq: u64,
    pub softirq: u64,
    pub steal: u64,
    pub guest: u64,
    pub guest_nice: u64,
}

impl CpuTimes {
    /// Field-wise `self - earlier`, each clamped at zero: some counters step back now and then (psutil
    /// and top clamp the same way).
    fn since(&self, earlier: &CpuTimes) -> CpuTimes {
        CpuTimes {
            user: self.user.saturating_sub(earlier.user),
            nice: self.nice.saturating_sub(earlier.nice),
            system: self.system.saturating_sub(earlier.system),
            idle: self.idle.saturating_sub(earlier.idle),
            iowait: self.iowait.saturating_sub(earlier.iowait),
            irq: self.irq.saturating_sub(earlier.irq),
            softirq: self.softirq.saturating_sub(earlier.softirq),
            steal: self.steal.saturating_sub(earlier.steal),
            guest: self.guest.saturating_sub(earlier.guest),
            guest_nice: self.guest_nice.saturating_sub(earlier.guest_nice),
        }
    }

    /// psutil's `_cpu_tot_time`: every field, less guest time, which the kernel already counts in
    /// user and nice.
    fn total(&self) -> u64 {
        let all = self.user
            + self.nice
            + self.system
            + self.idle
            + self.iowait
            + self.irq
            + self.softirq
            + self.steal
            + self.guest
            + self.guest_nice;
        all.saturating_sub(self.guest + self.guest_nice)
    }

    /// psutil's `_cpu_busy_time`: total less idle and I/O wait (an idle CPU waiting for I/O is idle).
    fn busy(&self) -> u64 {
        self.total().saturating_sub(self.idle + self.iowait)
    }
}

/// psutil's `cpu_percent()` between two readings: busy share of the elapsed CPU time in percent,
/// rounded to one decimal; 0.0 when no time elapsed.
pub fn cpu_percent(before: &CpuTimes, after: &CpuTimes) -> f64 {
    let delta = after.since(before);
    usage_percent(delta.busy(), delta.total())
}

/// Memory as psutil's `virtual_memory()` sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Memory {
    pub total_bytes: u64,
    pub available_bytes: u64,
}

impl Memory {
    /// psutil's choice of "available": `MemAvailable`, or `MemFree + Cached` when the kernel does not
    /// report it (before 3.14) or reports 0; `MemFree` when it exceeds the total (as in some
    /// containers).
    fn from_meminfo(m: &Meminfo) -> Memory {
        let fallback = m.mem_free + m.cached;
        let available = match m.mem_available {
            Some(a) if a > 0 => a,
            _ => fallback,
        };
        let available = if available > m.mem_total {
            m.mem_free
        } else {
            available
        };
        Memory {
            total_bytes: m.mem_total,
            available_bytes: available,
        }
    }

    fn used_bytes(&self) -> u64 {
        self.total_bytes.saturating_sub(self.available_bytes)
    }

    /// MemoryUsed, in MiB (TorchServe's "Megabytes").
    pub fn used_mb(&self) -> f64 {
        bytes_f64(self.used_bytes()) / MIB
    }

    /// MemoryAvailable, in MiB.
    pub fn available_mb(&self) -> f64 {
        bytes_f64(self.available_bytes) / MIB
    }

    /// MemoryUtilization, in percent.
    pub fn utilization(&self) -> f64 {
        usage_percent(self.used_bytes(), self.total_bytes)
    }
}

/// A filesystem's size as statvfs reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskStats {
    pub fragment_size: u64,
    pub blocks: u64,
    pub blocks_free: u64,
    pub blocks_available: u64,
}

impl DiskStats {
    /// statvfs of the filesystem holding `path`.
    pub fn of(path: &Path) -> anyhow::Result<DiskStats> {
        let st =
            rustix::fs::statvfs(path).with_context(|| format!("statvfs {}", path.display()))?;
        Ok(DiskStats {
            fragment_size: st.f_frsize,
            blocks: st.f_blocks,
            blocks_free: st.f_bfree,
            blocks_available: st.f_bavail,
        })
    }

    /// psutil's `used`: everything not free, the root-reserved blocks included.
    fn used_bytes(&self) -> u64 {
        self.blocks.saturating_sub(self.blocks_free) * self.fragment_size
    }

    /// psutil's `free`: what an unprivileged user can still write.
    fn free_bytes(&self) -> u64 {
        self.blocks_available * self.fragment_size
    }

    /// DiskUsage, in GiB (TorchServe's "Gigabytes").
    pub fn usage_gb(&self) -> f64 {
        bytes_f64(self.used_bytes()) / GIB
    }

    /// DiskAvailable, in GiB.
    pub fn available_gb(&self) -> f64 {
        bytes_f64(self.free_bytes()) / GIB
    }

    /// DiskUtilization: used share of the space a user can use (used + free), as psutil and `df`
    /// compute it.
    pub fn utilization(&self) -> f64 {
        usage_percent(self.used_bytes(), self.used_bytes() + self.free_bytes())
    }
}

/// A procfs tree: the host's `/proc`, or a fixture directory in tests.
#[derive(Clone, Debug)]
pub struct ProcRoot {
    root: PathBuf,
}

impl Default for ProcRoot {
    fn default() -> Self {
        ProcRoot::new("/proc")
    }
}

impl ProcRoot {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ProcRoot { root: root.into() }
    }

    /// The machine's cumulative CPU times (`<root>/stat`).
    pub fn cpu_times(&self) -> anyhow::Result<CpuTimes> {
        let path = self.root.join("stat");
        // Only tick counts are used; the tick rate does not matter for their ratios.
        let info = ExplicitSystemInfo {
            boot_time_secs: 0,
            ticks_per_second: 100,
            page_size: 4096,
            is_little_endian: cfg!(target_endian = "little"),
        };
        let stats = KernelStats::from_file(&path, &info)
            .with_context(|| format!("reading {}", path.display()))?;
        let t = stats.total;
        Ok(CpuTimes {
            user: t.user,
            nice: t.nice,
            system: t.system,
            idle: t.idle,
            iowait: t.iowait.unwrap_or(0),
            irq: t.irq.unwrap_or(0),
            softirq: t.softirq.unwrap_or(0),
            steal: t.steal.unwrap_or(0),
            guest: t.guest.unwrap_or(0),
            guest_nice: t.guest_nice.unwrap_or(0),
        })
    }

    /// The machine's memory (`<root>/meminfo`).
    pub fn memory(&self) -> anyhow::Result<Memory> {
        let path = self.root.join("meminfo");
        let m = Meminfo::from_file(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(Memory::from_meminfo(&m))
    }

    /// Where to statvfs for `pid`'s disk figures, as a path the agent can use: its model store seen
    /// through the process's own root or working directory (so a container's store resolves inside
    /// the container), or, when no store is found, the process's root directory.
    pub fn disk_path(&self, pid: u32) -> PathBuf {
        let proc = self.root.join(pid.to_string());
        let store = fs::read(proc.join("cmdline")).ok().and_then(|raw| {
            let args = split_nul(&raw);
            let env = fs::read(proc.join("environ"))
                .map(|raw| parse_environ(&raw))
                .unwrap_or_default();
            model_store(&args, &env, |file| {
                read_config(&in_process(&proc, Path::new(file)))
            })
        });
        match store {
            Some(store) => in_process(&proc, Path::new(&store)),
            None => self.root_of(pid),
        }
    }

    /// CPU time (user + system, seconds) and resident memory (bytes) of one process, from
    /// `<root>/PID/stat` and `<root>/PID/statm` (per-worker families, workers.rs).
    pub fn process_usage(&self, pid: u32) -> anyhow::Result<(f64, f64)> {
        let dir = self.root.join(pid.to_string());
        let stat = procfs_core::process::Stat::from_file(dir.join("stat"))
            .with_context(|| format!("reading {}/stat", dir.display()))?;
        let statm = procfs_core::process::StatM::from_file(dir.join("statm"))
            .with_context(|| format!("reading {}/statm", dir.display()))?;
        // SAFETY: sysconf has no preconditions.
        let (hz, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        #[expect(
            clippy::cast_precision_loss,
            reason = "tick and page counts of one process fit f64's mantissa"
        )]
        Ok((
            (stat.utime + stat.stime) as f64 / hz.max(1) as f64,
            statm.resident as f64 * page.max(1) as f64,
        ))
    }

    /// `pid`'s root directory (its `/`, which is a container's own root filesystem).
    pub fn root_of(&self, pid: u32) -> PathBuf {
        self.root.join(pid.to_string()).join("root")
    }
}

/// A config file named by the target, read up to 1 MiB: the name comes from the target's environment
/// and command line, and could be anything (`/dev/zero` included).
fn read_config(path: &Path) -> Option<String> {
    use std::io::Read as _;
    const LIMIT: u64 = 1024 * 1024;
    let file = fs::File::open(path).ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut text = String::new();
    file.take(LIMIT).read_to_string(&mut text).ok()?;
    Some(text)
}

/// `path` as the process under `proc` (a `/proc/<pid>` directory) sees it: absolute paths through its
/// root, relative ones through its working directory.
fn in_process(proc: &Path, path: &Path) -> PathBuf {
    match path.strip_prefix("/") {
        Ok(rel) => proc.join("root").join(rel),
        Err(_) => proc.join("cwd").join(path),
    }
}

fn split_nul(raw: &[u8]) -> Vec<String> {
    raw.split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

fn parse_environ(raw: &[u8]) -> HashMap<String, String> {
    split_nul(raw)
        .into_iter()
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_owned(), v.to_owned()))
        })
        .collect()
}

/// The model store a TorchServe frontend uses, as its `ConfigManager` decides (0.12): the
/// `model_store` of its config file (`$TS_CONFIG_FILE`, else `-f`/`--ts-config-file`, else
/// `config.properties` in its working directory), overridden by `-s`/`--model-store`, overridden by
/// `$TS_MODEL_STORE` when the config enables `enable_envvars_config`. `read` reads a file named as the
/// process names it. The path may be relative to the process's working directory.
///
/// `None` for processes that are not TorchServe frontends or name no store. TorchServe's fallback to
/// the last config snapshot (when started without a config file) is not followed.
pub fn model_store(
    args: &[String],
    env: &HashMap<String, String>,
    read: impl Fn(&str) -> Option<String>,
) -> Option<String> {
    // Only the application's arguments count; JVM options come before the main class.
    let main = args.iter().position(|a| a == TORCHSERVE_MAIN_CLASS)?;
    let app = &args[main + 1..];
    let config_file = env
        .get("TS_CONFIG_FILE")
        .cloned()
        .or_else(|| option_value(app, "f", "ts-config-file"))
        .unwrap_or_else(|| "config.properties".to_owned());
    let props = read(&config_file)
        .map(|text| parse_properties(&text, env))
        .unwrap_or_default();
    let mut store = props.get("model_store").cloned();
    if let Some(s) = option_value(app, "s", "model-store") {
        store = Some(s);
    }
    let envvars = props
        .get("enable_envvars_config")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    if envvars && let Some(s) = env.get("TS_MODEL_STORE") {
        store = Some(s.clone());
    }
    store.filter(|s| !s.is_empty())
}

/// The first value of a commons-cli option given as `-s V`, `--long V` or `--long=V`.
fn option_value(args: &[String], short: &str, long: &str) -> Option<String> {
    let short = format!("-{short}");
    let long_flag = format!("--{long}");
    let long_eq = format!("--{long}=");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if *a == short || *a == long_flag {
            return it.next().cloned();
        }
        if let Some(v) = a.strip_prefix(&long_eq) {
            return Some(v.to_owned());
        }
    }
    None
}

/// A Java `.properties` file as `java.util.Properties.load` reads it (comments, `=`/`:`/space
/// separators, line continuations, backslash escapes), then TorchServe's `$$VAR$$` substitution from
/// the process's environment. A later key wins, as in Java.
fn parse_properties(text: &str, env: &HashMap<String, String>) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut lines = text.lines();
    while let Some(first) = lines.next() {
        let mut logical = first.trim_start().to_owned();
        if logical.is_empty() || logical.starts_with('#') || logical.starts_with('!') {
            continue;
        }
        // An odd number of trailing backslashes continues the line; the next line's indent is dropped.
        while logical.chars().rev().take_while(|c| *c == '\\').count() % 2 == 1 {
            logical.pop();
            match lines.next() {
                Some(next) => logical.push_str(next.trim_start()),
                None => break,
            }
        }
        let (key, value) = split_property(&logical);
        out.insert(key, substitute_env(&value, env));
    }
    out
}

/// Splits a logical line at the first unescaped `=`, `:` or whitespace, and unescapes both halves.
fn split_property(line: &str) -> (String, String) {
    let chars: Vec<char> = line.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '\\' => i += 2,
            '=' | ':' => break,
            c if c.is_whitespace() => break,
            _ => i += 1,
        }
    }
    let key: String = chars[..i.min(chars.len())].iter().collect();
    let mut j = i;
    while j < chars.len() && chars[j].is_whitespace() {
        j += 1;
    }
    if j < chars.len() && matches!(chars[j], '=' | ':') {
        j += 1;
        while j < chars.len() && chars[j].is_whitespace() {
            j += 1;
        }
    }
    let value: String = chars[j.min(chars.len())..].iter().collect();
    (unescape(&key), unescape(&value))
}

/// Java properties escapes: `\t`, `\n`, `\r`, `\f`, `\uXXXX`; any other escaped character is itself.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('f') => out.push('\u{c}'),
            Some('u') => {
                let hex: String = it.by_ref().take(4).collect();
                if let Some(ch) = u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32) {
                    out.push(ch);
                }
            }
            Some(other) => out.push(other),
            None => {}
        }
    }
    out
}

/// TorchServe's `$$NAME$$` references to environment variables (`ConfigManager.resolveEnvVarVals`).
/// An unset variable makes TorchServe refuse to start; here the reference is kept verbatim.
fn substitute_env(value: &str, env: &HashMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("$$") {
        let after = &rest[start + 2..];
        let Some(len) = after.find("$$").filter(|&n| n > 0) else {
            break;
        };
        let name = &after[..len];
        out.push_str(&rest[..start]);
        match env.get(name) {
            Some(v) => out.push_str(v),
            None => out.push_str(&rest[start..start + 2 + len + 2]),
        }
        rest = &after[len + 2..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|a| (*a).to_owned()).collect()
    }

    const STAT: &str = "cpu  {user} 10 {system} {idle} 40 0 5 0 {guest} 0
cpu0 1 1 1 1 1 1 1 1 1 1
intr 1 2 3
ctxt 12345
btime 1700000000
processes 42
procs_running 1
procs_blocked 0
";

    fn stat(user: u64, system: u64, idle: u64, guest: u64) -> String {
        STAT.replace("{user}", &user.to_string())
            .replace("{system}", &system.to_string())
            .replace("{idle}", &idle.to_string())
            .replace("{guest}", &guest.to_string())
    }

    /// A /proc/meminfo as kernel 6.x prints it (the fields procfs-core insists on included).
    fn meminfo(total_kb: u64, free_kb: u64, available_kb: Option<u64>, cached_kb: u64) -> String {
        let avail = available_kb.map_or(String::new(), |a| format!("MemAvailable:   {a:>8} kB\n"));
        format!(
            "MemTotal:       {total_kb:>8} kB\nMemFree:        {free_kb:>8} kB\n{avail}\
             Buffers:            1024 kB\nCached:         {cached_kb:>8} kB\nSwapCached:            0 kB\n\
             Active:          1000000 kB\nInactive:         900000 kB\nSwapTotal:             0 kB\n\
             SwapFree:              0 kB\nDirty:                12 kB\nWriteback:             0 kB\n\
             Mapped:           200000 kB\nShmem:              8000 kB\nSlab:             150000 kB\n\
             SReclaimable:     100000 kB\nCommitted_AS:    3000000 kB\nVmallocTotal:   34359738367 kB\n\
             VmallocUsed:       40000 kB\nVmallocChunk:          0 kB\n"
        )
    }

    fn fixture(files: &[(&str, &str)]) -> (tempfile::TempDir, ProcRoot) {
        let d = tempfile::tempdir().expect("temp dir");
        for (name, text) in files {
            let p = d.path().join(name);
            fs::create_dir_all(p.parent().expect("has parent")).expect("mkdir");
            fs::write(p, text).expect("write");
        }
        let root = ProcRoot::new(d.path());
        (d, root)
    }

    #[test]
    fn cpu_from_stat_deltas_as_psutil() -> anyhow::Result<()> {
        let (d, proc) = fixture(&[("stat", &stat(1000, 300, 5000, 50))]);
        let before = proc.cpu_times()?;
        assert_eq!(
            before,
            CpuTimes {
                user: 1000,
                nice: 10,
                system: 300,
                idle: 5000,
                iowait: 40,
                softirq: 5,
                guest: 50,
                ..CpuTimes::default()
            }
        );
        // +150 user (of which 30 guest), +50 system, +290 idle: busy 200 of 490 ticks (guest is
        // already in user) = 40.816...% → 40.8.
        fs::write(d.path().join("stat"), stat(1150, 350, 5290, 80))?;
        let after = proc.cpu_times()?;
        assert_eq!(cpu_percent(&before, &after), 40.8);
        // No time elapsed: psutil answers 0.0, not NaN.
        assert_eq!(cpu_percent(&after, &after), 0.0);
        // Fully busy, fully idle.
        let busy = CpuTimes {
            user: 2150,
            ..after
        };
        assert_eq!(cpu_percent(&after, &busy), 100.0);
        let idle = CpuTimes {
            idle: 6290,
            iowait: 500,
            ..after
        };
        assert_eq!(cpu_percent(&after, &idle), 0.0);
        // A counter that steps back counts as zero, not as a huge wrapped delta.
        let back = CpuTimes {
            idle: 5000,
            user: 1160,
            ..after
        };
        assert_eq!(cpu_percent(&after, &back), 100.0);
        Ok(())
    }

    #[test]
    fn memory_from_meminfo_as_psutil() -> anyhow::Result<()> {
        // The golden capture's machine: MemTotal 24682416 kB, MemAvailable 24109556 kB →
        // MemoryUsed 559.43359375, MemoryAvailable 23544.48828125, MemoryUtilization 2.3.
        let (d, proc) = fixture(&[(
            "meminfo",
            &meminfo(24_682_416, 21_000_000, Some(24_109_556), 2_000_000),
        )]);
        let m = proc.memory()?;
        assert_eq!(m.available_mb(), 23544.48828125);
        assert_eq!(m.used_mb(), 559.43359375);
        assert_eq!(m.utilization(), 2.3);

        // No MemAvailable (kernel < 3.14): MemFree + Cached.
        fs::write(
            d.path().join("meminfo"),
            meminfo(1_048_576, 262_144, None, 131_072),
        )?;
        let m = proc.memory()?;
        assert_eq!(m.available_mb(), 384.0);
        assert_eq!(m.used_mb(), 640.0);
        assert_eq!(m.utilization(), 62.5);

        // MemAvailable 0 (a kernel bug psutil works around) falls back the same way.
        fs::write(
            d.path().join("meminfo"),
            meminfo(1_048_576, 262_144, Some(0), 131_072),
        )?;
        assert_eq!(proc.memory()?.available_mb(), 384.0);

        // More available than total (some containers): MemFree.
        fs::write(
            d.path().join("meminfo"),
            meminfo(1_048_576, 262_144, Some(2_000_000), 131_072),
        )?;
        assert_eq!(proc.memory()?.available_mb(), 256.0);
        Ok(())
    }

    #[test]
    fn unreadable_proc_files_are_errors_with_the_path() {
        let (_d, proc) = fixture(&[("stat", "garbage\n"), ("meminfo", "MemTotal: x kB\n")]);
        let e = format!("{:#}", proc.cpu_times().expect_err("must fail"));
        assert!(e.contains("/stat"), "{e}");
        let e = format!("{:#}", proc.memory().expect_err("must fail"));
        assert!(e.contains("/meminfo"), "{e}");
    }

    #[test]
    fn disk_as_psutil() {
        // 4 KiB fragments; 5% reserved for root: used counts reserved-free blocks out, percent is of
        // what a user can use (df's Use%).
        let d = DiskStats {
            fragment_size: 4096,
            blocks: 26_214_400,
            blocks_free: 23_000_000,
            blocks_available: 21_689_280,
        };
        assert_eq!(d.usage_gb(), 12.261962890625);
        assert_eq!(d.available_gb(), 82.738037109375);
        assert_eq!(d.utilization(), 12.9);
        let empty = DiskStats {
            fragment_size: 4096,
            blocks: 0,
            blocks_free: 0,
            blocks_available: 0,
        };
        assert_eq!(empty.utilization(), 0.0);
    }

    #[test]
    fn rounding_matches_python() {
        // round(x, 1) in Python 3.11.
        assert_eq!(round1(2.25), 2.2);
        assert_eq!(round1(2.35), 2.4); // 2.35 is 2.35000000000000008882 in binary
        assert_eq!(round1(0.05), 0.1); // 0.05000000000000000277
        assert_eq!(round1(99.96), 100.0);
        assert_eq!(round1(0.0), 0.0);
    }

    #[test]
    fn model_store_from_arguments_config_and_environment() {
        let env = HashMap::new();
        let none = |_: &str| None;
        let jvm = [
            "java",
            "-Dmodel_server_home=/x",
            "-cp",
            "a.jar",
            TORCHSERVE_MAIN_CLASS,
        ];
        let args = |extra: &[&str]| s(&[&jvm[..], extra].concat());

        // What `torchserve --start` passes.
        let a = args(&[
            "--python",
            "/v/bin/python",
            "-f",
            "config.properties",
            "-s",
            "model-store",
            "-ncs",
        ]);
        assert_eq!(model_store(&a, &env, none).as_deref(), Some("model-store"));
        assert_eq!(
            model_store(&args(&["--model-store=/srv/m"]), &env, none).as_deref(),
            Some("/srv/m")
        );
        assert_eq!(
            model_store(&args(&["--model-store", "/srv/m"]), &env, none).as_deref(),
            Some("/srv/m")
        );
        // Not TorchServe, or no store anywhere.
        assert_eq!(model_store(&s(&["python3", "-s", "/x"]), &env, none), None);
        assert_eq!(model_store(&args(&[]), &env, none), None);

        // From the config file named by -f, relative names as given.
        let config = |want: &'static str, text: &'static str| {
            move |f: &str| (f == want).then(|| text.to_owned())
        };
        let props =
            "# comment\n! other comment\nmodels={\\\n  \"a\": 1\\\n}\nmodel_store = /data/store\n";
        assert_eq!(
            model_store(
                &args(&["-f", "/etc/ts.properties"]),
                &env,
                config("/etc/ts.properties", props)
            )
            .as_deref(),
            Some("/data/store")
        );
        // Without -f: config.properties in the working directory.
        assert_eq!(
            model_store(
                &args(&[]),
                &env,
                config("config.properties", "model_store:ms\n")
            )
            .as_deref(),
            Some("ms")
        );
        // -s beats the config file.
        assert_eq!(
            model_store(
                &args(&["-s", "cli"]),
                &env,
                config("config.properties", props)
            )
            .as_deref(),
            Some("cli")
        );

        // $TS_CONFIG_FILE beats -f; $$VAR$$ is substituted; TS_MODEL_STORE wins only when enabled.
        let env: HashMap<String, String> = [
            ("TS_CONFIG_FILE", "/env.properties"),
            ("STORE", "/mnt/models"),
            ("TS_MODEL_STORE", "/from-env"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        let text = "model_store=$$STORE$$/store\n";
        assert_eq!(
            model_store(
                &args(&["-f", "other"]),
                &env,
                config("/env.properties", text)
            )
            .as_deref(),
            Some("/mnt/models/store")
        );
        let enabled = "enable_envvars_config=true\nmodel_store=/cfg\n";
        assert_eq!(
            model_store(
                &args(&["-s", "cli"]),
                &env,
                config("/env.properties", enabled)
            )
            .as_deref(),
            Some("/from-env")
        );
    }

    #[test]
    fn properties_syntax() {
        let env = HashMap::new();
        let p = parse_properties(
            "a=1\n  b : 2\nc 3\nd\\ e=4\nf=x\\\n    y\ng=\\u0041\\t\nempty=\n",
            &env,
        );
        assert_eq!(p["a"], "1");
        assert_eq!(p["b"], "2");
        assert_eq!(p["c"], "3");
        assert_eq!(p["d e"], "4");
        assert_eq!(p["f"], "xy");
        assert_eq!(p["g"], "A\t");
        assert_eq!(p["empty"], "");
        assert_eq!(substitute_env("$$NOPE$$/x", &env), "$$NOPE$$/x");
        assert_eq!(substitute_env("a$$b", &env), "a$$b");
    }

    /// Runs `cmd` and returns the numbers of the first output line that starts with `prefix` and
    /// holds numbers (headers do not).
    fn numbers(cmd: &[&str], prefix: &str) -> Vec<u64> {
        let out = std::process::Command::new(cmd[0])
            .args(&cmd[1..])
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        assert!(out.status.success(), "{cmd:?}: {}", out.status);
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .filter(|l| l.trim_start().starts_with(prefix))
            .map(|l| {
                l.split_whitespace()
                    .filter_map(|w| w.parse().ok())
                    .collect::<Vec<u64>>()
            })
            .find(|n| !n.is_empty())
            .unwrap_or_else(|| panic!("no {prefix:?} line with numbers in {cmd:?}:\n{text}"))
    }

    /// `value` lies within the range of `ours` widened by `slack` (the machine changes between
    /// readings, so the other tool's reading is taken between two of ours).
    fn bracketed(value: f64, ours: [f64; 2], slack: f64) -> bool {
        let (lo, hi) = (ours[0].min(ours[1]), ours[0].max(ours[1]));
        (lo - slack..=hi + slack).contains(&value)
    }

    /// Against procps's `free` on the live machine: "available" is MemAvailable, "used" is total
    /// minus available (procps-ng 4), both in bytes.
    #[test]
    fn live_memory_matches_free() -> anyhow::Result<()> {
        let proc = ProcRoot::default();
        let before = proc.memory()?;
        let free = numbers(&["free", "-b"], "Mem:");
        let after = proc.memory()?;
        // total used free shared buff/cache available
        let [total, used, .., available] = free[..] else {
            panic!("unexpected free output: {free:?}");
        };
        assert_eq!(total, before.total_bytes);
        let slack = 16.0; // MiB
        let mib = |b: u64| bytes_f64(b) / MIB;
        assert!(
            bracketed(
                mib(available),
                [before.available_mb(), after.available_mb()],
                slack
            ),
            "MemoryAvailable {} / {} MiB, free says {} MiB",
            before.available_mb(),
            after.available_mb(),
            mib(available)
        );
        assert!(
            bracketed(mib(used), [before.used_mb(), after.used_mb()], slack),
            "MemoryUsed {} / {} MiB, free says {} MiB",
            before.used_mb(),
            after.used_mb(),
            mib(used)
        );
        Ok(())
    }

    /// Against coreutils' `df` on the live machine: Used is (blocks - bfree) × frsize, Avail is
    /// bavail × frsize.
    #[test]
    fn live_disk_matches_df() -> anyhow::Result<()> {
        let path = std::env::temp_dir();
        let before = DiskStats::of(&path)?;
        let df = numbers(
            &["df", "-B1", "--output=used,avail", &path.to_string_lossy()],
            "",
        );
        let after = DiskStats::of(&path)?;
        let [used, avail] = df[..] else {
            panic!("unexpected df output: {df:?}");
        };
        let slack = 0.25; // GiB: other jobs write to this disk meanwhile
        let gib = |b: u64| bytes_f64(b) / GIB;
        assert!(
            bracketed(
                gib(avail),
                [before.available_gb(), after.available_gb()],
                slack
            ),
            "DiskAvailable {} / {} GiB, df says {} GiB",
            before.available_gb(),
            after.available_gb(),
            gib(avail)
        );
        assert!(
            bracketed(gib(used), [before.usage_gb(), after.usage_gb()], slack),
            "DiskUsage {} / {} GiB, df says {} GiB",
            before.usage_gb(),
            after.usage_gb(),
            gib(used)
        );
        Ok(())
    }

    /// A spinning thread on a 2-core machine makes the CPU at least ~half busy: the figure is a real
    /// delta, not psutil's usual instantaneous 0.0.
    #[test]
    fn live_cpu_sees_a_busy_core() -> anyhow::Result<()> {
        let proc = ProcRoot::default();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spin = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        };
        let before = proc.cpu_times()?;
        std::thread::sleep(std::time::Duration::from_millis(500));
        let after = proc.cpu_times()?;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        spin.join().expect("spinner");
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let pct = cpu_percent(&before, &after);
        #[expect(clippy::cast_precision_loss, reason = "a core count is small")]
        let one_core = 100.0 / cores as f64;
        assert!(
            pct >= one_core * 0.8 && pct <= 100.0,
            "CPUUtilization {pct} with one of {cores} cores spinning"
        );
        Ok(())
    }

    #[test]
    fn disk_path_resolves_through_the_process() -> anyhow::Result<()> {
        let d = tempfile::tempdir()?;
        let proc = d.path();
        let pid_dir = proc.join("77");
        fs::create_dir_all(pid_dir.join("cwd/model-store"))?;
        fs::create_dir_all(pid_dir.join("root/srv/store"))?;
        let cmd = format!("java\0-cp\0x\0{TORCHSERVE_MAIN_CLASS}\0-s\0model-store\0");
        fs::write(pid_dir.join("cmdline"), cmd)?;
        fs::write(pid_dir.join("environ"), "HOME=/root\0")?;
        let root = ProcRoot::new(proc);
        assert_eq!(root.disk_path(77), pid_dir.join("cwd/model-store"));

        let cmd = format!("java\0{TORCHSERVE_MAIN_CLASS}\0--model-store=/srv/store\0");
        fs::write(pid_dir.join("cmdline"), cmd)?;
        assert_eq!(root.disk_path(77), pid_dir.join("root/srv/store"));

        // The config file is read through the process too.
        fs::write(
            pid_dir.join("cmdline"),
            format!("java\0{TORCHSERVE_MAIN_CLASS}\0"),
        )?;
        fs::write(
            pid_dir.join("cwd/config.properties"),
            "model_store=/srv/store\n",
        )?;
        assert_eq!(root.disk_path(77), pid_dir.join("root/srv/store"));

        // A config "file" that is not a regular file is not read.
        fs::create_dir_all(pid_dir.join("root/dev"))?;
        std::os::unix::fs::symlink("/dev/zero", pid_dir.join("root/dev/zero"))?;
        fs::write(pid_dir.join("environ"), "TS_CONFIG_FILE=/dev/zero\0")?;
        assert_eq!(root.disk_path(77), pid_dir.join("root"));

        // Not TorchServe, or gone: the process's (or nobody's) root.
        fs::write(pid_dir.join("cmdline"), "python3\0-m\0http.server\0")?;
        assert_eq!(root.disk_path(77), pid_dir.join("root"));
        assert_eq!(root.disk_path(78), proc.join("78/root"));
        Ok(())
    }
}
