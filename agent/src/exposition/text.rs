//! Prometheus text format 0.0.4 and OpenMetrics 1.0 text, written straight into the response body.
//!
//! Byte for byte what `prometheus::TextEncoder` (0.14) prints for the same families (the property
//! test below holds it to that), without its per-sample allocations: the crate formats every value
//! and every escaped label value into a fresh `String` and writes through a `dyn Write`, which at
//! 1,000 models (about 21,000 samples) was most of the render time. Hand-written because no
//! maintained crate encodes `prometheus::proto` families into a caller's buffer.

use std::fmt::Write as _;

use prometheus::proto::{LabelPair, Metric, MetricFamily, MetricType};

use crate::registry::{Kind, Order, StoredFamily};

/// The body format a scrape asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text 0.0.4 (TorchServe's only format).
    Prometheus,
    /// OpenMetrics text; the version the scraper asked for (`1.0.0` or `0.0.1`, the same text).
    OpenMetrics(&'static str),
}

impl Format {
    /// The format a scrape's `Accept` header asks for, negotiated as Prometheus's client_golang
    /// does (`expfmt.NegotiateIncludingOpenMetrics`): media ranges by falling `q` (ties in header
    /// order), the first that names a format served here wins: `application/openmetrics-text` of
    /// version 1.0.0, 0.0.1 or none, or `text/plain` of version 0.0.4 or none. Anything else, no
    /// header, or an unparsable one: the Prometheus text, TorchServe's format.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Prometheus;
        };
        let mut ranges: Vec<(f64, Option<Format>)> = Vec::new();
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let (mut q, mut version) = (1.0, None);
            for param in parts {
                let Some((k, v)) = param.split_once('=') else {
                    continue;
                };
                let v = v.trim().trim_matches('"');
                match k.trim().to_ascii_lowercase().as_str() {
                    "q" => {
                        q = v
                            .parse::<f64>()
                            .ok()
                            .filter(|q| q.is_finite())
                            .unwrap_or(0.0)
                    }
                    "version" => version = Some(v.to_owned()),
                    _ => {}
                }
            }
            if q <= 0.0 {
                continue;
            }
            let format = match (media.as_str(), version.as_deref()) {
                ("application/openmetrics-text", None | Some("1.0.0")) => {
                    Some(Format::OpenMetrics("1.0.0"))
                }
                ("application/openmetrics-text", Some("0.0.1")) => {
                    Some(Format::OpenMetrics("0.0.1"))
                }
                ("text/plain", None | Some("0.0.4")) => Some(Format::Prometheus),
                _ => None,
            };
            ranges.push((q, format));
        }
        // Stable: equal q keep the header's order.
        ranges.sort_by(|a, b| b.0.total_cmp(&a.0));
        ranges
            .into_iter()
            .find_map(|(_, f)| f)
            .unwrap_or(Format::Prometheus)
    }

    /// The response's `Content-Type`: TorchServe's for the Prometheus text.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => super::server::CONTENT_TYPE_METRICS,
            Format::OpenMetrics("0.0.1") => {
                "application/openmetrics-text; version=0.0.1; charset=utf-8"
            }
            Format::OpenMetrics(_) => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Appends one family as `TextEncoder` would. A family without samples or without a name is skipped
/// (`TextEncoder` refuses it with an error; callers skip it too). Returns whether it was written.
pub fn encode_family(out: &mut String, mf: &MetricFamily) -> bool {
    encode_family_as(out, mf, Format::Prometheus)
}

/// Appends one family in `format`. In OpenMetrics the family's metadata follow the specification
/// ([`openmetrics_metadata`]); samples keep the names and label values of the Prometheus text, so
/// a Prometheus that negotiates either format stores the same series.
pub fn encode_family_as(out: &mut String, mf: &MetricFamily, format: Format) -> bool {
    let name = mf.name();
    let kind = mf.get_field_type();
    // `TextEncoder` panics on untyped families; nothing in servescope makes them.
    if mf.get_metric().is_empty() || name.is_empty() || kind == MetricType::UNTYPED {
        return false;
    }
    let type_name = match kind {
        MetricType::COUNTER => "counter",
        MetricType::GAUGE => "gauge",
        MetricType::SUMMARY => "summary",
        MetricType::UNTYPED => "untyped",
        MetricType::HISTOGRAM => "histogram",
    };
    let om = matches!(format, Format::OpenMetrics(_));
    let info = om
        && kind == MetricType::GAUGE
        && mf
            .get_metric()
            .iter()
            .all(|m| m.get_gauge().get_value() == 1.0);
    push_metadata(out, name, type_name, mf.help(), info, om);
    // The `le` values, formatted once: every series of a vec has the same buckets.
    let mut bounds: Vec<(u64, String)> = Vec::new();
    let mut prefix = String::new();

    for m in mf.get_metric() {
        match kind {
            MetricType::COUNTER => sample(out, name, "", m, None, m.get_counter().get_value(), om),
            MetricType::GAUGE => sample(out, name, "", m, None, m.get_gauge().get_value(), om),
            MetricType::HISTOGRAM => {
                let h = m.get_histogram();
                // The series' own labels, escaped once for all its bucket lines.
                prefix.clear();
                for p in m.get_label() {
                    push_label(&mut prefix, p.name(), p.value());
                }
                let mut inf_seen = false;
                for (i, b) in h.get_bucket().iter().enumerate() {
                    let upper = b.upper_bound();
                    if bounds
                        .get(i)
                        .is_none_or(|(bits, _)| *bits != upper.to_bits())
                    {
                        bounds.truncate(i);
                        let mut le = String::new();
                        push_escaped(&mut le, &upper.to_string(), true);
                        bounds.push((upper.to_bits(), le));
                    }
                    let bound = bounds.get(i).map_or("", |(_, s)| s.as_str());
                    bucket(
                        out,
                        name,
                        &prefix,
                        bound,
                        m.timestamp_ms(),
                        count(b.cumulative_count()),
                        om,
                    );
                    inf_seen |= upper.is_sign_positive() && upper.is_infinite();
                }
                if !inf_seen {
                    bucket(
                        out,
                        name,
                        &prefix,
                        "+Inf",
                        m.timestamp_ms(),
                        count(h.get_sample_count()),
                        om,
                    );
                }
                sample(out, name, "_sum", m, None, h.get_sample_sum(), om);
                sample(
                    out,
                    name,
                    "_count",
                    m,
                    None,
                    count(h.get_sample_count()),
                    om,
                );
            }
            MetricType::SUMMARY => {
                let s = m.get_summary();
                let mut q = String::new();
                for quantile in s.get_quantile() {
                    q.clear();
                    let _ = write!(q, "{}", quantile.quantile());
                    sample(
                        out,
                        name,
                        "",
                        m,
                        Some(("quantile", &q)),
                        quantile.value(),
                        om,
                    );
                }
                sample(out, name, "_sum", m, None, s.sample_sum(), om);
                sample(out, name, "_count", m, None, count(s.sample_count()), om);
            }
            MetricType::UNTYPED => {}
        }
    }
    true
}

/// A family's HELP and TYPE lines (OpenMetrics: TYPE, UNIT, HELP as [`openmetrics_metadata`] says).
fn push_metadata(
    out: &mut String,
    name: &str,
    type_name: &'static str,
    help: &str,
    info: bool,
    om: bool,
) {
    if om {
        let meta = openmetrics_metadata(name, type_name, info);
        push_openmetrics_metadata(out, &meta, help);
        return;
    }
    if !help.is_empty() {
        out.push_str("# HELP ");
        out.push_str(name);
        out.push(' ');
        push_escaped(out, help, false);
        out.push('\n');
    }
    out.push_str("# TYPE ");
    out.push_str(name);
    out.push(' ');
    out.push_str(type_name);
    out.push('\n');
}

#[expect(
    clippy::cast_precision_loss,
    reason = "TextEncoder prints counts as f64 too"
)]
fn count(n: u64) -> f64 {
    n as f64
}

/// A `_bucket` line from the series' escaped labels (`,k="v"` each) and its `le`, escaped already
/// (once per family, not once per line).
fn bucket(out: &mut String, name: &str, prefix: &str, le: &str, ts: i64, value: f64, om: bool) {
    out.push_str(name);
    out.push_str("_bucket{");
    // `prefix` starts with a comma when the series has labels.
    out.push_str(prefix.strip_prefix(',').unwrap_or(prefix));
    if !prefix.is_empty() {
        out.push(',');
    }
    out.push_str("le=\"");
    out.push_str(le);
    out.push_str("\"}");
    end_sample(out, ts, value, om);
}

/// One family of servescope's own storage, exactly as [`encode_family_as`] prints its
/// [`StoredFamily::proto`] (the tests hold the two together), without building that proto. A family
/// without series is skipped; returns whether it was written.
pub fn encode_stored_family(out: &mut String, family: &StoredFamily, format: Format) -> bool {
    if family.is_empty() {
        return false;
    }
    let name = family.name();
    let om = matches!(format, Format::OpenMetrics(_));
    let (type_name, bounds) = match family.kind() {
        Kind::Counter => ("counter", Vec::new()),
        Kind::Histogram(b) => ("histogram", {
            b.iter()
                .map(|bound| {
                    let mut le = String::new();
                    push_escaped(&mut le, &bound.to_string(), true);
                    le
                })
                .collect()
        }),
    };
    push_metadata(out, name, type_name, family.help(), false, om);
    let mut prefix = String::new();
    family.for_each_series(Order::Gather, |s| {
        prefix.clear();
        for (k, v) in s.sorted_labels() {
            push_label(&mut prefix, k, v);
        }
        let braced = |out: &mut String, suffix: &str| {
            out.push_str(name);
            out.push_str(suffix);
            if let Some(labels) = prefix.strip_prefix(',') {
                out.push('{');
                out.push_str(labels);
                out.push('}');
            }
        };
        if family.kind() == Kind::Counter {
            braced(out, "");
            end_sample(out, 0, s.value(), om);
            return;
        }
        for (le, n) in bounds.iter().zip(s.cumulative()) {
            bucket(out, name, &prefix, le, 0, count(n), om);
        }
        bucket(out, name, &prefix, "+Inf", 0, count(s.count()), om);
        braced(out, "_sum");
        end_sample(out, 0, s.value(), om);
        braced(out, "_count");
        end_sample(out, 0, count(s.count()), om);
    });
    true
}

fn sample(
    out: &mut String,
    name: &str,
    suffix: &str,
    m: &Metric,
    extra: Option<(&str, &str)>,
    value: f64,
    om: bool,
) {
    out.push_str(name);
    out.push_str(suffix);
    labels(out, m.get_label(), extra);
    end_sample(out, m.timestamp_ms(), value, om);
}

/// ` value[ timestamp]\n` (`ts` in ms; 0: none).
fn end_sample(out: &mut String, ts: i64, value: f64, om: bool) {
    out.push(' ');
    push_value(out, value);
    if ts != 0 {
        // OpenMetrics timestamps are seconds, the Prometheus text's milliseconds.
        if om {
            let _ = write!(out, " {}.{:03}", ts.div_euclid(1000), ts.rem_euclid(1000));
        } else {
            let _ = write!(out, " {ts}");
        }
    }
    out.push('\n');
}

/// Rust's `Display` for f64, as `TextEncoder`'s `value.to_string()`. Whole numbers (bucket counts,
/// integer counters: most samples) go through integer formatting, several times faster than the
/// float path and the same text: `Display` prints an integral f64 without fraction or exponent.
fn push_value(out: &mut String, value: f64) {
    // Below 2^53 every integral f64 is exact as i64; -0.0 must stay "-0".
    const EXACT: f64 = 9_007_199_254_740_992.0;
    // `write!` into a String cannot fail.
    if value.fract() == 0.0 && value.abs() < EXACT && !(value == 0.0 && value.is_sign_negative()) {
        #[expect(
            clippy::cast_possible_truncation,
            reason = "integral and below 2^53 in magnitude: exact"
        )]
        out.push_str(itoa::Buffer::new().format(value as i64));
    } else {
        let _ = write!(out, "{value}");
    }
}

fn labels(out: &mut String, pairs: &[LabelPair], extra: Option<(&str, &str)>) {
    if pairs.is_empty() && extra.is_none() {
        return;
    }
    let start = out.len();
    for (k, v) in pairs.iter().map(|p| (p.name(), p.value())).chain(extra) {
        push_label(out, k, v);
    }
    // The first pair's comma becomes the opening brace.
    out.replace_range(start..=start, "{");
    out.push('}');
}

/// `,k="v"` with the value escaped.
fn push_label(out: &mut String, k: &str, v: &str) {
    out.push(',');
    out.push_str(k);
    out.push_str("=\"");
    push_escaped(out, v, true);
    out.push('"');
}

/// A family's OpenMetrics metadata: the family name, its type and its unit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenMetricsMeta<'a> {
    /// The name in `# TYPE`/`# HELP`/`# UNIT`: a counter's without `_total`, an info's without `_info`.
    pub family: &'a str,
    pub type_name: &'static str,
    /// The unit when the family name ends in one (`_seconds`, `_bytes`, …) and the type takes one;
    /// OpenMetrics requires a declared unit to be the name's suffix.
    pub unit: Option<&'static str>,
}

/// OpenMetrics names a counter's family without the `_total` its samples carry. A counter whose
/// name lacks `_total` (TorchServe's `Requests2XX`, `ts_inference_latency_microseconds`) is typed
/// `unknown` instead: renamed to `Requests2XX_total` (as client_golang does) it would be another
/// series for Prometheus, and dashboards and alerts written for TorchServe would find nothing. A
/// gauge whose samples are all 1 and whose name ends in `_info` is an OpenMetrics info.
pub fn openmetrics_metadata<'a>(
    name: &'a str,
    type_name: &'static str,
    info: bool,
) -> OpenMetricsMeta<'a> {
    let (family, type_name) = match type_name {
        "counter" => match name.strip_suffix("_total") {
            Some(f) => (f, "counter"),
            None => (name, "unknown"),
        },
        "gauge" if info => match name.strip_suffix("_info") {
            Some(f) => (f, "info"),
            None => (name, "gauge"),
        },
        "untyped" => (name, "unknown"),
        other => (name, other),
    };
    const UNITS: [&str; 8] = [
        "seconds", "bytes", "celsius", "watts", "hertz", "joules", "ratio", "volts",
    ];
    // Counters, gauges and unknowns only: the reference parser (openmetrics-parser, built against
    // the OpenMetrics test suite) refuses a UNIT on the other types.
    let unit = UNITS
        .into_iter()
        .find(|u| {
            family
                .strip_suffix(u)
                .is_some_and(|rest| rest.ends_with('_'))
        })
        .filter(|_| matches!(type_name, "counter" | "gauge" | "unknown"));
    OpenMetricsMeta {
        family,
        type_name,
        unit,
    }
}

/// `# TYPE`, `# UNIT` and `# HELP` lines of an OpenMetrics family (HELP escapes `"` too).
pub fn push_openmetrics_metadata(out: &mut String, meta: &OpenMetricsMeta<'_>, help: &str) {
    for (key, value) in [("TYPE", Some(meta.type_name)), ("UNIT", meta.unit)] {
        if let Some(value) = value {
            out.push_str("# ");
            out.push_str(key);
            out.push(' ');
            out.push_str(meta.family);
            out.push(' ');
            out.push_str(value);
            out.push('\n');
        }
    }
    if !help.is_empty() {
        out.push_str("# HELP ");
        out.push_str(meta.family);
        out.push(' ');
        push_escaped(out, help, true);
        out.push('\n');
    }
}

/// `\` → `\\`, newline → `\n`, and `"` → `\"` when `quote` (label values; HELP keeps its quotes).
pub fn push_escaped(out: &mut String, s: &str, quote: bool) {
    let b = s.as_bytes();
    let clean = if quote {
        memchr::memchr3(b'\\', b'\n', b'"', b).is_none()
    } else {
        memchr::memchr2(b'\\', b'\n', b).is_none()
    };
    if clean {
        out.push_str(s);
        return;
    }
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use prometheus::{
        CounterVec, Encoder as _, GaugeVec, HistogramOpts, HistogramVec, IntCounter, Opts,
        Registry, TextEncoder,
    };
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn escapes_label_values_and_help() {
        // Short and long, where memchr's search takes different paths.
        let long = "x".repeat(40);
        for pad in ["", long.as_str()] {
            for (raw, quoted, help) in [
                ("plain", "plain", "plain"),
                ("a\\b", "a\\\\b", "a\\\\b"),
                ("a\nb", "a\\nb", "a\\nb"),
                // The double quote is escaped in label values only, not in HELP.
                ("a\"b", "a\\\"b", "a\"b"),
                ("\"\\\n", "\\\"\\\\\\n", "\"\\\\\\n"),
            ] {
                let input = format!("{pad}{raw}");
                let mut out = String::new();
                push_escaped(&mut out, &input, true);
                assert_eq!(out, format!("{pad}{quoted}"), "{input:?} as a label value");
                out.clear();
                push_escaped(&mut out, &input, false);
                assert_eq!(out, format!("{pad}{help}"), "{input:?} as HELP");
            }
        }
    }

    fn reference(families: &[MetricFamily]) -> String {
        let mut out = Vec::new();
        for f in families {
            // One at a time: TextEncoder refuses an empty family (and we skip it).
            let _ = TextEncoder::new().encode(std::slice::from_ref(f), &mut out);
        }
        String::from_utf8(out).unwrap_or_default()
    }

    fn direct(families: &[MetricFamily]) -> String {
        let mut out = String::new();
        for f in families {
            encode_family(&mut out, f);
        }
        out
    }

    /// Label values and HELP texts with the characters that need escaping, and non-ASCII.
    fn text() -> impl Strategy<Value = String> {
        proptest::string::string_regex("[a-z\\\\\"\n é€_0-9]{0,12}")
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn value() -> impl Strategy<Value = f64> {
        prop_oneof![
            any::<f64>(),
            -1e3..1e3f64,
            Just(0.0),
            Just(-0.0),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            Just(f64::NAN),
            Just(1e21),
            Just(1e-7),
            (-1e6..1e6f64).prop_map(f64::round),
            Just(9_007_199_254_740_992.0),
            Just(9_007_199_254_740_991.0),
            Just(-9_007_199_254_740_991.0),
            Just(1e16),
        ]
    }

    proptest! {
        #[test]
        fn direct_encoder_equals_text_encoder(
            help in text(),
            series in proptest::collection::vec((text(), text(), value(), 0.0..1e4f64), 0..8),
            buckets in proptest::collection::btree_set(0u32..10_000, 1..6),
            plain in 0u64..1000,
        ) {
            // The crate refuses an empty HELP.
            let help = format!("h{help}");
            let r = Registry::new();
            let c = CounterVec::new(Opts::new("c_total", help.clone()), &["a", "b"]).unwrap_or_else(|e| panic!("{e}"));
            let g = GaugeVec::new(Opts::new("g", help.clone()), &["b", "a"]).unwrap_or_else(|e| panic!("{e}"));
            let bounds: Vec<f64> = buckets.iter().map(|b| f64::from(*b) / 1000.0).collect();
            let h = HistogramVec::new(HistogramOpts::new("h_seconds", help).buckets(bounds), &["a"]).unwrap_or_else(|e| panic!("{e}"));
            let i = IntCounter::new("plain_total", "no labels").unwrap_or_else(|e| panic!("{e}"));
            for (a, b, v, obs) in &series {
                if v.is_finite() && *v >= 0.0 {
                    c.with_label_values(&[a.as_str(), b.as_str()]).inc_by(*v);
                }
                g.with_label_values(&[b.as_str(), a.as_str()]).set(*v);
                h.with_label_values(&[a.as_str()]).observe(*obs);
            }
            i.inc_by(plain);
            for m in [Box::new(c) as Box<dyn prometheus::core::Collector>, Box::new(g), Box::new(h), Box::new(i)] {
                r.register(m).unwrap_or_else(|e| panic!("{e}"));
            }
            let families = r.gather();
            prop_assert_eq!(direct(&families), reference(&families));
        }
    }

    #[test]
    fn openmetrics_metadata_names_types_and_units() {
        let m = |name, ty, info| {
            let m = openmetrics_metadata(name, ty, info);
            (m.family, m.type_name, m.unit)
        };
        assert_eq!(
            m("servescope_request_bytes_total", "counter", false),
            ("servescope_request_bytes", "counter", Some("bytes"))
        );
        assert_eq!(
            m("Requests2XX", "counter", false),
            ("Requests2XX", "unknown", None)
        );
        assert_eq!(
            m("servescope_gpu_temperature_celsius", "gauge", false),
            (
                "servescope_gpu_temperature_celsius",
                "gauge",
                Some("celsius")
            )
        );
        assert_eq!(
            m("servescope_build_info", "gauge", true),
            ("servescope_build", "info", None)
        );
        assert_eq!(
            m("servescope_build_info", "gauge", false),
            ("servescope_build_info", "gauge", None)
        );
        assert_eq!(
            m("x_seconds", "histogram", false),
            ("x_seconds", "histogram", None)
        );
        // A suffix only counts after an underscore.
        assert_eq!(
            m("nanoseconds", "gauge", false),
            ("nanoseconds", "gauge", None)
        );
        assert_eq!(
            m("ts_inference_latency_microseconds", "counter", false).2,
            None
        );
    }

    #[test]
    fn negotiation_follows_accept() {
        // Prometheus 2.42's scrape header (Debian bookworm), and 3.x's default protocols.
        let prometheus_2 = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(
            Format::negotiate(Some(prometheus_2)),
            Format::OpenMetrics("1.0.0")
        );
        let prometheus_3 = "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1";
        assert_eq!(
            Format::negotiate(Some(prometheus_3)),
            Format::OpenMetrics("1.0.0")
        );
        for (accept, want) in [
            (None, Format::Prometheus),
            (Some(""), Format::Prometheus),
            (Some("*/*"), Format::Prometheus),
            (Some("text/plain"), Format::Prometheus),
            (Some("garbage;;;=,"), Format::Prometheus),
            (
                Some("application/openmetrics-text"),
                Format::OpenMetrics("1.0.0"),
            ),
            (
                Some("Application/OpenMetrics-Text; version=0.0.1"),
                Format::OpenMetrics("0.0.1"),
            ),
            // An unknown version is not served; a lower q still wins over nothing.
            (
                Some("application/openmetrics-text;version=2.0.0"),
                Format::Prometheus,
            ),
            (
                Some("text/plain;q=0.9,application/openmetrics-text;q=0.5"),
                Format::Prometheus,
            ),
            (
                Some("text/plain;q=0.5,application/openmetrics-text;q=0.9"),
                Format::OpenMetrics("1.0.0"),
            ),
            (Some("application/openmetrics-text;q=0"), Format::Prometheus),
            // Protobuf (Prometheus's native histograms) is not served: the next choice.
            (
                Some(
                    "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0.8,text/plain;version=0.0.4;q=0.5",
                ),
                Format::Prometheus,
            ),
        ] {
            assert_eq!(Format::negotiate(accept), want, "{accept:?}");
        }
        assert_eq!(
            Format::OpenMetrics("1.0.0").content_type(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
        assert_eq!(
            Format::Prometheus.content_type(),
            crate::exposition::server::CONTENT_TYPE_METRICS
        );
    }

    #[test]
    fn empty_family_is_skipped() {
        let mut f = MetricFamily::default();
        f.set_name("x".into());
        let mut out = String::new();
        assert!(!encode_family(&mut out, &f));
        assert_eq!(out, "");
    }
}
