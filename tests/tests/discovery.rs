//! Targets come and go with the kernel's process events, not with /proc polling. The full rescan is
//! pushed out of the test's reach (`--discovery-interval-ms 600000`: one scan at start), so everything
//! below can only come from the exec/listen/exit tracepoints (ebpf/sockets.bpf.c, pipeline::discover):
//! a server that starts listening on a watched port after the agent is traced within 2 s and counted
//! exactly, one on another port is left alone, and an exit is noticed within 2 s with its kernel state
//! freed. TorchServe found by exec (command line) is covered by tests/tests/lifecycle.rs, which runs with
//! the default 30 s rescan.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use servescope_integration::{
    Agent, ensure_kernel_prereqs,
    h1::{Client, Expected, Family, H1Server},
    kernel, log_dir, require_root,
};

const H1SERVER: &str = env!("CARGO_BIN_EXE_h1server");
/// The bound for "traced after it starts listening" and for noticing an exit.
const WITHIN: Duration = Duration::from_secs(2);

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn targets(agent: &Agent) -> Result<f64> {
    Ok(agent.scrape()?.sum("servescope_targets"))
}

#[test]
fn listen_and_exit_events_drive_discovery() -> Result<()> {
    listen_and_exit_events("discovery_events", "auto", "syscalls")
}

/// The same with the socket hooks, which see listen() as the socket's TCP_LISTEN state
/// (`inet_sock_set_state`) instead of on the listen syscall's tracepoint.
#[test]
fn listen_and_exit_events_drive_discovery_with_the_socket_hooks() -> Result<()> {
    listen_and_exit_events("discovery_events_sockets", "sockets", "sockets")
}

fn listen_and_exit_events(name: &str, hooks: &str, loaded: &str) -> Result<()> {
    require_root()?;
    ensure_kernel_prereqs()?;
    let logs = log_dir(name)?;
    let watched = free_port()?;
    let other = free_port()?;
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let agent = Agent::start(
        &logs,
        listen,
        &[
            "--no-discovery",
            "--port",
            &watched.to_string(),
            "--discovery-interval-ms",
            "600000",
            "--data-hooks",
            hooks,
        ],
    )?;
    agent.wait_until(Duration::from_secs(15), "serving /metrics", |m| {
        m.has("servescope_targets")
    })?;
    let want = format!("data_hooks=\"{loaded}\"");
    ensure!(
        agent.log_tail().contains(&want),
        "the agent should say it loaded {want}:\n{}",
        agent.log_tail()
    );
    // Let the one start-up scan pass.
    std::thread::sleep(Duration::from_millis(500));
    ensure!(targets(&agent)? == 0.0, "nothing listens yet");

    // A listener on a port the agent does not watch stays untraced.
    let bystander = H1Server::start(Path::new(H1SERVER), &logs, Family::V4, &[other])?;
    std::thread::sleep(Duration::from_secs(1));
    ensure!(
        targets(&agent)? == 0.0,
        "a server on port {other} (not watched) must not be traced"
    );
    drop(bystander);

    // The watched port: traced from its listen(), within 2 s.
    let started = Instant::now();
    let server = H1Server::start(Path::new(H1SERVER), &logs, Family::V4, &[watched])?;
    agent.wait_until(WITHIN, "the new listener traced", |m| {
        m.sum("servescope_targets") == 1.0
    })?;
    eprintln!(
        "traced {:?} after the server was spawned",
        started.elapsed()
    );
    let mut c = Client::connect(server.addr())?;
    for _ in 0..20 {
        ensure!(c.call("POST", "/predictions/evented", b"x")? == 200);
    }
    drop(c);
    let mut want = Expected::new(&hostname());
    want.inference("evented", "default", 200, 20);
    want.assert_agent(&agent, Duration::from_secs(10))?;

    // Its exit: untracked within 2 s of the kill, kernel connection state freed.
    let pid = server.pid();
    drop(server);
    let stopped = Instant::now();
    agent.wait_until(WITHIN, "the exited server untracked", |m| {
        m.sum("servescope_targets") == 0.0
    })?;
    eprintln!(
        "untracked {:?} after the server was stopped",
        stopped.elapsed()
    );
    ensure!(
        kernel::conns_of(agent.pid(), pid)? == 0,
        "the exited server's kernel connections must be freed"
    );
    let log = agent.log_tail();
    ensure!(
        !log.contains("rescanning"),
        "no event may have been dropped here:\n{log}"
    );
    Ok(())
}
