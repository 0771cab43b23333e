//! Inside a real TorchServe 0.12.0 without instrumentation: servescope maps every Python worker process
//! to its model and TorchServe's worker name, counts batch sizes, and serves HandlerTime,
//! PredictionTime, WorkerLoadTime and queue latency as TorchServe does, through worker scale up/down and a killed
//! worker.
//!
//! Needs root (BPF) and TorchServe's fixed ports; run under the shared lock, one test at a time. Logs
//! and scrapes are kept in `target/integration/<test>/`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::unix::fs::PermissionsExt,
    path::PathBuf,
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use servescope_integration::{
    Agent, Metrics, TorchServe, TorchServeHome, ensure_kernel_prereqs, http, log_dir, require_root,
    torchserve::{Batching, MANAGEMENT_TIMEOUT, burst, loopback},
};

const AGENT_LISTEN: u16 = 9082;
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Worker changes reach the agent at its next discovery scan (200 ms here) plus a ring-buffer drain.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
/// The batching model: the echo archive registered again under another name (so its load frame's
/// name differs from the archive manifest's "echo"), batches of up to 4 gathered for up to 1 s.
const BATCHED: &str = "batched";
const BATCH_SIZE: usize = 4;
/// The slow archive (200 ms per batch) registered with batching: requests queue behind busy workers
/// and behind max_batch_delay.
const SLOW_BATCHED: &str = "slowbatched";
/// The agent's queue clock starts before TorchServe's (the socket read that completed the request,
/// vs job creation after Netty decoded it) and stops after it (the frame's write, vs the batch leaving
/// the aggregator); on a loaded 2-core host the two thread hand-offs in between take a few ms.
const MAX_FRONTEND_OVERHEAD_US: f64 = 20_000.0;

fn prepare(test: &str) -> Result<(PathBuf, TorchServeHome)> {
    require_root()?;
    ensure_kernel_prereqs()?;
    Agent::binary()?;
    let logs = log_dir(test)?;
    let home = TorchServeHome::default();
    home.setup(&logs.join("torchserve-setup.log"))?;
    Ok((logs, home))
}

/// TorchServe's own list of a model's workers: worker name → PID.
fn ts_workers(ts: &TorchServe, model: &str) -> Result<BTreeMap<String, u32>> {
    let v = ts.manage("GET", &format!("/models/{model}"))?;
    let m = &v[0];
    let version = m["modelVersion"].as_str().context("no modelVersion")?;
    m["workers"]
        .as_array()
        .context("no workers")?
        .iter()
        .map(|w| {
            let id = w["id"].as_str().context("worker id")?;
            let pid = w["pid"].as_u64().context("worker pid")?;
            Ok((format!("W-{id}-{model}_{version}"), u32::try_from(pid)?))
        })
        .collect()
}

/// Worker names the agent serves per-worker series for, for one model.
fn agent_workers(m: &Metrics, model: &str) -> BTreeSet<String> {
    m.series("servescope_worker_resident_memory_bytes")
        .filter(|(s, _)| s.label("model_name") == Some(model))
        .filter_map(|(s, _)| s.label("worker_name").map(str::to_owned))
        .collect()
}

/// Waits until TorchServe lists exactly `n` live workers for `model` and the agent serves the same
/// worker names; returns TorchServe's list.
fn converge(
    ts: &TorchServe,
    agent: &Agent,
    model: &str,
    n: usize,
) -> Result<BTreeMap<String, u32>> {
    let deadline = std::time::Instant::now() + MANAGEMENT_TIMEOUT;
    loop {
        let want = ts_workers(ts, model)?;
        let live = want
            .values()
            .all(|pid| *pid > 0 && fs::metadata(format!("/proc/{pid}")).is_ok());
        if want.len() == n && live {
            let names: BTreeSet<String> = want.keys().cloned().collect();
            if agent
                .wait_until(SETTLE_TIMEOUT, "worker names", |m| {
                    agent_workers(m, model) == names
                })
                .is_ok()
            {
                return Ok(want);
            }
        }
        if std::time::Instant::now() >= deadline {
            bail!(
                "workers of {model} did not converge to {n}: TorchServe {:?}, agent {:?}",
                ts_workers(ts, model)?,
                agent_workers(&agent.scrape()?, model)
            );
        }
        thread::sleep(Duration::from_millis(300));
    }
}

/// Resident memory of `pid` now, bytes.
fn rss(pid: u32) -> Result<f64> {
    let statm = fs::read_to_string(format!("/proc/{pid}/statm"))?;
    let pages: f64 = statm.split_whitespace().nth(1).context("statm")?.parse()?;
    // SAFETY: sysconf has no preconditions.
    #[expect(clippy::cast_precision_loss, reason = "page size")]
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as f64;
    Ok(pages * page)
}

/// Each worker's series carries the memory of the PID TorchServe names for that worker (within 10%:
/// both are read at slightly different moments), so the PID → worker mapping is right. A worker that
/// just started still grows by megabytes between the agent's once-a-second sample and our read, so
/// the comparison is retried until a sample catches up (bounded by SETTLE_TIMEOUT).
fn check_pids(agent: &Agent, want: &BTreeMap<String, u32>) -> Result<()> {
    let deadline = std::time::Instant::now() + SETTLE_TIMEOUT;
    loop {
        let m = agent.scrape()?;
        let mut mismatch = None;
        for (name, pid) in want {
            let got = m
                .series("servescope_worker_resident_memory_bytes")
                .find(|(s, _)| s.label("worker_name") == Some(name.as_str()))
                .map(|(_, v)| v)
                .with_context(|| format!("no series for {name}"))?;
            let now = rss(*pid)?;
            if (got - now).abs() > now * 0.1 {
                mismatch = Some(format!(
                    "{name} (pid {pid}): agent says {got} bytes resident, /proc says {now}"
                ));
            }
        }
        match mismatch {
            None => return Ok(()),
            Some(m) if std::time::Instant::now() >= deadline => bail!(m),
            Some(_) => thread::sleep(Duration::from_millis(300)),
        }
    }
}

/// Sum of a family's samples for one model (every version).
fn model_sum(m: &Metrics, family: &str, model: &str) -> f64 {
    m.series(family)
        .filter(|(s, _)| s.label("model_name") == Some(model))
        .map(|(_, v)| v)
        .sum()
}

/// How close the agent's queue-latency sum must be to TorchServe's.
#[derive(Clone, Copy, Debug)]
enum Fit {
    /// Requests really queued: within 5%.
    Within5Percent,
    /// Batches formed at once (n requests): queue time is frontend overhead; the agent's sum lies in
    /// [TorchServe's, TorchServe's + n × MAX_FRONTEND_OVERHEAD_US].
    FrontendOverheadOnly(f64),
}

/// Compares `ts_queue_latency_microseconds` (and prints `ts_inference_latency_microseconds`) of
/// `model`, agent against TorchServe.
fn check_queue_latency(agent: &Metrics, ts: &Metrics, model: &str, fit: Fit) -> Result<()> {
    let family = "ts_queue_latency_microseconds";
    let (got, want) = (
        model_sum(agent, family, model),
        model_sum(ts, family, model),
    );
    let inference = "ts_inference_latency_microseconds";
    eprintln!(
        "{model}: queue latency agent {got:.0} µs, TorchServe {want:.0} µs (ratio {:.3}); inference latency agent {:.0} µs, TorchServe {:.0} µs",
        got / want,
        model_sum(agent, inference, model),
        model_sum(ts, inference, model),
    );
    ensure!(want > 0.0, "TorchServe has no queue latency for {model}");
    match fit {
        Fit::Within5Percent => ensure!(
            (got - want).abs() <= 0.05 * want,
            "{family} {model}: agent {got} µs, TorchServe {want} µs (not within 5%)"
        ),
        Fit::FrontendOverheadOnly(n) => ensure!(
            got >= want && got - want <= n * MAX_FRONTEND_OVERHEAD_US,
            "{family} {model}: agent {got} µs, TorchServe {want} µs for {n} requests"
        ),
    }
    Ok(())
}

/// On this kernel (6.18) the agent sees TorchServe through the socket tracepoints, and the workers'
/// `[METRICS]` lines through a uprobe on each worker's libc `write` (docs/decisions.md R39). Workers
/// started after load (scale-up, the restarted one) get theirs after the agent dropped the
/// capabilities only loading needed.
#[test]
fn workers_are_mapped_batched_and_timed_through_scaling_and_restart() -> Result<()> {
    workers_through_scaling_and_restart(
        "workers_are_mapped_batched_and_timed_through_scaling_and_restart",
        None,
        "sockets",
    )
}

/// Without CAP_SYS_ADMIN the kernel refuses uprobes, so `auto` takes the syscall tracepoints (which
/// kernels before 6.3 use too): there the workers' pipes are seen by the write syscall's programs.
#[test]
fn workers_are_mapped_batched_and_timed_with_the_syscall_hooks() -> Result<()> {
    workers_through_scaling_and_restart(
        "workers_are_mapped_batched_and_timed_with_the_syscall_hooks",
        Some(CAPS_WITHOUT_SYS_ADMIN),
        "syscalls",
    )
}

/// The deployments' capabilities (deploy/) less CAP_SYS_ADMIN, as setpriv names them.
const CAPS_WITHOUT_SYS_ADMIN: &str = "+bpf,+perfmon,+sys_ptrace,+dac_read_search,+dac_override";

/// Runs the agent (`auto` data hooks) as root, or with only `caps`.
fn workers_through_scaling_and_restart(name: &str, caps: Option<&str>, loaded: &str) -> Result<()> {
    let (logs, home) = prepare(name)?;
    let ts = home.start(&logs)?;
    let args = ["--discovery-interval-ms", "200"];
    let agent = match caps {
        None => Agent::start(&logs, loopback(AGENT_LISTEN), &args)?,
        Some(caps) => {
            let wrapper = logs.join("capabilities.sh");
            fs::write(
                &wrapper,
                format!(
                    "#!/bin/sh\nexec setpriv --inh-caps=-all --bounding-set=-all,{caps} -- '{}' \"$@\"\n",
                    Agent::binary()?.display()
                ),
            )?;
            fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755))?;
            Agent::start_binary(&wrapper, &logs, loopback(AGENT_LISTEN), &args)?
        }
    };
    agent.wait_ready(READY_TIMEOUT)?;
    let want = format!("data_hooks=\"{loaded}\"");
    ensure!(
        agent.log_tail().contains(&want),
        "the agent should say it loaded the {loaded} data hooks ({want}):\n{}",
        agent.log_tail()
    );

    // 1. Workers loaded before the agent started: named from their archives' manifests.
    for model in ["echo", "slow", "fail"] {
        let want = converge(&ts, &agent, model, 1)?;
        check_pids(&agent, &want)?;
        eprintln!("{model}: {want:?}");
    }

    // 2. A batching model with two workers, registered while the agent runs: its load frames are seen.
    Batching {
        name: BATCHED,
        archive: "echo.mar",
        batch_size: BATCH_SIZE,
        max_batch_delay_ms: 1000,
        workers: 2,
    }
    .register(&ts)?;
    let workers = converge(&ts, &agent, BATCHED, 2)?;
    check_pids(&agent, &workers)?;

    // WorkerLoadTime: the agent times from the worker process's start to the frontend's read of its
    // load reply; TorchServe from its worker thread's creation, a few ms before the process starts.
    let m = agent.wait_until(
        SETTLE_TIMEOUT,
        "WorkerLoadTime of the batched workers",
        |m| {
            workers.keys().all(|w| {
                m.series("WorkerLoadTime")
                    .any(|(s, _)| s.label("WorkerName") == Some(w.as_str()))
            })
        },
    )?;
    let ts_m = ts.scrape()?;
    for w in workers.keys() {
        let pick = |m: &Metrics| {
            m.series("WorkerLoadTime")
                .find(|(s, _)| s.label("WorkerName") == Some(w.as_str()))
                .map(|(_, v)| v)
        };
        let (got, want) = (
            pick(&m).context("agent")?,
            pick(&ts_m).context("TorchServe")?,
        );
        eprintln!("WorkerLoadTime {w}: agent {got} ms, TorchServe {want} ms");
        ensure!(
            (got - want).abs() <= f64::max(50.0, want * 0.2),
            "WorkerLoadTime {w}: agent {got} ms, TorchServe {want} ms"
        );
    }

    // 3. Batches: 3 bursts of 8 concurrent requests; the worker-side reads give every batch's size.
    let bursts = 3;
    for _ in 0..bursts {
        burst(ts.inference_addr(), BATCHED, 2 * BATCH_SIZE)?;
    }
    // Large payloads: a batch whose first request is 2 MiB (the frontend writes it in several
    // syscalls, of which the kernel copies 512 bytes each) is still counted whole.
    let big = thread::spawn({
        let addr = ts.inference_addr();
        move || {
            http::post(
                addr,
                &format!("/predictions/{BATCHED}"),
                &vec![b'x'; 2 << 20],
                Duration::from_secs(60),
            )
        }
    });
    thread::sleep(Duration::from_millis(100));
    burst(ts.inference_addr(), BATCHED, BATCH_SIZE - 1)?;
    let r = big
        .join()
        .map_err(|_| anyhow::anyhow!("request thread panicked"))??;
    ensure!(
        r.status == 200 && r.body.len() == 2 << 20,
        "large request answered {}",
        r.status
    );
    let total = (bursts * 2 * BATCH_SIZE + BATCH_SIZE) as f64;
    let m = agent.wait_until(
        SETTLE_TIMEOUT,
        "batch sizes and responses of every request",
        |m| {
            m.series("servescope_batch_size_sum")
                .any(|(s, v)| s.label("model_name") == Some(BATCHED) && v >= total)
                && model_sum(m, "ts_inference_requests_total", BATCHED) >= total
        },
    )?;
    let sum_count = |m: &Metrics, name: &str| {
        m.series(name)
            .find(|(s, _)| s.label("model_name") == Some(BATCHED))
            .map_or(0.0, |(_, v)| v)
    };
    let (sum, count) = (
        sum_count(&m, "servescope_batch_size_sum"),
        sum_count(&m, "servescope_batch_size_count"),
    );
    // TorchServe's workers print one PredictionTime line per batch.
    let prediction_lines = ts.logged_metric_lines("PredictionTime", BATCHED)?;
    eprintln!(
        "batches: {count} holding {sum} requests; TorchServe logged {} PredictionTime lines",
        prediction_lines.len()
    );
    ensure!(
        sum == total,
        "batch sizes sum to {sum}, {total} requests were sent"
    );
    ensure!(
        count < total,
        "no request was batched ({count} batches for {total} requests)"
    );
    ensure!(
        count == prediction_lines.len() as f64,
        "{count} batches counted, TorchServe's workers logged {} PredictionTime lines",
        prediction_lines.len()
    );
    let le = |bound: &str| {
        m.series("servescope_batch_size_bucket")
            .find(|(s, _)| s.label("model_name") == Some(BATCHED) && s.label("le") == Some(bound))
            .map_or(0.0, |(_, v)| v)
    };
    ensure!(le("4") == count, "no batch exceeds batch_size {BATCH_SIZE}");

    // Queue latency of batches that formed at once: TorchServe's queue time here is mostly its own
    // frontend's work, which the agent's clock also counts (it starts at the socket read that completed
    // the request, before the job exists, and stops at the frame's write, after the job left the
    // queue); so per model the agent's sum is never below TorchServe's and exceeds it by at most a few
    // ms per request.
    let ts_m = ts.scrape()?;
    check_queue_latency(&m, &ts_m, BATCHED, Fit::FrontendOverheadOnly(total))?;

    // 3b. Queue latency where requests really queue: a batching model whose handler sleeps 200 ms per
    // batch, two workers, 24 requests at once (three rounds of two batches of 4), then 3 requests that
    // wait out max_batch_delay for a batch that never fills. Agent and TorchServe agree within 5%.
    Batching {
        name: SLOW_BATCHED,
        archive: "slow.mar",
        batch_size: BATCH_SIZE,
        max_batch_delay_ms: 100,
        workers: 2,
    }
    .register(&ts)?;
    converge(&ts, &agent, SLOW_BATCHED, 2)?;
    burst(ts.inference_addr(), SLOW_BATCHED, 6 * BATCH_SIZE)?;
    burst(ts.inference_addr(), SLOW_BATCHED, BATCH_SIZE - 1)?;
    let queued = (7 * BATCH_SIZE - 1) as f64;
    let m = agent.wait_until(SETTLE_TIMEOUT, "the queued requests", |m| {
        model_sum(m, "ts_inference_requests_total", SLOW_BATCHED) >= queued
    })?;
    let ts_m = ts.scrape()?;
    ensure!(
        model_sum(&ts_m, "ts_inference_requests_total", SLOW_BATCHED) == queued,
        "TorchServe counted {} requests of {SLOW_BATCHED}, {queued} were sent",
        model_sum(&ts_m, "ts_inference_requests_total", SLOW_BATCHED)
    );
    check_queue_latency(&m, &ts_m, SLOW_BATCHED, Fit::Within5Percent)?;
    // The same as distributions: one queue observation per request, summing to the counter; one
    // backend observation per batch (one PredictionTime line each), each at least the handler's
    // 200 ms sleep.
    let queue_count = model_sum(&m, "servescope_queue_duration_seconds_count", SLOW_BATCHED);
    let queue_sum = model_sum(&m, "servescope_queue_duration_seconds_sum", SLOW_BATCHED);
    let queue_us = model_sum(&m, "ts_queue_latency_microseconds", SLOW_BATCHED);
    ensure!(
        queue_count == queued && (queue_sum * 1e6 - queue_us).abs() <= 1.0,
        "queue histogram: {queue_count} observations summing to {queue_sum} s; {queued} requests, counter {queue_us} µs"
    );
    let batches = ts
        .logged_metric_lines("PredictionTime", SLOW_BATCHED)?
        .len() as f64;
    let held_count = model_sum(
        &m,
        "servescope_worker_backend_duration_seconds_count",
        SLOW_BATCHED,
    );
    let held_sum = model_sum(
        &m,
        "servescope_worker_backend_duration_seconds_sum",
        SLOW_BATCHED,
    );
    let under_200ms = m
        .series("servescope_worker_backend_duration_seconds_bucket")
        .find(|(s, _)| s.label("model_name") == Some(SLOW_BATCHED) && s.label("le") == Some("0.1"))
        .map_or(f64::NAN, |(_, v)| v);
    eprintln!(
        "{SLOW_BATCHED}: {held_count} batches held {held_sum} s; TorchServe logged {batches} PredictionTime lines"
    );
    ensure!(
        held_count == batches && held_sum >= 0.2 * held_count && under_200ms == 0.0,
        "backend histogram: {held_count} batches, {held_sum} s, {under_200ms} under 100 ms; TorchServe logged {batches} batches"
    );

    // 4. HandlerTime / PredictionTime: the agent's gauges hold the last line the workers printed, as
    // TorchServe's do; both equal the last logged line's value.
    let ts_m = ts.scrape()?;
    fs::write(logs.join("torchserve_metrics.txt"), ts.scrape_text("")?)?;
    fs::write(logs.join("servescope_metrics.txt"), agent.scrape_text("")?)?;
    for family in ["HandlerTime", "PredictionTime"] {
        let want = ts_m.family(family);
        let got = m.family(family);
        ensure!(!want.is_empty(), "TorchServe has no {family} samples");
        ensure!(got == want, "{family}: agent {got:?}, TorchServe {want:?}");
        let last = ts
            .logged_metric_lines(family, BATCHED)?
            .last()
            .map(|(_, v)| *v)
            .context("no logged line")?;
        let agent_batched = got
            .iter()
            .find(|(s, _)| s.label("ModelName") == Some(BATCHED))
            .map(|(_, v)| *v);
        ensure!(
            agent_batched == Some(last),
            "{family}: agent {agent_batched:?}, last logged line {last}"
        );
    }
    // A worker that prints no HandlerTime gets no sample: `fail` raises before recording one.
    http::post(
        ts.inference_addr(),
        "/predictions/fail",
        b"x",
        Duration::from_secs(10),
    )?;
    let m = agent.wait_until(SETTLE_TIMEOUT, "fail counted", |m| {
        m.series("ts_inference_requests_total")
            .any(|(s, _)| s.label("model_name") == Some("fail"))
    })?;
    ensure!(
        !m.series("HandlerTime")
            .any(|(s, _)| s.label("ModelName") == Some("fail")),
        "HandlerTime for a handler that never printed one"
    );

    // 5. Scale up, then down: the mapping follows.
    ts.manage(
        "PUT",
        &format!("/models/{BATCHED}?min_worker=3&max_worker=3&synchronous=true"),
    )?;
    let up = converge(&ts, &agent, BATCHED, 3)?;
    check_pids(&agent, &up)?;
    ts.manage(
        "PUT",
        &format!("/models/{BATCHED}?min_worker=1&max_worker=1&synchronous=true"),
    )?;
    let down = converge(&ts, &agent, BATCHED, 1)?;
    check_pids(&agent, &down)?;

    // 6. Kill the remaining worker: TorchServe's worker thread starts a new process on the same port
    // (so the same worker name); the agent follows the new PID.
    let (dead_name, dead_pid) = down
        .iter()
        .next()
        .map(|(n, p)| (n.clone(), *p))
        .context("one worker")?;
    // SAFETY: kill(2) on a PID TorchServe just reported as its worker.
    ensure!(
        unsafe { libc::kill(i32::try_from(dead_pid)?, libc::SIGKILL) } == 0,
        "kill {dead_pid}"
    );
    let deadline = std::time::Instant::now() + MANAGEMENT_TIMEOUT;
    let restarted = loop {
        ensure!(
            std::time::Instant::now() < deadline,
            "{dead_name} was not restarted"
        );
        let w = converge(&ts, &agent, BATCHED, 1)?;
        if w.values().all(|pid| *pid != dead_pid) {
            break w;
        }
        thread::sleep(Duration::from_millis(300));
    };
    check_pids(&agent, &restarted)?;
    // WorkerThreadTime of the last cycle (whole ms; the agent's runs from the frontend's read of the
    // reply to the write of the response's status line, TorchServe's from the frame write to the
    // hand-off to Netty minus the wait in between): the same within a few ms. TorchServe's own figure
    // spikes when its JVM stalls inside that span (the restarted worker's first cycle is the coldest),
    // which the agent cannot see from outside: up to CYCLES single-request cycles are compared, and one
    // must agree.
    const CYCLES: usize = 4;
    let mut seen = Vec::new();
    let mut last = None;
    for cycle in 1..=CYCLES {
        burst(ts.inference_addr(), BATCHED, 1)?;
        #[expect(clippy::cast_precision_loss, reason = "a handful of requests")]
        let want = total + cycle as f64;
        let m = agent.wait_until(SETTLE_TIMEOUT, "the restarted worker's batch", |m| {
            let answered: f64 = m
                .series("ts_inference_requests_total")
                .filter(|(s, _)| s.label("model_name") == Some(BATCHED))
                .map(|(_, v)| v)
                .sum();
            answered >= want
                && m.series("servescope_batch_size_sum")
                    .any(|(s, v)| s.label("model_name") == Some(BATCHED) && v >= want)
        })?;
        let ts_wtt = ts.scrape()?.sum("WorkerThreadTime");
        let wtt = m.sum("WorkerThreadTime");
        eprintln!("WorkerThreadTime, cycle {cycle}: agent {wtt} ms, TorchServe {ts_wtt} ms");
        seen.push((wtt, ts_wtt));
        let agreed = m.has("WorkerThreadTime") && (wtt - ts_wtt).abs() <= 5.0;
        last = Some(m);
        if agreed {
            break;
        }
    }
    let m = last.context("no cycle ran")?;
    ensure!(
        m.has("WorkerThreadTime") && seen.iter().any(|(a, t)| (a - t).abs() <= 5.0),
        "WorkerThreadTime (agent ms, TorchServe ms) disagree in every cycle: {seen:?}"
    );
    ensure!(
        m.sum("servescope_otf_corrupt_frames_total") == 0.0,
        "frames of a clean TorchServe counted as corrupt"
    );
    ensure!(
        m.sum("servescope_kernel_lost_events_total") == 0.0,
        "records lost"
    );
    eprintln!("restart: {dead_name} → {restarted:?}");
    let log = fs::read_to_string(agent.log_path())?;
    ensure!(
        !log.contains("cannot see this worker's stdout"),
        "a worker's stdout uprobe did not attach:\n{log}"
    );
    Ok(())
}
