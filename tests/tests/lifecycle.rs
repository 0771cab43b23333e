//! servescope follows a real TorchServe 0.12 through its process lifecycle: started after the agent,
//! workers scaled, killed and restarted with a new PID. Counting stays exact throughout, the agent's
//! counters only ever grow, and a dead frontend leaves no state in the kernel.
//!
//! Needs root and TorchServe's fixed ports (8080-8082, 7070-7071): `cargo xtask test` runs test files one
//! at a time. Logs are kept in `target/integration/lifecycle/<test>/`.

use std::{
    fs,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU8, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use servescope_integration::{
    Agent, Metrics, TorchServe, TorchServeHome, ensure_kernel_prereqs,
    h1::{Client, Family, H1Server, eventually, request_bytes},
    http, kernel, log_dir, require_root,
    torchserve::{INFERENCE_PORT, loopback},
};

/// The bound: from TorchServe's first listening socket to "traced".
const TRACED_WITHIN: Duration = Duration::from_secs(2);
/// How long the agent's counts may lag the traffic.
const SETTLE: Duration = Duration::from_secs(10);

fn prepare(test: &str) -> Result<(PathBuf, TorchServeHome)> {
    require_root()?;
    ensure_kernel_prereqs()?;
    Agent::binary()?;
    let logs = log_dir(&format!("lifecycle/{test}"))?;
    let home = TorchServeHome::default();
    home.setup(&logs.join("torchserve-setup.log"))?;
    Ok((logs, home))
}

/// The agent with its defaults (TorchServe discovery every second), serving on a free port so that
/// TorchServe keeps its own metrics API on 8082.
fn start_agent(logs: &std::path::Path) -> Result<Agent> {
    let listen = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let agent = Agent::start(logs, listen, &[])?;
    agent.wait_until(Duration::from_secs(15), "/metrics served", |_| true)?;
    Ok(agent)
}

/// When TorchServe's inference port started listening and when the agent first reported a traced
/// target, as seen by a watcher that polls every 20 ms. The port is read from /proc/net/tcp6 (TorchServe
/// listens on ::ffff:127.0.0.1), so the watcher sends TorchServe no traffic of its own.
struct StartWatch {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<(Option<Instant>, Option<Instant>)>,
}

impl StartWatch {
    fn start(agent: SocketAddr) -> StartWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let (mut listening, mut traced) = (None, None);
            while !flag.load(Ordering::Relaxed) && (listening.is_none() || traced.is_none()) {
                if listening.is_none() && is_listening(INFERENCE_PORT) {
                    listening = Some(Instant::now());
                }
                if traced.is_none() && targets(agent) >= 1.0 {
                    traced = Some(Instant::now());
                }
                thread::sleep(Duration::from_millis(20));
            }
            (listening, traced)
        });
        StartWatch { stop, thread }
    }

    /// Waits (bounded) for both moments; fails unless tracing began at most TRACED_WITHIN after listening.
    fn assert_traced_in_time(self, what: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.thread.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        self.stop.store(true, Ordering::Relaxed);
        let (listening, traced) = self
            .thread
            .join()
            .map_err(|_| anyhow::anyhow!("watcher panicked"))?;
        let listening = listening.context("TorchServe never listened on 8080")?;
        let traced = traced.context("the agent never traced TorchServe")?;
        let lag = traced.saturating_duration_since(listening);
        eprintln!(
            "{what}: traced {} the inference port listened",
            if traced <= listening {
                format!("{:?} before", listening - traced)
            } else {
                format!("{lag:?} after")
            }
        );
        ensure!(
            lag <= TRACED_WITHIN,
            "{what}: traced {lag:?} after TorchServe listened (bound {TRACED_WITHIN:?})"
        );
        Ok(())
    }
}

fn is_listening(port: u16) -> bool {
    let hex = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|t| {
        fs::read_to_string(t).is_ok_and(|text| {
            text.lines().skip(1).any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.get(1).is_some_and(|a| a.ends_with(&hex)) && f.get(3) == Some(&"0A")
            })
        })
    })
}

fn targets(agent: SocketAddr) -> f64 {
    http::get(agent, "/metrics", Duration::from_secs(2))
        .ok()
        .and_then(|r| Metrics::parse(&r.text()).ok())
        .map_or(0.0, |m| m.sum("servescope_targets"))
}

/// `n` POSTs to `path`, each answering `status`: on one keep-alive connection, except that TorchServe
/// closes the connection after every status >= 400, so those get one connection each.
fn send(addr: SocketAddr, path: &str, n: u32, status: u16) -> Result<()> {
    let mut c = Client::connect(addr)?;
    for i in 0..n {
        if status >= 400 && i > 0 {
            c = Client::connect(addr)?;
        }
        let st = c.call("POST", path, format!("lifecycle {i}").as_bytes())?;
        ensure!(st == status, "{path} answered {st}, want {status}");
    }
    Ok(())
}

fn inference(m: &Metrics, model: &str) -> f64 {
    m.series("ts_inference_requests_total")
        .filter(|(s, _)| s.label("model_name") == Some(model))
        .map(|(_, v)| v)
        .sum()
}

/// After TorchServe's own scrape (which TorchServe counts once rendered), the agent reports exactly
/// TorchServe's counters plus that scrape's own 200 (TorchServe counts it only later), on top of
/// `baseline`: what the agent had counted from earlier TorchServe instances.
fn assert_agent_matches_torchserve(
    agent: &Agent,
    ts: &TorchServe,
    baseline: &Metrics,
) -> Result<Metrics> {
    let ts_m = ts.scrape()?;
    let want = |family: &str| ts_m.sum(family) + baseline.sum(family);
    let want_2xx = want("Requests2XX") + 1.0;
    let agent_m = agent
        .wait_until(SETTLE, &format!("Requests2XX >= {want_2xx}"), |m| {
            m.sum("Requests2XX") >= want_2xx
        })
        .or_else(|e| {
            eprintln!("{e:#}");
            agent.scrape()
        })?;
    thread::sleep(Duration::from_millis(300));
    let agent_m = agent.scrape().unwrap_or(agent_m);
    let mut diff = Vec::new();
    let mut check = |what: String, want: f64, got: f64| {
        if want != got {
            diff.push(format!("{what}: servescope {got}, want {want}"));
        }
    };
    check("Requests2XX".into(), want_2xx, agent_m.sum("Requests2XX"));
    for family in ["Requests4XX", "Requests5XX"] {
        check(family.into(), want(family), agent_m.sum(family));
    }
    for model in ["echo", "slow", "fail", "nosuchmodel"] {
        check(
            format!("ts_inference_requests_total{{model_name={model}}}"),
            inference(&ts_m, model) + inference(baseline, model),
            inference(&agent_m, model),
        );
    }
    for family in [
        "servescope_kernel_lost_events_total",
        "servescope_http_parse_errors_total",
        "servescope_unmatched_responses_total",
    ] {
        check(family.into(), 0.0, agent_m.sum(family));
    }
    ensure!(
        diff.is_empty(),
        "servescope differs from TorchServe:\n  {}\nend of the agent's log:\n{}",
        diff.join("\n  "),
        agent.log_tail()
    );
    Ok(agent_m)
}

/// TorchServe started while the agent is already running: discovery finds it within 2 s of its first
/// listening socket, so even run.sh's first /ping is counted. Then its echo model is scaled from one
/// worker to two through the management API: nothing breaks, and the counts equal TorchServe's own.
#[test]
fn torchserve_started_after_the_agent_is_traced_at_once_and_survives_scaling() -> Result<()> {
    let (logs, home) = prepare("started_after_agent")?;
    let agent = start_agent(&logs)?;
    ensure!(
        agent.scrape()?.sum("servescope_targets") == 0.0,
        "a TorchServe is already running: the test needs the machine to itself"
    );
    let watch = StartWatch::start(agent.listen());
    let ts = home.start(&logs)?;
    watch.assert_traced_in_time("first start")?;

    let addr = ts.inference_addr();
    send(addr, "/predictions/echo", 30, 200)?;
    send(addr, "/predictions/fail", 5, 503)?;
    send(addr, "/predictions/nosuchmodel", 4, 404)?;
    // Scale echo to two workers and wait until both are up (synchronous=true answers afterwards).
    let r = http::request(
        ts.management_addr(),
        b"PUT /models/echo?min_worker=2&max_worker=2&synchronous=true HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        Duration::from_secs(60),
    )?;
    ensure!(r.status == 200, "scaling echo: {} {}", r.status, r.text());
    // Several connections at once, so that both workers serve.
    let clients: Vec<_> = (0..4)
        .map(|_| thread::spawn(move || send(addr, "/predictions/echo/1.0", 15, 200)))
        .collect();
    for c in clients {
        c.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
    }
    let r = http::get(
        ts.management_addr(),
        "/models/echo",
        Duration::from_secs(10),
    )?;
    let workers = serde_json::from_slice::<serde_json::Value>(&r.body)?[0]["workers"]
        .as_array()
        .map_or(0, Vec::len);
    ensure!(
        workers == 2,
        "echo has {workers} workers after scaling, want 2"
    );

    let m = assert_agent_matches_torchserve(&agent, &ts, &Metrics::default())?;
    // And TorchServe itself counted what was sent (echo: 30 + 60).
    ensure!(
        inference(&m, "echo") == 90.0,
        "echo inference count {}",
        inference(&m, "echo")
    );
    drop(agent);
    ts.stop();
    Ok(())
}

/// TorchServe killed (frontend and workers, SIGKILL, as an OOM kill or a node failure does) and
/// started again with a new PID: the agent logs the exit, frees the dead process's kernel connection
/// state, traces the new frontend within 2 s of its listening, and keeps counting from where it was —
/// its counters never go down, while the new TorchServe starts again from zero.
#[test]
fn torchserve_killed_and_restarted_is_traced_again_with_monotonic_counters() -> Result<()> {
    let (logs, home) = prepare("killed_and_restarted")?;
    let agent = start_agent(&logs)?;
    ensure!(
        agent.scrape()?.sum("servescope_targets") == 0.0,
        "a TorchServe is already running: the test needs the machine to itself"
    );
    let watch = StartWatch::start(agent.listen());
    let first = home.start(&logs.join("first").tap_mkdir()?)?;
    watch.assert_traced_in_time("first start")?;
    let old_pid = first.pid();
    send(first.inference_addr(), "/predictions/echo", 20, 200)?;
    send(first.inference_addr(), "/predictions/fail", 3, 503)?;
    let before = assert_agent_matches_torchserve(&agent, &first, &Metrics::default())?;

    // A client holds a keep-alive connection at the moment of the crash: the kernel has state for it.
    let mut held = Client::connect(loopback(INFERENCE_PORT))?;
    ensure!(held.call("POST", "/predictions/echo", b"held")? == 200);
    let (agent_pid, conns_before) = (agent.pid(), kernel::conns_of(agent.pid(), old_pid)?);
    ensure!(
        conns_before >= 1,
        "no kernel connection state for TorchServe {old_pid} before the kill: nothing to test"
    );

    kill_torchserve(old_pid)?;
    let gone = eventually(Duration::from_secs(5), || {
        kernel::conns_of(agent_pid, old_pid).is_ok_and(|n| n == 0)
    });
    ensure!(
        gone,
        "{} kernel connection entries of dead TorchServe {old_pid} remain",
        kernel::conns_of(agent_pid, old_pid)?
    );
    // Logged right after the kernel state is freed.
    let logged = eventually(Duration::from_secs(2), || {
        fs::read_to_string(agent.log_path()).is_ok_and(|log| {
            log.lines()
                .any(|l| l.contains("target exited") && l.contains(&format!("pid={old_pid}")))
        })
    });
    ensure!(logged, "no `target exited` log line for pid {old_pid}");
    drop(held);
    // The first guard's stop.sh finds its PID dead and only removes the stale pid file.
    first.stop();
    let after_kill = agent.scrape()?;

    let watch = StartWatch::start(agent.listen());
    let second = home.start(&logs.join("second").tap_mkdir()?)?;
    watch.assert_traced_in_time("restart")?;
    ensure!(
        second.pid() != old_pid,
        "TorchServe restarted with the same PID"
    );
    send(second.inference_addr(), "/predictions/echo", 10, 200)?;
    send(second.inference_addr(), "/predictions/slow", 2, 200)?;

    // The new TorchServe counts from zero; the agent adds to what it had counted from the first one
    // (its responses, run.sh's /ping, the held request, the first comparison's scrape).
    let m = assert_agent_matches_torchserve(&agent, &second, &after_kill)?;
    // Monotonic: nothing the agent had counted before the crash went down.
    for (series, v) in &before.samples {
        if series.name.starts_with("servescope_") {
            continue;
        }
        let now = m.samples.get(series).copied().unwrap_or(0.0);
        let counter = before.types.get(&series.name).map(String::as_str) == Some("counter");
        if counter && now < *v {
            bail!("{series} went down across the restart: {v} -> {now}");
        }
    }
    ensure!(inference(&m, "echo") == 20.0 + 1.0 + 10.0);
    drop(agent);
    second.stop();
    Ok(())
}

/// SIGKILLs the frontend and its workers at once, and waits until they are gone.
fn kill_torchserve(java: u32) -> Result<()> {
    let mut pids = children_of(java);
    pids.push(java);
    for &pid in &pids {
        // SAFETY: kill(2) with a pid read from /proc just now; the worst case of a race is ESRCH.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    let gone = eventually(Duration::from_secs(10), || {
        pids.iter().all(|p| {
            fs::read_to_string(format!("/proc/{p}/stat")).map_or(true, |s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z'))
            })
        })
    });
    ensure!(
        gone,
        "TorchServe processes {pids:?} still alive 10 s after SIGKILL"
    );
    Ok(())
}

/// PIDs whose parent is `pid` (TorchServe's Python workers).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            fs::read_to_string(format!("/proc/{child}/stat")).is_ok_and(|s| {
                s.rsplit(')')
                    .next()
                    .and_then(|r| r.split_whitespace().nth(1))
                    .and_then(|p| p.parse::<u32>().ok())
                    == Some(pid)
            })
        })
        .collect()
}

/// Creates a directory and returns it (each TorchServe instance keeps its logs apart).
trait TapMkdir {
    fn tap_mkdir(self) -> Result<PathBuf>;
}

impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> Result<PathBuf> {
        fs::create_dir_all(&self).with_context(|| format!("creating {}", self.display()))?;
        Ok(self)
    }
}

/// The agent itself restarted (an upgrade, a DaemonSet rollout) while clients keep their keep-alive
/// connections busy: the new agent picks every connection up at its next request boundary and counts
/// exactly from there. Generic server (h1server, thread per connection: blocking reads in flight at
/// the moment the agent attaches), no TorchServe needed.
#[test]
fn agent_restarted_under_traffic_counts_exactly_from_the_next_request() -> Result<()> {
    const CLIENTS: usize = 8;
    const AFTER: u32 = 25;
    require_root()?;
    ensure_kernel_prereqs()?;
    let logs = log_dir("lifecycle/agent_restart")?;
    let server = H1Server::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_h1server")),
        &logs,
        Family::V4,
        &[0],
    )?;
    let port = server.port().to_string();
    let args = [
        "--no-discovery",
        "--port",
        port.as_str(),
        "--discovery-interval-ms",
        "100",
    ];
    let first_logs = logs.join("first").tap_mkdir()?;
    let first = Agent::start(&first_logs, free_addr()?, &args)?;
    first.wait_ready(Duration::from_secs(15))?;

    // Phase 0: background traffic; phase 1: each client sends AFTER requests to `after`, then stops.
    let phase = Arc::new(AtomicU8::new(0));
    let addr = server.addr();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let phase = Arc::clone(&phase);
            thread::spawn(move || -> Result<u32> {
                let mut c = Client::connect(addr)?;
                let mut background = 0;
                while phase.load(Ordering::SeqCst) == 0 {
                    // Some requests with bodies, split in two writes, so that the agents attach and
                    // detach in every possible place of an exchange.
                    let req = request_bytes("POST", "/predictions/background", &[b'b'; 300]);
                    c.send_in_pieces(&req, &[17 + i], Duration::ZERO)?;
                    ensure!(c.read_reply()?.status == 200);
                    background += 1;
                    // Busy, not saturating: a saturating loop makes the agent's exit slow (the kernel
                    // detaches its tracepoints one grace period at a time), which is not this test's
                    // subject.
                    thread::sleep(Duration::from_millis(1));
                }
                for _ in 0..AFTER {
                    ensure!(c.call("POST", "/predictions/after", b"x")? == 200);
                }
                Ok(background)
            })
        })
        .collect();

    thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    let status = first.stop()?;
    eprintln!("first agent stopped in {:?}", t0.elapsed());
    ensure!(status.success(), "first agent exited with {status}");
    thread::sleep(Duration::from_millis(200));
    let second_logs = logs.join("second").tap_mkdir()?;
    let t0 = Instant::now();
    let second = Agent::start(&second_logs, free_addr()?, &args)?;
    second.wait_ready(Duration::from_secs(15))?;
    eprintln!("second agent tracing in {:?}", t0.elapsed());
    // Let the new agent see the busy connections for a while before the counted requests.
    thread::sleep(Duration::from_millis(500));
    phase.store(1, Ordering::SeqCst);
    let mut background = 0;
    for c in clients {
        background += c.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
    }
    eprintln!("{background} background requests while the agents restarted");

    let host = fs::read_to_string("/proc/sys/kernel/hostname")?;
    let host = host.trim();
    let after = AFTER * u32::try_from(CLIENTS)?;
    let m = second.wait_until(SETTLE, &format!("{after} `after` requests"), |m| {
        inference(m, "after") >= f64::from(after)
    })?;
    thread::sleep(Duration::from_millis(300));
    let m = second.scrape().unwrap_or(m);
    let mut diff = Vec::new();
    if inference(&m, "after") != f64::from(after) {
        diff.push(format!("after: {} want {after}", inference(&m, "after")));
    }
    // Background requests: only those the second agent saw whole, never more than were sent.
    let seen = inference(&m, "background");
    if seen > f64::from(background) || seen == 0.0 {
        diff.push(format!("background: {seen} of {background} sent"));
    }
    // Every response counted is one of those, no response was counted without its request.
    let responses = m.get("Requests2XX", &[("Level", "Host"), ("Hostname", host)]);
    if responses != Some(seen + f64::from(after)) {
        diff.push(format!("Requests2XX {responses:?} != {seen} + {after}"));
    }
    for family in [
        "servescope_http_parse_errors_total",
        "servescope_unmatched_responses_total",
        "servescope_kernel_lost_events_total",
    ] {
        if m.sum(family) != 0.0 {
            diff.push(format!("{family} = {}", m.sum(family)));
        }
    }
    ensure!(
        diff.is_empty(),
        "after the restart:\n  {}\n{}",
        diff.join("\n  "),
        second.log_tail()
    );
    Ok(())
}

fn free_addr() -> Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// A model worker killed (SIGKILL: an OOM kill of the Python process) while clients keep sending it
/// requests: TorchServe fails what was in flight, restarts the worker, and goes on. The agent counts
/// every response exactly as TorchServe's own /metrics does (the failed ones too, in whatever class
/// TorchServe puts them), logs no warning or error, and keeps reporting queue latency for the model,
/// which it measures on the frontend's connection to the *new* worker.
#[test]
fn torchserve_worker_killed_under_traffic_is_counted_exactly() -> Result<()> {
    const CLIENTS: usize = 3;
    let (logs, home) = prepare("worker_killed")?;
    let agent = start_agent(&logs)?;
    ensure!(
        agent.scrape()?.sum("servescope_targets") == 0.0,
        "a TorchServe is already running: the test needs the machine to itself"
    );
    let ts = home.start(&logs)?;
    agent.wait_until(Duration::from_secs(5), "TorchServe traced", |m| {
        m.sum("servescope_targets") >= 1.0
    })?;
    let worker = echo_worker(ts.pid())?;
    // The frontend's connections at rest (to its workers): the dead worker's goes, the new one's comes.
    ts.wait_clients_gone(Duration::from_secs(5))?;
    let conns_at_rest = kernel::conns_of(agent.pid(), ts.pid())?;

    // Clients loop on echo until told to stop; a failed request (or a connection TorchServe closes)
    // gets a new connection. What each saw is only printed: TorchServe's /metrics is the truth.
    let stop = Arc::new(AtomicBool::new(false));
    let addr = ts.inference_addr();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let stop = Arc::clone(&stop);
            thread::spawn(move || -> Result<(u32, u32, u32)> {
                let (mut ok, mut failed, mut broken) = (0, 0, 0);
                let mut c = Client::connect(addr)?;
                // Bounded: at most 60 s of traffic whatever happens.
                let deadline = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                    match c.call(
                        "POST",
                        "/predictions/echo",
                        format!("client {i}").as_bytes(),
                    ) {
                        Ok(200) => ok += 1,
                        Ok(_) => {
                            failed += 1;
                            c = Client::connect(addr)?;
                        }
                        Err(_) => {
                            broken += 1;
                            c = Client::connect(addr)?;
                        }
                    }
                }
                Ok((ok, failed, broken))
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(1500));
    let queue_before = queue_latency(&agent.scrape()?, "echo");
    ensure!(
        queue_before > 0.0,
        "no ts_queue_latency_microseconds for echo before the kill: nothing to compare with"
    );
    // SAFETY: kill(2) of the worker PID read from /proc just now.
    ensure!(
        unsafe { libc::kill(worker as i32, libc::SIGKILL) } == 0,
        "kill {worker}: {}",
        std::io::Error::last_os_error()
    );
    let gone = eventually(Duration::from_secs(5), || {
        !children_of(ts.pid()).contains(&worker)
    });
    ensure!(gone, "echo worker {worker} still there 5 s after SIGKILL");
    // TorchServe starts a new worker (after its back-off); wait until it answers again.
    let restarted = eventually(Duration::from_secs(60), || {
        echo_worker(ts.pid()).is_ok_and(|w| w != worker)
            && http::post(addr, "/predictions/echo", b"probe", Duration::from_secs(5))
                .is_ok_and(|r| r.status == 200)
    });
    ensure!(
        restarted,
        "TorchServe did not restart the echo worker within 60 s"
    );
    let new_worker = echo_worker(ts.pid())?;
    eprintln!("echo worker {worker} killed; TorchServe restarted it as {new_worker}");
    // Traffic on the new worker for a while, then stop.
    let queue_restarted = queue_latency(&agent.scrape()?, "echo");
    thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        let (ok, failed, broken) = c.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
        eprintln!("client: {ok} ok, {failed} failed, {broken} broken connections");
    }

    let m = assert_agent_matches_torchserve(&agent, &ts, &Metrics::default())?;
    // The worker never idles under three looping clients, so a request was in flight at the kill:
    // TorchServe answers it 507 ("worker died"), a 5XX for both.
    ensure!(
        m.sum("Requests5XX") >= 1.0,
        "no failed request counted: was nothing in flight when the worker died?"
    );
    let queue_after = queue_latency(&m, "echo");
    ensure!(
        queue_after > queue_restarted,
        "ts_queue_latency_microseconds for echo stopped growing after the worker restart \
         ({queue_before} before the kill, {queue_restarted} at the restart, {queue_after} at the end)"
    );
    let log = fs::read_to_string(agent.log_path())?;
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    ensure!(bad.is_empty(), "the agent logged:\n{}", bad.join("\n"));
    // The new worker, between the frontend's fork and its exec, shows the frontend's command line: it
    // must not be taken for a second frontend.
    let traced: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("tracing target"))
        .collect();
    ensure!(
        traced.len() == 1,
        "the agent traced more than the frontend:\n{}",
        traced.join("\n")
    );
    let (a, t) = (agent.pid(), ts.pid());
    let back = eventually(Duration::from_secs(5), || {
        kernel::conns_of(a, t).is_ok_and(|n| n == conns_at_rest)
    });
    ensure!(
        back,
        "{} kernel connection entries for TorchServe after the clients closed, {conns_at_rest} at rest",
        kernel::conns_of(a, t)?
    );
    drop(agent);
    ts.stop();
    Ok(())
}

/// The PID of the echo model's worker: the frontend's child listening on the first worker socket
/// (`/tmp/.ts.sock.9000`: echo is loaded first, FACTS.md §6).
fn echo_worker(java: u32) -> Result<u32> {
    children_of(java)
        .into_iter()
        .find(|&pid| {
            fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                String::from_utf8_lossy(&c).contains("model_service_worker.py")
                    && String::from_utf8_lossy(&c).contains(".ts.sock.9000")
            })
        })
        .with_context(|| format!("TorchServe {java} has no echo worker (/tmp/.ts.sock.9000)"))
}

fn queue_latency(m: &Metrics, model: &str) -> f64 {
    m.series("ts_queue_latency_microseconds")
        .filter(|(s, _)| s.label("model_name") == Some(model))
        .map(|(_, v)| v)
        .sum()
}
