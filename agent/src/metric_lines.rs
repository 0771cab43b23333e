//! The `[METRICS]` lines TorchServe's Python workers print to their stdout pipe (FACTS.md §7), which
//! the frontend turns into the HandlerTime and PredictionTime gauges:
//!
//! `[METRICS]PredictionTime.Milliseconds:0.47|#ModelName:echo,Level:Model|#type:GAUGE|#hostname:vm,1795457674,<request-id>`
//!
//! i.e. `name.unit:value|#dims|#type:TYPE|#hostname:host,<unix seconds>[,<request id>]` (the `#type`
//! part is optional). The frontend also accepts an `INFO > ` prefix (its ReaderThread pattern).

/// Longest line kept while waiting for its end; a longer one is not a metric line worth keeping.
pub const MAX_LINE: usize = 4096;

/// One parsed metric line.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricLine {
    pub name: String,
    pub unit: String,
    pub value: f64,
    /// `key:value` dimensions in line order (e.g. ModelName, Level).
    pub dims: Vec<(String, String)>,
    pub hostname: String,
    pub request_id: Option<String>,
}

impl MetricLine {
    pub fn dim(&self, key: &str) -> Option<&str> {
        self.dims
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses one line (without its newline); `None` unless it is a well-formed metric line.
pub fn parse(line: &str) -> Option<MetricLine> {
    let line = line.strip_suffix('\r').unwrap_or(line);
    let body = line
        .strip_prefix("INFO > ")
        .unwrap_or(line)
        .strip_prefix("[METRICS]")?;
    let mut parts = body.split('|');
    let (name_unit, value) = parts.next()?.split_once(':')?;
    let (name, unit) = name_unit.rsplit_once('.')?;
    let value: f64 = value.trim().parse().ok().filter(|v: &f64| v.is_finite())?;
    let dims = parts.next()?.strip_prefix('#')?;
    let dims = if dims.is_empty() {
        Vec::new()
    } else {
        dims.split(',')
            .map(|kv| {
                kv.split_once(':')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
            })
            .collect::<Option<Vec<_>>>()?
    };
    let mut rest = parts.next()?;
    if rest.starts_with("#type:") {
        rest = parts.next()?;
    }
    let mut tail = rest.strip_prefix("#hostname:")?.splitn(3, ',');
    let hostname = tail.next()?.to_owned();
    let _timestamp: u64 = tail.next()?.parse().ok()?;
    let request_id = tail.next().filter(|s| !s.is_empty()).map(str::to_owned);
    let valid_name =
        |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid_name(name) || !valid_name(unit) || parts.next().is_some() {
        return None;
    }
    Some(MetricLine {
        name: name.to_owned(),
        unit: unit.to_owned(),
        value,
        dims,
        hostname,
        request_id,
    })
}

/// Splits a pipe's byte stream into lines. Writes whose tail the kernel did not copy break the line
/// they are in: it is dropped, never guessed.
#[derive(Debug, Default)]
pub struct LineSplitter {
    partial: Vec<u8>,
    /// The current line lost bytes: skip to the next newline.
    broken: bool,
}

impl LineSplitter {
    /// Feeds one write of `len` bytes whose first bytes are `head`; returns the complete lines.
    pub fn feed(&mut self, head: &[u8], len: u64) -> Vec<String> {
        let mut out = Vec::new();
        for &b in head {
            if b == b'\n' {
                if !self.broken {
                    out.push(String::from_utf8_lossy(&self.partial).into_owned());
                }
                self.partial.clear();
                self.broken = false;
            } else if !self.broken {
                if self.partial.len() >= MAX_LINE {
                    self.partial.clear();
                    self.broken = true;
                } else {
                    self.partial.push(b);
                }
            }
        }
        if len > head.len() as u64 {
            self.partial.clear();
            self.broken = true;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_lines_parse() {
        let l = parse("[METRICS]PredictionTime.Milliseconds:0.47|#ModelName:echo,Level:Model|#type:GAUGE|#hostname:vm,1795457674,b44aa24c-cde0-4de2-81b2-509f2f6b4133")
            .expect("golden line");
        assert_eq!(l.name, "PredictionTime");
        assert_eq!(l.unit, "Milliseconds");
        assert_eq!(l.value, 0.47);
        assert_eq!(l.dim("ModelName"), Some("echo"));
        assert_eq!(l.dim("Level"), Some("Model"));
        assert_eq!(l.hostname, "vm");
        assert_eq!(
            l.request_id.as_deref(),
            Some("b44aa24c-cde0-4de2-81b2-509f2f6b4133")
        );
        let l = parse("INFO > [METRICS]HandlerTime.ms:200.17|#ModelName:slow,Level:Model|#hostname:vm,1795457674")
            .expect("no type, no id, prefixed");
        assert_eq!((l.name.as_str(), l.value), ("HandlerTime", 200.17));
        assert_eq!(l.request_id, None);
    }

    #[test]
    fn other_lines_are_not_metrics() {
        for bad in [
            "",
            "Torch worker started.",
            "[PID]1234",
            "[METRICS]",
            "[METRICS]HandlerTime.ms:abc|#ModelName:x|#hostname:vm,1",
            "[METRICS]HandlerTime.ms:NaN|#ModelName:x|#hostname:vm,1",
            "[METRICS]HandlerTime:1.0|#ModelName:x|#hostname:vm,1",
            "[METRICS]HandlerTime.ms:1.0|#ModelName|#hostname:vm,1",
            "[METRICS]HandlerTime.ms:1.0|#ModelName:x|#hostname:vm",
            "[METRICS]HandlerTime.ms:1.0|#ModelName:x|#hostname:vm,1|extra",
            "[METRICS]Bad Name.ms:1.0|#ModelName:x|#hostname:vm,1",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn lines_split_across_writes_and_cut_writes() {
        let mut s = LineSplitter::default();
        assert!(s.feed(b"[METRICS]Handler", 16).is_empty());
        assert_eq!(
            s.feed(b"Time.ms:1.0|x\nnext", 18),
            vec!["[METRICS]HandlerTime.ms:1.0|x"]
        );
        // A write whose tail was not copied: its unfinished line is dropped, the next one is whole.
        assert!(s.feed(b" line", 600).is_empty());
        assert!(s.feed(b"rest of it\nok", 13).is_empty());
        assert_eq!(s.feed(b"\n", 1), vec!["ok"]);
        let long = vec![b'a'; MAX_LINE + 10];
        assert!(s.feed(&long, long.len() as u64).is_empty());
        assert_eq!(s.feed(b"\nfine\n", 6), vec!["fine"]);
    }
}
