//! One agent per node, many pods: servers in their own network and UTS namespaces (what a Kubernetes
//! pod is to the kernel), each with its own hostname and its own 127.0.0.1:8080, are traced by one agent
//! and reported under their own `Hostname` / `hostname` label, exactly as each would report itself.
//!
//! Pods are simulated with `unshare --uts --net` (loopback up, hostname set) around h1server; the test's
//! clients join a pod's network namespace on their own thread (setns), so all traffic stays inside it.

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddr},
    os::fd::AsRawFd,
    path::Path,
    process::Command,
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use servescope_integration::{
    Agent, ensure_kernel_prereqs,
    h1::{Client, Expected, H1Server},
    log_dir, require_root,
};

const H1SERVER: &str = env!("CARGO_BIN_EXE_h1server");
/// Every pod listens on the same port of its own loopback.
const POD_PORT: u16 = 8080;
const SETTLE: Duration = Duration::from_secs(10);

/// h1server as the only process of a pod: own network namespace (only `lo`, up), own hostname.
fn start_pod(logs: &Path, hostname: &str) -> Result<H1Server> {
    let mut cmd = Command::new("unshare");
    cmd.args(["--uts", "--net", "sh", "-c"]).arg(format!(
        "ip link set lo up && hostname {hostname} && exec {H1SERVER} --port {POD_PORT}"
    ));
    H1Server::start_command(logs, hostname, cmd, Ipv4Addr::LOCALHOST.into())
}

/// Runs `f` on a thread that has joined `pod`'s network namespace: its sockets reach the pod's
/// 127.0.0.1. (setns with CLONE_NEWNET affects only the calling thread.)
fn in_pod<T: Send + 'static>(
    pod: &H1Server,
    f: impl FnOnce(SocketAddr) -> Result<T> + Send + 'static,
) -> Result<T> {
    let ns =
        File::open(format!("/proc/{}/ns/net", pod.pid())).context("opening the pod's netns")?;
    let addr = pod.addr();
    thread::spawn(move || {
        // SAFETY: setns on an open namespace fd; it changes only this thread's network namespace.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        f(addr)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("pod client panicked"))?
}

/// Two pods, same port, different hostnames; one agent started with `--port 8080` finds both (the
/// listener table is read per network namespace) and labels each pod's counts with the pod's hostname.
#[test]
fn pods_are_reported_under_their_own_hostnames() -> Result<()> {
    require_root()?;
    ensure_kernel_prereqs()?;
    let logs = log_dir("namespaces/pods")?;
    let pods = [
        ("pod-a", start_pod(&logs, "pod-a")?),
        ("pod-b", start_pod(&logs, "pod-b")?),
    ];
    let listen = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let port = POD_PORT.to_string();
    let agent = Agent::start(
        &logs,
        listen,
        &[
            "--no-discovery",
            "--port",
            &port,
            "--discovery-interval-ms",
            "100",
        ],
    )?;
    agent.wait_until(Duration::from_secs(15), "both pods traced", |m| {
        m.sum("servescope_targets") >= 2.0
    })?;

    // Different traffic per pod, so that a mix-up of labels cannot go unnoticed.
    for (i, (name, pod)) in pods.iter().enumerate() {
        let n = 20 + 10 * u32::try_from(i)?;
        let sent = in_pod(pod, move |addr| {
            let mut c = Client::connect(addr)?;
            for _ in 0..n {
                ensure!(c.call("POST", "/predictions/echo", b"hi")? == 200);
            }
            ensure!(c.call("POST", "/predictions/echo/2.0?status=503", b"")? == 503);
            Ok(n)
        })?;
        eprintln!("{name}: {sent} + 1 requests");
    }
    for (i, (name, _)) in pods.iter().enumerate() {
        let n = 20 + 10 * u32::try_from(i)?;
        Expected::new(name)
            .inference("echo", "default", 200, n)
            .inference("echo", "2.0", 503, 1)
            .assert_agent(&agent, SETTLE)?;
    }
    // Both pods' hostnames label the host-level families too.
    let m = agent.scrape()?;
    let hosts = m.label_values("Hostname");
    for (name, _) in &pods {
        ensure!(
            hosts.contains(*name),
            "no Hostname={name} series: {hosts:?}"
        );
    }
    Ok(())
}
