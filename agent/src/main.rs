//! `servescope`: parse the command line, bind the metrics port, load and attach the eBPF programs,
//! start the readers, serve until SIGINT/SIGTERM.

use std::{io::IsTerminal, process::ExitCode};

use anyhow::Context;
use clap::Parser;
use servescope::{
    config::{Cli, Config},
    exposition::server,
    pipeline,
    probes::Probes,
    registry::Registry,
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
    let cfg = match cli.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("servescope: {e:#}");
            return ExitCode::from(2);
        }
    };
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
    match rt.block_on(run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("servescope: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    // Bind first: a taken port is the most common start-up mistake and needs no privileges to report.
    let listener = server::bind(cfg.listen).await?;
    let mut probes = Probes::load(cfg.ringbuf_bytes)?;
    let ring = probes.take_ring().context("ring buffer already taken")?;
    let registry = Registry::new();
    tracing::info!(listen = %cfg.listen, "serving metrics at http://{}/metrics", cfg.listen);

    let (stop_tx, stop_rx) = watch::channel(false);
    let (upd_tx, upd_rx) = mpsc::unbounded_channel();
    let reader = tokio::spawn(pipeline::read_events(
        ring,
        registry.clone(),
        upd_rx,
        stop_rx.clone(),
    ));
    let discovery = tokio::spawn(pipeline::discover(
        cfg.clone(),
        probes,
        registry.clone(),
        upd_tx,
        stop_rx.clone(),
    ));
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
    outcome
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
