//! The kernel's walk of TorchServe's inference frames (`otf_frame` in ebpf/sockets.bpf.c) against
//! frames a real TorchServe never writes: a stand-in frontend (`fake_frontend`, discovered as a
//! TorchServe JVM) writes to its stand-in worker batches of several sizes — one larger than the ids a
//! record keeps, one with megabyte bodies written in several syscalls — and between them lengths that
//! run past the frame, a negative length, a frame with more fields than the walk's step budget, and
//! junk. Every batch is counted at its size, every corrupt frame once, and nothing else.
//!
//! Needs root (BPF); run under the shared lock, one test at a time. Logs in
//! `target/integration/otf_frames/`.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    os::unix::process::CommandExt,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use servescope_integration::{
    Agent, Metrics, ensure_kernel_prereqs, log_dir, process::terminate, require_root,
    torchserve::loopback,
};

const AGENT_LISTEN: u16 = 9087;
/// The stand-in worker's socket: /tmp/.ts.sock.9390 (TorchServe's own use 9000 and up).
const WORKER_PORT: &str = "9390";
const SETTLE: Duration = Duration::from_secs(10);

/// The stand-in frontend, driven one command per line.
struct Frontend {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Frontend {
    fn start() -> Result<Frontend> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fake_frontend"))
            .arg0("java")
            .args([
                "-cp",
                "model-server.jar",
                "org.pytorch.serve.ModelServer",
                WORKER_PORT,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting fake_frontend")?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("stdout")?);
        let mut f = Frontend {
            child,
            stdin,
            stdout,
        };
        f.expect("ready")?;
        Ok(f)
    }

    fn expect(&mut self, want: &str) -> Result<()> {
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        ensure!(
            line.trim() == want,
            "fake_frontend said {line:?}, not {want:?}"
        );
        Ok(())
    }

    /// Sends one command; returns once the frame is written.
    fn send(&mut self, command: &str) -> Result<()> {
        writeln!(self.stdin, "{command}")?;
        self.stdin.flush()?;
        self.expect("ok")
            .with_context(|| format!("command {command}"))
    }
}

impl Drop for Frontend {
    fn drop(&mut self) {
        let _ = terminate(&mut self.child, Duration::from_secs(2));
    }
}

fn fake_sum(m: &Metrics, family: &str) -> f64 {
    m.series(family)
        .filter(|(s, _)| s.label("model_name") == Some("fake"))
        .map(|(_, v)| v)
        .sum()
}

#[test]
fn frames_are_walked_in_the_kernel_and_bad_ones_counted_once() -> Result<()> {
    require_root()?;
    ensure_kernel_prereqs()?;
    Agent::binary()?;
    let logs = log_dir("otf_frames")?;
    // The archive the load frame names: the version label comes from its manifest.
    let model_dir = logs.join("model");
    fs::create_dir_all(model_dir.join("MAR-INF"))?;
    fs::write(
        model_dir.join("MAR-INF/MANIFEST.json"),
        r#"{"model": {"modelName": "fake", "modelVersion": "2.5"}}"#,
    )?;
    let agent = Agent::start(
        &logs,
        loopback(AGENT_LISTEN),
        &["--discovery-interval-ms", "200"],
    )?;
    // Ready means tracing a target: the stand-in frontend.
    let mut fe = Frontend::start()?;
    agent.wait_ready(SETTLE)?;
    fe.send(&format!("load {}", model_dir.display()))?;
    agent.wait_until(SETTLE, "the stand-in worker mapped to model fake", |m| {
        m.series("servescope_worker_resident_memory_bytes")
            .any(|(s, _)| {
                s.label("model_name") == Some("fake") && s.label("model_version") == Some("2.5")
            })
    })?;

    // (command, batches so far, requests so far, corrupt frames so far)
    let steps: [(&str, f64, f64, f64); 8] = [
        ("batch 3 10", 1.0, 3.0, 0.0),
        // 2 MiB of bodies through a 64 KiB send buffer: many writes, walked once.
        ("batch 2 1048576", 2.0, 5.0, 0.0),
        ("past-end", 2.0, 5.0, 1.0),
        ("negative", 2.0, 5.0, 2.0),
        // More requests than a record keeps ids of: still counted whole.
        ("batch 100 1", 3.0, 105.0, 2.0),
        // More fields than the walk's step budget: not sized, not corrupt.
        ("long 9000", 3.0, 105.0, 2.0),
        ("junk", 3.0, 105.0, 2.0),
        ("batch 1 1", 4.0, 106.0, 2.0),
    ];
    let copied_out = |m: &Metrics| {
        m.get(
            "servescope_kernel_copied_bytes_total",
            &[("direction", "egress"), ("transport", "unix")],
        )
        .unwrap_or(0.0)
    };
    for (command, batches, requests, corrupt) in steps {
        let before = copied_out(&agent.scrape()?);
        fe.send(command)?;
        let m = agent
            .wait_until(SETTLE, command, |m| {
                fake_sum(m, "servescope_batch_size_count") == batches
                    && fake_sum(m, "servescope_batch_size_sum") == requests
                    && m.sum("servescope_otf_corrupt_frames_total") == corrupt
            })
            .with_context(|| format!("after `{command}`"))?;
        eprintln!(
            "{command}: {batches} batches, {requests} requests, {corrupt} corrupt; agent {} / {} / {}",
            fake_sum(&m, "servescope_batch_size_count"),
            fake_sum(&m, "servescope_batch_size_sum"),
            m.sum("servescope_otf_corrupt_frames_total")
        );
        if command.starts_with("batch 2 ") {
            // Walked in the kernel at its first write; its continuation writes (2 MiB of bodies)
            // are counted down, none of them copied (R51): 512 bytes a write before.
            let added = copied_out(&m) - before;
            ensure!(
                added == 0.0,
                "the kernel copied {added} bytes of a frame it walked whole"
            );
        }
    }
    // Nothing more arrives late (a continuation walked as a frame would show up as corrupt).
    std::thread::sleep(Duration::from_millis(500));
    let m = agent.scrape()?;
    fs::write(logs.join("servescope_metrics.txt"), agent.scrape_text("")?)?;
    ensure!(
        fake_sum(&m, "servescope_batch_size_count") == 4.0
            && m.sum("servescope_otf_corrupt_frames_total") == 2.0,
        "late records: {} batches, {} corrupt",
        fake_sum(&m, "servescope_batch_size_count"),
        m.sum("servescope_otf_corrupt_frames_total")
    );
    ensure!(
        m.sum("servescope_kernel_lost_events_total") == 0.0,
        "records lost"
    );
    agent.check_running()?;
    Ok(())
}
