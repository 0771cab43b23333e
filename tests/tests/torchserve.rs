//! servescope watching a real TorchServe 0.12.0 reports what TorchServe itself reports.
//!
//! Needs root (the agent loads BPF) and TorchServe's fixed ports (8080-8082, 7070-7071), so `cargo xtask
//! test` runs these one at a time. Logs and both scrapes of each test are kept in
//! `target/integration/<test>/`.

use std::{
    collections::BTreeMap, fmt::Write as _, fs, net::SocketAddr, path::PathBuf, time::Duration,
};

use anyhow::{Context, Result, bail};
use servescope_integration::{
    Agent, Metrics, Series, TorchServe, TorchServeHome, ensure_kernel_prereqs, http, log_dir,
    require_root,
    torchserve::{E2E_BATCHED, E2E_REGISTRATION_RESPONSES, burst, loopback},
};

/// The agent serves on 9082 so that TorchServe keeps its own metrics API on 8082 to compare with.
const AGENT_LISTEN: u16 = 9082;
/// From start to "TorchServe is traced": load and attach the BPF programs, one discovery scan.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// The agent counts from its ring buffer asynchronously: how long a count may lag the traffic.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests TorchServe answered before the agent was started: run.sh's single `GET /ping` (200).
const PINGS_BEFORE_AGENT: f64 = 1.0;
/// How far the agent's latency sums may be from TorchServe's (issue 6). The agent's clock holds
/// Netty's work on both ends of each request, a few ms (README, "How it counts"); over this mix the
/// slow model's 200 ms handler and the requests queued behind it dominate the sums.
const LATENCY_TOLERANCE: f64 = 0.05;
/// The agent's queue clock starts before TorchServe's (the read that completed the request, vs job
/// creation after Netty decoded it) and stops after it (the frame's write, vs the batch leaving the
/// aggregator): per request a few ms more on a loaded 2-core host, never less. The same bound as
/// tests/tests/torchserve_workers.rs.
const MAX_FRONTEND_OVERHEAD_US: f64 = 20_000.0;

/// Root, kernel file systems, TorchServe installed; a fresh log directory for the test.
fn prepare(test: &str) -> Result<(PathBuf, TorchServeHome)> {
    require_root()?;
    ensure_kernel_prereqs()?;
    Agent::binary()?; // fail before starting TorchServe if there is nothing to test
    let logs = log_dir(test)?;
    let home = TorchServeHome::default();
    home.setup(&logs.join("torchserve-setup.log"))?;
    Ok((logs, home))
}

fn agent_addr() -> SocketAddr {
    loopback(AGENT_LISTEN)
}

/// The Done-when test of issues 3 and 6: a fixed traffic mix through a real TorchServe serving
/// echo/slow/fail, echo's second version and a batching model; afterwards the agent's TorchServe
/// families equal TorchServe's own /metrics (latency sums within 5%).
#[test]
fn counters_equal_torchserve_after_traffic_mix() -> Result<()> {
    let (logs, home) = prepare("counters_equal_torchserve_after_traffic_mix")?;
    let ts = home.start(&logs)?;
    eprintln!(
        "TorchServe pid {} ready in {:.1?}",
        ts.pid(),
        ts.startup_time()
    );

    // Discovery on (the default): the agent must find the Java frontend by itself.
    let agent = Agent::start(&logs, agent_addr(), &[])?;
    let ready = agent.wait_ready(READY_TIMEOUT)?;
    eprintln!(
        "servescope ready, servescope_targets = {}",
        ready.sum("servescope_targets")
    );

    // Issue 6's model set beyond run.sh's three: a second version of echo and a batching model,
    // registered while the agent runs (so it sees their workers load, as a user's agent would).
    ts.register_e2e_models()?;

    let traffic = home.traffic(&logs, &[])?;
    eprintln!(
        "traffic.py: {} responses in {:.1?}",
        traffic.total_requests()?,
        traffic.duration
    );
    // traffic.py knows only echo/slow/fail; the versions and the batches are sent from here.
    let extra = model_set_traffic(&ts)?;
    eprintln!("model-set traffic: {extra:?}");

    // Order matters: TorchServe first. TorchServe renders the body and then counts this scrape's 200; the
    // agent sees that 200 leave TorchServe's socket and counts it too, before we scrape the agent.
    let ts_text = ts.scrape_text("")?;
    fs::write(logs.join("torchserve_metrics.txt"), &ts_text)
        .context("saving TorchServe's scrape")?;
    let ts_m = Metrics::parse(&ts_text).context("parsing TorchServe's /metrics")?;

    // TorchServe's Requests2XX = run.sh's /ping + the registrations + traffic's 2xx (no earlier
    // scrape, and not this one).
    // The agent missed the /ping (it started later) but saw this scrape's 200:
    //   agent = TorchServe's scraped value - PINGS_BEFORE_AGENT + 1.
    let ts_2xx = ts_m.sum("Requests2XX");
    let want_2xx = ts_2xx - PINGS_BEFORE_AGENT + 1.0;
    let agent_m = settle(&agent, "Requests2XX", want_2xx)?;
    fs::write(logs.join("servescope_metrics.txt"), agent.scrape_text("")?)
        .context("saving the agent's scrape")?;

    let mut report = String::new();
    let mut failures = Vec::new();

    // Requests2XX: same series (Level, Hostname) with the value shifted as explained above.
    let mut want = ts_m.family("Requests2XX");
    for v in want.values_mut() {
        *v += 1.0 - PINGS_BEFORE_AGENT;
    }
    compare_exact(
        &mut report,
        &mut failures,
        "Requests2XX (TorchServe + this scrape - run.sh's /ping)",
        &want,
        &agent_m.family("Requests2XX"),
    );
    for family in ["Requests4XX", "Requests5XX", "ts_inference_requests_total"] {
        compare_exact(
            &mut report,
            &mut failures,
            family,
            &ts_m.family(family),
            &agent_m.family(family),
        );
    }
    // Latency sums, and queue-latency sums (timed from the frontend's frame write to the worker's
    // Unix socket, matched to the HTTP exchange by x-request-id).
    for family in [
        "ts_inference_latency_microseconds",
        "ts_queue_latency_microseconds",
    ] {
        compare_latency(&mut report, &mut failures, family, &ts_m, &agent_m);
    }
    let mut timed = traffic.expected_latency_updates()?;
    for (key, n) in &extra {
        *timed.entry(key.clone()).or_default() += n;
    }
    compare_queue_per_series(&mut report, &mut failures, &ts_m, &agent_m, &timed);
    // Exact counts are only possible if the kernel delivered every record; this light load must not lose
    // any. The other health counters are printed for the record.
    let lost = agent_m.sum("servescope_kernel_lost_events_total");
    let _ = writeln!(
        report,
        "{} servescope_kernel_lost_events_total {lost} (must be 0); servescope_http_parse_errors_total {}, \
         servescope_unmatched_responses_total {}",
        mark(lost == 0.0),
        agent_m.sum("servescope_http_parse_errors_total"),
        agent_m.sum("servescope_unmatched_responses_total"),
    );
    if lost != 0.0 {
        failures.push(format!(
            "servescope_kernel_lost_events_total = {lost}: records were lost"
        ));
    }

    // The reference itself: TorchServe counted what traffic.py's rules (FACTS.md §3) predict. If this
    // fails, TorchServe or the mix changed, not the agent.
    let mut reference = Vec::new();
    let expect = |family: &str, extra: f64| -> Result<(String, f64, f64)> {
        Ok((
            family.to_owned(),
            traffic.expected_requests(family)? + extra,
            ts_m.sum(family),
        ))
    };
    let extra_2xx: f64 = extra.values().sum();
    for (family, want, got) in [
        expect(
            "Requests2XX",
            PINGS_BEFORE_AGENT + E2E_REGISTRATION_RESPONSES + extra_2xx,
        )?,
        expect("Requests4XX", 0.0)?,
        expect("Requests5XX", 0.0)?,
    ] {
        if want != got {
            reference.push(format!(
                "TorchServe {family} = {got}, traffic.py expected {want}"
            ));
        }
    }
    let mut expected = traffic.expected_inference_requests()?;
    for (key, n) in &extra {
        *expected.entry(key.clone()).or_default() += n;
    }
    for ((model, version), want) in expected {
        let got = ts_m
            .series("ts_inference_requests_total")
            .filter(|(s, _)| {
                s.label("model_name") == Some(&model) && s.label("model_version") == Some(&version)
            })
            .map(|(_, v)| v)
            .sum::<f64>();
        if want != got {
            reference.push(format!("TorchServe ts_inference_requests_total {model}/{version} = {got}, traffic.py expected {want}"));
        }
    }

    eprintln!("{report}");
    if !failures.is_empty() || !reference.is_empty() {
        bail!(
            "servescope differs from TorchServe:\n  {}\nreference problems (TorchServe vs traffic.py):\n  {}\n(logs and both scrapes: {})",
            if failures.is_empty() {
                "none".to_owned()
            } else {
                failures.join("\n  ")
            },
            if reference.is_empty() {
                "none".to_owned()
            } else {
                reference.join("\n  ")
            },
            logs.display()
        );
    }
    let status = agent.stop()?;
    if !status.success() {
        bail!("servescope exited with {status} on SIGTERM (expected a clean exit)");
    }
    ts.stop();
    Ok(())
}

/// Of TorchServe's traffic the kernel copies the heads of messages, not their bodies (R50, R51, R53):
/// echo uploads of 256 KiB, which Netty reads 4 KiB at a time, writes to the worker in several writes
/// and reads back from the worker's reply in pieces before answering, add a few hundred bytes each to
/// `servescope_kernel_copied_bytes_total` (tcp and unix): ~380 bytes a request here (the request's
/// head ~120, the response's ~240, the reply codes ~20). Copying every call's first 512 bytes came to
/// ~34 KB a request of the client's body alone (before R50), each message's first 512 bytes, body
/// start included, to ~1,050 (before R53).
#[test]
fn request_and_reply_bodies_stay_in_the_kernel() -> Result<()> {
    const N: usize = 5;
    const BODY: usize = 256 << 10;
    let (logs, home) = prepare("request_and_reply_bodies_stay_in_the_kernel")?;
    let ts = home.start(&logs)?;
    let agent = Agent::start(&logs, agent_addr(), &[])?;
    agent.wait_ready(READY_TIMEOUT)?;
    // Every transport but the workers' log pipes (their `[METRICS]` lines are read whole).
    let copied = |m: &Metrics| -> f64 {
        m.series("servescope_kernel_copied_bytes_total")
            .filter(|(s, _)| s.label("transport") != Some("pipe"))
            .map(|(_, v)| v)
            .sum()
    };
    let echo = |m: &Metrics| -> f64 {
        m.series("ts_inference_requests_total")
            .filter(|(s, _)| s.label("model_name") == Some("echo"))
            .map(|(_, v)| v)
            .sum()
    };
    let before = agent.scrape()?;
    for i in 0..N {
        let body: Vec<u8> = (0..BODY).map(|k| b'a' + ((k + i) % 26) as u8).collect();
        let r = http::post(
            ts.inference_addr(),
            "/predictions/echo",
            &body,
            SETTLE_TIMEOUT,
        )?;
        if r.status != 200 || r.body != body {
            bail!(
                "echo of {BODY} bytes: status {}, {} bytes back",
                r.status,
                r.body.len()
            );
        }
    }
    let want = echo(&before) + N as f64;
    let after = agent.wait_until(SETTLE_TIMEOUT, "the uploads counted", |m| echo(m) >= want)?;
    let added = copied(&after) - copied(&before);
    let by_series: Vec<String> = after
        .series("servescope_kernel_copied_bytes_total")
        .map(|(s, v)| {
            let was = before
                .get(
                    "servescope_kernel_copied_bytes_total",
                    &[
                        ("direction", s.label("direction").unwrap_or_default()),
                        ("transport", s.label("transport").unwrap_or_default()),
                    ],
                )
                .unwrap_or(0.0);
            format!(
                "{}/{} +{}",
                s.label("transport").unwrap_or_default(),
                s.label("direction").unwrap_or_default(),
                v - was
            )
        })
        .collect();
    eprintln!(
        "{N} echo requests of {BODY} bytes: the kernel copied {added} bytes ({})",
        by_series.join(", ")
    );
    if copied(&after) == 0.0 {
        bail!("no servescope_kernel_copied_bytes_total: the request heads at least are copied");
    }
    // Per request: the client's request head and the response head (tcp), the frame's first write
    // and the worker's reply codes (unix, 4 bytes a read).
    let most = (N * 4 * 512) as f64;
    if added > most {
        bail!(
            "the kernel copied {added} bytes for {N} echo requests, want at most {most}: bodies \
             left the kernel (logs: {})",
            logs.display()
        );
    }
    // The two heads of a request fit in 512 bytes together; its first read and the response's write
    // carry body bytes after them (4 KiB of upload, the echo's start), which stay in the kernel.
    let tcp = |m: &Metrics| -> f64 {
        m.series("servescope_kernel_copied_bytes_total")
            .filter(|(s, _)| s.label("transport") == Some("tcp"))
            .map(|(_, v)| v)
            .sum()
    };
    let tcp_added = tcp(&after) - tcp(&before);
    let heads = (N * 512) as f64;
    if tcp_added > heads {
        bail!(
            "the kernel copied {tcp_added} bytes of HTTP for {N} echo requests, want at most \
             {heads} (a request's head and its response's): body bytes sent with a head left the \
             kernel (logs: {})",
            logs.display()
        );
    }
    agent.stop()?;
    ts.stop();
    Ok(())
}

/// The part of the mix traffic.py cannot send (it knows only run.sh's models): both versions of echo
/// by explicit version and by default, and bursts to the batching model that fill batches and leave a
/// partial one waiting out max_batch_delay. Every request must answer 200 with its body; returns the
/// inference requests sent per (model, model_version label) — all 200s, each one timed.
fn model_set_traffic(ts: &TorchServe) -> Result<BTreeMap<(String, String), f64>> {
    // (path, label TorchServe gives it (FACTS.md §3-4: the URL's version segment, else "default"), n).
    const SEQUENTIAL: [(&str, (&str, &str), usize); 4] = [
        ("/predictions/echo/1.0", ("echo", "1.0"), 3),
        ("/predictions/echo/2.0", ("echo", "2.0"), 5),
        ("/echo/2.0/predict", ("echo", "2.0"), 1),
        ("/predictions/echo", ("echo", "default"), 3),
    ];
    const BURSTS: usize = 2;
    let mut sent = BTreeMap::new();
    for (path, (model, version), n) in SEQUENTIAL {
        for i in 0..n {
            let body = format!("{path} {i}");
            let r = http::post(
                ts.inference_addr(),
                path,
                body.as_bytes(),
                Duration::from_secs(10),
            )?;
            if r.status != 200 || r.body != body.as_bytes() {
                bail!("{path} answered {} {:?}", r.status, r.text());
            }
        }
        *sent
            .entry((model.to_owned(), version.to_owned()))
            .or_default() += n as f64;
    }
    // Two full batches and a half one per burst.
    let per_burst = 2 * E2E_BATCHED.batch_size + E2E_BATCHED.batch_size / 2;
    for _ in 0..BURSTS {
        burst(ts.inference_addr(), E2E_BATCHED.name, per_burst)?;
    }
    sent.insert(
        (E2E_BATCHED.name.to_owned(), "default".to_owned()),
        (BURSTS * per_burst) as f64,
    );
    Ok(sent)
}

/// The `Hostname` / `hostname` labels are TorchServe's own (its frontend's UTS hostname), and every
/// TorchServe family is announced with TorchServe's HELP and TYPE lines.
#[test]
fn hostname_and_families_match_torchserve() -> Result<()> {
    let (logs, home) = prepare("hostname_and_families_match_torchserve")?;
    let ts = home.start(&logs)?;
    let agent = Agent::start(&logs, agent_addr(), &[])?;
    agent.wait_ready(READY_TIMEOUT)?;

    // One inference so that the per-model families have a series in both expositions.
    let r = http::post(
        ts.inference_addr(),
        "/predictions/echo",
        b"hostname-check",
        Duration::from_secs(10),
    )?;
    if r.status != 200 || r.body != b"hostname-check" {
        bail!("echo answered {} {:?}", r.status, r.text());
    }
    let ts_text = ts.scrape_text("")?;
    fs::write(logs.join("torchserve_metrics.txt"), &ts_text)
        .context("saving TorchServe's scrape")?;
    let ts_m = Metrics::parse(&ts_text)?;
    // The echo (200) and the scrape (200): two responses the agent must have counted.
    let agent_m = agent.wait_until(
        SETTLE_TIMEOUT,
        "Requests2XX >= 2 and one inference counted",
        |m| m.sum("Requests2XX") >= 2.0 && m.sum("ts_inference_requests_total") >= 1.0,
    )?;
    fs::write(logs.join("servescope_metrics.txt"), agent.scrape_text("")?)
        .context("saving the agent's scrape")?;

    let hostnames = |m: &Metrics| -> std::collections::BTreeSet<String> {
        let torchserve_only = Metrics {
            samples: m
                .samples
                .iter()
                .filter(|(s, _)| !s.name.starts_with("servescope_"))
                .map(|(s, v)| (s.clone(), *v))
                .collect(),
            ..Metrics::default()
        };
        let mut all = torchserve_only.label_values("Hostname");
        all.extend(torchserve_only.label_values("hostname"));
        all
    };
    let ts_hosts = hostnames(&ts_m);
    let agent_hosts = hostnames(&agent_m);
    eprintln!(
        "hostname labels: TorchServe {ts_hosts:?}, servescope {agent_hosts:?}, uname {:?}",
        uname_nodename()
    );
    if ts_hosts.len() != 1 {
        bail!("TorchServe should print exactly one hostname, printed {ts_hosts:?}");
    }
    if agent_hosts != ts_hosts {
        bail!("servescope's hostname labels {agent_hosts:?} differ from TorchServe's {ts_hosts:?}");
    }

    // Every family TorchServe announces, the agent announces with the same TYPE and HELP text.
    let mut problems = Vec::new();
    for (family, kind) in &ts_m.types {
        match agent_m.types.get(family) {
            None => problems.push(format!("{family}: no # TYPE line")),
            Some(k) if k != kind => {
                problems.push(format!("{family}: TYPE {k}, TorchServe says {kind}"))
            }
            Some(_) => {}
        }
        if agent_m.helps.get(family) != ts_m.helps.get(family) {
            problems.push(format!(
                "{family}: HELP {:?}, TorchServe says {:?}",
                agent_m.helps.get(family),
                ts_m.helps.get(family)
            ));
        }
    }
    if !problems.is_empty() {
        bail!(
            "servescope's TorchServe families differ from TorchServe's:\n  {}",
            problems.join("\n  ")
        );
    }
    drop(agent);
    ts.stop();
    Ok(())
}

/// Polls the agent until `family`'s sum reaches `want` (bounded), then returns that scrape; on timeout
/// returns a last scrape anyway so the comparison below reports every difference, not just this one.
/// Issue 6: scraped every second while clients drive a real TorchServe, the agent never reports more
/// requests of a status class than clients had sent by then (a count ahead of the traffic would be a
/// double count or a misattributed class), its counts do advance during the traffic, and once the
/// traffic ends they equal what was sent and what TorchServe itself reports.
#[test]
fn scraped_every_second_never_ahead_of_what_was_sent() -> Result<()> {
    use std::{
        sync::atomic::{AtomicBool, AtomicU64, Ordering},
        thread,
        time::Instant,
    };

    const CLIENTS: usize = 3;
    const TRAFFIC: Duration = Duration::from_secs(6);
    const FAMILIES: [&str; 3] = ["Requests2XX", "Requests4XX", "Requests5XX"];
    let (logs, home) = prepare("scraped_every_second_never_ahead")?;
    let ts = home.start(&logs)?;
    let agent = Agent::start(&logs, agent_addr(), &[])?;
    agent.wait_ready(READY_TIMEOUT)?;
    let before = agent.scrape()?;

    // Per class: requests about to be sent (counted before the send) and answered as expected.
    let sent: [AtomicU64; 3] = Default::default();
    let answered: [AtomicU64; 3] = Default::default();
    let done = AtomicBool::new(false);
    let inference = ts.inference_addr();
    let scrapes = thread::scope(|scope| -> Result<Vec<[f64; 3]>> {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let (sent, answered) = (&sent, &answered);
                scope.spawn(move || -> Result<()> {
                    let started = Instant::now();
                    let mut i = c;
                    while started.elapsed() < TRAFFIC {
                        // 8 of 10 to echo (200), one unknown model (404), one failing handler (503).
                        let (path, class) = match i % 10 {
                            8 => ("/predictions/nosuchmodel", 1),
                            9 => ("/predictions/fail", 2),
                            _ => ("/predictions/echo", 0),
                        };
                        i += 1;
                        sent[class].fetch_add(1, Ordering::SeqCst);
                        let r = http::post(inference, path, b"live", Duration::from_secs(10))?;
                        let got = match r.status / 100 {
                            2 => Some(0),
                            4 => Some(1),
                            5 => Some(2),
                            _ => None,
                        };
                        anyhow::ensure!(got == Some(class), "{path} answered {}", r.status);
                        answered[class].fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(())
                })
            })
            .collect();
        let scraper = scope.spawn(|| -> Result<Vec<[f64; 3]>> {
            let mut seen = Vec::new();
            while !done.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_secs(1));
                let m = agent.scrape()?;
                // Read the clients' counts after the scrape: anything the agent counted was sent
                // before it answered.
                let limit: Vec<u64> = sent.iter().map(|a| a.load(Ordering::SeqCst)).collect();
                let mut row = [0.0; 3];
                for (k, family) in FAMILIES.iter().enumerate() {
                    row[k] = m.sum(family) - before.sum(family);
                    anyhow::ensure!(
                        row[k] <= limit[k] as f64,
                        "{family}: the agent reports {} while clients had sent {}",
                        row[k],
                        limit[k]
                    );
                }
                seen.push(row);
            }
            Ok(seen)
        });
        let mut failure = None;
        for c in clients {
            match c.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failure = Some(e),
                Err(_) => failure = Some(anyhow::anyhow!("a client thread panicked")),
            }
        }
        done.store(true, Ordering::SeqCst);
        let seen = scraper
            .join()
            .map_err(|_| anyhow::anyhow!("the scraper thread panicked"))??;
        match failure {
            Some(e) => Err(e),
            None => Ok(seen),
        }
    })?;
    eprintln!("per-second scrapes (2xx, 4xx, 5xx since start): {scrapes:?}");
    let rising = scrapes.windows(2).filter(|w| w[1][0] > w[0][0]).count();
    anyhow::ensure!(
        scrapes.len() >= 4 && rising >= 3,
        "the counts should advance while traffic flows: {scrapes:?}"
    );

    let want: Vec<f64> = answered
        .iter()
        .map(|a| a.load(Ordering::SeqCst) as f64)
        .collect();
    let total: f64 = want.iter().sum();
    let m = settle_all(&agent, &before, total)?;
    for (k, family) in FAMILIES.iter().enumerate() {
        let got = m.sum(family) - before.sum(family);
        anyhow::ensure!(
            got == want[k],
            "{family}: the agent counted {got}, clients were answered {}",
            want[k]
        );
    }
    // TorchServe's own counts: the same traffic plus run.sh's /ping (before the agent started).
    let ts_m = ts.scrape()?;
    for (k, family) in FAMILIES.iter().enumerate() {
        let extra = if k == 0 { PINGS_BEFORE_AGENT } else { 0.0 };
        anyhow::ensure!(
            ts_m.sum(family) == want[k] + extra,
            "TorchServe's {family} is {}, want {}",
            ts_m.sum(family),
            want[k] + extra
        );
    }
    Ok(())
}

/// Waits until the agent's three status-class counters, less `before`, add up to `total`.
fn settle_all(agent: &Agent, before: &Metrics, total: f64) -> Result<Metrics> {
    let since = |m: &Metrics| {
        ["Requests2XX", "Requests4XX", "Requests5XX"]
            .iter()
            .map(|f| m.sum(f) - before.sum(f))
            .sum::<f64>()
    };
    agent.wait_until(SETTLE_TIMEOUT, &format!("{total} requests counted"), |m| {
        since(m) >= total
    })?;
    // Give an over-count time to show.
    std::thread::sleep(Duration::from_millis(300));
    agent.scrape()
}

fn settle(agent: &Agent, family: &str, want: f64) -> Result<Metrics> {
    match agent.wait_until(SETTLE_TIMEOUT, &format!("{family} >= {want}"), |m| {
        m.sum(family) >= want
    }) {
        Ok(m) => Ok(m),
        Err(e) => {
            eprintln!("{e:#}");
            agent.scrape()
        }
    }
}

/// Same series, same values.
fn compare_exact(
    report: &mut String,
    failures: &mut Vec<String>,
    what: &str,
    want: &BTreeMap<Series, f64>,
    got: &BTreeMap<Series, f64>,
) {
    let _ = writeln!(report, "{what}:");
    for series in want
        .keys()
        .chain(got.keys().filter(|s| !want.contains_key(s)))
    {
        let (w, g) = (want.get(series), got.get(series));
        let ok = w == g;
        let _ = writeln!(
            report,
            "  {} {series}: TorchServe-derived {} servescope {}",
            mark(ok),
            show(w),
            show(g)
        );
        if !ok {
            failures.push(format!(
                "{series}: servescope {}, expected {}",
                show(g),
                show(w)
            ));
        }
    }
    if want.is_empty() && got.is_empty() {
        let _ = writeln!(report, "  (no series in either)");
    }
}

/// A latency-sum family (ts_inference_latency_microseconds, ts_queue_latency_microseconds): the agent has
/// exactly TorchServe's series (none for `fail`, whose replies never update them), and the sum over all
/// series is within LATENCY_TOLERANCE of TorchServe's.
fn compare_latency(
    report: &mut String,
    failures: &mut Vec<String>,
    family: &str,
    ts: &Metrics,
    agent: &Metrics,
) {
    let (want, got) = (ts.family(family), agent.family(family));
    let _ = writeln!(report, "{family} (µs; ratio = servescope / TorchServe):");
    for series in want
        .keys()
        .chain(got.keys().filter(|s| !want.contains_key(s)))
    {
        let (w, g) = (want.get(series), got.get(series));
        let ratio = match (w, g) {
            (Some(w), Some(g)) if *w > 0.0 => format!("{:.3}", g / w),
            _ => "-".to_owned(),
        };
        let present = w.is_some() == g.is_some();
        let _ = writeln!(
            report,
            "  {} {series}: TorchServe {} servescope {} ratio {ratio}",
            mark(present),
            show(w),
            show(g)
        );
        if !present {
            failures.push(format!(
                "{series}: {}",
                if w.is_some() {
                    "missing from servescope"
                } else {
                    "servescope has it, TorchServe does not"
                }
            ));
        }
    }
    let (w, g) = (ts.sum(family), agent.sum(family));
    let within = w > 0.0 && (g - w).abs() <= LATENCY_TOLERANCE * w;
    let _ = writeln!(
        report,
        "  {} sum: TorchServe {w} servescope {g} ratio {:.3} (must be within {}%)",
        mark(within),
        if w > 0.0 { g / w } else { f64::NAN },
        LATENCY_TOLERANCE * 100.0
    );
    if !within {
        failures.push(format!(
            "{family} sum: servescope {g}, TorchServe {w} (not within {}%)",
            LATENCY_TOLERANCE * 100.0
        ));
    }
}

/// Per (model, version), the agent's queue-latency sum against TorchServe's. A 5% bound per series
/// does not hold where TorchServe's queue is sub-millisecond (echo: a few ms of Netty work per request
/// in the agent's wider interval reads as 7-17×), so the per-series check is the one that holds
/// everywhere: the agent's interval contains TorchServe's, so it never reads less, and reads at most
/// MAX_FRONTEND_OVERHEAD_US more per timed request (`timed`: latency updates per model and version).
fn compare_queue_per_series(
    report: &mut String,
    failures: &mut Vec<String>,
    ts: &Metrics,
    agent: &Metrics,
    timed: &BTreeMap<(String, String), f64>,
) {
    let family = "ts_queue_latency_microseconds";
    let _ = writeln!(
        report,
        "{family} per series (servescope - TorchServe, µs per timed request; must be in [0, {MAX_FRONTEND_OVERHEAD_US}]):"
    );
    for (series, w) in ts.family(family) {
        let key = (
            series.label("model_name").unwrap_or_default().to_owned(),
            series.label("model_version").unwrap_or_default().to_owned(),
        );
        let n = timed.get(&key).copied().unwrap_or(0.0);
        let g = agent.family(family).get(&series).copied();
        let per_request = g.map(|g| (g - w) / n);
        let ok =
            n > 0.0 && per_request.is_some_and(|d| (0.0..=MAX_FRONTEND_OVERHEAD_US).contains(&d));
        let _ = writeln!(
            report,
            "  {} {series}: {n} requests, {} µs more per request",
            mark(ok),
            per_request.map_or_else(|| "-".to_owned(), |d| format!("{d:.0}"))
        );
        if !ok {
            failures.push(format!(
                "{series}: servescope {}, TorchServe {w} for {n} timed requests (expected between TorchServe's and {MAX_FRONTEND_OVERHEAD_US} µs more per request)",
                show(g.as_ref())
            ));
        }
    }
}

fn mark(ok: bool) -> &'static str {
    if ok { "ok  " } else { "FAIL" }
}

fn show(v: Option<&f64>) -> String {
    v.map_or_else(|| "absent".to_owned(), |v| v.to_string())
}

fn uname_nodename() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}
