//! `cargo xtask demo`: a real TorchServe, the agent watching it, traffic, and both /metrics side by side.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    net::TcpListener,
    path::Path,
    process::Command,
    sync::atomic::{AtomicI32, Ordering},
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use servescope_integration::{
    Agent, Metrics, Series, TorchServe, TorchServeHome, cleanup, ensure_kernel_prereqs,
    require_root, target_dir, torchserve::loopback,
};

use crate::tasks::{self, build, setup_torchserve};

/// The agent's port: TorchServe keeps its own metrics API on 8082 so the two can be compared.
const AGENT_PORT: u16 = 9082;

/// The TorchServe families the agent fills today (the others are announced HELP/TYPE-only).
const SERVED: [&str; 15] = [
    "Requests2XX",
    "Requests4XX",
    "Requests5XX",
    "ts_inference_requests_total",
    "ts_inference_latency_microseconds",
    "ts_queue_latency_microseconds",
    "QueueTime",
    "CPUUtilization",
    "MemoryUsed",
    "MemoryAvailable",
    "MemoryUtilization",
    "DiskUsage",
    "DiskAvailable",
    "DiskUtilization",
    "GPUUtilization",
];

pub fn run(release: bool, n: u32) -> Result<()> {
    // First, so Ctrl-C at any point goes through the cleanup of what was started so far.
    stop_everything_on_signal()?;
    require_root().context("the demo loads eBPF programs and may install packages")?;
    install_missing_packages()?;
    ensure_kernel_prereqs()?;
    let bin = build(release)?;
    let home = TorchServeHome::default();
    setup_torchserve(&home)?;
    if let Err(e) = TcpListener::bind(("127.0.0.1", AGENT_PORT)) {
        bail!(
            "127.0.0.1:{AGENT_PORT} is taken ({e}); the demo serves the agent there. See `ss -ltnp 'sport = :{AGENT_PORT}'`"
        );
    }

    let logs = target_dir().join("demo");
    if logs.exists() {
        fs::remove_dir_all(&logs).with_context(|| format!("clearing {}", logs.display()))?;
    }
    fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;

    eprintln!("\n== starting TorchServe 0.12.0 (models echo, slow, fail) ==");
    let ts = home.start(&logs)?;
    eprintln!(
        "TorchServe pid {} ready in {:.1?}: inference 127.0.0.1:8080, its own metrics 127.0.0.1:8082",
        ts.pid(),
        ts.startup_time()
    );

    eprintln!("\n== starting servescope on 127.0.0.1:{AGENT_PORT} (auto-discovery) ==");
    let mut agent = Agent::start_binary(&bin, &logs, loopback(AGENT_PORT), &[])?;
    agent.echo_log_on_drop(false);
    let result = demo_with(&home, &ts, &agent, &logs, n);
    if result.is_err() {
        eprintln!(
            "---- servescope log ({}) ----\n{}",
            agent.log_path().display(),
            agent.log_tail()
        );
    }
    eprintln!("\n== stopping servescope and TorchServe ==");
    drop(agent);
    ts.stop();
    result
}

fn demo_with(
    home: &TorchServeHome,
    ts: &TorchServe,
    agent: &Agent,
    logs: &Path,
    n: u32,
) -> Result<()> {
    let ready = agent.wait_ready(Duration::from_secs(15))?;
    eprintln!(
        "servescope traces {} process(es)",
        ready.sum("servescope_targets")
    );

    eprintln!(
        "\n== traffic: tests/torchserve/traffic.py --n {n} (keep-alive, pipelining, chunked, errors, every route) =="
    );
    let traffic = home.traffic(logs, &["--n", &n.to_string()])?;
    if let Some(steps) = traffic.summary["steps"].as_array() {
        for step in steps {
            let name = step["step"].as_str().unwrap_or("?");
            let status: Vec<String> = step["status"]
                .as_object()
                .map(|m| m.iter().map(|(k, v)| format!("{k}x{v}")).collect())
                .unwrap_or_default();
            eprintln!("  {name:<42} {}", status.join(" "));
        }
    }
    eprintln!(
        "{} responses in {:.1?}",
        traffic.total_requests()?,
        traffic.duration
    );

    // TorchServe first: its scrape is itself a 200 that the agent sees and counts (TorchServe counts it
    // only after rendering, so its own scrape does not include it). The agent also missed run.sh's /ping,
    // which happened before it started, so the two Requests2XX values come out equal.
    let ts_text = ts.scrape_text("")?;
    let ts_m = Metrics::parse(&ts_text).context("parsing TorchServe's /metrics")?;
    let want = ts_m.sum("Requests2XX");
    let agent_m = agent
        .wait_until(Duration::from_secs(5), "Requests2XX caught up", |m| {
            m.sum("Requests2XX") >= want
        })
        .or_else(|_| agent.scrape())?;
    let agent_text = agent.scrape_text("")?;
    let (ts_file, agent_file) = (
        logs.join("torchserve_metrics.txt"),
        logs.join("servescope_metrics.txt"),
    );
    fs::write(&ts_file, &ts_text).context("saving TorchServe's scrape")?;
    fs::write(&agent_file, &agent_text).context("saving the agent's scrape")?;

    println!("\n{}", side_by_side(&ts_m, &agent_m));
    println!("servescope's own families (histogram buckets left out; see the full scrape):");
    for line in agent_text
        .lines()
        .filter(|l| l.starts_with("servescope_") && !l.contains("_bucket{"))
    {
        println!("  {line}");
    }
    println!(
        "\nFull scrapes: {} and {}",
        ts_file.display(),
        agent_file.display()
    );
    Ok(())
}

/// The TorchServe families the agent serves, series by series: TorchServe's value, the agent's, and
/// for latency sums their ratio. Hostname labels are shown once above the table.
fn side_by_side(ts: &Metrics, agent: &Metrics) -> String {
    let mut out = String::new();
    let hosts = |m: &Metrics| {
        let mut h = m.label_values("Hostname");
        h.extend(m.label_values("hostname"));
        h.into_iter().collect::<Vec<_>>().join(",")
    };
    let _ = writeln!(
        out,
        "TorchServe's /metrics (127.0.0.1:8082) next to servescope's (127.0.0.1:{AGENT_PORT})"
    );
    let _ = writeln!(
        out,
        "hostname label: TorchServe {:?}, servescope {:?}\n",
        hosts(ts),
        hosts(agent)
    );
    let mut rows: Vec<(String, String, String, String)> = Vec::new();
    for family in SERVED {
        let keys: BTreeSet<Series> = ts
            .series(family)
            .chain(agent.series(family))
            .map(|(s, _)| short(s))
            .collect();
        let (t, a): (BTreeMap<Series, f64>, BTreeMap<Series, f64>) = (
            ts.series(family).map(|(s, v)| (short(s), v)).collect(),
            agent.series(family).map(|(s, v)| (short(s), v)).collect(),
        );
        if keys.is_empty() {
            rows.push((family.to_owned(), "-".into(), "-".into(), String::new()));
        }
        for key in keys {
            let (tv, av) = (t.get(&key), a.get(&key));
            let note = match (tv, av) {
                (Some(t), Some(a)) if family.contains("latency") && *t > 0.0 => {
                    format!("ratio {:.3}", a / t)
                }
                (Some(t), Some(a)) if t == a => "=".to_owned(),
                (Some(_), Some(_)) => "differs".to_owned(),
                _ => String::new(),
            };
            rows.push((key.to_string(), fmt_value(tv), fmt_value(av), note));
        }
    }
    let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0).max(6);
    let _ = writeln!(
        out,
        "{:<width$}  {:>16}  {:>16}",
        "series", "TorchServe", "servescope"
    );
    for (series, t, a, note) in rows {
        let _ = writeln!(out, "{series:<width$}  {t:>16}  {a:>16}  {note}");
    }
    // Families TorchServe announces that have no servescope sample yet (no source, or no GPU here).
    let unserved: Vec<&String> = ts
        .types
        .keys()
        .filter(|f| agent.series(f).next().is_none())
        .collect();
    let _ = writeln!(
        out,
        "\nTorchServe families without servescope samples here ({}) are announced with HELP/TYPE only: no \
         source yet (worker-side tracing), or no GPU on this machine. System gauges are sampled at other \
         moments than TorchServe's collector, so they differ a little.",
        unserved
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    out
}

/// A series without its hostname and `Level="Host"` labels, for a narrower table.
fn short(s: &Series) -> Series {
    let labels = s
        .labels
        .iter()
        .filter(|(k, v)| k != "Hostname" && k != "hostname" && !(k == "Level" && v == "Host"))
        .cloned()
        .collect();
    Series {
        name: s.name.clone(),
        labels,
    }
}

fn fmt_value(v: Option<&f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v}"))
}

/// Installs, with apt, the packages whose tools are missing. Checked by what the build and TorchServe
/// need (a command or a header), not by package name, so tools installed some other way count.
fn install_missing_packages() -> Result<()> {
    let ok = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let mut missing = Vec::new();
    let clang_ok = std::env::var_os("CLANG").is_some()
        || ["clang-19", "clang-18", "clang-17", "clang"]
            .iter()
            .any(|c| ok(c, &["--version"]));
    if !clang_ok {
        missing.push("clang-19");
    }
    if !Path::new("/usr/include/bpf/bpf_helpers.h").exists()
        && std::env::var_os("LIBBPF_INCLUDE").is_none()
    {
        missing.push("libbpf-dev");
    }
    if !ok("bpftool", &["version"]) && !ok("/usr/sbin/bpftool", &["version"]) {
        missing.push("bpftool");
    }
    if !ok("java", &["-version"]) {
        missing.push("openjdk-17-jre-headless");
    }
    if !ok("python3", &["-c", "import ensurepip, venv"]) {
        missing.push("python3-venv");
    }
    if missing.is_empty() {
        eprintln!("build and runtime dependencies present");
        return Ok(());
    }
    eprintln!("installing missing packages: {}", missing.join(" "));
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        tasks::run(&mut cmd)
    };
    apt(&["update", "-qq"])?;
    let mut install = vec!["install", "-y", "-qq", "--no-install-recommends"];
    install.extend(&missing);
    apt(&install).context("installing the demo's dependencies with apt-get")
}

/// Write end of the pipe that [`on_signal`] reports signals through.
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

/// Signal handler: only async-signal-safe work, i.e. one write(2) of the signal number to the pipe.
extern "C" fn on_signal(sig: libc::c_int) {
    let byte = u8::try_from(sig).unwrap_or(u8::MAX);
    // SAFETY: write(2) is async-signal-safe; the fd stays open for the life of the process.
    unsafe {
        libc::write(
            SIGNAL_PIPE.load(Ordering::Relaxed),
            (&raw const byte).cast(),
            1,
        )
    };
}

/// On SIGINT/SIGTERM/SIGHUP, stop what the demo started (the harness registers each guard in
/// `cleanup`) and exit. Without this, Ctrl-C would kill xtask before its guards' Drop could run and
/// leave TorchServe running.
///
/// A handler plus a pipe rather than blocking the signals and `sigwait`: a blocked mask is inherited by
/// children (std's `Command` keeps it), and the agent would then never see the SIGTERM that stops it.
/// Handlers, unlike masks, are reset by exec.
pub fn stop_everything_on_signal() -> Result<()> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("creating the signal pipe");
    }
    let [read_fd, write_fd] = fds;
    SIGNAL_PIPE.store(write_fd, Ordering::Relaxed);
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut byte = 0u8;
            loop {
                // SAFETY: reads one byte into `byte`, which outlives the call.
                let n = unsafe { libc::read(read_fd, (&raw mut byte).cast(), 1) };
                if n == 1 {
                    break;
                }
                if n < 0
                    && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
                {
                    continue;
                }
                return; // pipe closed or broken: nothing left to watch
            }
            eprintln!(
                "\nxtask: signal {byte}; stopping what was started (servescope, servers) ..."
            );
            cleanup::run_all();
            std::process::exit(128 + i32::from(byte));
        })
        .context("starting the signal thread")?;
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction with an empty mask is valid; `on_signal` is async-signal-safe.
        // SA_RESTART keeps the main thread's blocking calls going while the signal thread cleans up.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("installing a handler for signal {sig}"));
        }
    }
    Ok(())
}
