//! The system families against Prometheus's node_exporter (Debian's `prometheus-node-exporter`) on
//! the live machine: MemoryAvailable, MemoryUsed, DiskAvailable, DiskUsage and CPUUtilization as
//! servescope computes them (psutil's definitions) and as they follow from node_exporter's own series
//! over the same moments.
//!
//! node_exporter runs on an ephemeral loopback port for the test only (meminfo, cpu and filesystem
//! collectors) and is stopped at the end. Each of our readings is taken just before and just after
//! node_exporter's, so the machine's drift between them is bracketed.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use servescope::sampler::procfs::{CpuTimes, DiskStats, ProcRoot, cpu_percent};

const BINARY: &str = "/usr/bin/prometheus-node-exporter";
const MIB: f64 = 1024.0 * 1024.0;
const GIB: f64 = MIB * 1024.0;

/// node_exporter, killed on drop.
struct NodeExporter {
    child: Child,
    addr: SocketAddr,
}

impl Drop for NodeExporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl NodeExporter {
    fn start() -> Result<NodeExporter> {
        ensure!(
            Path::new(BINARY).exists(),
            "{BINARY} missing: apt-get install prometheus-node-exporter (.ci/run installs it)"
        );
        // An ephemeral port, released just before node_exporter binds it.
        let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let child = Command::new(BINARY)
            .arg(format!("--web.listen-address={addr}"))
            .args([
                "--collector.disable-defaults",
                "--collector.meminfo",
                "--collector.cpu",
                "--collector.filesystem",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {BINARY}"))?;
        let exporter = NodeExporter { child, addr };
        let deadline = Instant::now() + Duration::from_secs(10);
        while exporter.scrape().is_err() {
            if Instant::now() > deadline {
                bail!("node_exporter did not answer on {addr} within 10 s");
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(exporter)
    }

    /// `GET /metrics`: each sample line as (series text, value).
    fn scrape(&self) -> Result<BTreeMap<String, f64>> {
        let mut s = TcpStream::connect(self.addr)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        // HTTP/1.0: a plain body to the close, no chunked framing to undo.
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)?;
        let (head, body) = reply.split_once("\r\n\r\n").context("no response head")?;
        ensure!(head.contains(" 200 "), "node_exporter: {head}");
        let mut out = BTreeMap::new();
        for line in body
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            // Chunked framing lines (hex sizes) have no space and are skipped.
            if let Some((series, value)) = line.rsplit_once(' ')
                && let Ok(v) = value.parse::<f64>()
            {
                out.insert(series.to_owned(), v);
            }
        }
        Ok(out)
    }
}

fn get(m: &BTreeMap<String, f64>, series: &str) -> Result<f64> {
    m.get(series)
        .copied()
        .with_context(|| format!("node_exporter has no {series}"))
}

/// `value` within the range of our two readings, widened by `slack`.
fn bracketed(value: f64, ours: [f64; 2], slack: f64) -> bool {
    let (lo, hi) = (ours[0].min(ours[1]), ours[0].max(ours[1]));
    (lo - slack..=hi + slack).contains(&value)
}

/// The filesystem of `path` as node_exporter labels it: the longest mount point containing it.
fn mountpoint_of(m: &BTreeMap<String, f64>, path: &Path) -> Option<String> {
    m.keys()
        .filter_map(|k| k.strip_prefix("node_filesystem_avail_bytes{"))
        .filter_map(|labels| {
            let start = labels.find("mountpoint=\"")? + "mountpoint=\"".len();
            let rest = &labels[start..];
            Some(rest[..rest.find('"')?].to_owned())
        })
        .filter(|mp| path.starts_with(mp))
        .max_by_key(String::len)
}

#[test]
fn memory_and_disk_agree_with_node_exporter() -> Result<()> {
    let exporter = NodeExporter::start()?;
    let proc = ProcRoot::default();
    let path = std::env::temp_dir();

    let mem_before = proc.memory()?;
    let disk_before = DiskStats::of(&path)?;
    let m = exporter.scrape()?;
    let mem_after = proc.memory()?;
    let disk_after = DiskStats::of(&path)?;

    // Memory, MiB: MemAvailable, and MemTotal - MemAvailable (psutil's `used`).
    let total = get(&m, "node_memory_MemTotal_bytes")?;
    let available = get(&m, "node_memory_MemAvailable_bytes")?;
    assert_eq!(total, mem_before.total_bytes as f64);
    let slack = 16.0;
    let ne_available = available / MIB;
    let ne_used = (total - available) / MIB;
    assert!(
        bracketed(
            ne_available,
            [mem_before.available_mb(), mem_after.available_mb()],
            slack
        ),
        "MemoryAvailable {} / {} MiB, node_exporter {ne_available} MiB",
        mem_before.available_mb(),
        mem_after.available_mb()
    );
    assert!(
        bracketed(ne_used, [mem_before.used_mb(), mem_after.used_mb()], slack),
        "MemoryUsed {} / {} MiB, node_exporter {ne_used} MiB",
        mem_before.used_mb(),
        mem_after.used_mb()
    );

    // Disk, GiB, of the filesystem holding the temp dir: avail = bavail × bsize (psutil's free), and
    // size - free = (blocks - bfree) × bsize (psutil's used).
    let mp = mountpoint_of(&m, &path).with_context(|| {
        format!(
            "node_exporter lists no filesystem holding {}",
            path.display()
        )
    })?;
    let series = |family: &str| {
        m.iter()
            .find(|(k, _)| {
                k.starts_with(&format!("{family}{{")) && k.contains(&format!("mountpoint=\"{mp}\""))
            })
            .map(|(_, v)| *v)
            .with_context(|| format!("{family} of {mp}"))
    };
    let ne_avail = series("node_filesystem_avail_bytes")? / GIB;
    let ne_used =
        (series("node_filesystem_size_bytes")? - series("node_filesystem_free_bytes")?) / GIB;
    let slack = 0.25; // other jobs write to this disk meanwhile
    assert!(
        bracketed(
            ne_avail,
            [disk_before.available_gb(), disk_after.available_gb()],
            slack
        ),
        "DiskAvailable {} / {} GiB, node_exporter {ne_avail} GiB ({mp})",
        disk_before.available_gb(),
        disk_after.available_gb()
    );
    assert!(
        bracketed(
            ne_used,
            [disk_before.usage_gb(), disk_after.usage_gb()],
            slack
        ),
        "DiskUsage {} / {} GiB, node_exporter {ne_used} GiB ({mp})",
        disk_before.usage_gb(),
        disk_after.usage_gb()
    );
    Ok(())
}

/// node_exporter's `node_cpu_seconds_total` summed over CPUs: (busy, total) seconds as psutil counts
/// them (total of every mode; busy = total - idle - iowait; guest time is a separate family there and
/// already inside user/nice).
fn cpu_seconds(m: &BTreeMap<String, f64>) -> (f64, f64) {
    let (mut busy, mut total) = (0.0, 0.0);
    for (k, v) in m
        .iter()
        .filter(|(k, _)| k.starts_with("node_cpu_seconds_total{"))
    {
        total += v;
        if !k.contains("mode=\"idle\"") && !k.contains("mode=\"iowait\"") {
            busy += v;
        }
    }
    (busy, total)
}

#[test]
fn cpu_utilization_agrees_with_node_exporter() -> Result<()> {
    let exporter = NodeExporter::start()?;
    let proc = ProcRoot::default();
    // One core spinning, so the figure is well away from 0 and both sides must see it.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spin = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut x = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        })
    };
    let ours_0: CpuTimes = proc.cpu_times()?;
    let ne_0 = cpu_seconds(&exporter.scrape()?);
    thread::sleep(Duration::from_secs(3));
    let ne_1 = cpu_seconds(&exporter.scrape()?);
    let ours_1: CpuTimes = proc.cpu_times()?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = spin.join();

    let ours = cpu_percent(&ours_0, &ours_1);
    let (busy, total) = (ne_1.0 - ne_0.0, ne_1.1 - ne_0.1);
    ensure!(total > 0.0, "node_exporter's CPU time did not advance");
    let theirs = 100.0 * busy / total;
    // Our window holds node_exporter's plus two scrapes' worth of time either side: a few points.
    assert!(
        (ours - theirs).abs() <= 5.0,
        "CPUUtilization {ours} %, node_exporter {theirs} % over the same 3 s"
    );
    assert!(ours > 20.0, "a spinning core must show: {ours} %");
    Ok(())
}
