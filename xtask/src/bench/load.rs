//! Load generators: `wrk` for closed-loop maximum throughput, and a paced (open-loop) client written here
//! for fixed rates, exact request counts and connection churn.
//!
//! wrk is the reference tool for "as fast as the server goes" and what readers know, so the throughput
//! ratios use it. It cannot hold a constant rate (wrk2 is not in Debian), and it counts only completed
//! requests, so for latency at a fixed rate, for loss accounting (requests sent vs counted by the agent)
//! and for one-connection-per-request churn the bench uses [`Paced`]: one thread per connection, each
//! sending on a fixed schedule (wrk2-style), latencies recorded per request.

use std::{
    fs,
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::Value;

/// The request body every generator sends. Short, like a small inference input; its size is irrelevant
/// to the agent, which copies at most a bounded head of each syscall.
pub const BODY: &str = "hello";

/// One closed-loop wrk run.
pub struct Wrk<'a> {
    pub addr: SocketAddr,
    pub path: &'a str,
    pub connections: u32,
    pub duration: Duration,
    /// CPUs to pin wrk to (taskset), if any.
    pub cpus: Option<&'a str>,
}

/// What wrk reported, from the JSON line our Lua `done()` hook prints.
#[derive(Clone, Debug, Serialize)]
pub struct WrkResult {
    /// Completed requests (wrk does not count requests still in flight when it stops).
    pub requests: u64,
    pub duration_s: f64,
    pub rps: f64,
    /// Socket errors plus non-2xx/3xx responses.
    pub errors: u64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// The Lua script wrk runs: a POST with a small body, and a `done()` that prints the summary as one JSON
/// line, so nothing depends on wrk's human-readable output.
const WRK_SCRIPT: &str = r#"-- Written by `cargo xtask bench` (xtask/src/bench/load.rs).
wrk.method = "POST"
wrk.body = "hello"
wrk.headers["Content-Type"] = "application/octet-stream"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"errors":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"#;

impl Wrk<'_> {
    /// Runs wrk (one thread: it is pinned to one CPU anyway) and parses its summary. `scratch` is where
    /// the Lua script is written.
    pub fn run(&self, scratch: &Path) -> Result<WrkResult> {
        let script = scratch.join("bench.lua");
        if !script.exists() {
            fs::write(&script, WRK_SCRIPT)
                .with_context(|| format!("writing {}", script.display()))?;
        }
        let url = format!("http://{}{}", self.addr, self.path);
        let mut cmd = match self.cpus {
            Some(cpus) => {
                let mut c = Command::new("taskset");
                c.args(["-c", cpus, "wrk"]);
                c
            }
            None => Command::new("wrk"),
        };
        cmd.args([
            "-t1",
            &format!("-c{}", self.connections),
            &format!("-d{}s", self.duration.as_secs().max(1)),
            "--timeout",
            "5s",
            "-s",
        ])
        .arg(&script)
        .arg(&url);
        let output = cmd
            .output()
            .context("running wrk (Debian: `apt-get install wrk`)")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!(
                "wrk failed ({}): {}{}",
                output.status,
                stdout,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let json = stdout
            .lines()
            .find_map(|l| l.strip_prefix("BENCH_JSON "))
            .with_context(|| format!("wrk printed no summary line:\n{stdout}"))?;
        let v: Value = serde_json::from_str(json).with_context(|| format!("parsing {json}"))?;
        let num = |k: &str| {
            v[k].as_f64()
                .with_context(|| format!("wrk summary has no {k}: {json}"))
        };
        let requests = num("requests")?;
        let duration_s = num("duration_us")? / 1e6;
        Ok(WrkResult {
            requests: requests as u64,
            duration_s,
            rps: requests / duration_s.max(1e-9),
            errors: num("errors")? as u64,
            p50_us: num("p50_us")?,
            p99_us: num("p99_us")?,
        })
    }
}

/// An open-loop (paced) or closed-loop client with one thread per connection.
#[derive(Clone)]
pub struct Paced {
    pub addr: SocketAddr,
    /// Request targets, used in turn (request `i` goes to `paths[i % len]`): many model names for the
    /// RSS phase, one otherwise.
    pub paths: Arc<Vec<String>>,
    /// Requests per second over all connections; `None` sends as fast as responses come back.
    pub rate: Option<f64>,
    /// Stop sending after this long.
    pub duration: Duration,
    /// Stop after this many requests (over all connections), if set.
    pub max_requests: Option<u64>,
    /// Concurrent connections (= threads).
    pub connections: usize,
    /// One connection per request, with `Connection: close` (the server closes first, as servers do).
    pub churn: bool,
    /// CPUs the client threads are pinned to, if any.
    pub cpus: Option<Vec<usize>>,
}

/// Result of a [`Paced`] run. Latencies are in microseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PacedResult {
    /// Requests written.
    pub sent: u64,
    /// Responses with a 2xx status.
    pub ok: u64,
    /// Requests without a 2xx response (connection errors, timeouts, other statuses).
    pub failed: u64,
    pub elapsed_s: f64,
    /// `ok / elapsed_s`.
    pub achieved_rps: f64,
    /// From writing the request to reading the whole response.
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// From the time the schedule said to send (wrk2's "corrected" latency: includes any time the client
    /// fell behind, so a stalled server cannot hide behind coordinated omission).
    pub p50_from_schedule_us: f64,
    pub p99_from_schedule_us: f64,
    /// Requests sent more than 1 ms after their scheduled time (the client or the machine fell behind).
    pub late: u64,
}

/// What one client thread measured.
#[derive(Default)]
struct ThreadResult {
    sent: u64,
    ok: u64,
    failed: u64,
    late: u64,
    service_us: Vec<u32>,
    scheduled_us: Vec<u32>,
}

impl Paced {
    pub fn run(&self) -> Result<PacedResult> {
        let start = Instant::now() + Duration::from_millis(20); // all threads begin on the same tick
        let issued = Arc::new(AtomicU64::new(0));
        let mut handles = Vec::with_capacity(self.connections);
        for k in 0..self.connections {
            let me = self.clone();
            let issued = Arc::clone(&issued);
            handles.push(
                thread::Builder::new()
                    .name(format!("load-{k}"))
                    .spawn(move || me.thread(k, start, &issued))
                    .context("starting a load thread")?,
            );
        }
        let mut all = ThreadResult::default();
        for h in handles {
            let r = h
                .join()
                .map_err(|_| anyhow::anyhow!("a load thread panicked"))??;
            all.sent += r.sent;
            all.ok += r.ok;
            all.failed += r.failed;
            all.late += r.late;
            all.service_us.extend(r.service_us);
            all.scheduled_us.extend(r.scheduled_us);
        }
        let elapsed = start.elapsed().as_secs_f64();
        all.service_us.sort_unstable();
        all.scheduled_us.sort_unstable();
        let pct = |v: &[u32], p: f64| percentile(v, p);
        Ok(PacedResult {
            sent: all.sent,
            ok: all.ok,
            failed: all.failed,
            elapsed_s: elapsed,
            achieved_rps: all.ok as f64 / elapsed.max(1e-9),
            p50_us: pct(&all.service_us, 50.0),
            p90_us: pct(&all.service_us, 90.0),
            p99_us: pct(&all.service_us, 99.0),
            p999_us: pct(&all.service_us, 99.9),
            max_us: all.service_us.last().copied().map_or(0.0, f64::from),
            p50_from_schedule_us: pct(&all.scheduled_us, 50.0),
            p99_from_schedule_us: pct(&all.scheduled_us, 99.0),
            late: all.late,
        })
    }

    fn thread(&self, k: usize, start: Instant, issued: &AtomicU64) -> Result<ThreadResult> {
        if let Some(cpus) = &self.cpus {
            pin_current_thread(cpus)?;
        }
        // The default 50 µs timer slack would blur a schedule with 100–500 µs between requests.
        // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer slack.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
        let end = start + self.duration;
        let mut r = ThreadResult::default();
        if let Some(rate) = self.rate {
            let expect = (rate * self.duration.as_secs_f64() / self.connections as f64) as usize;
            r.service_us.reserve(expect + 16);
            r.scheduled_us.reserve(expect + 16);
        }
        let mut conn: Option<Conn> = None;
        let close_header = if self.churn {
            "Connection: close\r\n"
        } else {
            ""
        };
        for i in 0u64.. {
            // Request `g` of the whole run is this thread's `i`-th: connections interleave evenly.
            let g = k as u64 + i * self.connections as u64;
            let scheduled = match self.rate {
                Some(rate) => start + Duration::from_secs_f64(g as f64 / rate),
                None => Instant::now(),
            };
            if scheduled >= end {
                break;
            }
            if let Some(max) = self.max_requests
                && issued.fetch_add(1, Ordering::Relaxed) >= max
            {
                break;
            }
            let now = Instant::now();
            if scheduled > now {
                thread::sleep(scheduled - now);
            } else if now - scheduled > Duration::from_millis(1) {
                r.late += 1;
            }
            let path = &self.paths[(g % self.paths.len() as u64) as usize];
            let request = format!(
                "POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/octet-stream\r\n{close_header}Content-Length: {}\r\n\r\n{BODY}",
                BODY.len()
            );
            let sent_at = Instant::now();
            r.sent += 1;
            let outcome = (|| -> io::Result<u16> {
                if conn.is_none() {
                    conn = Some(Conn::connect(self.addr)?);
                }
                let c = conn.as_mut().ok_or(io::ErrorKind::NotConnected)?;
                c.stream.write_all(request.as_bytes())?;
                c.response()
            })();
            let done = Instant::now();
            match outcome {
                Ok(status) if (200..300).contains(&status) => {
                    r.ok += 1;
                    r.service_us.push(micros(done - sent_at));
                    r.scheduled_us.push(micros(done - scheduled.min(sent_at)));
                }
                Ok(_) => r.failed += 1,
                Err(_) => {
                    r.failed += 1;
                    conn = None; // reconnect for the next request
                }
            }
            if self.churn {
                // The server closes after answering `Connection: close`: wait for its FIN, so the
                // server side holds TIME_WAIT (as in production) and the client's ports are not used up.
                if let Some(mut c) = conn.take() {
                    c.wait_eof();
                }
            }
        }
        Ok(r)
    }
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// The `p`th percentile (nearest rank) of sorted values; 0 for none.
pub fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    f64::from(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Pins the calling thread to `cpus`.
pub fn pin_current_thread(cpus: &[usize]) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes inside it; sched_setaffinity(0, ...)
    // affects only the calling thread.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw const set)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("pinning to CPUs {cpus:?}"));
    }
    Ok(())
}

/// A client connection that reads responses framed by Content-Length.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn connect(addr: SocketAddr) -> io::Result<Conn> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    fn fill(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 4096];
        let n = self.stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// Reads one response and returns its status. Both test servers (h1server, TorchServe) frame every
    /// response with Content-Length; anything else is an error rather than a guess.
    fn response(&mut self) -> io::Result<u16> {
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            self.fill()?;
        };
        let head = std::str::from_utf8(&self.buf[..head_end]).map_err(|_| bad("non-UTF-8 head"))?;
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("bad status line"))?;
        let mut length = None;
        for line in head.split("\r\n").skip(1) {
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse::<usize>().ok();
                } else if k.eq_ignore_ascii_case("transfer-encoding") {
                    return Err(bad(
                        "chunked responses are not supported by the bench client",
                    ));
                }
            }
        }
        let length = length.ok_or_else(|| bad("response without content-length"))?;
        while self.buf.len() < head_end + length {
            self.fill()?;
        }
        self.buf.drain(..head_end + length);
        Ok(status)
    }

    fn wait_eof(&mut self) {
        let mut chunk = [0u8; 512];
        while matches!(self.stream.read(&mut chunk), Ok(n) if n > 0) {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 99.9), 100.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
        assert_eq!(percentile(&[7], 99.0), 7.0);
    }
}
