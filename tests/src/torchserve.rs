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
    http, netns,
    process::run_logged,
    target_dir, workspace_root,
};

/// TorchServe's listeners as configured in `tests/torchserve/config.properties`.
pub const INFERENCE_PORT: u16 = 8080;
pub const MANAGEMENT_PORT: u16 = 8081;
pub const METRICS_PORT: u16 = 8082;
/// The models `run.sh` registers (one worker each).
pub const MODELS: [&str; 3] = ["echo", "slow", "fail"];

/// Archive of version 2.0 of the `echo` model (the same handler; setup.sh builds it, run.sh does not
/// load it): the e2e suites register it next to run.sh's echo 1.0, so that one model has two versions.
pub const ECHO_V2_ARCHIVE: &str = "echo_v2.mar";
/// The batching model of the e2e suites (registered like [`ECHO_V2_ARCHIVE`], after the agent started:
/// a worker loaded before it would be named after its archive, `echo`). One worker, so that a burst of
/// concurrent requests is cut into batches in arrival order: full batches of `batch_size`, then a
/// partial one that waits out `max_batch_delay`, which is real queueing for both clocks to measure.
pub const E2E_BATCHED: Batching = Batching {
    name: "batched",
    archive: "echo.mar",
    batch_size: 4,
    max_batch_delay_ms: 500,
    workers: 1,
};
/// The management responses [`TorchServe::register_e2e_models`] takes (two registrations and a
/// describe), all 200s: TorchServe counts them in Requests2XX, and so does an agent already running.
pub const E2E_REGISTRATION_RESPONSES: f64 = 3.0;
/// Registering a model waits for its workers to load (`synchronous=true`); scaling waits for workers to
/// start or stop. Seconds each, bounded generously for a busy host.
pub const MANAGEMENT_TIMEOUT: Duration = Duration::from_secs(60);

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
    /// The hostname of the simulated pod this TorchServe runs in (see [`TorchServeHome::for_pod`]), or
    /// `None` for the machine's own namespaces.
    pub pod: Option<String>,
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
            pod: None,
        }
    }
}

impl TorchServeHome {
    /// The venv's python (has TorchServe installed; traffic.py needs only the standard library).
    pub fn python(&self) -> PathBuf {
        self.home.join("venv/bin/python")
    }

    /// A TorchServe home of its own in `dir`, for a simulated pod called `hostname`: the venv of `self`
    /// (linked, never changed: it is a shared cache), copies of its model archives, and the project's
    /// config.properties with a small JVM heap (two or more frontends share the machine).
    ///
    /// [`TorchServeHome::start`] then runs TorchServe in new network, UTS and mount namespaces, as a
    /// Kubernetes pod is to the kernel: loopback up, hostname `hostname`, an `/etc/hosts` that names it
    /// (as the kubelet writes one; TorchServe's `Hostname` label is `InetAddress.getLocalHost()`), and
    /// `dir/pod-tmp` mounted on `/tmp`, so that each pod's worker sockets (`/tmp/.ts.sock.<port>`, the
    /// default `java.io.tmpdir`) and unpacked archives (`/tmp/models/`) are its own.
    pub fn for_pod(&self, dir: &Path, hostname: &str) -> Result<TorchServeHome> {
        if !self.python().exists() {
            bail!(
                "TorchServe is not set up in {} (run its setup first)",
                self.home.display()
            );
        }
        let venv = self.home.join("venv");
        let venv = venv
            .canonicalize()
            .with_context(|| format!("resolving {}", venv.display()))?;
        let store = dir.join("model-store");
        for d in [&store, &dir.join("pod-tmp")] {
            fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let link = dir.join("venv");
        if fs::read_link(&link).ok().as_deref() != Some(venv.as_path()) {
            let _ = fs::remove_file(&link);
            std::os::unix::fs::symlink(&venv, &link)
                .with_context(|| format!("linking {} to {}", link.display(), venv.display()))?;
        }
        let shared_store = self.home.join("model-store");
        for entry in fs::read_dir(&shared_store)
            .with_context(|| format!("listing {}", shared_store.display()))?
        {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "mar") {
                let to = store.join(path.file_name().context("archive without a name")?);
                fs::copy(&path, &to)
                    .with_context(|| format!("copying {} to {}", path.display(), to.display()))?;
            }
        }
        let config = self.scripts.join("config.properties");
        let mut text =
            fs::read_to_string(&config).with_context(|| format!("reading {}", config.display()))?;
        text.push_str(
            "# A pod's frontend: a small heap, so that several fit on the machine at once.\n\
             vmargs=-Xmx256m -XX:+UseSerialGC\n",
        );
        fs::write(dir.join("config.properties"), text).context("writing the pod's config")?;
        fs::write(
            dir.join("pod-hosts"),
            format!("127.0.0.1 localhost\n127.0.0.1 {hostname}\n"),
        )
        .context("writing the pod's /etc/hosts")?;
        Ok(TorchServeHome {
            scripts: self.scripts.clone(),
            home: dir.to_path_buf(),
            pod: Some(hostname.to_owned()),
        })
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
        let mut run = match &self.pod {
            None => Command::new("bash"),
            Some(hostname) => {
                // The pod's namespaces live as long as the frontend: run.sh's `torchserve --start`
                // leaves it running in them after `unshare` itself has exited.
                // Anything this checkout needs that lives under /tmp (a CI clone in /tmp/<dir>) is
                // bound into the pod's own /tmp first, or the pod's /tmp would hide it.
                let keep: std::collections::BTreeSet<PathBuf> = [
                    crate::workspace_root(),
                    crate::target_dir(),
                    self.home.clone(),
                    self.scripts.clone(),
                ]
                .iter()
                .filter_map(|p| {
                    let rest = p.strip_prefix("/tmp").ok()?;
                    let first = rest.components().next()?;
                    Some(Path::new("/tmp").join(first))
                })
                .collect();
                let keep: Vec<String> = keep
                    .iter()
                    .map(|p| p.to_string_lossy().into_owned())
                    .collect();
                let mut c = Command::new("unshare");
                c.args(["--uts", "--net", "--mount", "bash", "-c"])
                    .arg(
                        "set -e; ip link set lo up; hostname \"$1\"; \
                         mount --bind \"$2\" /etc/hosts; pod_tmp=\"$3\"; \
                         for k in $4; do mkdir -p \"$pod_tmp/${k#/tmp/}\"; \
                           mount --bind \"$k\" \"$pod_tmp/${k#/tmp/}\"; done; \
                         mount --rbind \"$pod_tmp\" /tmp; \
                         shift 4; exec bash \"$@\"",
                    )
                    .arg("pod")
                    .arg(hostname)
                    .arg(self.home.join("pod-hosts"))
                    .arg(self.home.join("pod-tmp"))
                    .arg(keep.join(" "));
                c
            }
        };
        run_logged(
            run.arg(self.scripts.join("run.sh")).arg(&self.home),
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

    /// The hostname TorchServe runs under: its pod's, or the machine's.
    pub fn hostname(&self) -> Result<String> {
        match &self.home.pod {
            Some(h) => Ok(h.clone()),
            None => Ok(fs::read_to_string("/proc/sys/kernel/hostname")
                .context("reading the hostname")?
                .trim()
                .to_owned()),
        }
    }

    /// Runs `f` where TorchServe's loopback addresses reach it: on a thread inside its pod's network
    /// namespace, or right here when it runs in the machine's own.
    pub fn in_netns<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        match self.home.pod {
            Some(_) => netns::run_in(self.pid, f),
            None => f(),
        }
    }

    /// Waits (at most `timeout`) until no client connection to TorchServe's HTTP ports is still open on
    /// TorchServe's side (ESTABLISHED or CLOSE_WAIT in its network namespace's TCP tables): e.g. run.sh's
    /// /ping, closed by the client, may not be closed by Netty yet. Then the connections TorchServe holds
    /// are its own (to its workers), a baseline for the kernel's connection state.
    pub fn wait_clients_gone(&self, timeout: Duration) -> Result<()> {
        let ports = [INFERENCE_PORT, MANAGEMENT_PORT, METRICS_PORT];
        let open = || -> usize {
            ["net/tcp", "net/tcp6"]
                .iter()
                .filter_map(|t| fs::read_to_string(format!("/proc/{}/{t}", self.pid)).ok())
                .map(|text| {
                    text.lines()
                        .skip(1)
                        .filter(|l| {
                            let f: Vec<&str> = l.split_whitespace().collect();
                            let port = f
                                .get(1)
                                .and_then(|a| a.rsplit(':').next())
                                .and_then(|p| u16::from_str_radix(p, 16).ok());
                            port.is_some_and(|p| ports.contains(&p))
                                && matches!(f.get(3), Some(&"01") | Some(&"08"))
                        })
                        .count()
                })
                .sum()
        };
        let deadline = Instant::now() + timeout;
        loop {
            let n = open();
            if n == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{n} client connections to TorchServe {} still open after {timeout:?}",
                    self.pid
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// TorchServe's own `GET /metrics{query}` body. Note: TorchServe counts every scrape in Requests2XX
    /// once the body is rendered, so a scrape shows the earlier scrapes but not itself (FACTS.md §3).
    pub fn scrape_text(&self, query: &str) -> Result<String> {
        let (addr, path) = (self.metrics_addr(), format!("/metrics{query}"));
        let r = self.in_netns(move || http::get(addr, &path, Duration::from_secs(10)))?;
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

    /// A management API call (any method, no body); the parsed JSON body of its 200.
    pub fn manage(&self, method: &str, path: &str) -> Result<Value> {
        let addr = self.management_addr();
        let raw = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n");
        let r = self
            .in_netns(move || http::request(addr, raw.as_bytes(), MANAGEMENT_TIMEOUT))
            .with_context(|| format!("{method} {path}"))?;
        if r.status != 200 {
            bail!("{method} {path} answered {}: {}", r.status, r.text());
        }
        serde_json::from_slice(&r.body).with_context(|| format!("{method} {path}: not JSON"))
    }

    /// Registers the e2e suites' models beyond run.sh's three: `echo` version 2.0 (one worker; echo 1.0
    /// stays the default version, the first registered) and [`E2E_BATCHED`], in
    /// [`E2E_REGISTRATION_RESPONSES`] management calls.
    pub fn register_e2e_models(&self) -> Result<()> {
        self.manage(
            "POST",
            &format!("/models?url={ECHO_V2_ARCHIVE}&initial_workers=1&synchronous=true"),
        )?;
        E2E_BATCHED.register(self)?;
        // The default version decides what `/predictions/echo` runs; the tests' counts do not depend
        // on it (its label is `default` either way), but a registration that moved it would be a
        // changed TorchServe worth knowing about.
        let default = self.manage("GET", "/models/echo")?;
        let version = default[0]["modelVersion"].as_str().unwrap_or_default();
        if version != "1.0" {
            bail!("echo's default version is {version:?} after registering 2.0, expected \"1.0\"");
        }
        Ok(())
    }

    /// `[METRICS]` lines TorchServe logged (prometheus mode: ts_log.log, `result=[METRICS]…`), distinct,
    /// for `metric` and `model`, with their values, in log order. Workers print one PredictionTime line
    /// per batch: TorchServe's own count of a model's batches.
    pub fn logged_metric_lines(&self, metric: &str, model: &str) -> Result<Vec<(String, f64)>> {
        let path = self.home.home.join("logs/ts_log.log");
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let mut seen = std::collections::BTreeSet::new();
        let mut out = Vec::new();
        for line in text.lines() {
            let Some(at) = line.find("result=[METRICS]") else {
                continue;
            };
            let m = &line[at + "result=[METRICS]".len()..];
            let m = m.split(", pattern=").next().unwrap_or(m);
            if !m.starts_with(&format!("{metric}.")) || !m.contains(&format!("ModelName:{model},"))
            {
                continue;
            }
            let value: f64 = m
                .split_once(':')
                .and_then(|(_, r)| r.split('|').next())
                .with_context(|| format!("no value in {m:?}"))?
                .parse()
                .with_context(|| format!("bad value in {m:?}"))?;
            if seen.insert(m.to_owned()) {
                out.push((m.to_owned(), value));
            }
        }
        Ok(out)
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

/// A model registered with batching through the management API.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// The name it is registered (and requested) under.
    pub name: &'static str,
    /// An archive in the model store.
    pub archive: &'static str,
    pub batch_size: usize,
    pub max_batch_delay_ms: u64,
    pub workers: usize,
}

impl Batching {
    /// `POST /models?url=…&model_name=…&batch_size=…&max_batch_delay=…&initial_workers=…`, waiting
    /// until the workers are loaded.
    pub fn register(&self, ts: &TorchServe) -> Result<Value> {
        ts.manage(
            "POST",
            &format!(
                "/models?url={}&model_name={}&batch_size={}&max_batch_delay={}&initial_workers={}&synchronous=true",
                self.archive, self.name, self.batch_size, self.max_batch_delay_ms, self.workers
            ),
        )
    }
}

/// `n` concurrent inference requests to `model` (`POST /predictions/<model>`, each on its own
/// connection, bodies `req <i>`); each must answer 200 with its own body (the e2e models echo), so a
/// batch's replies reached the right clients.
pub fn burst(addr: SocketAddr, model: &str, n: usize) -> Result<()> {
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let path = format!("/predictions/{model}");
            std::thread::spawn(move || {
                let body = format!("req {i}");
                let r = http::post(addr, &path, body.as_bytes(), Duration::from_secs(30))?;
                Ok::<_, anyhow::Error>((body, r))
            })
        })
        .collect();
    for h in handles {
        let (body, r) = h
            .join()
            .map_err(|_| anyhow::anyhow!("request thread panicked"))??;
        if r.status != 200 || r.body != body.as_bytes() {
            bail!("{model}: {body:?} answered {} {:?}", r.status, r.text());
        }
    }
    Ok(())
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

/// Every difference between what TorchServe counted under `hostname` (`own`: its scrape of itself) and
/// what the agent reports under it (`agent`, scraped later): Requests2XX/4XX/5XX, ts_inference_requests_total
/// per model and version, and any servescope family that counts lost or unparsable traffic. The agent
/// has `own_scrapes` more 2XX: TorchServe counts a scrape of itself only once it has rendered it
/// (FACTS.md §3), the agent as soon as the response leaves.
pub fn count_differences(
    own: &Metrics,
    agent: &Metrics,
    hostname: &str,
    own_scrapes: f64,
) -> Vec<String> {
    let mut diff = Vec::new();
    let host = [("Level", "Host"), ("Hostname", hostname)];
    for family in ["Requests2XX", "Requests4XX", "Requests5XX"] {
        let extra = if family == "Requests2XX" {
            own_scrapes
        } else {
            0.0
        };
        let want = own.get(family, &host).unwrap_or(0.0) + extra;
        let got = agent.get(family, &host).unwrap_or(0.0);
        if got != want {
            diff.push(format!(
                "{family}{{Hostname={hostname}}}: servescope {got}, want {want}"
            ));
        }
    }
    let per_model = |m: &Metrics| {
        m.series("ts_inference_requests_total")
            .filter(|(s, _)| s.label("hostname") == Some(hostname))
            .map(|(s, v)| {
                let l = |k| s.label(k).unwrap_or_default().to_owned();
                ((l("model_name"), l("model_version")), v)
            })
            .collect::<BTreeMap<_, _>>()
    };
    let (want, got) = (per_model(own), per_model(agent));
    if want != got {
        diff.push(format!(
            "ts_inference_requests_total{{hostname={hostname}}}: servescope {got:?}, want {want:?}"
        ));
    }
    for family in [
        "servescope_kernel_lost_events_total",
        "servescope_http_parse_errors_total",
        "servescope_unmatched_responses_total",
        "servescope_decode_errors_total",
        "servescope_kernel_framing_mismatches_total",
    ] {
        if agent.sum(family) != 0.0 {
            diff.push(format!("{family} = {}", agent.sum(family)));
        }
    }
    diff
}
