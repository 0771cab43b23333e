//! Command line (with `SERVESCOPE_*` environment equivalents) → one typed [`Config`].

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;

use crate::{
    exposition::access::AccessConfig,
    probes::{DataHooks, ThreadState},
    sink::config::{SinkArgs, SinksConfig},
};

/// servescope — TorchServe's metrics, from the kernel.
///
/// Traces the socket syscalls of running TorchServe frontends with eBPF and serves TorchServe's own
/// metric families (Requests2XX/4XX/5XX, ts_inference_requests_total, ts_inference_latency_microseconds,
/// ...) in TorchServe's format, plus latency histograms and the agent's own health, on --listen.
/// No change to TorchServe, its config or its models.
///
/// By default every TorchServe frontend on the host (java ... org.pytorch.serve.ModelServer) is found
/// and traced, including ones started or restarted later. --pid and --port add any HTTP/1 server.
///
/// Needs root (or CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE) and a kernel with BTF (5.8+).
#[derive(Debug, Parser)]
#[command(name = "servescope", version, verbatim_doc_comment)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Address to serve /metrics on. TorchServe's own metrics API defaults to 127.0.0.1:8082: move it
    /// (metrics_address in config.properties) or pick another port here.
    #[arg(
        long,
        env = "SERVESCOPE_LISTEN",
        default_value = "127.0.0.1:8082",
        value_name = "ADDR:PORT"
    )]
    pub listen: SocketAddr,

    /// Serve /metrics over TLS with this PEM certificate (chain). Needs --tls-key. Reread on SIGHUP.
    #[arg(
        long,
        env = "SERVESCOPE_TLS_CERT",
        value_name = "PATH",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,

    /// The PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1). Reread on SIGHUP.
    #[arg(
        long,
        env = "SERVESCOPE_TLS_KEY",
        value_name = "PATH",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,

    /// Answer only requests with `Authorization: Bearer <token>`, the token being this file's content
    /// (one line); others get 401. For a --listen beyond loopback. Reread on SIGHUP.
    #[arg(long, env = "SERVESCOPE_AUTH_TOKEN_FILE", value_name = "PATH")]
    pub auth_token_file: Option<PathBuf>,

    /// Trace this process (any HTTP/1 server). Repeatable; comma-separated in the environment.
    #[arg(
        long = "pid",
        env = "SERVESCOPE_PID",
        value_name = "PID",
        value_delimiter = ','
    )]
    pub pids: Vec<u32>,

    /// Trace whatever process listens on this TCP port (any HTTP/1 server). Repeatable.
    #[arg(
        long = "port",
        env = "SERVESCOPE_PORT",
        value_name = "PORT",
        value_delimiter = ','
    )]
    pub ports: Vec<u16>,

    /// Do not look for TorchServe frontends; trace only --pid and --port targets.
    #[arg(long, env = "SERVESCOPE_NO_DISCOVERY")]
    pub no_discovery: bool,

    /// How often to rescan /proc in full for new, restarted and vanished targets, in milliseconds. New
    /// targets are found at once from the kernel's exec and listen events and exits within a second;
    /// the scan is the safety net (and runs at once if events were dropped).
    #[arg(
        long,
        env = "SERVESCOPE_DISCOVERY_INTERVAL_MS",
        default_value_t = 30_000,
        value_name = "MS"
    )]
    pub discovery_interval_ms: u64,

    /// Kernel ring-buffer size in bytes (a power of two, multiple of the page size). The agent drains it
    /// at least every 100 ms and is woken each time another eighth fills; 4 MiB holds well over a
    /// second of 20k req/s.
    #[arg(long, env = "SERVESCOPE_RINGBUF_BYTES", default_value_t = 4 * 1024 * 1024, value_name = "BYTES")]
    pub ringbuf_bytes: u32,

    /// Nice value of the thread that drains the ring buffer (-20 to 19; the rest of the agent keeps
    /// the priority it was started with). Below the traced server's threads, so that on a node whose
    /// CPUs are all busy the reader still drains the ring before it fills and the kernel drops records.
    /// Needs CAP_SYS_NICE at start (dropped after); without it the reader runs at the agent's own
    /// priority and a warning says so. 0 turns it off.
    #[arg(
        long,
        env = "SERVESCOPE_READER_NICE",
        default_value_t = -5,
        allow_negative_numbers = true,
        value_parser = clap::value_parser!(i32).range(-20..=19),
        value_name = "NICE"
    )]
    pub reader_nice: i32,

    /// Where the kernel programs keep a thread's state between syscall entry and exit: `task-storage`
    /// (fastest; needs task-local storage in tracepoint programs), `hash` (any 5.8+ kernel), or `auto`
    /// (task storage when the kernel accepts it).
    #[arg(long, env = "SERVESCOPE_THREAD_STATE", value_enum, default_value_t = ThreadState::Auto)]
    pub thread_state: ThreadState,

    /// Where the kernel sees the traced sockets' data: `sockets` (the sock_send_length and
    /// sock_recv_length tracepoints, Linux 6.3+: only socket traffic runs a program, and TorchServe
    /// workers' stdout is read by a uprobe on their libc's write), `syscalls` (tracepoints on
    /// read/write and the other data syscalls: every such call on the host runs a program; keeps a
    /// blocking write's start, time to first byte), or `auto` (sockets where the kernel has them,
    /// unless --port or --pid is given).
    #[arg(long, env = "SERVESCOPE_DATA_HOOKS", value_enum, default_value_t = DataHooks::Auto)]
    pub data_hooks: DataHooks,

    /// Turn on the kernel's BPF run-time statistics while the agent runs, so that
    /// servescope_bpf_program_runs_total and servescope_bpf_program_run_seconds_total count what the
    /// agent's programs cost. The kernel then reads the clock twice around every BPF program run
    /// on the host (~20–40 ns each), which is why it is off by default.
    #[arg(long, env = "SERVESCOPE_BPF_STATS")]
    pub bpf_stats: bool,

    /// Diagnostics: attach every program as usual, but have each return before it reads anything.
    /// Nothing is traced and no TorchServe metric moves; what a traced server still loses is the
    /// kernel's own cost of running a BPF program at these hooks, apart from servescope's work there
    /// (`cargo xtask bench` measures h1server with it; bench/MISSES.md).
    #[arg(long, env = "SERVESCOPE_HOOKS_ONLY")]
    pub hooks_only: bool,

    /// How often to sample the system (CPU, memory, disk) and GPU families, in seconds. CPUUtilization
    /// is the busy share over this interval. TorchServe's own collector runs every 60 s.
    #[arg(
        long,
        env = "SERVESCOPE_SAMPLE_INTERVAL_SECS",
        default_value_t = 10,
        value_name = "SECS"
    )]
    pub sample_interval_secs: u64,

    /// Request logs: JSON lines, syslog, latency CSV (sink/config.rs).
    #[command(flatten)]
    pub sinks: SinkArgs,
}

/// Subcommands besides running the agent.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Check that this machine can run servescope (kernel, BTF, tracefs, capabilities, lockdown), load
    /// and attach every program in a dry run, and list the TorchServe instances that would be traced.
    /// Exits 1 when something must be fixed.
    Doctor {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// What the agent runs with.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub pids: Vec<u32>,
    pub ports: Vec<u16>,
    pub discover_torchserve: bool,
    pub discovery_interval: Duration,
    pub ringbuf_bytes: u32,
    pub reader_nice: i32,
    pub thread_state: ThreadState,
    pub data_hooks: DataHooks,
    pub bpf_stats: bool,
    pub hooks_only: bool,
    pub sample_interval: Duration,
    pub sinks: SinksConfig,
    /// The request-log flags, kept to reread the config file on SIGHUP.
    pub sink_args: SinkArgs,
    /// TLS and token files of the metrics endpoint.
    pub access: AccessConfig,
}

impl Cli {
    /// Checks what clap cannot and builds the [`Config`].
    pub fn into_config(self) -> anyhow::Result<Config> {
        let page = 4096;
        anyhow::ensure!(
            self.ringbuf_bytes.is_power_of_two() && self.ringbuf_bytes >= page,
            "--ringbuf-bytes {} must be a power of two and at least {page}",
            self.ringbuf_bytes
        );
        anyhow::ensure!(
            self.discovery_interval_ms >= 50,
            "--discovery-interval-ms {} is too short (minimum 50)",
            self.discovery_interval_ms
        );
        anyhow::ensure!(
            (1..=3600).contains(&self.sample_interval_secs),
            "--sample-interval-secs {} is out of range (1 to 3600)",
            self.sample_interval_secs
        );
        anyhow::ensure!(
            !self.no_discovery || !self.pids.is_empty() || !self.ports.is_empty(),
            "--no-discovery leaves nothing to trace: add --pid or --port"
        );
        Ok(Config {
            listen: self.listen,
            pids: self.pids,
            ports: self.ports,
            discover_torchserve: !self.no_discovery,
            discovery_interval: Duration::from_millis(self.discovery_interval_ms),
            ringbuf_bytes: self.ringbuf_bytes,
            reader_nice: self.reader_nice,
            thread_state: self.thread_state,
            data_hooks: self.data_hooks,
            bpf_stats: self.bpf_stats,
            hooks_only: self.hooks_only,
            sample_interval: Duration::from_secs(self.sample_interval_secs),
            sinks: self.sinks.resolve()?,
            sink_args: self.sinks,
            access: AccessConfig {
                tls: self.tls_cert.zip(self.tls_key),
                token_file: self.auth_token_file,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> anyhow::Result<Config> {
        let cli = Cli::try_parse_from(std::iter::once("servescope").chain(args.iter().copied()))?;
        cli.into_config()
    }

    #[test]
    fn defaults() -> anyhow::Result<()> {
        let c = parse(&[])?;
        assert_eq!(c.listen.to_string(), "127.0.0.1:8082");
        assert!(c.discover_torchserve);
        assert!(c.pids.is_empty() && c.ports.is_empty());
        assert_eq!(c.sample_interval, Duration::from_secs(10));
        assert_eq!(c.access, AccessConfig::default());
        Ok(())
    }

    #[test]
    fn repeatable_targets() -> anyhow::Result<()> {
        let c = parse(&[
            "--pid",
            "1",
            "--pid",
            "2",
            "--port",
            "8080",
            "--listen",
            "0.0.0.0:9082",
        ])?;
        assert_eq!(c.pids, vec![1, 2]);
        assert_eq!(c.ports, vec![8080]);
        assert_eq!(c.listen.to_string(), "0.0.0.0:9082");
        Ok(())
    }

    #[test]
    fn exposure_flags() -> anyhow::Result<()> {
        let c = parse(&[
            "--tls-cert",
            "/etc/s/c.pem",
            "--tls-key",
            "/etc/s/k.pem",
            "--auth-token-file",
            "/etc/s/token",
        ])?;
        assert_eq!(
            c.access.tls,
            Some(("/etc/s/c.pem".into(), "/etc/s/k.pem".into()))
        );
        assert_eq!(c.access.token_file, Some("/etc/s/token".into()));
        Ok(())
    }

    #[test]
    fn sample_interval() -> anyhow::Result<()> {
        let c = parse(&["--sample-interval-secs", "60"])?;
        assert_eq!(c.sample_interval, Duration::from_secs(60));
        Ok(())
    }

    #[test]
    fn bad_values_are_clear_errors() {
        let err = |a: &[&str]| parse(a).map(|_| ()).expect_err("must fail").to_string();
        assert!(err(&["--no-discovery"]).contains("nothing to trace"));
        assert!(err(&["--ringbuf-bytes", "1000"]).contains("power of two"));
        assert!(err(&["--listen", "nonsense"]).contains("invalid"));
        assert!(err(&["--pid", "abc"]).contains("invalid"));
        assert!(err(&["--sample-interval-secs", "0"]).contains("out of range"));
        assert!(err(&["--tls-cert", "c.pem"]).contains("--tls-key"));
        assert!(err(&["--tls-key", "k.pem"]).contains("--tls-cert"));
        assert!(err(&["--reader-nice", "-21"]).contains("-21"));
        assert!(err(&["--reader-nice", "20"]).contains("20"));
    }

    #[test]
    fn reader_nice() -> anyhow::Result<()> {
        assert_eq!(parse(&[])?.reader_nice, -5);
        assert_eq!(parse(&["--reader-nice", "-10"])?.reader_nice, -10);
        assert_eq!(parse(&["--reader-nice", "0"])?.reader_nice, 0);
        Ok(())
    }
}
