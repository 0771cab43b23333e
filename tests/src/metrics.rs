//! Parser for the Prometheus text format as TorchServe writes it (and as servescope must copy it): label
//! sets end with a trailing comma (`{Level="Host",Hostname="vm",}`), values are Java doubles (`81.0`,
//! `2.8594324398E7`). Standard Prometheus text (servescope's own families) parses the same way.
//!
//! Samples are keyed by [`Series`]: the sample name plus its labels sorted by name, so two expositions
//! that print labels or families in a different order compare equal.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use anyhow::{Context, Result, bail};

/// One time series: sample name and labels sorted by label name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Series {
    pub name: String,
    pub labels: Vec<(String, String)>,
}

impl Series {
    pub fn new(name: &str, labels: &[(&str, &str)]) -> Self {
        let mut labels: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        labels.sort();
        Self {
            name: name.to_owned(),
            labels,
        }
    }

    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl fmt::Display for Series {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if !self.labels.is_empty() {
            f.write_str("{")?;
            for (i, (k, v)) in self.labels.iter().enumerate() {
                if i > 0 {
                    f.write_str(",")?;
                }
                write!(f, "{k}={v:?}")?;
            }
            f.write_str("}")?;
        }
        Ok(())
    }
}

/// One parsed exposition.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub samples: BTreeMap<Series, f64>,
    /// Family name → type from `# TYPE` lines.
    pub types: BTreeMap<String, String>,
    /// Family name → text from `# HELP` lines.
    pub helps: BTreeMap<String, String>,
}

impl Metrics {
    /// Parses a whole exposition. A malformed line or a series that appears twice is an error: both would
    /// be exposition bugs that a lenient parser would hide.
    pub fn parse(text: &str) -> Result<Self> {
        let mut m = Metrics::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix('#') {
                let mut words = rest.trim_start().splitn(3, ' ');
                match (words.next(), words.next(), words.next()) {
                    (Some("TYPE"), Some(name), Some(kind)) => {
                        m.types.insert(name.to_owned(), kind.trim().to_owned());
                    }
                    (Some("HELP"), Some(name), help) => {
                        m.helps
                            .insert(name.to_owned(), help.unwrap_or_default().to_owned());
                    }
                    _ => {} // other comments are allowed by the format
                }
                continue;
            }
            let (series, value) =
                parse_sample(line).with_context(|| format!("line {}: {line:?}", n + 1))?;
            if m.samples.insert(series.clone(), value).is_some() {
                bail!("line {}: series {series} appears twice", n + 1);
            }
        }
        Ok(m)
    }

    /// The value of one series.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples.get(&Series::new(name, labels)).copied()
    }

    /// All series with this sample name.
    pub fn series(&self, name: &str) -> impl Iterator<Item = (&Series, f64)> {
        self.samples
            .iter()
            .filter(move |(s, _)| s.name == name)
            .map(|(s, v)| (s, *v))
    }

    /// All series with this sample name, as an owned map (for comparisons).
    pub fn family(&self, name: &str) -> BTreeMap<Series, f64> {
        self.series(name).map(|(s, v)| (s.clone(), v)).collect()
    }

    /// Sum over all series with this sample name (0 if there are none).
    pub fn sum(&self, name: &str) -> f64 {
        self.series(name).map(|(_, v)| v).sum()
    }

    /// Whether any series with this sample name exists.
    pub fn has(&self, name: &str) -> bool {
        self.series(name).next().is_some()
    }

    /// Every value that label `label` takes in any series.
    pub fn label_values(&self, label: &str) -> BTreeSet<String> {
        self.samples
            .keys()
            .filter_map(|s| s.label(label))
            .map(str::to_owned)
            .collect()
    }
}

/// `name{k="v",...,} value [timestamp]` or `name value [timestamp]`.
fn parse_sample(line: &str) -> Result<(Series, f64)> {
    let name_end = line.find(['{', ' ', '\t']).context("no value")?;
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        bail!("bad metric name {name:?}");
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        rest = after_brace;
        loop {
            rest = rest.trim_start();
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = rest.find('=').context("label without '='")?;
            let key = rest[..eq].trim();
            if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                bail!("bad label name {key:?}");
            }
            rest = rest[eq + 1..]
                .trim_start()
                .strip_prefix('"')
                .context("label value must be quoted")?;
            let (value, after) = unquote(rest)?;
            labels.push((key.to_owned(), value));
            rest = after.trim_start();
            // A comma may follow every label, including the last one (TorchServe always writes it).
            if let Some(after) = rest.strip_prefix(',') {
                rest = after;
            } else if !rest.starts_with('}') {
                bail!("expected ',' or '}}' after label {key}");
            }
        }
    }
    let mut fields = rest.split_whitespace();
    let value_text = fields.next().context("no value")?;
    if let Some(ts) = fields.next() {
        ts.parse::<i64>()
            .with_context(|| format!("bad timestamp {ts:?}"))?;
    }
    if fields.next().is_some() {
        bail!("trailing text after value");
    }
    labels.sort();
    if labels.windows(2).any(|w| w[0].0 == w[1].0) {
        bail!("duplicate label name");
    }
    Ok((
        Series {
            name: name.to_owned(),
            labels,
        },
        parse_value(value_text)?,
    ))
}

/// Reads a label value up to its closing quote; returns the unescaped value and the text after the quote.
fn unquote(s: &str) -> Result<(String, &str)> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((out, &s[i + 1..])),
            '\\' => match chars.next() {
                Some((_, 'n')) => out.push('\n'),
                Some((_, other)) => out.push(other),
                None => break,
            },
            c => out.push(c),
        }
    }
    bail!("unterminated label value")
}

/// Go/Prometheus spellings of the special values plus anything Rust parses, which covers Java's
/// `Double.toString` (`81.0`, `1.0E-4`, `2.8594324398E7`).
fn parse_value(s: &str) -> Result<f64> {
    Ok(match s {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        _ => s
            .parse()
            .with_context(|| format!("bad sample value {s:?}"))?,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn torchserve_format() -> Result<()> {
        let m = Metrics::parse(
            "# HELP Requests2XX Torchserve prometheus counter metric with unit: Count\n\
             # TYPE Requests2XX counter\n\
             Requests2XX{Level=\"Host\",Hostname=\"vm\",} 81.0\n\
             ts_inference_latency_microseconds{model_name=\"slow\",model_version=\"default\",hostname=\"vm\",} 2.8594324398E7\n\
             tiny{a=\"x\"} 1.0E-4\n\
             servescope_targets 1\n\
             h_bucket{le=\"+Inf\"} 3 1700000000000\n",
        )?;
        assert_eq!(
            m.get("Requests2XX", &[("Hostname", "vm"), ("Level", "Host")]),
            Some(81.0)
        );
        assert_eq!(
            m.get(
                "ts_inference_latency_microseconds",
                &[
                    ("hostname", "vm"),
                    ("model_name", "slow"),
                    ("model_version", "default")
                ]
            ),
            Some(28_594_324.398)
        );
        assert_eq!(m.get("tiny", &[("a", "x")]), Some(1.0e-4));
        assert_eq!(m.sum("servescope_targets"), 1.0);
        assert_eq!(m.get("h_bucket", &[("le", "+Inf")]), Some(3.0));
        assert_eq!(
            m.types.get("Requests2XX").map(String::as_str),
            Some("counter")
        );
        assert_eq!(
            m.label_values("Hostname"),
            BTreeSet::from(["vm".to_owned()])
        );
        Ok(())
    }

    #[test]
    fn escaped_label_values_and_label_order() -> Result<()> {
        let m = Metrics::parse("x{b=\"q\\\"uo,te}\",a=\"back\\\\slash\\n\"} 2\n")?;
        assert_eq!(
            m.get("x", &[("a", "back\\slash\n"), ("b", "q\"uo,te}")]),
            Some(2.0)
        );
        Ok(())
    }

    #[test]
    fn rejects_malformed_and_duplicate_lines() {
        for bad in [
            "x{a=\"1\" 2",
            "x{a=1} 2",
            "x",
            "x{a=\"1\"} two",
            "x 1\nx 2",
            "x{a=\"1\",a=\"2\"} 1",
        ] {
            assert!(Metrics::parse(bad).is_err(), "{bad:?} should not parse");
        }
    }

    /// The golden capture of TorchServe's own /metrics parses and holds the values its README states.
    #[test]
    fn golden_capture() -> Result<()> {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/torchserve-0.12/metrics_full.txt");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let m = Metrics::parse(&text)?;
        let host = [("Level", "Host"), ("Hostname", "vm")];
        assert_eq!(m.get("Requests2XX", &host), Some(81.0));
        assert_eq!(m.get("Requests4XX", &host), Some(10.0));
        assert_eq!(m.get("Requests5XX", &host), Some(5.0));
        let model = |name, version| {
            [
                ("model_name", name),
                ("model_version", version),
                ("hostname", "vm"),
            ]
        };
        assert_eq!(
            m.get("ts_inference_requests_total", &model("echo", "default")),
            Some(52.0)
        );
        assert_eq!(
            m.get("ts_inference_requests_total", &model("fail", "default")),
            Some(3.0)
        );
        assert!(
            m.get(
                "ts_inference_latency_microseconds",
                &model("fail", "default")
            )
            .is_none()
        );
        assert_eq!(m.types.len(), 21, "TorchServe prints 21 families");
        Ok(())
    }
}
