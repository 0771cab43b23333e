//! Prometheus's own linter accepts servescope's standard-format families.
//!
//! `promtool check metrics` (Debian's `prometheus` package) parses the text with Prometheus's parser
//! and lints names, HELP and types. Only the `servescope_*` families are given to it: TorchServe's
//! families keep TorchServe's names and format on purpose (counters without `_total`, trailing commas
//! in label sets), which promtool would flag although the Prometheus server ingests them.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use servescope::{
    exposition::torchserve::{Filter, encode},
    http::{Exchange, Request, Response},
    registry::{Flavor, GpuValues, Registry},
};

/// A registry where every servescope family has samples.
fn populated() -> Registry {
    let r = Registry::new();
    for (status, reason) in [(200, ""), (503, ""), (404, "Not Found")] {
        let ex = Exchange {
            tgid: 1,
            conn_id: 1,
            peer: None,
            request: Some(Request {
                method: "POST".into(),
                target: "/predictions/echo/1.0".into(),
                first_byte_ns: 1_000,
                complete_ns: 2_000,
                bytes: 10,
            }),
            response: Response {
                status,
                reason: reason.into(),
                request_id: Some("id".into()),
                start_ns: 3_502_000,
                end_ns: Some(3_503_000),
                bytes: 100,
            },
        };
        r.record(&ex, "vm", Flavor::TorchServe);
    }
    r.decode_errors.inc();
    r.parse_errors.inc();
    r.unmatched_responses.inc();
    r.targets.set(2);
    r.set_gpu(
        &["vm".to_owned(), "pod-a".to_owned()],
        &[GpuValues {
            device_id: 0,
            utilization: Some(12.0),
            memory_utilization: Some(25.0),
            memory_used_mb: Some(4096.0),
            memory_used_bytes: Some(4_294_967_296.0),
            memory_total_bytes: Some(17_179_869_184.0),
            temperature_celsius: Some(61.0),
            power_watts: Some(70.5),
            sm_clock_hertz: Some(1.41e9),
            ecc_corrected: Some(2.0),
            ecc_uncorrected: Some(0.0),
        }],
    );
    r.set_gpu_processes(&[servescope::sampler::nvml::ProcessMemory {
        device_id: 0,
        pid: 4242,
        bytes: 1 << 30,
    }]);
    r.count_xids(&[servescope::sampler::nvml::XidEvent {
        device_index: 0,
        xid: Some(79),
    }]);
    r
}

#[test]
fn promtool_accepts_servescope_families() {
    let r = populated();
    let families = r.gather();
    let own: Vec<&str> = families
        .iter()
        .map(|f| f.name())
        .filter(|n| n.starts_with("servescope_"))
        .collect();
    for expected in [
        "servescope_request_duration_seconds",
        "servescope_kernel_lost_events_total",
        "servescope_targets",
        "servescope_build_info",
        "servescope_gpu_memory_used_bytes",
        "servescope_gpu_memory_total_bytes",
        "servescope_gpu_temperature_celsius",
        "servescope_gpu_power_watts",
    ] {
        assert!(
            own.contains(&expected),
            "{expected} has no samples: {own:?}"
        );
    }
    let query: Vec<String> = own.iter().map(|n| format!("name[]={n}")).collect();
    let text = encode(&families, &Filter::from_query(Some(&query.join("&"))));
    assert!(!text.is_empty());
    assert!(
        text.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .all(|l| l.starts_with("servescope_")),
        "only servescope families go to promtool:\n{text}"
    );

    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => panic!("cannot run promtool ({e}): install Debian's prometheus package"),
    };
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool runs");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Exit 1: unparsable text; exit 3: lint problems. Both are failures here, and so is any report.
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics ({}): {report}\n--- input ---\n{text}",
        out.status
    );
}
