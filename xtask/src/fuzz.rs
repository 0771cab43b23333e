//! `cargo xtask fuzz`: seeds each cargo-fuzz target's corpus from the real captures in tests/golden,
//! then runs the targets under `cargo +nightly fuzz` and reports executions per target.
//!
//! The CI-sized run of the same input paths is the proptest harness (`agent/tests/parser_props.rs`),
//! which `cargo xtask test` runs on stable; this is the long run (docs/fuzzing.md).

use std::{
    fs::{self, File},
    path::Path,
    process::Command,
};

use anyhow::{Context, Result, bail};
use servescope_integration::workspace_root;

/// The targets in fuzz/Cargo.toml.
pub const TARGETS: [&str; 5] = ["http_stream", "ring_records", "otf", "routing", "config"];

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Only this target (default: all of them, one after the other).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    target: Option<String>,
    /// Executions per target (libFuzzer -runs).
    #[arg(long, conflicts_with = "time", default_value_t = 10_000_000)]
    runs: u64,
    /// Seconds per target instead of a number of executions (libFuzzer -max_total_time).
    #[arg(long, value_name = "SECS")]
    time: Option<u64>,
    /// Only write the seed corpora (fuzz/corpus/<target>/seed-*), do not fuzz.
    #[arg(long)]
    seeds_only: bool,
}

/// One target's outcome, from libFuzzer's final statistics.
struct Outcome {
    target: &'static str,
    executions: u64,
    seconds: u64,
    corpus: usize,
}

pub fn run(o: &Options) -> Result<()> {
    let fuzz = workspace_root().join("fuzz");
    let golden = workspace_root().join("tests/golden/torchserve-0.12");
    let captures = Captures::read(&golden)?;
    let targets: Vec<&'static str> = TARGETS
        .into_iter()
        .filter(|t| o.target.as_deref().is_none_or(|w| w == *t))
        .collect();
    for t in &targets {
        let n = write_seeds(&fuzz.join("corpus").join(t), &captures.seeds(t))?;
        eprintln!("{t}: {n} seeds from {}", golden.display());
    }
    if o.seeds_only {
        return Ok(());
    }
    let mut outcomes = Vec::new();
    for t in targets {
        outcomes.push(run_target(&fuzz, t, o)?);
    }
    eprintln!("\ncargo xtask fuzz: no crash");
    eprintln!(
        "  {:<14} {:>14} {:>8} {:>8}",
        "target", "executions", "seconds", "corpus"
    );
    for r in &outcomes {
        eprintln!(
            "  {:<14} {:>14} {:>8} {:>8}",
            r.target, r.executions, r.seconds, r.corpus
        );
    }
    Ok(())
}

fn run_target(fuzz: &Path, target: &'static str, o: &Options) -> Result<Outcome> {
    let corpus = fuzz.join("corpus").join(target);
    // libFuzzer's progress goes to a file, not a pipe: a long run can be watched (tail -f), and its
    // final statistics survive whatever happens to this process.
    let logs = fuzz.join("logs");
    fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let log_path = logs.join(format!("{target}.log"));
    let log_file =
        File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let limit = match o.time {
        Some(s) => format!("-max_total_time={s}"),
        None => format!("-runs={}", o.runs),
    };
    // `cargo +nightly` goes through rustup's proxy; the toolchain outer cargo chose must not leak in.
    let mut cmd = Command::new("cargo");
    cmd.current_dir(fuzz)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .args(["+nightly", "fuzz", "run", "-O", target])
        .arg(&corpus)
        .args(["--", &limit, "-print_final_stats=1", "-rss_limit_mb=2048"])
        .stdout(log_file.try_clone().context("duplicating the log handle")?)
        .stderr(log_file);
    eprintln!(
        "$ (cd fuzz && cargo +nightly fuzz run -O {target} corpus/{target} -- {limit} -print_final_stats=1 -rss_limit_mb=2048)   (log: fuzz/logs/{target}.log)"
    );
    let status = cmd.status().context(
        "running cargo +nightly fuzz (rustup toolchain install nightly; cargo install cargo-fuzz)",
    )?;
    let log =
        fs::read_to_string(&log_path).with_context(|| format!("reading {}", log_path.display()))?;
    if !status.success() {
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "fuzz target {target} failed ({status}); crash inputs are in fuzz/artifacts/{target}/:\n{}",
            tail.join("\n")
        );
    }
    let stat = |name: &str| -> Option<u64> {
        log.lines()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .and_then(|v| v.trim().parse().ok())
    };
    let executions = stat("number_of_executed_units")
        .with_context(|| format!("no final statistics from {target}:\n{log}"))?;
    let corpus = fs::read_dir(&corpus).map_or(0, Iterator::count);
    Ok(Outcome {
        target,
        executions,
        // `Done 10000000 runs in 403 second(s)`
        seconds: log
            .lines()
            .find_map(|l| l.strip_prefix("Done "))
            .and_then(|l| l.split(" in ").nth(1))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        corpus,
    })
}

fn write_seeds(dir: &Path, seeds: &[Vec<u8>]) -> Result<usize> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (i, s) in seeds.iter().enumerate() {
        let path = dir.join(format!("seed-{i:03}"));
        fs::write(&path, s).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(seeds.len())
}

/// One syscall of the strace capture.
struct Syscall {
    egress: bool,
    unix: bool,
    bytes: Vec<u8>,
}

/// What the golden captures hold that makes good seeds.
struct Captures {
    /// TorchServe's socket syscalls (strace_echo_and_fail.txt), in order.
    syscalls: Vec<Syscall>,
    /// `(request line, status)` of every request in TorchServe's access log.
    access: Vec<(String, u16)>,
}

impl Captures {
    fn read(golden: &Path) -> Result<Captures> {
        let read = |name: &str| -> Result<String> {
            let p = golden.join(name);
            fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
        };
        let syscalls = read("strace_echo_and_fail.txt")?
            .lines()
            .filter_map(parse_strace_line)
            .collect();
        // `2026-11-23T18:22:32,988 - /127.0.0.1:60576 "GET /ping HTTP/1.1" 200 13`
        let access = read("access_log.log")?
            .lines()
            .filter_map(|l| {
                let (_, rest) = l.split_once(" \"")?;
                let (line, rest) = rest.split_once("\" ")?;
                let status = rest.split_whitespace().next()?.parse().ok()?;
                Some((line.to_owned(), status))
            })
            .collect::<Vec<_>>();
        if access.is_empty() {
            bail!("no requests parsed from access_log.log");
        }
        Ok(Captures { syscalls, access })
    }

    fn seeds(&self, target: &str) -> Vec<Vec<u8>> {
        let tcp: Vec<&Syscall> = self.syscalls.iter().filter(|s| !s.unix).collect();
        match target {
            "http_stream" => {
                let mut seeds = vec![http_stream(
                    tcp.iter().map(|s| (s.egress, s.bytes.as_slice())),
                )];
                // Each access-log request with a minimal response of its status.
                for (line, status) in &self.access {
                    let req = format!("{line}\r\nHost: 127.0.0.1\r\n\r\n");
                    let resp = format!("HTTP/1.1 {status} X\r\ncontent-length: 2\r\n\r\nok");
                    seeds.push(http_stream([
                        (false, req.as_bytes()),
                        (true, resp.as_bytes()),
                    ]));
                }
                seeds
            }
            "ring_records" => vec![ring_records(&self.syscalls)],
            "otf" => self
                .syscalls
                .iter()
                .filter(|s| s.unix && s.egress)
                .map(|s| s.bytes.clone())
                .collect(),
            "routing" => self
                .access
                .iter()
                .filter_map(|(line, _)| line.split_whitespace().nth(1))
                .map(|t| t.as_bytes().to_vec())
                .collect(),
            "config" => vec![CONFIG_SEED.as_bytes().to_vec(), {
                let mut s = b"[request_log]\npath = \"/tmp/r\"\n\0".to_vec();
                s.extend_from_slice(
                    b"--listen\x00127.0.0.1:9082\x00--port\x008080\x00--no-discovery",
                );
                s
            }],
            _ => Vec::new(),
        }
    }
}

/// A config file using every table (agent/src/sink/config.rs lists the keys).
const CONFIG_SEED: &str = r#"[rotation]
size = 5000
interval = 3600
retain = 2

[request_log]
path = "/var/log/r.jsonl"
models = ["echo"]
status = ["4xx", "5xx"]
sample_rate = 0.5
queue = 10
rotation = { interval = 60 }

[latency_csv]
enabled = false
path = "/var/log/l.csv"

[syslog]
address = "udp://127.0.0.1:514"
format = "rfc5424"
facility = "local0"
app_name = "ts"
severity = { "2xx" = "notice", "5xx" = "err" }
"#;

/// The http_stream target's framing: `op, n: u16, total: u32, bytes`.
fn http_stream<'a>(records: impl IntoIterator<Item = (bool, &'a [u8])>) -> Vec<u8> {
    let mut out = Vec::new();
    for (egress, bytes) in records {
        let n = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
        out.push(u8::from(egress));
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(&u32::from(n).to_le_bytes());
        out.extend_from_slice(&bytes[..usize::from(n)]);
    }
    out
}

/// The ring_records target's framing: `size: u16`, then a raw `struct ss_event` (events.h: 48-byte
/// header, then the copied head). Open, data and close records of one connection.
fn ring_records(syscalls: &[Syscall]) -> Vec<u8> {
    const HEAD_MAX: usize = 512;
    let record = |ts: u64, kind: u8, egress: bool, unix: bool, bytes: &[u8]| {
        let head = &bytes[..bytes.len().min(HEAD_MAX)];
        let mut r = Vec::with_capacity(48 + head.len());
        r.extend_from_slice(&ts.to_le_bytes()); // ts_ns
        r.extend_from_slice(&u64::from(!unix).to_le_bytes()); // conn_id: 1 TCP, 0 the worker socket
        r.extend_from_slice(&(bytes.len() as u64).to_le_bytes()); // len
        r.extend_from_slice(&100u32.to_le_bytes()); // tgid
        r.extend_from_slice(&101u32.to_le_bytes()); // tid
        r.extend_from_slice(&72i32.to_le_bytes()); // fd
        r.extend_from_slice(&u16::try_from(head.len()).unwrap_or(0).to_le_bytes()); // head_len
        r.push(kind);
        r.push(u8::from(egress));
        r.push(0); // syscall
        r.push(if unix { 1 } else { 10 }); // family
        r.push(1); // accepted
        r.extend_from_slice(&[0; 5]);
        r.extend_from_slice(head);
        r
    };
    let mut records = vec![record(1, 2, false, false, &[])];
    for (i, s) in syscalls.iter().enumerate() {
        records.push(record(10 + i as u64, 1, s.egress, s.unix, &s.bytes));
    }
    records.push(record(1_000, 3, false, false, &[]));
    let mut out = Vec::new();
    for r in records {
        out.extend_from_slice(&u16::try_from(r.len()).unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&r);
    }
    out
}

/// A data syscall of the capture: `read(72<TCPv6:…>, "…", 4096) = 128`; writev's iovecs concatenated.
fn parse_strace_line(line: &str) -> Option<Syscall> {
    let line = line.strip_prefix('+')?;
    let call = line
        .split_whitespace()
        .find(|w| w.contains('('))?
        .split('(')
        .next()?;
    let egress = match call {
        "read" | "recvfrom" => false,
        "write" | "writev" | "sendto" => true,
        _ => return None,
    };
    let unix = line.contains("<UNIX-STREAM:");
    let mut bytes = Vec::new();
    let mut rest = line.split_once('(')?.1;
    while let Some((_, after)) = rest.split_once('"') {
        let (s, after) = unescape(after)?;
        bytes.extend(s);
        rest = after;
    }
    (!bytes.is_empty()).then_some(Syscall {
        egress,
        unix,
        bytes,
    })
}

/// strace's `-x` string body up to its closing quote; the rest of the line after it.
fn unescape(s: &str) -> Option<(Vec<u8>, &str)> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => return Some((out, &s[i + 1..])),
            b'\\' => {
                let c = *b.get(i + 1)?;
                i += 2;
                out.push(match c {
                    b'n' => b'\n',
                    b'r' => b'\r',
                    b't' => b'\t',
                    b'x' => {
                        let hex = s.get(i..i + 2)?;
                        i += 2;
                        u8::from_str_radix(hex, 16).ok()?
                    }
                    other => other,
                });
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_capture_yields_the_exchanges() -> Result<()> {
        let c = Captures::read(&workspace_root().join("tests/golden/torchserve-0.12"))?;
        let first = c.syscalls.first().context("no syscalls parsed")?;
        assert!(!first.egress && !first.unix);
        assert!(
            first
                .bytes
                .starts_with(b"POST /predictions/echo HTTP/1.1\r\nHost: ")
        );
        assert!(first.bytes.ends_with(b"\r\n\r\nhello world"));
        let frame = c
            .syscalls
            .iter()
            .find(|s| s.unix && s.egress)
            .context("no worker frame")?;
        assert_eq!(
            frame.bytes.len(),
            234,
            "the frame's length as strace reported it"
        );
        assert_eq!(frame.bytes[0], b'I');
        for t in TARGETS {
            assert!(!c.seeds(t).is_empty(), "{t} has no seeds");
        }
        Ok(())
    }
}
