//! Pipelined requests to a real TorchServe 0.12, which answers them in completion order (FACTS.md §5:
//! a slow request followed by a fast one gets the fast one's response first). servescope pairs responses
//! with requests in arrival order (nothing on the wire says which response answers which request), so
//! the documented rule (README "How it counts") is:
//! - status classes (Requests2XX/4XX/5XX) are exact;
//! - every answered request is counted once under its own model, but what depends on the pairing (the
//!   latency, the status class of the histogram) may be swapped between the two requests of a pair;
//! - a request TorchServe never answers on the wire (it closes the connection after an earlier error
//!   response) is counted by TorchServe, at dispatch, but cannot be by servescope.

use std::{thread, time::Duration};

use anyhow::{Result, ensure};
use servescope_integration::{
    Agent, Metrics, TorchServeHome, ensure_kernel_prereqs,
    h1::{Client, request_bytes},
    log_dir, require_root,
};

const SETTLE: Duration = Duration::from_secs(10);

fn model_sum(m: &Metrics, family: &str, model: &str) -> f64 {
    m.series(family)
        .filter(|(s, _)| s.label("model_name") == Some(model))
        .map(|(_, v)| v)
        .sum()
}

#[test]
fn pipelined_pairs_answered_out_of_order_keep_exact_counts() -> Result<()> {
    const PAIRS: u32 = 4;
    require_root()?;
    ensure_kernel_prereqs()?;
    Agent::binary()?;
    let logs = log_dir("torchserve_pipelining")?;
    let home = TorchServeHome::default();
    home.setup(&logs.join("torchserve-setup.log"))?;
    let ts = home.start(&logs)?;
    let listen = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let agent = Agent::start(&logs, listen, &[])?;
    agent.wait_ready(Duration::from_secs(15))?;

    // slow (200 ms) then echo, in one write, on one connection: echo's response comes first.
    let mut c = Client::connect(ts.inference_addr())?;
    for _ in 0..PAIRS {
        let mut pair = request_bytes("POST", "/predictions/slow", b"first");
        pair.extend(request_bytes("POST", "/predictions/echo", b"second"));
        c.send(&pair)?;
        for _ in 0..2 {
            ensure!(c.read_reply()?.status == 200);
        }
    }
    drop(c);
    // slow then fail: fail's 503 comes first, and TorchServe closes the connection right after it
    // (every status >= 400): slow's reply never reaches the wire.
    for _ in 0..PAIRS {
        let mut c = Client::connect(ts.inference_addr())?;
        let mut pair = request_bytes("POST", "/predictions/slow", b"first");
        pair.extend(request_bytes("POST", "/predictions/fail", b"second"));
        c.send(&pair)?;
        let mut statuses = Vec::new();
        while let Ok(r) = c.read_reply() {
            statuses.push(r.status);
        }
        ensure!(statuses == [503], "slow+fail pair answered {statuses:?}");
    }

    let ts_m = ts.scrape()?;
    // + this scrape (TorchServe counts it once rendered), - run.sh's /ping (sent before the agent ran).
    let want_2xx = ts_m.sum("Requests2XX") + 1.0 - 1.0;
    let m = agent.wait_until(SETTLE, "all responses counted", |m| {
        m.sum("Requests2XX") >= want_2xx
    })?;
    thread::sleep(Duration::from_millis(300));
    let m = agent.scrape().unwrap_or(m);
    let mut diff = Vec::new();
    for (family, want) in [
        ("Requests2XX", want_2xx),
        ("Requests4XX", ts_m.sum("Requests4XX")),
        ("Requests5XX", ts_m.sum("Requests5XX")),
    ] {
        if m.sum(family) != want {
            diff.push(format!(
                "{family}: servescope {}, TorchServe {want}",
                m.sum(family)
            ));
        }
    }
    // Each slow+fail pair put one response on the wire, the 503, paired with the first request (slow);
    // TorchServe counted both requests at dispatch.
    for (model, unseen) in [("slow", 0.0), ("echo", 0.0), ("fail", f64::from(PAIRS))] {
        let (got, want) = (
            model_sum(&m, "ts_inference_requests_total", model),
            model_sum(&ts_m, "ts_inference_requests_total", model) - unseen,
        );
        if got != want {
            diff.push(format!(
                "ts_inference_requests_total {model}: servescope {got}, want {want}"
            ));
        }
    }
    for family in [
        "servescope_unmatched_responses_total",
        "servescope_http_parse_errors_total",
    ] {
        if m.sum(family) != 0.0 {
            diff.push(format!("{family} = {}", m.sum(family)));
        }
    }
    // For the record: the slow+echo latencies are swapped.
    eprintln!(
        "latency sums (µs) servescope/TorchServe: slow {}/{}, echo {}/{}, fail {}/{}",
        model_sum(&m, "ts_inference_latency_microseconds", "slow"),
        model_sum(&ts_m, "ts_inference_latency_microseconds", "slow"),
        model_sum(&m, "ts_inference_latency_microseconds", "echo"),
        model_sum(&ts_m, "ts_inference_latency_microseconds", "echo"),
        model_sum(&m, "ts_inference_latency_microseconds", "fail"),
        model_sum(&ts_m, "ts_inference_latency_microseconds", "fail"),
    );
    ensure!(diff.is_empty(), "{}\n{}", diff.join("\n"), agent.log_tail());
    drop(agent);
    ts.stop();
    Ok(())
}
