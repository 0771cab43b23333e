//! `servescope`: parse the command line, bind the metrics port, load and attach the eBPF programs,
//! start the readers, serve until SIGINT/SIGTERM.

use std::{io::IsTerminal, process::ExitCode};

use anyhow::Context;
use clap::Parser;
use servescope::{
    config::{Cli, Command, Config},
    exposition::server,
    pipeline, privileges,
    probes::Probes,
    registry::Registry,
    sampler, sink,
    workers::WorkerMap,
};
use tokio::sync::{mpsc, watch};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if let Some(Command::Doctor { json }) = cli.command {
        return doctor(json);
    }
    let cfg = match cli.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("servescope: {e:#}");
            return ExitCode::from(2);
        }
    };
    // In order, while the agent is one thread: bind (a taken port is the most common start-up mistake),
    // load and attach, then drop the capabilities only loading needed — every thread created later
    // inherits the reduced set.
    let (listener, probes) = match start(&cfg) {
        Ok(started) => started,
        Err(e) => {
            // Logged once (stderr, with the rest of the log), not printed again.
            tracing::error!("{e:#}");
            return ExitCode::FAILURE;
        }
    };
    match privileges::drop_after_load() {
        Ok(left) => tracing::info!(kept = ?left, "dropped the capabilities only loading needed"),
        Err(e) => {
            tracing::warn!(error = %e, "could not drop capabilities; running with those granted")
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("servescope: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(run(cfg, listener, probes));
    // A sampler's statvfs of a hung network mount cannot be interrupted: do not wait for it on exit.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Logged once (stderr, with the rest of the log), not printed again.
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `servescope doctor`: the report on stdout, exit 1 when something must be fixed.
fn doctor(json: bool) -> ExitCode {
    let report = servescope::doctor::run(&servescope::doctor::Env::default(), || {
        Probes::load(8 * 1024 * 1024).map(drop)
    });
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("servescope doctor: cannot render JSON: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", report.to_text());
    }
    ExitCode::from(report.exit_code())
}

/// Binds the metrics port, then loads and attaches the programs.
fn start(cfg: &Config) -> anyhow::Result<(std::net::TcpListener, Probes)> {
    let listener = server::bind_std(cfg.listen)?;
    let probes = Probes::load(cfg.ringbuf_bytes)?;
    Ok((listener, probes))
}

async fn run(
    cfg: Config,
    listener: std::net::TcpListener,
    mut probes: Probes,
) -> anyhow::Result<()> {
    let listener =
        tokio::net::TcpListener::from_std(listener).context("registering the metrics listener")?;
    let ring = probes.take_ring().context("ring buffer already taken")?;
    let registry = Registry::new();
    tracing::info!(listen = %cfg.listen, "serving metrics at http://{}/metrics", cfg.listen);

    let (stop_tx, stop_rx) = watch::channel(false);
    let (upd_tx, upd_rx) = mpsc::unbounded_channel();
    // Discovery → samplers: the current targets (pid, hostname).
    let (targets_tx, targets_rx) = watch::channel(Vec::new());
    // Request-log files are opened here: a bad path stops the agent with a clear error.
    let (sinks, sink_workers) = sink::start(&cfg.sinks, &registry)?;
    // PID → TorchServe worker identity: kept by the reader, read by discovery's per-worker sampling.
    let worker_map = WorkerMap::default();
    let reader = tokio::spawn(pipeline::read_events(
        ring,
        registry.clone(),
        sinks,
        worker_map.clone(),
        upd_rx,
        stop_rx.clone(),
    ));
    let discovery = tokio::spawn(pipeline::discover(
        cfg.clone(),
        probes,
        registry.clone(),
        worker_map,
        upd_tx,
        targets_tx,
        stop_rx.clone(),
    ));
    // Samplers log and retry failed readings themselves and end on shutdown (awaited below). One that
    // ends early says so and leaves its families as they were; it does not stop the agent, whose main
    // job is the request metrics.
    let samplers = [
        tokio::spawn(log_failure(
            "system sampler",
            sampler::run_system(
                cfg.sample_interval,
                registry.clone(),
                targets_rx.clone(),
                stop_rx.clone(),
            ),
        )),
        tokio::spawn(log_failure(
            "GPU sampler",
            sampler::run_gpu(
                sampler::nvml::open_nvml,
                cfg.sample_interval,
                registry.clone(),
                targets_rx,
                stop_rx.clone(),
            ),
        )),
    ];
    let mut serve_stop = stop_rx.clone();
    let serve = tokio::spawn(server::serve(listener, registry, async move {
        let _ = serve_stop.changed().await;
    }));

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let outcome = tokio::select! {
        _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: stopping"); Ok(()) }
        _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); Ok(()) }
        r = reader => task_ended("event reader", r),
        r = discovery => task_ended("discovery", r),
        r = serve => task_ended("metrics server", r),
    };
    let _ = stop_tx.send(true);
    for task in samplers {
        if let Err(e) = task.await {
            tracing::error!("sampler crashed: {e}");
        }
    }
    // The stopping reader drops its ends of the sink queues; the sinks write what is queued, then exit.
    sink_workers.finish(std::time::Duration::from_secs(5)).await;
    outcome
}

/// Runs a task that is not vital and logs why it ended, when it failed.
async fn log_failure(name: &str, task: impl Future<Output = anyhow::Result<()>>) {
    if let Err(e) = task.await {
        tracing::error!("{name} stopped; its metric families are no longer updated: {e:#}");
    }
}

/// A task that should run forever ended: say which and why.
fn task_ended(
    name: &str,
    r: Result<anyhow::Result<()>, tokio::task::JoinError>,
) -> anyhow::Result<()> {
    match r {
        Ok(Ok(())) => anyhow::bail!("{name} stopped unexpectedly"),
        Ok(Err(e)) => Err(e.context(format!("{name} failed"))),
        Err(e) => anyhow::bail!("{name} crashed: {e}"),
    }
}
