//! The agent watching a plain HTTP/1.1 server (`--port`): counts per model and status class equal what
//! was sent, over keep-alive and one-request-per-connection clients, and the latency sums lie between the
//! injected delay × N and a tight bound above it.
//!
//! The server is `tests/servers/predict_server.py` (Python reads with recvfrom and writes headers and
//! body with two sendto calls), so this covers other syscalls than TorchServe's Netty.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use servescope_integration::{Agent, Metrics, log_dir, require_root, workspace_root};

const SERVER_PORT: u16 = 18_080;
const AGENT: &str = "127.0.0.1:19082";

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server(port: u16) -> Result<Server> {
    let script = workspace_root().join("tests/servers/predict_server.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .arg(port.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", script.display()))?;
    let mut line = String::new();
    let out = child.stdout.take().context("server stdout")?;
    BufReader::new(out)
        .read_line(&mut line)
        .context("reading the server's ready line")?;
    ensure!(
        line.starts_with("ready"),
        "test server did not start: {line:?}"
    );
    Ok(Server(child))
}

/// A keep-alive HTTP/1.1 client that reads exactly one response per request.
struct Client {
    stream: BufReader<TcpStream>,
    /// Bytes written and read so far (requests; responses' heads and bodies).
    sent: usize,
    received: usize,
}

impl Client {
    fn connect(port: u16) -> Result<Client> {
        let s = TcpStream::connect(("127.0.0.1", port)).context("connecting to the test server")?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.set_nodelay(true)?;
        Ok(Client {
            stream: BufReader::new(s),
            sent: 0,
            received: 0,
        })
    }

    /// Sends one request and returns the response status.
    fn send(&mut self, method: &str, path: &str, body: &[u8], close: bool) -> Result<u16> {
        let conn = if close { "Connection: close\r\n" } else { "" };
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: test\r\n{conn}Content-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        self.stream.get_mut().write_all(&req)?;
        self.sent += req.len();
        let mut status_line = String::new();
        self.received += self.stream.read_line(&mut status_line)?;
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {status_line:?}"))?;
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            self.received += self.stream.read_line(&mut h)?;
            if h == "\r\n" || h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse()?;
            }
        }
        let mut body = vec![0; len];
        self.stream.read_exact(&mut body)?;
        self.received += len;
        Ok(status)
    }
}

fn inference(m: &Metrics, model: &str, version: &str) -> f64 {
    m.get(
        "ts_inference_requests_total",
        &[
            ("model_name", model),
            ("model_version", version),
            ("hostname", &hostname()),
        ],
    )
    .unwrap_or(0.0)
}

fn latency_us(m: &Metrics, model: &str, version: &str) -> f64 {
    m.get(
        "ts_inference_latency_microseconds",
        &[
            ("model_name", model),
            ("model_version", version),
            ("hostname", &hostname()),
        ],
    )
    .unwrap_or(0.0)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn host_counter(m: &Metrics, family: &str) -> f64 {
    m.get(family, &[("Level", "Host"), ("Hostname", &hostname())])
        .unwrap_or(0.0)
}

#[test]
fn counts_and_latency_match_what_was_sent() -> Result<()> {
    // This kernel runs the task-local-storage build of the programs (auto picks it).
    counts_and_latency("http_server", "auto", "task-storage", "auto", "syscalls")
}

/// With a server given by --port, `auto` keeps the syscall hooks (a blocking write's start); the
/// socket tracepoints, chosen by hand, must count the same.
#[test]
fn counts_and_latency_match_with_the_socket_hooks() -> Result<()> {
    counts_and_latency(
        "http_server_sockets",
        "auto",
        "task-storage",
        "sockets",
        "sockets",
    )
}

/// The same with the build older kernels load (thread state in a hash map), so it stays tested here.
#[test]
fn counts_and_latency_match_with_the_hash_map_build() -> Result<()> {
    counts_and_latency("http_server_hash", "hash", "hash", "auto", "syscalls")
}

fn counts_and_latency(
    name: &str,
    thread_state: &str,
    loaded: &str,
    data_hooks: &str,
    hooks_loaded: &str,
) -> Result<()> {
    require_root()?;
    let logs = log_dir(name)?;
    let _server = start_server(SERVER_PORT)?;
    let listen: SocketAddr = AGENT.parse()?;
    let port = SERVER_PORT.to_string();
    let agent = Agent::start(
        &logs,
        listen,
        &[
            "--no-discovery",
            "--port",
            &port,
            "--thread-state",
            thread_state,
            "--data-hooks",
            data_hooks,
        ],
    )?;
    agent.wait_ready(Duration::from_secs(15))?;
    for want in [
        format!("thread_state=\"{loaded}\""),
        format!("data_hooks=\"{hooks_loaded}\""),
    ] {
        ensure!(
            agent.log_tail().contains(&want),
            "the agent should say it loaded {want}:\n{}",
            agent.log_tail()
        );
    }

    // Keep-alive: one connection, 30 requests to alpha (200, 20 ms each) and 10 to beta (503).
    const ALPHA_N: u32 = 30;
    const DELAY_MS: u32 = 20;
    let mut c = Client::connect(SERVER_PORT)?;
    for i in 0..ALPHA_N {
        let body = format!("request {i}");
        let st = c.send(
            "POST",
            &format!("/predictions/alpha?delay_ms={DELAY_MS}"),
            body.as_bytes(),
            false,
        )?;
        ensure!(st == 200, "alpha answered {st}");
    }
    for _ in 0..10 {
        ensure!(c.send("POST", "/predictions/beta?status=503", b"x", false)? == 503);
    }
    drop(c);
    // One request per connection (Connection: close): 15 to gamma version 2.0 (404), 5 GETs of /ping.
    for _ in 0..15 {
        let mut c = Client::connect(SERVER_PORT)?;
        ensure!(c.send("POST", "/predictions/gamma/2.0?status=404", b"", true)? == 404);
    }
    for _ in 0..5 {
        let mut c = Client::connect(SERVER_PORT)?;
        ensure!(c.send("GET", "/ping", b"", true)? == 200);
    }
    // A large body split over many reads, then a small one on the same connection.
    let mut c = Client::connect(SERVER_PORT)?;
    let big = vec![b'b'; 3 << 20];
    ensure!(c.send("POST", "/predictions/alpha/1.0", &big, false)? == 200);
    ensure!(c.send("POST", "/predictions/alpha/1.0", b"small", false)? == 200);
    let (alpha_1_sent, alpha_1_received) = (c.sent, c.received);
    drop(c);

    agent.wait_until(Duration::from_secs(10), "all 62 responses counted", |m| {
        host_counter(m, "Requests2XX")
            + host_counter(m, "Requests4XX")
            + host_counter(m, "Requests5XX")
            >= 62.0
    })?;
    // Give an over-count (a response counted twice) time to show before asserting exact values.
    std::thread::sleep(Duration::from_millis(300));
    let m = agent.scrape()?;

    assert_eq!(
        host_counter(&m, "Requests2XX"),
        f64::from(ALPHA_N) + 5.0 + 2.0
    );
    assert_eq!(host_counter(&m, "Requests4XX"), 15.0);
    assert_eq!(host_counter(&m, "Requests5XX"), 10.0);
    assert_eq!(inference(&m, "alpha", "default"), f64::from(ALPHA_N));
    assert_eq!(inference(&m, "alpha", "1.0"), 2.0);
    assert_eq!(inference(&m, "beta", "default"), 10.0);
    assert_eq!(inference(&m, "gamma", "2.0"), 15.0);
    ensure!(
        !m.label_values("model_name").contains("ping"),
        "/ping is not an inference route"
    );
    assert_eq!(m.sum("servescope_http_parse_errors_total"), 0.0);
    assert_eq!(m.sum("servescope_unmatched_responses_total"), 0.0);

    // Latency: each alpha request sleeps DELAY_MS in the server between the read that completed it and
    // the write of its status line, so the sum is at least N × delay; Python's own work on loopback adds
    // well under 5 ms per request.
    let lat = latency_us(&m, "alpha", "default");
    let floor = f64::from(ALPHA_N * DELAY_MS) * 1000.0;
    let ceiling = floor + f64::from(ALPHA_N) * 5_000.0;
    if !(floor..ceiling).contains(&lat) {
        bail!("alpha latency sum {lat} µs outside [{floor}, {ceiling})");
    }
    // The histogram saw the same requests.
    let count = m
        .get(
            "servescope_request_duration_seconds_count",
            &[
                ("model_name", "alpha"),
                ("model_version", "default"),
                ("status_class", "2xx"),
                ("hostname", &hostname()),
            ],
        )
        .unwrap_or(0.0);
    assert_eq!(count, f64::from(ALPHA_N));

    // Request and response bytes, head and body, exactly as they crossed the socket.
    let alpha_1 = [
        ("model_name", "alpha"),
        ("model_version", "1.0"),
        ("status_class", "2xx"),
        ("hostname", &hostname()),
    ];
    assert_eq!(
        m.get("servescope_request_bytes_total", &alpha_1),
        Some(alpha_1_sent as f64)
    );
    assert_eq!(
        m.get("servescope_response_bytes_total", &alpha_1),
        Some(alpha_1_received as f64)
    );
    assert_eq!(m.get("servescope_http_requests_in_flight", &[]), Some(0.0));

    // In flight: a request the server holds for 2 s counts from its read to its response's end.
    let mut c = Client::connect(SERVER_PORT)?;
    let slow =
        std::thread::spawn(move || c.send("POST", "/predictions/slow?delay_ms=2000", b"x", false));
    agent.wait_until(Duration::from_millis(1_500), "one request in flight", |m| {
        m.get("servescope_http_requests_in_flight", &[]) == Some(1.0)
    })?;
    let status = slow
        .join()
        .map_err(|_| anyhow::anyhow!("slow client panicked"))??;
    ensure!(status == 200, "slow answered {status}");
    agent.wait_until(Duration::from_secs(2), "nothing in flight", |m| {
        m.get("servescope_http_requests_in_flight", &[]) == Some(0.0)
    })?;
    Ok(())
}

#[test]
fn taken_listen_port_is_a_clear_error() -> Result<()> {
    require_root()?;
    let logs = log_dir("http_server_taken_port")?;
    let squatter = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = squatter.local_addr()?;
    let agent = Agent::start(&logs, addr, &["--no-discovery", "--port", "1"])?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if agent.check_running().is_err() {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "agent kept running on a taken port"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(agent.log_path())?;
    ensure!(
        log.contains("already in use") && log.contains("--listen"),
        "unclear error: {log}"
    );
    ensure!(!log.contains("panicked"), "agent panicked: {log}");
    Ok(())
}

#[test]
fn vanished_target_is_logged_not_fatal() -> Result<()> {
    require_root()?;
    let logs = log_dir("http_server_vanished")?;
    let server = start_server(SERVER_PORT + 1)?;
    let pid = server.0.id().to_string();
    let agent = Agent::start(
        &logs,
        "127.0.0.1:19083".parse()?,
        &["--no-discovery", "--pid", &pid],
    )?;
    agent.wait_ready(Duration::from_secs(15))?;
    let mut c = Client::connect(SERVER_PORT + 1)?;
    ensure!(c.send("GET", "/predictions/m", b"", false)? == 200);
    drop(c);
    drop(server);
    agent.wait_until(Duration::from_secs(10), "target gone", |m| {
        m.sum("servescope_targets") == 0.0
    })?;
    agent.check_running()?;
    let m = agent.scrape()?;
    // What was counted before the process exited stays.
    assert_eq!(inference(&m, "m", "default"), 1.0);
    let log = std::fs::read_to_string(agent.log_path())?;
    ensure!(
        log.contains("target exited"),
        "no log line for the vanished target: {log}"
    );
    Ok(())
}

/// After loading, the agent keeps only what it needs at run time (CAP_BPF and CAP_PERFMON are gone
/// from every thread and from the bounding set), and still picks up a server started afterwards.
#[test]
fn capabilities_are_dropped_after_load_and_tracing_goes_on() -> Result<()> {
    require_root()?;
    let logs = log_dir("http_server_caps")?;
    let port = SERVER_PORT + 2;
    let agent = Agent::start(
        &logs,
        "127.0.0.1:19084".parse()?,
        &["--no-discovery", "--port", &port.to_string()],
    )?;
    agent.wait_until(Duration::from_secs(10), "metrics served", |_| true)?;
    let tasks = std::fs::read_dir(format!("/proc/{}/task", agent.pid()))?;
    let mut checked = 0;
    for task in tasks {
        let status = std::fs::read_to_string(task?.path().join("status"))?;
        for set in ["CapEff", "CapPrm", "CapBnd"] {
            let bits = status
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{set}:")))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                .with_context(|| format!("{set} missing"))?;
            ensure!(bits & (1 << 39) == 0, "{set} still has CAP_BPF: {bits:x}");
            ensure!(
                bits & (1 << 38) == 0,
                "{set} still has CAP_PERFMON: {bits:x}"
            );
            if set == "CapEff" {
                ensure!(
                    bits & (1 << 19) != 0,
                    "CAP_SYS_PTRACE was dropped: discovery needs it"
                );
            }
        }
        checked += 1;
    }
    ensure!(checked >= 2, "expected the agent's threads, saw {checked}");
    // The kernel map is updated with the fds the agent already holds: no CAP_BPF needed.
    let _server = start_server(port)?;
    agent.wait_ready(Duration::from_secs(15))?;
    let mut c = Client::connect(port)?;
    ensure!(c.send("POST", "/predictions/late", b"x", false)? == 200);
    agent.wait_until(Duration::from_secs(10), "late request counted", |m| {
        inference(m, "late", "default") == 1.0
    })?;
    Ok(())
}

/// Loading parses the kernel's BTF (~15 MB of heap; with the socket hooks aya's loader's copy is
/// dropped before the agent parses the one the tp_btf programs need). The agent hands that heap back
/// once loaded (`malloc_trim`): kept, it idled at ~17 MB of anonymous memory on the socket hooks
/// against ~2 MB after; and at most one copy is alive at a time (the peak, R49).
#[test]
fn loading_leaves_no_freed_heap_behind() -> Result<()> {
    require_root()?;
    let logs = log_dir("http_server_load_heap")?;
    let _server = start_server(SERVER_PORT)?;
    let port = SERVER_PORT.to_string();
    let agent = Agent::start(
        &logs,
        AGENT.parse()?,
        &["--no-discovery", "--port", &port, "--data-hooks", "sockets"],
    )?;
    agent.wait_ready(Duration::from_secs(15))?;
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid()))
        .context("reading the agent's /proc status")?;
    let kib = |field: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {field} in /proc/PID/status"))
    };
    let anon_kib = kib("RssAnon:")?;
    // Heap, stacks and the registry of an agent that has seen no traffic: a few MB. The BTF left
    // behind would be ~12 MB more.
    ensure!(
        anon_kib < 10 * 1024,
        "the agent holds {anon_kib} KiB of anonymous memory after loading"
    );
    // The peak of RSS, less what is file-backed now (the binary's pages and the mapped ring buffer,
    // there at the peak too): the heap at its largest while loading, ~13 MB with one parsed copy of
    // the kernel's BTF alive at a time. With aya's and the tp_btf programs' copies alive together,
    // or the freed heap still held when the ring was mapped, it read ~26 MB.
    let peak_heap_kib = kib("VmHWM:")?.saturating_sub(kib("RssFile:")?);
    ensure!(
        peak_heap_kib < 20 * 1024,
        "the agent's RSS peaked {peak_heap_kib} KiB above its file-backed pages while loading"
    );
    Ok(())
}

/// What the agent costs, on its own /metrics: its CPU and memory always, and with `--bpf-stats` its
/// programs' runs and time as the kernel counts them. Runs count per request: the server's one
/// `recvfrom` per request runs `ss_exit_recvfrom` at least once.
/// Runs of `program` the kernel counted, as the agent exports them with `--bpf-stats`.
fn runs(m: &Metrics, program: &str) -> f64 {
    m.get("servescope_bpf_program_runs_total", &[("program", program)])
        .unwrap_or(0.0)
}

/// Requests sent to the test server on one connection, with an agent that traces it by port, its
/// BPF statistics on and `extra` arguments, until the agent's program runs show them (sampled every
/// second with its housekeeping). Returns the server and agent still running, and that scrape.
fn requests_under_bpf_stats(
    log_name: &str,
    extra: &[&str],
    n: u32,
) -> Result<(Server, Agent, Metrics)> {
    let logs = log_dir(log_name)?;
    let server = start_server(SERVER_PORT)?;
    let port = SERVER_PORT.to_string();
    let mut args = vec!["--no-discovery", "--port", &port, "--bpf-stats"];
    args.extend_from_slice(extra);
    let agent = Agent::start(&logs, AGENT.parse()?, &args)?;
    agent.wait_ready(Duration::from_secs(15))?;
    let mut c = Client::connect(SERVER_PORT)?;
    for _ in 0..n {
        ensure!(c.send("POST", "/predictions/alpha", b"x", false)? == 200);
    }
    drop(c);
    let m = agent.wait_until(
        Duration::from_secs(10),
        "the programs' runs of the requests sent",
        |m| runs(m, "ss_exit_recvfrom") >= f64::from(n) && runs(m, "ss_exit_accept4") >= 1.0,
    )?;
    Ok((server, agent, m))
}

#[test]
fn the_agent_reports_its_own_cost() -> Result<()> {
    require_root()?;
    let (_server, agent, m) = requests_under_bpf_stats("http_server_self_cost", &[], 200)?;
    let secs = m
        .get(
            "servescope_bpf_program_run_seconds_total",
            &[("program", "ss_exit_recvfrom")],
        )
        .unwrap_or(0.0);
    // A run costs tens of ns to a few µs: N runs take between 1 µs and 1 s.
    ensure!(
        (1e-6..1.0).contains(&secs),
        "ss_exit_recvfrom ran {} times in {secs} s",
        runs(&m, "ss_exit_recvfrom")
    );
    // Every series names one of the agent's programs.
    for (s, _) in m.series("servescope_bpf_program_runs_total") {
        let p = s.label("program").unwrap_or_default();
        ensure!(p.starts_with("ss_"), "unexpected program label {p:?}");
    }
    let cpu = m
        .get("servescope_agent_cpu_seconds_total", &[])
        .unwrap_or(0.0);
    ensure!(cpu > 0.0 && cpu < 60.0, "agent CPU {cpu} s");
    let rss = m
        .get("servescope_agent_resident_memory_bytes", &[])
        .unwrap_or(0.0);
    ensure!(
        (1e6..500e6).contains(&rss),
        "agent resident memory {rss} bytes"
    );
    drop(agent);

    // Without --bpf-stats, and with the sysctl off (as on CI), the kernel counts nothing: no series
    // rather than zeros that would read as "not running".
    let stats_sysctl = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
        .context("reading kernel.bpf_stats_enabled")?;
    let logs = log_dir("http_server_self_cost_no_stats")?;
    let port = SERVER_PORT.to_string();
    let agent = Agent::start(&logs, AGENT.parse()?, &["--no-discovery", "--port", &port])?;
    agent.wait_ready(Duration::from_secs(15))?;
    let mut c = Client::connect(SERVER_PORT)?;
    for _ in 0..10 {
        ensure!(c.send("POST", "/predictions/alpha", b"x", false)? == 200);
    }
    let m = agent.wait_until(Duration::from_secs(10), "the agent's CPU sampled", |m| {
        m.get("servescope_agent_cpu_seconds_total", &[])
            .is_some_and(|v| v > 0.0)
    })?;
    if stats_sysctl.trim() == "0" {
        ensure!(
            !m.has("servescope_bpf_program_runs_total"),
            "program runs exported with statistics off"
        );
    }
    Ok(())
}

/// `--hooks-only` (the bench's measure of the hooks' own cost): every program is attached and runs
/// for each call, and returns before it reads anything, so nothing is counted. A check that the
/// verifier pruned the wrong way, or a program left out, would count the requests.
#[test]
fn hooks_only_runs_every_hook_and_counts_nothing() -> Result<()> {
    require_root()?;
    let (_server, agent, m) =
        requests_under_bpf_stats("http_server_hooks_only", &["--hooks-only"], 200)?;
    // Let a record the kernel did send reach the registry before asserting there was none.
    std::thread::sleep(Duration::from_millis(300));
    let m = agent.scrape().unwrap_or(m);
    ensure!(
        inference(&m, "alpha", "default") == 0.0 && host_counter(&m, "Requests2XX") == 0.0,
        "a hooks-only agent counted requests: {} inferences, {} 2xx",
        inference(&m, "alpha", "default"),
        host_counter(&m, "Requests2XX")
    );
    let log = std::fs::read_to_string(agent.log_path())?;
    ensure!(
        log.contains("--hooks-only: every program returns"),
        "the agent does not warn that it traces nothing:\n{log}"
    );
    Ok(())
}

/// `--bpf-stats` asks the kernel for BPF_ENABLE_STATS, which needs CAP_SYS_ADMIN: an agent without it
/// that was asked for the statistics stops at start-up and says which flag needs which capability,
/// rather than running without what it was asked for. Loading and tracing need no CAP_SYS_ADMIN.
#[test]
fn bpf_stats_without_cap_sys_admin_is_a_clear_error() -> Result<()> {
    require_root()?;
    let logs = log_dir("http_server_bpf_stats_caps")?;
    let bin = Agent::binary()?;
    let out = Command::new("setpriv")
        .args([
            "--inh-caps=-all",
            "--bounding-set=-all,+bpf,+perfmon,+sys_ptrace,+dac_read_search",
            "--",
        ])
        .arg(&bin)
        .args([
            "--listen",
            "127.0.0.1:19085",
            "--no-discovery",
            "--port",
            "18099",
            "--bpf-stats",
        ])
        .stdin(Stdio::null())
        .output()
        .context("running the agent under setpriv")?;
    let text = String::from_utf8_lossy(&out.stderr);
    std::fs::write(logs.join("agent.log"), text.as_bytes())?;
    ensure!(
        out.status.code() == Some(1),
        "expected exit 1, got {:?}:\n{text}",
        out.status
    );
    ensure!(
        text.contains("--bpf-stats") && text.contains("CAP_SYS_ADMIN"),
        "the error should name the flag and the capability:\n{text}"
    );
    ensure!(!text.contains("panicked"), "{text}");
    // Asked before loading: nothing was loaded and attached for nothing.
    ensure!(!text.contains("eBPF programs loaded"), "{text}");
    Ok(())
}

/// The thread that drains the ring buffer runs ahead of the node's ordinary threads (`--reader-nice`,
/// default -5), so that a node whose CPUs are all busy does not make it miss the ring's time; every
/// other thread of the agent keeps the priority it was started with. Without CAP_SYS_NICE the agent
/// warns and traces all the same, its reader at its own priority.
#[test]
fn the_ring_reader_runs_at_its_own_priority() -> Result<()> {
    require_root()?;
    let logs = log_dir("http_server_reader_nice")?;
    let port = SERVER_PORT + 3;
    let _server = start_server(port)?;
    let own = thread_nice(std::path::Path::new("/proc/thread-self"))?;
    let boosted = own.min(-5);
    // A wrapper that takes CAP_SYS_NICE away from root before exec'ing the agent.
    let no_nice = logs.join("without-sys-nice.sh");
    std::fs::write(
        &no_nice,
        format!(
            "#!/bin/sh\nexec setpriv --inh-caps=-sys_nice --bounding-set=-sys_nice -- {} \"$@\"\n",
            Agent::binary()?.display()
        ),
    )?;
    std::fs::set_permissions(
        &no_nice,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    for (bin, want, name) in [
        (Agent::binary()?, boosted, "with CAP_SYS_NICE"),
        (no_nice, own, "without CAP_SYS_NICE"),
    ] {
        let agent = Agent::start_binary(
            &bin,
            &logs,
            "127.0.0.1:19086".parse()?,
            &["--no-discovery", "--port", &port.to_string()],
        )?;
        agent.wait_ready(Duration::from_secs(15))?;
        let mut readers = 0;
        let mut others = 0;
        for task in std::fs::read_dir(format!("/proc/{}/task", agent.pid()))? {
            let task = task?.path();
            let comm = std::fs::read_to_string(task.join("comm"))?;
            let nice = thread_nice(&task)?;
            if comm.trim() == "ss-reader" {
                ensure!(
                    nice == want,
                    "{name}: the reader runs at nice {nice}, not {want}"
                );
                readers += 1;
            } else {
                ensure!(
                    nice == own,
                    "{name}: thread {} runs at nice {nice}, not the agent's own {own}",
                    comm.trim()
                );
                others += 1;
            }
        }
        ensure!(
            readers == 1 && others >= 2,
            "{name}: {readers} readers, {others} others"
        );
        let log = std::fs::read_to_string(agent.log_path())?;
        ensure!(
            log.contains(&format!("reader_nice={want}")),
            "{name}: the start-up log does not give the reader's priority:\n{log}"
        );
        let warned = log.contains("cannot raise the event reader's priority");
        ensure!(
            warned == (want != boosted),
            "{name}: warning shown: {warned}\n{log}"
        );
        // Traced either way.
        let mut c = Client::connect(port)?;
        ensure!(c.send("POST", "/predictions/nice", b"x", false)? == 200);
        agent.wait_until(Duration::from_secs(10), "the request counted", |m| {
            inference(m, "nice", "default") == 1.0
        })?;
        drop(c);
    }
    Ok(())
}

/// The nice value of a thread (`/proc/<pid>/task/<tid>`): field 19 of its stat line.
fn thread_nice(task: &std::path::Path) -> Result<i32> {
    let stat = std::fs::read_to_string(task.join("stat"))?;
    // The command name may hold spaces and parentheses: fields are counted after the last ')'.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("stat without a command name")?;
    after
        .split_whitespace()
        .nth(16)
        .and_then(|f| f.parse().ok())
        .with_context(|| format!("no nice value in {stat}"))
}
