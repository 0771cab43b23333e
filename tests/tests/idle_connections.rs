//! Keep-alive connections that sit idle for minutes and are then reused, as a client's connection pool
//! does between bursts: every request on them is counted exactly, and the request after the gap is
//! timed from its own arrival, never from the start of the idle wait (a server thread blocked in
//! `read()` for minutes must not turn into minutes of latency). The kernel keeps the idle connections'
//! state throughout and frees it when they close.
//!
//! One test, both servers at once (it takes ~2.5 minutes): h1server, thread per connection with
//! blocking reads, in a simulated pod of its own (so its counts have a hostname of their own), and a
//! real TorchServe 0.12 (Netty, epoll), compared with its own /metrics.

use std::{
    path::Path,
    sync::mpsc::{Receiver, Sender, channel},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use servescope_integration::{
    Agent, Metrics, TorchServeHome, ensure_kernel_prereqs,
    h1::{Client, Expected, H1Server, latency_sum_us},
    kernel, log_dir, netns, require_root, torchserve,
};

const H1SERVER: &str = env!("CARGO_BIN_EXE_h1server");
/// Longer than two minutes, as the issue asks; bounded so the test stays ~2.5 minutes.
const IDLE: Duration = Duration::from_secs(130);
const H1_HOST: &str = "idle-pod";
const H1_PORT: u16 = 8090;
/// h1server's delay for the request after the gap; TorchServe's `slow` model sleeps 200 ms.
const H1_DELAY_MS: u64 = 300;
const SLOW_MS: f64 = 200.0;
/// Upper bound of a sane latency for those requests: seconds on a busy 2-core machine, not minutes.
const SANE: Duration = Duration::from_secs(3);
const BURST: u32 = 20;

/// The request after the idle gap, with how long the client waited for its response.
struct Reused {
    status: u16,
    client_wait: Duration,
}

/// Where a client stops for the idle gap: it says its burst is over, then waits (bounded) for the main
/// thread's word that the gap is over. A client that fails drops its sender, so the main thread never
/// waits for it in vain.
struct Gate {
    burst_done: Sender<()>,
    gap_over: Receiver<()>,
}

impl Gate {
    fn wait(&self) -> Result<()> {
        self.burst_done.send(())?;
        self.gap_over
            .recv_timeout(IDLE + Duration::from_secs(60))
            .context("the idle gap never ended")
    }
}

/// BURST requests, wait at the gate (the main thread holds every client there for IDLE), then one
/// request on the same connection (timed), then BURST more, on the same connection all along.
fn idle_client(
    c: &mut Client,
    idle: &Gate,
    burst: &str,
    after: &str,
    then: &str,
) -> Result<Reused> {
    for i in 0..BURST {
        let st = c.call("POST", burst, format!("before {i}").as_bytes())?;
        ensure!(st == 200, "{burst} answered {st}");
    }
    idle.wait()?;
    let t0 = Instant::now();
    let status = c.call("POST", after, b"after the idle gap")?;
    let client_wait = t0.elapsed();
    for i in 0..BURST {
        let st = c.call("POST", then, format!("after {i}").as_bytes())?;
        ensure!(st == 200, "{then} answered {st}");
    }
    Ok(Reused {
        status,
        client_wait,
    })
}

#[test]
fn connections_idle_for_minutes_then_reused_are_counted_and_timed_exactly() -> Result<()> {
    require_root()?;
    ensure_kernel_prereqs()?;
    Agent::binary()?;
    let logs = log_dir("idle_connections")?;
    let home = TorchServeHome::default();
    home.setup(&logs.join("torchserve-setup.log"))?;

    let h1 = H1Server::start_in_pod(Path::new(H1SERVER), &logs, H1_HOST, H1_PORT)?;
    let listen = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let port = H1_PORT.to_string();
    // TorchServe by discovery, h1server by its port (found in its pod's network namespace).
    let agent = Agent::start(
        &logs,
        listen,
        &["--port", &port, "--discovery-interval-ms", "100"],
    )?;
    agent.wait_ready(Duration::from_secs(15))?;
    let ts = home.start(&logs)?;
    agent.wait_until(
        Duration::from_secs(5),
        "h1server and TorchServe traced",
        |m| m.sum("servescope_targets") >= 2.0,
    )?;
    ts.wait_clients_gone(Duration::from_secs(5))?;
    let (agent_pid, h1_pid, ts_pid) = (agent.pid(), h1.pid(), ts.pid());
    let baseline = (
        kernel::conns_of(agent_pid, h1_pid)?,
        kernel::conns_of(agent_pid, ts_pid)?,
    );

    let (burst_done, bursts) = channel();
    let mut gates = Vec::new();
    let mut gate = || {
        let (go, gap_over) = channel();
        gates.push(go);
        Gate {
            burst_done: burst_done.clone(),
            gap_over,
        }
    };
    let h1_client = {
        let (idle, addr) = (gate(), h1.addr());
        thread::spawn(move || {
            netns::run_in(h1_pid, move || {
                let mut c = Client::connect(addr)?;
                let after = format!("/predictions/after_idle?delay_ms={H1_DELAY_MS}");
                idle_client(
                    &mut c,
                    &idle,
                    "/predictions/before_idle",
                    &after,
                    "/predictions/after_idle_burst",
                )
            })
        })
    };
    let ts_client = {
        let (idle, addr) = (gate(), ts.inference_addr());
        thread::spawn(move || {
            let mut c = Client::connect(addr)?;
            idle_client(
                &mut c,
                &idle,
                "/predictions/echo",
                "/predictions/slow",
                "/predictions/echo",
            )
        })
    };
    drop(burst_done);
    for _ in 0..2 {
        bursts
            .recv_timeout(Duration::from_secs(60))
            .context("a client failed or hung before the idle gap")?;
    }
    let t0 = Instant::now();
    let held = (
        kernel::conns_of(agent_pid, h1_pid)?,
        kernel::conns_of(agent_pid, ts_pid)?,
    );
    ensure!(
        held.0 == baseline.0 + 1 && held.1 == baseline.1 + 1,
        "kernel connection entries (h1server, TorchServe) {held:?} with one idle connection each, \
         {baseline:?} before"
    );
    // Other connections come and go during the gap, so the idle ones must survive churn too.
    thread::sleep(IDLE / 2);
    netns::run_in(h1_pid, {
        let addr = h1.addr();
        move || {
            for _ in 0..10 {
                let mut c = Client::connect(addr)?;
                ensure!(c.call("POST", "/predictions/during_idle", b"x")? == 200);
            }
            Ok(())
        }
    })?;
    for _ in 0..10 {
        let mut c = Client::connect(ts.inference_addr())?;
        ensure!(c.call("POST", "/predictions/echo", b"during")? == 200);
    }
    thread::sleep(IDLE.saturating_sub(t0.elapsed()));
    let still = eventually_conns(agent_pid, (h1_pid, ts_pid), held);
    ensure!(
        still == held,
        "after {IDLE:?} idle the kernel holds {still:?} connection entries, {held:?} before"
    );
    for go in &gates {
        go.send(())?;
    }
    let join = |t: thread::JoinHandle<Result<Reused>>| {
        t.join().map_err(|_| anyhow::anyhow!("client panicked"))?
    };
    let (h1_reused, ts_reused) = (join(h1_client)?, join(ts_client)?);
    ensure!(
        h1_reused.status == 200 && ts_reused.status == 200,
        "requests after the gap answered {} (h1server) and {} (TorchServe)",
        h1_reused.status,
        ts_reused.status
    );
    eprintln!(
        "after {IDLE:?} idle: h1server answered in {:?}, TorchServe in {:?}",
        h1_reused.client_wait, ts_reused.client_wait
    );

    // h1server's pod: every request, per phase.
    let m = Expected::new(H1_HOST)
        .inference("before_idle", "default", 200, BURST)
        .inference("during_idle", "default", 200, 10)
        .inference("after_idle", "default", 200, 1)
        .inference("after_idle_burst", "default", 200, BURST)
        .assert_agent(&agent, Duration::from_secs(10))?;
    let h1_latency = latency_sum_us(&m, H1_HOST, "after_idle", "default") / 1000.0;
    ensure!(
        h1_latency >= H1_DELAY_MS as f64 && h1_latency <= SANE.as_secs_f64() * 1000.0,
        "h1server: latency of the request after the idle gap {h1_latency} ms (delay {H1_DELAY_MS} ms, \
         client waited {:?})",
        h1_reused.client_wait
    );

    // TorchServe: exactly its own counts, and the request after the gap timed like TorchServe times it.
    let own = ts.scrape()?;
    let host = ts.hostname()?;
    let want_2xx = own
        .get("Requests2XX", &[("Level", "Host"), ("Hostname", &host)])
        .unwrap_or(0.0)
        + 1.0;
    let m = agent
        .wait_until(
            Duration::from_secs(10),
            "TorchServe's scrape counted",
            |m| m.get("Requests2XX", &[("Level", "Host"), ("Hostname", &host)]) >= Some(want_2xx),
        )
        .and_then(|_| {
            thread::sleep(Duration::from_millis(300));
            agent.scrape()
        })?;
    let diff = torchserve::count_differences(&own, &m, &host, 1.0);
    ensure!(
        diff.is_empty(),
        "servescope differs from TorchServe:\n  {}\n{}",
        diff.join("\n  "),
        agent.log_tail()
    );
    let slow_ms = |m: &Metrics| latency_sum_us(m, &host, "slow", "default") / 1000.0;
    let (agent_slow, own_slow) = (slow_ms(&m), slow_ms(&own));
    ensure!(
        agent_slow >= SLOW_MS
            && agent_slow <= SANE.as_secs_f64() * 1000.0
            && (agent_slow - own_slow).abs() <= 500.0,
        "TorchServe: latency of the request after the idle gap {agent_slow} ms by servescope, \
         {own_slow} ms by TorchServe (client waited {:?})",
        ts_reused.client_wait
    );

    // Everything closed: the kernel is back to where it was before these connections.
    let closed = eventually_conns(agent_pid, (h1_pid, ts_pid), baseline);
    ensure!(
        closed == baseline,
        "after every connection closed the kernel holds {closed:?} connection entries, {baseline:?} before"
    );
    // A thread's in-flight syscall state lives in task-local storage (ebpf/sockets.bpf.c, R9), freed
    // with the thread: there is no per-syscall map left to leak, only the connections checked above.
    drop(agent);
    ts.stop();
    Ok(())
}

/// The agent's kernel connection entries of the two servers, once they equal `want` (polled for up to
/// 5 s: a close may still be on its way), else as they are then.
fn eventually_conns(agent: u32, (a, b): (u32, u32), want: (usize, usize)) -> (usize, usize) {
    let read = || {
        (
            kernel::conns_of(agent, a).unwrap_or(usize::MAX),
            kernel::conns_of(agent, b).unwrap_or(usize::MAX),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = read();
        if now == want || Instant::now() >= deadline {
            return now;
        }
        thread::sleep(Duration::from_millis(50));
    }
}
