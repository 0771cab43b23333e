//! A real TorchServe 0.12.0, driven through the project's copy of the reference scripts in
//! `tests/torchserve/` (setup.sh, run.sh, stop.sh, traffic.py; see the README there and FACTS.md).

use std::{
    collections::BTreeMap,
    env, fs,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{
    Metrics,
    cleanup::{self, Registration},
    http,
    process::run_logged,
    target_dir, workspace_root,
};

/// TorchServe's listeners as configured in `tests/torchserve/config.properties`.
pub const INFERENCE_PORT: u16 = 8080;
pub const MANAGEMENT_PORT: u16 = 8081;
pub const METRICS_PORT: u16 = 8082;
/// The models `run.sh` registers (one worker each).
pub const MODELS: [&str; 3] = ["echo", "slow", "fail"];

/// A first setup may install a JDK with apt and the pip packages; later runs take about a second.
const SETUP_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// run.sh waits for the workers itself (READY_TIMEOUT, 180 s); this only bounds a hung script.
const START_TIMEOUT: Duration = Duration::from_secs(240);
/// stop.sh waits up to 30 s for the frontend and 10 s for the workers.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// Loopback address of a port.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
}

/// Where the scripts live and where they install TorchServe.
#[derive(Debug, Clone)]
pub struct TorchServeHome {
    /// `tests/torchserve/`.
    pub scripts: PathBuf,
    /// TS_HOME: venv, model store, logs. `$SERVESCOPE_TS_HOME`, else `target/torchserve` (a cache).
    pub home: PathBuf,
}

impl Default for TorchServeHome {
    fn default() -> Self {
        let home = match env::var_os("SERVESCOPE_TS_HOME") {
            Some(h) if !h.is_empty() => PathBuf::from(h),
            _ => target_dir().join("torchserve"),
        };
        Self {
            scripts: workspace_root().join("tests/torchserve"),
            home,
        }
    }
}

impl TorchServeHome {
    /// The venv's python (has TorchServe installed; traffic.py needs only the standard library).
    pub fn python(&self) -> PathBuf {
        self.home.join("venv/bin/python")
    }

    /// Runs setup.sh: installs what is missing (java via apt, the venv, pinned pip packages, stand-in
    /// torch, model archives). Idempotent and quick when everything is in place.
    pub fn setup(&self, log: &Path) -> Result<()> {
        fs::create_dir_all(&self.home)
            .with_context(|| format!("creating {}", self.home.display()))?;
        run_logged(
            Command::new("bash")
                .arg(self.scripts.join("setup.sh"))
                .arg(&self.home),
            "TorchServe setup (tests/torchserve/setup.sh)",
            log,
            SETUP_TIMEOUT,
        )
    }

    /// Starts TorchServe with run.sh (fresh logs, 3 workers loaded, exactly one `GET /ping`) and returns
    /// a guard that stops it. Fails if TorchServe's ports are taken.
    pub fn start(&self, log_dir: &Path) -> Result<TorchServe> {
        if !self.python().exists() {
            bail!(
                "TorchServe is not set up in {} (run its setup first)",
                self.home.display()
            );
        }
        let log = log_dir.join("torchserve-run.log");
        let stop_log = log_dir.join("torchserve-stop.log");
        // A TorchServe left behind by an interrupted earlier run (its PID is recorded in TS_HOME) would
        // hold the ports; stop.sh stops only that recorded process and is a no-op otherwise.
        run_logged(
            Command::new("bash")
                .arg(self.scripts.join("stop.sh"))
                .arg(&self.home),
            "stopping a leftover TorchServe (tests/torchserve/stop.sh)",
            &stop_log,
            STOP_TIMEOUT,
        )?;
        // Register the stop before starting: a run.sh that fails half-way may still leave a frontend.
        let stop = {
            let (scripts, home, log_dir) = (
                self.scripts.clone(),
                self.home.clone(),
                log_dir.to_path_buf(),
            );
            cleanup::register(move || {
                // run.sh empties TS_HOME/logs on the next start: keep TorchServe's own view of this run
                // next to the test's other logs.
                for name in ["access_log.log", "ts_log.log"] {
                    let _ = fs::copy(
                        home.join("logs").join(name),
                        log_dir.join(format!("torchserve-{name}")),
                    );
                }
                let result = run_logged(
                    Command::new("bash").arg(scripts.join("stop.sh")).arg(&home),
                    "stopping TorchServe (tests/torchserve/stop.sh)",
                    &log_dir.join("torchserve-stop.log"),
                    STOP_TIMEOUT,
                );
                if let Err(e) = result {
                    eprintln!("{e:#}");
                }
            })
        };
        let started = Instant::now();
        run_logged(
            Command::new("bash")
                .arg(self.scripts.join("run.sh"))
                .arg(&self.home),
            "starting TorchServe (tests/torchserve/run.sh)",
            &log,
            START_TIMEOUT,
        )?;
        let pid_file = self.home.join("torchserve.pid");
        let pid = fs::read_to_string(&pid_file)
            .with_context(|| format!("reading {}", pid_file.display()))?
            .trim()
            .parse()
            .with_context(|| format!("bad pid in {}", pid_file.display()))?;
        Ok(TorchServe {
            home: self.clone(),
            pid,
            started: started.elapsed(),
            stop: Some(stop),
        })
    }

    /// Runs traffic.py (its whole deterministic mix; `args` e.g. `["--n", "5"]`) against the running
    /// TorchServe and returns its summary. Bounded: 5 minutes (it takes ~16 s).
    pub fn traffic(&self, log_dir: &Path, args: &[&str]) -> Result<Traffic> {
        let out = log_dir.join("traffic_summary.json");
        let started = Instant::now();
        run_logged(
            Command::new(self.python())
                .arg(self.scripts.join("traffic.py"))
                .arg("--out")
                .arg(&out)
                .args(args),
            "traffic.py",
            &log_dir.join("traffic.log"),
            Duration::from_secs(300),
        )?;
        let text =
            fs::read_to_string(&out).with_context(|| format!("reading {}", out.display()))?;
        let summary =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", out.display()))?;
        Ok(Traffic {
            summary,
            duration: started.elapsed(),
        })
    }
}

/// A running TorchServe (Java frontend + one Python worker per model). Stopped by stop.sh when dropped.
pub struct TorchServe {
    home: TorchServeHome,
    pid: u32,
    started: Duration,
    stop: Option<Registration>,
}

impl TorchServe {
    /// The Java frontend's PID.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn home(&self) -> &TorchServeHome {
        &self.home
    }

    /// How long run.sh took.
    pub fn startup_time(&self) -> Duration {
        self.started
    }

    pub fn inference_addr(&self) -> SocketAddr {
        loopback(INFERENCE_PORT)
    }

    pub fn management_addr(&self) -> SocketAddr {
        loopback(MANAGEMENT_PORT)
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        loopback(METRICS_PORT)
    }

    /// TorchServe's own `GET /metrics{query}` body. Note: TorchServe counts every scrape in Requests2XX
    /// once the body is rendered, so a scrape shows the earlier scrapes but not itself (FACTS.md §3).
    pub fn scrape_text(&self, query: &str) -> Result<String> {
        let r = http::get(
            self.metrics_addr(),
            &format!("/metrics{query}"),
            Duration::from_secs(10),
        )?;
        if r.status != 200 {
            bail!(
                "TorchServe /metrics{query} answered {}: {}",
                r.status,
                r.text()
            );
        }
        String::from_utf8(r.body).context("TorchServe /metrics is not UTF-8")
    }

    /// TorchServe's own `GET /metrics`, parsed.
    pub fn scrape(&self) -> Result<Metrics> {
        Metrics::parse(&self.scrape_text("")?).context("parsing TorchServe's /metrics")
    }

    /// Stops TorchServe now (stop.sh).
    pub fn stop(mut self) {
        if let Some(reg) = self.stop.take() {
            reg.run();
        }
    }
}

impl Drop for TorchServe {
    fn drop(&mut self) {
        if let Some(reg) = self.stop.take() {
            reg.run();
        }
    }
}

/// traffic.py's JSON summary.
#[derive(Debug, Clone)]
pub struct Traffic {
    pub summary: Value,
    pub duration: Duration,
}

impl Traffic {
    /// `expected_metric_deltas.<key>` for the Requests* counters: what TorchServe's counting rules give
    /// for the responses traffic.py received (traffic only: not run.sh's /ping nor any scrape).
    pub fn expected_requests(&self, family: &str) -> Result<f64> {
        self.summary["expected_metric_deltas"][family]
            .as_f64()
            .with_context(|| format!("traffic summary has no expected_metric_deltas.{family}"))
    }

    /// `expected_metric_deltas.ts_inference_requests_total` as (model, version) → count.
    pub fn expected_inference_requests(&self) -> Result<BTreeMap<(String, String), f64>> {
        self.per_model("ts_inference_requests_total")
    }

    /// `expected_metric_deltas.latency_counter_updates` as (model, version) → number of latency updates.
    pub fn expected_latency_updates(&self) -> Result<BTreeMap<(String, String), f64>> {
        self.per_model("latency_counter_updates")
    }

    /// `totals.requests`: responses traffic.py waited for.
    pub fn total_requests(&self) -> Result<f64> {
        self.summary["totals"]["requests"]
            .as_f64()
            .context("traffic summary has no totals.requests")
    }

    fn per_model(&self, key: &str) -> Result<BTreeMap<(String, String), f64>> {
        let map = self.summary["expected_metric_deltas"][key]
            .as_object()
            .with_context(|| format!("traffic summary has no expected_metric_deltas.{key}"))?;
        map.iter()
            .map(|(k, v)| {
                let (model, version) = k
                    .split_once('|')
                    .with_context(|| format!("bad model|version key {k:?}"))?;
                let n = v.as_f64().with_context(|| format!("bad count for {k}"))?;
                Ok(((model.to_owned(), version.to_owned()), n))
            })
            .collect()
    }
}
