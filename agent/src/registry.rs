//! The metric families and TorchServe's counting rules (FACTS.md §2–3), in one place.
//!
//! TorchServe families keep their exact names, units, label names and label order ([`TORCHSERVE_FAMILIES`]);
//! the exposition encoder prints them from this catalogue. servescope's own families use the
//! `servescope_` prefix.

use prometheus::{
    CounterVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, core::Collector,
};

use crate::{
    http::Exchange,
    routing::{self, Route},
};

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

/// All families servescope serves. Cheap to clone (handles to shared metrics).
#[derive(Clone)]
pub struct Registry {
    registry: prometheus::Registry,
    requests_2xx: CounterVec,
    requests_4xx: CounterVec,
    requests_5xx: CounterVec,
    inference_requests: CounterVec,
    inference_latency: CounterVec,
    // servescope's own families.
    request_duration: HistogramVec,
    pub kernel_lost: IntCounterVec,
    pub decode_errors: IntCounter,
    pub parse_errors: IntCounter,
    pub unmatched_responses: IntCounter,
    pub targets: IntGauge,
    pub build_info: IntGaugeVec,
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
        let r = Registry {
            requests_2xx: ts_counter("Requests2XX"),
            requests_4xx: ts_counter("Requests4XX"),
            requests_5xx: ts_counter("Requests5XX"),
            inference_requests: ts_counter("ts_inference_requests_total"),
            inference_latency: ts_counter("ts_inference_latency_microseconds"),
            request_duration: must(HistogramVec::new(
                HistogramOpts::new(
                    "servescope_request_duration_seconds",
                    "Time from the read that completed an inference request to the write of its response \
                     status line (TorchServe's latency), by model, version and status class.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["model_name", "model_version", "status_class", "hostname"],
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
            targets: must(IntGauge::new("servescope_targets", "Processes being traced.")),
            build_info: must(IntGaugeVec::new(
                Opts::new("servescope_build_info", "servescope version; always 1."),
                &["version"],
            )),
            registry,
        };
        r.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // Print every loss reason from the start: an absent series cannot be told apart from zero losses.
        for (_, reason) in crate::events::LOSS_REASONS {
            r.kernel_lost.with_label_values(&[reason]);
        }
        let collectors: [Box<dyn Collector>; 12] = [
            Box::new(r.requests_2xx.clone()),
            Box::new(r.requests_4xx.clone()),
            Box::new(r.requests_5xx.clone()),
            Box::new(r.inference_requests.clone()),
            Box::new(r.inference_latency.clone()),
            Box::new(r.request_duration.clone()),
            Box::new(r.kernel_lost.clone()),
            Box::new(r.decode_errors.clone()),
            Box::new(r.parse_errors.clone()),
            Box::new(r.unmatched_responses.clone()),
            Box::new(r.targets.clone()),
            Box::new(r.build_info.clone()),
        ];
        for c in collectors {
            must(r.registry.register(c));
        }
        r
    }

    /// The families with samples, as the `prometheus` crate gathers them.
    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.registry.gather()
    }

    /// Counts one exchange of a traced server with TorchServe's rules (FACTS.md §3).
    pub fn record(&self, ex: &Exchange, hostname: &str, flavor: Flavor) {
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
        let Route::Inference { model, version } = routing::route(&req.target) else {
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
        let labels = [model.as_str(), version.as_str(), hostname];
        self.inference_requests.with_label_values(&labels).inc();

        // TorchServe adds latency only when the worker's batch reply was 200: handler exceptions and
        // "no worker" are frontend-made 5xx with the standard phrase and add nothing.
        if torchserve && frontend_error && status >= 500 {
            return;
        }
        if let Some(us) = ex.latency_us() {
            self.inference_latency.with_label_values(&labels).inc_by(us);
            let class = match status {
                100..=199 => "1xx",
                200..=299 => "2xx",
                300..=399 => "3xx",
                400..=499 => "4xx",
                _ => "5xx",
            };
            self.request_duration
                .with_label_values(&[model.as_str(), version.as_str(), class, hostname])
                .observe(us / 1e6);
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
                method: method.into(),
                target: target.into(),
                first_byte_ns: 1_000,
                complete_ns: 2_000,
                bytes: 10,
            }),
            response: Response {
                status,
                reason: reason.into(),
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
