//! The `[METRICS]` lines TorchServe's Python workers print to their stdout pipe (FACTS.md §7), which
//! the frontend turns into the HandlerTime and PredictionTime gauges:
//!
//! `[METRICS]PredictionTime.Milliseconds:0.47|#ModelName:echo,Level:Model|#type:GAUGE|#hostname:vm,1795457674,<request-id>`
//!
//! i.e. `name.unit:value|#dims|#type:TYPE|#hostname:host,<unix seconds>[,<request id>]` (the `#type`
//! part is optional). The frontend also accepts an `INFO > ` prefix (its ReaderThread pattern).

/// Longest line kept while waiting for its end; a longer one is not a metric line worth keeping.
pub const MAX_LINE: usize = 4096;

/// One parsed metric line, borrowed from it: workers print two per request, so nothing is copied.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricLine<'a> {
    pub name: &'a str,
    pub unit: &'a str,
    pub value: f64,
    /// `key:value` dimensions in line order (e.g. ModelName, Level), comma-separated as in the line;
    /// [`parse`] checked that each has its colon.
    dims: &'a str,
    pub hostname: &'a str,
    pub request_id: Option<&'a str>,
}

impl<'a> MetricLine<'a> {
    /// The `key:value` dimensions in line order.
    pub fn dims(&self) -> impl Iterator<Item = (&'a str, &'a str)> + use<'a> {
        self.dims
            .split(',')
            .filter(|kv| !kv.is_empty())
            .filter_map(|kv| kv.split_once(':'))
    }

    pub fn dim(&self, key: &str) -> Option<&'a str> {
        self.dims().find(|(k, _)| *k == key).map(|(_, v)| v)
    }
}

/// Parses one line (without its newline); `None` unless it is a well-formed metric line.
pub fn parse(line: &str) -> Option<MetricLine<'_>> {
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
    if !dims.is_empty() && !dims.split(',').all(|kv| kv.contains(':')) {
        return None;
    }
    let mut rest = parts.next()?;
    if rest.starts_with("#type:") {
        rest = parts.next()?;
    }
    let mut tail = rest.strip_prefix("#hostname:")?.splitn(3, ',');
    let hostname = tail.next()?;
    let _timestamp: u64 = tail.next()?.parse().ok()?;
    let request_id = tail.next().filter(|s| !s.is_empty());
    let valid_name =
        |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid_name(name) || !valid_name(unit) || parts.next().is_some() {
        return None;
    }
    Some(MetricLine {
        name,
        unit,
        value,
        dims,
        hostname,
        request_id,
    })
}

/// What a metric line starts with (see [`parse`]).
const PREFIXES: [&[u8]; 2] = [b"[METRICS]", b"INFO > [METRICS]"];

/// Whether `start`, the first bytes of a line, can still begin a metric line.
fn may_be_metric(start: &[u8]) -> bool {
    PREFIXES.iter().any(|p| {
        if start.len() >= p.len() {
            start.starts_with(p)
        } else {
            p.starts_with(start)
        }
    })
}

/// Splits a pipe's byte stream into the lines that can be metric lines. Writes whose tail the kernel
/// did not copy break the line they are in: it is dropped, never guessed. A worker prints several
/// other lines per request; they are dropped as soon as their first bytes rule them out, unbuffered.
#[derive(Debug, Default)]
pub struct LineSplitter {
    partial: Vec<u8>,
    /// The current line lost bytes, is too long, or is no metric line: skip to the next newline.
    broken: bool,
}

impl LineSplitter {
    /// Feeds one write of `len` bytes whose first bytes are `head`; hands `on_line` each complete line
    /// that starts like a metric line (invalid UTF-8 replaced).
    pub fn feed(&mut self, head: &[u8], len: u64, mut on_line: impl FnMut(&str)) {
        let mut rest = head;
        while let Some(i) = memchr::memchr(b'\n', rest) {
            self.push(&rest[..i]);
            if !self.broken && may_be_metric(&self.partial) {
                on_line(&String::from_utf8_lossy(&self.partial));
            }
            self.partial.clear();
            self.broken = false;
            rest = &rest[i + 1..];
        }
        self.push(rest);
        if len > head.len() as u64 {
            self.partial.clear();
            self.broken = true;
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        if self.broken {
            return;
        }
        if self.partial.len() + bytes.len() > MAX_LINE {
            self.partial.clear();
            self.broken = true;
            return;
        }
        self.partial.extend_from_slice(bytes);
        if !may_be_metric(&self.partial) {
            self.partial.clear();
            self.broken = true;
        }
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
        assert_eq!(l.request_id, Some("b44aa24c-cde0-4de2-81b2-509f2f6b4133"));
        let l = parse("INFO > [METRICS]HandlerTime.ms:200.17|#ModelName:slow,Level:Model|#hostname:vm,1795457674")
            .expect("no type, no id, prefixed");
        assert_eq!((l.name, l.value), ("HandlerTime", 200.17));
        assert_eq!(l.request_id, None);
        assert_eq!(
            l.dims().collect::<Vec<_>>(),
            [("ModelName", "slow"), ("Level", "Model")]
        );
        let l = parse("[METRICS]X.ms:1|#|#hostname:vm,1").expect("no dimensions");
        assert_eq!(l.dims().count(), 0);
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
            "[METRICS]HandlerTime.ms:1.0|#ModelName:x,Level|#hostname:vm,1",
            "[METRICS]HandlerTime.ms:1.0|#ModelName:x|#hostname:vm",
            "[METRICS]HandlerTime.ms:1.0|#ModelName:x|#hostname:vm,1|extra",
            "[METRICS]Bad Name.ms:1.0|#ModelName:x|#hostname:vm,1",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    /// Feeds a write the kernel copied whole.
    fn whole(s: &mut LineSplitter, bytes: &[u8]) -> Vec<String> {
        cut(s, bytes, bytes.len() as u64)
    }

    /// Feeds a write of `len` bytes of which the kernel copied `head`.
    fn cut(s: &mut LineSplitter, head: &[u8], len: u64) -> Vec<String> {
        let mut lines = Vec::new();
        s.feed(head, len, |l| lines.push(l.to_owned()));
        lines
    }

    #[test]
    fn lines_split_across_writes_and_cut_writes() {
        let mut s = LineSplitter::default();
        assert!(whole(&mut s, b"[METRICS]Handler").is_empty());
        assert_eq!(
            whole(&mut s, b"Time.ms:1.0|x\n[METRICS]next"),
            vec!["[METRICS]HandlerTime.ms:1.0|x"]
        );
        // A write whose tail was not copied: its unfinished line is dropped, the next one is whole.
        assert!(cut(&mut s, b" line", 600).is_empty());
        assert!(whole(&mut s, b"rest of it\n[METRICS]ok").is_empty());
        assert_eq!(whole(&mut s, b"\n"), vec!["[METRICS]ok"]);
        let mut long = b"[METRICS]".to_vec();
        long.resize(MAX_LINE + 10, b'a');
        assert!(whole(&mut s, &long).is_empty());
        assert_eq!(
            whole(&mut s, b"\nINFO > [METRICS]fine\n"),
            vec!["INFO > [METRICS]fine"]
        );
        // Exactly MAX_LINE bytes is still a line.
        let mut max = b"[METRICS]".to_vec();
        max.resize(MAX_LINE, b'b');
        max.push(b'\n');
        assert_eq!(whole(&mut s, &max).len(), 1);
    }

    #[test]
    fn other_lines_are_dropped_even_when_split() {
        let mut s = LineSplitter::default();
        // The worker's own log lines: never returned, whichever write boundaries they have.
        assert!(whole(&mut s, b"Backend received inference at: 1\n").is_empty());
        assert!(whole(&mut s, b"[MET").is_empty());
        assert!(whole(&mut s, b"RICS-NOT]x\n[").is_empty());
        assert_eq!(
            whole(
                &mut s,
                b"METRICS]PredictionTime.ms:2|#ModelName:m|#hostname:h,1\n"
            ),
            vec!["[METRICS]PredictionTime.ms:2|#ModelName:m|#hostname:h,1"]
        );
        assert!(whole(&mut s, b"INFO > something else\n").is_empty());
    }
}
