//! Prometheus text format 0.0.4, written straight into the response body.
//!
//! Byte for byte what `prometheus::TextEncoder` (0.14) prints for the same families (the property
//! test below holds it to that), without its per-sample allocations: the crate formats every value
//! and every escaped label value into a fresh `String` and writes through a `dyn Write`, which at
//! 1,000 models (about 21,000 samples) was most of the render time. Hand-written because no
//! maintained crate encodes `prometheus::proto` families into a caller's buffer.

use std::fmt::Write as _;

use prometheus::proto::{LabelPair, Metric, MetricFamily, MetricType};

/// Appends one family as `TextEncoder` would. A family without samples or without a name is skipped
/// (`TextEncoder` refuses it with an error; callers skip it too). Returns whether it was written.
pub fn encode_family(out: &mut String, mf: &MetricFamily) -> bool {
    let name = mf.name();
    let kind = mf.get_field_type();
    // `TextEncoder` panics on untyped families; nothing in servescope makes them.
    if mf.get_metric().is_empty() || name.is_empty() || kind == MetricType::UNTYPED {
        return false;
    }
    let help = mf.help();
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
    out.push_str(match kind {
        MetricType::COUNTER => "counter",
        MetricType::GAUGE => "gauge",
        MetricType::SUMMARY => "summary",
        MetricType::UNTYPED => "untyped",
        MetricType::HISTOGRAM => "histogram",
    });
    // The `le` values, formatted once: every series of a vec has the same buckets.
    let mut bounds: Vec<(u64, String)> = Vec::new();
    let mut prefix = String::new();
    out.push('\n');

    for m in mf.get_metric() {
        match kind {
            MetricType::COUNTER => sample(out, name, "", m, None, m.get_counter().get_value()),
            MetricType::GAUGE => sample(out, name, "", m, None, m.get_gauge().get_value()),
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
                        bounds.push((upper.to_bits(), upper.to_string()));
                    }
                    let bound = bounds.get(i).map_or("", |(_, s)| s.as_str());
                    bucket(out, name, &prefix, bound, m, count(b.cumulative_count()));
                    inf_seen |= upper.is_sign_positive() && upper.is_infinite();
                }
                if !inf_seen {
                    bucket(out, name, &prefix, "+Inf", m, count(h.get_sample_count()));
                }
                sample(out, name, "_sum", m, None, h.get_sample_sum());
                sample(out, name, "_count", m, None, count(h.get_sample_count()));
            }
            MetricType::SUMMARY => {
                let s = m.get_summary();
                let mut q = String::new();
                for quantile in s.get_quantile() {
                    q.clear();
                    let _ = write!(q, "{}", quantile.quantile());
                    sample(out, name, "", m, Some(("quantile", &q)), quantile.value());
                }
                sample(out, name, "_sum", m, None, s.sample_sum());
                sample(out, name, "_count", m, None, count(s.sample_count()));
            }
            MetricType::UNTYPED => {}
        }
    }
    true
}

#[expect(
    clippy::cast_precision_loss,
    reason = "TextEncoder prints counts as f64 too"
)]
fn count(n: u64) -> f64 {
    n as f64
}

/// A `_bucket` line from the series' escaped labels (`,k="v"` each) and its `le`.
fn bucket(out: &mut String, name: &str, prefix: &str, le: &str, m: &Metric, value: f64) {
    out.push_str(name);
    out.push_str("_bucket{");
    // `prefix` starts with a comma when the series has labels.
    out.push_str(prefix.strip_prefix(',').unwrap_or(prefix));
    if !prefix.is_empty() {
        out.push(',');
    }
    out.push_str("le=\"");
    push_escaped(out, le, true);
    out.push_str("\"}");
    end_sample(out, m, value);
}

fn sample(
    out: &mut String,
    name: &str,
    suffix: &str,
    m: &Metric,
    extra: Option<(&str, &str)>,
    value: f64,
) {
    out.push_str(name);
    out.push_str(suffix);
    labels(out, m.get_label(), extra);
    end_sample(out, m, value);
}

/// ` value[ timestamp]\n`.
fn end_sample(out: &mut String, m: &Metric, value: f64) {
    out.push(' ');
    push_value(out, value);
    let ts = m.timestamp_ms();
    if ts != 0 {
        let _ = write!(out, " {ts}");
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
        let _ = write!(out, "{}", value as i64);
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
    fn empty_family_is_skipped() {
        let mut f = MetricFamily::default();
        f.set_name("x".into());
        let mut out = String::new();
        assert!(!encode_family(&mut out, &f));
        assert_eq!(out, "");
    }
}
