//! Every PromQL expression in `deploy/` — recording rules, alert rules, Grafana panels and variables —
//! evaluated by a real Prometheus (Debian's /usr/bin/prometheus) scraping the agent that watches a real
//! TorchServe, with the shipped prometheus.yml and rule files.
//!
//! The traffic is a small known mix sent three times: once before Prometheus starts (so that every
//! series exists from Prometheus's first scrape on) and twice while it scrapes every second. All series
//! then share their first and last sample timestamps, so Prometheus extrapolates every rate() by the same
//! factor and the ratios the rules compute (error shares) are exact; the counters themselves are compared
//! exactly with the agent's own /metrics and with what was sent.
//!
//! Needs root (the agent loads BPF) and TorchServe's fixed ports; bounded to well under a minute.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;
use servescope_integration::{
    Agent, Metrics, ServerProcess, TorchServe, TorchServeHome, ensure_kernel_prereqs, http,
    log_dir, require_root,
    torchserve::{E2E_BATCHED, E2E_REGISTRATION_RESPONSES, burst, loopback},
    workspace_root,
};

const AGENT_PORT: u16 = 9082;
/// Prometheus scrapes and evaluates rules this often (the shipped config says 15 s).
const INTERVAL_SECS: u64 = 1;
/// Grafana's `$__rate_interval` in the panels: the whole test fits in this window.
const RATE_INTERVAL: &str = "1m";
/// How long a figure may take to show up in Prometheus once the agent has it (scrape + rule evaluation).
const PROPAGATION: Duration = Duration::from_secs(15);

/// One round of the mix, per request kind: (what, method+path, extra header, status, count). Sent
/// one after the other, then [`BURST`].
const ROUND: [(&str, &str, &str, u16, usize); 8] = [
    ("echo", "/predictions/echo", "", 200, 10),
    ("echo 1.0", "/predictions/echo/1.0", "", 200, 3),
    // The second version of echo (registered over the management API; 1.0 stays the default).
    ("echo 2.0", "/predictions/echo/2.0", "", 200, 3),
    ("slow", "/predictions/slow", "", 200, 2),
    ("fail", "/predictions/fail", "", 503, 3),
    ("unknown model", "/predictions/nosuchmodel", "", 404, 2),
    // A status the handler sets: counted as an inference, timed, status class 4xx.
    (
        "echo 422",
        "/predictions/echo",
        "x-echo-status: 422\r\n",
        422,
        1,
    ),
    ("ping", "/ping", "", 200, 1),
];
/// Per round, concurrent requests to the batching model (one worker): two full batches, then a half
/// one that waits out max_batch_delay. All 200, each timed; batch sizes are counted per batch.
const BURST: usize = 2 * E2E_BATCHED.batch_size + E2E_BATCHED.batch_size / 2;
/// Rounds sent in all (one before Prometheus starts, two while it scrapes).
const ROUNDS: usize = 3;

#[test]
fn every_deploy_query_returns_the_expected_series() -> Result<()> {
    require_root()?;
    ensure_kernel_prereqs()?;
    Agent::binary()?;
    let started = Instant::now();
    let logs = log_dir("prometheus_e2e")?;
    let home = TorchServeHome::default();
    home.setup(&logs.join("torchserve-setup.log"))?;
    let ts = home.start(&logs)?;
    let hostname = fs::read_to_string("/proc/sys/kernel/hostname")?
        .trim()
        .to_owned();

    // Request logs on, so that the sinks' health series exist for the dashboard's panel.
    let request_log = logs.join("requests.jsonl");
    let latency_csv = logs.join("latency.csv");
    let agent = Agent::start(
        &logs,
        loopback(AGENT_PORT),
        &[
            "--sample-interval-secs",
            "1",
            "--request-log",
            &request_log.to_string_lossy(),
            "--latency-csv",
            &latency_csv.to_string_lossy(),
            // The dashboard's cost panel reads the programs' run time, counted only with this.
            "--bpf-stats",
        ],
    )?;
    agent.wait_ready(Duration::from_secs(15))?;
    // Echo's second version and the batching model, registered while the agent runs so that it sees
    // their workers load (as a user's agent would); the responses count in Requests2XX.
    ts.register_e2e_models()?;

    // Round 1, before Prometheus: creates every series the mix creates.
    send_round(&ts)?;
    settle(&agent, 1)?;
    let prometheus = Prometheus::start(&logs, agent.listen())?;
    prometheus.wait_for_scrapes(2)?;
    for round in 2..=ROUNDS {
        send_round(&ts)?;
        settle(&agent, round)?;
        // At least one scrape between rounds, so that each round is a step of the counters.
        thread::sleep(Duration::from_secs(2 * INTERVAL_SECS));
    }
    let agent_m = agent.scrape()?;
    fs::write(logs.join("servescope_metrics.txt"), agent.scrape_text("")?)?;
    // Prometheus has the final counts (and the rules have run on them).
    prometheus.wait_until("sum(Requests2XX) as the agent has it", |p| {
        Ok(p.scalar("sum(Requests2XX)")? == Some(agent_m.sum("Requests2XX")))
    })?;
    thread::sleep(Duration::from_secs(2 * INTERVAL_SECS));

    let mut report = String::new();
    let mut failures = Vec::new();
    check_counters(&prometheus, &agent_m, &hostname, &mut report, &mut failures)?;
    check_batches(&prometheus, &agent_m, &ts, &mut report, &mut failures)?;
    check_every_expression(&prometheus, &agent_m, &hostname, &mut report, &mut failures)?;
    check_rule_health(&prometheus, &mut report, &mut failures)?;
    check_openmetrics_negotiated(&prometheus, &mut report, &mut failures)?;
    record_agent_footprint(&agent, &mut report);
    let _ = writeln!(report, "took {:.1?}", started.elapsed());
    eprintln!("{report}");
    fs::write(logs.join("report.txt"), &report)?;
    if !failures.is_empty() {
        bail!(
            "{} check(s) failed:\n  {}\n(logs, the agent's scrape and Prometheus's data: {})",
            failures.len(),
            failures.join("\n  "),
            logs.display()
        );
    }
    drop(prometheus);
    let status = agent.stop()?;
    ensure!(status.success(), "servescope exited with {status}");
    ts.stop();
    Ok(())
}

// ---- traffic ----------------------------------------------------------------------------------------

fn send_round(ts: &TorchServe) -> Result<()> {
    for (what, path, header, status, count) in ROUND {
        for _ in 0..count {
            let body = b"prometheus-e2e";
            let raw = if path == "/ping" {
                format!(
                    "GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n",
                    ts.inference_addr()
                )
                .into_bytes()
            } else {
                let mut raw = format!(
                    "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\n{header}Content-Length: {}\r\n\r\n",
                    ts.inference_addr(),
                    body.len()
                )
                .into_bytes();
                raw.extend_from_slice(body);
                raw
            };
            let r = http::request(ts.inference_addr(), &raw, Duration::from_secs(10))
                .with_context(|| format!("{what}: {path}"))?;
            ensure!(
                r.status == status,
                "{what}: {path} answered {} {:?}, expected {status}",
                r.status,
                r.text()
            );
        }
    }
    burst(ts.inference_addr(), E2E_BATCHED.name, BURST)
}

/// Per round: responses by class, inferences by (model, version), timed inferences by (model, version,
/// status class).
fn per_round(class: &str) -> f64 {
    let burst = if class == "2xx" { BURST as f64 } else { 0.0 };
    burst
        + ROUND
            .iter()
            .filter(|(_, _, _, status, _)| status_class(*status) == class)
            .map(|(.., n)| *n as f64)
            .sum::<f64>()
}

/// Responses of a class since the agent started, after `rounds` rounds: the registrations are 200s.
fn sent_since_start(class: &str, rounds: usize) -> f64 {
    let registrations = if class == "2xx" {
        E2E_REGISTRATION_RESPONSES
    } else {
        0.0
    };
    registrations + rounds as f64 * per_round(class)
}

fn status_class(status: u16) -> &'static str {
    match status {
        200..=299 => "2xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Waits until the agent has counted `rounds` rounds.
fn settle(agent: &Agent, rounds: usize) -> Result<()> {
    agent.wait_until(
        Duration::from_secs(10),
        &format!("{rounds} round(s) counted"),
        |m| {
            m.sum("Requests2XX") == sent_since_start("2xx", rounds)
                && m.sum("Requests4XX") == sent_since_start("4xx", rounds)
                && m.sum("Requests5XX") == sent_since_start("5xx", rounds)
        },
    )?;
    Ok(())
}

// ---- Prometheus -------------------------------------------------------------------------------------

/// Debian's Prometheus, with deploy/prometheus/prometheus.yml adapted to the test: 1 s intervals, the
/// agent's address as target, absolute rule-file paths, and the Kubernetes job's metric relabeling
/// (which copies Hostname/hostname into `pod`) so that it is proven on real data too.
struct Prometheus {
    _server: ServerProcess,
    addr: SocketAddr,
}

impl Prometheus {
    fn start(logs: &Path, agent: SocketAddr) -> Result<Self> {
        let dir = workspace_root().join("deploy/prometheus");
        let mut config: Yaml =
            serde_yaml::from_str(&fs::read_to_string(dir.join("prometheus.yml"))?)?;
        let global = config
            .get_mut("global")
            .and_then(Yaml::as_mapping_mut)
            .context("prometheus.yml: global")?;
        global.insert("scrape_interval".into(), format!("{INTERVAL_SECS}s").into());
        global.insert(
            "evaluation_interval".into(),
            format!("{INTERVAL_SECS}s").into(),
        );
        let rule_files = config
            .get_mut("rule_files")
            .and_then(Yaml::as_sequence_mut)
            .context("prometheus.yml: rule_files")?;
        for f in rule_files.iter_mut() {
            let rel = f.as_str().context("rule file")?;
            *f = dir.join(rel).to_string_lossy().into_owned().into();
        }
        let k8s: Yaml =
            serde_yaml::from_str(&fs::read_to_string(dir.join("scrape-kubernetes.yml"))?)?;
        let relabel = k8s["scrape_configs"][0]["metric_relabel_configs"].clone();
        ensure!(
            relabel.is_sequence(),
            "scrape-kubernetes.yml has no metric_relabel_configs"
        );
        let jobs = config
            .get_mut("scrape_configs")
            .and_then(Yaml::as_sequence_mut)
            .context("prometheus.yml: scrape_configs")?;
        ensure!(jobs.len() == 1, "prometheus.yml: one job expected");
        let job = jobs[0].as_mapping_mut().context("job")?;
        ensure!(job.get("job_name").and_then(Yaml::as_str) == Some("servescope"));
        job.insert(
            "static_configs".into(),
            serde_yaml::from_str(&format!("[{{targets: ['{agent}']}}]"))?,
        );
        job.insert("metric_relabel_configs".into(), relabel);
        let config_path = logs.join("prometheus.yml");
        fs::write(&config_path, serde_yaml::to_string(&config)?)?;

        // A free port (bound and released: Prometheus binds it a moment later).
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let args: Vec<String> = vec![
            format!("--config.file={}", config_path.display()),
            format!("--storage.tsdb.path={}", logs.join("tsdb").display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
            "--storage.tsdb.retention.time=1h".to_owned(),
            "--log.level=warn".to_owned(),
        ];
        let server = ServerProcess::start(
            logs,
            "prometheus",
            port,
            "/usr/bin/prometheus",
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        )?;
        let p = Prometheus {
            _server: server,
            addr: loopback(port),
        };
        p.wait_until("Prometheus ready", |p| {
            Ok(http::get(p.addr, "/-/ready", Duration::from_secs(5))?.status == 200)
        })?;
        Ok(p)
    }

    /// `GET /api/v1/...` as JSON; an error unless `status` is `success`.
    fn api(&self, path: &str) -> Result<Json> {
        let r = http::get(self.addr, path, Duration::from_secs(10))?;
        let body: Json = serde_json::from_slice(&r.body)
            .with_context(|| format!("Prometheus {path}: not JSON: {}", r.text()))?;
        if body["status"] != "success" {
            bail!("Prometheus {path} answered {}: {body}", r.status);
        }
        Ok(body["data"].clone())
    }

    /// An instant query: its result vector as (labels without __name__, value).
    fn query(&self, promql: &str) -> Result<Vec<Sample>> {
        let data = self.api(&format!("/api/v1/query?query={}", encode(promql)))?;
        let result = data["result"].as_array().context("query result")?;
        match data["resultType"].as_str() {
            Some("vector") => {}
            Some("scalar") => {
                return Ok(vec![Sample {
                    labels: BTreeMap::new(),
                    value: parse_value(&data["result"][1])?,
                }]);
            }
            other => bail!("unexpected result type {other:?} for {promql}"),
        }
        result
            .iter()
            .map(|s| {
                let labels = s["metric"]
                    .as_object()
                    .context("metric")?
                    .iter()
                    .filter(|(k, _)| *k != "__name__")
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect();
                Ok(Sample {
                    labels,
                    value: parse_value(&s["value"][1])?,
                })
            })
            .collect()
    }

    /// The single value of a query that returns at most one series.
    fn scalar(&self, promql: &str) -> Result<Option<f64>> {
        let r = self.query(promql)?;
        ensure!(r.len() <= 1, "{promql} returned {} series", r.len());
        Ok(r.first().map(|s| s.value))
    }

    fn wait_for_scrapes(&self, n: usize) -> Result<()> {
        self.wait_until(&format!("{n} scrapes of the agent"), |p| {
            Ok(p.scalar(r#"count_over_time(up{job="servescope"}[1m])"#)?
                .is_some_and(|c| c >= n as f64))
        })
    }

    fn wait_until(&self, what: &str, done: impl Fn(&Prometheus) -> Result<bool>) -> Result<()> {
        let deadline = Instant::now() + PROPAGATION;
        loop {
            let last = done(self);
            if matches!(last, Ok(true)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("Prometheus did not reach `{what}` within {PROPAGATION:?} (last: {last:?})");
            }
            thread::sleep(Duration::from_millis(200));
        }
    }
}

#[derive(Debug, Clone)]
struct Sample {
    labels: BTreeMap<String, String>,
    value: f64,
}

fn parse_value(v: &Json) -> Result<f64> {
    let s = v.as_str().context("sample value")?;
    Ok(match s {
        "NaN" => f64::NAN,
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        _ => s.parse().with_context(|| format!("bad value {s:?}"))?,
    })
}

/// Percent-encoding for a query string value (RFC 3986 unreserved characters pass).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// ---- exact counters ---------------------------------------------------------------------------------

/// Prometheus holds exactly the agent's counters, which are exactly what was sent.
fn check_counters(
    p: &Prometheus,
    agent: &Metrics,
    hostname: &str,
    report: &mut String,
    failures: &mut Vec<String>,
) -> Result<()> {
    let _ = writeln!(report, "counters (Prometheus = agent = sent):");
    let rounds = ROUNDS as f64;
    let mut exact = |what: String, got: Option<f64>, agent_v: f64, sent: Option<f64>| {
        let ok = got == Some(agent_v) && sent.is_none_or(|s| s == agent_v);
        let _ = writeln!(
            report,
            "  {} {what}: Prometheus {got:?} agent {agent_v} sent {sent:?}",
            if ok { "ok  " } else { "FAIL" }
        );
        if !ok {
            failures.push(format!(
                "{what}: Prometheus {got:?}, agent {agent_v}, sent {sent:?}"
            ));
        }
    };
    for (family, class) in [
        ("Requests2XX", "2xx"),
        ("Requests4XX", "4xx"),
        ("Requests5XX", "5xx"),
    ] {
        exact(
            format!("sum({family})"),
            p.scalar(&format!("sum({family})"))?,
            agent.sum(family),
            Some(sent_since_start(class, ROUNDS)),
        );
    }
    // Per model and version: inference requests, and the histogram's count per status class.
    let mut sent_requests: BTreeMap<(String, String), f64> = BTreeMap::new();
    let mut sent_timed: BTreeMap<(String, String, String), f64> = BTreeMap::new();
    for (_, path, _, status, n) in ROUND {
        let Some(rest) = path.strip_prefix("/predictions/") else {
            continue;
        };
        let (model, version) = rest.split_once('/').unwrap_or((rest, "default"));
        if model == "nosuchmodel" {
            continue;
        }
        let key = (model.to_owned(), version.to_owned());
        *sent_requests.entry(key.clone()).or_default() += rounds * n as f64;
        // Frontend-made 503s (the failing handler) add no latency and no histogram sample.
        if model != "fail" {
            *sent_timed
                .entry((key.0, key.1, status_class(status).to_owned()))
                .or_default() += rounds * n as f64;
        }
    }
    let batched = (E2E_BATCHED.name.to_owned(), "default".to_owned());
    sent_requests.insert(batched.clone(), rounds * BURST as f64);
    sent_timed.insert(
        (batched.0, batched.1, "2xx".to_owned()),
        rounds * BURST as f64,
    );
    let by_model = |m: &Metrics, family: &str, model: &str, version: &str, class: Option<&str>| {
        m.series(family)
            .filter(|(s, _)| {
                s.label("model_name") == Some(model)
                    && s.label("model_version") == Some(version)
                    && class.is_none_or(|c| s.label("status_class") == Some(c))
            })
            .map(|(_, v)| v)
            .sum::<f64>()
    };
    for ((model, version), sent) in &sent_requests {
        let q = format!(
            r#"sum(ts_inference_requests_total{{model_name="{model}",model_version="{version}"}})"#
        );
        exact(
            q.clone(),
            p.scalar(&q)?,
            by_model(agent, "ts_inference_requests_total", model, version, None),
            Some(*sent),
        );
    }
    for ((model, version, class), sent) in &sent_timed {
        let q = format!(
            r#"sum(servescope_request_duration_seconds_count{{model_name="{model}",model_version="{version}",status_class="{class}"}})"#
        );
        exact(
            q.clone(),
            p.scalar(&q)?,
            by_model(
                agent,
                "servescope_request_duration_seconds_count",
                model,
                version,
                Some(class),
            ),
            Some(*sent),
        );
    }
    exact(
        "sum(ts_inference_latency_microseconds)".to_owned(),
        p.scalar("sum(ts_inference_latency_microseconds)")?,
        agent.sum("ts_inference_latency_microseconds"),
        None,
    );
    exact(
        "servescope_targets".to_owned(),
        p.scalar("sum(servescope_targets)")?,
        agent.sum("servescope_targets"),
        Some(1.0),
    );
    // The metric relabeling of scrape-kubernetes.yml / the ServiceMonitor: `pod` is TorchServe's
    // hostname on TorchServe's series, absent on the agent's own.
    let pods: BTreeSet<String> = p
        .query(r#"count by (pod) ({__name__=~"Requests2XX|ts_inference_requests_total|servescope_request_duration_seconds_count|CPUUtilization"})"#)?
        .into_iter()
        .map(|s| s.labels.get("pod").cloned().unwrap_or_default())
        .collect();
    let own = p.query("servescope_targets")?;
    let ok = pods == BTreeSet::from([hostname.to_owned()])
        && own.iter().all(|s| !s.labels.contains_key("pod"));
    let _ = writeln!(
        report,
        "  {} metric relabeling: pod labels on TorchServe series {pods:?}, none on servescope_targets",
        if ok { "ok  " } else { "FAIL" }
    );
    if !ok {
        failures.push(format!(
            "metric relabeling: pod values {pods:?} (want {{{hostname:?}}}), servescope_targets {own:?}"
        ));
    }
    Ok(())
}

/// The batching model's batch-size histogram reached Prometheus as the agent serves it, and the agent's
/// figures are TorchServe's: the batches hold every request sent (sum), there are as many as TorchServe's
/// worker logged PredictionTime lines (one per batch), fewer than requests (batching happened), and
/// none is larger than batch_size.
fn check_batches(
    p: &Prometheus,
    agent: &Metrics,
    ts: &TorchServe,
    report: &mut String,
    failures: &mut Vec<String>,
) -> Result<()> {
    let model = E2E_BATCHED.name;
    let _ = writeln!(
        report,
        "batch sizes of {model} (Prometheus = agent = TorchServe):"
    );
    let pick = |name: &str, le: Option<&str>| {
        agent
            .series(name)
            .filter(|(s, _)| s.label("model_name") == Some(model) && s.label("le") == le)
            .map(|(_, v)| v)
            .sum::<f64>()
    };
    let mut check = |what: String, ok: bool| {
        let _ = writeln!(report, "  {} {what}", mark(ok));
        if !ok {
            failures.push(what);
        }
    };
    let sent = (ROUNDS * BURST) as f64;
    let batches = ts.logged_metric_lines("PredictionTime", model)?.len() as f64;
    let (sum, count) = (
        pick("servescope_batch_size_sum", None),
        pick("servescope_batch_size_count", None),
    );
    for (family, agent_v, want) in [
        ("servescope_batch_size_sum", sum, sent),
        ("servescope_batch_size_count", count, batches),
    ] {
        let q = format!(r#"sum({family}{{model_name="{model}"}})"#);
        let got = p.scalar(&q)?;
        check(
            format!("{q}: Prometheus {got:?} agent {agent_v} TorchServe {want}"),
            got == Some(agent_v) && agent_v == want,
        );
    }
    check(
        format!("{count} batches for {sent} requests: batched"),
        count > 0.0 && count < sent,
    );
    // Every bucket, as Prometheus stores it (the agent's buckets are 1, 2, 4 … 512 and +Inf).
    let q = format!(r#"sum by (le) (servescope_batch_size_bucket{{model_name="{model}"}})"#);
    let stored: BTreeMap<String, f64> = p
        .query(&q)?
        .into_iter()
        .map(|s| (s.labels.get("le").cloned().unwrap_or_default(), s.value))
        .collect();
    let served: BTreeMap<String, f64> = agent
        .series("servescope_batch_size_bucket")
        .filter(|(s, _)| s.label("model_name") == Some(model))
        .map(|(s, v)| (s.label("le").unwrap_or_default().to_owned(), v))
        .collect();
    check(
        format!("{q}: Prometheus {stored:?} agent {served:?}"),
        !served.is_empty() && stored == served,
    );
    let le = E2E_BATCHED.batch_size.to_string();
    check(
        format!(
            "no batch above batch_size: le={le} holds {} of {count}",
            pick("servescope_batch_size_bucket", Some(&le))
        ),
        pick("servescope_batch_size_bucket", Some(&le)) == count,
    );
    Ok(())
}

// ---- every expression in deploy/ -------------------------------------------------------------------

/// One expression found in deploy/.
struct Found {
    id: String,
    promql: String,
    /// Grafana `label_values(selector, label)` variables are answered by the labels API, not a query.
    label_values: Option<(String, String)>,
}

/// Every expression in the rule files (alerts also without their threshold, so that a quiet alert is
/// not quiet because its query is empty) and in the dashboard, with Grafana's variables replaced by
/// what "All" means (`.*`) and `$__rate_interval` by a window that covers the whole test.
fn expressions() -> Result<Vec<Found>> {
    let mut out = Vec::new();
    let rules = workspace_root().join("deploy/prometheus/rules");
    let mut paths: Vec<PathBuf> = fs::read_dir(&rules)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yml"))
        .collect();
    paths.sort();
    for path in paths {
        let doc: Yaml = serde_yaml::from_str(&fs::read_to_string(&path)?)?;
        for group in doc["groups"].as_sequence().context("groups")? {
            for rule in group["rules"].as_sequence().context("rules")? {
                let expr = rule["expr"].as_str().context("expr")?.trim().to_owned();
                if let Some(name) = rule["record"].as_str() {
                    out.push(found(format!("record {name}"), expr));
                } else if let Some(name) = rule["alert"].as_str() {
                    if let Some(inner) = without_threshold(&expr) {
                        out.push(found(format!("alert {name} (no threshold)"), inner));
                    }
                    out.push(found(format!("alert {name}"), expr));
                }
            }
        }
    }
    let dash: Json = serde_json::from_str(&fs::read_to_string(
        workspace_root().join("deploy/grafana/servescope-dashboard.json"),
    )?)?;
    let grafana = |s: &str| {
        s.replace("$__rate_interval", RATE_INTERVAL)
            .replace("$hostname", ".*")
            .replace("$model", ".*")
    };
    for p in dash["panels"].as_array().context("panels")? {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(found(
                format!(
                    "panel {} / {}",
                    p["title"].as_str().unwrap_or("?"),
                    t["refId"].as_str().unwrap_or("?")
                ),
                grafana(t["expr"].as_str().context("expr")?),
            ));
        }
    }
    for v in dash["templating"]["list"]
        .as_array()
        .context("templating")?
    {
        if v["type"] != "query" {
            continue;
        }
        let q = grafana(v["query"]["query"].as_str().context("variable query")?);
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .with_context(|| {
                format!(
                    "variable {}: only label_values() is supported: {q}",
                    v["name"]
                )
            })?;
        let (selector, label) = inner
            .rsplit_once(',')
            .context("label_values(selector, label)")?;
        out.push(Found {
            id: format!("variable {}", v["name"].as_str().unwrap_or("?")),
            promql: q.clone(),
            label_values: Some((selector.trim().to_owned(), label.trim().to_owned())),
        });
    }
    Ok(out)
}

fn found(id: String, promql: String) -> Found {
    Found {
        id,
        promql,
        label_values: None,
    }
}

/// `X > 0.05` → `X` (the last top-level comparison with a number); None when there is none.
fn without_threshold(expr: &str) -> Option<String> {
    let expr = expr.trim();
    let number_start = expr
        .rfind(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map_or(0, |i| i + 1);
    let (head, number) = expr.split_at(number_start);
    if number.is_empty() {
        return None;
    }
    let head = head.trim_end();
    ["==", "!=", ">=", "<=", ">", "<"]
        .iter()
        .find_map(|op| head.strip_suffix(op))
        .map(|h| h.trim_end().to_owned())
}

/// What a query must return on this traffic.
#[derive(Clone)]
struct Expect {
    /// Label names of every series (without `__name__`); `None`: the result must be empty.
    labels: Option<Vec<&'static str>>,
    /// The identifying label values of the series (model/version, reason, sink, le, ...), if fixed.
    keys: Option<Vec<String>>,
    /// Value of every series, with exceptions by key.
    value: V,
    per_key: Vec<(String, V)>,
    /// Why it is empty, for the report.
    why: &'static str,
}

#[derive(Clone, Copy, Debug)]
enum V {
    Any,
    Positive,
    Exact(f64),
    Range(f64, f64),
}

impl V {
    fn holds(self, v: f64) -> bool {
        match self {
            V::Any => !v.is_nan(),
            V::Positive => v > 0.0 && v.is_finite(),
            // Ratios of rates are exact up to floating-point rounding.
            V::Exact(x) => (v - x).abs() <= 1e-9 * x.abs().max(1.0),
            V::Range(lo, hi) => (lo..=hi).contains(&v),
        }
    }
}

fn series(labels: &[&'static str], value: V) -> Expect {
    Expect {
        labels: Some(labels.to_vec()),
        keys: None,
        value,
        per_key: Vec::new(),
        why: "",
    }
}

fn empty(why: &'static str) -> Expect {
    Expect {
        labels: None,
        keys: None,
        value: V::Any,
        per_key: Vec::new(),
        why,
    }
}

impl Expect {
    fn keys(mut self, keys: &[&str]) -> Self {
        self.keys = Some(keys.iter().map(|k| (*k).to_owned()).collect());
        self
    }

    fn with(mut self, key: &str, v: V) -> Self {
        self.per_key.push((key.to_owned(), v));
        self
    }
}

/// Labels that identify a series within a result, in this order.
const KEY_LABELS: [&str; 6] = [
    "model_name",
    "model_version",
    "reason",
    "sink",
    "le",
    "DeviceId",
];

fn key_of(s: &Sample) -> String {
    KEY_LABELS
        .iter()
        .filter_map(|l| s.labels.get(*l).map(String::as_str))
        .collect::<Vec<_>>()
        .join("/")
}

/// The expectation of every expression, by id. Label sets: `sum by (...)` keeps exactly its labels;
/// a plain selector keeps the series' labels plus `instance`, `job` and (metric relabeling) `pod`.
fn expectations(agent: &Metrics) -> BTreeMap<String, Expect> {
    const MODELS: [&str; 6] = [
        "batched/default",
        "echo/1.0",
        "echo/2.0",
        "echo/default",
        "fail/default",
        "slow/default",
    ];
    // `fail` never adds latency, so it has no latency or histogram series.
    const TIMED: [&str; 5] = [
        "batched/default",
        "echo/1.0",
        "echo/2.0",
        "echo/default",
        "slow/default",
    ];
    let share_5xx = per_round("5xx") / (per_round("2xx") + per_round("4xx") + per_round("5xx"));
    let host = ["Hostname", "Level", "instance", "job", "pod"];
    let gpu = agent.has("GPUMemoryUsed");
    let gpu_series = |labels: &[&'static str]| {
        if gpu {
            series(labels, V::Any)
        } else {
            empty("no NVIDIA GPU on this machine: the agent prints no GPU samples")
        }
    };
    let mm = ["model_name", "model_version"];
    let mmh = ["hostname", "model_name", "model_version"];
    // Seconds. `slow` sleeps 200 ms, so its figures cannot be below 0.1 s; `echo` is fast but the bound
    // is loose, since a busy 2-CPU machine delays Netty and the worker (seen: p99 0.49 s).
    let latency = |e: Expect| {
        e.keys(&TIMED)
            .with("slow/default", V::Range(0.1, 2.5))
            .with("echo/default", V::Range(0.0, 2.5))
            .with("echo/1.0", V::Range(0.0, 2.5))
            .with("echo/2.0", V::Range(0.0, 2.5))
            // Two of each burst's requests wait out the 500 ms max_batch_delay.
            .with("batched/default", V::Range(0.0, 2.5))
    };
    let lost_reasons = ["args_map_full", "conn_map_full", "ringbuf_full"];
    let sinks = ["latency_csv", "request_log"];
    let mut e: BTreeMap<String, Expect> = BTreeMap::new();
    let mut put = |id: &str, x: Expect| {
        e.insert(id.to_owned(), x);
    };

    // Recording rules.
    for class in ["2xx", "4xx", "5xx"] {
        put(
            &format!("record torchserve:requests_{class}:rate5m"),
            series(&["Hostname"], V::Positive),
        );
    }
    put(
        "record torchserve:requests:rate5m",
        series(&["Hostname"], V::Positive),
    );
    put(
        "record torchserve:error_ratio:rate5m",
        series(&["Hostname"], V::Exact(share_5xx)),
    );
    put(
        "record torchserve:inference_requests:rate1m",
        series(&mmh, V::Positive).keys(&MODELS),
    );
    put(
        "record torchserve:inference_error_ratio:rate5m",
        series(&mmh, V::Exact(0.0))
            .keys(&MODELS)
            .with("fail/default", V::Exact(1.0)),
    );
    put(
        "record torchserve:inference_latency_seconds:avg5m",
        latency(series(&mmh, V::Any)),
    );
    for q in ["p50", "p90", "p99"] {
        put(
            &format!("record servescope:request_duration_seconds:{q}_5m"),
            latency(series(&mmh, V::Any)),
        );
    }

    // Alerts: those that must fire here (as pending: their `for` has not elapsed), and those that must
    // stay quiet, each with its query without the threshold.
    put(
        "alert TorchServeHighErrorRate",
        series(&["Hostname"], V::Exact(share_5xx)),
    );
    put(
        "alert TorchServeHighErrorRate (no threshold)",
        series(&["Hostname"], V::Exact(share_5xx)),
    );
    put(
        "alert TorchServeModelHighErrorRate",
        series(&mmh, V::Exact(1.0)).keys(&["fail/default"]),
    );
    put(
        "alert TorchServeModelHighErrorRate (no threshold)",
        series(&mmh, V::Exact(0.0))
            .keys(&MODELS)
            .with("fail/default", V::Exact(1.0)),
    );
    put(
        "alert TorchServeHighLatencyP99",
        empty("no model is slower than 2.5 s"),
    );
    put(
        "alert TorchServeHighLatencyP99 (no threshold)",
        latency(series(&mmh, V::Any)),
    );
    put("alert ServescopeDown", empty("the agent is up"));
    put(
        "alert ServescopeDown (no threshold)",
        series(&["instance", "job"], V::Exact(1.0)),
    );
    put("alert ServescopeAbsent", empty("the agent is scraped"));
    put(
        "alert ServescopeTargetsLost",
        empty("the agent traces TorchServe"),
    );
    put(
        "alert ServescopeTargetsLost (no threshold)",
        empty("servescope_targets is 1, so `servescope_targets == 0 and ...` is empty"),
    );
    put(
        "alert ServescopeKernelEventsLost",
        empty("nothing was lost"),
    );
    put(
        "alert ServescopeKernelEventsLost (no threshold)",
        series(&["instance", "job", "reason"], V::Exact(0.0)).keys(&lost_reasons),
    );
    put(
        "alert ServescopeRequestLogDropped",
        empty("no request-log record was dropped"),
    );
    put(
        "alert ServescopeRequestLogDropped (no threshold)",
        series(&["instance", "job", "sink"], V::Exact(0.0)).keys(&sinks),
    );

    // Dashboard panels.
    put(
        "panel Throughput: inference requests per second / A",
        series(&mm, V::Positive).keys(&MODELS),
    );
    for r in ["A", "B", "C"] {
        put(
            &format!("panel Responses per second by status class / {r}"),
            series(&[], V::Positive),
        );
    }
    put(
        "panel Error rate: 5xx share of responses / A",
        series(&["Hostname"], V::Exact(share_5xx)),
    );
    put(
        "panel Inference error rate by model / A",
        series(&mm, V::Exact(0.0))
            .keys(&MODELS)
            .with("fail/default", V::Exact(1.0)),
    );
    for r in ["A", "B", "C"] {
        put(
            &format!("panel Inference latency percentiles / {r}"),
            latency(series(&mm, V::Any)),
        );
    }
    put(
        "panel Mean inference latency / A",
        latency(series(&mm, V::Any)),
    );
    put(
        "panel Mean inference latency / B",
        latency(series(&mm, V::Any)),
    );
    put(
        "panel Latency distribution / A",
        series(&["le"], V::Range(0.0, f64::MAX)),
    );
    put(
        "panel CPU utilization / A",
        series(&host, V::Range(0.0, 100.0)),
    );
    put(
        "panel Memory utilization / A",
        series(&host, V::Range(0.0, 100.0)),
    );
    put(
        "panel Disk utilization / A",
        series(&host, V::Range(0.0, 100.0)),
    );
    for r in ["A", "B"] {
        put(
            &format!("panel Memory used and available / {r}"),
            series(&host, V::Positive),
        );
        put(
            &format!("panel Disk used and available / {r}"),
            series(&host, V::Positive),
        );
    }
    let gpu_labels = ["DeviceId", "Hostname", "Level", "instance", "job", "pod"];
    // One worker per model and version here; their CPU rate may be ~0 between rounds. Worker series
    // carry the version the worker loaded (its archive's), not the route's `default`: echo's two
    // workers are told apart, and `batched`'s worker has its registered name, not its archive's.
    const WORKERS: [&str; 5] = [
        "batched/1.0",
        "echo/1.0",
        "echo/2.0",
        "fail/1.0",
        "slow/1.0",
    ];
    put(
        "panel Worker CPU by model / A",
        series(&mmh, V::Any).keys(&WORKERS),
    );
    put(
        "panel Worker memory by model / A",
        series(&mmh, V::Positive).keys(&WORKERS),
    );
    put(
        "panel Worker memory by model / B",
        if gpu {
            series(&mmh, V::Any)
        } else {
            empty("no NVIDIA GPU on this machine: no worker GPU memory")
        },
    );
    put("panel GPU memory usage / A", gpu_series(&gpu_labels));
    put("panel GPU utilization / A", gpu_series(&gpu_labels));
    put("panel GPU utilization / B", gpu_series(&gpu_labels));
    put(
        "panel Traced processes / A",
        series(&["instance", "job"], V::Exact(1.0)),
    );
    put(
        "panel Kernel records lost / A",
        series(&["instance", "reason"], V::Exact(0.0)).keys(&lost_reasons),
    );
    // Clean traffic: nothing unparsable, every response paired.
    put(
        "panel HTTP parse errors and unmatched responses / A",
        series(&["instance"], V::Exact(0.0)),
    );
    put(
        "panel HTTP parse errors and unmatched responses / B",
        series(&["instance"], V::Exact(0.0)),
    );
    put(
        "panel Request-log records dropped / A",
        series(&["instance", "sink"], V::Exact(0.0)).keys(&sinks),
    );
    // The agent and its programs both work while traffic flows (the programs' time: --bpf-stats).
    put(
        "panel servescope cost: CPU / A",
        series(&["instance"], V::Positive),
    );
    put(
        "panel servescope cost: CPU / B",
        series(&["instance"], V::Positive),
    );
    put(
        "panel servescope cost: memory / A",
        series(&["instance", "job"], V::Positive),
    );
    e
}

fn check_every_expression(
    p: &Prometheus,
    agent: &Metrics,
    hostname: &str,
    report: &mut String,
    failures: &mut Vec<String>,
) -> Result<()> {
    let found = expressions()?;
    let mut expect = expectations(agent);
    let _ = writeln!(report, "{} expressions in deploy/:", found.len());
    for f in &found {
        if let Some((selector, label)) = &f.label_values {
            // Grafana's label_values(): the labels API with the selector as match[].
            let data = p.api(&format!(
                "/api/v1/label/{label}/values?match[]={}",
                encode(selector)
            ))?;
            let values: BTreeSet<String> = data
                .as_array()
                .context("label values")?
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect();
            let want: BTreeSet<String> = match f.id.as_str() {
                "variable hostname" => BTreeSet::from([hostname.to_owned()]),
                "variable model" => ["batched", "echo", "fail", "slow"]
                    .map(str::to_owned)
                    .into(),
                other => {
                    failures.push(format!("no expectation for {other}: add one"));
                    continue;
                }
            };
            let ok = values == want;
            let _ = writeln!(report, "  {} {}: {values:?}", mark(ok), f.id);
            if !ok {
                failures.push(format!(
                    "{}: {values:?}, expected {want:?} ({})",
                    f.id, f.promql
                ));
            }
            continue;
        }
        let Some(x) = expect.remove(&f.id) else {
            failures.push(format!(
                "no expectation for {:?} ({}): add one to expectations()",
                f.id, f.promql
            ));
            continue;
        };
        // Rules evaluate on their own schedule: retry briefly before calling a result wrong.
        let deadline = Instant::now() + Duration::from_secs(5);
        let (result, problems) = loop {
            let result = p.query(&f.promql).with_context(|| f.id.clone())?;
            let problems = judge(&x, &result, hostname);
            if problems.is_empty() || Instant::now() >= deadline {
                break (result, problems);
            }
            thread::sleep(Duration::from_millis(250));
        };
        let shown: Vec<String> = result
            .iter()
            .map(|s| {
                format!(
                    "{}={}",
                    if key_of(s).is_empty() {
                        "·".to_owned()
                    } else {
                        key_of(s)
                    },
                    s.value
                )
            })
            .collect();
        let _ = writeln!(
            report,
            "  {} {}: {}",
            mark(problems.is_empty()),
            f.id,
            if result.is_empty() {
                format!("empty ({})", x.why)
            } else {
                shown.join(" ")
            }
        );
        for problem in problems {
            failures.push(format!("{}: {problem}\n      query: {}", f.id, f.promql));
        }
    }
    for id in expect.keys() {
        failures.push(format!(
            "expectation {id:?} matches no expression in deploy/: remove or rename it"
        ));
    }
    Ok(())
}

/// What is wrong with `result` (nothing: empty list).
fn judge(x: &Expect, result: &[Sample], hostname: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(labels) = &x.labels else {
        if !result.is_empty() {
            problems.push(format!("expected no series ({}), got {result:?}", x.why));
        }
        return problems;
    };
    if result.is_empty() {
        problems.push("no series".to_owned());
        return problems;
    }
    let want: BTreeSet<&str> = labels.iter().copied().collect();
    for s in result {
        let got: BTreeSet<&str> = s.labels.keys().map(String::as_str).collect();
        if got != want {
            let problem = format!("labels {got:?}, expected {want:?}");
            if !problems.contains(&problem) {
                problems.push(problem);
            }
        }
        for l in ["Hostname", "hostname", "pod"] {
            if let Some(v) = s.labels.get(l)
                && v != hostname
            {
                problems.push(format!("{l}={v:?}, TorchServe's hostname is {hostname:?}"));
            }
        }
        let key = key_of(s);
        let v = x
            .per_key
            .iter()
            .find(|(k, _)| *k == key)
            .map_or(x.value, |(_, v)| *v);
        if !v.holds(s.value) {
            problems.push(format!("{key}: value {} does not satisfy {v:?}", s.value));
        }
    }
    if let Some(keys) = &x.keys {
        let got: BTreeSet<String> = result.iter().map(key_of).collect();
        let want: BTreeSet<String> = keys.iter().cloned().collect();
        if got != want {
            problems.push(format!("series {got:?}, expected {want:?}"));
        }
    }
    problems
}

/// Every rule evaluates without error, and exactly the two error-rate alerts are pending.
/// Prometheus asks for OpenMetrics first (its scrape `Accept`); the agent answering in it shows in
/// the types Prometheus recorded: `info` and `unknown` exist only in OpenMetrics (the Prometheus text
/// would have said gauge and counter), and the scrape succeeded only if the body ended in `# EOF`.
/// The series are TorchServe's names all the same (the counters above found them).
fn check_openmetrics_negotiated(
    p: &Prometheus,
    report: &mut String,
    failures: &mut Vec<String>,
) -> Result<()> {
    for (metric, want) in [
        ("servescope_build", "info"),
        ("Requests2XX", "unknown"),
        ("ts_inference_requests", "counter"),
    ] {
        let data = p.api(&format!("/api/v1/metadata?metric={metric}"))?;
        let got = data[metric][0]["type"]
            .as_str()
            .unwrap_or("(none)")
            .to_owned();
        let ok = got == want;
        let _ = writeln!(
            report,
            "{} OpenMetrics scrape: {metric} has type {got} (want {want})",
            mark(ok)
        );
        if !ok {
            failures.push(format!(
                "metadata of {metric}: {got}, want {want} (OpenMetrics not negotiated?): {data}"
            ));
        }
    }
    Ok(())
}

fn check_rule_health(
    p: &Prometheus,
    report: &mut String,
    failures: &mut Vec<String>,
) -> Result<()> {
    let data = p.api("/api/v1/rules")?;
    let mut pending = BTreeSet::new();
    let mut rules = 0;
    for g in data["groups"].as_array().context("groups")? {
        for r in g["rules"].as_array().context("rules")? {
            rules += 1;
            let name = r["name"].as_str().unwrap_or("?");
            if r["health"] != "ok" {
                failures.push(format!(
                    "rule {name}: health {} ({})",
                    r["health"], r["lastError"]
                ));
            }
            if r["type"] == "alerting" && r["state"] != "inactive" {
                pending.insert(format!("{name}={}", r["state"].as_str().unwrap_or("?")));
            }
        }
    }
    let want = BTreeSet::from([
        "TorchServeHighErrorRate=pending".to_owned(),
        "TorchServeModelHighErrorRate=pending".to_owned(),
    ]);
    let ok = pending == want;
    let _ = writeln!(
        report,
        "{} {rules} rules healthy; active alerts {pending:?}",
        mark(ok)
    );
    if !ok {
        failures.push(format!("active alerts {pending:?}, expected {want:?}"));
    }
    Ok(())
}

/// The agent's memory after the run, for the DaemonSet's resource figures.
fn record_agent_footprint(agent: &Agent, report: &mut String) {
    let status = fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap_or_default();
    let field = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .map(|l| l[k.len()..].trim().to_owned())
            .unwrap_or_default()
    };
    let _ = writeln!(
        report,
        "agent memory: VmRSS {} VmHWM {} (RssAnon {}, RssFile {}, RssShmem {})",
        field("VmRSS:"),
        field("VmHWM:"),
        field("RssAnon:"),
        field("RssFile:"),
        field("RssShmem:")
    );
}

fn mark(ok: bool) -> &'static str {
    if ok { "ok  " } else { "FAIL" }
}
