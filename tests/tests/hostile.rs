//! Hostile traffic against a traced real server (`tests/servers/predict_server.py`, Python's
//! http.server): binary junk, 64 KiB request heads, headers without CRLF, a slowloris client
//! (1 byte/s), 10,000 distinct bogus model names, absurd and overflowing Content-Lengths, chunk sizes
//! beyond u64 — while legitimate requests go on beside them. The agent must keep counting the
//! legitimate requests exactly, create no model series beyond its cap (counting what it turns away),
//! stay alive and keep its memory bounded.

use std::{
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use servescope_integration::{
    Agent, Hooks, Metrics, ServerProcess, h1, http, log_dir, on_both_hooks, require_root,
};

// On each set of data hooks (`syscalls::…`, `sockets::…`).
on_both_hooks!(hostile_traffic_leaves_legitimate_counts_exact);

const SERVER_PORT: u16 = 18_190;
const AGENT_PORT: u16 = 19_190;
const TIMEOUT: Duration = Duration::from_secs(20);
/// `MAX_MODEL_SERIES` in agent/src/registry.rs.
const MAX_MODEL_SERIES: usize = 2000;
const BOGUS_MODELS: usize = 10_000;
/// Growth of the agent's resident memory allowed over the whole run.
const RSS_GROWTH_LIMIT_KIB: u64 = 96 * 1024;

fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/PID/status")
}

fn legit_count(m: &Metrics) -> f64 {
    m.get(
        "ts_inference_requests_total",
        &[
            ("model_name", "legit"),
            ("model_version", "default"),
            ("hostname", &hostname()),
        ],
    )
    .unwrap_or(0.0)
}

/// Sends `bytes` on a new connection, reads whatever comes back for a moment, closes. The server
/// may answer, reset or wait: none of it matters here, only what the agent makes of it.
fn hostile(addr: SocketAddr, bytes: &[u8]) -> Result<()> {
    let mut s = TcpStream::connect(addr).context("connecting")?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    // A server that stops reading (it answered already) may reset the rest: not an error here.
    let _ = s.write_all(bytes);
    let mut sink = [0u8; 65_536];
    while let Ok(n) = s.read(&mut sink) {
        if n == 0 {
            break;
        }
    }
    Ok(())
}

/// Every kind of malformed or abusive request, each on its own connection.
fn hostile_inputs() -> Vec<(&'static str, Vec<u8>)> {
    // Deterministic pseudo-random bytes (a linear congruential generator): reproducible junk.
    let mut x: u32 = 0x2545_f491;
    let junk: Vec<u8> = (0..8192)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            x.to_be_bytes()[0]
        })
        .collect();
    let mut junk_then_head = junk.clone();
    junk_then_head.extend_from_slice(b"\r\n\r\nGET /predictions/afterjunk HTTP/1.1\r\n\r\n");
    let long_target = format!(
        "GET /predictions/hugehead?q={} HTTP/1.1\r\nHost: x\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let long_header = format!(
        "POST /predictions/hugeheader HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nContent-Length: 2\r\n\r\nhi",
        "b".repeat(64 * 1024)
    );
    let many_headers: String =
        std::iter::once("GET /predictions/manyheaders HTTP/1.1\r\n".to_owned())
            .chain((0..4000).map(|i| format!("X-H{i}: v\r\n")))
            .chain(std::iter::once("\r\n".to_owned()))
            .collect();
    vec![
        ("binary junk", junk),
        ("junk then a head", junk_then_head),
        ("64 KiB request target", long_target.into_bytes()),
        ("64 KiB header", long_header.into_bytes()),
        ("4000 headers", many_headers.into_bytes()),
        (
            "LF-only line ends",
            b"GET /predictions/lfonly HTTP/1.1\nHost: x\n\n".to_vec(),
        ),
        (
            "no line end at all",
            b"GET /predictions/noeol HTTP/1.1 Host: x".to_vec(),
        ),
        (
            "bare CR line ends",
            b"GET /predictions/cronly HTTP/1.1\rHost: x\r\r".to_vec(),
        ),
        (
            "Content-Length u64::MAX",
            b"POST /predictions/absurd HTTP/1.1\r\nContent-Length: 18446744073709551615\r\n\r\nabc".to_vec(),
        ),
        (
            "Content-Length beyond u64",
            b"POST /predictions/absurd HTTP/1.1\r\nContent-Length: 99999999999999999999999999\r\n\r\nabc"
                .to_vec(),
        ),
        (
            "negative Content-Length",
            b"POST /predictions/absurd HTTP/1.1\r\nContent-Length: -5\r\n\r\nabc".to_vec(),
        ),
        (
            "two Content-Lengths",
            b"POST /predictions/absurd HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 900\r\n\r\nabc".to_vec(),
        ),
        (
            "chunk size beyond u64",
            b"POST /predictions/chunky HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFFFFFFFFF\r\nabc\r\n0\r\n\r\n"
                .to_vec(),
        ),
        (
            "chunk size u64::MAX",
            b"POST /predictions/chunky HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFF\r\nabc\r\n".to_vec(),
        ),
        (
            "chunk size not hex",
            b"POST /predictions/chunky HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n".to_vec(),
        ),
        ("NUL bytes", vec![0u8; 4096]),
        (
            "a response where a request belongs",
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec(),
        ),
    ]
}

fn hostile_traffic_leaves_legitimate_counts_exact(hooks: Hooks) -> Result<()> {
    require_root()?;
    let logs = log_dir(&format!("hostile/{}", hooks.name()))?;
    let server = ServerProcess::predict_server(&logs, SERVER_PORT)?;
    let port = SERVER_PORT.to_string();
    let addr = server.addr();
    let agent = Agent::start(
        &logs,
        loopback(AGENT_PORT),
        &[&["--no-discovery", "--port", &port][..], &hooks.args()].concat(),
    )?;
    agent.wait_ready(Duration::from_secs(30))?;
    hooks.ensure_attached(&agent)?;
    let rss_start = rss_kib(agent.pid())?;

    // The legitimate model has its series before the spray, as a model in service would.
    let legit = |i: usize| -> Result<()> {
        let r = http::post(
            addr,
            "/predictions/legit",
            format!("x{i}").as_bytes(),
            TIMEOUT,
        )?;
        ensure!(r.status == 200, "legitimate request answered {}", r.status);
        Ok(())
    };
    legit(0)?;
    let mut sent = 1usize;

    let started = Instant::now();
    // Hostile inputs, twice over, on their own connections.
    let abuse = thread::spawn(move || -> Result<()> {
        for round in 0..2 {
            for (what, bytes) in hostile_inputs() {
                hostile(addr, &bytes).with_context(|| format!("{what} (round {round})"))?;
            }
        }
        Ok(())
    });
    // 404-style spray: 10,000 distinct model names from four clients, a connection each (Python's
    // server writes head and body separately without TCP_NODELAY: on keep-alive connections each
    // response would wait out a delayed ACK).
    let spray: Vec<_> = (0..4)
        .map(|c| {
            thread::spawn(move || -> Result<()> {
                for i in (c..BOGUS_MODELS).step_by(4) {
                    http::post(addr, &format!("/predictions/bogus-{i}"), b"x", TIMEOUT)?;
                }
                Ok(())
            })
        })
        .collect();
    // Slowloris: a legitimate request whose head arrives 1 byte a second for 4 s, then the rest.
    let slow = thread::spawn(move || -> Result<()> {
        let req = h1::request_bytes("POST", "/predictions/legit", b"slow");
        let mut client = h1::Client::connect(addr)?;
        client.send_in_pieces(&req[..4], &[1], Duration::from_secs(1))?;
        client.send(&req[4..])?;
        let reply = client.read_reply()?;
        ensure!(
            reply.status == 200,
            "slow request answered {}",
            reply.status
        );
        Ok(())
    });
    // Legitimate traffic throughout, and a minimum of it.
    while !(abuse.is_finished() && slow.is_finished() && spray.iter().all(|t| t.is_finished()))
        || sent < 200
    {
        legit(sent)?;
        sent += 1;
        // Paced: the point is interleaving, not starving the single-process server of the spray.
        thread::sleep(Duration::from_millis(10));
    }
    abuse
        .join()
        .map_err(|_| anyhow::anyhow!("abuse thread panicked"))??;
    for t in spray {
        t.join()
            .map_err(|_| anyhow::anyhow!("spray thread panicked"))??;
    }
    slow.join()
        .map_err(|_| anyhow::anyhow!("slowloris thread panicked"))??;
    sent += 1; // the slow one
    eprintln!(
        "hostile run: {sent} legitimate requests beside the abuse, {:?}",
        started.elapsed()
    );

    let want = sent as f64;
    agent.wait_until(TIMEOUT, &format!("{sent} legitimate requests"), |m| {
        legit_count(m) >= want
    })?;
    // Nothing arrives late to overshoot it.
    thread::sleep(Duration::from_secs(1));
    let m = agent.scrape()?;
    assert_eq!(legit_count(&m), want, "legitimate requests counted exactly");

    let models = m.label_values("model_name");
    ensure!(
        models.len() <= MAX_MODEL_SERIES,
        "{} model names have series; the cap is {MAX_MODEL_SERIES}",
        models.len()
    );
    ensure!(models.contains("legit"));
    let overflow = m.sum("servescope_model_series_overflow_total");
    ensure!(
        overflow >= (BOGUS_MODELS + 1 - MAX_MODEL_SERIES) as f64,
        "overflow counter {overflow} for {BOGUS_MODELS} bogus names over a cap of {MAX_MODEL_SERIES}"
    );
    ensure!(
        m.sum("servescope_http_parse_errors_total") > 0.0,
        "junk where a request head belongs is counted as a parse error"
    );

    agent.check_running()?;
    let rss_end = rss_kib(agent.pid())?;
    ensure!(
        rss_end <= rss_start + RSS_GROWTH_LIMIT_KIB,
        "agent RSS grew from {rss_start} KiB to {rss_end} KiB"
    );
    eprintln!("agent RSS {rss_start} KiB → {rss_end} KiB, overflow counter {overflow}");
    let status = agent.stop()?;
    ensure!(status.success(), "agent exited with {status} on SIGTERM");
    Ok(())
}
