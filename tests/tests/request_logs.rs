//! Per-request logs, as a user gets them: the agent watches a plain HTTP/1.1 server (`--port`) and
//! writes every request to a rotating JSON-lines file, every completed inference request to a latency
//! CSV, and every request to a real rsyslog (Debian's `rsyslogd`, run by the test with its own config
//! on test ports, writing to a file the test reads back). Line counts equal requests sent.
//!
//! Also: a syslog server that is absent at start and restarted later loses nothing; a full disk (a
//! 64 KiB tmpfs) is reported, counted and survived, and writing resumes when space frees; SIGHUP after
//! an external rename (logrotate) starts a new file.

use std::{
    collections::BTreeMap,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use servescope_integration::{
    Agent, Hooks, Metrics, ServerProcess, http, log_dir, on_both_hooks, require_root,
    workspace_root,
};

// The exchange-by-exchange check on each set of data hooks (`syscalls::…`, `sockets::…`); the
// sinks' own behaviour (restarts, full disk, SIGHUP) does not depend on them.
on_both_hooks!(request_log_csv_and_syslog_match_what_was_sent);

const TIMEOUT: Duration = Duration::from_secs(10);

fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn predict_server(logs: &Path, port: u16) -> Result<ServerProcess> {
    let script = workspace_root().join("tests/servers/predict_server.py");
    let script = script.to_string_lossy().into_owned();
    let port_arg = port.to_string();
    ServerProcess::start(
        logs,
        "predict_server",
        port,
        "python3",
        &[script.as_str(), port_arg.as_str()],
    )
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A real rsyslogd in the foreground with a config of its own: TCP (octet-counted or not, as rsyslog
/// detects), UDP and a Unix datagram socket in, one file out with the fields the test checks.
struct Rsyslog {
    _process: ServerProcess,
    out: PathBuf,
}

impl Rsyslog {
    /// Starts rsyslogd; ready once it accepts on `tcp_port`. Appends to `<dir>/<name>.received`.
    fn start(dir: &Path, name: &str, tcp_port: u16, udp_port: u16, unix: &Path) -> Result<Rsyslog> {
        let bin = ["/usr/sbin/rsyslogd", "/sbin/rsyslogd"]
            .into_iter()
            .find(|p| Path::new(p).is_file())
            .context("rsyslogd not found: install Debian's rsyslog (`apt-get install rsyslog`; .ci/run does)")?;
        let work = dir.join(format!("{name}.work"));
        fs::create_dir_all(&work)?;
        let out = dir.join(format!("{name}.received"));
        let conf = dir.join(format!("{name}.conf"));
        // SysSock.Use="off": never touch the host's /dev/log.
        fs::write(
            &conf,
            format!(
                r#"global(workDirectory="{work}")
module(load="imtcp")
module(load="imudp")
module(load="imuxsock" SysSock.Use="off")
input(type="imtcp" address="127.0.0.1" port="{tcp_port}")
input(type="imudp" address="127.0.0.1" port="{udp_port}")
input(type="imuxsock" Socket="{unix}")
template(name="fields" type="string"
         string="%inputname%|%hostname%|%app-name%|%procid%|%msgid%|%syslogfacility-text%|%syslogseverity-text%|%timereported:::date-rfc3339%|%msg%\n")
*.* action(type="omfile" file="{out}" template="fields")
"#,
                work = work.display(),
                unix = unix.display(),
                out = out.display(),
            ),
        )?;
        let pidfile = work.join("rsyslogd.pid");
        let conf = conf.to_string_lossy().into_owned();
        let pidfile = pidfile.to_string_lossy().into_owned();
        let process = ServerProcess::start(
            dir,
            name,
            tcp_port,
            bin,
            &["-n", "-f", conf.as_str(), "-i", pidfile.as_str()],
        )?;
        Ok(Rsyslog {
            _process: process,
            out,
        })
    }
}

/// The lines rsyslog wrote so far.
fn received(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .map(|t| t.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Polls until `path` has `n` lines (rsyslog writes asynchronously), then checks no more arrive.
fn wait_lines(path: &Path, n: usize) -> Result<Vec<String>> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let lines = received(path);
        if lines.len() >= n {
            thread::sleep(Duration::from_millis(300));
            let lines = received(path);
            ensure!(
                lines.len() == n,
                "{} has {} lines, want {n}",
                path.display(),
                lines.len()
            );
            return Ok(lines);
        }
        if Instant::now() >= deadline {
            bail!(
                "{} has {} lines after {TIMEOUT:?}, want {n}:\n{}",
                path.display(),
                lines.len(),
                lines.join("\n")
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// `servescope_log_{what}_total{sink}`.
fn sink(m: &Metrics, what: &str, sink: &str) -> f64 {
    m.get(&format!("servescope_log_{what}_total"), &[("sink", sink)])
        .unwrap_or(0.0)
}

/// Every line of `PATH.<n>` (oldest) … `PATH.1`, `PATH`, and how many files there were.
fn rotated_lines(path: &Path) -> Result<(Vec<String>, usize)> {
    let mut files = vec![path.to_owned()];
    for n in 1.. {
        let mut p = path.as_os_str().to_owned();
        p.push(format!(".{n}"));
        let p = PathBuf::from(p);
        if !p.exists() {
            break;
        }
        files.push(p);
    }
    let mut lines = Vec::new();
    for f in files.iter().rev() {
        let text = fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        ensure!(
            text.is_empty() || text.ends_with('\n'),
            "{} ends in a partial line",
            f.display()
        );
        lines.extend(text.lines().map(str::to_owned));
    }
    Ok((lines, files.len()))
}

/// Today's UTC date, `YYYY-MM-DD`.
fn utc_day() -> Result<String> {
    let out = Command::new("date").args(["-u", "+%Y-%m-%d"]).output()?;
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// Sends the standard mix; returns (path, status) per request. One connection per request.
fn traffic(server: SocketAddr, mix: &[(&str, &str, u16, usize)]) -> Result<Vec<(String, u16)>> {
    let mut sent = Vec::new();
    for &(method, path, status, n) in mix {
        for i in 0..n {
            let r = if method == "GET" {
                http::get(server, path, TIMEOUT)?
            } else {
                http::post(server, path, format!("body {i}").as_bytes(), TIMEOUT)?
            };
            ensure!(r.status == status, "{method} {path} answered {}", r.status);
            sent.push((path.to_owned(), status));
        }
    }
    Ok(sent)
}

fn request_log_csv_and_syslog_match_what_was_sent(hooks: Hooks) -> Result<()> {
    require_root()?;
    let logs = log_dir(&format!("request_logs/{}", hooks.name()))?;
    let rsyslog = Rsyslog::start(&logs, "rsyslog", 25_601, 25_514, &logs.join("rsyslog.sock"))?;
    let server = predict_server(&logs, 18_180)?;
    let json = logs.join("requests.jsonl");
    let csv = logs.join("latency.csv");
    let agent = Agent::start(
        &logs,
        loopback(19_182),
        &[
            "--no-discovery",
            "--data-hooks",
            hooks.name(),
            "--port",
            "18180",
            "--request-log",
            &json.to_string_lossy(),
            "--latency-csv",
            &csv.to_string_lossy(),
            "--syslog",
            "tcp://127.0.0.1:25601",
            "--syslog-facility",
            "local4",
            // Small files: the 100 requests rotate the JSON log several times.
            "--log-rotate-size",
            "8192",
            "--log-retain",
            "100",
        ],
    )?;
    agent.wait_ready(Duration::from_secs(15))?;
    hooks.ensure_attached(&agent)?;

    let day_before = utc_day()?;
    let sent = traffic(
        server.addr(),
        &[
            ("POST", "/predictions/alpha", 200, 60),
            ("POST", "/predictions/beta?status=503", 503, 20),
            ("POST", "/predictions/gamma/2.0?status=404", 404, 15),
            ("GET", "/ping", 200, 5),
        ],
    )?;
    let (total, inference) = (
        sent.len(),
        sent.iter().filter(|(p, _)| p != "/ping").count(),
    );
    assert_eq!((total, inference), (100, 95));

    let m = agent.wait_until(TIMEOUT, "every record written", |m| {
        sink(m, "written", "request_log") >= 100.0
            && sink(m, "written", "latency_csv") >= 95.0
            && sink(m, "written", "syslog") >= 100.0
    })?;
    for s in ["request_log", "latency_csv", "syslog"] {
        assert_eq!(sink(&m, "dropped", s), 0.0, "{s} dropped records");
        assert_eq!(sink(&m, "errors", s), 0.0, "{s} had errors");
    }

    // JSON lines: exactly one per request, across the rotated files, in order of completion.
    let (lines, files) = rotated_lines(&json)?;
    ensure!(files >= 3, "expected several rotations, got {files} files");
    assert_eq!(lines.len(), total, "JSON lines");
    let mut by_model: BTreeMap<(String, u64), usize> = BTreeMap::new();
    let mut last_ts = String::new();
    for line in &lines {
        let v: Value = serde_json::from_str(line).with_context(|| format!("bad JSON: {line}"))?;
        let ts = v["timestamp"].as_str().context("timestamp")?.to_owned();
        // RFC 3339, UTC, microseconds: 2025-01-02T03:04:05.123456Z.
        ensure!(
            ts.len() == 27 && ts.ends_with('Z') && ts.as_bytes()[19] == b'.',
            "{ts}"
        );
        ensure!(ts >= last_ts, "timestamps go back: {last_ts} then {ts}");
        last_ts = ts;
        assert_eq!(v["hostname"], hostname().as_str());
        assert_eq!(v["pid"], server.pid());
        // The client address is known when the kernel saw the accept (the connection's open record).
        ensure!(
            v["client"].is_null()
                || v["client"]
                    .as_str()
                    .is_some_and(|c| c.starts_with("127.0.0.1:")),
            "{line}"
        );
        ensure!(v["latency_us"].as_f64().is_some_and(|l| l > 0.0), "{line}");
        ensure!(v["total_us"].as_f64() >= v["latency_us"].as_f64(), "{line}");
        ensure!(
            v["response_bytes"].as_u64().is_some_and(|b| b > 0),
            "{line}"
        );
        let model = v["model"].as_str().unwrap_or("-").to_owned();
        *by_model
            .entry((model, v["status"].as_u64().unwrap_or(0)))
            .or_default() += 1;
    }
    let want: BTreeMap<(String, u64), usize> = [
        (("alpha".to_owned(), 200), 60),
        (("beta".to_owned(), 503), 20),
        (("gamma".to_owned(), 404), 15),
        (("-".to_owned(), 200), 5),
    ]
    .into();
    assert_eq!(by_model, want);
    // The timestamps are this run's wall clock (monotonic kernel time mapped to UTC).
    let first = serde_json::from_str::<Value>(&lines[0])?["timestamp"].to_string();
    ensure!(
        [&day_before, &utc_day()?]
            .iter()
            .any(|d| first.starts_with(&format!("\"{d}T"))),
        "first timestamp {first} is not from today ({day_before})"
    );

    // CSV: a header per file, one row per completed inference request.
    let text = fs::read_to_string(&csv)?;
    let mut rows = text.lines();
    assert_eq!(
        rows.next(),
        Some("timestamp,model,version,status,latency_ms")
    );
    let rows: Vec<&str> = rows.collect();
    assert_eq!(rows.len(), inference, "CSV rows");
    let mut csv_counts: BTreeMap<(String, String, String), usize> = BTreeMap::new();
    for row in &rows {
        let f: Vec<&str> = row.split(',').collect();
        ensure!(f.len() == 5, "{row}");
        ensure!(f[4].parse::<f64>().is_ok_and(|ms| ms > 0.0), "{row}");
        *csv_counts
            .entry((f[1].to_owned(), f[2].to_owned(), f[3].to_owned()))
            .or_default() += 1;
    }
    let key = |m: &str, v: &str, s: &str| (m.to_owned(), v.to_owned(), s.to_owned());
    assert_eq!(
        csv_counts,
        [
            (key("alpha", "default", "200"), 60),
            (key("beta", "default", "503"), 20),
            (key("gamma", "2.0", "404"), 15),
        ]
        .into()
    );

    // rsyslog: one message per request, RFC 5424 over TCP with octet counting, severity by class.
    let got = wait_lines(&rsyslog.out, total)?;
    let mut severities: BTreeMap<String, usize> = BTreeMap::new();
    for line in &got {
        let f: Vec<&str> = line.splitn(9, '|').collect();
        ensure!(f.len() == 9, "{line}");
        assert_eq!(f[0], "imtcp", "{line}");
        assert_eq!(f[1], hostname(), "{line}");
        assert_eq!(f[2], "servescope", "{line}");
        assert_eq!(f[3], server.pid().to_string(), "{line}");
        assert_eq!(f[5], "local4", "{line}");
        ensure!(
            f[7].ends_with('Z') && f[7].len() == 27,
            "timestamp {}",
            f[7]
        );
        ensure!(f[8].contains("response_bytes="), "{line}");
        *severities.entry(format!("{}/{}", f[4], f[6])).or_default() += 1;
    }
    assert_eq!(
        severities,
        [
            ("inference/info".to_owned(), 60),
            ("inference/err".to_owned(), 20),
            ("inference/warning".to_owned(), 15),
            ("other/info".to_owned(), 5),
        ]
        .into()
    );

    // A clean stop leaves the files complete (nothing was pending, nothing is added).
    let status = agent.stop()?;
    ensure!(status.success(), "agent exited with {status}");
    assert_eq!(rotated_lines(&json)?.0.len(), total);
    Ok(())
}

#[test]
fn syslog_absent_at_start_then_restarted_loses_nothing() -> Result<()> {
    require_root()?;
    let logs = log_dir("request_logs_syslog_restart")?;
    let server = predict_server(&logs, 18_181)?;
    let sock = logs.join("rsyslog.sock");
    let agent = Agent::start(
        &logs,
        loopback(19_183),
        &[
            "--no-discovery",
            "--port",
            "18181",
            "--syslog",
            "tcp://127.0.0.1:25602",
        ],
    )?;
    agent.wait_ready(Duration::from_secs(15))?;

    // Nobody listens yet: the agent keeps the records queued and retries.
    traffic(server.addr(), &[("POST", "/predictions/m", 200, 10)])?;
    agent.wait_until(TIMEOUT, "syslog errors counted", |m| {
        sink(m, "errors", "syslog") >= 1.0
    })?;
    let m = agent.scrape()?;
    assert_eq!(sink(&m, "written", "syslog"), 0.0);
    let log = fs::read_to_string(agent.log_path())?;
    ensure!(
        log.contains("cannot send to the syslog server"),
        "no warning in the log:\n{log}"
    );

    // The server comes up: the queued records arrive.
    let rsyslog = Rsyslog::start(&logs, "rsyslog", 25_602, 25_515, &sock)?;
    agent.wait_until(TIMEOUT, "10 records sent", |m| {
        sink(m, "written", "syslog") >= 10.0
    })?;
    wait_lines(&rsyslog.out, 10)?;

    // The server restarts: records sent while it is down arrive after it is back.
    let out = rsyslog.out.clone();
    drop(rsyslog);
    traffic(
        server.addr(),
        &[("POST", "/predictions/m?status=500", 500, 10)],
    )?;
    thread::sleep(Duration::from_millis(500));
    let _rsyslog = Rsyslog::start(&logs, "rsyslog", 25_602, 25_515, &sock)?;
    let m = agent.wait_until(TIMEOUT, "20 records sent", |m| {
        sink(m, "written", "syslog") >= 20.0
    })?;
    let lines = wait_lines(&out, 20)?;
    assert_eq!(lines.iter().filter(|l| l.contains("|err|")).count(), 10);
    assert_eq!(sink(&m, "dropped", "syslog"), 0.0);
    ensure!(
        sink(&m, "errors", "syslog") >= 2.0,
        "the restart was not noticed"
    );
    agent.check_running()?;
    let log = fs::read_to_string(agent.log_path())?;
    ensure!(
        log.contains("reachable again"),
        "no recovery line in the log:\n{log}"
    );
    ensure!(!log.contains("panicked"), "agent panicked:\n{log}");
    Ok(())
}

#[test]
fn syslog_over_udp_and_the_local_socket() -> Result<()> {
    require_root()?;
    let logs = log_dir("request_logs_syslog_transports")?;
    let server = predict_server(&logs, 18_182)?;
    let sock = logs.join("rsyslog.sock");
    let rsyslog = Rsyslog::start(&logs, "rsyslog", 25_603, 25_516, &sock)?;
    let mut expected = 0;
    for (addr, input, n) in [
        ("udp://127.0.0.1:25516".to_owned(), "imudp", 7),
        (format!("unix:{}", sock.display()), "imuxsock", 5),
    ] {
        let agent = Agent::start(
            &logs,
            loopback(19_184),
            &["--no-discovery", "--port", "18182", "--syslog", &addr],
        )?;
        agent.wait_ready(Duration::from_secs(15))?;
        traffic(server.addr(), &[("POST", "/predictions/m", 200, n)])?;
        agent.wait_until(TIMEOUT, "records sent", |m| {
            sink(m, "written", "syslog") >= n as f64
        })?;
        ensure!(agent.stop()?.success(), "agent did not stop cleanly");
        expected += n;
        let lines = wait_lines(&rsyslog.out, expected)?;
        for line in &lines[expected - n..] {
            let f: Vec<&str> = line.splitn(9, '|').collect();
            ensure!(f.len() == 9 && f[0] == input, "{line}");
            assert_eq!(f[2], "servescope", "{line}");
            assert_eq!(f[3], server.pid().to_string(), "{line}");
            assert_eq!(f[6], "info", "{line}");
            ensure!(f[8].contains("model=m "), "{line}");
            if input == "imuxsock" {
                // Local socket: RFC 3164 without a HOSTNAME field; the traced hostname is in the text.
                ensure!(
                    f[8].contains(&format!("hostname={} ", hostname())),
                    "{line}"
                );
            } else {
                assert_eq!(f[1], hostname(), "{line}");
            }
        }
    }
    Ok(())
}

/// A 64 KiB tmpfs mounted for one test; unmounted when dropped.
struct TinyFs(PathBuf);

impl TinyFs {
    fn mount(dir: &Path) -> Result<TinyFs> {
        fs::create_dir_all(dir)?;
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
            .arg(dir)
            .status()
            .context("running mount")?;
        ensure!(status.success(), "mount -t tmpfs failed: {status}");
        Ok(TinyFs(dir.to_owned()))
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        // Lazy: the agent may still hold the file open while the test unwinds.
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Every line of `path` must be a whole JSON object; returns how many there are.
fn json_lines(path: &Path) -> Result<usize> {
    let text = fs::read_to_string(path)?;
    ensure!(text.is_empty() || text.ends_with('\n'), "partial last line");
    for line in text.lines() {
        serde_json::from_str::<Value>(line).with_context(|| format!("not JSON: {line:?}"))?;
    }
    Ok(text.lines().count())
}

#[test]
fn full_disk_is_counted_survived_and_recovered() -> Result<()> {
    require_root()?;
    let logs = log_dir("request_logs_full_disk")?;
    let disk = TinyFs::mount(&logs.join("tiny"))?;
    let json = disk.0.join("requests.jsonl");
    // Leave room for about a dozen lines.
    let filler = disk.0.join("filler");
    fs::write(&filler, vec![b'x'; 60 * 1024])?;
    let server = predict_server(&logs, 18_183)?;
    let agent = Agent::start(
        &logs,
        loopback(19_185),
        &[
            "--no-discovery",
            "--port",
            "18183",
            "--request-log",
            &json.to_string_lossy(),
            "--log-rotate-size",
            "0",
        ],
    )?;
    agent.wait_ready(Duration::from_secs(15))?;

    traffic(server.addr(), &[("POST", "/predictions/m", 200, 60)])?;
    let m = agent.wait_until(TIMEOUT, "60 records accounted for", |m| {
        sink(m, "written", "request_log") + sink(m, "dropped", "request_log") >= 60.0
    })?;
    let (written, dropped) = (
        sink(&m, "written", "request_log"),
        sink(&m, "dropped", "request_log"),
    );
    assert_eq!(written + dropped, 60.0);
    ensure!(dropped > 0.0, "the disk never filled ({written} written)");
    ensure!(
        sink(&m, "errors", "request_log") >= 1.0,
        "errors not counted"
    );
    // What is on disk is exactly what was counted as written, in whole lines.
    assert_eq!(json_lines(&json)? as f64, written);
    agent.check_running()?;
    let log = fs::read_to_string(agent.log_path())?;
    ensure!(
        log.contains("No space left on device"),
        "full disk not reported:\n{log}"
    );

    // Space comes back: writing resumes by itself.
    fs::remove_file(&filler)?;
    traffic(server.addr(), &[("POST", "/predictions/m", 200, 30)])?;
    let m = agent.wait_until(TIMEOUT, "30 more written", |m| {
        sink(m, "written", "request_log") >= written + 30.0
    })?;
    assert_eq!(sink(&m, "dropped", "request_log"), dropped);
    assert_eq!(json_lines(&json)? as f64, written + 30.0);
    let log = fs::read_to_string(agent.log_path())?;
    ensure!(
        log.contains("writing the log file again"),
        "recovery not reported:\n{log}"
    );
    ensure!(agent.stop()?.success(), "agent did not stop cleanly");
    Ok(())
}

#[test]
fn sighup_after_rename_starts_a_new_file() -> Result<()> {
    require_root()?;
    let logs = log_dir("request_logs_sighup")?;
    let server = predict_server(&logs, 18_184)?;
    let json = logs.join("requests.jsonl");
    let listen = loopback(19_186);
    let agent = Agent::start(
        &logs,
        listen,
        &[
            "--no-discovery",
            "--port",
            "18184",
            "--request-log",
            &json.to_string_lossy(),
        ],
    )?;
    agent.wait_ready(Duration::from_secs(15))?;
    traffic(server.addr(), &[("POST", "/predictions/m", 200, 5)])?;
    agent.wait_until(TIMEOUT, "5 written", |m| {
        sink(m, "written", "request_log") >= 5.0
    })?;

    // logrotate: rename, then SIGHUP.
    let moved = logs.join("requests.jsonl.rotated");
    fs::rename(&json, &moved)?;
    let pid = i32::try_from(agent.pid())?;
    // SAFETY: kill(2) has no memory preconditions.
    ensure!(
        unsafe { libc::kill(pid, libc::SIGHUP) } == 0,
        "kill -HUP {pid} failed"
    );
    let deadline = Instant::now() + TIMEOUT;
    while !json.exists() {
        ensure!(Instant::now() < deadline, "no new file after SIGHUP");
        thread::sleep(Duration::from_millis(50));
    }
    traffic(server.addr(), &[("POST", "/predictions/m", 200, 7)])?;
    agent.wait_until(TIMEOUT, "12 written", |m| {
        sink(m, "written", "request_log") >= 12.0
    })?;
    assert_eq!(json_lines(&moved)?, 5);
    assert_eq!(json_lines(&json)?, 7);
    agent.check_running()?;
    Ok(())
}

/// Against a real TorchServe: the JSON log carries the `x-request-id` TorchServe answered each request
/// with, and the CSV has one row per prediction.
#[test]
fn torchserve_request_ids_reach_the_request_log() -> Result<()> {
    require_root()?;
    servescope_integration::ensure_kernel_prereqs()?;
    Agent::binary()?;
    let logs = log_dir("request_logs_torchserve")?;
    let home = servescope_integration::TorchServeHome::default();
    home.setup(&logs.join("torchserve-setup.log"))?;
    let ts = home.start(&logs)?;
    let json = logs.join("requests.jsonl");
    let csv = logs.join("latency.csv");
    // Discovery on: the agent finds the frontend by itself. TorchServe keeps 8082 for its metrics.
    let agent = Agent::start(
        &logs,
        loopback(9182),
        &[
            "--request-log",
            &json.to_string_lossy(),
            "--latency-csv",
            &csv.to_string_lossy(),
        ],
    )?;
    agent.wait_ready(Duration::from_secs(15))?;

    const N: usize = 10;
    let mut ids = std::collections::BTreeSet::new();
    for i in 0..N {
        let r = http::post(
            ts.inference_addr(),
            "/predictions/echo",
            format!("hello {i}").as_bytes(),
            TIMEOUT,
        )?;
        ensure!(r.status == 200, "echo answered {}: {}", r.status, r.text());
        ids.insert(
            r.header("x-request-id")
                .context("no x-request-id")?
                .to_owned(),
        );
    }
    agent.wait_until(TIMEOUT, "predictions logged", |m| {
        sink(m, "written", "latency_csv") >= N as f64
    })?;
    thread::sleep(Duration::from_millis(300));

    let mut logged = std::collections::BTreeSet::new();
    for line in fs::read_to_string(&json)?.lines() {
        let v: Value = serde_json::from_str(line)?;
        if v["model"] == "echo" {
            assert_eq!(v["pid"], ts.pid(), "{line}");
            assert_eq!(v["hostname"], hostname().as_str(), "{line}");
            logged.insert(v["request_id"].as_str().context("request_id")?.to_owned());
        }
    }
    assert_eq!(logged, ids, "request ids in the log vs. answered");
    let rows = fs::read_to_string(&csv)?;
    let echo_rows = rows
        .lines()
        .filter(|l| l.contains(",echo,default,200,"))
        .count();
    assert_eq!(echo_rows, N, "CSV rows:\n{rows}");
    Ok(())
}
