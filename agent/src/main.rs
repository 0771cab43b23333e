//! `servescope`: parse the command line, bind the metrics port, load and attach the eBPF programs,
//! start the readers, serve until SIGINT/SIGTERM; SIGHUP rereads what can change without reattaching.

use std::{io::IsTerminal, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context;
use clap::Parser;
use servescope::{
    config::{Cli, Command, Config},
    exposition::{access::Access, server},
    pipeline, privileges,
    probes::{LoadOptions, Probes, read_entries_needed},
    reader_thread::{self, ReaderThread},
    registry::Registry,
    sampler,
    sink::{self, config::SinksConfig},
    workers::WorkerMap,
};
use tokio::sync::{mpsc, watch};
use tracing_subscriber::{EnvFilter, Registry as Subscriber, layer::SubscriberExt, reload};

/// How long the request-log sinks get to write what is queued, at shutdown or when replaced.
const SINK_FLUSH: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut log = LogFilter::init();
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
    log.apply(cfg.sinks.log_level.as_deref());
    // In order, while the agent is one thread: bind (a taken port is the most common start-up mistake),
    // load and attach, then drop the capabilities only loading needed — every thread created later
    // inherits the reduced set.
    let (listener, access, probes) = match start(&cfg) {
        Ok(started) => started,
        Err(e) => {
            // Logged once (stderr, with the rest of the log), not printed again.
            tracing::error!("{e:#}");
            return ExitCode::FAILURE;
        }
    };
    // Still one thread holding the load-time capabilities: the reader's priority can be raised now,
    // and its thread, started once they are dropped, inherits it (reader_thread.rs).
    let boost = reader_thread::Boost::raise(cfg.reader_nice);
    match privileges::drop_after_load() {
        Ok(left) => tracing::info!(kept = ?left, "dropped the capabilities only loading needed"),
        Err(e) => {
            tracing::warn!(error = %e, "could not drop capabilities; running with those granted")
        }
    }
    let reader_nice = boost.reader_nice();
    let reader_thread = match boost.spawn() {
        Ok(t) => t,
        Err(e) => {
            tracing::error!("{e:#}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(reader_nice, "event reader on its own thread");
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
    let result = rt.block_on(run(cfg, listener, access, probes, log, reader_thread));
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
    let report = servescope::doctor::run(
        &servescope::doctor::Env::default(),
        || {
            let mut cost = Probes::load(LoadOptions::default())?.load_cost().clone();
            // The default options attach the syscall hooks (every program a `--port` run may
            // use); the socket hooks that TorchServe runs get are loaded on their own after.
            if servescope::probes::socket_hooks_supported() {
                let sockets = Probes::load(LoadOptions {
                    data_hooks: servescope::probes::DataHooks::Sockets,
                    write_entries: false,
                    ..LoadOptions::default()
                })?;
                cost.merge(sockets.load_cost());
            }
            Ok(cost)
        },
        sampler::nvml::open_nvml,
    );
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

/// Reads the TLS and token files, binds the metrics port, then loads and attaches the programs.
fn start(cfg: &Config) -> anyhow::Result<(std::net::TcpListener, Access, Probes)> {
    let access = Access::load(&cfg.access).context("setting up the metrics endpoint")?;
    let listener = server::bind_std(cfg.listen)?;
    // Before loading: without CAP_SYS_ADMIN the agent stops here, having loaded nothing.
    let run_stats = cfg
        .bpf_stats
        .then(servescope::probes::enable_run_stats)
        .transpose()?;
    let mut probes = Probes::load(LoadOptions {
        ringbuf_bytes: cfg.ringbuf_bytes,
        thread_state: cfg.thread_state,
        // Also how TorchServe workers are noticed (a traced frontend's child exec'ing).
        watch_exec: true,
        watch_listen: !cfg.ports.is_empty(),
        // TorchServe alone needs read/write only (probes::Need::SocketCalls); any server given by
        // --pid or --port may use send/recv.
        socket_calls: !cfg.ports.is_empty() || !cfg.pids.is_empty(),
        read_entries: read_entries_needed(),
        // Only a server given by --port or --pid may block in write (thread per connection): for
        // TorchServe alone a response is stamped when its write returns (probes::Need::WriteEntry).
        write_entries: !cfg.ports.is_empty() || !cfg.pids.is_empty(),
        data_hooks: cfg.data_hooks,
        worker_uprobes: servescope::probes::may_attach_uprobes(),
        hooks_only: cfg.hooks_only,
    })?;
    if cfg.hooks_only {
        tracing::warn!(
            "--hooks-only: every program returns before it reads anything; nothing is traced and \
             no TorchServe metric will move"
        );
    }
    if let Some(fd) = run_stats {
        probes.keep_run_stats(fd);
        tracing::info!("BPF run-time statistics on (--bpf-stats): servescope_bpf_program_* count");
    }
    tracing::info!(
        thread_state = probes.thread_state().as_str(),
        data_hooks = probes.data_hooks().as_str(),
        "eBPF programs loaded and attached: {}",
        probes.load_cost().summary()
    );
    Ok((listener, access, probes))
}

/// The agent's log filter: `RUST_LOG` (default `info`), replaced by the config file's `log_level`
/// when it has one, at start and on SIGHUP.
struct LogFilter {
    handle: reload::Handle<EnvFilter, Subscriber>,
    /// `RUST_LOG` or `info`: what applies when the config file sets no level.
    default: String,
    current: String,
}

impl LogFilter {
    fn init() -> LogFilter {
        let default = std::env::var("RUST_LOG")
            .ok()
            .filter(|v| EnvFilter::try_new(v).is_ok())
            .unwrap_or_else(|| "info".to_owned());
        let (filter, handle) = reload::Layer::new(EnvFilter::new(&default));
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal());
        tracing::subscriber::set_global_default(Subscriber::default().with(filter).with(fmt))
            .unwrap_or_else(|e| eprintln!("servescope: cannot set up logging: {e}"));
        LogFilter {
            handle,
            current: default.clone(),
            default,
        }
    }

    /// Switches to `level` (validated when the config file was read), or back to the default.
    fn apply(&mut self, level: Option<&str>) {
        let want = level.unwrap_or(&self.default).to_owned();
        if want == self.current {
            return;
        }
        match EnvFilter::try_new(&want).map(|f| self.handle.reload(f)) {
            Ok(Ok(())) => {
                tracing::info!(filter = %want, "log filter changed");
                self.current = want;
            }
            Ok(Err(e)) => tracing::error!("cannot change the log filter to `{want}`: {e}"),
            Err(e) => tracing::error!("`{want}` is not a log filter: {e}"),
        }
    }
}

/// What SIGHUP rereads, and the handles to swap it in without stopping the reader or detaching.
struct Reload {
    cfg: Config,
    sinks: SinksConfig,
    workers: sink::Workers,
    replace_sinks: mpsc::UnboundedSender<sink::Sinks>,
    access: watch::Sender<Arc<Access>>,
    log: LogFilter,
    registry: Registry,
}

impl Reload {
    /// Rereads the config file (request-log sinks, log level) and the TLS and token files. Whatever
    /// cannot be used is logged and the running setting kept; the rest applies.
    fn on_hangup(&mut self) {
        tracing::info!("SIGHUP: rereading the configuration");
        match self.cfg.sink_args.resolve() {
            Err(e) => tracing::error!(
                "SIGHUP: keeping the previous request-log configuration and log level: {e:#}"
            ),
            Ok(new) => {
                self.log.apply(new.log_level.as_deref());
                self.replace_sinks(new);
            }
        }
        if self.cfg.access == Default::default() {
            return;
        }
        match Access::load(&self.cfg.access) {
            Ok(access) => {
                tracing::info!("SIGHUP: /metrics access reloaded ({})", access.describe());
                self.access.send_replace(Arc::new(access));
            }
            Err(e) => {
                tracing::error!("SIGHUP: keeping the previous /metrics TLS and token: {e:#}")
            }
        }
    }

    fn replace_sinks(&mut self, new: SinksConfig) {
        let same = |a: &SinksConfig, b: &SinksConfig| {
            (&a.request_log, &a.latency_csv, &a.syslog)
                == (&b.request_log, &b.latency_csv, &b.syslog)
        };
        if same(&new, &self.sinks) {
            // logrotate's rename-then-HUP.
            if new.request_log.is_some() || new.latency_csv.is_some() {
                tracing::info!(
                    "SIGHUP: request-log configuration unchanged; reopening the log files"
                );
                self.workers.reopen_files();
            }
            self.sinks = new;
            return;
        }
        match sink::start(&new, &self.registry) {
            Err(e) => {
                tracing::error!("SIGHUP: keeping the previous request-log configuration: {e:#}")
            }
            Ok((sinks, workers)) => {
                if self.replace_sinks.send(sinks).is_err() {
                    tracing::warn!("SIGHUP: the event reader has stopped; request logs unchanged");
                    return;
                }
                // The reader drops the old sinks; their threads write what is queued and exit.
                let old = std::mem::replace(&mut self.workers, workers);
                tokio::spawn(old.finish(SINK_FLUSH));
                tracing::info!(
                    request_log = new.request_log.is_some(),
                    latency_csv = new.latency_csv.is_some(),
                    syslog = new.syslog.is_some(),
                    "SIGHUP: request-log sinks restarted with the new configuration"
                );
                self.sinks = new;
            }
        }
    }
}

async fn run(
    cfg: Config,
    listener: std::net::TcpListener,
    access: Access,
    mut probes: Probes,
    log: LogFilter,
    reader_thread: ReaderThread,
) -> anyhow::Result<()> {
    let listener =
        tokio::net::TcpListener::from_std(listener).context("registering the metrics listener")?;
    let ring = probes.take_ring().context("ring buffer already taken")?;
    let registry = Registry::new();
    let scheme = if access.tls().is_some() {
        "https"
    } else {
        "http"
    };
    tracing::info!(
        listen = %cfg.listen,
        "serving metrics at {scheme}://{}/metrics ({})",
        cfg.listen,
        access.describe()
    );
    let (access_tx, access_rx) = watch::channel(Arc::new(access));

    let (stop_tx, stop_rx) = watch::channel(false);
    let (upd_tx, upd_rx) = mpsc::unbounded_channel();
    // Discovery → samplers: the current targets (pid, hostname).
    let (targets_tx, targets_rx) = watch::channel(Vec::new());
    // Request-log files are opened here: a bad path stops the agent with a clear error.
    let (sinks, sink_workers) = sink::start(&cfg.sinks, &registry)?;
    // Reader → discovery: the kernel's exec/exit/listen events.
    let (proc_tx, proc_rx) = pipeline::proc_events();
    let (replace_sinks, new_sinks) = mpsc::unbounded_channel();
    // PID → TorchServe worker identity: kept by the reader, read by discovery's per-worker sampling.
    let worker_map = WorkerMap::default();
    // /metrics → reader: drain before rendering.
    let (drain, drains) = pipeline::drain_requests();
    let reader = reader_thread.run(pipeline::read_events(
        ring,
        registry.clone(),
        sinks,
        pipeline::ReaderLinks {
            drains,
            updates: upd_rx,
            new_sinks,
            proc_events: proc_tx,
            worker_map: worker_map.clone(),
        },
        stop_rx.clone(),
    ))?;
    let discovery = tokio::spawn(pipeline::discover(
        cfg.clone(),
        probes,
        registry.clone(),
        pipeline::DiscoveryLinks {
            updates: upd_tx,
            sampled: targets_tx,
            events: proc_rx,
            worker_map: worker_map.clone(),
        },
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
                worker_map,
                targets_rx,
                stop_rx.clone(),
            ),
        )),
    ];
    let mut serve_stop = stop_rx.clone();
    let mut serve = tokio::spawn(server::serve(
        listener,
        registry.clone(),
        drain,
        access_rx,
        async move {
            let _ = serve_stop.changed().await;
        },
    ));

    use tokio::signal::unix::{SignalKind, signal};
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut reload = Reload {
        sinks: cfg.sinks.clone(),
        cfg,
        workers: sink_workers,
        replace_sinks,
        access: access_tx,
        log,
        registry,
    };
    let (mut reader, mut discovery) = (reader, discovery);
    let mut reader_ended = false;
    let outcome = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: stopping"); break Ok(()) }
            _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); break Ok(()) }
            Some(()) = sighup.recv() => reload.on_hangup(),
            r = &mut reader => {
                reader_ended = true;
                break task_ended("event reader", r);
            }
            r = &mut discovery => break task_ended("discovery", r),
            r = &mut serve => break task_ended("metrics server", r),
        }
    };
    let _ = stop_tx.send(true);
    // The reader, on its own thread, sees the stop at its next record or tick.
    if !reader_ended
        && tokio::time::timeout(Duration::from_secs(2), &mut reader)
            .await
            .is_err()
    {
        tracing::warn!("the event reader did not stop within 2 s");
    }
    for task in samplers {
        if let Err(e) = task.await {
            tracing::error!("sampler crashed: {e}");
        }
    }
    // The stopping reader drops its ends of the sink queues; the sinks write what is queued, then exit.
    reload.workers.finish(SINK_FLUSH).await;
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
    r: Result<anyhow::Result<()>, impl std::fmt::Display>,
) -> anyhow::Result<()> {
    match r {
        Ok(Ok(())) => anyhow::bail!("{name} stopped unexpectedly"),
        Ok(Err(e)) => Err(e.context(format!("{name} failed"))),
        Err(e) => anyhow::bail!("{name} crashed: {e}"),
    }
}
