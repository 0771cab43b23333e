//! The metric families and TorchServe's counting rules (FACTS.md §2–3), in one place.
//!
//! TorchServe families keep their exact names, units, label names and label order ([`TORCHSERVE_FAMILIES`]);
//! the exposition encoder prints them from this catalogue. servescope's own families use the
//! `servescope_` prefix.

use std::collections::{BTreeMap, HashMap, HashSet};

use prometheus::{
    CounterVec, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, core::Collector,
};

pub use self::store::{Kind, Order, SeriesId, SeriesView, StoredFamily};
use crate::{
    http::Exchange,
    probes::ProgramRuns,
    routing::{self, Route},
};

mod store;

/// Prometheus metric type of a TorchServe family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FamilyType {
    Counter,
    Gauge,
}

impl FamilyType {
    pub fn as_str(self) -> &'static str {
        match self {
            FamilyType::Counter => "counter",
            FamilyType::Gauge => "gauge",
        }
    }
}

/// One family as TorchServe 0.12 prints it.
#[derive(Clone, Copy, Debug)]
pub struct FamilySpec {
    pub name: &'static str,
    pub kind: FamilyType,
    pub unit: &'static str,
    /// Label names in TorchServe's print order.
    pub labels: &'static [&'static str],
}

impl FamilySpec {
    /// TorchServe's HELP text.
    pub fn help(&self) -> String {
        format!(
            "Torchserve prometheus {} metric with unit: {}",
            self.kind.as_str(),
            self.unit
        )
    }
}

const HOST: &[&str] = &["Level", "Hostname"];
const MODEL: &[&str] = &["model_name", "model_version", "hostname"];
const GPU: &[&str] = &["Level", "DeviceId", "Hostname"];

/// Every family TorchServe 0.12 prints in prometheus mode (FACTS.md §2), in servescope's print order.
///
/// TorchServe's own order is JVM hash order and differs between JVM builds; servescope prints a fixed
/// order instead: request counters, model counters, model gauges, worker gauges, system, GPU.
pub const TORCHSERVE_FAMILIES: [FamilySpec; 21] = [
    FamilySpec {
        name: "Requests2XX",
        kind: FamilyType::Counter,
        unit: "Count",
        labels: HOST,
    },
    FamilySpec {
        name: "Requests4XX",
        kind: FamilyType::Counter,
        unit: "Count",
        labels: HOST,
    },
    FamilySpec {
        name: "Requests5XX",
        kind: FamilyType::Counter,
        unit: "Count",
        labels: HOST,
    },
    FamilySpec {
        name: "ts_inference_requests_total",
        kind: FamilyType::Counter,
        unit: "Count",
        labels: MODEL,
    },
    FamilySpec {
        name: "ts_inference_latency_microseconds",
        kind: FamilyType::Counter,
        unit: "Microseconds",
        labels: MODEL,
    },
    FamilySpec {
        name: "ts_queue_latency_microseconds",
        kind: FamilyType::Counter,
        unit: "Microseconds",
        labels: MODEL,
    },
    FamilySpec {
        name: "HandlerTime",
        kind: FamilyType::Gauge,
        unit: "ms",
        labels: &["ModelName", "Level", "Hostname"],
    },
    FamilySpec {
        name: "PredictionTime",
        kind: FamilyType::Gauge,
        unit: "ms",
        labels: &["ModelName", "Level", "Hostname"],
    },
    FamilySpec {
        name: "QueueTime",
        kind: FamilyType::Gauge,
        unit: "Milliseconds",
        labels: HOST,
    },
    FamilySpec {
        name: "WorkerThreadTime",
        kind: FamilyType::Gauge,
        unit: "Milliseconds",
        labels: HOST,
    },
    FamilySpec {
        name: "WorkerLoadTime",
        kind: FamilyType::Gauge,
        unit: "Milliseconds",
        labels: &["WorkerName", "Level", "Hostname"],
    },
    FamilySpec {
        name: "CPUUtilization",
        kind: FamilyType::Gauge,
        unit: "Percent",
        labels: HOST,
    },
    FamilySpec {
        name: "MemoryUsed",
        kind: FamilyType::Gauge,
        unit: "Megabytes",
        labels: HOST,
    },
    FamilySpec {
        name: "MemoryAvailable",
        kind: FamilyType::Gauge,
        unit: "Megabytes",
        labels: HOST,
    },
    FamilySpec {
        name: "MemoryUtilization",
        kind: FamilyType::Gauge,
        unit: "Percent",
        labels: HOST,
    },
    FamilySpec {
        name: "DiskUsage",
        kind: FamilyType::Gauge,
        unit: "Gigabytes",
        labels: HOST,
    },
    FamilySpec {
        name: "DiskAvailable",
        kind: FamilyType::Gauge,
        unit: "Gigabytes",
        labels: HOST,
    },
    FamilySpec {
        name: "DiskUtilization",
        kind: FamilyType::Gauge,
        unit: "Percent",
        labels: HOST,
    },
    FamilySpec {
        name: "GPUMemoryUtilization",
        kind: FamilyType::Gauge,
        unit: "Percent",
        labels: GPU,
    },
    FamilySpec {
        name: "GPUMemoryUsed",
        kind: FamilyType::Gauge,
        unit: "Megabytes",
        labels: GPU,
    },
    FamilySpec {
        name: "GPUUtilization",
        kind: FamilyType::Gauge,
        unit: "Percent",
        labels: GPU,
    },
];

/// A sample's label values in the order of `names` (missing labels as ""). The prometheus crate keeps
/// label pairs sorted by name; TorchServe's print order is the catalogue's.
pub fn labels_in_order<'a>(metric: &'a prometheus::proto::Metric, names: &[&str]) -> Vec<&'a str> {
    names
        .iter()
        .map(|name| {
            metric
                .get_label()
                .iter()
                .find(|l| l.name() == *name)
                .map_or("", |l| l.value())
        })
        .collect()
}

/// The catalogue entry of a TorchServe family.
pub fn torchserve_family(name: &str) -> Option<&'static FamilySpec> {
    TORCHSERVE_FAMILIES.iter().find(|f| f.name == name)
}

/// How a traced server's responses are counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// A TorchServe frontend: TorchServe's exact counting rules.
    TorchServe,
    /// Any other HTTP/1 server (`--pid`, `--port`): every final response counts.
    Generic,
}

/// Latency histogram buckets in seconds: from sub-millisecond echo models to minute-long generation.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Most distinct (model, version, hostname) label sets given per-model series. Far above any real
/// deployment (hundreds of models per node), low enough that junk model names cannot exhaust memory.
pub const MAX_MODEL_SERIES: usize = 2000;

/// Labels of servescope's per-exchange families.
const EXCHANGE_LABELS: &[&str] = &["model_name", "model_version", "status_class", "hostname"];

/// All families servescope serves. Cheap to clone (handles to shared metrics).
#[derive(Clone)]
pub struct Registry {
    registry: prometheus::Registry,
    requests_2xx: CounterVec,
    requests_4xx: CounterVec,
    requests_5xx: CounterVec,
    inference_requests: StoredFamily,
    /// (model, version, hostname) label sets that have series; bounded by `max_model_series`.
    model_series: std::sync::Arc<std::sync::Mutex<ModelSeries>>,
    max_model_series: usize,
    pub model_series_overflow: IntCounter,
    inference_latency: StoredFamily,
    queue_latency: StoredFamily,
    queue_time: prometheus::GaugeVec,
    // From the workers (workers.rs): gauges as TorchServe keeps them, last value wins.
    handler_time: GaugeVec,
    prediction_time: GaugeVec,
    worker_load_time: GaugeVec,
    worker_thread_time: GaugeVec,
    batch_size: StoredFamily,
    /// Per request: the read that completed it → its frame's write to a worker (ts_queue_latency as
    /// a distribution).
    queue_duration: StoredFamily,
    /// Per batch: the frontend's write of the frame → its read of the worker's reply.
    backend_duration: StoredFamily,
    pub otf_corrupt: IntCounter,
    worker_cpu: CounterVec,
    worker_rss: SampledGauge,
    worker_gpu: SampledGauge,
    // servescope's own families.
    request_duration: StoredFamily,
    request_bytes: StoredFamily,
    response_bytes: StoredFamily,
    /// Requests read and not yet answered in full, over every traced connection (set by the pipeline).
    pub in_flight: IntGauge,
    pub kernel_lost: IntCounterVec,
    /// Head bytes of data records the kernel copied to the agent, at [`copied_index`].
    pub copied_bytes: [IntCounter; 6],
    copied_bytes_family: IntCounterVec,
    pub decode_errors: IntCounter,
    pub parse_errors: IntCounter,
    pub unmatched_responses: IntCounter,
    pub dropped_requests: IntCounter,
    pub framing_mismatches: IntCounter,
    pub evicted_connections: IntCounter,
    /// Connections to the metrics endpoint closed at once because it held its maximum.
    pub metrics_connections_rejected: IntCounter,
    /// How long the previous `/metrics` body took to render (gather and encode, not the transfer).
    pub metrics_render_seconds: prometheus::Gauge,
    pub targets: IntGauge,
    pub build_info: IntGaugeVec,
    // What the agent itself costs (set by `set_agent_usage`).
    agent_cpu: prometheus::Counter,
    agent_rss: prometheus::Gauge,
    bpf_runs: IntCounterVec,
    bpf_run_seconds: CounterVec,
    // Request-log sinks (sink/), labelled by `sink`: request_log, syslog, latency_csv.
    pub log_written: IntCounterVec,
    pub log_dropped: IntCounterVec,
    pub log_errors: IntCounterVec,
    // Sampler families (sampler/): replaced whole by each sample, see `set_system` / `set_gpu`.
    system: SystemGauges,
    gpu: GpuGauges,
}

/// Where the copied bytes of a data record in direction `egress` on a socket of `family` count in
/// [`Registry::copied_bytes`]: ingress, egress for tcp, then unix, then pipe.
pub fn copied_index(egress: bool, family: u8) -> usize {
    let transport = match family {
        crate::events::FAMILY_UNIX => 1,
        crate::events::FAMILY_PIPE => 2,
        _ => 0,
    };
    transport * 2 + usize::from(egress)
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // Only reachable with an invalid static name or label set, which the unit tests exercise.
    #[expect(
        clippy::expect_used,
        reason = "static metric definitions; a failure is a programming error"
    )]
    r.expect("static metric definition is valid")
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    pub fn new() -> Self {
        let registry = prometheus::Registry::new();
        let ts_counter = |name: &str| {
            let spec = torchserve_family(name)
                .unwrap_or_else(|| unreachable!("{name} is in the catalogue"));
            must(CounterVec::new(
                Opts::new(spec.name, spec.help()),
                spec.labels,
            ))
        };
        // The per-model ones, in servescope's own storage (registry/store.rs).
        let ts_model_counter = |name: &str| {
            let spec = torchserve_family(name)
                .unwrap_or_else(|| unreachable!("{name} is in the catalogue"));
            StoredFamily::counter(spec.name, spec.help(), spec.labels)
        };
        let ts_gauge = |name: &str| {
            let spec = torchserve_family(name)
                .unwrap_or_else(|| unreachable!("{name} is in the catalogue"));
            must(GaugeVec::new(
                Opts::new(spec.name, spec.help()),
                spec.labels,
            ))
        };
        // What the kernel copied out of traced processes' traffic (the heads of their reads and
        // writes): how much of it reached the agent at all, for an operator to audit (README
        // "Privacy").
        let copied = must(IntCounterVec::new(
            Opts::new(
                "servescope_kernel_copied_bytes_total",
                "Bytes of traced traffic the kernel copied to the agent (the heads of reads and \
                 writes it parses; message bodies it counted by their length are not copied), by \
                 direction and transport: tcp (HTTP clients), unix (TorchServe's frontend and its \
                 workers), pipe (the workers' log lines).",
            ),
            &["direction", "transport"],
        ));
        let r = Registry {
            copied_bytes: std::array::from_fn(|i| {
                copied.with_label_values(&[
                    ["ingress", "egress"][i % 2],
                    ["tcp", "unix", "pipe"][i / 2],
                ])
            }),
            copied_bytes_family: copied,
            requests_2xx: ts_counter("Requests2XX"),
            requests_4xx: ts_counter("Requests4XX"),
            requests_5xx: ts_counter("Requests5XX"),
            inference_requests: ts_model_counter("ts_inference_requests_total"),
            model_series: std::sync::Arc::default(),
            max_model_series: MAX_MODEL_SERIES,
            model_series_overflow: must(IntCounter::new(
                "servescope_model_series_overflow_total",
                "Inference requests not given a per-model series because MAX_MODEL_SERIES distinct \
                 (model, version, hostname) label sets already exist (cardinality bound).",
            )),
            inference_latency: ts_model_counter("ts_inference_latency_microseconds"),
            queue_latency: ts_model_counter("ts_queue_latency_microseconds"),
            queue_time: {
                let spec = torchserve_family("QueueTime")
                    .unwrap_or_else(|| unreachable!("in the catalogue"));
                must(prometheus::GaugeVec::new(
                    Opts::new(spec.name, spec.help()),
                    spec.labels,
                ))
            },
            handler_time: ts_gauge("HandlerTime"),
            prediction_time: ts_gauge("PredictionTime"),
            worker_load_time: ts_gauge("WorkerLoadTime"),
            worker_thread_time: ts_gauge("WorkerThreadTime"),
            batch_size: StoredFamily::histogram(
                "servescope_batch_size",
                "Requests per inference batch a TorchServe worker received (from its reads of the \
                 frontend's frame), by model and version.",
                &["model_name", "model_version", "hostname"],
                &BATCH_BUCKETS,
            ),
            queue_duration: StoredFamily::histogram(
                "servescope_queue_duration_seconds",
                "Time each inference request waited in TorchServe: from the read that completed it \
                 to the frontend's write of its batch to a worker (ts_queue_latency_microseconds as \
                 a distribution), by model and version.",
                &["model_name", "model_version", "hostname"],
                &LATENCY_BUCKETS,
            ),
            backend_duration: StoredFamily::histogram(
                "servescope_worker_backend_duration_seconds",
                "Time a TorchServe worker held each batch: from the frontend's write of the frame \
                 to its read of the worker's reply, by model and version.",
                &["model_name", "model_version", "hostname"],
                &LATENCY_BUCKETS,
            ),
            otf_corrupt: must(IntCounter::new(
                "servescope_otf_corrupt_frames_total",
                "Frames on TorchServe worker sockets that did not decode (skipped up to the next frame).",
            )),
            worker_cpu: must(CounterVec::new(
                Opts::new(
                    "servescope_worker_cpu_seconds_total",
                    "CPU time (user + system) of each TorchServe worker process, from /proc/PID/stat.",
                ),
                WORKER_LABELS,
            )),
            worker_rss: SampledGauge::own(
                "servescope_worker_resident_memory_bytes",
                "Resident memory of each TorchServe worker process, from /proc/PID/statm.",
                WORKER_LABELS,
            ),
            worker_gpu: SampledGauge::own(
                "servescope_worker_gpu_memory_bytes",
                "GPU memory of each TorchServe worker process on each device, from NVML.",
                WORKER_GPU_LABELS,
            ),
            request_duration: StoredFamily::histogram(
                "servescope_request_duration_seconds",
                "Time from the read that completed an inference request to the write of its response \
                 status line (TorchServe's latency), by model, version and status class.",
                EXCHANGE_LABELS,
                &LATENCY_BUCKETS,
            ),
            // Counters, not histograms: a size histogram per model would double the samples of
            // every scrape (the latency histogram is most of them at 1,000 models); the sums give
            // throughput and, over `ts_inference_requests_total`, the mean size.
            request_bytes: StoredFamily::counter(
                "servescope_request_bytes_total",
                "Bytes of inference requests (head and body) the server read, by model, version and \
                 response status class.",
                EXCHANGE_LABELS,
            ),
            response_bytes: StoredFamily::counter(
                "servescope_response_bytes_total",
                "Bytes of responses to inference requests (head and body) the server wrote, by model, \
                 version and status class.",
                EXCHANGE_LABELS,
            ),
            in_flight: must(IntGauge::new(
                "servescope_http_requests_in_flight",
                "Requests on traced connections read and not yet answered in full.",
            )),
            kernel_lost: must(IntCounterVec::new(
                Opts::new(
                    "servescope_kernel_lost_events_total",
                    "Records the kernel programs could not deliver, by reason.",
                ),
                &["reason"],
            )),
            decode_errors: must(IntCounter::new(
                "servescope_decode_errors_total",
                "Ring-buffer records the agent could not decode.",
            )),
            parse_errors: must(IntCounter::new(
                "servescope_http_parse_errors_total",
                "Bytes on traced connections that were not valid HTTP/1.x where a message head was expected.",
            )),
            unmatched_responses: must(IntCounter::new(
                "servescope_unmatched_responses_total",
                "Responses written without a request the agent could pair them with.",
            )),
            dropped_requests: must(IntCounter::new(
                "servescope_http_requests_dropped_total",
                "Requests dropped unanswered: their connection already had too many waiting (a client \
                 pipelining without reading replies), or it was evicted with requests pending.",
            )),
            framing_mismatches: must(IntCounter::new(
                "servescope_kernel_framing_mismatches_total",
                "Reads and writes the kernel counted as message body where the agent's HTTP parser \
                 expected a message head: the two disagree on where a message ends. That message is \
                 then counted as an unseen one; expected 0.",
            )),
            evicted_connections: must(IntCounter::new(
                "servescope_connections_evicted_total",
                "Connections the agent stopped tracking because it held its maximum; the least \
                 recently active goes first, and is picked up again at its next request.",
            )),
            metrics_connections_rejected: must(IntCounter::new(
                "servescope_metrics_connections_rejected_total",
                "Connections to the metrics endpoint closed unserved because it already held its \
                 maximum of open connections.",
            )),
            metrics_render_seconds: must(prometheus::Gauge::new(
                "servescope_metrics_render_seconds",
                "Time the previous /metrics response took to render (gather and encode; not the \
                 transfer), in seconds.",
            )),
            targets: must(IntGauge::new(
                "servescope_targets",
                "Processes being traced.",
            )),
            build_info: must(IntGaugeVec::new(
                Opts::new("servescope_build_info", "servescope version; always 1."),
                &["version"],
            )),
            agent_cpu: must(prometheus::Counter::new(
                "servescope_agent_cpu_seconds_total",
                "CPU time (user + system) of the servescope process itself, from /proc/self/stat; \
                 its eBPF programs' time is servescope_bpf_program_run_seconds_total.",
            )),
            agent_rss: must(prometheus::Gauge::new(
                "servescope_agent_resident_memory_bytes",
                "Resident memory of the servescope process itself (its ring-buffer mappings included).",
            )),
            bpf_runs: must(IntCounterVec::new(
                Opts::new(
                    "servescope_bpf_program_runs_total",
                    "Runs of each of servescope's eBPF programs, counted by the kernel only while BPF \
                     statistics are on (--bpf-stats, or sysctl kernel.bpf_stats_enabled=1); absent \
                     until a program has run with them on.",
                ),
                &["program"],
            )),
            bpf_run_seconds: must(CounterVec::new(
                Opts::new(
                    "servescope_bpf_program_run_seconds_total",
                    "Time spent in each of servescope's eBPF programs, counted by the kernel only \
                     while BPF statistics are on. They run inside the syscalls of every process on \
                     the host (and then filter), so this is what tracing costs the node in the kernel.",
                ),
                &["program"],
            )),
            log_written: must(IntCounterVec::new(
                Opts::new(
                    "servescope_log_written_total",
                    "Request records written by each request-log sink.",
                ),
                &["sink"],
            )),
            log_dropped: must(IntCounterVec::new(
                Opts::new(
                    "servescope_log_dropped_total",
                    "Request records a request-log sink lost: its queue was full, or the write failed \
                     (disk full, syslog server gone at shutdown).",
                ),
                &["sink"],
            )),
            log_errors: must(IntCounterVec::new(
                Opts::new(
                    "servescope_log_errors_total",
                    "Failed writes, opens, rotations and connects of each request-log sink.",
                ),
                &["sink"],
            )),
            system: SystemGauges::new(),
            gpu: GpuGauges::new(),
            registry,
        };
        r.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // Print every loss reason from the start: an absent series cannot be told apart from zero losses.
        for (_, reason) in crate::events::LOSS_REASONS {
            r.kernel_lost.with_label_values(&[reason]);
        }
        let collectors: [Box<dyn Collector>; 22] = [
            Box::new(r.in_flight.clone()),
            Box::new(r.copied_bytes_family.clone()),
            Box::new(r.requests_2xx.clone()),
            Box::new(r.requests_4xx.clone()),
            Box::new(r.requests_5xx.clone()),
            Box::new(r.model_series_overflow.clone()),
            Box::new(r.queue_time.clone()),
            Box::new(r.kernel_lost.clone()),
            Box::new(r.decode_errors.clone()),
            Box::new(r.parse_errors.clone()),
            Box::new(r.unmatched_responses.clone()),
            Box::new(r.dropped_requests.clone()),
            Box::new(r.framing_mismatches.clone()),
            Box::new(r.evicted_connections.clone()),
            Box::new(r.metrics_connections_rejected.clone()),
            Box::new(r.metrics_render_seconds.clone()),
            Box::new(r.targets.clone()),
            Box::new(r.build_info.clone()),
            Box::new(r.agent_cpu.clone()),
            Box::new(r.agent_rss.clone()),
            Box::new(r.bpf_runs.clone()),
            Box::new(r.bpf_run_seconds.clone()),
        ];
        for c in collectors {
            must(r.registry.register(c));
        }
        for g in r.system.all().into_iter().chain(r.gpu.all()) {
            must(r.registry.register(Box::new(g.vec.clone())));
        }
        for c in [
            &r.log_written,
            &r.log_dropped,
            &r.log_errors,
            &r.gpu.xid_errors,
        ] {
            must(r.registry.register(Box::new(c.clone())));
        }
        let workers: [Box<dyn Collector>; 8] = [
            Box::new(r.handler_time.clone()),
            Box::new(r.worker_thread_time.clone()),
            Box::new(r.prediction_time.clone()),
            Box::new(r.worker_load_time.clone()),
            Box::new(r.otf_corrupt.clone()),
            Box::new(r.worker_cpu.clone()),
            Box::new(r.worker_rss.vec.clone()),
            Box::new(r.worker_gpu.vec.clone()),
        ];
        for c in workers {
            must(r.registry.register(c));
        }
        r
    }

    /// One batch of `requests` received by a worker of (model, version).
    pub fn observe_batch(&self, model: &str, version: &str, hostname: &str, requests: u32) {
        self.batch_size
            .observe(&[model, version, hostname], f64::from(requests));
    }

    /// One batch a worker of (model, version) held for `seconds` (frame written → reply read).
    pub fn observe_backend(&self, model: &str, version: &str, hostname: &str, seconds: f64) {
        self.backend_duration
            .observe(&[model, version, hostname], seconds);
    }

    /// HandlerTime or PredictionTime from a worker's `[METRICS]` line (last value wins, as in
    /// TorchServe). Other names are ignored.
    pub fn set_model_metric(&self, name: &str, model: &str, level: &str, hostname: &str, v: f64) {
        let gauge = match name {
            "HandlerTime" => &self.handler_time,
            "PredictionTime" => &self.prediction_time,
            _ => return,
        };
        gauge.with_label_values(&[model, level, hostname]).set(v);
    }

    /// WorkerLoadTime of one worker (`W-<port>-<model>_<version>`), ms.
    pub fn set_worker_load_time(&self, worker: &str, hostname: &str, ms: f64) {
        self.worker_load_time
            .with_label_values(&[worker, "Host", hostname])
            .set(ms);
    }

    /// WorkerThreadTime: the frontend's own time in the last worker cycle, whole ms.
    pub fn set_worker_thread_time(&self, hostname: &str, ms: f64) {
        self.worker_thread_time
            .with_label_values(&["Host", hostname])
            .set(ms);
    }

    /// Replaces the per-worker process families: every worker of `usage` and no other. CPU time is a
    /// counter: it grows by what the process used since the last sample (a worker's series starts
    /// with its whole CPU time so far).
    pub fn set_worker_usage(&self, usage: &[WorkerUsage]) {
        let mut rss = Vec::new();
        let mut keep = HashSet::new();
        for u in usage {
            let labels = [
                u.model_name.as_str(),
                u.model_version.as_str(),
                u.worker_name.as_str(),
                u.hostname.as_str(),
            ];
            let c = self.worker_cpu.with_label_values(&labels);
            let grew = u.cpu_seconds - c.get();
            if grew > 0.0 {
                c.inc_by(grew);
            }
            rss.push((
                labels.iter().map(|l| (*l).to_owned()).collect(),
                u.rss_bytes,
            ));
            keep.insert(labels.map(str::to_owned));
        }
        self.worker_rss.replace(&rss);
        for family in self.worker_cpu.collect() {
            for m in family.get_metric() {
                let values: Vec<&str> = labels_in_order(m, WORKER_LABELS);
                let owned: [String; 4] = [0, 1, 2, 3].map(|i| values[i].to_owned());
                if !keep.contains(&owned) {
                    let _ = self.worker_cpu.remove_label_values(&values);
                }
            }
        }
    }

    /// What the agent costs: its own CPU seconds and resident bytes so far, and its programs' kernel
    /// run statistics (cumulative, as the kernel keeps them; a program that has not run with
    /// statistics on gets no series).
    pub fn set_agent_usage(&self, cpu_seconds: f64, rss_bytes: f64, programs: &[ProgramRuns]) {
        let grew = cpu_seconds - self.agent_cpu.get();
        if grew > 0.0 {
            self.agent_cpu.inc_by(grew);
        }
        self.agent_rss.set(rss_bytes);
        for p in programs.iter().filter(|p| p.runs > 0) {
            let runs = self.bpf_runs.with_label_values(&[p.name.as_str()]);
            runs.inc_by(p.runs.saturating_sub(runs.get()));
            let secs = self.bpf_run_seconds.with_label_values(&[p.name.as_str()]);
            let grew = p.run_time.as_secs_f64() - secs.get();
            if grew > 0.0 {
                secs.inc_by(grew);
            }
        }
    }

    /// The families with samples, as the `prometheus` crate gathers them.
    /// Every family as `proto` structs, sorted by name (as `prometheus::Registry::gather`). A copy
    /// of everything: for tests and tools; `/metrics` renders from [`Registry::gather_collectors`]
    /// and [`Registry::stored`] instead.
    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        let mut families = self.gather_collectors();
        families.extend(self.stored().iter().filter_map(|f| f.proto()));
        families.sort_by(|a, b| a.name().cmp(b.name()));
        families
    }

    /// The families held by the prometheus crate (all but [`Registry::stored`]), sorted by name.
    pub fn gather_collectors(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.registry.gather()
    }

    /// The per-model families kept in servescope's own storage (`registry/store.rs`).
    pub fn stored(&self) -> [&StoredFamily; 9] {
        [
            &self.inference_requests,
            &self.inference_latency,
            &self.queue_latency,
            &self.request_bytes,
            &self.response_bytes,
            &self.request_duration,
            &self.batch_size,
            &self.queue_duration,
            &self.backend_duration,
        ]
    }

    /// Runs `f` with the series of (model, version, class, hostname) if (model, version, hostname) may
    /// have series: known ones always; new ones while fewer than [`MAX_MODEL_SERIES`] exist. Model
    /// names come from URLs, so a client spraying random names (which a generic server answers, or
    /// TorchServe with a model API) must not grow the agent without bound; what is turned away is
    /// counted in `servescope_model_series_overflow_total`.
    fn with_model_series(
        &self,
        model: &str,
        version: &str,
        class: &str,
        hostname: &str,
        f: impl FnOnce(&mut ModelSeriesIds),
    ) {
        let mut guard = self
            .model_series
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let ModelSeries { seen, ids, key } = &mut *guard;
        store::label_key(key, &[model, version, class, hostname]);
        if let Some(known) = ids.get_mut(key.as_slice()) {
            f(known);
            return;
        }
        let with_class: Box<[u8]> = key.as_slice().into();
        store::label_key(key, &[model, version, hostname]);
        if !seen.contains(key.as_slice()) {
            if seen.len() >= self.max_model_series {
                self.model_series_overflow.inc();
                return;
            }
            seen.insert(key.as_slice().into());
        }
        f(ids.entry(with_class).or_default());
    }

    /// Counts one exchange of a traced server with TorchServe's rules (FACTS.md §3).
    pub fn record(&self, ex: &Exchange, hostname: &str, flavor: Flavor) {
        self.record_with_dispatch(ex, hostname, flavor, None);
    }

    /// As [`Registry::record`], with the kernel time at which the TorchServe frontend wrote the
    /// request's inference frame to its worker (`otf`), when it was seen: that ends TorchServe's queue
    /// time, which `ts_queue_latency_microseconds` sums and `QueueTime` shows for the last job.
    pub fn record_with_dispatch(
        &self,
        ex: &Exchange,
        hostname: &str,
        flavor: Flavor,
        dispatched_ns: Option<u64>,
    ) {
        let route = ex.request.as_ref().map(|r| routing::route(&r.target));
        self.record_routed(ex, route.as_ref(), hostname, flavor, dispatched_ns);
    }

    /// [`Registry::record_with_dispatch`] with the request's route already taken (the reader routes
    /// each exchange once for the registry and the request-log sinks).
    pub fn record_routed(
        &self,
        ex: &Exchange,
        route: Option<&Route>,
        hostname: &str,
        flavor: Flavor,
        dispatched_ns: Option<u64>,
    ) {
        let status = ex.response.status;
        let torchserve = flavor == Flavor::TorchServe;
        // Netty's own 413 (body over max_request_size) never reaches TorchServe's counters; it is the
        // only frontend response without an x-request-id.
        let netty_413 = torchserve && status == 413 && ex.response.request_id.is_none();
        if netty_413 {
            return;
        }
        let class = match status {
            200..=299 => &self.requests_2xx,
            400..=499 => &self.requests_4xx,
            // TorchServe puts everything else, 1xx and 3xx included, in Requests5XX.
            _ => &self.requests_5xx,
        };
        class.with_label_values(&["Host", hostname]).inc();

        let Some(req) = &ex.request else { return };
        let Some(Route::Inference { model, version }) = route else {
            return;
        };
        // OPTIONS is answered by the frontend with an OpenAPI description; no inference happens.
        if req.method.eq_ignore_ascii_case("OPTIONS") {
            return;
        }
        // Frontend-made errors for unknown model/version (404), bad requests (400) and oversized bodies
        // (413) are not inference requests; the frontend gives them their standard reason phrase while
        // worker replies carry the handler's phrase or none.
        let frontend_error = is_standard_phrase(status, &ex.response.reason);
        if torchserve && frontend_error && matches!(status, 400 | 404 | 413) {
            return;
        }
        let class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.with_model_series(model, version, class, hostname, |ids| {
            let labels = [model.as_ref(), version.as_ref(), hostname];
            let by_class = [model.as_ref(), version.as_ref(), class, hostname];
            inc(
                &self.inference_requests,
                &mut ids.inference_requests,
                &labels,
                1.0,
            );
            // Byte counts stay exact as f64 up to 2^53 (8 PiB) per series.
            #[expect(clippy::cast_precision_loss, reason = "exact below 2^53")]
            {
                let (request, response) = (req.bytes as f64, ex.response.bytes as f64);
                inc(
                    &self.request_bytes,
                    &mut ids.request_bytes,
                    &by_class,
                    request,
                );
                inc(
                    &self.response_bytes,
                    &mut ids.response_bytes,
                    &by_class,
                    response,
                );
            }

            // TorchServe adds latency only when the worker's batch reply was 200: handler exceptions
            // and "no worker" are frontend-made 5xx with the standard phrase and add nothing.
            if torchserve && frontend_error && status >= 500 {
                return;
            }
            // Queue time, timed from the same start as the latency: the read that completed the
            // request.
            if let Some(queue_ns) = dispatched_ns.and_then(|d| d.checked_sub(req.complete_ns)) {
                #[expect(
                    clippy::cast_precision_loss,
                    reason = "nanosecond spans fit f64's 52-bit mantissa"
                )]
                let us = queue_ns as f64 / 1000.0;
                inc(&self.queue_latency, &mut ids.queue_latency, &labels, us);
                observe(
                    &self.queue_duration,
                    &mut ids.queue_duration,
                    &labels,
                    us / 1e6,
                );
                // QueueTime is whole milliseconds of the last job (TorchServe's gauge).
                self.queue_time
                    .with_label_values(&["Host", hostname])
                    .set((us / 1000.0).floor());
            }
            if let Some(us) = ex.latency_us() {
                inc(
                    &self.inference_latency,
                    &mut ids.inference_latency,
                    &labels,
                    us,
                );
                let seconds = us / 1e6;
                observe(
                    &self.request_duration,
                    &mut ids.request_duration,
                    &by_class,
                    seconds,
                );
            }
        });
    }
}

/// `family`'s series `values`, found through `slot` once it has been seen.
fn cached(slot: &mut Option<SeriesId>, family: &StoredFamily, values: &[&str]) -> Option<SeriesId> {
    if slot.is_none() {
        *slot = family.series_id(values);
    }
    *slot
}

/// Adds `v` to `family`'s series `values` ([`cached`] in `slot`).
fn inc(family: &StoredFamily, slot: &mut Option<SeriesId>, values: &[&str], v: f64) {
    if let Some(id) = cached(slot, family, values) {
        family.inc_by_id(id, v);
    }
}

/// Records `v` in `family`'s series `values` ([`cached`] in `slot`).
fn observe(family: &StoredFamily, slot: &mut Option<SeriesId>, values: &[&str], v: f64) {
    if let Some(id) = cached(slot, family, values) {
        family.observe_id(id, v);
    }
}

/// The series an inference response of one (model, version, status class, hostname) updates, each
/// found the first time it is (a series appears only once it has a value, as before), so that the
/// next responses skip the families' label lookups: one lookup per response instead of seven.
#[derive(Clone, Copy, Debug, Default)]
struct ModelSeriesIds {
    inference_requests: Option<SeriesId>,
    request_bytes: Option<SeriesId>,
    response_bytes: Option<SeriesId>,
    queue_latency: Option<SeriesId>,
    queue_duration: Option<SeriesId>,
    inference_latency: Option<SeriesId>,
    request_duration: Option<SeriesId>,
}

/// The per-model label sets, keyed by [`store::label_key`] (checked for every inference response, so
/// without an allocation).
#[derive(Default)]
struct ModelSeries {
    /// (model, version, hostname) admitted so far ([`Registry::with_model_series`]).
    seen: HashSet<Box<[u8]>, foldhash::fast::RandomState>,
    /// (model, version, status class, hostname) of admitted label sets → their series.
    ids: HashMap<Box<[u8]>, ModelSeriesIds, foldhash::fast::RandomState>,
    /// Scratch for building a lookup key.
    key: Vec<u8>,
}

/// Labels of the per-worker process families.
const WORKER_LABELS: &[&str] = &["model_name", "model_version", "worker_name", "hostname"];
const WORKER_GPU_LABELS: &[&str] = &[
    "model_name",
    "model_version",
    "worker_name",
    "hostname",
    "device_id",
];

/// Batch-size histogram buckets: TorchServe batch sizes are small powers of two in practice.
pub const BATCH_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// One worker process's resource use (sampler).
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerUsage {
    pub model_name: String,
    pub model_version: String,
    pub worker_name: String,
    pub hostname: String,
    pub cpu_seconds: f64,
    pub rss_bytes: f64,
}

/// Who a worker is, as its `servescope_worker_*` series are labelled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerUsageLabels {
    pub model_name: String,
    pub model_version: String,
    pub worker_name: String,
    pub hostname: String,
}

/// One hostname's values for TorchServe's system families (FACTS.md §2; meaning in `sampler::procfs`).
/// `None` leaves that family without a sample for the hostname.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SystemValues {
    /// CPUUtilization, percent.
    pub cpu_utilization: Option<f64>,
    /// MemoryUsed, MiB.
    pub memory_used: Option<f64>,
    /// MemoryAvailable, MiB.
    pub memory_available: Option<f64>,
    /// MemoryUtilization, percent.
    pub memory_utilization: Option<f64>,
    /// DiskUsage, GiB.
    pub disk_usage: Option<f64>,
    /// DiskAvailable, GiB.
    pub disk_available: Option<f64>,
    /// DiskUtilization, percent.
    pub disk_utilization: Option<f64>,
}

/// One GPU's values: TorchServe's GPU families (meaning in `sampler::nvml`) and servescope's own.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GpuValues {
    /// NVML index, TorchServe's `DeviceId`.
    pub device_id: u32,
    /// GPUUtilization, percent.
    pub utilization: Option<f64>,
    /// GPUMemoryUtilization, percent of memory allocated.
    pub memory_utilization: Option<f64>,
    /// GPUMemoryUsed, whole MiB.
    pub memory_used_mb: Option<f64>,
    pub memory_used_bytes: Option<f64>,
    pub memory_total_bytes: Option<f64>,
    pub temperature_celsius: Option<f64>,
    pub power_watts: Option<f64>,
    pub sm_clock_hertz: Option<f64>,
    /// NVML's aggregate (device-lifetime) ECC error counts.
    pub ecc_corrected: Option<f64>,
    pub ecc_uncorrected: Option<f64>,
}

/// A gauge family whose whole sample set a sampler replaces at once, so series of hostnames or
/// devices that went away disappear instead of keeping their last value.
#[derive(Clone)]
struct SampledGauge {
    vec: GaugeVec,
    /// Label names in the order `with_label_values` takes them.
    labels: &'static [&'static str],
}

impl SampledGauge {
    /// A TorchServe family from the catalogue.
    fn torchserve(name: &str) -> Self {
        let spec =
            torchserve_family(name).unwrap_or_else(|| unreachable!("{name} is in the catalogue"));
        SampledGauge {
            vec: must(GaugeVec::new(
                Opts::new(spec.name, spec.help()),
                spec.labels,
            )),
            labels: spec.labels,
        }
    }

    fn own(name: &str, help: &str, labels: &'static [&'static str]) -> Self {
        SampledGauge {
            vec: must(GaugeVec::new(Opts::new(name, help), labels)),
            labels,
        }
    }

    /// Sets every series of `series` (label values in `labels` order) and removes all others.
    fn replace(&self, series: &[(Vec<String>, f64)]) {
        for (values, v) in series {
            let values: Vec<&str> = values.iter().map(String::as_str).collect();
            self.vec.with_label_values(&values).set(*v);
        }
        let keep: HashSet<&[String]> = series.iter().map(|(l, _)| l.as_slice()).collect();
        for family in self.vec.collect() {
            for metric in family.get_metric() {
                let values: Vec<String> = labels_in_order(metric, self.labels)
                    .into_iter()
                    .map(str::to_owned)
                    .collect();
                if !keep.contains(values.as_slice()) {
                    let values: Vec<&str> = values.iter().map(String::as_str).collect();
                    // Only fails for a series that is already gone.
                    let _ = self.vec.remove_label_values(&values);
                }
            }
        }
    }
}

/// Reads one family's value out of a [`SystemValues`].
type SystemField = fn(&SystemValues) -> Option<f64>;

#[derive(Clone)]
struct SystemGauges {
    cpu_utilization: SampledGauge,
    memory_used: SampledGauge,
    memory_available: SampledGauge,
    memory_utilization: SampledGauge,
    disk_usage: SampledGauge,
    disk_available: SampledGauge,
    disk_utilization: SampledGauge,
}

impl SystemGauges {
    fn new() -> Self {
        SystemGauges {
            cpu_utilization: SampledGauge::torchserve("CPUUtilization"),
            memory_used: SampledGauge::torchserve("MemoryUsed"),
            memory_available: SampledGauge::torchserve("MemoryAvailable"),
            memory_utilization: SampledGauge::torchserve("MemoryUtilization"),
            disk_usage: SampledGauge::torchserve("DiskUsage"),
            disk_available: SampledGauge::torchserve("DiskAvailable"),
            disk_utilization: SampledGauge::torchserve("DiskUtilization"),
        }
    }

    fn all(&self) -> Vec<&SampledGauge> {
        self.fields().into_iter().map(|(g, _)| g).collect()
    }

    /// Each family with the accessor of its value.
    fn fields(&self) -> [(&SampledGauge, SystemField); 7] {
        [
            (&self.cpu_utilization, |v| v.cpu_utilization),
            (&self.memory_used, |v| v.memory_used),
            (&self.memory_available, |v| v.memory_available),
            (&self.memory_utilization, |v| v.memory_utilization),
            (&self.disk_usage, |v| v.disk_usage),
            (&self.disk_available, |v| v.disk_available),
            (&self.disk_utilization, |v| v.disk_utilization),
        ]
    }
}

/// Reads one family's value out of a [`GpuValues`].
type GpuField = fn(&GpuValues) -> Option<f64>;

/// Labels of servescope's own GPU families.
const OWN_GPU: &[&str] = &["device_id", "hostname"];

#[derive(Clone)]
struct GpuGauges {
    utilization: SampledGauge,
    memory_utilization: SampledGauge,
    memory_used: SampledGauge,
    memory_used_bytes: SampledGauge,
    memory_total_bytes: SampledGauge,
    temperature: SampledGauge,
    power: SampledGauge,
    sm_clock: SampledGauge,
    ecc_corrected: SampledGauge,
    ecc_uncorrected: SampledGauge,
    /// `servescope_gpu_process_memory_bytes{device_id, pid}`; see `Registry::set_gpu_processes`.
    process_memory: SampledGauge,
    /// `servescope_gpu_xid_errors_total{device_id, xid}`: node events, not per traced server.
    xid_errors: IntCounterVec,
}

impl GpuGauges {
    fn new() -> Self {
        GpuGauges {
            utilization: SampledGauge::torchserve("GPUUtilization"),
            memory_utilization: SampledGauge::torchserve("GPUMemoryUtilization"),
            memory_used: SampledGauge::torchserve("GPUMemoryUsed"),
            memory_used_bytes: SampledGauge::own(
                "servescope_gpu_memory_used_bytes",
                "GPU memory allocated on the device (NVML), in bytes.",
                OWN_GPU,
            ),
            memory_total_bytes: SampledGauge::own(
                "servescope_gpu_memory_total_bytes",
                "GPU memory installed on the device (NVML), in bytes.",
                OWN_GPU,
            ),
            temperature: SampledGauge::own(
                "servescope_gpu_temperature_celsius",
                "GPU die temperature (NVML), in degrees Celsius.",
                OWN_GPU,
            ),
            power: SampledGauge::own(
                "servescope_gpu_power_watts",
                "Power drawn by the GPU and its memory (NVML), in watts.",
                OWN_GPU,
            ),
            sm_clock: SampledGauge::own(
                "servescope_gpu_sm_clock_hertz",
                "Current streaming-multiprocessor clock (NVML), in hertz.",
                OWN_GPU,
            ),
            // Gauges: NVML's lifetime counts are read, not counted here (a replaced device starts
            // at its own count); `delta()` or `increase()`-like comparisons apply.
            ecc_corrected: SampledGauge::own(
                "servescope_gpu_ecc_corrected_errors",
                "Corrected (single-bit) ECC memory errors over the device's life (NVML aggregate \
                 counter); no sample when ECC is off or unsupported.",
                OWN_GPU,
            ),
            ecc_uncorrected: SampledGauge::own(
                "servescope_gpu_ecc_uncorrected_errors",
                "Uncorrected (double-bit) ECC memory errors over the device's life (NVML aggregate \
                 counter); no sample when ECC is off or unsupported.",
                OWN_GPU,
            ),
            process_memory: SampledGauge::own(
                "servescope_gpu_process_memory_bytes",
                "GPU memory used by each TorchServe worker process (a descendant of a traced \
                 frontend) on each device (NVML compute processes), in bytes.",
                &["device_id", "pid"],
            ),
            xid_errors: must(IntCounterVec::new(
                Opts::new(
                    "servescope_gpu_xid_errors_total",
                    "XID errors the NVIDIA driver reported (NVML critical XID events) since the \
                     agent started, by device and XID number; no samples when NVML cannot deliver \
                     them.",
                ),
                &["device_id", "xid"],
            )),
        }
    }

    fn all(&self) -> Vec<&SampledGauge> {
        let mut all: Vec<&SampledGauge> = self.fields().into_iter().map(|(g, _, _)| g).collect();
        all.push(&self.process_memory);
        all
    }

    /// Each family, whether it uses TorchServe's labels, and the accessor of its value.
    fn fields(&self) -> [(&SampledGauge, bool, GpuField); 10] {
        [
            (&self.utilization, true, |v| v.utilization),
            (&self.memory_utilization, true, |v| v.memory_utilization),
            (&self.memory_used, true, |v| v.memory_used_mb),
            (&self.memory_used_bytes, false, |v| v.memory_used_bytes),
            (&self.memory_total_bytes, false, |v| v.memory_total_bytes),
            (&self.temperature, false, |v| v.temperature_celsius),
            (&self.power, false, |v| v.power_watts),
            (&self.sm_clock, false, |v| v.sm_clock_hertz),
            (&self.ecc_corrected, false, |v| v.ecc_corrected),
            (&self.ecc_uncorrected, false, |v| v.ecc_uncorrected),
        ]
    }
}

impl Registry {
    /// Replaces the samples of TorchServe's system families: one series per hostname of `by_host`
    /// (`Level="Host"`), none for hostnames not in it.
    pub fn set_system(&self, by_host: &BTreeMap<String, SystemValues>) {
        for (gauge, value) in self.system.fields() {
            let series: Vec<(Vec<String>, f64)> = by_host
                .iter()
                .filter_map(|(host, v)| Some((vec!["Host".to_owned(), host.clone()], value(v)?)))
                .collect();
            gauge.replace(&series);
        }
    }

    /// Replaces the samples of the GPU families: every device of `devices` for every hostname of
    /// `hostnames` (the devices are the node's; each traced server's hostname gets them, as
    /// TorchServe's own collector on that host would print them).
    pub fn set_gpu(&self, hostnames: &[String], devices: &[GpuValues]) {
        for (gauge, torchserve, value) in self.gpu.fields() {
            let mut series = Vec::new();
            for host in hostnames {
                for d in devices {
                    let Some(v) = value(d) else { continue };
                    let id = d.device_id.to_string();
                    let labels = if torchserve {
                        vec!["Host".to_owned(), id, host.clone()]
                    } else {
                        vec![id, host.clone()]
                    };
                    series.push((labels, v));
                }
            }
            gauge.replace(&series);
        }
    }

    /// Replaces the samples of `servescope_gpu_process_memory_bytes` (from
    /// [`crate::sampler::nvml::process_memory`]).
    pub fn set_gpu_processes(&self, rows: &[crate::sampler::nvml::ProcessMemory]) {
        #[expect(
            clippy::cast_precision_loss,
            reason = "GPU memory sizes stay far below 2^53 bytes"
        )]
        let series: Vec<(Vec<String>, f64)> = rows
            .iter()
            .map(|p| {
                (
                    vec![p.device_id.to_string(), p.pid.to_string()],
                    p.bytes as f64,
                )
            })
            .collect();
        self.gpu.process_memory.replace(&series);
    }

    /// Replaces `servescope_worker_gpu_memory_bytes`: the GPU memory of every worker whose model is
    /// known (`rows` from [`crate::sampler::nvml::process_memory`]), and no other series.
    pub fn set_worker_gpu(&self, rows: &[(WorkerUsageLabels, u32, u64)]) {
        #[expect(
            clippy::cast_precision_loss,
            reason = "GPU memory sizes stay far below 2^53 bytes"
        )]
        let series: Vec<(Vec<String>, f64)> = rows
            .iter()
            .map(|(w, device, bytes)| {
                (
                    vec![
                        w.model_name.clone(),
                        w.model_version.clone(),
                        w.worker_name.clone(),
                        w.hostname.clone(),
                        device.to_string(),
                    ],
                    *bytes as f64,
                )
            })
            .collect();
        self.worker_gpu.replace(&series);
    }

    /// Counts XID events; `xid` `None` is labelled `unknown`. A series appears with its first event
    /// (`increase(...) > 0` alerts need no zero series).
    pub fn count_xids(&self, events: &[crate::sampler::nvml::XidEvent]) {
        for e in events {
            let xid = e
                .xid
                .map_or_else(|| "unknown".to_owned(), |x| x.to_string());
            self.gpu
                .xid_errors
                .with_label_values(&[&e.device_index.to_string(), &xid])
                .inc();
        }
    }
}

/// Whether `reason` is the standard phrase for `status` (as Netty's HttpResponseStatus prints it).
fn is_standard_phrase(status: u16, reason: &str) -> bool {
    let standard = match status {
        400 => "Bad Request",
        404 => "Not Found",
        413 => "Request Entity Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        507 => "Insufficient Storage",
        _ => return false,
    };
    reason == standard
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{Request, Response};

    fn ex(method: &str, target: &str, status: u16, reason: &str, rid: bool) -> Exchange {
        Exchange {
            tgid: 1,
            conn_id: 1,
            peer: None,
            request: Some(Request {
                method: method.to_owned().into(),
                target: target.into(),
                first_byte_ns: 1_000,
                complete_ns: 2_000,
                bytes: 10,
            }),
            response: Response {
                status,
                reason: reason.to_owned().into(),
                request_id: rid.then(|| "id".to_owned()),
                start_ns: 1_002_000,
                end_ns: Some(1_003_000),
                bytes: 100,
            },
        }
    }

    fn value(r: &Registry, family: &str, labels: &[&str]) -> Option<f64> {
        r.gather()
            .into_iter()
            .find(|f| f.name() == family)
            .and_then(|f| {
                f.get_metric()
                    .iter()
                    .find(|m| {
                        let spec = torchserve_family(family).map_or(&[][..], |s| s.labels);
                        spec.iter().zip(labels).all(|(k, v)| {
                            m.get_label()
                                .iter()
                                .any(|l| l.name() == *k && l.value() == *v)
                        })
                    })
                    .map(|m| m.get_counter().get_value())
            })
    }

    #[test]
    fn torchserve_counting_rules() {
        let r = Registry::new();
        let ts = Flavor::TorchServe;
        r.record(&ex("POST", "/predictions/echo", 200, "", true), "vm", ts);
        r.record(
            &ex("POST", "/predictions/echo/1.0", 200, "", true),
            "vm",
            ts,
        );
        r.record(
            &ex(
                "POST",
                "/predictions/fail",
                503,
                "Service Unavailable",
                true,
            ),
            "vm",
            ts,
        );
        r.record(
            &ex("POST", "/predictions/nosuch", 404, "Not Found", true),
            "vm",
            ts,
        );
        r.record(
            &ex("POST", "/predictions/echo", 422, "Echo Status", true),
            "vm",
            ts,
        );
        r.record(
            &ex("POST", "/predictions/echo", 199, "Echo Status", true),
            "vm",
            ts,
        );
        r.record(
            &ex(
                "POST",
                "/predictions/echo",
                413,
                "Request Entity Too Large",
                false,
            ),
            "vm",
            ts,
        );
        r.record(
            &ex("OPTIONS", "/predictions/echo", 200, "OK", true),
            "vm",
            ts,
        );
        r.record(
            &ex("POST", "/invocations", 400, "Bad Request", true),
            "vm",
            ts,
        );
        r.record(&ex("GET", "/ping", 200, "OK", true), "vm", ts);

        assert_eq!(value(&r, "Requests2XX", &["Host", "vm"]), Some(4.0));
        assert_eq!(value(&r, "Requests4XX", &["Host", "vm"]), Some(3.0));
        assert_eq!(value(&r, "Requests5XX", &["Host", "vm"]), Some(2.0));
        // echo/default: 200, 422, 199 (handler-set statuses count); not OPTIONS, not 413.
        assert_eq!(
            value(
                &r,
                "ts_inference_requests_total",
                &["echo", "default", "vm"]
            ),
            Some(3.0)
        );
        assert_eq!(
            value(&r, "ts_inference_requests_total", &["echo", "1.0", "vm"]),
            Some(1.0)
        );
        assert_eq!(
            value(
                &r,
                "ts_inference_requests_total",
                &["fail", "default", "vm"]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &r,
                "ts_inference_requests_total",
                &["nosuch", "default", "vm"]
            ),
            None
        );
        // 1000 µs per exchange; fail (handler exception) adds no latency and gets no series.
        assert_eq!(
            value(
                &r,
                "ts_inference_latency_microseconds",
                &["echo", "default", "vm"]
            ),
            Some(3000.0)
        );
        assert_eq!(
            value(
                &r,
                "ts_inference_latency_microseconds",
                &["fail", "default", "vm"]
            ),
            None
        );
    }

    #[test]
    fn queue_latency_from_the_worker_dispatch() {
        let r = Registry::new();
        let ts = Flavor::TorchServe;
        // Request complete at 2 µs; frame to the worker at 302 µs → 300 µs of queue.
        r.record_with_dispatch(
            &ex("POST", "/predictions/echo", 200, "", true),
            "vm",
            ts,
            Some(302_000),
        );
        r.record_with_dispatch(
            &ex("POST", "/predictions/echo", 200, "", true),
            "vm",
            ts,
            None,
        );
        // Handler exception: no queue latency either (TorchServe updates both only on a 200 batch).
        r.record_with_dispatch(
            &ex(
                "POST",
                "/predictions/fail",
                503,
                "Service Unavailable",
                true,
            ),
            "vm",
            ts,
            Some(5_000_000),
        );
        assert_eq!(
            value(
                &r,
                "ts_queue_latency_microseconds",
                &["echo", "default", "vm"]
            ),
            Some(300.0)
        );
        assert_eq!(
            value(
                &r,
                "ts_queue_latency_microseconds",
                &["fail", "default", "vm"]
            ),
            None
        );
        // The same queue time as a distribution: one observation of 300 µs, none for `fail`.
        let text = crate::exposition::torchserve::encode(
            &r.gather(),
            &crate::exposition::torchserve::Filter::all(),
        );
        let labels = "hostname=\"vm\",model_name=\"echo\",model_version=\"default\"";
        assert!(
            text.contains(&format!(
                "servescope_queue_duration_seconds_count{{{labels}}} 1\n"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "servescope_queue_duration_seconds_sum{{{labels}}} 0.0003\n"
            )),
            "{text}"
        );
        assert!(!text.contains(
            "servescope_queue_duration_seconds_count{hostname=\"vm\",model_name=\"fail\""
        ));
    }

    #[test]
    fn request_and_response_bytes_by_model_and_status_class() {
        let r = Registry::new();
        let ts = Flavor::TorchServe;
        // `ex` reads 10 request bytes and writes 100 response bytes.
        r.record(&ex("POST", "/predictions/echo", 200, "", true), "vm", ts);
        r.record(&ex("POST", "/predictions/echo", 200, "", true), "vm", ts);
        r.record(&ex("POST", "/predictions/echo", 503, "", true), "vm", ts);
        // Not inference requests: no bytes (an unknown model's 404, /ping).
        r.record(
            &ex("POST", "/predictions/nosuch", 404, "Not Found", true),
            "vm",
            ts,
        );
        r.record(&ex("GET", "/ping", 200, "", true), "vm", ts);
        let bytes = |family: &str, class: &str| {
            r.gather()
                .into_iter()
                .find(|f| f.name() == family)
                .and_then(|f| {
                    f.get_metric()
                        .iter()
                        .find(|m| {
                            m.get_label()
                                .iter()
                                .any(|l| l.name() == "status_class" && l.value() == class)
                        })
                        .map(|m| {
                            let labels: Vec<(&str, &str)> = m
                                .get_label()
                                .iter()
                                .map(|l| (l.name(), l.value()))
                                .collect();
                            assert!(labels.contains(&("model_name", "echo")), "{labels:?}");
                            assert!(labels.contains(&("hostname", "vm")), "{labels:?}");
                            m.get_counter().get_value()
                        })
                })
        };
        assert_eq!(bytes("servescope_request_bytes_total", "2xx"), Some(20.0));
        assert_eq!(bytes("servescope_response_bytes_total", "2xx"), Some(200.0));
        assert_eq!(bytes("servescope_request_bytes_total", "5xx"), Some(10.0));
        assert_eq!(bytes("servescope_response_bytes_total", "5xx"), Some(100.0));
        assert_eq!(bytes("servescope_request_bytes_total", "4xx"), None);
        let series: usize = r
            .gather()
            .iter()
            .filter(|f| f.name() == "servescope_request_bytes_total")
            .map(|f| f.get_metric().len())
            .sum();
        assert_eq!(series, 2);
    }

    #[test]
    fn model_series_are_bounded() {
        let r = Registry::new();
        for i in 0..MAX_MODEL_SERIES + 50 {
            r.record(
                &ex("POST", &format!("/predictions/m{i}"), 404, "", false),
                "h",
                Flavor::Generic,
            );
        }
        // Known series keep counting past the bound.
        r.record(
            &ex("POST", "/predictions/m0", 200, "", false),
            "h",
            Flavor::Generic,
        );
        let fam = r
            .gather()
            .into_iter()
            .find(|f| f.name() == "ts_inference_requests_total");
        assert_eq!(fam.map(|f| f.get_metric().len()), Some(MAX_MODEL_SERIES));
        assert_eq!(r.model_series_overflow.get(), 50);
        assert_eq!(
            value(&r, "ts_inference_requests_total", &["m0", "default", "h"]),
            Some(2.0)
        );
        // Status counters are not per model: all counted.
        assert_eq!(
            value(&r, "Requests4XX", &["Host", "h"]),
            Some((MAX_MODEL_SERIES + 50) as f64)
        );
    }

    #[test]
    fn generic_servers_count_every_final_response() {
        let r = Registry::new();
        r.record(
            &ex(
                "POST",
                "/predictions/a",
                413,
                "Request Entity Too Large",
                false,
            ),
            "h",
            Flavor::Generic,
        );
        r.record(
            &ex("POST", "/predictions/a", 404, "Not Found", false),
            "h",
            Flavor::Generic,
        );
        assert_eq!(value(&r, "Requests4XX", &["Host", "h"]), Some(2.0));
        assert_eq!(
            value(&r, "ts_inference_requests_total", &["a", "default", "h"]),
            Some(2.0)
        );
    }

    /// (key → value) of a family's samples, keyed by `key` of each; gauges and counters alike (the
    /// other type's value reads 0).
    fn values_by(
        r: &Registry,
        family: &str,
        key: impl Fn(&prometheus::proto::Metric) -> String,
    ) -> BTreeMap<String, f64> {
        r.gather()
            .into_iter()
            .filter(|f| f.name() == family)
            .flat_map(|f| f.get_metric().to_vec())
            .map(|m| {
                (
                    key(&m),
                    m.get_gauge().get_value() + m.get_counter().get_value(),
                )
            })
            .collect()
    }

    #[test]
    fn worker_usage_replaces_series_and_cpu_only_grows() {
        let r = Registry::new();
        let usage = |worker: &str, cpu: f64, rss: f64| WorkerUsage {
            model_name: "m".into(),
            model_version: "1.0".into(),
            worker_name: worker.into(),
            hostname: "vm".into(),
            cpu_seconds: cpu,
            rss_bytes: rss,
        };
        // (worker name → value) of one of the worker families.
        let series = |family: &str| {
            values_by(&r, family, |m| {
                labels_in_order(m, WORKER_LABELS)[2].to_owned()
            })
        };
        r.set_worker_usage(&[
            usage("W-9000-m_1.0", 1.5, 100.0),
            usage("W-9001-m_1.0", 2.0, 200.0),
        ]);
        r.set_worker_usage(&[usage("W-9000-m_1.0", 2.5, 150.0)]);
        let one = BTreeMap::from([("W-9000-m_1.0".to_owned(), 2.5)]);
        assert_eq!(
            series("servescope_worker_cpu_seconds_total"),
            one,
            "grew by 1.0; gone worker dropped"
        );
        let one = BTreeMap::from([("W-9000-m_1.0".to_owned(), 150.0)]);
        assert_eq!(series("servescope_worker_resident_memory_bytes"), one);
    }

    #[test]
    fn agent_usage_counts_only_programs_that_ran_and_only_grows() {
        let r = Registry::new();
        let prog = |name: &str, runs: u64, ns: u64| ProgramRuns {
            name: name.into(),
            runs,
            run_time: std::time::Duration::from_nanos(ns),
        };
        // (program → value) of one of the program families.
        let series = |family: &str| values_by(&r, family, |m| m.get_label()[0].value().to_owned());
        // The one sample of an unlabelled family.
        let single = |family: &str| -> f64 {
            values_by(&r, family, |_| String::new())
                .get("")
                .copied()
                .unwrap_or(f64::NAN)
        };
        r.set_agent_usage(
            1.5,
            20e6,
            &[prog("ss_exit_read", 10, 5_000), prog("ss_exit_write", 0, 0)],
        );
        // A lower reading (cannot happen for the kernel's counters) never makes a counter go back.
        r.set_agent_usage(
            1.0,
            25e6,
            &[
                prog("ss_exit_read", 30, 2_000_000_000),
                prog("ss_exit_write", 0, 0),
            ],
        );
        assert_eq!(single("servescope_agent_cpu_seconds_total"), 1.5);
        assert_eq!(single("servescope_agent_resident_memory_bytes"), 25e6);
        assert_eq!(
            series("servescope_bpf_program_runs_total"),
            BTreeMap::from([("ss_exit_read".to_owned(), 30.0)]),
            "a program with no runs (statistics off) has no series"
        );
        assert_eq!(
            series("servescope_bpf_program_run_seconds_total"),
            BTreeMap::from([("ss_exit_read".to_owned(), 2.0)])
        );
    }

    #[test]
    fn catalogue_matches_golden_capture() {
        let golden = include_str!("../../tests/golden/torchserve-0.12/metrics_full.txt");
        let mut seen = 0;
        for line in golden.lines().filter(|l| l.starts_with("# HELP ")) {
            let rest = &line["# HELP ".len()..];
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let spec =
                torchserve_family(name).unwrap_or_else(|| panic!("{name} missing from catalogue"));
            assert_eq!(spec.help(), help, "{name}");
            seen += 1;
        }
        assert_eq!(seen, TORCHSERVE_FAMILIES.len());
    }
}
