//! The bench's results: the data (serialised to bench/results.json), the targets with pass/fail, and the
//! Markdown page bench/RESULTS.md.

use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;

use super::{
    load::{PacedResult, WrkResult},
    system::{Machine, ProgStats},
};

/// Median, minimum and maximum of a set of repetitions.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Spread {
    pub fn of(values: &[f64]) -> Spread {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Spread::default();
        }
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        let median = if v.len().is_multiple_of(2) {
            f64::midpoint(v[mid - 1], v[mid])
        } else {
            v[mid]
        };
        Spread {
            median,
            min: v[0],
            max: v[v.len() - 1],
            n: v.len(),
        }
    }

    /// `median [min – max]` with `digits` decimals.
    fn show(&self, digits: usize) -> String {
        if self.n == 0 {
            return "–".into();
        }
        if self.n == 1 {
            return format!("{:.digits$}", self.median);
        }
        format!(
            "{:.digits$} [{:.digits$} – {:.digits$}]",
            self.median, self.min, self.max
        )
    }
}

/// Changes in the agent's own counters over one run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AgentCounts {
    /// `ts_inference_requests_total` of the run's model(s).
    pub counted: f64,
    /// `servescope_kernel_lost_events_total`, all reasons.
    pub kernel_lost: f64,
    pub kernel_lost_by_reason: BTreeMap<String, f64>,
    pub parse_errors: f64,
    pub unmatched: f64,
    pub decode_errors: f64,
}

impl AgentCounts {
    pub fn minus(&self, before: &AgentCounts) -> AgentCounts {
        AgentCounts {
            counted: self.counted - before.counted,
            kernel_lost: self.kernel_lost - before.kernel_lost,
            kernel_lost_by_reason: self
                .kernel_lost_by_reason
                .iter()
                .map(|(k, v)| {
                    let b = before.kernel_lost_by_reason.get(k).copied().unwrap_or(0.0);
                    (k.clone(), v - b)
                })
                .collect(),
            parse_errors: self.parse_errors - before.parse_errors,
            unmatched: self.unmatched - before.unmatched,
            decode_errors: self.decode_errors - before.decode_errors,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ThroughputRun {
    pub rep: u32,
    pub agent_on: bool,
    pub wrk: WrkResult,
    /// Agent CPU (user + system, `system::CpuSample`) during the run, in % of one core.
    pub agent_cpu_pct: Option<f64>,
    pub agent_rss_kib: Option<u64>,
    pub agent: Option<AgentCounts>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Throughput {
    pub server: String,
    pub connections: u32,
    pub runs: Vec<ThroughputRun>,
    pub off_rps: Spread,
    pub on_rps: Spread,
    /// on / off of each repetition's pair.
    pub ratio: Spread,
    /// Agent CPU at the maximum rate, in % of one core per 1k req/s (userspace only).
    pub agent_cpu_pct_per_1k: Spread,
    /// The median ratio of the first set of pairs when it was below the smoke floor and the quick mode
    /// measured as many again (`ratio` is then over both sets).
    pub first_ratio: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct LatencyRun {
    pub rep: u32,
    pub agent_on: bool,
    pub load: PacedResult,
    pub agent: Option<AgentCounts>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    pub server: String,
    pub rate: f64,
    pub connections: usize,
    pub runs: Vec<LatencyRun>,
    pub p50_off_us: Spread,
    pub p50_on_us: Spread,
    pub p99_off_us: Spread,
    pub p99_on_us: Spread,
    /// (on / off − 1) × 100 of each repetition's pair.
    pub added_p50_pct: Spread,
    pub added_p99_pct: Spread,
}

#[derive(Clone, Debug, Serialize)]
pub struct SustainedRun {
    pub target_rps: f64,
    pub load: PacedResult,
    pub agent: AgentCounts,
    /// Requests the client got a 2xx for but the agent did not count (after it caught up).
    pub missing: f64,
    /// Wall time between the two snapshots (the run plus the agent catching up).
    pub window_s: f64,
    /// Agent process CPU (user + system, `system::CpuSample`) over the window.
    pub agent_cpu_s: f64,
    /// Agent process CPU, in % of one core per 1k req/s: CPU seconds per request × 1000 × 100.
    pub agent_pct_per_1k: f64,
    /// BPF programs' run time (bpf_stats) per request counted, ns.
    pub bpf_ns_per_request: f64,
    /// BPF program runs per request (every traced syscall of every process runs a program).
    pub bpf_runs_per_request: f64,
    /// BPF run time, in % of one core per 1k req/s.
    pub bpf_pct_per_1k: f64,
    /// Agent process + BPF.
    pub total_pct_per_1k: f64,
    pub programs: Vec<ProgStats>,
    pub agent_rss_kib: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Sustained {
    pub server: String,
    pub connections: usize,
    pub runs: Vec<SustainedRun>,
    /// The highest rate wrk reached with the agent on, if the throughput phase ran.
    pub machine_max_rps: Option<f64>,
    /// `perf report` of a profiled extra run, if --profile.
    pub profile: Option<String>,
}

/// The agent's cost with no traffic to its target.
#[derive(Clone, Debug, Serialize)]
pub struct Idle {
    pub server: String,
    /// How the agent finds the server (`--port`, or TorchServe discovery).
    pub how: String,
    pub seconds: f64,
    /// Agent CPU (discovery scans, samplers, exporter), % of one core.
    pub agent_cpu_pct: f64,
    /// BPF run time per second, ms: what the programs cost other processes' syscalls (a syscall
    /// tracepoint program runs on every read/write of every process, then filters by process).
    pub bpf_ms_per_s: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ModelStage {
    pub models: usize,
    pub requests_sent: u64,
    pub counted: f64,
    pub rss_kib: u64,
    /// Part of `rss_kib` that is the BPF ring buffer mapped into the agent (counted twice by RSS).
    pub bpf_map_rss_kib: u64,
    pub peak_rss_kib: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Render {
    pub models: usize,
    /// Client-side time of a full `GET /metrics` (connect, render, transfer, read), ms.
    pub ms: Spread,
    /// The agent's own render time of those scrapes (`servescope_metrics_render_seconds`: gather and
    /// encode, not the transfer), ms.
    pub server_ms: Spread,
    pub bytes: usize,
    pub samples: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Models {
    pub baseline_rss_kib: u64,
    pub stages: Vec<ModelStage>,
    pub render: Render,
    /// RSS after the render scrapes at the last stage: what a Prometheus scraping the agent every
    /// few seconds sees it settle at (a scrape's multi-MB body is the largest allocation it makes).
    pub rss_after_scrapes_kib: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct StartupRun {
    /// Process start → /metrics answers.
    pub metrics_up_ms: f64,
    /// Process start → the first request sent after start is counted in /metrics.
    pub first_counted_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Startup {
    pub server: String,
    /// How the agent finds the server (`--port`, or TorchServe discovery).
    pub how: String,
    pub runs: Vec<StartupRun>,
    pub first_counted_ms: Spread,
    pub metrics_up_ms: Spread,
}

#[derive(Clone, Debug, Serialize)]
pub struct Churn {
    pub connections: u64,
    pub load: PacedResult,
    pub agent: AgentCounts,
    pub missing: f64,
    pub conns_map_before: usize,
    pub conns_map_after: usize,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub peak_rss_kib: u64,
    pub agent_cpu_s: f64,
}

/// One agent-off or agent-on measurement of the syscall cost to a process the agent does not trace.
#[derive(Clone, Debug, Serialize)]
pub struct BystanderRun {
    pub agent_on: bool,
    pub getppid_ns: f64,
    pub write_ns: f64,
    pub read_ns: f64,
    pub socket_ns: f64,
}

/// What the agent's hooks cost every other process on the node (no #8 target: recorded because it is
/// a cost of the design: DESIGN.md decision 3, docs/decisions.md R33 and R39).
#[derive(Clone, Debug, Serialize)]
pub struct Bystander {
    /// What the agent traced meanwhile (which programs were attached).
    pub watching: String,
    pub iterations: u32,
    pub runs: Vec<BystanderRun>,
    pub off_getppid_ns: Spread,
    pub on_getppid_ns: Spread,
    pub off_write_ns: Spread,
    pub on_write_ns: Spread,
    pub off_read_ns: Spread,
    pub on_read_ns: Spread,
    pub off_socket_ns: Spread,
    pub on_socket_ns: Spread,
}

#[derive(Clone, Debug, Serialize)]
pub struct Target {
    pub name: String,
    pub goal: String,
    pub measured: String,
    /// `None`: not measured in this invocation.
    pub pass: Option<bool>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PhaseError {
    pub phase: String,
    pub error: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    pub quick: bool,
    /// Only some phases ran (`--only`): the bench's own duration is not judged.
    pub partial: bool,
    pub run_s: u64,
    pub latency_run_s: u64,
    pub reps: u32,
    pub sustained_run_s: u64,
    pub rates: Vec<f64>,
    pub churn_connections: u64,
    pub pinning: String,
    pub agent_bin: String,
    /// Extra agent arguments (`--agent-arg`).
    pub agent_args: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Results {
    pub command: String,
    pub machine: Machine,
    pub settings: Settings,
    pub throughput: Vec<Throughput>,
    pub latency: Vec<Latency>,
    pub sustained: Vec<Sustained>,
    pub idle: Vec<Idle>,
    pub models: Option<Models>,
    pub startup: Vec<Startup>,
    pub churn: Option<Churn>,
    /// One per agent mode measured (full mode only).
    pub bystander: Vec<Bystander>,
    pub targets: Vec<Target>,
    pub errors: Vec<PhaseError>,
    /// Wall time of each part, s.
    pub phase_seconds: Vec<(String, f64)>,
    /// Building xtask (when run by `cargo xtask`), the agent and h1server (release), before
    /// anything is measured, s.
    pub build_s: f64,
    /// The release build started with no agent binary in the target directory: a clean checkout's
    /// build, not an incremental one.
    pub cold_build: bool,
    pub wall_time_s: f64,
}

const MB: f64 = 1e6;

fn kib_mb(kib: u64) -> f64 {
    kib as f64 * 1024.0 / MB
}

impl Results {
    /// Evaluates every target against what was measured (a target whose phase did not run is listed as
    /// not measured, never as passed).
    pub fn evaluate(&mut self) {
        let mut t = Vec::new();
        for server in ["h1server", "TorchServe"] {
            let th = self.throughput.iter().find(|x| x.server == server);
            t.push(Target {
                name: format!("throughput ratio on/off, {server}"),
                goal: "≥ 0.99".into(),
                measured: th.map_or("not measured".into(), |x| x.ratio.show(3)),
                pass: th.map(|x| x.ratio.median >= 0.99),
            });
        }
        for l in &self.latency {
            t.push(Target {
                name: format!("added p99 latency, {} at {:.0} req/s", l.server, l.rate),
                goal: "≤ 2 %".into(),
                measured: format!("{} %", l.added_p99_pct.show(1)),
                pass: Some(l.added_p99_pct.median <= 2.0),
            });
        }
        if self.latency.is_empty() {
            t.push(not_measured("added p99 latency", "≤ 2 %"));
        }
        for s in &self.sustained {
            let worst = s
                .runs
                .iter()
                .max_by(|a, b| a.total_pct_per_1k.total_cmp(&b.total_pct_per_1k));
            if let Some(w) = worst {
                t.push(Target {
                    name: format!(
                        "agent CPU per 1k req/s (agent process + BPF), {}{}",
                        s.server,
                        if s.runs.len() > 1 { ", worst rate" } else { "" }
                    ),
                    goal: "≤ 1 % of a core".into(),
                    measured: format!(
                        "{:.3} % ({:.3} agent + {:.3} BPF) at {:.0} req/s",
                        w.total_pct_per_1k,
                        w.agent_pct_per_1k,
                        w.bpf_pct_per_1k,
                        w.load.achieved_rps
                    ),
                    pass: Some(w.total_pct_per_1k <= 1.0),
                });
            }
        }
        if self.sustained.is_empty() {
            t.push(not_measured("agent CPU per 1k req/s", "≤ 1 % of a core"));
        }
        let runs: Vec<&SustainedRun> = self.sustained.iter().flat_map(|s| &s.runs).collect();
        if runs.is_empty() {
            t.push(not_measured("lost events at sustained rates", "0"));
        } else {
            let lost: f64 = runs.iter().map(|r| r.agent.kernel_lost + r.missing).sum();
            let top = runs.iter().map(|r| r.load.achieved_rps).fold(0.0, f64::max);
            t.push(Target {
                name: "lost events at sustained rates (kernel drops + uncounted requests)".into(),
                goal: "0 up to 20k req/s (or the machine max)".into(),
                measured: format!("{lost:.0} (highest rate reached: {top:.0} req/s)"),
                pass: Some(lost == 0.0),
            });
        }
        match &self.models {
            Some(m) => {
                let at_1000 = m
                    .stages
                    .iter()
                    .find(|s| s.models == 1000)
                    .or(m.stages.last());
                if let Some(s) = at_1000 {
                    // The larger of the two: after the traffic, and after the scrapes.
                    let rss = s.rss_kib.max(m.rss_after_scrapes_kib);
                    t.push(Target {
                        name: format!("agent RSS at {} models", s.models),
                        goal: "≤ 30 MB".into(),
                        measured: format!(
                            "{:.1} MB ({:.1} MB of it BPF ring-buffer mappings; {:.1} MB after the \
                             traffic, {:.1} MB after {} scrapes)",
                            kib_mb(rss),
                            kib_mb(s.bpf_map_rss_kib),
                            kib_mb(s.rss_kib),
                            kib_mb(m.rss_after_scrapes_kib),
                            m.render.ms.n + 1
                        ),
                        pass: Some(kib_mb(rss) <= 30.0),
                    });
                }
                t.push(Target {
                    name: format!(
                        "/metrics render at {} models (agent's render time, median)",
                        m.render.models
                    ),
                    goal: "≤ 5 ms".into(),
                    measured: format!(
                        "{} ms (whole scrape from the client: {} ms)",
                        m.render.server_ms.show(2),
                        m.render.ms.show(2)
                    ),
                    pass: Some(m.render.server_ms.median <= 5.0),
                });
            }
            None => {
                t.push(not_measured("agent RSS at 1,000 models", "≤ 30 MB"));
                t.push(not_measured("/metrics render at 1,000 models", "≤ 5 ms"));
            }
        }
        for s in &self.startup {
            t.push(Target {
                name: format!(
                    "start-up to first counted request, {} ({})",
                    s.server, s.how
                ),
                goal: "≤ 1 s".into(),
                measured: format!("{} ms", s.first_counted_ms.show(0)),
                pass: Some(s.first_counted_ms.median <= 1000.0),
            });
        }
        if self.startup.is_empty() {
            t.push(not_measured("start-up", "≤ 1 s"));
        }
        t.push(self.duration_target());
        self.targets = t;
    }

    /// The bench's own run time: the quick mode (the CI smoke test) measures in under 2 minutes (its
    /// release build, 1–3 minutes from a clean checkout, is CI's to cache); the full mode finishes,
    /// builds included, in under 15.
    fn duration_target(&self) -> Target {
        let (name, goal, limit_s, took_s) = if self.settings.quick {
            let measuring = self.wall_time_s - self.build_s;
            (
                "quick bench run time, measuring",
                "< 2 min",
                120.0,
                measuring,
            )
        } else {
            (
                "full bench run time, builds included",
                "< 15 min",
                900.0,
                self.wall_time_s,
            )
        };
        if self.settings.partial {
            return not_measured(name, goal);
        }
        Target {
            name: name.into(),
            goal: goal.into(),
            measured: format!(
                "{took_s:.0} s (building took {:.0} s{}, measuring {:.0} s)",
                self.build_s,
                if self.cold_build {
                    ", from a clean target directory"
                } else {
                    ", incremental"
                },
                self.wall_time_s - self.build_s
            ),
            pass: Some(took_s < limit_s),
        }
    }

    /// What makes the CI smoke test fail: any event lost anywhere, or a throughput ratio below the
    /// server's floor ([`smoke_ratio_floor`]).
    pub fn smoke_failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        for th in &self.throughput {
            let floor = smoke_ratio_floor(&th.server);
            if th.ratio.n > 0 && th.ratio.median < floor {
                f.push(format!(
                    "{}: throughput ratio {:.3} < {floor}",
                    th.server, th.ratio.median
                ));
            }
            let lost: f64 = th
                .runs
                .iter()
                .filter_map(|r| r.agent.as_ref())
                .map(|a| a.kernel_lost)
                .sum();
            if lost > 0.0 {
                f.push(format!(
                    "{}: {lost} events lost in the kernel at max rate",
                    th.server
                ));
            }
        }
        for s in &self.sustained {
            for r in &s.runs {
                if r.agent.kernel_lost > 0.0 || r.missing > 0.0 {
                    f.push(format!(
                        "{} at {:.0} req/s: {} kernel drops, {} requests not counted",
                        s.server, r.target_rps, r.agent.kernel_lost, r.missing
                    ));
                }
            }
        }
        if let Some(c) = &self.churn
            && (c.agent.kernel_lost > 0.0 || c.missing > 0.0)
        {
            f.push(format!(
                "churn: {} kernel drops, {} requests not counted",
                c.agent.kernel_lost, c.missing
            ));
        }
        for e in &self.errors {
            f.push(format!("phase {} failed: {}", e.phase, e.error));
        }
        f
    }

    /// The targets as a plain-text table for the terminal.
    pub fn targets_text(&self) -> String {
        let mut out = String::new();
        let w = self.targets.iter().map(|t| t.name.len()).max().unwrap_or(0);
        for t in &self.targets {
            let verdict = match t.pass {
                Some(true) => "PASS",
                Some(false) => "FAIL",
                None => "----",
            };
            let _ = writeln!(
                out,
                "{verdict}  {:<w$}  {:<40}  (goal {})",
                t.name, t.measured, t.goal
            );
        }
        out
    }

    /// RESULTS.md. `misses`: the hand-written explanation of the targets that fail and what was tried
    /// (bench/MISSES.md), placed under the targets table.
    pub fn markdown(&self, misses: Option<&str>) -> String {
        let mut o = String::new();
        let m = &self.machine;
        let s = &self.settings;
        let _ = writeln!(o, "# servescope benchmark results\n");
        let _ = writeln!(
            o,
            "Generated by `{}` on {} in {:.0} s ({} mode; {:.0} s of it building). Regenerate with the \
             same command from the workspace root (root needed: the agent loads eBPF programs).\n",
            self.command,
            m.date_utc,
            self.wall_time_s,
            if s.quick { "quick" } else { "full" },
            self.build_s
        );
        let _ = writeln!(
            o,
            "> Load average at start / end: {} / {}; CPU time stolen by the hypervisor during the run: \
             {}. On a 2-CPU machine the load generator, the server and the agent share the CPUs, and \
             anything else running (builds, tests, other guests of the host) adds noise: publish \
             numbers from a quiet machine.\n",
            m.loadavg_start,
            m.loadavg_end,
            m.steal_percent
                .map_or_else(|| "unknown".to_owned(), |p| format!("{p:.1} %"))
        );
        let _ = writeln!(o, "## Machine\n");
        let _ = writeln!(o, "| | |\n|---|---|");
        let _ = writeln!(o, "| kernel | {} |", m.kernel);
        let _ = writeln!(o, "| CPU | {} |", m.cpu_model);
        let _ = writeln!(o, "| CPUs | {} |", m.cpus);
        let _ = writeln!(o, "| memory | {} GiB |", m.memory_gib);
        let _ = writeln!(o, "| date | {} |", m.date_utc);
        let _ = writeln!(o, "| git commit | {} |", m.git_commit);
        let _ = writeln!(o, "| wrk | {} |", m.wrk);
        let _ = writeln!(o, "| agent binary | `{}` |", s.agent_bin);
        if !s.agent_args.is_empty() {
            let _ = writeln!(
                o,
                "| extra agent arguments | `{}` |",
                s.agent_args.join(" ")
            );
        }
        let _ = writeln!(o, "| pinning | {} |", s.pinning);
        let _ = writeln!(
            o,
            "| runs | {} s each ({} s at a fixed rate), {} repetitions of each agent-off/agent-on pair; sustained-rate runs {} s |\n",
            s.run_s, s.latency_run_s, s.reps, s.sustained_run_s
        );

        let _ = writeln!(o, "## Targets\n");
        let _ = writeln!(
            o,
            "| target | goal | measured | result |\n|---|---|---|---|"
        );
        for t in &self.targets {
            let verdict = match t.pass {
                Some(true) => "PASS",
                Some(false) => "**FAIL**",
                None => "not measured",
            };
            let _ = writeln!(
                o,
                "| {} | {} | {} | {verdict} |",
                t.name, t.goal, t.measured
            );
        }
        let _ = writeln!(
            o,
            "\nValues are `median [min – max]` over repetitions. Ratios and added latencies are taken per \
             repetition (each agent-on run against the agent-off run next to it), then the median.\n"
        );
        if !self.errors.is_empty() {
            let _ = writeln!(o, "### Phases that failed\n");
            for e in &self.errors {
                let _ = writeln!(o, "- **{}**: `{}`", e.phase, e.error.replace('\n', " "));
            }
            let _ = writeln!(o);
        }
        if let Some(misses) = misses {
            let _ = writeln!(
                o,
                "## Misses, and what was tried\n\n_From `bench/MISSES.md` (written by hand, kept with the \
                 code it describes); the figures above are this run's._\n\n{}\n",
                misses.trim()
            );
        }

        self.md_throughput(&mut o);
        self.md_latency(&mut o);
        self.md_sustained(&mut o);
        self.md_models(&mut o);
        self.md_startup(&mut o);
        self.md_churn(&mut o);
        self.md_bystander(&mut o);
        md_method(&mut o, s);
        o
    }

    fn md_throughput(&self, o: &mut String) {
        let _ = writeln!(
            o,
            "## 1. Throughput at the maximum rate (wrk, closed loop)\n"
        );
        if self.throughput.is_empty() {
            let _ = writeln!(o, "Not measured in this invocation.\n");
            return;
        }
        let _ = writeln!(
            o,
            "| server | connections | req/s agent off | req/s agent on | ratio on/off | agent CPU % of a core per 1k req/s |\n|---|---|---|---|---|---|"
        );
        for t in &self.throughput {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} |",
                t.server,
                t.connections,
                t.off_rps.show(0),
                t.on_rps.show(0),
                t.ratio.show(3),
                t.agent_cpu_pct_per_1k.show(3)
            );
        }
        if let Some(h) = self
            .throughput
            .iter()
            .find(|t| t.server == HOOKS_ONLY_VARIANT)
        {
            let _ = writeln!(
                o,
                "\n{}: the same agent with every BPF program returning before it reads anything \
                 (`--hooks-only`; nothing is traced or counted). Its ratio, {:.3}, is what the \
                 kernel's running a program at each hook costs this server, apart from anything \
                 servescope does there: no saving inside the programs or the agent can raise the \
                 full agent's ratio above it.",
                h.server, h.ratio.median
            );
        }
        for t in &self.throughput {
            if let Some(first) = t.first_ratio {
                let _ = writeln!(
                    o,
                    "\n{}: the first {} pairs' median ratio, {first:.3}, was below the smoke floor {}; \
                     the ratio above is over those and as many pairs more.",
                    t.server,
                    t.ratio.n / 2,
                    smoke_ratio_floor(&t.server)
                );
            }
        }
        let _ = writeln!(o, "\nEvery run:\n");
        let _ = writeln!(
            o,
            "| server | rep | agent | req/s | wrk p50 µs | wrk p99 µs | errors | agent CPU % | agent counted − wrk completed | kernel lost | parse errors | unmatched |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for t in &self.throughput {
            for r in &t.runs {
                let cpu = r.agent_cpu_pct.map_or("–".into(), |c| format!("{c:.1}"));
                let (diff, lost, parse, unmatched) = match &r.agent {
                    Some(a) => (
                        format!("{:+.0}", a.counted - r.wrk.requests as f64),
                        format!("{:.0}", a.kernel_lost),
                        format!("{:.0}", a.parse_errors),
                        format!("{:.0}", a.unmatched),
                    ),
                    None => ("–".into(), "–".into(), "–".into(), "–".into()),
                };
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {} | {cpu} | {diff} | {lost} | {parse} | {unmatched} |",
                    t.server,
                    r.rep,
                    if r.agent_on { "on" } else { "off" },
                    r.wrk.rps,
                    r.wrk.p50_us,
                    r.wrk.p99_us,
                    r.wrk.errors
                );
            }
        }
        let _ = writeln!(
            o,
            "\n`agent counted − wrk completed` may be slightly positive: wrk does not count the requests \
             still in flight when it stops (at most one per connection), the server answers them and the \
             agent counts them.\n"
        );
    }

    fn md_latency(&self, o: &mut String) {
        let _ = writeln!(
            o,
            "## 2. Added latency at a fixed rate below saturation (paced client)\n"
        );
        if self.latency.is_empty() {
            let _ = writeln!(o, "Not measured in this invocation.\n");
            return;
        }
        let _ = writeln!(
            o,
            "| server | rate req/s | connections | p50 off µs | p50 on µs | added p50 % | p99 off µs | p99 on µs | added p99 % |\n|---|---|---|---|---|---|---|---|---|"
        );
        for l in &self.latency {
            let _ = writeln!(
                o,
                "| {} | {:.0} | {} | {} | {} | {} | {} | {} | {} |",
                l.server,
                l.rate,
                l.connections,
                l.p50_off_us.show(0),
                l.p50_on_us.show(0),
                l.added_p50_pct.show(1),
                l.p99_off_us.show(0),
                l.p99_on_us.show(0),
                l.added_p99_pct.show(1)
            );
        }
        let _ = writeln!(o, "\nEvery run:\n");
        let _ = writeln!(
            o,
            "| server | rep | agent | achieved req/s | p50 µs | p90 µs | p99 µs | p99.9 µs | p99 from schedule µs | late sends | failed |\n|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for l in &self.latency {
            for r in &l.runs {
                let x = &r.load;
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} |",
                    l.server,
                    r.rep,
                    if r.agent_on { "on" } else { "off" },
                    x.achieved_rps,
                    x.p50_us,
                    x.p90_us,
                    x.p99_us,
                    x.p999_us,
                    x.p99_from_schedule_us,
                    x.late,
                    x.failed
                );
            }
        }
        let _ = writeln!(o);
    }

    fn md_sustained(&self, o: &mut String) {
        let _ = writeln!(
            o,
            "## 3–4. CPU and event loss at sustained rates (paced client, agent on, bpf_stats on)\n"
        );
        if self.sustained.is_empty() {
            let _ = writeln!(o, "Not measured in this invocation.\n");
            return;
        }
        if !self.idle.is_empty() {
            let _ = writeln!(
                o,
                "Fixed cost with no traffic to the target (included in the per-1k figures below):\n\n\
                 | server | how found | agent CPU % of a core | BPF ms per second (other processes' syscalls) |\n|---|---|---|---|"
            );
            for i in &self.idle {
                let _ = writeln!(
                    o,
                    "| {} | {} | {:.2} | {} |",
                    i.server,
                    i.how,
                    i.agent_cpu_pct,
                    i.bpf_ms_per_s.map_or("–".into(), |b| format!("{b:.2}"))
                );
            }
            let _ = writeln!(o);
        }
        let _ = writeln!(
            o,
            "| server | target req/s | achieved req/s | 2xx | agent counted | missing | kernel lost | parse errors | unmatched | agent CPU % of a core | agent % per 1k req/s | BPF ns/request | BPF runs/request | BPF % per 1k req/s | total % per 1k req/s | agent RSS MB |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for s in &self.sustained {
            for r in &s.runs {
                let _ = writeln!(
                    o,
                    "| {} | {:.0} | {:.0} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.3} | {:.0} | {:.1} | {:.3} | {:.3} | {:.1} |",
                    s.server,
                    r.target_rps,
                    r.load.achieved_rps,
                    r.load.ok,
                    r.agent.counted,
                    r.missing,
                    r.agent.kernel_lost,
                    r.agent.parse_errors,
                    r.agent.unmatched,
                    r.agent_cpu_s / r.window_s.max(1e-9) * 100.0,
                    r.agent_pct_per_1k,
                    r.bpf_ns_per_request,
                    r.bpf_runs_per_request,
                    r.bpf_pct_per_1k,
                    r.total_pct_per_1k,
                    kib_mb(r.agent_rss_kib)
                );
            }
        }
        for s in &self.sustained {
            if let Some(max) = s.machine_max_rps {
                let _ = writeln!(
                    o,
                    "\n{}: maximum with the agent on (wrk, section 1) {max:.0} req/s.",
                    s.server
                );
            }
        }
        let _ = writeln!(
            o,
            "\n`BPF runs/request` counts every run of the agent's programs on the machine, divided by the \
             requests served: a syscall tracepoint program runs on every read/write of every process \
             (including the load generator's) before it filters by process."
        );
        for s in &self.sustained {
            let Some(top) = s.runs.last() else { continue };
            let _ = writeln!(
                o,
                "\nBPF programs, {} at {:.0} req/s:\n\n| program | runs | total ms | ns/run |\n|---|---|---|---|",
                s.server, top.target_rps
            );
            for p in &top.programs {
                let _ = writeln!(
                    o,
                    "| {} | {} | {:.1} | {:.0} |",
                    p.name,
                    p.run_cnt,
                    p.run_time_ns as f64 / 1e6,
                    p.run_time_ns as f64 / p.run_cnt.max(1) as f64
                );
            }
            if let Some(p) = &s.profile {
                let _ = writeln!(
                    o,
                    "\nProfile of {} (perf record -a -g during an extra, unmeasured run):\n\n```text\n{p}\n```",
                    s.server
                );
            }
        }
        let _ = writeln!(o);
    }

    fn md_models(&self, o: &mut String) {
        let _ = writeln!(
            o,
            "## 5. Memory by number of models, and /metrics render time\n"
        );
        let Some(m) = &self.models else {
            let _ = writeln!(o, "Not measured in this invocation.\n");
            return;
        };
        let _ = writeln!(
            o,
            "Agent RSS right after start (no traffic yet): {:.1} MB.\n",
            kib_mb(m.baseline_rss_kib)
        );
        let _ = writeln!(
            o,
            "| models | requests sent (cumulative) | counted | RSS MB | of which BPF map mappings MB | RSS without them MB | peak RSS MB |\n|---|---|---|---|---|---|---|"
        );
        for s in &m.stages {
            let _ = writeln!(
                o,
                "| {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} |",
                s.models,
                s.requests_sent,
                s.counted,
                kib_mb(s.rss_kib),
                kib_mb(s.bpf_map_rss_kib),
                kib_mb(s.rss_kib.saturating_sub(s.bpf_map_rss_kib)),
                kib_mb(s.peak_rss_kib)
            );
        }
        let _ = writeln!(
            o,
            "\nThe BPF map mappings are the ring buffer (`--ringbuf-bytes`, 4 MiB by default): the kernel maps \
             its data pages twice in a row so a record never wraps, and VmRSS counts both mappings (8 MiB), \
             although the memory exists once (and is kernel memory, charged to the agent's cgroup once)."
        );
        let r = &m.render;
        let _ = writeln!(
            o,
            "\nAfter the {} scrapes below (at {} models): RSS {:.1} MB. Each scrape renders its body \
             (~3 MB at 1,000 models) into the previous one's buffer; allocated afresh each time, \
             glibc kept the freed blocks and RSS rose ~6 MB over the first ten scrapes.",
            r.ms.n + 1,
            r.models,
            kib_mb(m.rss_after_scrapes_kib)
        );
        let _ = writeln!(
            o,
            "\n/metrics at {} models: {} bytes, {} samples; over {} scrapes the agent rendered each in {} ms \
             (its `servescope_metrics_render_seconds`: gather and encode), and the whole scrape took {} ms \
             from the client (connect, render, loopback transfer of the body, read).\n",
            r.models,
            r.bytes,
            r.samples,
            r.ms.n,
            r.server_ms.show(2),
            r.ms.show(2)
        );
    }

    fn md_startup(&self, o: &mut String) {
        let _ = writeln!(
            o,
            "## 6. Start-up: process start → first traced request counted\n"
        );
        if self.startup.is_empty() {
            let _ = writeln!(o, "Not measured in this invocation.\n");
            return;
        }
        let _ = writeln!(
            o,
            "| server | how found | /metrics answers ms | first request counted ms |\n|---|---|---|---|"
        );
        for s in &self.startup {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} |",
                s.server,
                s.how,
                s.metrics_up_ms.show(0),
                s.first_counted_ms.show(0)
            );
        }
        let _ = writeln!(
            o,
            "\nA request (own connection) is sent every 10 ms from the moment the process is spawned, and \
             /metrics is polled after each; resolution is about 10–20 ms.\n"
        );
    }

    fn md_churn(&self, o: &mut String) {
        let _ = writeln!(o, "## 7. Connection churn (one request per connection)\n");
        let Some(c) = &self.churn else {
            let _ = writeln!(o, "Not measured in this invocation.\n");
            return;
        };
        let _ = writeln!(
            o,
            "| connections | conn/s | failed | agent counted | missing | kernel lost | parse errors | unmatched | `conns` map before → after | RSS MB before → after (peak) | agent CPU s |\n|---|---|---|---|---|---|---|---|---|---|---|"
        );
        let _ = writeln!(
            o,
            "| {} | {:.0} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} → {} | {:.1} → {:.1} ({:.1}) | {:.2} |\n",
            c.connections,
            c.load.achieved_rps,
            c.load.failed,
            c.agent.counted,
            c.missing,
            c.agent.kernel_lost,
            c.agent.parse_errors,
            c.agent.unmatched,
            c.conns_map_before,
            c.conns_map_after,
            kib_mb(c.rss_before_kib),
            kib_mb(c.rss_after_kib),
            kib_mb(c.peak_rss_kib),
            c.agent_cpu_s
        );
    }
}

impl Results {
    fn md_bystander(&self, o: &mut String) {
        let _ = writeln!(
            o,
            "## 8. Cost to processes the agent does not trace
"
        );
        if self.bystander.is_empty() {
            let _ = writeln!(o, "Not measured in this invocation (full mode only).\n");
            return;
        }
        let _ = writeln!(
            o,
            "The bench process itself, not a target, times calls in batches (median batch), agent off \
             and on alternately, for each way the agent was run. The issue sets no target for it: it \
             is what the agent's hooks cost every other process on the node. With the syscall hooks \
             any syscall tracepoint puts every syscall on the kernel's slow path and every hooked \
             call runs a program that finds no target (docs/decisions.md R33). The socket hooks \
             attach no syscall tracepoint and run nothing for a file (R39), but every socket send and \
             receive on the node runs their program, which stops at the bitmap of traced processes \
             when the process is not traced (R58): the last row.\n"
        );
        for b in &self.bystander {
            let _ = writeln!(
                o,
                "Agent watching {}: {}k calls per batch ({}k socketpair rounds), {} pairs.\n",
                b.watching,
                b.iterations / 1000,
                b.iterations / super::system::SOCKET_SHARE / 1000,
                b.runs.len() / 2
            );
            let _ = writeln!(
                o,
                "| syscall | agent off, ns | agent on, ns | added, ns (medians) |\n|---|---|---|---|"
            );
            for (name, off, on) in [
                (
                    "`getppid` (never hooked: the syscall slow path only)",
                    b.off_getppid_ns,
                    b.on_getppid_ns,
                ),
                (
                    "`write` 64 B to /dev/null (syscall hooks: programs that find no target)",
                    b.off_write_ns,
                    b.on_write_ns,
                ),
                (
                    "`read` 64 B from /dev/zero (syscall hooks: at exit only on 5.15+, R34)",
                    b.off_read_ns,
                    b.on_read_ns,
                ),
                (
                    "`write` + `read` of 64 B over a unix socketpair (either hook set: programs \
                     that find no target)",
                    b.off_socket_ns,
                    b.on_socket_ns,
                ),
            ] {
                let _ = writeln!(
                    o,
                    "| {name} | {} | {} | {:+.0} |",
                    off.show(0),
                    on.show(0),
                    on.median - off.median
                );
            }
            let _ = writeln!(o);
        }
    }
}

fn not_measured(name: &str, goal: &str) -> Target {
    Target {
        name: name.into(),
        goal: goal.into(),
        measured: "not measured".into(),
        pass: None,
    }
}

fn md_method(o: &mut String, s: &Settings) {
    let _ = writeln!(
        o,
        "## Method\n\n\
- **Servers.** `h1server` (tests/src/bin/h1server.rs, release build): thread per connection, keep-alive, \
  reads with read(2) and answers `POST /predictions/<model>` with one write(2) of a 2-byte body — the \
  cheapest possible request, so the agent's per-request cost weighs most. TorchServe 0.12 with the `echo` \
  model (tests/torchserve, one worker), found by the agent's default discovery.\n\
- **Alternation.** One server process serves every run. For each repetition the agent-off and agent-on \
  runs are adjacent, in alternating order (off→on, then on→off, ...), so drift in machine load hits both \
  sides; a fresh agent (release build) is started and made ready before each agent-on run and stopped \
  after it. Ratios are computed per pair and the median over pairs is reported with its range.\n\
- **Maximum throughput**: wrk (Debian), 1 thread, a fixed number of keep-alive connections, POST with a \
  5-byte body, {run} s per run; wrk's completed requests / duration.\n\
- **Latency at a fixed rate**: wrk has no constant-rate mode (wrk2 and hey are not in Debian), so the bench's \
  own paced client (xtask/src/bench/load.rs) sends on a fixed schedule over keep-alive connections, one \
  thread per connection (open loop, like wrk2). Latency is measured from writing a request to reading its \
  whole response; the latency from the scheduled send time (coordinated-omission corrected) and the \
  number of late sends are recorded too. The rate is half the agent-off maximum of section 1 (capped at \
  10k req/s); {latency_run} s per run.\n\
- **CPU**: agent process CPU time over the run (the sum of its threads' nanoseconds on CPU from \
  /proc/PID/task/TID/schedstat; utime + stime from /proc/PID/stat, 10 ms ticks, if a thread exited during \
  the run), divided by the requests served: \
  CPU seconds per request × 1000 = share of one core per 1k req/s. Kernel-side cost: \
  `kernel.bpf_stats_enabled=1` only during these runs (restored afterwards) and run_time_ns / run_cnt of \
  the agent's `ss_*` programs (`bpftool prog show`; the agent's programs are identified by the program ids \
  in its /proc/PID/fdinfo). The CPU target is judged on userspace + BPF.\n\
- **Loss**: h1server at {rates} req/s and TorchServe at half its agent-off maximum (paced, {sustained} s \
  each, one agent, after {sustained} s without traffic that give the fixed cost): the agent's own counters \
  (servescope_kernel_lost_events_total, servescope_http_parse_errors_total, \
  servescope_unmatched_responses_total, servescope_decode_errors_total) and ts_inference_requests_total \
  against the 2xx responses the client received, after the agent has caught up.\n\
- **Memory**: VmRSS of the agent after traffic over 1, 100 and 1,000 distinct model names (h1server \
  answers any model with 200); /metrics scrape time at 1,000 models.\n\
- **Start-up**: from spawning the agent to the first request (sent after the spawn) appearing in \
  /metrics.\n\
- **Churn**: {churn} connections, one request each with `Connection: close` (the server closes first), \
  4 client threads as fast as possible; the agent's BPF `conns` map entries (bpftool map dump) and RSS \
  before and after.\n\
- **Pinning** ({pin}): the server is pinned to CPU 0 and the load generator to CPU 1 with taskset so \
  they do not migrate between runs; the agent is not pinned (the scheduler places it, as in production). \
  TorchServe (JVM + Python worker) is not pinned.\n\
- **Smoke gate** (`--quick`, CI): the command fails if any event is lost, any request goes uncounted, \
  TorchServe's throughput ratio is below 0.8 or h1server's below 0.6 (a regression floor: its 0.9 is a \
  target this machine does not meet yet, see the misses above). A median ratio below its floor is \
  measured again with as many pairs more before it fails, and judged over all of them: a regression \
  persists, a disturbed minute on a shared VM does not. Target misses are reported, not turned into a \
  failing exit code.\n",
        run = s.run_s,
        latency_run = s.latency_run_s,
        rates = s
            .rates
            .iter()
            .map(|r| format!("{}k", r / 1000.0))
            .collect::<Vec<_>>()
            .join(", "),
        sustained = s.sustained_run_s,
        churn = s.churn_connections,
        pin = s.pinning,
    );
}

/// The name of h1server's full-mode variant measured with `--hooks-only` (bench.rs), whose row
/// section 1 explains.
pub const HOOKS_ONLY_VARIANT: &str = "h1server, --hooks-only";

/// The lowest throughput ratio (agent on / off) the smoke gate accepts for `server`.
///
/// TorchServe is held to 0.8: its pairs spread 0.84–1.11 on this VM (JIT still warming, a Python
/// worker), and a full run's median read 0.897 on 2026-12-03, so 0.9 would fail on noise. h1server
/// is the synthetic worst case, a ~15–20 µs request on a machine whose two CPUs are both saturated by the server and
/// the load generator: every microsecond the agent spends per request (BPF in the server's syscalls,
/// the filter on the load generator's, the agent's own decoding) comes out of throughput, and the
/// ~4–5 µs it costs today put the ratio at 0.70–0.80 (bench/MISSES.md). 0.9 there is a target not
/// yet met, not a smoke signal; a gate that fails on every run would block every change instead of
/// catching the one that doubles the cost (the ratio was 0.63 before R1's wakeup batching), which
/// is what 0.6 does.
pub fn smoke_ratio_floor(server: &str) -> f64 {
    // "h1server" and its variants ("h1server, --hooks-only"): the same server.
    if server.starts_with("h1server") {
        0.6
    } else {
        0.8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h1server_variants_share_its_smoke_floor() {
        assert_eq!(smoke_ratio_floor("h1server"), 0.6);
        assert_eq!(smoke_ratio_floor("h1server, --hooks-only"), 0.6);
        assert_eq!(smoke_ratio_floor("TorchServe"), 0.8);
    }

    #[test]
    fn spread_takes_the_middle_and_ignores_non_finite_values() {
        let s = Spread::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        let s = Spread::of(&[4.0, 1.0, f64::NAN, 2.0, 3.0]);
        assert_eq!((s.median, s.n), (2.5, 4));
        assert_eq!(Spread::of(&[]).n, 0);
        assert_eq!(Spread::of(&[]).show(1), "–");
        assert_eq!(Spread::of(&[1.25]).show(1), "1.2");
        assert_eq!(Spread::of(&[1.0, 3.0]).show(0), "2 [1 – 3]");
    }

    #[test]
    fn counts_subtract_per_reason() {
        let before = AgentCounts {
            counted: 10.0,
            kernel_lost: 1.0,
            kernel_lost_by_reason: [("ringbuf_full".to_owned(), 1.0)].into(),
            ..AgentCounts::default()
        };
        let after = AgentCounts {
            counted: 25.0,
            kernel_lost: 3.0,
            kernel_lost_by_reason: [
                ("ringbuf_full".to_owned(), 2.0),
                ("conn_map_full".to_owned(), 1.0),
            ]
            .into(),
            ..AgentCounts::default()
        };
        let d = after.minus(&before);
        assert_eq!(d.counted, 15.0);
        assert_eq!(d.kernel_lost, 2.0);
        assert_eq!(d.kernel_lost_by_reason["ringbuf_full"], 1.0);
        assert_eq!(d.kernel_lost_by_reason["conn_map_full"], 1.0);
    }
}
