//! The JSON-lines request log (`--request-log`), and the writer loop that file sinks share.

use std::time::SystemTime;

use serde::Serialize;
use tokio::sync::mpsc;

use crate::sink::{Msg, Record, Reopen, SinkMetrics, Tally, rfc3339_micros, rotate::RotatingFile};

/// One line of the request log. Field order is the order in the file; absent values are `null`, so
/// every line has the same keys (jq, pandas and Loki see one schema).
#[derive(Serialize)]
struct JsonLine<'a> {
    timestamp: String,
    hostname: &'a str,
    pid: u32,
    client: Option<String>,
    method: Option<&'a str>,
    path: Option<&'a str>,
    api: &'static str,
    model: Option<&'a str>,
    version: Option<&'a str>,
    status: u16,
    latency_us: Option<f64>,
    total_us: Option<f64>,
    request_bytes: Option<u64>,
    response_bytes: u64,
    request_id: Option<&'a str>,
}

/// Appends `r` as one JSON object and a newline.
pub fn json_line(r: &Record, out: &mut Vec<u8>) {
    let line = JsonLine {
        timestamp: rfc3339_micros(r.unix_ns),
        hostname: &r.hostname,
        pid: r.pid,
        client: r.client.map(|a| a.to_string()),
        method: r.method.as_deref(),
        path: r.path.as_deref(),
        api: r.api.as_str(),
        model: r.model.as_deref(),
        version: r.version.as_deref(),
        status: r.status,
        latency_us: r.latency_us,
        total_us: r.total_us,
        request_bytes: r.request_bytes,
        response_bytes: r.response_bytes,
        request_id: r.request_id.as_deref(),
    };
    // Serializing strings, numbers and options into a Vec cannot fail; should it, the line is left
    // out rather than written half.
    let start = out.len();
    if serde_json::to_writer(&mut *out, &line).is_ok() {
        out.push(b'\n');
    } else {
        out.truncate(start);
    }
}

/// A file sink's thread: takes records until every sender is gone, formats each with `format`,
/// and writes whatever is queued in one go. Time-based rotation, SIGHUP reopening and flushing also
/// happen on the once-a-second tick, so an idle sink still rotates and reopens on time.
pub(crate) fn run(
    mut rx: mpsc::Receiver<Msg>,
    mut out: RotatingFile,
    format: fn(&Record, &mut Vec<u8>),
    reopen: &Reopen,
    metrics: &SinkMetrics,
) {
    let mut seen = reopen.generation();
    let mut exported = Tally::default();
    let mut line = Vec::with_capacity(512);
    while let Some(first) = rx.blocking_recv() {
        let mut next = Some(first);
        while let Some(msg) = next {
            let now = SystemTime::now();
            let generation = reopen.generation();
            if generation != seen {
                seen = generation;
                out.reopen(now);
            }
            match msg {
                Msg::Record(r) => {
                    line.clear();
                    format(&r, &mut line);
                    if !line.is_empty() {
                        out.push(&line, now);
                    }
                }
                Msg::Tick => out.tick(now),
            }
            next = rx.try_recv().ok();
        }
        // The queue is empty: write now, so a quiet log is still up to date on disk.
        out.flush();
        metrics.export(out.tally(), &mut exported);
    }
    out.flush();
    metrics.export(out.tally(), &mut exported);
    tracing::debug!(path = %out.path().display(), "request-log file closed");
}

#[cfg(test)]
mod tests {
    use std::{
        fs,
        sync::Arc,
        time::{Duration, Instant},
    };

    use super::*;
    use crate::{
        registry::Registry,
        sink::rotate::tests::read_all,
        sink::{SinkName, clock::WallClock, rotate::Rotation, tests::exchange},
    };

    fn record(target: &str, status: u16) -> Record {
        Record::from_exchange(
            &exchange(target, status),
            "vm-1",
            &mut WallClock::fixed(1_700_000_000_000_000_000),
        )
    }

    #[test]
    fn json_fields() -> anyhow::Result<()> {
        let mut buf = Vec::new();
        json_line(&record("/predictions/echo/2.0?token=secret", 200), &mut buf);
        assert_eq!(buf.last(), Some(&b'\n'));
        assert_eq!(buf.iter().filter(|&&b| b == b'\n').count(), 1);
        let text = String::from_utf8(buf)?;
        assert_eq!(
            text,
            "{\"timestamp\":\"2023-11-14T22:13:20.014000Z\",\"hostname\":\"vm-1\",\"pid\":4242,\
             \"client\":\"127.0.0.1:50000\",\"method\":\"POST\",\"path\":\"/predictions/echo/2.0\",\
             \"api\":\"inference\",\"model\":\"echo\",\"version\":\"2.0\",\"status\":200,\
             \"latency_us\":12345.5,\"total_us\":13000.0,\"request_bytes\":321,\
             \"response_bytes\":1234,\"request_id\":\"b7c1-42\"}\n"
        );
        assert!(!text.contains("secret"), "query strings are never logged");
        Ok(())
    }

    #[test]
    fn json_nulls_and_escapes() -> anyhow::Result<()> {
        let mut r = record("/predictions/we\"ird\nmodel", 500);
        r.request_id = None;
        r.client = None;
        r.latency_us = None;
        let mut buf = Vec::new();
        json_line(&r, &mut buf);
        assert_eq!(buf.iter().filter(|&&b| b == b'\n').count(), 1, "one line");
        let v: serde_json::Value = serde_json::from_slice(&buf)?;
        assert_eq!(v["model"], "we\"ird\nmodel");
        assert!(v["request_id"].is_null() && v["client"].is_null() && v["latency_us"].is_null());
        assert_eq!(v.as_object().map(serde_json::Map::len), Some(15));
        Ok(())
    }

    /// Under load: a producer thread at full speed, size rotation every few hundred lines, and an
    /// external logrotate (rename + SIGHUP-style reopen) in the middle. Every record is written once,
    /// in order, across all files.
    #[test]
    fn rotation_under_load_loses_and_duplicates_nothing() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("requests.jsonl");
        let rotation = Rotation {
            max_bytes: Some(64 * 1024),
            interval: None,
            retain: 10_000,
        };
        let out = RotatingFile::open(&path, rotation, None)?;
        let registry = Registry::new();
        let metrics = SinkMetrics::new(&registry, SinkName::RequestLog);
        let reopen = Reopen::default();
        let (tx, rx) = mpsc::channel(1024);
        let (m2, r2) = (metrics.clone(), reopen.clone());
        let writer = std::thread::spawn(move || run(rx, out, json_line, &r2, &m2));

        const N: u64 = 50_000;
        let mut sent = 0u64;
        let start = Instant::now();
        let mut external = None;
        while sent < N {
            let mut r = record("/predictions/m", 200);
            r.response_bytes = sent;
            // Blocking send: this test is about rotation, not about the reader's drops.
            tx.blocking_send(Msg::Record(Arc::new(r)))?;
            sent += 1;
            if sent == N / 2 {
                // logrotate: rename the live file away, then HUP.
                let moved = dir.path().join("external.jsonl");
                fs::rename(&path, &moved)?;
                reopen.request();
                external = Some(moved);
            }
        }
        drop(tx);
        writer
            .join()
            .map_err(|_| anyhow::anyhow!("writer panicked"))?;
        assert!(start.elapsed() < Duration::from_secs(60));

        // The externally renamed file holds lines from between rotations: put it where it belongs
        // in the sequence by reading all files and sorting by the sequence number, then check
        // that the sequence is exactly 0..N.
        let seq = |line: &str| -> anyhow::Result<u64> {
            let v: serde_json::Value = serde_json::from_str(line)?;
            Ok(v["response_bytes"].as_u64().unwrap_or(u64::MAX))
        };
        let mut all = read_all(&path, 10_000)?;
        // The rotated set alone is in strictly increasing order (the renamed-away block is missing).
        let ordered: Vec<u64> = all.iter().map(|l| seq(l)).collect::<anyhow::Result<_>>()?;
        assert!(ordered.windows(2).all(|w| w[0] < w[1]), "out of order");
        let mut seqs: Vec<u64> = Vec::new();
        if let Some(moved) = external {
            all.extend(fs::read_to_string(moved)?.lines().map(str::to_owned));
        }
        for line in &all {
            seqs.push(seq(line)?);
        }
        assert_eq!(seqs.len() as u64, N, "line count");
        seqs.sort_unstable();
        seqs.dedup();
        assert_eq!(seqs.len() as u64, N, "duplicates");
        assert_eq!(seqs.first(), Some(&0));
        assert_eq!(seqs.last(), Some(&(N - 1)));
        assert_eq!(metrics.written.get(), N);
        assert_eq!(metrics.dropped.get(), 0);
        Ok(())
    }
}
