//! TorchServe 0.12's `/metrics` text format, byte for byte (FACTS.md §2).
//!
//! TorchServe renders its registry with Prometheus simpleclient 0.9 (`TextFormat.write004`): every
//! family gets `# HELP` and `# TYPE` even without samples, label pairs end with a comma
//! (`{k="v",}`), values are Java's `Double.toString`, and the `name[]` query filter of
//! `CollectorRegistry.filteredMetricFamilySamples` selects families. servescope's own families
//! (`servescope_*`) follow in the standard Prometheus text format.

use std::{collections::BTreeSet, fmt::Write as _};

use prometheus::proto::{MetricFamily, MetricType};

use super::text::{self, Format};
use crate::registry::{FamilySpec, Kind, Order, Registry, StoredFamily, TORCHSERVE_FAMILIES};

/// Renders `v` as Java's `Double.toString` does (JDK 19+ specification).
///
/// Java takes the decimals of minimal length `n` (at least 2) that read back as `v`, and of those the
/// closest to `v`, the one with an even last digit on a tie. Rust's `{:e}` gives the minimal length;
/// Rust's fixed-precision formatting is exact and rounds half to even, so `{:.(n-1)e}` is Java's
/// choice. Plain notation for `1e-3 <= |v| < 1e7`, computerized scientific (`d.dddE<exp>`) otherwise;
/// always at least one fractional digit.
///
/// The golden captures came from OpenJDK 17, whose older `FloatingDecimal` (JDK-4511638) differs
/// from this only for integral values from about 2^54 (1.8E16) up, where it prints the exact integer's
/// leading 17 digits (`5.0144348174390968E16`, here `5.014434817439097E16`): compared on 1.2 million
/// values against OpenJDK 17.0.21, nothing else differed. No TorchServe family gets there (1.8E16 µs
/// is 570 years).
pub fn java_double(v: f64) -> String {
    let mut s = String::new();
    push_java_double(&mut s, v);
    s
}

/// [`java_double`] appended to `out`, with no allocation: a `/metrics` scrape at 1,000 models prints
/// thousands of such values (TorchServe's latency sums), and the allocating version of this took
/// ~0.5–0.7 µs a value here, a sixth of the render.
pub fn push_java_double(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "Infinity" } else { "-Infinity" });
    } else if v == 0.0 {
        out.push_str(if v.is_sign_negative() { "-0.0" } else { "0.0" });
    } else if v.fract() == 0.0 && v.abs() < 1e7 {
        // Whole numbers below 10^7 (counts, most sums of whole µs): `123.0`, without the digit
        // search below.
        #[expect(
            clippy::cast_possible_truncation,
            reason = "integral and below 1e7 in magnitude: exact"
        )]
        out.push_str(itoa::Buffer::new().format(v as i64));
        out.push_str(".0");
    } else {
        push_java_double_searched(out, v);
    }
}

/// [`push_java_double`] of a finite, non-zero `v` by the digit search (any value).
fn push_java_double_searched(out: &mut String, v: f64) {
    if v < 0.0 {
        out.push('-');
    }
    let (digits, exp) = java_digits(v.abs());
    let digits = digits.as_str();
    if (-3..7).contains(&exp) {
        push_plain(out, digits, exp);
    } else {
        let (first, rest) = digits.split_at(1);
        out.push_str(first);
        out.push('.');
        out.push_str(if rest.is_empty() { "0" } else { rest });
        out.push('E');
        out.push_str(itoa::Buffer::new().format(exp));
    }
}

/// Significant digits (no trailing zeros, at least one digit) and decimal exponent of a finite,
/// positive `a`, so that `a = d.ddd × 10^exp` as Java selects them.
fn java_digits(a: f64) -> (Digits, i32) {
    let mut text = Digits::default();
    // `write!` into a Digits fails only past its capacity, which `{:e}` of an f64 never reaches.
    let _ = write!(text, "{a:e}");
    let shortest = split_sci(text.as_str());
    // The check below formats and parses again: most of the search's time. It can only change the
    // answer when Java wants a second digit or on a tie, which needs a value whose exact decimal
    // expansion is short (`may_tie`); TorchServe's latency sums are not such values.
    if shortest.0.len() >= 2 && !may_tie(a) {
        return shortest;
    }
    // Rust's shortest form is the closest of its length except on a tie (it then rounds up, Java
    // picks the even digit: 8713938551.0390625 is `8.713938551039062E9`), and Java never uses fewer
    // than two digits (`Double.MIN_VALUE` is `4.9E-324`). The closest decimal of that length is
    // normally among those that read back; the check keeps the shortest form if it is not.
    let len = shortest.0.len().max(2);
    let mut closest = Digits::default();
    let _ = write!(closest, "{a:.prec$e}", prec = len - 1);
    if closest.as_str().parse::<f64>().is_ok_and(|b| b == a) {
        return split_sci(closest.as_str());
    }
    shortest
}

/// Whether finite, positive `a` can lie exactly midway between two decimals of at most 17
/// significant digits (the longest shortest form): only then can the closest decimal of the shortest
/// form's length differ from it. With `a = m × 2^e`, `m` odd, and `e < 0`, `a`'s exact decimal is
/// `m × 5^-e / 10^-e`, whose significant digits are at least those of `5^-e`: 19 or more from
/// `e = -26` on (5^26 ≈ 1.5 × 10^18), one more than a midpoint of 17-digit decimals has. Values
/// with a binary fraction of up to 25 bits (0.5, 1013.25, whole numbers) take the full check.
fn may_tie(a: f64) -> bool {
    let bits = a.to_bits();
    let biased = i32::try_from((bits >> 52) & 0x7ff).unwrap_or(0);
    let fraction = bits & ((1 << 52) - 1);
    let (m, e) = if biased == 0 {
        (fraction, -1074)
    } else {
        (fraction | (1 << 52), biased - 1075)
    };
    if m == 0 {
        return true;
    }
    // `trailing_zeros` of a non-zero u64 is below 64.
    let e = e + i32::try_from(m.trailing_zeros()).unwrap_or(0);
    e > -26
}

/// A short ASCII text on the stack: Rust's `{:e}` of an f64 (at most 25 bytes) and the digits split
/// from it. Hand-written: 20 lines against a dependency (`arrayvec`) for one formatter's buffer.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct Digits {
    buf: [u8; 32],
    len: usize,
}

impl Digits {
    fn as_str(&self) -> &str {
        // Only whole `&str`s and ASCII digits are ever written in.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }

    fn len(&self) -> usize {
        self.len
    }

    /// Appends `b`; past the capacity (never, for an f64's digits) it is dropped.
    fn push_byte(&mut self, b: u8) {
        if let Some(slot) = self.buf.get_mut(self.len) {
            *slot = b;
            self.len += 1;
        }
    }
}

impl std::fmt::Write for Digits {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        let slot = self.buf.get_mut(self.len..end).ok_or(std::fmt::Error)?;
        slot.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

impl std::fmt::Debug for Digits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}

/// Splits Rust's `{:e}` output (`2.4514959299999997e7`, `1e-4`) into trimmed digits and exponent.
fn split_sci(s: &str) -> (Digits, i32) {
    let (mantissa, exp) = s.split_once('e').unwrap_or((s, "0"));
    let mut digits = Digits::default();
    for b in mantissa.bytes().filter(u8::is_ascii_digit) {
        digits.push_byte(b);
    }
    while digits.len > 1 && digits.buf[digits.len - 1] == b'0' {
        digits.len -= 1;
    }
    (digits, exp.parse().unwrap_or(0))
}

/// Plain decimal rendering of `d.ddd × 10^exp` for `-3 <= exp < 7`, with at least one fractional digit.
fn push_plain(out: &mut String, digits: &str, exp: i32) {
    if exp < 0 {
        // `exp` is -1..=-3: "0." followed by -exp-1 zeros, then the digits.
        out.push_str("0.");
        for _ in 0..-exp - 1 {
            out.push('0');
        }
        out.push_str(digits);
        return;
    }
    let int_len = usize::try_from(exp).unwrap_or(0) + 1;
    if digits.len() <= int_len {
        out.push_str(digits);
        for _ in digits.len()..int_len {
            out.push('0');
        }
        out.push_str(".0");
    } else {
        let (int, frac) = digits.split_at(int_len);
        out.push_str(int);
        out.push('.');
        out.push_str(frac);
    }
}

/// simpleclient 0.9's `Collector.doubleToGoString`, used by `TextFormat.write004` for sample values:
/// `Double.toString` except for the infinities, which Prometheus spells `+Inf`/`-Inf`.
fn push_sample_value(out: &mut String, v: f64) {
    if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else {
        push_java_double(out, v);
    }
}

/// The `name[]` selection of a `/metrics` request.
///
/// Parsed like Netty's `QueryStringDecoder` (TorchServe 0.12 bundles Netty 4.1.53): pairs separated
/// by `&` or `;`, a `#` ends the query, keys and values are percent-decoded with `+` as a space, a
/// key without `=` has the empty value. Only the key `name[]` counts (`name=A` is ignored).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// `None`: no `name[]` parameter, every family. `Some`: exactly these names; TorchServe hands the
    /// values to simpleclient as a set, so `name[]=` (the empty name) selects nothing.
    names: Option<BTreeSet<String>>,
}

impl Filter {
    /// Every family.
    pub fn all() -> Self {
        Filter { names: None }
    }

    /// The filter of a request's query string (the part after `?`, if any).
    pub fn from_query(query: Option<&str>) -> Self {
        let Some(query) = query else {
            return Filter::all();
        };
        let query = query.split('#').next().unwrap_or("");
        let mut names: Option<BTreeSet<String>> = None;
        for pair in query.split(['&', ';']).filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if form_decode(key) == "name[]" {
                names
                    .get_or_insert_with(BTreeSet::new)
                    .insert(form_decode(value));
            }
        }
        Filter { names }
    }

    /// Whether the request selects no family by name (the unfiltered scrape).
    pub fn is_all(&self) -> bool {
        self.names.is_none()
    }

    /// Whether the family `name` is selected: exact, case-sensitive (no `_total` aliasing).
    pub fn matches(&self, name: &str) -> bool {
        self.names.as_ref().is_none_or(|names| names.contains(name))
    }
}

/// `application/x-www-form-urlencoded` decoding: `%XX` escapes and `+` as a space. A malformed escape
/// is kept verbatim (Netty rejects the request; a lenient reading costs nothing here) and invalid
/// UTF-8 is replaced.
fn form_decode(s: &str) -> String {
    if !s.contains(['%', '+']) {
        return s.to_owned();
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = |j: usize| bytes.get(j).and_then(|c| char::from(*c).to_digit(16));
                match (hex(i + 1), hex(i + 2)) {
                    (Some(h), Some(l)) => {
                        // Two hex digits: at most 255.
                        out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Renders the `/metrics` body: TorchServe's families in TorchServe's format, then servescope's own.
///
/// (a) Every family of [`TORCHSERVE_FAMILIES`], in catalogue order, with `# HELP`/`# TYPE` even when
/// it has no samples, as TorchServe does. Under a `name[]` filter a family without samples is left
/// out entirely: simpleclient 0.9's filter drops a family once none of its samples matches. (b) Then
/// every other family of `families` that the filter selects, in Prometheus text format 0.0.4.
///
/// Samples of a TorchServe family are sorted by their label values, compared in the catalogue's label
/// order as byte strings: TorchServe prints them in Java hash order, which no client can rely on, and
/// a fixed order keeps successive scrapes diffable. Returns the empty string when nothing is selected;
/// otherwise the body ends with `\n`.
pub fn encode(families: &[MetricFamily], filter: &Filter) -> String {
    encode_as(families, filter, Format::Prometheus)
}

/// [`encode`] in `format`. In OpenMetrics the samples, their order, names and values are the same;
/// only what the format spells differently changes: metadata as `text::openmetrics_metadata` says,
/// no trailing comma in label sets, exponents as `e`, families without samples left out, `# EOF`
/// at the end (also of an empty selection).
pub fn encode_as(families: &[MetricFamily], filter: &Filter, format: Format) -> String {
    let mut out = String::new();
    encode_parts(&mut out, families, &[], filter, format);
    out
}

/// The `/metrics` body of `registry`: [`encode_as`] of [`Registry::gather`], byte for byte, but the
/// per-model families are formatted from their own storage instead of being cloned into `proto`.
pub fn render(registry: &Registry, filter: &Filter, format: Format) -> String {
    let mut out = String::new();
    render_into(&mut out, registry, filter, format);
    out
}

/// [`render`] appended to `out`, which keeps its capacity: the server renders each scrape into the
/// previous scrape's buffer ([`super::server`]).
pub fn render_into(out: &mut String, registry: &Registry, filter: &Filter, format: Format) {
    encode_parts(
        out,
        &registry.gather_collectors(),
        &registry.stored(),
        filter,
        format,
    );
}

/// Bytes of body per line, for the up-front allocation: a model's histogram line is ~130 bytes.
const LINE_BYTES: usize = 140;

/// `families` (sorted by name, as gathered) and the `stored` families merged in name order.
fn encode_parts(
    out: &mut String,
    families: &[MetricFamily],
    stored: &[&StoredFamily],
    filter: &Filter,
    format: Format,
) {
    // One allocation for the body, from the lines it will hold (a histogram series is its buckets,
    // +Inf, _sum and _count): growing a multi-MB String doubles it and copies.
    let lines: usize = families
        .iter()
        .map(|f| {
            f.get_metric()
                .iter()
                .map(|m| m.get_histogram().get_bucket().len() + 3)
                .sum::<usize>()
        })
        .chain(stored.iter().map(|f| {
            f.len()
                * match f.kind() {
                    Kind::Counter => 1,
                    Kind::Histogram(bounds) => bounds.len() + 3,
                }
        }))
        .sum();
    out.reserve(4096 + lines * LINE_BYTES);
    for spec in TORCHSERVE_FAMILIES
        .iter()
        .filter(|s| filter.matches(s.name))
    {
        let samples = match stored.iter().find(|f| f.name() == spec.name) {
            Some(f) => Samples::Stored(f),
            None => Samples::Gathered(families.iter().find(|f| f.name() == spec.name)),
        };
        encode_torchserve_family(out, spec, samples, filter.is_all(), format);
    }

    enum Own<'a> {
        Gathered(&'a MetricFamily),
        Stored(&'a StoredFamily),
    }
    let is_torchserve = |name: &str| TORCHSERVE_FAMILIES.iter().any(|s| s.name == name);
    let mut own: Vec<(&str, Own<'_>)> = families
        .iter()
        .map(|f| (f.name(), Own::Gathered(f)))
        .chain(stored.iter().map(|f| (f.name(), Own::Stored(f))))
        .filter(|(name, _)| !is_torchserve(name) && filter.matches(name))
        .collect();
    // Stable: gathered families are sorted already; the stored ones fall into place.
    own.sort_by(|a, b| a.0.cmp(b.0));
    for (_, family) in own {
        match family {
            Own::Gathered(f) => text::encode_family_as(out, f, format),
            Own::Stored(f) => text::encode_stored_family(out, f, format),
        };
    }
    if matches!(format, Format::OpenMetrics(_)) {
        out.push_str("# EOF\n");
    }
}

/// Where a TorchServe family's samples are.
enum Samples<'a> {
    Gathered(Option<&'a MetricFamily>),
    Stored(&'a StoredFamily),
}

/// One TorchServe family: HELP, TYPE and its samples, as simpleclient 0.9's `write004` prints them.
fn encode_torchserve_family(
    out: &mut String,
    spec: &FamilySpec,
    samples: Samples<'_>,
    unfiltered: bool,
    format: Format,
) {
    let om = matches!(format, Format::OpenMetrics(_));
    match samples {
        Samples::Stored(family) => {
            // OpenMetrics allows a family without samples, but a parser cannot tell where it ends
            // when the next family follows (the reference grammar's families are metadata then
            // samples), and Prometheus keeps nothing of one: left out there. TorchServe's text
            // prints it unfiltered.
            if family.is_empty() && (!unfiltered || om) {
                return;
            }
            debug_assert_eq!(family.labels(), spec.labels, "{}: label order", spec.name);
            push_torchserve_metadata(out, spec, om);
            // Declared order = sorted by the values in TorchServe's label order, as below.
            family.for_each_series(Order::Declared, |s| {
                push_torchserve_sample(
                    out,
                    spec,
                    s.values().iter().map(String::as_str),
                    s.value(),
                    om,
                );
            });
        }
        Samples::Gathered(family) => {
            let mut samples: Vec<(Vec<&str>, f64)> = Vec::new();
            if let Some(family) = family {
                for metric in family.get_metric() {
                    let value = match family.get_field_type() {
                        MetricType::COUNTER => metric.get_counter().get_value(),
                        MetricType::GAUGE => metric.get_gauge().get_value(),
                        other => {
                            tracing::debug!(family = spec.name, kind = ?other, "unexpected metric type; sample skipped");
                            continue;
                        }
                    };
                    let labels = crate::registry::labels_in_order(metric, spec.labels);
                    samples.push((labels, value));
                }
            }
            if samples.is_empty() && (!unfiltered || om) {
                return;
            }
            samples.sort_by(|a, b| a.0.cmp(&b.0));
            push_torchserve_metadata(out, spec, om);
            for (values, value) in samples {
                push_torchserve_sample(out, spec, values.into_iter(), value, om);
            }
        }
    }
}

fn push_torchserve_metadata(out: &mut String, spec: &FamilySpec, om: bool) {
    if om {
        let meta = text::openmetrics_metadata(spec.name, spec.kind.as_str(), false);
        text::push_openmetrics_metadata(out, &meta, &spec.help());
    } else {
        // simpleclient 0.9's `writeEscapedHelp` (backslash, newline) and `writeEscapedLabelValue`
        // (also the double quote) are the Prometheus text format's escapes.
        out.push_str("# HELP ");
        out.push_str(spec.name);
        out.push(' ');
        text::push_escaped(out, &spec.help(), false);
        // `write!` into a String cannot fail.
        let _ = writeln!(out, "\n# TYPE {} {}", spec.name, spec.kind.as_str());
    }
}

fn push_torchserve_sample<'v>(
    out: &mut String,
    spec: &FamilySpec,
    values: impl Iterator<Item = &'v str>,
    value: f64,
    om: bool,
) {
    out.push_str(spec.name);
    // TorchServe's families all have labels; simpleclient omits the braces only without any.
    if !spec.labels.is_empty() {
        out.push('{');
        for (i, (name, v)) in spec.labels.iter().zip(values).enumerate() {
            // OpenMetrics has no trailing comma.
            if om && i > 0 {
                out.push(',');
            }
            out.push_str(name);
            out.push_str("=\"");
            text::push_escaped(out, v, true);
            out.push('"');
            if !om {
                out.push(',');
            }
        }
        out.push('}');
    }
    out.push(' ');
    let at = out.len();
    push_sample_value(out, value);
    // Java's exponent is `E`; OpenMetrics's grammar spells it `e` (Prometheus reads both).
    if om && let Some(e) = out[at..].find('E') {
        out.replace_range(at + e..=at + e, "e");
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use prometheus::proto::{Counter, Gauge, LabelPair, Metric};

    use super::*;
    use crate::registry::{FamilyType, Registry, torchserve_family};

    const FULL: &str = include_str!("../../../tests/golden/torchserve-0.12/metrics_full.txt");
    const FILTERED: &str =
        include_str!("../../../tests/golden/torchserve-0.12/metrics_filtered.txt");
    const UNKNOWN: &str =
        include_str!("../../../tests/golden/torchserve-0.12/metrics_unknown_name.txt");

    #[test]
    fn java_double_golden_examples() {
        for (v, want) in [
            (81.0, "81.0"),
            (0.0, "0.0"),
            (19123.317999999996, "19123.317999999996"),
            (1013.47, "1013.47"),
            (2.8594324398E7, "2.8594324398E7"),
            (2.4514959299999997E7, "2.4514959299999997E7"),
            (1.0E-4, "1.0E-4"),
            (1.0E7, "1.0E7"),
            (f64::NAN, "NaN"),
            (f64::INFINITY, "Infinity"),
            (f64::NEG_INFINITY, "-Infinity"),
            (-0.0, "-0.0"),
        ] {
            assert_eq!(java_double(v), want, "{v:?}");
        }
    }

    #[test]
    fn java_double_edge_cases() {
        for (v, want) in [
            // Plain/scientific boundaries.
            (0.001, "0.001"),
            (9.999999999999998E-4, "9.999999999999998E-4"),
            (9999999.999999998, "9999999.999999998"),
            (1234567.0, "1234567.0"),
            (12345678.0, "1.2345678E7"),
            (0.01, "0.01"),
            (0.1, "0.1"),
            (0.5, "0.5"),
            (1.0, "1.0"),
            (100.0, "100.0"),
            (-1.5, "-1.5"),
            (-2.5E-5, "-2.5E-5"),
            (1.0E21, "1.0E21"),
            (1.0E23, "1.0E23"),
            (123.456, "123.456"),
            (1.0 / 3.0, "0.3333333333333333"),
            // Golden gauges.
            (11.465320587158203, "11.465320587158203"),
            (79.4063835144043, "79.4063835144043"),
            (23544.48828125, "23544.48828125"),
            (202922.456, "202922.456"),
            // Extremes. Subnormals with a one-digit shortest form show Java's two-digit minimum: the
            // closest two-digit decimal (4.9E-324, not 5.0E-324; 2 × MIN_VALUE is 9.88…E-324).
            (f64::MAX, "1.7976931348623157E308"),
            (f64::MIN_POSITIVE, "2.2250738585072014E-308"),
            (f64::from_bits(1), "4.9E-324"),
            (f64::from_bits(2), "9.9E-324"),
            (-f64::from_bits(1), "-4.9E-324"),
            (9007199254740993.0, "9.007199254740992E15"),
            // Ties between two shortest candidates go to the even digit (checked against JDK 17, which
            // agrees here).
            // 8713938551.0390625 exactly: midway between the two 16-digit candidates.
            (f64::from_bits(0x4200_3b21_33b8_5000), "8.713938551039062E9"),
            (1.1128049820789062E10, "1.1128049820789062E10"),
            (1.5816277825632812E10, "1.5816277825632812E10"),
        ] {
            assert_eq!(java_double(v), want, "{v:?}");
        }
    }

    #[test]
    fn java_double_reads_back() {
        // Java's output is valid Rust float syntax; it must name the same double.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            // xorshift: a spread of bit patterns, subnormals and huge exponents included.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = f64::from_bits(x);
            if !v.is_finite() {
                continue;
            }
            let s = java_double(v);
            assert_eq!(s.parse::<f64>().ok(), Some(v), "{s}");
            assert!(s.contains('.'), "{s}");
        }
    }

    #[test]
    fn filter_parsing() {
        assert!(Filter::from_query(None).is_all());
        assert!(Filter::from_query(Some("")).is_all());
        // Without brackets the parameter is ignored: every family.
        assert!(Filter::from_query(Some("name=Requests2XX")).matches("QueueTime"));

        let f = Filter::from_query(Some(
            "name[]=Requests2XX&name[]=ts_inference_requests_total",
        ));
        assert!(f.matches("Requests2XX") && f.matches("ts_inference_requests_total"));
        assert!(!f.matches("QueueTime"));
        // Exact and case-sensitive; no `_total` aliasing.
        assert!(!f.matches("requests2xx"));
        assert!(!f.matches("ts_inference_requests"));

        let f = Filter::from_query(Some(
            "name%5B%5D=Requests2XX;name%5b%5d=a%20b+c&x=1#name[]=QueueTime",
        ));
        assert!(f.matches("Requests2XX") && f.matches("a b c"));
        assert!(!f.matches("QueueTime"));

        for q in ["name[]=", "name[]", "name[]=no_such_metric"] {
            let f = Filter::from_query(Some(q));
            assert!(!f.is_all() && !f.matches("Requests2XX"), "{q}");
        }
        // A malformed escape is kept as written.
        assert!(Filter::from_query(Some("name[]=a%zz%4")).matches("a%zz%4"));
    }

    fn label(name: &str, value: &str) -> LabelPair {
        let mut l = LabelPair::default();
        l.set_name(name.to_owned());
        l.set_value(value.to_owned());
        l
    }

    fn family(
        name: &str,
        help: &str,
        kind: MetricType,
        samples: &[(Vec<(&str, &str)>, f64)],
    ) -> MetricFamily {
        let mut f = MetricFamily::default();
        f.set_name(name.to_owned());
        f.set_help(help.to_owned());
        f.set_field_type(kind);
        let metrics = samples
            .iter()
            .map(|(labels, v)| {
                // Sorted by name, as the prometheus crate stores them.
                let mut pairs: Vec<LabelPair> = labels.iter().map(|(k, v)| label(k, v)).collect();
                pairs.sort_by(|a, b| a.name().cmp(b.name()));
                let mut m = Metric::from_label(pairs);
                if kind == MetricType::GAUGE {
                    let mut g = Gauge::default();
                    g.set_value(*v);
                    m.set_gauge(g);
                } else {
                    let mut c = Counter::default();
                    c.set_value(*v);
                    m.set_counter(c);
                }
                m
            })
            .collect();
        f.set_metric(metrics);
        f
    }

    /// Families of a golden capture as the prometheus crate would gather them.
    fn parse_golden(text: &str) -> Vec<MetricFamily> {
        let mut out: Vec<MetricFamily> = Vec::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("sample line: {line}"));
            let (name, labels) = series
                .split_once('{')
                .unwrap_or_else(|| panic!("labels: {line}"));
            let labels: Vec<(&str, &str)> = labels
                .trim_end_matches(",}")
                .split("\",")
                .map(|kv| {
                    let (k, v) = kv
                        .split_once("=\"")
                        .unwrap_or_else(|| panic!("label: {kv}"));
                    (k, v.trim_end_matches('"'))
                })
                .collect();
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("value: {line}"));
            let spec =
                torchserve_family(name).unwrap_or_else(|| panic!("not in catalogue: {name}"));
            let kind = match spec.kind {
                FamilyType::Counter => MetricType::COUNTER,
                FamilyType::Gauge => MetricType::GAUGE,
            };
            let sample = family(name, &spec.help(), kind, &[(labels, value)]);
            match out.iter_mut().find(|f| f.name() == name) {
                Some(f) => f.mut_metric().extend(sample.get_metric().iter().cloned()),
                None => out.push(sample),
            }
        }
        out
    }

    /// An exposition split into family blocks, keyed by family name: HELP and TYPE lines as printed,
    /// sample lines sorted (TorchServe's sample order is hash order).
    fn blocks(text: &str) -> BTreeMap<String, (String, String, Vec<String>)> {
        let mut out = BTreeMap::new();
        let mut lines = text.lines().peekable();
        while let Some(help) = lines.next() {
            let name = help
                .strip_prefix("# HELP ")
                .and_then(|r| r.split(' ').next())
                .unwrap_or_else(|| panic!("block must start with HELP: {help}"));
            let ty = lines.next().unwrap_or_default().to_owned();
            let mut samples = Vec::new();
            while let Some(l) = lines.next_if(|l| !l.starts_with("# HELP ")) {
                samples.push(l.to_owned());
            }
            samples.sort();
            assert!(
                out.insert(name.to_owned(), (help.to_owned(), ty, samples))
                    .is_none(),
                "{name} twice"
            );
        }
        out
    }

    fn names_in_order(text: &str) -> Vec<&str> {
        text.lines()
            .filter_map(|l| l.strip_prefix("# HELP "))
            .filter_map(|r| r.split(' ').next())
            .collect()
    }

    #[test]
    fn full_scrape_matches_golden() {
        let out = encode(&parse_golden(FULL), &Filter::all());
        assert!(out.ends_with('\n'));
        assert_eq!(blocks(&out), blocks(FULL));
        let catalogue: Vec<&str> = TORCHSERVE_FAMILIES.iter().map(|s| s.name).collect();
        assert_eq!(names_in_order(&out), catalogue);
    }

    #[test]
    fn filtered_scrape_matches_golden() {
        // Scrape 2 saw every family of scrape 1, with Requests2XX one higher (it counted scrape 1).
        let mut input: Vec<MetricFamily> = parse_golden(FULL)
            .into_iter()
            .filter(|f| f.name() != "Requests2XX")
            .collect();
        input.extend(
            parse_golden(FILTERED)
                .into_iter()
                .filter(|f| f.name() == "Requests2XX"),
        );
        let filter = Filter::from_query(Some(
            "name[]=ts_inference_requests_total&name[]=Requests2XX",
        ));
        let out = encode(&input, &filter);
        assert_eq!(blocks(&out), blocks(FILTERED));
        assert_eq!(out.len(), FILTERED.len());
        assert_eq!(
            names_in_order(&out),
            ["Requests2XX", "ts_inference_requests_total"]
        );
    }

    #[test]
    fn unknown_name_is_empty() {
        assert_eq!(UNKNOWN, "");
        let input = parse_golden(FULL);
        for q in ["name[]=no_such_metric", "name[]=", "name[]=requests2xx"] {
            assert_eq!(encode(&input, &Filter::from_query(Some(q))), UNKNOWN, "{q}");
        }
    }

    #[test]
    fn empty_registry_prints_every_help_and_type() {
        let out = encode(&[], &Filter::all());
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2 * TORCHSERVE_FAMILIES.len());
        for (pair, spec) in lines.chunks(2).zip(TORCHSERVE_FAMILIES.iter()) {
            assert_eq!(pair[0], format!("# HELP {} {}", spec.name, spec.help()));
            assert_eq!(
                pair[1],
                format!("# TYPE {} {}", spec.name, spec.kind.as_str())
            );
        }
    }

    #[test]
    fn help_and_type_lines_match_golden() {
        let golden: BTreeSet<&str> = FULL.lines().filter(|l| l.starts_with("# ")).collect();
        let out = encode(&[], &Filter::all());
        let ours: BTreeSet<&str> = out.lines().collect();
        assert_eq!(ours, golden);
    }

    #[test]
    fn filtered_family_without_samples_is_left_out() {
        // simpleclient 0.9 drops a family from a filtered scrape when none of its samples matches.
        let input = parse_golden(FULL);
        assert_eq!(
            encode(&input, &Filter::from_query(Some("name[]=GPUUtilization"))),
            ""
        );
        let out = encode(
            &input,
            &Filter::from_query(Some("name[]=GPUUtilization&name[]=QueueTime")),
        );
        assert_eq!(names_in_order(&out), ["QueueTime"]);
    }

    #[test]
    fn samples_sorted_and_labels_escaped() {
        let help = "h";
        let input = [family(
            "HandlerTime",
            help,
            MetricType::GAUGE,
            &[
                (
                    vec![("Hostname", "vm"), ("Level", "Model"), ("ModelName", "z")],
                    1.0,
                ),
                (
                    vec![
                        ("Hostname", "vm"),
                        ("Level", "Model"),
                        ("ModelName", "a\"b\\c\nd"),
                    ],
                    2.5E-4,
                ),
                (
                    vec![("Hostname", "vm"), ("Level", "Model"), ("ModelName", "m")],
                    f64::INFINITY,
                ),
            ],
        )];
        let out = encode(&input, &Filter::from_query(Some("name[]=HandlerTime")));
        assert_eq!(
            out,
            "# HELP HandlerTime Torchserve prometheus gauge metric with unit: ms\n\
             # TYPE HandlerTime gauge\n\
             HandlerTime{ModelName=\"a\\\"b\\\\c\\nd\",Level=\"Model\",Hostname=\"vm\",} 2.5E-4\n\
             HandlerTime{ModelName=\"m\",Level=\"Model\",Hostname=\"vm\",} +Inf\n\
             HandlerTime{ModelName=\"z\",Level=\"Model\",Hostname=\"vm\",} 1.0\n"
        );
    }

    #[test]
    fn own_families_follow_in_prometheus_format() {
        let registry = Registry::new();
        registry.targets.set(3);
        let gathered = registry.gather();

        let out = encode(&gathered, &Filter::all());
        let ts_end = out
            .find("# HELP servescope_")
            .unwrap_or_else(|| panic!("own families missing:\n{out}"));
        assert_eq!(blocks(&out[..ts_end]).len(), TORCHSERVE_FAMILIES.len());
        assert!(
            out.contains("# TYPE servescope_targets gauge\nservescope_targets 3\n"),
            "{out}"
        );
        assert!(out.contains("servescope_build_info{version=\""), "{out}");
        assert!(out.ends_with('\n'));

        let out = encode(
            &gathered,
            &Filter::from_query(Some("name[]=servescope_targets")),
        );
        assert_eq!(
            out,
            "# HELP servescope_targets Processes being traced.\n# TYPE servescope_targets gauge\nservescope_targets 3\n"
        );
    }

    /// Sample lines of a body, OpenMetrics label sets made comparable with TorchServe's trailing comma.
    fn sample_lines(text: &str) -> BTreeSet<String> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (series, value) = l.rsplit_once(' ').unwrap_or((l, ""));
                format!("{} {}", series.replace(",}", "}"), value.replace('E', "e"))
            })
            .collect()
    }

    /// A `POST` to `target` answered `status` `latency_ns` after the request was complete (the
    /// response's last byte 1 µs later), with (request, response) `bytes`.
    fn post(
        target: String,
        status: u16,
        reason: &str,
        latency_ns: u64,
        bytes: (u64, u64),
    ) -> crate::http::Exchange {
        crate::http::Exchange {
            tgid: 1,
            conn_id: 1,
            peer: None,
            request: Some(crate::http::Request {
                method: "POST".into(),
                target,
                first_byte_ns: 0,
                complete_ns: 1_000,
                bytes: bytes.0,
            }),
            response: crate::http::Response {
                status,
                reason: reason.to_owned().into(),
                request_id: Some("id".into()),
                start_ns: 1_000 + latency_ns,
                end_ns: Some(2_000 + latency_ns),
                bytes: bytes.1,
            },
        }
    }

    /// A registry with every kind of family servescope serves: TorchServe's (golden values), own
    /// counters, gauges, the build info and the latency histogram.
    fn full_registry_families() -> Vec<MetricFamily> {
        let registry = Registry::new();
        registry.targets.set(2);
        registry.parse_errors.inc();
        let ex = post("/predictions/m".into(), 200, "OK", 4_999_000, (10, 20));
        registry.record(&ex, "h", crate::registry::Flavor::Generic);
        // TorchServe's families come from the golden capture instead.
        let mut families: Vec<MetricFamily> = registry
            .gather()
            .into_iter()
            .filter(|f| torchserve_family(f.name()).is_none())
            .collect();
        families.extend(parse_golden(FULL));
        families
    }

    #[test]
    fn openmetrics_parses_and_has_the_same_series() {
        let families = full_registry_families();
        let om = encode_as(&families, &Filter::all(), Format::OpenMetrics("1.0.0"));
        assert!(om.ends_with("\n# EOF\n"), "{om}");
        let parsed = openmetrics_parser::openmetrics::parse_openmetrics(&om)
            .unwrap_or_else(|e| panic!("OpenMetrics parser refused the body: {e:?}\n{om}"));
        let ty = |name: &str| {
            parsed
                .families
                .get(name)
                .map(|f| (f.family_type.to_string(), f.unit.clone()))
                .unwrap_or_else(|| panic!("{name} missing: {:?}", parsed.families.keys()))
        };
        // TorchServe counters without `_total` keep their sample names: typed unknown.
        assert_eq!(ty("Requests2XX").0, "unknown");
        assert_eq!(ty("ts_inference_latency_microseconds").0, "unknown");
        assert_eq!(ty("ts_inference_requests").0, "counter");
        assert_eq!(ty("CPUUtilization").0, "gauge");
        assert_eq!(ty("servescope_http_parse_errors").0, "counter");
        assert_eq!(ty("servescope_build").0, "info");
        assert_eq!(ty("servescope_request_duration_seconds").0, "histogram");
        // Every TorchServe family with samples; those without are left out.
        let with_samples: BTreeSet<&str> = names_in_order(FULL)
            .into_iter()
            .filter(|n| FULL.lines().any(|l| l.starts_with(&format!("{n}{{"))))
            .collect();
        assert!(with_samples.len() > 10, "{with_samples:?}");
        for spec in TORCHSERVE_FAMILIES {
            let family = spec.name.strip_suffix("_total").unwrap_or(spec.name);
            assert_eq!(
                parsed.families.contains_key(family),
                with_samples.contains(spec.name),
                "{family}"
            );
        }
        // The same series, names and values as the Prometheus text: a Prometheus negotiating either
        // stores the same thing.
        let text = encode(&families, &Filter::all());
        assert_eq!(sample_lines(&om), sample_lines(&text));
        assert!(
            om.contains("Requests2XX{Level=\"Host\",Hostname=\""),
            "{om}"
        );
    }

    #[test]
    fn openmetrics_empty_selection_is_just_eof() {
        let families = full_registry_families();
        for q in ["name[]=no_such_metric", "name[]=GPUUtilization"] {
            let om = encode_as(
                &families,
                &Filter::from_query(Some(q)),
                Format::OpenMetrics("1.0.0"),
            );
            // The specification allows an empty metric set (`metricset = *metricfamily`); the
            // parser's grammar wants one family, so the text is checked as written.
            assert_eq!(om, "# EOF\n", "{q}");
        }
        // The default format is untouched by the negotiation: still TorchServe's empty body.
        let text = encode_as(
            &families,
            &Filter::from_query(Some("name[]=no_such_metric")),
            Format::Prometheus,
        );
        assert_eq!(text, UNKNOWN);
    }

    proptest::proptest! {
        #[test]
        fn openmetrics_parses_whatever_the_labels(
            model in "[a-zA-Z0-9_\\-\\.\"\\\\\n é]{1,12}",
            version in "[0-9a-z\\.]{0,4}",
            status in proptest::sample::select(vec![200u16, 404, 503, 302]),
            latency_us in 0u64..10_000_000,
        ) {
            let registry = Registry::new();
            let model: String = model.bytes().map(|b| format!("%{b:02X}")).collect();
            let target = format!("/predictions/{model}/{version}");
            let ex = post(target, status, "x", latency_us * 1_000, (10, 20));
            registry.record(&ex, "host\"1", crate::registry::Flavor::TorchServe);
            let families = registry.gather();
            let om = encode_as(&families, &Filter::all(), Format::OpenMetrics("1.0.0"));
            let parsed = openmetrics_parser::openmetrics::parse_openmetrics(&om);
            proptest::prop_assert!(parsed.is_ok(), "{:?}\n{}", parsed.err(), om);
            let text = encode(&families, &Filter::all());
            proptest::prop_assert_eq!(sample_lines(&om), sample_lines(&text));
        }

        /// `/metrics` renders the per-model families from their own storage: byte for byte what the
        /// proto path (every family gathered, then encoded) prints, whatever the traffic, the
        /// `name[]` filter and the format.
        #[test]
        fn render_equals_the_proto_path(
            exchanges in proptest::collection::vec(
                (
                    proptest::sample::select(vec!["m", "n", "a%22b", "x%5Cy", "%C3%A9", "zz"]),
                    proptest::sample::select(vec!["", "/1.0", "/2.0"]),
                    proptest::sample::select(vec![200u16, 404, 422, 503, 302]),
                    proptest::sample::select(vec!["vm", "pod-1", "h\"q"]),
                    0u64..100_000_000,
                    proptest::option::of(0u64..5_000_000),
                    proptest::bool::ANY,
                ),
                0..40,
            ),
            batches in proptest::collection::vec((1u32..70, 0.0..3.0f64), 0..5),
            query in proptest::sample::select(vec![
                "",
                "name[]=ts_inference_requests_total",
                "name[]=servescope_request_duration_seconds&name[]=Requests2XX",
                "name[]=ts_queue_latency_microseconds&name[]=servescope_batch_size",
                "name[]=no_such_metric",
            ]),
            openmetrics in proptest::bool::ANY,
        ) {
            let registry = Registry::new();
            for (model, version, status, host, latency_ns, queue_ns, torchserve) in exchanges {
                let ex = post(
                    format!("/predictions/{model}{version}"),
                    status,
                    "x",
                    latency_ns,
                    (latency_ns % 977, latency_ns % 1013),
                );
                let flavor = if torchserve {
                    crate::registry::Flavor::TorchServe
                } else {
                    crate::registry::Flavor::Generic
                };
                registry.record_with_dispatch(&ex, host, flavor, queue_ns.map(|q| 1_000 + q));
            }
            for (requests, seconds) in batches {
                registry.observe_batch("m", "1.0", "vm", requests);
                registry.observe_backend("m", "1.0", "vm", seconds);
            }
            let filter = Filter::from_query(Some(query));
            let format = if openmetrics { Format::OpenMetrics("1.0.0") } else { Format::Prometheus };
            proptest::prop_assert_eq!(
                render(&registry, &filter, format),
                encode_as(&registry.gather(), &filter, format)
            );
        }

        /// Skipping the read-back check where no tie is possible changes nothing: the shortest
        /// form is already the closest of its length.
        #[test]
        fn java_digits_skips_the_check_only_where_it_agrees(
            bits in proptest::prelude::any::<u64>(),
            whole in 0u32..100_000_000,
            thousandths in 0u32..1000,
        ) {
            // Any bit pattern, and values shaped like TorchServe's latency sums (µs with decimals).
            for a in [f64::from_bits(bits).abs(), f64::from(whole) + f64::from(thousandths) / 1000.0] {
                if !a.is_finite() || a == 0.0 {
                    continue;
                }
                let shortest = split_sci(&format!("{a:e}"));
                let closest = format!("{a:.prec$e}", prec = shortest.0.len().max(2) - 1);
                if shortest.0.len() >= 2 && !may_tie(a) {
                    proptest::prop_assert_eq!(&split_sci(&closest), &shortest, "{}", a);
                }
                let want = if closest.parse::<f64>() == Ok(a) {
                    split_sci(&closest)
                } else {
                    shortest
                };
                proptest::prop_assert_eq!(java_digits(a), want, "{}", a);
            }
        }

        /// The whole-number shortcut prints what the digit search prints.
        #[test]
        fn java_double_whole_numbers_shortcut(n in -9_999_999i64..=9_999_999) {
            #[expect(clippy::cast_precision_loss, reason = "below 2^53: exact")]
            let v = n as f64;
            if n != 0 {
                let mut searched = String::new();
                push_java_double_searched(&mut searched, v);
                proptest::prop_assert_eq!(java_double(v), searched);
            }
        }
    }
}
