//! Bodies never leave the agent: requests whose bodies (and query strings) carry a unique marker go
//! through a traced server that echoes the start of each body back, with every request-log sink on
//! (JSON lines, latency CSV, syslog over UDP) and the agent logging at `trace`. The marker must appear
//! in none of the sinks' output, the agent's log or /metrics — while the sinks demonstrably logged
//! every one of those requests.

use std::{
    fs,
    net::{SocketAddr, UdpSocket},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Result, ensure};
use servescope_integration::{
    Agent, Hooks, Metrics, ServerProcess, http, log_dir, on_both_hooks, require_root,
};

// On each set of data hooks (`syscalls::…`, `sockets::…`).
on_both_hooks!(bodies_and_queries_reach_no_sink_log_or_metric);

const SERVER_PORT: u16 = 18_194;
const AGENT_PORT: u16 = 19_194;
const SYSLOG_PORT: u16 = 15_194;
const TIMEOUT: Duration = Duration::from_secs(15);

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn written(m: &Metrics, sink: &str) -> f64 {
    m.get("servescope_log_written_total", &[("sink", sink)])
        .unwrap_or(0.0)
}

fn bodies_and_queries_reach_no_sink_log_or_metric(hooks: Hooks) -> Result<()> {
    require_root()?;
    let logs = log_dir(&format!("privacy/{}", hooks.name()))?;
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
    // Unique to this run, so an old file cannot match; 16 bytes, so the server's echo (the first 16
    // body bytes) carries it whole in every response.
    let marker = format!("Zq{:014x}", nanos & 0xff_ffff_ffff_ffff);
    let query_marker = format!("Qm{:014x}", (nanos >> 8) & 0xff_ffff_ffff_ffff);
    assert_eq!(marker.len(), 16);

    let server = ServerProcess::predict_server(&logs, SERVER_PORT)?;
    let port = SERVER_PORT.to_string();

    let syslog = UdpSocket::bind(loopback(SYSLOG_PORT))?;
    syslog.set_read_timeout(Some(Duration::from_millis(200)))?;
    let datagrams = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let receiver = {
        let (datagrams, stop) = (Arc::clone(&datagrams), Arc::clone(&stop));
        thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = syslog.recv(&mut buf)
                    && let Ok(mut d) = datagrams.lock()
                {
                    d.push(buf[..n].to_vec());
                }
            }
        })
    };

    let (json, csv, config) = (
        logs.join("requests.jsonl"),
        logs.join("latency.csv"),
        logs.join("servescope.toml"),
    );
    // The most verbose level the agent has.
    fs::write(&config, "log_level = \"trace\"\n")?;
    let agent = Agent::start(
        &logs,
        loopback(AGENT_PORT),
        &[
            "--no-discovery",
            "--data-hooks",
            hooks.name(),
            "--port",
            &port,
            "--config",
            &config.to_string_lossy(),
            "--request-log",
            &json.to_string_lossy(),
            "--latency-csv",
            &csv.to_string_lossy(),
            "--syslog",
            &format!("udp://127.0.0.1:{SYSLOG_PORT}"),
        ],
    )?;
    agent.wait_ready(Duration::from_secs(30))?;
    hooks.ensure_attached(&agent)?;

    // Small bodies (inside the kernel's 512-byte head copy), a large one, errors, and the marker in
    // the query string too.
    let mut n = 0usize;
    for (target, body) in [
        (
            format!("/predictions/m?token={query_marker}"),
            marker.clone(),
        ),
        ("/predictions/m".to_owned(), marker.clone()),
        (
            "/predictions/m?status=500".to_owned(),
            format!("{marker} and more"),
        ),
        (
            "/predictions/m?status=404".to_owned(),
            format!("{marker}\r\n\r\nGET /predictions/{marker} HTTP/1.1\r\n\r\n"),
        ),
        ("/predictions/m".to_owned(), marker.repeat(8192)),
    ] {
        for _ in 0..4 {
            http::post(server.addr(), &target, body.as_bytes(), TIMEOUT)?;
            n += 1;
        }
    }
    let want = n as f64;
    // Each sink writes on its own thread: waiting for two and reading the third at once raced (a
    // clean-clone CI read the CSV's counter before its writer caught up).
    let m = agent.wait_until(TIMEOUT, "every record written by every sink", |m| {
        written(m, "request_log") >= want
            && written(m, "syslog") >= want
            && written(m, "latency_csv") >= 12.0
    })?;
    ensure!(
        written(&m, "latency_csv") >= 12.0,
        "the CSV logged the 2xx/5xx inference requests"
    );
    let metrics = agent.scrape_text("")?;
    let status = agent.stop()?;
    ensure!(status.success(), "agent exited with {status}");
    stop.store(true, Ordering::Relaxed);
    let _ = receiver.join();

    let json_text = fs::read_to_string(&json)?;
    let csv_text = fs::read_to_string(&csv)?;
    let log_text = fs::read_to_string(agent_log(&logs))?;
    let syslog_text: String = datagrams
        .lock()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))?
        .iter()
        .map(|d| String::from_utf8_lossy(d).into_owned() + "\n")
        .collect();

    // The sinks logged these requests (so absence below means something).
    ensure!(json_text.lines().count() >= n, "{json_text}");
    ensure!(
        json_text.contains("\"path\":\"/predictions/m\""),
        "{json_text}"
    );
    ensure!(syslog_text.lines().count() >= n, "{syslog_text}");
    ensure!(
        log_text.contains("log filter changed filter=trace"),
        "the agent did not log at trace:\n{log_text}"
    );

    for (what, text) in [
        ("request log", &json_text),
        ("latency CSV", &csv_text),
        ("syslog", &syslog_text),
        ("agent log", &log_text),
        ("/metrics", &metrics),
    ] {
        for secret in [&marker, &query_marker] {
            ensure!(
                !text.contains(secret.as_str()),
                "{what} carries body or query bytes ({secret})"
            );
        }
    }
    Ok(())
}

fn agent_log(dir: &Path) -> std::path::PathBuf {
    dir.join("servescope.log")
}
