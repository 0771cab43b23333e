//! The pieces the traffic-shape tests (and the benchmarks) share: `h1server` (tests/src/bin/h1server.rs)
//! as a guarded process, a raw keep-alive HTTP/1.1 client that sends bytes exactly as told (split,
//! pipelined, reset, half-closed), and [`Expected`], the exact counts a test asserts against the agent.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream},
    os::fd::AsRawFd,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, PoisonError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use crate::{
    Agent, Metrics,
    cleanup::{self, Registration},
    process, tail,
};

/// Which address h1server listens on (its `--family`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// 127.0.0.1 on an AF_INET socket.
    V4,
    /// [::1] on an AF_INET6 socket.
    V6,
    /// [::ffff:127.0.0.1] on an AF_INET6 socket: IPv4 clients, IPv6 socket (what TorchServe binds).
    Mapped,
    /// [::] dual-stack; only inside a network namespace of the test's own.
    Dual,
}

impl Family {
    fn arg(self) -> &'static str {
        match self {
            Family::V4 => "v4",
            Family::V6 => "v6",
            Family::Mapped => "mapped",
            Family::Dual => "dual",
        }
    }

    /// The address a client connects to.
    fn client_ip(self) -> IpAddr {
        match self {
            Family::V6 => Ipv6Addr::LOCALHOST.into(),
            _ => Ipv4Addr::LOCALHOST.into(),
        }
    }
}

/// A running h1server; killed when dropped.
pub struct H1Server {
    child: Arc<Mutex<Child>>,
    ip: IpAddr,
    ports: Vec<u16>,
    stop: Option<Registration>,
}

impl H1Server {
    /// Runs `bin` (integration tests pass `env!("CARGO_BIN_EXE_h1server")`) listening on `ports` (0 =
    /// any free port) of `family`'s address; waits for its `ready` line.
    pub fn start(bin: &Path, log_dir: &Path, family: Family, ports: &[u16]) -> Result<H1Server> {
        let mut cmd = Command::new(bin);
        cmd.arg("--family").arg(family.arg());
        for p in ports {
            cmd.arg("--port").arg(p.to_string());
        }
        Self::start_command(log_dir, "h1server", cmd, family.client_ip())
    }

    /// Runs `bin` as the only process of a simulated pod: its own network namespace (only `lo`, up)
    /// and UTS namespace (hostname `hostname`), listening on `port` of the pod's 127.0.0.1. Clients
    /// reach it from a thread inside that namespace ([`crate::netns::run_in`] with [`H1Server::pid`]).
    pub fn start_in_pod(bin: &Path, log_dir: &Path, hostname: &str, port: u16) -> Result<H1Server> {
        let mut cmd = Command::new("unshare");
        cmd.args(["--uts", "--net", "sh", "-c"]).arg(format!(
            "ip link set lo up && hostname {hostname} && exec {} --port {port}",
            bin.display()
        ));
        Self::start_command(log_dir, hostname, cmd, Ipv4Addr::LOCALHOST.into())
    }

    /// Runs `cmd`, which must end up exec'ing h1server (e.g. through `unshare`), and waits (10 s at most)
    /// for the `ready PORT...` line on its stdout. `client_ip` is where clients reach it.
    pub fn start_command(
        log_dir: &Path,
        name: &str,
        mut cmd: Command,
        client_ip: IpAddr,
    ) -> Result<H1Server> {
        let log = log_dir.join(format!("{name}.log"));
        let err = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        let stdout = child.stdout.take().context("h1server stdout")?;
        let child = Arc::new(Mutex::new(child));
        let to_stop = Arc::clone(&child);
        let stop = cleanup::register(move || {
            let mut child = to_stop.lock().unwrap_or_else(PoisonError::into_inner);
            process::terminate(&mut child, Duration::from_secs(3));
        });
        let mut server = H1Server {
            child,
            ip: client_ip,
            ports: Vec::new(),
            stop: Some(stop),
        };
        // The ready line is read on a helper thread so a server that never prints it cannot hang the test.
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
        let Some(ports) = line.strip_prefix("ready ") else {
            bail!(
                "{name} did not print its ready line (got {line:?}); its log:\n{}",
                tail(&log, 20)
            );
        };
        server.ports = ports
            .split_whitespace()
            .map(|p| p.parse().with_context(|| format!("bad port in {line:?}")))
            .collect::<Result<_>>()?;
        Ok(server)
    }

    pub fn pid(&self) -> u32 {
        self.child
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .id()
    }

    /// The bound ports, in `--port` order.
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// The first listener's port.
    pub fn port(&self) -> u16 {
        self.ports[0]
    }

    /// Where a client reaches listener `i`.
    pub fn addr_of(&self, i: usize) -> SocketAddr {
        SocketAddr::new(self.ip, self.ports[i])
    }

    /// Where a client reaches the first listener.
    pub fn addr(&self) -> SocketAddr {
        self.addr_of(0)
    }

    /// The fd number the server uses for the connection whose client side is `client` (from
    /// /proc/net/tcp{,6} and /proc/PID/fd), to prove fd reuse. `None` if not found (yet).
    pub fn server_fd_of(&self, client: &TcpStream) -> Option<i32> {
        let local = client.local_addr().ok()?;
        let server_port = client.peer_addr().ok()?.port();
        let pid = self.pid();
        // The server's side of the connection has the client's address as its remote end.
        let inode = ["tcp", "tcp6"].iter().find_map(|t| {
            let text = std::fs::read_to_string(format!("/proc/{pid}/net/{t}")).ok()?;
            text.lines().skip(1).find_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                let port =
                    |field: usize| u16::from_str_radix(f.get(field)?.rsplit(':').next()?, 16).ok();
                let inode: u64 = f.get(9)?.parse().ok()?;
                // Closed and TIME_WAIT sockets of earlier connections have inode 0.
                (port(1)? == server_port && port(2)? == local.port() && inode != 0).then_some(inode)
            })
        })?;
        let want = format!("socket:[{inode}]");
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .ok()?
            .filter_map(Result::ok)
            .find(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_str() == Some(&want)))
            .and_then(|e| e.file_name().to_str()?.parse().ok())
    }
}

impl Drop for H1Server {
    fn drop(&mut self) {
        if let Some(reg) = self.stop.take() {
            reg.run();
        }
    }
}

/// `method target` with a `Content-Length` body.
pub fn request_bytes(method: &str, target: &str, body: &[u8]) -> Vec<u8> {
    let mut v = format!(
        "{method} {target} HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    v.extend_from_slice(body);
    v
}

/// `GET target` without a body.
pub fn get_bytes(target: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: test\r\n\r\n").into_bytes()
}

/// `POST target` with a chunked body cut into `chunk`-byte chunks.
pub fn chunked_bytes(target: &str, body: &[u8], chunk: usize) -> Vec<u8> {
    let mut v =
        format!("POST {target} HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n")
            .into_bytes();
    for c in body.chunks(chunk.max(1)) {
        v.extend(format!("{:x}\r\n", c.len()).as_bytes());
        v.extend_from_slice(c);
        v.extend_from_slice(b"\r\n");
    }
    v.extend_from_slice(b"0\r\n\r\n");
    v
}

/// What the client read of one response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub body_len: usize,
}

/// One client connection that writes bytes exactly as told and reads responses one at a time.
pub struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// How long one client read or write may block before the test fails.
const IO_TIMEOUT: Duration = Duration::from_secs(20);

impl Client {
    pub fn connect(addr: SocketAddr) -> Result<Client> {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .with_context(|| format!("connecting to {addr}"))?;
        // Every write leaves at once: split requests really arrive split.
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(Client {
            stream,
            buf: Vec::new(),
        })
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    pub fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).context("sending")
    }

    /// Sends `bytes` in pieces whose sizes cycle through `sizes`, pausing `pause` after each so that the
    /// server reads them one by one.
    pub fn send_in_pieces(&mut self, bytes: &[u8], sizes: &[usize], pause: Duration) -> Result<()> {
        let mut off = 0;
        for size in sizes.iter().cycle() {
            if off >= bytes.len() {
                break;
            }
            let end = (off + (*size).max(1)).min(bytes.len());
            self.send(&bytes[off..end])?;
            off = end;
            if !pause.is_zero() {
                thread::sleep(pause);
            }
        }
        Ok(())
    }

    /// Sends one request and reads its response.
    pub fn exchange(&mut self, request: &[u8]) -> Result<Reply> {
        self.send(request)?;
        self.read_reply()
    }

    /// `method target` with `body`; returns the status.
    pub fn call(&mut self, method: &str, target: &str, body: &[u8]) -> Result<u16> {
        Ok(self.exchange(&request_bytes(method, target, body))?.status)
    }

    /// Reads more bytes; `Ok(false)` at EOF (or a reset after a complete response).
    fn fill(&mut self) -> Result<bool> {
        let mut chunk = vec![0u8; 256 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => Ok(false),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(false),
            Err(e) => Err(e).context("reading the response"),
        }
    }

    /// Reads one final response (skipping `100 Continue`), framed by Content-Length or chunked encoding.
    pub fn read_reply(&mut self) -> Result<Reply> {
        loop {
            let head_end = loop {
                if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                    break i + 4;
                }
                if !self.fill()? {
                    bail!("connection closed before a complete response head");
                }
            };
            let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
            self.buf.drain(..head_end);
            let status: u16 = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .with_context(|| format!("bad response head {head:?}"))?;
            if (100..200).contains(&status) {
                continue;
            }
            let header = |name: &str| {
                head.split("\r\n")
                    .filter_map(|l| l.split_once(':'))
                    .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.trim().to_ascii_lowercase())
            };
            let body_len = if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
                self.chunked_body()?
            } else {
                let len: usize = header("content-length")
                    .context("response without content-length")?
                    .parse()?;
                let mut left = len;
                loop {
                    let take = left.min(self.buf.len());
                    self.buf.drain(..take);
                    left -= take;
                    if left == 0 {
                        break;
                    }
                    if !self.fill()? {
                        bail!("connection closed {left} bytes before the end of a body");
                    }
                }
                len
            };
            return Ok(Reply { status, body_len });
        }
    }

    fn chunked_body(&mut self) -> Result<usize> {
        let mut total = 0;
        loop {
            let line_end = loop {
                if let Some(i) = find(&self.buf, b"\r\n") {
                    break i;
                }
                if !self.fill()? {
                    bail!("connection closed inside a chunked body");
                }
            };
            let size = usize::from_str_radix(
                String::from_utf8_lossy(&self.buf[..line_end])
                    .split(';')
                    .next()
                    .unwrap_or_default()
                    .trim(),
                16,
            )
            .context("bad chunk size")?;
            self.buf.drain(..line_end + 2);
            while self.buf.len() < size + 2 {
                if !self.fill()? {
                    bail!("connection closed inside a chunk");
                }
            }
            self.buf.drain(..size + 2);
            total += size;
            if size == 0 {
                return Ok(total);
            }
        }
    }

    /// Reads `n` raw bytes (e.g. the start of a large response), without parsing.
    pub fn read_some(&mut self, n: usize) -> Result<()> {
        while self.buf.len() < n {
            if !self.fill()? {
                bail!("connection closed after {} of {n} bytes", self.buf.len());
            }
        }
        self.buf.drain(..n);
        Ok(())
    }

    /// Waits until the server closes the connection (EOF or RST).
    pub fn wait_closed(&mut self) -> Result<()> {
        while self.fill()? {}
        Ok(())
    }

    /// shutdown(SHUT_WR): the server reads EOF after what was sent; responses can still be read.
    pub fn half_close(&self) -> Result<()> {
        self.stream
            .shutdown(Shutdown::Write)
            .context("shutdown(SHUT_WR)")
    }

    /// Closes with RST (SO_LINGER {on, 0}), as a client that gives up does.
    pub fn reset(self) {
        set_linger_zero(&self.stream);
        drop(self.stream);
    }
}

fn set_linger_zero(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on an open socket with a pointer to a live struct of the stated size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The agent's status class label for `status` (servescope_request_duration_seconds).
fn class_label(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// TorchServe's host counter for `status`: 2xx, 4xx, everything else in 5XX.
fn requests_family(status: u16) -> &'static str {
    match status {
        200..=299 => "Requests2XX",
        400..=499 => "Requests4XX",
        _ => "Requests5XX",
    }
}

/// The exact counts one hostname's traffic must produce: TorchServe's Requests2XX/4XX/5XX and
/// ts_inference_requests_total per model and version, and the agent's request histogram count per
/// model, version and status class. Nothing else may appear for that hostname.
#[derive(Clone, Debug)]
pub struct Expected {
    hostname: String,
    requests: BTreeMap<&'static str, f64>,
    inference: BTreeMap<(String, String), f64>,
    by_class: BTreeMap<(String, String, &'static str), f64>,
}

impl Expected {
    pub fn new(hostname: &str) -> Expected {
        Expected {
            hostname: hostname.to_owned(),
            requests: ["Requests2XX", "Requests4XX", "Requests5XX"]
                .into_iter()
                .map(|f| (f, 0.0))
                .collect(),
            inference: BTreeMap::new(),
            by_class: BTreeMap::new(),
        }
    }

    /// `n` inference responses with `status` for `model`/`version` (`default` when the URL has none).
    pub fn inference(&mut self, model: &str, version: &str, status: u16, n: u32) -> &mut Self {
        if n == 0 {
            return self;
        }
        *self.requests.entry(requests_family(status)).or_default() += f64::from(n);
        let key = (model.to_owned(), version.to_owned());
        *self.inference.entry(key).or_default() += f64::from(n);
        let key = (model.to_owned(), version.to_owned(), class_label(status));
        *self.by_class.entry(key).or_default() += f64::from(n);
        self
    }

    /// `n` responses with `status` to requests that are not inference (e.g. `/ping`).
    pub fn other(&mut self, status: u16, n: u32) -> &mut Self {
        *self.requests.entry(requests_family(status)).or_default() += f64::from(n);
        self
    }

    /// Responses in all.
    pub fn total(&self) -> f64 {
        self.requests.values().sum()
    }

    /// Every difference between these counts and a scrape (empty when they agree), including records
    /// the agent lost or bytes it could not parse.
    pub fn differences(&self, m: &Metrics) -> Vec<String> {
        let host = self.hostname.as_str();
        let mut out = Vec::new();
        for (family, want) in &self.requests {
            let got = m
                .get(family, &[("Level", "Host"), ("Hostname", host)])
                .unwrap_or(0.0);
            if got != *want {
                out.push(format!(
                    "{family}{{Hostname={host}}}: got {got}, want {want}"
                ));
            }
        }
        let got: BTreeMap<(String, String), f64> = m
            .series("ts_inference_requests_total")
            .filter(|(s, _)| s.label("hostname") == Some(host))
            .map(|(s, v)| {
                let l = |k| s.label(k).unwrap_or_default().to_owned();
                ((l("model_name"), l("model_version")), v)
            })
            .collect();
        compare(
            &mut out,
            "ts_inference_requests_total",
            &self.inference,
            &got,
        );
        let got: BTreeMap<(String, String, &'static str), f64> = m
            .series("servescope_request_duration_seconds_count")
            .filter(|(s, _)| s.label("hostname") == Some(host))
            .map(|(s, v)| {
                let l = |k| s.label(k).unwrap_or_default().to_owned();
                let class = ["1xx", "2xx", "3xx", "4xx", "5xx"]
                    .into_iter()
                    .find(|c| Some(*c) == s.label("status_class"))
                    .unwrap_or("?");
                ((l("model_name"), l("model_version"), class), v)
            })
            .collect();
        compare(
            &mut out,
            "servescope_request_duration_seconds_count",
            &self.by_class,
            &got,
        );
        for family in [
            "servescope_http_parse_errors_total",
            "servescope_unmatched_responses_total",
            "servescope_kernel_lost_events_total",
            "servescope_decode_errors_total",
            "servescope_kernel_framing_mismatches_total",
        ] {
            let got = m.sum(family);
            if got != 0.0 {
                out.push(format!("{family}: got {got}, want 0"));
            }
        }
        out
    }

    /// Waits (at most `timeout`) until the agent counted as many responses for this hostname as
    /// expected, waits a little more so that a double count would show, and fails with every difference.
    pub fn assert_agent(&self, agent: &Agent, timeout: Duration) -> Result<Metrics> {
        let host = self.hostname.clone();
        let total = self.total();
        let reached = agent.wait_until(timeout, &format!("{total} responses counted"), |m| {
            ["Requests2XX", "Requests4XX", "Requests5XX"]
                .iter()
                .filter_map(|f| m.get(f, &[("Level", "Host"), ("Hostname", &host)]))
                .sum::<f64>()
                >= total
        });
        if let Err(e) = &reached {
            eprintln!("{e:#}");
        }
        thread::sleep(Duration::from_millis(300));
        let m = agent.scrape()?;
        let diff = self.differences(&m);
        ensure!(
            diff.is_empty(),
            "servescope's counts differ from the traffic sent:\n  {}\nend of the agent's log:\n{}",
            diff.join("\n  "),
            agent.log_tail()
        );
        Ok(m)
    }
}

fn compare<K: Ord + std::fmt::Debug>(
    out: &mut Vec<String>,
    family: &str,
    want: &BTreeMap<K, f64>,
    got: &BTreeMap<K, f64>,
) {
    for key in want
        .keys()
        .chain(got.keys().filter(|k| !want.contains_key(k)))
    {
        let (w, g) = (
            want.get(key).copied().unwrap_or(0.0),
            got.get(key).copied().unwrap_or(0.0),
        );
        if w != g {
            out.push(format!("{family}{key:?}: got {g}, want {w}"));
        }
    }
}

/// `ts_inference_latency_microseconds` of one model and version, 0 if absent.
pub fn latency_sum_us(m: &Metrics, hostname: &str, model: &str, version: &str) -> f64 {
    m.get(
        "ts_inference_latency_microseconds",
        &[
            ("model_name", model),
            ("model_version", version),
            ("hostname", hostname),
        ],
    )
    .unwrap_or(0.0)
}

/// Polls `cond` every 20 ms for at most `timeout`; whether it became true.
pub fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}
