//! What operators install, in `deploy/`, is valid and does what its comments claim.
//!
//! - Every YAML and JSON file parses; the Kubernetes manifests pass the Kubernetes OpenAPI schema
//!   (kubernetes-validate from PyPI, strict: unknown fields fail) and structural checks of what a schema
//!   cannot see (the capability set, probes on the listen port, selectors that match, Kubernetes'
//!   allowPrivilegeEscalation/SYS_ADMIN rule).
//! - The Prometheus config and rules pass `promtool check config` / `check rules`, and
//!   `promtool test rules` unit-tests every alert and recording rule.
//! - The systemd unit passes `systemd-analyze verify` without a warning and `systemd-analyze security`
//!   rates it OK.
//! - Two root tests run the agent the way each deployment confines it — the unit's dynamic user,
//!   ambient capabilities and read-only file systems (under strace, to check the system-call filter,
//!   address families, namespaces and W^X the unit sets); the DaemonSet's capability set, read-only
//!   root and its own UTS namespace — against a server that runs as another user in another UTS
//!   namespace, as TorchServe does in a pod.
//!
//! The real-Prometheus end-to-end test of the queries is `prometheus_e2e.rs`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_yaml::Value;
use servescope_integration::{
    Agent, ServerProcess, ensure_kernel_prereqs, http, log_dir, require_root, target_dir,
    torchserve::loopback, workspace_root,
};

/// The capabilities both deployments grant, and nothing else (README.md, Requirements).
const CAPABILITIES: [&str; 6] = [
    "BPF",
    "PERFMON",
    "SYS_PTRACE",
    "DAC_READ_SEARCH",
    "SYS_ADMIN",
    "SYS_NICE",
];
/// The port the DaemonSet serves /metrics on (TorchServe's metrics port, in the agent pod's own netns).
const POD_METRICS_PORT: u64 = 8082;
/// kubernetes-validate, pinned: a Python package that bundles the Kubernetes OpenAPI schemas, so it
/// validates offline. (kubeconform, the usual tool, is a Go binary from GitHub releases only.)
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
/// Oldest and newest Kubernetes versions the manifests are checked against.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.27.0", "1.37.0"];

fn deploy() -> PathBuf {
    workspace_root().join("deploy")
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Every document of a (multi-document) YAML file.
fn yaml_docs(path: &Path) -> Result<Vec<Value>> {
    use serde::Deserialize as _;
    let text = read(path)?;
    serde_yaml::Deserializer::from_str(&text)
        .map(Value::deserialize)
        .filter(|d| !matches!(d, Ok(Value::Null)))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", path.display()))
}

fn yaml(path: &Path) -> Result<Value> {
    let mut docs = yaml_docs(path)?;
    ensure!(
        docs.len() == 1,
        "{} holds {} documents, expected one",
        path.display(),
        docs.len()
    );
    Ok(docs.remove(0))
}

/// `value[k1][k2]...` (mapping keys, or sequence indexes given as numbers in text).
fn at<'a>(value: &'a Value, path: &str) -> &'a Value {
    path.split('.')
        .fold(value, |v, key| match key.parse::<usize>() {
            Ok(i) if v.is_sequence() => v.get(i).unwrap_or(&Value::Null),
            _ => v.get(key).unwrap_or(&Value::Null),
        })
}

fn str_at<'a>(value: &'a Value, path: &str) -> Result<&'a str> {
    at(value, path)
        .as_str()
        .with_context(|| format!("{path} is not a string: {:?}", at(value, path)))
}

fn seq_at<'a>(value: &'a Value, path: &str) -> Result<&'a Vec<Value>> {
    at(value, path)
        .as_sequence()
        .with_context(|| format!("{path} is not a list: {:?}", at(value, path)))
}

/// Files under `dir` (recursively) whose name ends with one of `exts`, sorted.
fn files(dir: &Path, exts: &[&str]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                todo.push(path);
            } else if exts
                .iter()
                .any(|e| path.to_string_lossy().ends_with(&format!(".{e}")))
            {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Runs `cmd`, returning its output; an error with both streams unless it exits 0.
fn run(cmd: &mut Command) -> Result<Output> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .with_context(|| format!("running {shown} (is it installed? .ci/run installs it)"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

// ---- every file parses ------------------------------------------------------------------------------

#[test]
fn every_yaml_and_json_file_in_deploy_parses() -> Result<()> {
    let yamls = files(&deploy(), &["yml", "yaml"])?;
    ensure!(
        yamls.len() >= 12,
        "expected the deploy/ YAML files, found {yamls:?}"
    );
    for path in &yamls {
        let docs = yaml_docs(path)?;
        ensure!(!docs.is_empty(), "{} is empty", path.display());
    }
    for path in files(&deploy(), &["json"])? {
        serde_json::from_str::<serde_json::Value>(&read(&path)?)
            .with_context(|| format!("parsing {}", path.display()))?;
    }
    Ok(())
}

// ---- Kubernetes -------------------------------------------------------------------------------------

/// The manifests by kind (each kind appears once).
struct Manifests {
    by_kind: BTreeMap<String, Value>,
}

impl Manifests {
    fn load() -> Result<Self> {
        let dir = deploy().join("kubernetes");
        let mut by_kind = BTreeMap::new();
        for path in files(&dir, &["yaml"])? {
            if path.ends_with("kustomization.yaml") {
                continue;
            }
            for doc in yaml_docs(&path)? {
                let kind = str_at(&doc, "kind")
                    .with_context(|| format!("in {}", path.display()))?
                    .to_owned();
                if by_kind.insert(kind.clone(), doc).is_some() {
                    bail!("two {kind} manifests");
                }
            }
        }
        Ok(Manifests { by_kind })
    }

    fn get(&self, kind: &str) -> Result<&Value> {
        self.by_kind
            .get(kind)
            .with_context(|| format!("no {kind} in deploy/kubernetes"))
    }
}

/// What the DaemonSet's comments promise, and what no schema can check.
#[test]
fn kubernetes_manifests_are_consistent_and_least_privilege() -> Result<()> {
    let m = Manifests::load()?;
    let kinds: BTreeSet<&str> = m.by_kind.keys().map(String::as_str).collect();
    ensure!(
        kinds
            == BTreeSet::from([
                "DaemonSet",
                "Namespace",
                "PrometheusRule",
                "Service",
                "ServiceAccount",
                "ServiceMonitor"
            ]),
        "unexpected set of kinds: {kinds:?}"
    );

    // Everything lives in the servescope namespace, whose Pod Security level admits the agent.
    let ns = m.get("Namespace")?;
    let namespace = str_at(ns, "metadata.name")?;
    ensure!(
        at(ns, "metadata.labels")
            .get("pod-security.kubernetes.io/enforce")
            .and_then(Value::as_str)
            == Some("privileged"),
        "the namespace must enforce the `privileged` Pod Security level: hostPID and the added \
         capabilities are rejected by `baseline`"
    );
    for (kind, doc) in &m.by_kind {
        if kind != "Namespace" {
            ensure!(
                str_at(doc, "metadata.namespace")? == namespace,
                "{kind} is not in namespace {namespace}"
            );
        }
    }

    // kustomization.yaml applies exactly the manifests outside prometheus-operator/.
    let kust = yaml(&deploy().join("kubernetes/kustomization.yaml"))?;
    let listed: BTreeSet<String> = seq_at(&kust, "resources")?
        .iter()
        .filter_map(|r| r.as_str().map(str::to_owned))
        .collect();
    let top: BTreeSet<String> = fs::read_dir(deploy().join("kubernetes"))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    ensure!(
        listed == top,
        "kustomization.yaml lists {listed:?}, the directory has {top:?}"
    );

    let ds = m.get("DaemonSet")?;
    let pod = at(ds, "spec.template");
    let spec = at(pod, "spec");
    ensure!(
        at(spec, "hostPID").as_bool() == Some(true),
        "the DaemonSet needs hostPID: true"
    );
    ensure!(
        at(spec, "hostNetwork").as_bool() != Some(true),
        "hostNetwork is not needed (and would clash with TorchServe on the node's :8082)"
    );
    let sa = m.get("ServiceAccount")?;
    ensure!(str_at(spec, "serviceAccountName")? == str_at(sa, "metadata.name")?);
    ensure!(
        at(sa, "automountServiceAccountToken").as_bool() == Some(false)
            && at(spec, "automountServiceAccountToken").as_bool() == Some(false),
        "the agent never talks to the API server: no token"
    );
    ensure!(
        seq_at(spec, "tolerations")?
            .iter()
            .any(|t| str_at(t, "operator").ok() == Some("Exists") && at(t, "key").is_null()),
        "the agent must tolerate every taint (GPU nodes are usually tainted)"
    );

    let containers = seq_at(spec, "containers")?;
    ensure!(containers.len() == 1, "one container expected");
    let c = &containers[0];
    let sc = at(c, "securityContext");
    ensure!(at(sc, "privileged").as_bool() == Some(false));
    ensure!(at(sc, "readOnlyRootFilesystem").as_bool() == Some(true));
    ensure!(
        at(sc, "runAsUser").as_u64() == Some(0),
        "Kubernetes grants added capabilities to uid 0 only"
    );
    ensure!(seq_at(sc, "capabilities.drop")? == &vec![Value::from("ALL")]);
    let added: BTreeSet<&str> = seq_at(sc, "capabilities.add")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    ensure!(
        added == BTreeSet::from(CAPABILITIES),
        "capabilities.add is {added:?}, expected {CAPABILITIES:?}"
    );
    // Kubernetes' own validation (not in the OpenAPI schema): SYS_ADMIN excludes
    // allowPrivilegeEscalation: false.
    ensure!(
        at(sc, "allowPrivilegeEscalation").as_bool() != Some(false),
        "the API server rejects allowPrivilegeEscalation: false together with CAP_SYS_ADMIN"
    );
    ensure!(str_at(sc, "seccompProfile.type")? == "RuntimeDefault");

    // hostPath volumes: exactly BTF, tracefs and bpffs, all read-only, each at its host path. No
    // /proc: with hostPID the pod's own /proc shows the node's processes.
    let volumes: BTreeMap<&str, &str> = seq_at(spec, "volumes")?
        .iter()
        .map(|v| Ok((str_at(v, "name")?, str_at(v, "hostPath.path")?)))
        .collect::<Result<_>>()?;
    let mounts: BTreeMap<&str, (&str, bool)> = seq_at(c, "volumeMounts")?
        .iter()
        .map(|v| {
            Ok((
                str_at(v, "name")?,
                (
                    str_at(v, "mountPath")?,
                    at(v, "readOnly").as_bool() == Some(true),
                ),
            ))
        })
        .collect::<Result<_>>()?;
    let want: BTreeSet<&str> =
        BTreeSet::from(["/sys/kernel/btf", "/sys/kernel/tracing", "/sys/fs/bpf"]);
    ensure!(
        volumes.values().copied().collect::<BTreeSet<_>>() == want,
        "hostPath volumes {volumes:?}, expected {want:?}"
    );
    for (name, host) in &volumes {
        let (path, ro) = mounts
            .get(name)
            .with_context(|| format!("volume {name} is not mounted"))?;
        ensure!(
            path == host && *ro,
            "volume {name} ({host}) is mounted at {path}, read-only {ro}"
        );
    }

    // One port: the env's listen address, the named container port, the probes, the annotation, the
    // Service and the ServiceMonitor all agree.
    let env: BTreeMap<&str, &str> = seq_at(c, "env")?
        .iter()
        .map(|e| Ok((str_at(e, "name")?, str_at(e, "value")?)))
        .collect::<Result<_>>()?;
    let listen = env
        .get("SERVESCOPE_LISTEN")
        .context("SERVESCOPE_LISTEN is not set")?;
    ensure!(
        *listen == format!("0.0.0.0:{POD_METRICS_PORT}"),
        "the agent must listen on all addresses of its pod: {listen}"
    );
    let port = &seq_at(c, "ports")?[0];
    let port_name = str_at(port, "name")?;
    ensure!(at(port, "containerPort").as_u64() == Some(POD_METRICS_PORT));
    for probe in ["readinessProbe", "livenessProbe"] {
        let get = at(c, &format!("{probe}.httpGet"));
        ensure!(
            str_at(get, "path")? == "/metrics",
            "{probe} must GET /metrics"
        );
        let p = at(get, "port");
        ensure!(
            p.as_str() == Some(port_name) || p.as_u64() == Some(POD_METRICS_PORT),
            "{probe} probes port {p:?}, the agent listens on {port_name} ({POD_METRICS_PORT})"
        );
    }
    // (Annotation keys hold dots, which at() would split.)
    let ann = |key: &str| {
        at(pod, "metadata.annotations")
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
    };
    ensure!(ann("prometheus.io/scrape") == "true");
    ensure!(ann("prometheus.io/port") == POD_METRICS_PORT.to_string());
    ensure!(ann("prometheus.io/path") == "/metrics");

    // Resources as documented in the DaemonSet.
    let res = at(c, "resources");
    for (path, want) in [
        ("requests.cpu", "100m"),
        ("requests.memory", "64Mi"),
        ("limits.cpu", "500m"),
        ("limits.memory", "256Mi"),
    ] {
        ensure!(str_at(res, path)? == want, "resources.{path} is not {want}");
    }
    // The image tag follows the workspace version.
    let image = str_at(c, "image")?;
    ensure!(
        image.ends_with(&format!(":{}", env!("CARGO_PKG_VERSION"))),
        "image {image} does not carry version {}",
        env!("CARGO_PKG_VERSION")
    );

    // The headless Service selects the pods and exposes the named port; the ServiceMonitor selects the
    // Service and scrapes that port.
    let pod_labels = at(pod, "metadata.labels");
    let svc = m.get("Service")?;
    ensure!(
        str_at(svc, "spec.clusterIP")? == "None",
        "the Service must be headless"
    );
    for (k, v) in at(svc, "spec.selector")
        .as_mapping()
        .context("Service selector")?
    {
        ensure!(
            pod_labels.get(k) == Some(v),
            "Service selector {k:?}={v:?} does not match the pods"
        );
    }
    ensure!(
        at(ds, "spec.selector.matchLabels")
            .as_mapping()
            .context("DaemonSet selector")?
            .iter()
            .all(|(k, v)| pod_labels.get(k) == Some(v))
    );
    let svc_port = &seq_at(svc, "spec.ports")?[0];
    ensure!(str_at(svc_port, "targetPort")? == port_name);
    ensure!(at(svc_port, "port").as_u64() == Some(POD_METRICS_PORT));
    let sm = m.get("ServiceMonitor")?;
    ensure!(str_at(sm, "apiVersion")? == "monitoring.coreos.com/v1");
    for (k, v) in at(sm, "spec.selector.matchLabels")
        .as_mapping()
        .context("ServiceMonitor selector")?
    {
        ensure!(at(svc, "metadata.labels").get(k) == Some(v));
    }
    ensure!(seq_at(sm, "spec.namespaceSelector.matchNames")?.contains(&Value::from(namespace)));
    let endpoint = &seq_at(sm, "spec.endpoints")?[0];
    ensure!(str_at(endpoint, "port")? == str_at(svc_port, "name")?);
    ensure!(str_at(endpoint, "path")? == "/metrics");
    // The alert rules select job="servescope"; the Operator names the job after the Service.
    ensure!(str_at(svc, "metadata.name")? == "servescope" && at(sm, "spec.jobLabel").is_null());
    Ok(())
}

/// The operator's PrometheusRule carries exactly the groups of deploy/prometheus/rules/.
#[test]
fn prometheus_rule_resource_equals_the_rule_files() -> Result<()> {
    let m = Manifests::load()?;
    let pr = m.get("PrometheusRule")?;
    ensure!(str_at(pr, "apiVersion")? == "monitoring.coreos.com/v1");
    // Groups by name: their order does not matter to Prometheus.
    let by_name = |groups: &[Value]| -> Result<BTreeMap<String, Value>> {
        groups
            .iter()
            .map(|g| Ok((str_at(g, "name")?.to_owned(), g.clone())))
            .collect()
    };
    let mut groups = Vec::new();
    for path in files(&deploy().join("prometheus/rules"), &["yml"])? {
        groups.extend(seq_at(&yaml(&path)?, "groups")?.iter().cloned());
    }
    if by_name(seq_at(pr, "spec.groups")?)? != by_name(&groups)? {
        bail!(
            "deploy/kubernetes/prometheus-operator/prometheusrule.yaml differs from deploy/prometheus/rules/*.yml: \
             regenerate it (its header says how). Expected spec.groups:\n{}",
            serde_yaml::to_string(&groups)?
        );
    }
    Ok(())
}

/// The core manifests against the Kubernetes OpenAPI schema, strict (unknown fields fail), for the
/// oldest and newest Kubernetes versions supported. The Operator's CRDs are not in that schema; the
/// structural test above covers them.
#[test]
fn kubernetes_manifests_pass_the_kubernetes_schema() -> Result<()> {
    let validate = kubernetes_validate()?;
    let dir = deploy().join("kubernetes");
    let manifests: Vec<PathBuf> = files(&dir, &["yaml"])?
        .into_iter()
        .filter(|p| {
            !p.ends_with("kustomization.yaml") && !p.starts_with(dir.join("prometheus-operator"))
        })
        .collect();
    ensure!(
        manifests.len() == 4,
        "expected 4 core manifests, found {manifests:?}"
    );
    for version in KUBERNETES_VERSIONS {
        let out = run(Command::new(&validate)
            .args(["--strict", "--kubernetes-version", version])
            .args(&manifests))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        // One "passed" line per resource; any WARN (e.g. a schema not found) is a failure here.
        let passed = text
            .lines()
            .filter(|l| l.contains(" passed for resource "))
            .count();
        ensure!(
            passed == manifests.len() && !text.contains("WARN") && !text.contains("ERROR"),
            "kubernetes-validate {version}:\n{text}"
        );
    }
    Ok(())
}

/// kubernetes-validate in its own venv under target/ (installed from PyPI on first use).
fn kubernetes_validate() -> Result<PathBuf> {
    let venv = target_dir().join("deploy-tools/venv");
    let bin = venv.join("bin/kubernetes-validate");
    let stamp = venv.join(".installed");
    if bin.is_file() && read(&stamp).ok().as_deref() == Some(KUBERNETES_VALIDATE) {
        return Ok(bin);
    }
    if venv.exists() {
        fs::remove_dir_all(&venv)?;
    }
    // Debian's python3 (python3-venv is in .ci/run's packages), not whatever python3 is first on PATH.
    run(Command::new("/usr/bin/python3")
        .arg("-m")
        .arg("venv")
        .arg(&venv))?;
    run(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        KUBERNETES_VALIDATE,
    ]))?;
    fs::write(&stamp, KUBERNETES_VALIDATE)?;
    Ok(bin)
}

// ---- Prometheus -------------------------------------------------------------------------------------

#[test]
fn promtool_accepts_the_configs_and_rules() -> Result<()> {
    let dir = deploy().join("prometheus");
    run(Command::new("promtool")
        .args(["check", "config"])
        .arg(dir.join("prometheus.yml")))?;
    let rules = files(&dir.join("rules"), &["yml"])?;
    ensure!(rules.len() == 2, "rule files: {rules:?}");
    run(Command::new("promtool")
        .args(["check", "rules"])
        .args(&rules))?;

    // Debian's Prometheus is built without the Kubernetes service discovery, so promtool rejects
    // kubernetes_sd_configs; check everything else of that file (relabelings included) with the SD
    // swapped for a static target.
    let mut k8s = yaml(&dir.join("scrape-kubernetes.yml"))?;
    let jobs = k8s
        .get_mut("scrape_configs")
        .and_then(Value::as_sequence_mut)
        .context("scrape_configs")?;
    ensure!(jobs.len() == 1);
    let job = jobs[0].as_mapping_mut().context("job")?;
    ensure!(
        job.remove("kubernetes_sd_configs").is_some(),
        "scrape-kubernetes.yml has no kubernetes_sd_configs"
    );
    job.insert(
        "static_configs".into(),
        serde_yaml::from_str("[{targets: ['127.0.0.1:8082']}]")?,
    );
    // Under target/, with the rule files made absolute so that promtool still finds and checks them.
    for f in k8s
        .get_mut("rule_files")
        .and_then(Value::as_sequence_mut)
        .context("rule_files")?
    {
        let rel = f.as_str().context("rule file")?;
        *f = dir.join(rel).to_string_lossy().into_owned().into();
    }
    let tmp = target_dir().join("deploy-tools/scrape-kubernetes.static.yml");
    fs::create_dir_all(tmp.parent().context("parent")?)?;
    fs::write(&tmp, serde_yaml::to_string(&k8s)?)?;
    let out = run(Command::new("promtool").args(["check", "config"]).arg(&tmp))?;
    let said = String::from_utf8_lossy(&out.stdout);
    ensure!(
        said.contains("SUCCESS: 2 rule files found"),
        "promtool did not check the rule files of scrape-kubernetes.yml:\n{said}"
    );
    Ok(())
}

/// `promtool test rules` passes, and the tests cover every alert (firing at least once) and every
/// recording rule.
#[test]
fn promtool_unit_tests_cover_every_rule() -> Result<()> {
    let dir = deploy().join("prometheus");
    let tests = files(&dir.join("tests"), &["yml"])?;
    ensure!(
        !tests.is_empty(),
        "no rule tests in deploy/prometheus/tests"
    );
    let out = run(Command::new("promtool")
        .args(["test", "rules"])
        .args(&tests))?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        text.matches("SUCCESS").count() == tests.len(),
        "promtool test rules:\n{text}"
    );

    let (mut alerts, mut records) = (BTreeSet::new(), BTreeSet::new());
    for path in files(&dir.join("rules"), &["yml"])? {
        for group in seq_at(&yaml(&path)?, "groups")? {
            for rule in seq_at(group, "rules")? {
                if let Some(a) = at(rule, "alert").as_str() {
                    alerts.insert(a.to_owned());
                }
                if let Some(r) = at(rule, "record").as_str() {
                    records.insert(r.to_owned());
                }
            }
        }
    }
    let (mut fired, mut exprs) = (BTreeSet::new(), String::new());
    for path in &tests {
        for case in seq_at(&yaml(path)?, "tests")? {
            for t in at(case, "alert_rule_test")
                .as_sequence()
                .into_iter()
                .flatten()
            {
                if at(t, "exp_alerts")
                    .as_sequence()
                    .is_some_and(|a| !a.is_empty())
                {
                    fired.insert(str_at(t, "alertname")?.to_owned());
                }
            }
            for t in at(case, "promql_expr_test")
                .as_sequence()
                .into_iter()
                .flatten()
            {
                exprs.push_str(str_at(t, "expr")?);
                exprs.push('\n');
            }
        }
    }
    let untested: Vec<_> = alerts.difference(&fired).collect();
    ensure!(
        untested.is_empty(),
        "alerts never seen firing in a test: {untested:?}"
    );
    let untested: Vec<_> = records
        .iter()
        .filter(|r| !exprs.contains(r.as_str()))
        .collect();
    ensure!(
        untested.is_empty(),
        "recording rules without a test: {untested:?}"
    );
    Ok(())
}

// ---- Grafana ----------------------------------------------------------------------------------------

#[test]
fn grafana_dashboard_is_well_formed() -> Result<()> {
    let path = deploy().join("grafana/servescope-dashboard.json");
    let d: serde_json::Value = serde_json::from_str(&read(&path)?)?;
    ensure!(
        d["uid"]
            .as_str()
            .is_some_and(|u| !u.is_empty() && u.len() <= 40)
    );
    let vars: BTreeSet<&str> = d["templating"]["list"]
        .as_array()
        .context("templating.list")?
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    ensure!(
        vars == BTreeSet::from(["datasource", "hostname", "model"]),
        "variables: {vars:?}"
    );
    let panels = d["panels"].as_array().context("panels")?;
    let mut ids = BTreeSet::new();
    let mut cells: BTreeMap<(i64, i64), String> = BTreeMap::new();
    let mut titles = Vec::new();
    for p in panels {
        let title = p["title"].as_str().context("panel title")?.to_owned();
        ensure!(
            ids.insert(p["id"].as_i64().context("panel id")?),
            "duplicate id in {title}"
        );
        // No two panels overlap on Grafana's 24-column grid.
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_i64().context("x")?,
            g["y"].as_i64().context("y")?,
            g["w"].as_i64().context("w")?,
            g["h"].as_i64().context("h")?,
        );
        ensure!(
            x >= 0 && w > 0 && x + w <= 24 && h > 0,
            "{title}: bad gridPos {g}"
        );
        for cx in x..x + w {
            for cy in y..y + h {
                if let Some(other) = cells.insert((cx, cy), title.clone()) {
                    bail!("panels {other:?} and {title:?} overlap");
                }
            }
        }
        if p["type"] == "row" {
            continue;
        }
        titles.push(title.clone());
        ensure!(
            p["datasource"]["uid"] == "${datasource}",
            "{title}: the data source must be the dashboard's variable"
        );
        let targets = p["targets"].as_array().context("targets")?;
        ensure!(!targets.is_empty(), "{title} has no query");
        let refs: BTreeSet<&str> = targets.iter().filter_map(|t| t["refId"].as_str()).collect();
        ensure!(
            refs.len() == targets.len(),
            "{title}: refIds must be unique"
        );
        for t in targets {
            ensure!(
                t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
                "{title}: empty query"
            );
        }
    }
    // The four panels the TorchServe docs describe, plus percentiles and the agent's health.
    for want in [
        "GPU memory usage",
        "Mean inference latency",
        "Throughput: inference requests per second",
        "Error rate: 5xx share of responses",
        "Inference latency percentiles",
        "Kernel records lost",
    ] {
        ensure!(titles.iter().any(|t| t == want), "no panel {want:?}");
    }
    // The provisioning file points Grafana at a directory (where the JSON is copied).
    let prov = yaml(&deploy().join("grafana/provisioning/dashboards/servescope.yaml"))?;
    ensure!(at(&prov, "apiVersion").as_u64() == Some(1));
    ensure!(str_at(&prov, "providers.0.type")? == "file");
    ensure!(str_at(&prov, "providers.0.options.path")?.starts_with('/'));
    let ds = yaml(&deploy().join("grafana/provisioning/datasources/prometheus.yaml"))?;
    ensure!(str_at(&ds, "datasources.0.type")? == "prometheus");
    Ok(())
}

// ---- systemd ----------------------------------------------------------------------------------------

/// The `[Service]` settings of a unit file (last one wins, as for these single-valued keys).
fn unit_settings(path: &Path) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut section = String::new();
    for line in read(path)?.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            section = line.to_owned();
        } else if section == "[Service]" {
            let (k, v) = line
                .split_once('=')
                .with_context(|| format!("bad line {line:?}"))?;
            out.insert(k.trim().to_owned(), v.trim().to_owned());
        }
    }
    Ok(out)
}

fn unit_path() -> PathBuf {
    deploy().join("systemd/servescope.service")
}

/// `systemd-analyze verify` in a scratch root holding the unit, an executable at its ExecStart path and
/// a copy of the system's units (for the default dependencies): it must print nothing at all, since it
/// reports unknown keys and bad values as warnings with exit status 0. Then `systemd-analyze security`
/// must rate the sandbox "OK" or better.
#[test]
fn systemd_unit_passes_systemd_analyze() -> Result<()> {
    let settings = unit_settings(&unit_path())?;
    let exec = settings.get("ExecStart").context("no ExecStart")?;
    ensure!(exec == "/usr/local/bin/servescope", "ExecStart={exec}");
    let root = target_dir().join("deploy-tools/systemd-root");
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    let units = root.join("etc/systemd/system");
    fs::create_dir_all(&units)?;
    fs::copy(unit_path(), units.join("servescope.service"))?;
    // Every program the unit runs (the agent; ExecReload's kill) must exist in the scratch root.
    let reload = settings.get("ExecReload").context("no ExecReload")?;
    ensure!(reload == "/bin/kill -HUP $MAINPID", "ExecReload={reload}");
    for program in [exec.as_str(), "/bin/kill"] {
        let bin = root.join(program.trim_start_matches('/'));
        fs::create_dir_all(bin.parent().context("bin dir")?)?;
        fs::write(&bin, "#!/bin/sh\n")?;
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755))?;
    }
    // The system's own units (sysinit.target, ...), which the unit's default dependencies name.
    fs::create_dir_all(root.join("usr/lib/systemd"))?;
    run(Command::new("cp")
        .arg("-a")
        .arg("/usr/lib/systemd/system")
        .arg(root.join("usr/lib/systemd")))?;

    let out = run(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", root.display()))
        .arg("/etc/systemd/system/servescope.service"))?;
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    ensure!(
        said.trim().is_empty(),
        "systemd-analyze verify complained:\n{said}"
    );

    let out = run(Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(format!("--root={}", root.display()))
        .arg("/etc/systemd/system/servescope.service"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .with_context(|| format!("no exposure level in:\n{text}"))?;
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("cannot read the score in {line:?}"))?;
    eprintln!("systemd-analyze security: {}", line.trim());
    // 3.2 when written; systemd calls up to 4.9 "OK". A higher score means a protection was dropped.
    ensure!(score <= 3.5, "exposure {score} (> 3.5): {line}");
    Ok(())
}

/// Capability names of a unit setting (`CAP_BPF CAP_PERFMON`) as setpriv's `+bpf,+perfmon`.
fn setpriv_caps(names: &str) -> String {
    names
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_ascii_lowercase()))
        .collect::<Vec<_>>()
        .join(",")
}

/// A server that stands in for TorchServe in a pod: Python's http.server in its own UTS namespace with
/// hostname `hostname`, running as `nobody`.
fn pod_server(logs: &Path, hostname: &str, port: u16) -> Result<ServerProcess> {
    let script = format!(
        "hostname {hostname} && exec setpriv --reuid=nobody --regid=nogroup --clear-groups \
         /usr/bin/python3 -m http.server {port} --bind 127.0.0.1 --directory /usr/share"
    );
    ServerProcess::start(
        logs,
        "pod-server",
        port,
        "unshare",
        &["--uts", "/bin/sh", "-c", &script],
    )
}

/// Sends `n` GETs to `server` and waits until the agent counted them for `hostname`; then checks the
/// system families (which read the target's /proc and model store) have that hostname too.
fn traffic_is_counted(
    agent: &Agent,
    server: &ServerProcess,
    hostname: &str,
    n: usize,
) -> Result<()> {
    for _ in 0..n {
        http::get(server.addr(), "/", Duration::from_secs(10))?;
    }
    let total = |m: &servescope_integration::Metrics| {
        ["Requests2XX", "Requests4XX", "Requests5XX"]
            .iter()
            .flat_map(|f| m.series(f))
            .filter(|(s, _)| s.label("Hostname") == Some(hostname))
            .map(|(_, v)| v)
            .sum::<f64>()
    };
    let m = agent.wait_until(
        Duration::from_secs(30),
        &format!("{n} responses counted with Hostname={hostname} and DiskUsage sampled"),
        |m| {
            total(m) == n as f64
                && m.series("DiskUsage")
                    .any(|(s, _)| s.label("Hostname") == Some(hostname))
        },
    )?;
    ensure!(
        m.sum("servescope_kernel_lost_events_total") == 0.0,
        "records were lost"
    );
    Ok(())
}

/// Warnings and errors in the agent's log (there must be none: e.g. the hostname fallback warns).
fn complaints(agent: &Agent) -> Result<Vec<String>> {
    Ok(read(agent.log_path())?
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .map(str::to_owned)
        .collect())
}

/// PIDs of servescope processes whose command line contains `needle` (used to find the agent under
/// strace: the harness knows only the wrapper's PID, which becomes strace's).
fn pids_with_cmdline(needle: &str) -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let cmd = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let argv0 = cmd.split(' ').next().unwrap_or_default();
        (argv0.ends_with("/servescope") && cmd.contains(needle)).then_some(pid)
    })
    .collect()
}

/// SIGTERM to the processes whose command line contains `needle` (a unique listen address: only the
/// agent this test started), SIGKILL after 10 s.
fn stop_processes(needle: &str) {
    for sig in [libc::SIGTERM, libc::SIGKILL] {
        for pid in pids_with_cmdline(needle) {
            // SAFETY: kill(2) on a PID found by the unique listen address of the agent this test started.
            unsafe { libc::kill(pid, sig) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !pids_with_cmdline(needle).is_empty() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Runs [`stop_processes`] when dropped, also when the test fails half-way.
struct StopOnDrop(String);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        stop_processes(&self.0);
    }
}

/// The unit's sandbox, reproduced without systemd (which is not PID 1 on CI machines): the agent runs as
/// an unused uid (DynamicUser) with the unit's ambient and bounding capabilities and no_new_privs, in
/// its own mount and UTS namespaces (ProtectHostname) where / is read-only (ProtectSystem=strict,
/// ProtectHome), every mount under /sys and /proc/sys is read-only (ProtectKernelTunables,
/// ProtectControlGroups; tracefs included) and /tmp is private. What systemd enforces with seccomp
/// (SystemCallFilter, RestrictAddressFamilies, RestrictNamespaces, MemoryDenyWriteExecute) is checked on
/// an strace of the whole run instead. The target runs as `nobody` in its own UTS namespace.
#[test]
fn systemd_unit_sandbox_runs_the_agent() -> Result<()> {
    const SERVER_PORT: u16 = 18471;
    const AGENT_PORT: u16 = 19471;
    const HOSTNAME: &str = "sandbox-target";
    const UID: u32 = 61_471; // in systemd's DynamicUser range, unused
    require_root()?;
    ensure_kernel_prereqs()?;
    let logs = log_dir("systemd_unit_sandbox_runs_the_agent")?;
    let s = unit_settings(&unit_path())?;

    // The emulation below stands for these exact settings: if the unit changes, change both.
    for (key, want) in [
        ("DynamicUser", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "read-only"),
        ("PrivateTmp", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectControlGroups", "yes"),
        ("ProtectHostname", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("RestrictNamespaces", "uts"),
        ("SystemCallArchitectures", "native"),
    ] {
        ensure!(
            s.get(key).map(String::as_str) == Some(want),
            "{key}={:?} in the unit; this test emulates {key}={want}",
            s.get(key)
        );
    }
    let ambient = s
        .get("AmbientCapabilities")
        .context("AmbientCapabilities")?;
    ensure!(s.get("CapabilityBoundingSet") == Some(ambient));
    let unit_caps: BTreeSet<&str> = ambient
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_"))
        .collect();
    ensure!(
        unit_caps == BTreeSet::from(CAPABILITIES),
        "unit capabilities {unit_caps:?}"
    );
    let caps = setpriv_caps(ambient);

    let server = pod_server(&logs, HOSTNAME, SERVER_PORT)?;
    let strace_out = logs.join("agent.strace");
    fs::write(&strace_out, "")?;
    // The unprivileged agent reopens the file through /proc/self/fd: it must own it.
    std::os::unix::fs::chown(&strace_out, Some(UID), Some(UID))?;
    // The unit's PrivateTmp hides /tmp, where a checkout (and so target/debug/servescope) may live:
    // run a copy from /run, as the unit runs /usr/local/bin/servescope.
    let bin_copy = RunCopy::of(&Agent::binary()?)?;
    let wrapper = logs.join("sandbox.sh");
    fs::write(
        &wrapper,
        format!(
            r#"#!/bin/sh
# servescope.service's sandbox without systemd (tests/tests/deploy.rs).
exec 3>>'{strace}'
exec unshare --mount --uts --propagation private -- /bin/sh -ec '
mount -o remount,bind,ro /
mount --bind /proc/sys /proc/sys
for m in $(awk "\$5 ~ \"^/sys(/|\$)\" || \$5 == \"/proc/sys\" {{ print \$5 }}" /proc/self/mountinfo | sort -u); do
    mount -o remount,bind,ro "$m"
done
mount -t tmpfs -o mode=1777 tmpfs /tmp
exec setpriv --reuid={uid} --regid={uid} --clear-groups --no-new-privs \
    --inh-caps=-all,{caps} --ambient-caps=-all,{caps} --bounding-set=-all,{caps} -- \
    strace -f -qq -o /proc/self/fd/3 '{bin}' "$@"
' servescope-sandbox "$@"
"#,
            strace = strace_out.display(),
            uid = UID,
            caps = caps,
            bin = bin_copy.path().display(),
        ),
    )?;
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755))?;

    let listen = loopback(AGENT_PORT);
    let port_arg = SERVER_PORT.to_string();
    let agent = Agent::start_binary(
        &wrapper,
        &logs,
        listen,
        &[
            "--port",
            &port_arg,
            "--no-discovery",
            "--sample-interval-secs",
            "1",
        ],
    )?;
    // strace does not pass SIGTERM on to the agent it traces: whatever happens below, stop the agent
    // itself first (dropped before `agent`, whose guard then stops strace).
    let needle = format!("--listen {listen}");
    let _stop_traced = StopOnDrop(needle.clone());
    // strace slows the agent's start (every /proc read is traced).
    agent.wait_ready(Duration::from_secs(60))?;
    traffic_is_counted(&agent, &server, HOSTNAME, 5)?;
    let warned = complaints(&agent)?;
    ensure!(
        warned.is_empty(),
        "the sandboxed agent complained:\n{}",
        warned.join("\n")
    );

    let agents = pids_with_cmdline(&needle);
    ensure!(
        agents.len() == 1,
        "expected one agent process with {needle:?}, found {agents:?}"
    );
    stop_processes(&needle);
    let status = agent.stop()?;
    ensure!(status.success(), "the sandboxed agent exited with {status}");
    drop(server);

    check_strace(&read(&strace_out)?, &s)
}

/// Checks an `strace -f` log of the agent against the unit's seccomp-based settings.
fn check_strace(log: &str, unit: &BTreeMap<String, String>) -> Result<()> {
    let allowed = expand_syscall_filter(unit.get("SystemCallFilter").context("SystemCallFilter")?)?;
    let families: BTreeSet<&str> = unit
        .get("RestrictAddressFamilies")
        .context("RestrictAddressFamilies")?
        .split_whitespace()
        .collect();
    let mut used: BTreeMap<String, usize> = BTreeMap::new();
    let mut problems = Vec::new();
    for line in log.lines() {
        let Some((_pid, rest)) = line.split_once(' ') else {
            continue;
        };
        let rest = rest.trim_start();
        if rest.starts_with("+++") || rest.starts_with("---") {
            continue;
        }
        // `<... read resumed>) = 5` ends a call whose arguments were on its `<unfinished ...>` line.
        let (rest, resumed) = match rest.strip_prefix("<... ") {
            Some(r) => (r, true),
            None => (rest, false),
        };
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if name.is_empty() {
            continue;
        }
        *used.entry(name.clone()).or_default() += 1;
        if resumed {
            continue;
        }
        let args = rest[name.len()..].trim_start_matches('(');
        match name.as_str() {
            // MemoryDenyWriteExecute: no writable+executable mapping, no mprotect to executable.
            "mmap" if args.contains("PROT_WRITE") && args.contains("PROT_EXEC") => {
                problems.push(format!("W+X mapping: {line}"))
            }
            "mprotect" | "pkey_mprotect" if args.contains("PROT_EXEC") => {
                problems.push(format!("mprotect to executable: {line}"))
            }
            "shmat" if args.contains("SHM_EXEC") => problems.push(format!("SHM_EXEC: {line}")),
            // RestrictAddressFamilies.
            "socket" | "socketpair" => {
                let family = args.split(',').next().unwrap_or_default().trim();
                if !families.contains(family) {
                    problems.push(format!("address family {family} not allowed: {line}"));
                }
            }
            // RestrictNamespaces=uts: only setns into UTS namespaces, no new namespaces.
            "setns" if !args.contains("CLONE_NEWUTS") => {
                problems.push(format!("setns into a non-UTS namespace: {line}"))
            }
            "unshare" => problems.push(format!("unshare: {line}")),
            _ => {}
        }
        if (name == "clone" || name == "clone3")
            && args
                .split(['|', ',', ' '])
                .any(|f| f.starts_with("CLONE_NEW"))
        {
            problems.push(format!("namespace created: {line}"));
        }
    }
    let denied: Vec<&String> = used
        .keys()
        .filter(|n| !allowed.contains(n.as_str()))
        .collect();
    if !denied.is_empty() {
        problems.push(format!(
            "system calls outside SystemCallFilter={}: {denied:?}",
            unit["SystemCallFilter"]
        ));
    }
    for needed in ["bpf", "perf_event_open", "setns"] {
        if !used.contains_key(needed) {
            problems.push(format!(
                "the agent never called {needed}: the strace log does not cover a whole run"
            ));
        }
    }
    eprintln!(
        "strace: {} system calls of {} kinds: {:?}",
        used.values().sum::<usize>(),
        used.len(),
        used.keys().collect::<Vec<_>>()
    );
    if !problems.is_empty() {
        bail!(
            "the agent does something the unit forbids:\n  {}",
            problems.join("\n  ")
        );
    }
    Ok(())
}

/// The system calls a `SystemCallFilter=` allow list admits, with @groups expanded by
/// `systemd-analyze syscall-filter` (this machine's systemd, the one the unit targets).
fn expand_syscall_filter(filter: &str) -> Result<BTreeSet<String>> {
    let out = run(Command::new("systemd-analyze").args(["syscall-filter", "--no-pager"]))?;
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if !line.starts_with(' ') && trimmed.starts_with('@') {
            current = Some(trimmed.to_owned());
            groups.entry(trimmed.to_owned()).or_default();
        } else if let Some(g) = &current {
            groups
                .entry(g.clone())
                .or_default()
                .push(trimmed.to_owned());
        }
    }
    let mut out = BTreeSet::new();
    let mut todo: Vec<String> = filter.split_whitespace().map(str::to_owned).collect();
    let mut seen = BTreeSet::new();
    while let Some(item) = todo.pop() {
        if !seen.insert(item.clone()) {
            continue;
        }
        if item.starts_with('@') {
            todo.extend(
                groups
                    .get(&item)
                    .with_context(|| format!("unknown syscall group {item}"))?
                    .iter()
                    .cloned(),
            );
        } else {
            out.insert(item);
        }
    }
    ensure!(
        out.len() > 100,
        "expanded {filter:?} to only {} calls",
        out.len()
    );
    Ok(out)
}

/// The DaemonSet's container, reproduced on this machine: uid 0 with the container's capability set
/// (from daemonset.yaml) as bounding set, read-only root (readOnlyRootFilesystem), read-only /sys and
/// the read-only tracefs/BTF/bpffs mounts, its own UTS namespace with the pod's hostname; host PID
/// namespace (hostPID). The network namespace stays the host's so the test can reach /metrics. The
/// target runs as `nobody` in another UTS namespace, like TorchServe (user model-server) in another pod:
/// its series must carry that pod's hostname.
#[test]
fn daemonset_security_context_runs_the_agent() -> Result<()> {
    const SERVER_PORT: u16 = 18472;
    const AGENT_PORT: u16 = 19472;
    const HOSTNAME: &str = "torchserve-pod-0";
    require_root()?;
    ensure_kernel_prereqs()?;
    let logs = log_dir("daemonset_security_context_runs_the_agent")?;
    let m = Manifests::load()?;
    let c = at(m.get("DaemonSet")?, "spec.template.spec.containers.0");
    let caps: Vec<String> = seq_at(c, "securityContext.capabilities.add")?
        .iter()
        .filter_map(Value::as_str)
        .map(|c| format!("+{}", c.to_ascii_lowercase()))
        .collect();
    ensure!(caps.len() == CAPABILITIES.len());
    let caps = caps.join(",");

    let server = pod_server(&logs, HOSTNAME, SERVER_PORT)?;
    let wrapper = logs.join("container.sh");
    fs::write(
        &wrapper,
        format!(
            r#"#!/bin/sh
# The DaemonSet's container without a container runtime (tests/tests/deploy.rs).
exec unshare --mount --uts --propagation private -- /bin/sh -ec '
hostname servescope-agent-pod
mount -o remount,bind,ro /
for m in $(awk "\$5 ~ \"^/sys(/|\$)\" {{ print \$5 }}" /proc/self/mountinfo | sort -u); do
    mount -o remount,bind,ro "$m"
done
exec setpriv --inh-caps=-all --bounding-set=-all,{caps} -- '{bin}' "$@"
' servescope-container "$@"
"#,
            caps = caps,
            bin = Agent::binary()?.display(),
        ),
    )?;
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755))?;
    let port_arg = SERVER_PORT.to_string();
    let agent = Agent::start_binary(
        &wrapper,
        &logs,
        loopback(AGENT_PORT),
        &[
            "--port",
            &port_arg,
            "--no-discovery",
            "--sample-interval-secs",
            "1",
        ],
    )?;
    agent.wait_ready(Duration::from_secs(30))?;
    traffic_is_counted(&agent, &server, HOSTNAME, 5)?;
    let warned = complaints(&agent)?;
    ensure!(
        warned.is_empty(),
        "the agent complained:\n{}",
        warned.join("\n")
    );
    let status = agent.stop()?;
    ensure!(status.success(), "the agent exited with {status}");
    drop(server);
    Ok(())
}

/// A copy of the agent binary under /run (outside /tmp, which PrivateTmp replaces), removed on drop.
struct RunCopy(PathBuf);

impl RunCopy {
    fn of(bin: &Path) -> Result<RunCopy> {
        let dir = PathBuf::from(format!("/run/servescope-sandbox-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
        let copy = dir.join("servescope");
        fs::copy(bin, &copy)
            .with_context(|| format!("copying {} to {}", bin.display(), copy.display()))?;
        fs::set_permissions(&copy, fs::Permissions::from_mode(0o755))?;
        Ok(RunCopy(dir))
    }

    fn path(&self) -> PathBuf {
        self.0.join("servescope")
    }
}

impl Drop for RunCopy {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
