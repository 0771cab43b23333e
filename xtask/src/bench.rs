//! `cargo xtask bench`: what the agent costs the server it watches, and whether it keeps up.
//!
//! One invocation runs everything side by side on this machine and writes bench/RESULTS.md and
//! bench/results.json: throughput with the agent off and on (alternating, repeated), added latency at a
//! fixed rate, agent CPU and BPF run time per request, event loss at sustained rates, memory by number of
//! models, /metrics render time, start-up time and connection churn. Every number comes from a release
//! build of the agent watching real servers over loopback; the method is written into RESULTS.md.

mod load;
mod report;
mod system;

use std::{
    env, fs,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use servescope_integration::{
    Agent, Metrics, TorchServe, TorchServeHome, ensure_kernel_prereqs,
    h1::H1Server,
    http, kernel, require_root, target_dir,
    torchserve::{INFERENCE_PORT, MANAGEMENT_PORT, METRICS_PORT, loopback},
    workspace_root,
};

use self::{
    load::{Paced, PacedResult, Wrk},
    report::{
        AgentCounts, Bystander, BystanderRun, Churn, HOOKS_ONLY_VARIANT, Idle, Latency, LatencyRun,
        ModelStage, Models, PhaseError, Render, Results, Settings, Spread, Startup, StartupRun,
        Sustained, SustainedRun, Throughput, ThroughputRun, smoke_ratio_floor,
    },
    system::{BpfStats, Machine},
};
use crate::tasks::{self, build, cargo, setup_torchserve};

/// The parts of the bench, selectable with `--only`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Phase {
    /// h1server: throughput agent on/off (wrk).
    Throughput,
    /// h1server: latency at a fixed rate, agent on/off.
    Latency,
    /// h1server: CPU, BPF run time and loss at 5k/10k/20k req/s.
    Sustained,
    /// h1server: agent start-up time.
    Startup,
    /// h1server: RSS at 1/100/1,000 models, /metrics render time.
    Models,
    /// h1server: connection churn.
    Churn,
    /// The syscall cost to a process the agent does not trace, agent off/on (full mode only).
    Bystander,
    /// TorchServe: throughput, CPU/BPF/loss at half its maximum, latency, start-up (discovery).
    Torchserve,
}

/// What `cargo xtask bench` was asked for (its command line).
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Short runs (under 2 minutes once built), the CI smoke test.
    #[arg(long)]
    pub quick: bool,
    /// Seconds per throughput/latency run (default 10, 3 with --quick).
    #[arg(long, value_name = "SECS")]
    pub run_secs: Option<u64>,
    /// Agent-off/agent-on pairs per measurement (default 5, 3 with --quick).
    #[arg(long, value_name = "N")]
    pub reps: Option<u32>,
    /// Run only these parts (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<Phase>,
    /// Do not pin server and load generator to CPUs.
    #[arg(long)]
    pub no_pin: bool,
    /// Benchmark this agent binary instead of building target/release/servescope.
    #[arg(long, value_name = "PATH")]
    pub agent_bin: Option<PathBuf>,
    /// Extra argument for every agent started (repeatable), e.g. --agent-arg=--ringbuf-bytes=2097152.
    #[arg(long = "agent-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub agent_args: Vec<String>,
    /// Add a perf profile (perf record -a -g) of an extra paced run per server to the results.
    #[arg(long)]
    pub profile: bool,
    /// Directory for RESULTS.md and results.json (default: bench/).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// Model name of the throughput, latency and sustained runs.
const MODEL: &str = "bench";
/// wrk connections against h1server: enough to keep one server core busy from one wrk thread.
const H1_CONNECTIONS: u32 = 16;
/// wrk connections against TorchServe: its one echo worker answers one request at a time; a few
/// connections keep the frontend's queue non-empty without turning the run into a queueing test.
const TS_CONNECTIONS: u32 = 8;
/// Paced-client connections for the latency runs and the sustained-rate runs.
const LATENCY_CONNECTIONS: usize = 4;
const SUSTAINED_CONNECTIONS: usize = 8;
const CHURN_THREADS: usize = 4;
/// Sustained rates of the loss and CPU runs (the 5k, 10k, 20k req/s).
const RATES: [f64; 3] = [5_000.0, 10_000.0, 20_000.0];
/// Model counts of the RSS stages.
const MODEL_COUNTS: [usize; 3] = [1, 100, 1_000];
/// How long the agent may take to show ready (targets traced).
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Durations and counts of one invocation.
struct Plan {
    quick: bool,
    run: Duration,
    /// Each paced latency run: shorter than `run` in quick mode, where latency is reported, not gated.
    latency_run: Duration,
    reps: u32,
    sustained_run: Duration,
    churn_connections: u64,
    startup_reps: u32,
    requests_per_model: u64,
    render_scrapes: usize,
    /// CPU lists for taskset: (server, load generator).
    pin: Option<(String, String)>,
}

impl Plan {
    fn new(o: &Options) -> Plan {
        let cpus = thread::available_parallelism().map_or(1, usize::from);
        Plan {
            quick: o.quick,
            run: Duration::from_secs(o.run_secs.unwrap_or(if o.quick { 3 } else { 10 })),
            // 2 s at h1server's 10k req/s is 20k latencies, 200 above the p99: enough for a report,
            // and it keeps the quick mode under its 2 minutes.
            latency_run: Duration::from_secs(o.run_secs.unwrap_or(if o.quick { 2 } else { 10 })),
            // Three pairs even in quick mode: the median of two is a mean, and one disturbed run (other
            // work on a shared CI machine) would decide it.
            reps: o.reps.unwrap_or(if o.quick { 3 } else { 5 }),
            sustained_run: Duration::from_secs(if o.quick { 2 } else { 10 }),
            churn_connections: if o.quick { 10_000 } else { 100_000 },
            startup_reps: if o.quick { 1 } else { 5 },
            requests_per_model: if o.quick { 5 } else { 20 },
            render_scrapes: if o.quick { 5 } else { 20 },
            pin: (!o.no_pin && cpus >= 2).then(|| ("0".to_owned(), "1".to_owned())),
        }
    }

    fn load_cpus(&self) -> Option<Vec<usize>> {
        self.pin
            .as_ref()
            .map(|(_, l)| l.split(',').filter_map(|c| c.parse().ok()).collect())
    }

    fn pinning(&self) -> String {
        match &self.pin {
            Some((s, l)) => format!("server on CPU {s}, load generator on CPU {l}, agent unpinned"),
            None => "none".into(),
        }
    }
}

pub fn run(opts: Options) -> Result<()> {
    // From the process's start: `cargo xtask` compiled xtask in this same process before main (cargo
    // runs it by exec), ~20 s from a clean checkout.
    let now = Instant::now();
    let started = system::seconds_since_process_started()
        .and_then(|s| now.checked_sub(Duration::from_secs_f64(s)))
        .unwrap_or(now);
    crate::demo::stop_everything_on_signal()?;
    require_root().context("the bench loads eBPF programs and enables bpf_stats")?;
    ensure_kernel_prereqs()?;
    for (tool, args) in [("wrk", &["--version"][..]), ("bpftool", &["version"][..])] {
        // wrk --version exits 1 after printing its version: only "cannot run" matters here.
        Command::new(tool)
            .args(args)
            .output()
            .with_context(|| format!("`{tool}` is needed: apt-get install {tool}"))?;
    }
    let others = system::other_agents()?;
    if !others.is_empty() {
        bail!(
            "servescope's BPF programs are already loaded, held by {}: its tracepoints would tax the \
             agent-off runs too and hide the overhead. Stop it first",
            others.join(", ")
        );
    }
    let plan = Plan::new(&opts);
    let cold_build = opts.agent_bin.is_none() && !target_dir().join("release/servescope").exists();
    let agent_bin = match &opts.agent_bin {
        Some(b) => b
            .canonicalize()
            .with_context(|| format!("--agent-bin {}", b.display()))?,
        None => build(true)?,
    };
    tasks::run(cargo().args([
        "build",
        "--release",
        "--package",
        "servescope-integration",
        "--bin",
        "h1server",
    ]))
    .context("building h1server")?;
    let h1_bin = target_dir().join("release/h1server");
    let build_s = started.elapsed().as_secs_f64();
    let scratch = target_dir().join("bench");
    if scratch.exists() {
        fs::remove_dir_all(&scratch).with_context(|| format!("clearing {}", scratch.display()))?;
    }
    fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;

    let machine = Machine::collect();
    let mut bench = Bench {
        plan,
        agent_bin,
        scratch,
        profile: opts.profile,
        results: Results {
            command: command_line(),
            machine,
            settings: Settings {
                quick: opts.quick,
                partial: !opts.only.is_empty(),
                run_s: 0,
                latency_run_s: 0,
                reps: 0,
                sustained_run_s: 0,
                rates: RATES.to_vec(),
                churn_connections: 0,
                pinning: String::new(),
                agent_bin: String::new(),
                agent_args: opts.agent_args.clone(),
            },
            throughput: Vec::new(),
            latency: Vec::new(),
            sustained: Vec::new(),
            idle: Vec::new(),
            models: None,
            startup: Vec::new(),
            churn: None,
            bystander: Vec::new(),
            targets: Vec::new(),
            errors: Vec::new(),
            phase_seconds: Vec::new(),
            build_s,
            cold_build,
            wall_time_s: 0.0,
        },
    };
    let s = &mut bench.results.settings;
    s.run_s = bench.plan.run.as_secs();
    s.latency_run_s = bench.plan.latency_run.as_secs();
    s.reps = bench.plan.reps;
    s.sustained_run_s = bench.plan.sustained_run.as_secs();
    s.churn_connections = bench.plan.churn_connections;
    s.pinning = bench.plan.pinning();
    s.agent_bin = bench.agent_bin.display().to_string();

    // Quick mode (CI's smoke test, under 2 minutes) leaves out what no smoke check reads.
    let want = |p: Phase| {
        if opts.only.is_empty() {
            !(opts.quick && p == Phase::Bystander)
        } else {
            opts.only.contains(&p)
        }
    };
    let h1_phases = [
        Phase::Throughput,
        Phase::Latency,
        Phase::Sustained,
        Phase::Startup,
        Phase::Models,
        Phase::Churn,
        Phase::Bystander,
    ];
    if h1_phases.iter().any(|&p| want(p)) {
        let server = bench.start_h1server(&h1_bin)?;
        for phase in h1_phases.into_iter().filter(|&p| want(p)) {
            eprintln!("\n== h1server: {phase:?} ==");
            let t0 = Instant::now();
            let result = match phase {
                Phase::Throughput => bench.h1_throughput(&server),
                Phase::Latency => bench.h1_latency(&server),
                Phase::Sustained => bench.h1_sustained(&server),
                Phase::Startup => bench.h1_startup(&server),
                Phase::Models => bench.models(&server),
                Phase::Churn => bench.churn(&server),
                Phase::Bystander => bench.bystander(&server),
                Phase::Torchserve => Ok(()),
            };
            bench.record_error(&format!("h1server {phase:?}"), result);
            bench
                .results
                .phase_seconds
                .push((format!("h1server {phase:?}"), t0.elapsed().as_secs_f64()));
        }
        drop(server);
    }
    if want(Phase::Torchserve) {
        eprintln!("\n== TorchServe ==");
        let t0 = Instant::now();
        let result = bench.torchserve();
        bench.record_error("TorchServe", result);
        bench
            .results
            .phase_seconds
            .push(("TorchServe".into(), t0.elapsed().as_secs_f64()));
    }

    let r = &mut bench.results;
    r.machine.finish();
    r.wall_time_s = started.elapsed().as_secs_f64();
    r.evaluate();
    let out = opts.out.unwrap_or_else(|| workspace_root().join("bench"));
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let md = out.join("RESULTS.md");
    let json = out.join("results.json");
    let misses_path = workspace_root().join("bench/MISSES.md");
    let misses = match fs::read_to_string(&misses_path) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", misses_path.display())),
    };
    fs::write(&md, r.markdown(misses.as_deref()))
        .with_context(|| format!("writing {}", md.display()))?;
    fs::write(
        &json,
        serde_json::to_string_pretty(&r).context("serialising the results")?,
    )
    .with_context(|| format!("writing {}", json.display()))?;

    println!("\n{}", r.targets_text());
    for (phase, secs) in &r.phase_seconds {
        println!("  {phase:<22} {secs:>6.1} s");
    }
    println!(
        "wrote {} and {} in {:.0} s ({:.0} s of it building)",
        md.display(),
        json.display(),
        r.wall_time_s,
        r.build_s
    );
    let failures = r.smoke_failures();
    if !failures.is_empty() {
        let steal = r.machine.steal_percent.map_or_else(String::new, |p| {
            format!(
                "\n  ({p:.1} % of the machine's CPU time was stolen by the hypervisor meanwhile)"
            )
        });
        bail!("smoke check failed:\n  {}{steal}", failures.join("\n  "));
    }
    Ok(())
}

/// `cargo xtask bench ...` as the user typed it (cargo passes our arguments after its own).
fn command_line() -> String {
    let args: Vec<String> = env::args().skip(1).collect();
    format!("cargo xtask {}", args.join(" "))
}

struct Bench {
    plan: Plan,
    agent_bin: PathBuf,
    scratch: PathBuf,
    profile: bool,
    results: Results,
}

/// An agent started for the bench, made ready, with its PID at hand.
struct RunningAgent {
    agent: Agent,
    pid: u32,
}

impl RunningAgent {
    fn counts(&self, model: &str) -> Result<AgentCounts> {
        Ok(counts(&self.agent.scrape()?, model))
    }

    /// Waits until the agent has counted `want` requests of `model` (it counts asynchronously from its
    /// ring buffer), or until the count stops moving; returns the counters either way, since a shortfall
    /// is a measurement, not an error.
    fn settle(&self, model: &str, want: f64) -> Result<AgentCounts> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = (f64::NAN, Instant::now());
        loop {
            self.agent.check_running()?;
            let c = self.counts(model)?;
            if c.counted >= want || Instant::now() >= deadline {
                return Ok(c);
            }
            if c.counted != last.0 {
                last = (c.counted, Instant::now());
            } else if last.1.elapsed() > Duration::from_secs(2) {
                return Ok(c);
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(self) {
        match self.agent.stop() {
            Ok(status) if status.success() => {}
            Ok(status) => eprintln!("note: the agent exited with {status} when stopped"),
            Err(e) => eprintln!("note: stopping the agent: {e:#}"),
        }
    }
}

/// The agent's counters relevant to the bench; `model` may end in `*` to sum models by prefix.
fn counts(m: &Metrics, model: &str) -> AgentCounts {
    let matches = |name: Option<&str>| match (name, model.strip_suffix('*')) {
        (Some(n), Some(prefix)) => n.starts_with(prefix),
        (Some(n), None) => n == model,
        (None, _) => false,
    };
    AgentCounts {
        counted: m
            .series("ts_inference_requests_total")
            .filter(|(s, _)| matches(s.label("model_name")))
            .map(|(_, v)| v)
            .sum(),
        kernel_lost: m.sum("servescope_kernel_lost_events_total"),
        kernel_lost_by_reason: m
            .series("servescope_kernel_lost_events_total")
            .map(|(s, v)| (s.label("reason").unwrap_or("?").to_owned(), v))
            .collect(),
        parse_errors: m.sum("servescope_http_parse_errors_total"),
        unmatched: m.sum("servescope_unmatched_responses_total"),
        decode_errors: m.sum("servescope_decode_errors_total"),
    }
}

/// The server a phase measures.
struct Target<'a> {
    name: &'static str,
    addr: SocketAddr,
    path: &'a str,
    model: &'a str,
    /// Agent arguments that make it trace this server.
    agent_args: Vec<String>,
    connections: u32,
    /// Pin the server's load generator (TorchServe is not pinned, see the method notes).
    pinned: bool,
    /// Unrecorded load before the first throughput run.
    warmup: Duration,
}

impl Target<'_> {
    /// The agent runs with `--hooks-only`: it counts nothing, so its runs wait for no count.
    fn hooks_only(&self) -> bool {
        self.agent_args.iter().any(|a| a == "--hooks-only")
    }
}

impl Bench {
    fn record_error(&mut self, phase: &str, result: Result<()>) {
        if let Err(e) = result {
            eprintln!("phase {phase} failed: {e:#}");
            self.results.errors.push(PhaseError {
                phase: phase.to_owned(),
                error: format!("{e:#}"),
            });
        }
    }

    fn load_cpus(&self, pinned: bool) -> Option<Vec<usize>> {
        if pinned { self.plan.load_cpus() } else { None }
    }

    fn wrk_cpus(&self, pinned: bool) -> Option<&str> {
        self.plan
            .pin
            .as_ref()
            .filter(|_| pinned)
            .map(|(_, l)| l.as_str())
    }

    fn start_h1server(&self, bin: &Path) -> Result<H1Server> {
        let mut cmd = match &self.plan.pin {
            Some((cpus, _)) => {
                let mut c = Command::new("taskset");
                c.args(["-c", cpus]).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.args(["--port", "0"]);
        let server = H1Server::start_command(
            &self.scratch,
            "h1server",
            cmd,
            IpAddr::V4(Ipv4Addr::LOCALHOST),
        )?;
        eprintln!(
            "h1server pid {} on {} ({})",
            server.pid(),
            server.addr(),
            self.plan.pinning()
        );
        Ok(server)
    }

    fn h1_target(server: &H1Server) -> Target<'static> {
        Target {
            name: "h1server",
            addr: server.addr(),
            path: "/predictions/bench",
            model: MODEL,
            agent_args: vec![
                "--no-discovery".into(),
                "--port".into(),
                server.port().to_string(),
            ],
            connections: H1_CONNECTIONS,
            pinned: true,
            warmup: Duration::from_secs(2),
        }
    }

    /// Starts a fresh agent with `args` on a free port and waits until it traces its target.
    fn start_agent(&self, args: &[String], dir: &str) -> Result<RunningAgent> {
        let dir = self.scratch.join(dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let args: Vec<&str> = args
            .iter()
            .chain(&self.results.settings.agent_args)
            .map(String::as_str)
            .collect();
        let mut agent =
            Agent::start_binary(&self.agent_bin, &dir, loopback(system::free_port()?), &args)?;
        agent.echo_log_on_drop(false);
        agent.wait_ready(READY_TIMEOUT)?;
        let pid = agent.pid();
        Ok(RunningAgent { agent, pid })
    }

    // ---- 1. throughput ---------------------------------------------------------------------------

    fn h1_throughput(&mut self, server: &H1Server) -> Result<()> {
        let t = Self::h1_target(server);
        let r = self.throughput(&t, self.plan.reps)?;
        self.results.throughput.push(r);
        // Full mode also measures the same hooks with every program returning at once
        // (`--hooks-only`): the part of the ratio's shortfall that is the kernel's cost of running a
        // program at each hook, which no work saved inside the programs or the agent can win back.
        // Three pairs: no target reads it, and a clean checkout's full run (its ~3-minute build
        // included) stays inside its 15 minutes. (The socket hooks, R39, read the same as the
        // syscall hooks here: `--only throughput --agent-arg=--data-hooks=sockets`.)
        if !self.plan.quick {
            let t = Self::h1_hooks_only_target(server);
            let r = self.throughput(&t, self.plan.reps.min(3))?;
            self.results.throughput.push(r);
        }
        Ok(())
    }

    /// [`Self::h1_target`] with `--hooks-only`.
    fn h1_hooks_only_target(server: &H1Server) -> Target<'static> {
        let mut t = Self::h1_target(server);
        t.name = HOOKS_ONLY_VARIANT;
        t.agent_args.push("--hooks-only".into());
        t
    }

    /// [`Self::h1_target`] with `--data-hooks sockets`.
    fn h1_sockets_target(server: &H1Server) -> Target<'static> {
        let mut t = Self::h1_target(server);
        t.name = "h1server, --data-hooks sockets";
        t.agent_args
            .extend(["--data-hooks".into(), "sockets".into()]);
        t
    }

    /// Alternating agent-off / agent-on wrk runs against `t`.
    ///
    /// In quick mode (the CI smoke test) a median ratio below the server's smoke floor is measured
    /// again before it fails the run: as many pairs more, and the median over all of them. A
    /// regression persists over the second set; one disturbed minute on a shared VM (other guests'
    /// steal) does not, and would otherwise refuse a landing.
    fn throughput(&self, t: &Target<'_>, reps: u32) -> Result<Throughput> {
        let wrk = |d: Duration| self.wrk(t, d);
        // Warm-up: server threads, JIT (TorchServe), page cache; not recorded.
        wrk(t.warmup).run(&self.scratch)?;
        let mut runs = Vec::new();
        self.throughput_pairs(t, 0..reps, &mut runs)?;
        let mut th = Self::throughput_summary(t, runs);
        let floor = smoke_ratio_floor(t.name);
        if self.plan.quick && th.ratio.median < floor {
            eprintln!(
                "  {} ratio {:.3} is below the smoke floor {floor}: {reps} more pairs, to tell a \
                 regression (it persists) from a disturbed run",
                t.name, th.ratio.median
            );
            let first = th.ratio.median;
            let mut runs = th.runs;
            self.throughput_pairs(t, reps..2 * reps, &mut runs)?;
            th = Self::throughput_summary(t, runs);
            th.first_ratio = Some(first);
        }
        Ok(th)
    }

    /// The agent-off / agent-on pairs of repetitions `reps`, appended to `runs`.
    fn throughput_pairs(
        &self,
        t: &Target<'_>,
        reps: std::ops::Range<u32>,
        runs: &mut Vec<ThroughputRun>,
    ) -> Result<()> {
        let wrk = |d: Duration| self.wrk(t, d);
        for rep in reps {
            let order = if rep % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for on in order {
                let run = if on {
                    let agent = self.start_agent(&t.agent_args, "throughput")?;
                    let before = agent.counts(t.model)?;
                    let cpu0 = system::cpu_sample(agent.pid)?;
                    let w = wrk(self.plan.run).run(&self.scratch)?;
                    let cpu = system::cpu_sample(agent.pid)?.since(&cpu0);
                    // A hooks-only agent counts nothing: no count to wait for or report.
                    let counts = if t.hooks_only() {
                        None
                    } else {
                        let after = agent.settle(t.model, before.counted + w.requests as f64)?;
                        Some(after.minus(&before))
                    };
                    let rss = system::rss_kib(agent.pid)?;
                    agent.stop();
                    ThroughputRun {
                        rep,
                        agent_on: true,
                        agent_cpu_pct: Some(cpu / w.duration_s * 100.0),
                        agent_rss_kib: Some(rss),
                        agent: counts,
                        wrk: w,
                    }
                } else {
                    ThroughputRun {
                        rep,
                        agent_on: false,
                        wrk: wrk(self.plan.run).run(&self.scratch)?,
                        agent_cpu_pct: None,
                        agent_rss_kib: None,
                        agent: None,
                    }
                };
                eprintln!(
                    "  {} rep {rep} agent {:<3} {:>8.0} req/s  p99 {:>6.0} µs{}",
                    t.name,
                    if on { "on" } else { "off" },
                    run.wrk.rps,
                    run.wrk.p99_us,
                    run.agent_cpu_pct
                        .map(|c| format!("  agent CPU {c:.1} %"))
                        .unwrap_or_default()
                );
                runs.push(run);
            }
        }
        Ok(())
    }

    fn throughput_summary(t: &Target<'_>, runs: Vec<ThroughputRun>) -> Throughput {
        let rps = |on: bool| -> Vec<f64> {
            runs.iter()
                .filter(|r| r.agent_on == on)
                .map(|r| r.wrk.rps)
                .collect()
        };
        let ratios: Vec<f64> = pairs(&runs, |r| r.rep, |r| r.agent_on)
            .map(|(off, on)| on.wrk.rps / off.wrk.rps)
            .collect();
        let cpu_per_1k: Vec<f64> = runs
            .iter()
            .filter_map(|r| Some(r.agent_cpu_pct? / (r.wrk.rps / 1000.0)))
            .collect();
        Throughput {
            server: t.name.into(),
            connections: t.connections,
            off_rps: Spread::of(&rps(false)),
            on_rps: Spread::of(&rps(true)),
            ratio: Spread::of(&ratios),
            agent_cpu_pct_per_1k: Spread::of(&cpu_per_1k),
            first_ratio: None,
            runs,
        }
    }

    /// wrk against `t` for `duration`, pinned as the plan says.
    fn wrk<'a>(&'a self, t: &'a Target<'_>, duration: Duration) -> Wrk<'a> {
        Wrk {
            addr: t.addr,
            path: t.path,
            connections: t.connections,
            duration,
            cpus: self.wrk_cpus(t.pinned),
        }
    }

    /// The agent-off maximum of `server` from the throughput phase, or a short calibration run.
    fn max_rps(&self, t: &Target<'_>, agent_on: bool) -> Result<f64> {
        if let Some(th) = self.results.throughput.iter().find(|x| x.server == t.name) {
            return Ok(if agent_on {
                th.on_rps.median
            } else {
                th.off_rps.median
            });
        }
        let w = self.wrk(t, Duration::from_secs(3)).run(&self.scratch)?;
        eprintln!("  calibration: {:.0} req/s (agent off)", w.rps);
        Ok(w.rps)
    }

    // ---- 2. latency ------------------------------------------------------------------------------

    fn h1_latency(&mut self, server: &H1Server) -> Result<()> {
        let t = Self::h1_target(server);
        // Quick mode reports latency without gating on it: two pairs keep it under its 2 minutes.
        let reps = if self.plan.quick {
            self.plan.reps.min(2)
        } else {
            self.plan.reps
        };
        let r = self.latency(&t, reps)?;
        self.results.latency.push(r);
        Ok(())
    }

    fn latency(&self, t: &Target<'_>, reps: u32) -> Result<Latency> {
        let max = self.max_rps(t, false)?;
        // Half the maximum: well below saturation, yet busy enough that the agent's CPU use would
        // show up as queueing. Capped so the client's own pacing stays precise.
        let rate = ((max * 0.5).min(10_000.0) / 100.0).floor().max(1.0) * 100.0;
        eprintln!("  fixed rate {rate:.0} req/s ({LATENCY_CONNECTIONS} connections)");
        let paced = |d: Duration| Paced {
            addr: t.addr,
            paths: Arc::new(vec![t.path.to_owned()]),
            rate: Some(rate),
            duration: d,
            max_requests: None,
            connections: LATENCY_CONNECTIONS,
            churn: false,
            cpus: self.load_cpus(t.pinned),
        };
        paced(Duration::from_secs(1)).run()?; // warm-up
        let mut runs = Vec::new();
        for rep in 0..reps {
            let order = if rep % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for on in order {
                let run = if on {
                    let agent = self.start_agent(&t.agent_args, "latency")?;
                    let before = agent.counts(t.model)?;
                    let load = paced(self.plan.latency_run).run()?;
                    let after = agent.settle(t.model, before.counted + load.ok as f64)?;
                    agent.stop();
                    LatencyRun {
                        rep,
                        agent_on: true,
                        load,
                        agent: Some(after.minus(&before)),
                    }
                } else {
                    LatencyRun {
                        rep,
                        agent_on: false,
                        load: paced(self.plan.latency_run).run()?,
                        agent: None,
                    }
                };
                eprintln!(
                    "  {} rep {rep} agent {:<3} {:>7.0} req/s  p50 {:>5.0} µs  p99 {:>6.0} µs  late {}",
                    t.name,
                    if on { "on" } else { "off" },
                    run.load.achieved_rps,
                    run.load.p50_us,
                    run.load.p99_us,
                    run.load.late
                );
                runs.push(run);
            }
        }
        let of = |on: bool, f: fn(&PacedResult) -> f64| -> Spread {
            let v: Vec<f64> = runs
                .iter()
                .filter(|r| r.agent_on == on)
                .map(|r| f(&r.load))
                .collect();
            Spread::of(&v)
        };
        let added = |f: fn(&PacedResult) -> f64| -> Spread {
            let v: Vec<f64> = pairs(&runs, |r| r.rep, |r| r.agent_on)
                .map(|(off, on)| (f(&on.load) / f(&off.load) - 1.0) * 100.0)
                .collect();
            Spread::of(&v)
        };
        Ok(Latency {
            server: t.name.into(),
            rate,
            connections: LATENCY_CONNECTIONS,
            p50_off_us: of(false, |l| l.p50_us),
            p50_on_us: of(true, |l| l.p50_us),
            p99_off_us: of(false, |l| l.p99_us),
            p99_on_us: of(true, |l| l.p99_us),
            added_p50_pct: added(|l| l.p50_us),
            added_p99_pct: added(|l| l.p99_us),
            runs,
        })
    }

    // ---- 3 + 4. CPU, BPF run time and loss at sustained rates ------------------------------------

    fn h1_sustained(&mut self, server: &H1Server) -> Result<()> {
        let t = Self::h1_target(server);
        let s = self.sustained(&t, "--port", &RATES)?;
        self.results.sustained.push(s);
        Ok(())
    }

    /// One agent watching `t`, with bpf_stats on: first its fixed cost with no traffic, then a paced
    /// run at each of `rates` with CPU, BPF run time and loss accounting.
    fn sustained(&mut self, t: &Target<'_>, how: &str, rates: &[f64]) -> Result<Sustained> {
        let agent = self.start_agent(&t.agent_args, "sustained")?;
        // Only now: the kernel's per-program timing costs a little on every traced syscall, and the
        // throughput and latency runs must not pay it.
        let stats = BpfStats::enable()?;
        // The fixed cost first: no traffic to the target.
        let idle = self.plan.sustained_run;
        let (cpu0, progs0) = (
            system::cpu_sample(agent.pid)?,
            system::prog_stats(agent.pid)?,
        );
        thread::sleep(idle);
        let idle_cpu = system::cpu_sample(agent.pid)?.since(&cpu0);
        let idle_bpf_ns: u64 = system::prog_delta(&progs0, &system::prog_stats(agent.pid)?)
            .iter()
            .map(|p| p.run_time_ns)
            .sum();
        let idle = Idle {
            server: t.name.into(),
            how: how.into(),
            seconds: idle.as_secs_f64(),
            agent_cpu_pct: idle_cpu / idle.as_secs_f64() * 100.0,
            bpf_ms_per_s: Some(idle_bpf_ns as f64 / 1e6 / idle.as_secs_f64()),
        };
        eprintln!(
            "  idle: agent {:.2} % of a core, BPF {:.2} ms/s on other processes",
            idle.agent_cpu_pct,
            idle.bpf_ms_per_s.unwrap_or(0.0)
        );
        self.results.idle.push(idle);
        let mut runs = Vec::new();
        for &rate in rates {
            let before = agent.counts(t.model)?;
            let progs0 = system::prog_stats(agent.pid)?;
            let cpu0 = system::cpu_sample(agent.pid)?;
            let t0 = Instant::now();
            let load = self.paced_at(t, rate).run()?;
            let after = agent.settle(t.model, before.counted + load.ok as f64)?;
            let window = t0.elapsed().as_secs_f64();
            let cpu = system::cpu_sample(agent.pid)?.since(&cpu0);
            let programs = system::prog_delta(&progs0, &system::prog_stats(agent.pid)?);
            let delta = after.minus(&before);
            let served = (load.ok as f64).max(1.0);
            let bpf_ns: u64 = programs.iter().map(|p| p.run_time_ns).sum();
            let bpf_runs: u64 = programs.iter().map(|p| p.run_cnt).sum();
            // CPU seconds per request × 1000 req/s = share of one core at 1k req/s (× 100 for %).
            let agent_pct_per_1k = cpu / served * 1000.0 * 100.0;
            let bpf_pct_per_1k = bpf_ns as f64 / 1e9 / served * 1000.0 * 100.0;
            let run = SustainedRun {
                target_rps: rate,
                missing: (load.ok as f64 - delta.counted).max(0.0),
                window_s: window,
                agent_cpu_s: cpu,
                agent_pct_per_1k,
                bpf_ns_per_request: bpf_ns as f64 / served,
                bpf_runs_per_request: bpf_runs as f64 / served,
                bpf_pct_per_1k,
                total_pct_per_1k: agent_pct_per_1k + bpf_pct_per_1k,
                programs,
                agent_rss_kib: system::rss_kib(agent.pid)?,
                agent: delta,
                load,
            };
            eprintln!(
                "  {} {rate:>6.0} req/s: achieved {:.0}, 2xx {}, counted {:.0}, kernel lost {:.0}, parse errors {:.0}, unmatched {:.0}; agent {:.3} %/1k + BPF {:.3} %/1k ({:.0} ns/request)",
                t.name,
                run.load.achieved_rps,
                run.load.ok,
                run.agent.counted,
                run.agent.kernel_lost,
                run.agent.parse_errors,
                run.agent.unmatched,
                run.agent_pct_per_1k,
                run.bpf_pct_per_1k,
                run.bpf_ns_per_request
            );
            runs.push(run);
        }
        let profile = if self.profile {
            let rate = rates
                .iter()
                .copied()
                .find(|&r| r >= 10_000.0)
                .unwrap_or(rates[0]);
            Some(self.profile_run(t, rate, agent.pid)?)
        } else {
            None
        };
        drop(stats);
        agent.stop();
        Ok(Sustained {
            server: t.name.into(),
            connections: SUSTAINED_CONNECTIONS,
            machine_max_rps: self
                .results
                .throughput
                .iter()
                .find(|x| x.server == t.name)
                .map(|x| x.on_rps.median),
            runs,
            profile,
        })
    }

    fn paced_at(&self, t: &Target<'_>, rate: f64) -> Paced {
        Paced {
            addr: t.addr,
            paths: Arc::new(vec![t.path.to_owned()]),
            rate: Some(rate),
            duration: self.plan.sustained_run,
            max_requests: None,
            connections: SUSTAINED_CONNECTIONS,
            churn: false,
            cpus: self.load_cpus(t.pinned),
        }
    }

    /// An extra, unrecorded run at `rate` under `perf record -a -g`; returns the top of `perf report`
    /// (where the whole machine spent its time, BPF programs included as `bpf_prog_*` symbols).
    fn profile_run(&self, t: &Target<'_>, rate: f64, agent_pid: u32) -> Result<String> {
        let data = self.scratch.join("perf.data");
        let secs = self.plan.sustained_run.as_secs().to_string();
        let mut perf = Command::new("perf")
            .args(["record", "-a", "-g", "-F", "999", "-o"])
            .arg(&data)
            .args(["--", "sleep", &secs])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("running perf (Debian: apt-get install linux-perf)")?;
        let load = self.paced_at(t, rate).run();
        let status = perf.wait().context("waiting for perf record")?;
        load?;
        if !status.success() {
            bail!("perf record failed ({status})");
        }
        let report = |extra: &[&str]| -> Result<String> {
            let out = Command::new("perf")
                .args(["report", "--stdio", "--no-children", "-g", "none", "-i"])
                .arg(&data)
                .args(extra)
                .output()
                .context("running perf report")?;
            // perf pads every column to the widest symbol and appends empty IPC columns ("-  -"):
            // keep the words only.
            Ok(String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                .take(25)
                .map(|l| {
                    let words: Vec<&str> = l.split_whitespace().collect();
                    let end = words.iter().rposition(|w| *w != "-").map_or(0, |i| i + 1);
                    words[..end].join("  ")
                })
                .collect::<Vec<_>>()
                .join("\n"))
        };
        let machine = report(&["--sort", "comm,dso,symbol", "--percent-limit", "0.7"])?;
        let agent = report(&[
            "--pid",
            &agent_pid.to_string(),
            "--percentage",
            "relative",
            "--sort",
            "symbol",
            "--percent-limit",
            "0.3",
        ])?;
        Ok(format!(
            "# whole machine, by command / object / symbol (% of all samples)\n{machine}\n\n\
             # agent process only (% of the agent's samples)\n{agent}"
        ))
    }

    // ---- 5. models: RSS and render time ----------------------------------------------------------

    fn models(&mut self, server: &H1Server) -> Result<()> {
        let t = Self::h1_target(server);
        let agent = self.start_agent(&t.agent_args, "models")?;
        let baseline = system::rss_kib(agent.pid)?;
        let mut stages = Vec::new();
        let mut sent = 0u64;
        for n in MODEL_COUNTS {
            let paths: Vec<String> = (0..n).map(|i| format!("/predictions/model-{i}")).collect();
            let requests = (n as u64 * self.plan.requests_per_model).max(1_000);
            let load = Paced {
                addr: t.addr,
                paths: Arc::new(paths),
                rate: Some(5_000.0),
                duration: Duration::from_secs(60),
                max_requests: Some(requests),
                connections: SUSTAINED_CONNECTIONS,
                churn: false,
                cpus: self.load_cpus(true),
            }
            .run()?;
            sent += load.ok;
            let c = agent.settle("model-*", sent as f64)?;
            let stage = ModelStage {
                models: n,
                requests_sent: sent,
                counted: c.counted,
                rss_kib: system::rss_kib(agent.pid)?,
                bpf_map_rss_kib: system::bpf_map_rss_kib(agent.pid)?,
                peak_rss_kib: system::peak_rss_kib(agent.pid)?,
            };
            eprintln!(
                "  {n:>5} models: {} requests, counted {:.0}, RSS {:.1} MB (peak {:.1})",
                stage.requests_sent,
                stage.counted,
                stage.rss_kib as f64 * 1024.0 / 1e6,
                stage.peak_rss_kib as f64 * 1024.0 / 1e6
            );
            stages.push(stage);
        }
        // Render time at the last stage (1,000 models): full scrapes timed from the client, and the
        // agent's own render time of each (served by the scrape after it).
        let (mut ms, mut server_ms) = (Vec::new(), Vec::new());
        let (mut bytes, mut samples) = (0, 0);
        for i in 0..=self.plan.render_scrapes {
            let t0 = Instant::now();
            let text = timed_scrape(agent.agent.listen())?;
            let elapsed = t0.elapsed().as_secs_f64() * 1000.0;
            let previous = text
                .lines()
                .find_map(|l| l.strip_prefix("servescope_metrics_render_seconds "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .context("servescope_metrics_render_seconds missing from /metrics")?;
            // The first scrape shows the settle loop's last render; the last one is only timed.
            if i > 0 {
                server_ms.push(previous * 1000.0);
            }
            if i < self.plan.render_scrapes {
                ms.push(elapsed);
            }
            bytes = text.len();
            samples = text
                .lines()
                .filter(|l| !l.starts_with('#') && !l.is_empty())
                .count();
            thread::sleep(Duration::from_millis(50));
        }
        let render = Render {
            models: MODEL_COUNTS[MODEL_COUNTS.len() - 1],
            ms: Spread::of(&ms),
            server_ms: Spread::of(&server_ms),
            bytes,
            samples,
        };
        eprintln!(
            "  /metrics at {} models: {bytes} bytes, {samples} samples, rendered in {:.2} ms (max {:.2}), whole scrape median {:.2} ms (max {:.2})",
            render.models,
            render.server_ms.median,
            render.server_ms.max,
            render.ms.median,
            render.ms.max
        );
        let rss_after_scrapes_kib = system::rss_kib(agent.pid)?;
        agent.stop();
        self.results.models = Some(Models {
            baseline_rss_kib: baseline,
            stages,
            render,
            rss_after_scrapes_kib,
        });
        Ok(())
    }

    // ---- 6. start-up -----------------------------------------------------------------------------

    fn h1_startup(&mut self, server: &H1Server) -> Result<()> {
        let t = Self::h1_target(server);
        let r = self.startup(&t, "--port", self.plan.startup_reps)?;
        self.results.startup.push(r);
        Ok(())
    }

    /// Spawns the agent and, from that instant, sends one request every 10 ms (each on its own
    /// connection, so it is never a connection that predates the agent) while polling /metrics, until
    /// one of them is counted.
    fn startup(&self, t: &Target<'_>, how: &str, reps: u32) -> Result<Startup> {
        let mut runs = Vec::new();
        let dir = self.scratch.join("startup");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let args: Vec<&str> = t
            .agent_args
            .iter()
            .chain(&self.results.settings.agent_args)
            .map(String::as_str)
            .collect();
        for rep in 0..reps {
            let listen = loopback(system::free_port()?);
            let t0 = Instant::now();
            let mut agent = Agent::start_binary(&self.agent_bin, &dir, listen, &args)?;
            agent.echo_log_on_drop(false);
            let mut metrics_up = None;
            let first_counted = loop {
                if t0.elapsed() > Duration::from_secs(30) {
                    bail!(
                        "no request counted within 30 s of start; agent log:\n{}",
                        agent.log_tail()
                    );
                }
                agent.check_running()?;
                let _ = http::post(
                    t.addr,
                    t.path,
                    load::BODY.as_bytes(),
                    Duration::from_secs(1),
                );
                if let Ok(m) = agent.scrape() {
                    metrics_up.get_or_insert_with(|| t0.elapsed());
                    if counts(&m, t.model).counted >= 1.0 {
                        break t0.elapsed();
                    }
                }
                thread::sleep(Duration::from_millis(10));
            };
            let run = StartupRun {
                metrics_up_ms: metrics_up.unwrap_or(first_counted).as_secs_f64() * 1000.0,
                first_counted_ms: first_counted.as_secs_f64() * 1000.0,
            };
            eprintln!(
                "  {} ({how}) rep {rep}: /metrics up {:.0} ms, first request counted {:.0} ms",
                t.name, run.metrics_up_ms, run.first_counted_ms
            );
            runs.push(run);
            RunningAgent {
                pid: agent.pid(),
                agent,
            }
            .stop();
        }
        let of = |f: fn(&StartupRun) -> f64| Spread::of(&runs.iter().map(f).collect::<Vec<_>>());
        Ok(Startup {
            server: t.name.into(),
            how: how.into(),
            first_counted_ms: of(|r| r.first_counted_ms),
            metrics_up_ms: of(|r| r.metrics_up_ms),
            runs,
        })
    }

    // ---- 7. connection churn ---------------------------------------------------------------------

    fn churn(&mut self, server: &H1Server) -> Result<()> {
        let t = Self::h1_target(server);
        let agent = self.start_agent(&t.agent_args, "churn")?;
        let n = self.plan.churn_connections;
        let conns_before = kernel::conns_keys(agent.pid)?.len();
        let rss_before = system::rss_kib(agent.pid)?;
        let before = agent.counts("churn")?;
        let cpu0 = system::cpu_sample(agent.pid)?;
        let load = Paced {
            addr: t.addr,
            paths: Arc::new(vec!["/predictions/churn".to_owned()]),
            rate: None,
            duration: Duration::from_secs(300),
            max_requests: Some(n),
            connections: CHURN_THREADS,
            churn: true,
            cpus: self.load_cpus(true),
        }
        .run()?;
        let after = agent.settle("churn", before.counted + load.ok as f64)?;
        let cpu = system::cpu_sample(agent.pid)?.since(&cpu0);
        // The server closes each connection right after answering; give the last closes a moment.
        thread::sleep(Duration::from_millis(200));
        let delta = after.minus(&before);
        let churn = Churn {
            connections: n,
            missing: (load.ok as f64 - delta.counted).max(0.0),
            conns_map_before: conns_before,
            conns_map_after: kernel::conns_keys(agent.pid)?.len(),
            rss_before_kib: rss_before,
            rss_after_kib: system::rss_kib(agent.pid)?,
            peak_rss_kib: system::peak_rss_kib(agent.pid)?,
            agent_cpu_s: cpu,
            agent: delta,
            load,
        };
        eprintln!(
            "  {n} connections at {:.0}/s: failed {}, counted {:.0}, kernel lost {:.0}, conns map {} -> {}, RSS {:.1} -> {:.1} MB",
            churn.load.achieved_rps,
            churn.load.failed,
            churn.agent.counted,
            churn.agent.kernel_lost,
            churn.conns_map_before,
            churn.conns_map_after,
            churn.rss_before_kib as f64 * 1024.0 / 1e6,
            churn.rss_after_kib as f64 * 1024.0 / 1e6
        );
        agent.stop();
        self.results.churn = Some(churn);
        Ok(())
    }

    // ---- 8. bystanders ---------------------------------------------------------------------------

    /// Alternating agent-off / agent-on timings of syscalls made by this process, which the agent does
    /// not trace: what its tracepoints cost the rest of the node, with the agent watching h1server
    /// by `--port` (write entries attached) here, and TorchServe by discovery in [`Bench::torchserve`]
    /// (the DaemonSet's default: writes hooked at exit only, R35).
    fn bystander(&mut self, server: &H1Server) -> Result<()> {
        let t = Self::h1_target(server);
        let b = self.bystander_of(&t, "h1server (`--port`: write entries attached)")?;
        self.results.bystander.push(b);
        let t = Self::h1_sockets_target(server);
        let b = self.bystander_of(&t, "h1server (`--port --data-hooks sockets`)")?;
        self.results.bystander.push(b);
        Ok(())
    }

    fn bystander_of(&self, t: &Target<'_>, watching: &str) -> Result<Bystander> {
        const ITERATIONS: u32 = 200_000;
        let mut runs = Vec::new();
        for rep in 0..self.plan.reps {
            // Alternate which comes first, so a drift of the machine does not favour one side.
            let order = if rep % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for agent_on in order {
                let agent = if agent_on {
                    Some(self.start_agent(&t.agent_args, "bystander")?)
                } else {
                    None
                };
                let ns = system::bystander_syscall_ns(ITERATIONS)?;
                if let Some(a) = agent {
                    a.agent.check_running()?;
                    a.stop();
                }
                eprintln!(
                    "  agent {}: getppid {:.0} ns, write {:.0} ns, read {:.0} ns, socket write+read {:.0} ns",
                    if agent_on { "on " } else { "off" },
                    ns.getppid,
                    ns.write,
                    ns.read,
                    ns.socket
                );
                runs.push(BystanderRun {
                    agent_on,
                    getppid_ns: ns.getppid,
                    write_ns: ns.write,
                    read_ns: ns.read,
                    socket_ns: ns.socket,
                });
            }
        }
        let side = |on: bool, f: fn(&BystanderRun) -> f64| {
            Spread::of(
                &runs
                    .iter()
                    .filter(|r| r.agent_on == on)
                    .map(f)
                    .collect::<Vec<_>>(),
            )
        };
        Ok(Bystander {
            watching: watching.to_owned(),
            iterations: ITERATIONS,
            off_getppid_ns: side(false, |r| r.getppid_ns),
            on_getppid_ns: side(true, |r| r.getppid_ns),
            off_write_ns: side(false, |r| r.write_ns),
            on_write_ns: side(true, |r| r.write_ns),
            off_read_ns: side(false, |r| r.read_ns),
            on_read_ns: side(true, |r| r.read_ns),
            off_socket_ns: side(false, |r| r.socket_ns),
            on_socket_ns: side(true, |r| r.socket_ns),
            runs,
        })
    }

    // ---- TorchServe ------------------------------------------------------------------------------

    fn torchserve(&mut self) -> Result<()> {
        // A TS_HOME of the bench's own (same scripts, its own venv and PID file): the integration
        // tests' harness runs stop.sh on the shared target/torchserve before each start, which would
        // stop a TorchServe the bench is measuring if both run at once on a shared machine.
        let home = TorchServeHome {
            home: target_dir().join("torchserve-bench"),
            ..TorchServeHome::default()
        };
        setup_torchserve(&home)?;
        wait_for_free_ports(&[INFERENCE_PORT, MANAGEMENT_PORT, METRICS_PORT])?;
        let dir = self.scratch.join("torchserve");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let ts: TorchServe = home.start(&dir)?;
        eprintln!(
            "TorchServe pid {} ready in {:.1?}",
            ts.pid(),
            ts.startup_time()
        );
        let t = Target {
            name: "TorchServe",
            addr: ts.inference_addr(),
            path: "/predictions/echo",
            model: "echo",
            // The default: discovery finds the frontend (and its workers) like in production.
            agent_args: Vec::new(),
            connections: TS_CONNECTIONS,
            pinned: false,
            // The JVM is still compiling for its first ~10 s of load: its rate rose 802 -> 1168 ->
            // 1210 req/s over a quick run's three agent-off runs after a 2 s warm-up, which biased
            // each pair by the order of its two runs (pair ratios 0.84 and 1.12).
            warmup: Duration::from_secs(10),
        };
        let th = self.throughput(&t, self.plan.reps)?;
        let max = th.off_rps.median;
        self.results.throughput.push(th);
        // CPU, BPF run time and loss at half TorchServe's maximum (it tops out near 1k req/s here).
        let rate = ((max * 0.5) / 50.0).floor().max(1.0) * 50.0;
        let s = self.sustained(&t, "discovery", &[rate])?;
        self.results.sustained.push(s);
        // TorchServe's latency is milliseconds of queueing in its worker; fewer pairs suffice.
        let reps = if self.plan.quick { 1 } else { 3 };
        let l = self.latency(&t, reps)?;
        self.results.latency.push(l);
        let s = self.startup(&t, "discovery", if self.plan.quick { 1 } else { 3 })?;
        self.results.startup.push(s);
        // Full mode only, as the h1server one (quick mode stays under its 2 minutes).
        if !self.plan.quick {
            let b = self.bystander_of(&t, "TorchServe (discovery: socket hooks, R39)")?;
            self.results.bystander.push(b);
        }
        ts.stop();
        Ok(())
    }
}

/// Pairs each repetition's agent-off run with its agent-on run, in repetition order.
fn pairs<'a, T>(
    runs: &'a [T],
    rep: impl Fn(&T) -> u32 + 'a,
    on: impl Fn(&T) -> bool + 'a,
) -> impl Iterator<Item = (&'a T, &'a T)> + 'a {
    let mut reps: Vec<u32> = runs.iter().map(&rep).collect();
    reps.dedup();
    reps.into_iter().filter_map(move |r| {
        let off = runs.iter().find(|x| rep(x) == r && !on(x))?;
        let on_run = runs.iter().find(|x| rep(x) == r && on(x))?;
        Some((off, on_run))
    })
}

/// TorchServe's ports are fixed; the integration tests use them too. Wait (a bounded time) for a
/// concurrent test to finish rather than fail at once.
fn wait_for_free_ports(ports: &[u16]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let busy: Vec<u16> = ports
            .iter()
            .copied()
            .filter(|&p| {
                TcpStream::connect_timeout(&loopback(p), Duration::from_millis(200)).is_ok()
            })
            .collect();
        if busy.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "TorchServe's ports {busy:?} stayed taken for 3 minutes (another TorchServe running? see `ss -ltnp`)"
            );
        }
        eprintln!("  waiting for ports {busy:?} to be free (another TorchServe is running)");
        thread::sleep(Duration::from_secs(5));
    }
}

/// One `GET /metrics` on its own connection, read to its end: the scrape as a Prometheus client
/// makes it. Written with `read_to_end` (std, optimized even in xtask's debug build) because the
/// harness's framing reader runs at debug speed and added milliseconds to a 3 MB body.
fn timed_scrape(addr: SocketAddr) -> Result<String> {
    use std::io::{Read as _, Write as _};
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .context("connecting to /metrics")?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .context("setting a read timeout")?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .context("sending the scrape")?;
    let mut reply = Vec::with_capacity(4 << 20);
    stream.read_to_end(&mut reply).context("reading /metrics")?;
    let head_end = reply
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no response head")?;
    if !reply.starts_with(b"HTTP/1.1 200") {
        bail!(
            "/metrics answered {}",
            String::from_utf8_lossy(&reply[..head_end])
        );
    }
    String::from_utf8(reply.split_off(head_end + 4)).context("/metrics is not UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_match_off_and_on_of_each_repetition() {
        // (rep, on, value) in the alternating order the bench runs them.
        let runs = [
            (0, false, 1),
            (0, true, 2),
            (1, true, 3),
            (1, false, 4),
            (2, false, 5),
        ];
        let got: Vec<(i32, i32)> = pairs(&runs, |r| r.0, |r| r.1)
            .map(|(off, on)| (off.2, on.2))
            .collect();
        // Repetition 2 has no agent-on run (interrupted): no pair.
        assert_eq!(got, [(1, 2), (4, 3)]);
    }

    #[test]
    fn counts_select_the_model_or_a_prefix() {
        let m = Metrics::parse(
            "ts_inference_requests_total{model_name=\"bench\",model_version=\"default\",hostname=\"h\",} 5.0\n\
             ts_inference_requests_total{model_name=\"model-1\",model_version=\"default\",hostname=\"h\",} 2.0\n\
             ts_inference_requests_total{model_name=\"model-2\",model_version=\"default\",hostname=\"h\",} 3.0\n\
             servescope_kernel_lost_events_total{reason=\"ringbuf_full\"} 4\n\
             servescope_http_parse_errors_total 1\n",
        )
        .expect("valid exposition");
        assert_eq!(counts(&m, "bench").counted, 5.0);
        assert_eq!(counts(&m, "model-*").counted, 5.0);
        assert_eq!(counts(&m, "model").counted, 0.0);
        let c = counts(&m, "bench");
        assert_eq!((c.kernel_lost, c.parse_errors), (4.0, 1.0));
        assert_eq!(c.kernel_lost_by_reason["ringbuf_full"], 4.0);
    }
}
