//! One agent per node, many pods: servers in their own network and UTS namespaces (what a Kubernetes
//! pod is to the kernel), each with its own hostname and its own 127.0.0.1:8080, are traced by one agent
//! and reported under their own `Hostname` / `hostname` label, exactly as each would report itself.
//!
//! Pods are simulated with `unshare --uts --net` (loopback up, hostname set) around h1server, and with
//! `unshare --uts --net --mount` around real TorchServe frontends (each with its own `/etc/hosts` and
//! `/tmp`, see `TorchServeHome::for_pod`); the test's clients join a pod's network namespace on their own
//! thread (setns), so all traffic stays inside it.

use std::{collections::BTreeSet, net::SocketAddr, path::Path, thread, time::Duration};

use anyhow::{Result, ensure};
use servescope_integration::{
    Agent, Metrics, TorchServe, TorchServeHome, ensure_kernel_prereqs,
    h1::{Client, Expected, H1Server, eventually},
    kernel, log_dir, netns, require_root, torchserve,
};

const H1SERVER: &str = env!("CARGO_BIN_EXE_h1server");
/// Every pod listens on the same port of its own loopback.
const POD_PORT: u16 = 8080;
const SETTLE: Duration = Duration::from_secs(10);

/// h1server as the only process of a pod: own network namespace (only `lo`, up), own hostname.
fn start_pod(logs: &Path, hostname: &str) -> Result<H1Server> {
    H1Server::start_in_pod(Path::new(H1SERVER), logs, hostname, POD_PORT)
}

/// Runs `f` on a thread that has joined `pod`'s network namespace: its sockets reach the pod's
/// 127.0.0.1.
fn in_pod<T: Send + 'static>(
    pod: &H1Server,
    f: impl FnOnce(SocketAddr) -> Result<T> + Send + 'static,
) -> Result<T> {
    let addr = pod.addr();
    netns::run_in(pod.pid(), move || f(addr))
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
    // Every client connection is closed: the kernel holds no connection state for either pod.
    for (name, pod) in &pods {
        let (a, p) = (agent.pid(), pod.pid());
        let freed = eventually(Duration::from_secs(5), || {
            kernel::conns_of(a, p).is_ok_and(|n| n == 0)
        });
        ensure!(
            freed,
            "{name}: {} kernel connection entries left after every connection closed",
            kernel::conns_of(a, p)?
        );
    }
    Ok(())
}

/// `n` POSTs to `path` inside `ts`'s pod, each answering `status`: on one keep-alive connection, except
/// that TorchServe closes the connection after every status >= 400, so those get one connection each.
fn send(ts: &TorchServe, path: &'static str, n: u32, status: u16) -> Result<()> {
    let addr = ts.inference_addr();
    ts.in_netns(move || {
        let mut c = Client::connect(addr)?;
        for i in 0..n {
            if status >= 400 && i > 0 {
                c = Client::connect(addr)?;
            }
            let st = c.call("POST", path, format!("pod request {i}").as_bytes())?;
            ensure!(st == status, "{path} answered {st}, want {status}");
        }
        Ok(())
    })
}

/// Two real TorchServe 0.12 frontends on one node, each in its own pod (network, UTS and mount
/// namespaces: its own hostname, its own 127.0.0.1:8080-8082, its own /tmp with its worker sockets).
/// One agent in the node's namespaces, started before them, discovers both and reports each under its
/// own `Hostname` / `hostname` label with exactly the counts that pod's TorchServe reports on its own
/// :8082. Afterwards the kernel holds no more connection state for either frontend than before the
/// traffic: every client connection's entry was freed when it closed.
#[test]
fn torchserve_pods_are_each_reported_as_they_report_themselves() -> Result<()> {
    require_root()?;
    ensure_kernel_prereqs()?;
    Agent::binary()?;
    let logs = log_dir("namespaces/torchserve_pods")?;
    let home = TorchServeHome::default();
    home.setup(&logs.join("torchserve-setup.log"))?;
    let listen = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    // Default discovery (TorchServe frontends by command line), rescanned every 100 ms.
    let agent = Agent::start(&logs, listen, &["--discovery-interval-ms", "100"])?;
    agent.wait_until(Duration::from_secs(15), "/metrics served", |_| true)?;
    ensure!(
        agent.scrape()?.sum("servescope_targets") == 0.0,
        "a TorchServe is already running: the test needs the machine to itself"
    );
    let mut pods = Vec::new();
    for name in ["ts-pod-a", "ts-pod-b"] {
        let dir = logs.join(name);
        let ts = home.for_pod(&dir.join("home"), name)?.start(&dir)?;
        eprintln!(
            "{name}: TorchServe pid {} ready in {:?}",
            ts.pid(),
            ts.startup_time()
        );
        pods.push(ts);
    }
    agent.wait_until(Duration::from_secs(15), "both pods traced", |m| {
        m.sum("servescope_targets") >= 2.0
    })?;
    // Only the two frontends: not the `grep org.pytorch.serve.ModelServer` run.sh polls them with
    // (discovery every 100 ms sees several), nor a worker between its fork and exec.
    let log = std::fs::read_to_string(agent.log_path())?;
    let traced: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("tracing target"))
        .collect();
    ensure!(
        traced.len() == 2,
        "the agent traced other processes than the two frontends:\n{}",
        traced.join("\n")
    );
    // What the kernel holds for each frontend at rest: its connections to its own workers.
    for ts in &pods {
        ts.wait_clients_gone(Duration::from_secs(5))?;
    }
    let agent_pid = agent.pid();
    let baseline = pods
        .iter()
        .map(|ts| kernel::conns_of(agent_pid, ts.pid()))
        .collect::<Result<Vec<_>>>()?;

    // Different traffic per pod, so that a mix-up of labels cannot go unnoticed.
    for (i, ts) in pods.iter().enumerate() {
        let i = u32::try_from(i)?;
        send(ts, "/predictions/echo", 20 + 15 * i, 200)?;
        send(ts, "/predictions/slow", 1 + i, 200)?;
        send(ts, "/predictions/fail", 2 + i, 503)?;
        send(ts, "/predictions/nosuchmodel", 1 + 2 * i, 404)?;
    }

    // Each pod's TorchServe is the truth. Its scrape of itself is counted by the agent at once, by
    // TorchServe only after it rendered (FACTS.md §3): the agent has one more 2XX per pod.
    let own: Vec<Metrics> = pods.iter().map(TorchServe::scrape).collect::<Result<_>>()?;
    let hosts: Vec<String> = pods
        .iter()
        .map(TorchServe::hostname)
        .collect::<Result<_>>()?;
    let host_2xx =
        |m: &Metrics, h: &str| m.get("Requests2XX", &[("Level", "Host"), ("Hostname", h)]);
    let m = agent.wait_until(SETTLE, "each pod's scrape counted", |m| {
        hosts
            .iter()
            .zip(&own)
            .all(|(h, o)| host_2xx(m, h) >= host_2xx(o, h).map(|v| v + 1.0))
    });
    thread::sleep(Duration::from_millis(300));
    let m = m.and_then(|_| agent.scrape())?;
    let mut diff = Vec::new();
    for (h, o) in hosts.iter().zip(&own) {
        // TorchServe labels its own series with the pod's hostname: the pod is what it should be.
        ensure!(
            o.label_values("Hostname") == BTreeSet::from([h.clone()]),
            "TorchServe in pod {h} reports Hostname {:?}",
            o.label_values("Hostname")
        );
        diff.extend(torchserve::count_differences(o, &m, h, 1.0));
        let echo = o.get(
            "ts_inference_requests_total",
            &[
                ("model_name", "echo"),
                ("model_version", "default"),
                ("hostname", h),
            ],
        );
        ensure!(
            echo.is_some_and(|n| n > 0.0),
            "TorchServe in pod {h} counted no echo requests"
        );
        // Queue latency comes from the frontend's frames to its own workers, in its own /tmp.
        let queued = m
            .get(
                "ts_queue_latency_microseconds",
                &[
                    ("model_name", "echo"),
                    ("model_version", "default"),
                    ("hostname", h),
                ],
            )
            .unwrap_or(0.0);
        if queued <= 0.0 {
            diff.push(format!(
                "ts_queue_latency_microseconds{{echo, {h}}} = {queued}"
            ));
        }
    }
    // No series under any other hostname (the node's own, or a pod's name swapped), in the ts_*
    // families (`hostname`) nor in the Level ones (`Hostname`: requests, system samplers).
    let want_hosts: BTreeSet<String> = hosts.iter().cloned().collect();
    for label in ["hostname", "Hostname"] {
        let reported = m.label_values(label);
        if reported != want_hosts {
            diff.push(format!("{label} labels {reported:?}, want {want_hosts:?}"));
        }
    }
    ensure!(
        diff.is_empty(),
        "servescope differs from the pods' own TorchServe:\n  {}\nend of the agent's log:\n{}",
        diff.join("\n  "),
        agent.log_tail()
    );

    // Kernel map occupancy back to where it was: every client connection (requests and scrapes) is
    // closed, and its `conns` entry with it.
    for (ts, base) in pods.iter().zip(&baseline) {
        let pid = ts.pid();
        let back = eventually(Duration::from_secs(5), || {
            kernel::conns_of(agent_pid, pid).is_ok_and(|n| n == *base)
        });
        ensure!(
            back,
            "TorchServe {pid}: {} kernel connection entries, {base} before the traffic",
            kernel::conns_of(agent_pid, pid)?
        );
    }
    // A thread's in-flight syscall state lives in task-local storage (ebpf/sockets.bpf.c, R9), freed
    // with the thread: there is no per-syscall map left to leak, only the connections checked above.
    drop(agent);
    for ts in pods {
        ts.stop();
    }
    Ok(())
}
