//! The syslog sink (`--syslog`): RFC 5424 (default) or RFC 3164 messages over the local socket
//! (`/dev/log`, a Unix datagram socket), UDP, or TCP with RFC 6587 octet-counted framing.
//!
//! The message text is logfmt (`method=POST path=/predictions/m status=200 model=m ...`), which
//! rsyslog, Loki and Splunk parse without configuration; 5424 structured data would need an
//! IANA enterprise number in its SD-ID, which servescope does not have.
//!
//! A syslog server that is absent, restarting or too slow never reaches the reader: the sink thread
//! retries the record it holds with exponential backoff while new records wait in its bounded
//! queue; once the queue is full the reader drops and counts them. So a short restart loses
//! nothing (UDP excepted: the first datagram into a closed port vanishes; only the next send learns
//! of the ICMP error).

use std::{
    fmt::{self, Write as _},
    io::{self, Write as _},
    net::{TcpStream, ToSocketAddrs, UdpSocket},
    os::{fd::AsRawFd as _, unix::net::UnixDatagram},
    path::PathBuf,
    str::FromStr,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use crate::sink::{Msg, Record, SinkMetrics, Tally, config::SyslogConfig, rfc3339_micros};

/// Where syslog messages go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyslogAddr {
    /// A local Unix datagram socket, such as `/dev/log`.
    Unix(PathBuf),
    /// `host:port`, resolved at every (re)connect.
    Udp(String),
    Tcp(String),
}

impl FromStr for SyslogAddr {
    type Err = String;

    /// `unix:PATH`, a path starting with `/`, `udp://host:port`, `tcp://host:port`, or `host:port`
    /// (UDP, syslog's traditional transport).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let host_port = |hp: &str, scheme: &str| -> Result<String, String> {
            match hp.rsplit_once(':') {
                Some((host, port))
                    if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) =>
                {
                    Ok(hp.to_owned())
                }
                _ => Err(format!(
                    "syslog address `{s}`: expected {scheme}host:port (e.g. {scheme}127.0.0.1:514)"
                )),
            }
        };
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!(
                    "syslog address `{s}`: unix: needs a socket path (unix:/dev/log)"
                ));
            }
            Ok(SyslogAddr::Unix(PathBuf::from(path)))
        } else if s.starts_with('/') {
            Ok(SyslogAddr::Unix(PathBuf::from(s)))
        } else if let Some(hp) = s.strip_prefix("udp://") {
            host_port(hp, "udp://").map(SyslogAddr::Udp)
        } else if let Some(hp) = s.strip_prefix("tcp://") {
            host_port(hp, "tcp://").map(SyslogAddr::Tcp)
        } else if s.contains("://") {
            Err(format!(
                "syslog address `{s}`: unknown scheme; use unix:PATH, udp://host:port or tcp://host:port"
            ))
        } else {
            host_port(s, "").map(SyslogAddr::Udp)
        }
    }
}

impl fmt::Display for SyslogAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SyslogAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            SyslogAddr::Udp(hp) => write!(f, "udp://{hp}"),
            SyslogAddr::Tcp(hp) => write!(f, "tcp://{hp}"),
        }
    }
}

/// The message format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SyslogFormat {
    /// `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - MSG`, RFC 3339 UTC µs timestamps.
    Rfc5424,
    /// BSD syslog: `<PRI>Mmm dd hh:mm:ss HOSTNAME TAG[PID]: MSG` (UTC: 3164 has no zone). On a local
    /// socket without HOSTNAME, as syslog(3) writes it.
    Rfc3164,
}

impl SyslogFormat {
    /// RFC 5424 over the network. On a local socket RFC 3164: the daemons behind `/dev/log`
    /// (rsyslog's imuxsock, journald) parse only syslog(3)'s format there and would mangle 5424.
    pub fn default_for(addr: &SyslogAddr) -> SyslogFormat {
        match addr {
            SyslogAddr::Unix(_) => SyslogFormat::Rfc3164,
            SyslogAddr::Udp(_) | SyslogAddr::Tcp(_) => SyslogFormat::Rfc5424,
        }
    }
}

/// Syslog facility (RFC 5424 §6.2.1), by name (`local0`) or number (`16`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Facility(pub u8);

const FACILITIES: [&str; 24] = [
    "kern",
    "user",
    "mail",
    "daemon",
    "auth",
    "syslog",
    "lpr",
    "news",
    "uucp",
    "cron",
    "authpriv",
    "ftp",
    "ntp",
    "security",
    "console",
    "solaris-cron",
    "local0",
    "local1",
    "local2",
    "local3",
    "local4",
    "local5",
    "local6",
    "local7",
];

impl Default for Facility {
    /// `user`: what syslog(3) uses when a program does not say.
    fn default() -> Self {
        Facility(1)
    }
}

impl FromStr for Facility {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        if let Some(i) = FACILITIES.iter().position(|f| *f == lower) {
            return Ok(Facility(u8::try_from(i).unwrap_or(1)));
        }
        match s.parse::<u8>() {
            Ok(n) if n < 24 => Ok(Facility(n)),
            _ => Err(format!(
                "unknown syslog facility `{s}`: use one of {} or 0-23",
                FACILITIES.join(", ")
            )),
        }
    }
}

impl TryFrom<String> for Facility {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl<'de> serde::Deserialize<'de> for Facility {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Syslog severity (RFC 5424 §6.2.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Emerg = 0,
    Alert = 1,
    Crit = 2,
    Err = 3,
    Warning = 4,
    Notice = 5,
    Info = 6,
    Debug = 7,
}

/// Severity by status class: `by_class[c]` for `c`xx.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Severities {
    pub by_class: [Severity; 6],
}

impl Default for Severities {
    /// 1xx–3xx info, 4xx warning, 5xx err (and err for a status outside 100–599).
    fn default() -> Self {
        use Severity::{Err, Info, Warning};
        Severities {
            by_class: [Err, Info, Info, Info, Warning, Err],
        }
    }
}

impl Severities {
    fn of(&self, r: &Record) -> Severity {
        self.by_class[usize::from(r.status_class().unwrap_or(0))]
    }
}

/// Appends the syslog message of `r` (without transport framing).
pub fn format(r: &Record, cfg: &SyslogConfig, out: &mut Vec<u8>) {
    let pri = u16::from(cfg.facility.0) * 8 + cfg.severities.of(r) as u16;
    let host = header_token(&r.hostname, 255);
    let app = header_token(&cfg.app_name, 48);
    let local = matches!(cfg.address, SyslogAddr::Unix(_));
    let mut s = String::with_capacity(320);
    match cfg.format {
        SyslogFormat::Rfc5424 => {
            let msgid = r.api.as_str();
            let _ = write!(
                s,
                "<{pri}>1 {} {host} {app} {} {msgid} - ",
                rfc3339_micros(r.unix_ns),
                r.pid
            );
        }
        SyslogFormat::Rfc3164 => {
            const STAMP: &[time::format_description::BorrowedFormatItem<'_>] = time::macros::format_description!(
                "[month repr:short] [day padding:space] [hour]:[minute]:[second]"
            );
            let stamp = time::OffsetDateTime::from_unix_timestamp_nanos(r.unix_ns)
                .ok()
                .and_then(|t| t.format(STAMP).ok())
                .unwrap_or_else(|| "Jan  1 00:00:00".to_owned());
            // The TAG is at most 32 alphanumeric characters.
            let tag: String = app
                .chars()
                .filter(char::is_ascii_alphanumeric)
                .take(32)
                .collect();
            if local {
                // The local-socket convention (syslog(3)): no HOSTNAME; the daemon adds its own. The
                // traced namespace's hostname (the pod) then travels in the message.
                let _ = write!(s, "<{pri}>{stamp} {tag}[{}]: hostname=", r.pid);
                logfmt_value(&mut s, &r.hostname);
                s.push(' ');
            } else {
                let _ = write!(s, "<{pri}>{stamp} {host} {tag}[{}]: ", r.pid);
            }
        }
    }
    logfmt(r, &mut s);
    out.extend_from_slice(s.as_bytes());
}

/// A 5424 header field: printable ASCII without spaces, at most `max` characters, `-` when empty.
fn header_token(s: &str, max: usize) -> String {
    let t: String = s
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .take(max)
        .collect();
    if t.is_empty() { "-".to_owned() } else { t }
}

/// The message text: `key=value` pairs; absent values are left out.
fn logfmt(r: &Record, s: &mut String) {
    let mut first = true;
    let mut kv = |k: &str, v: &dyn fmt::Display| {
        if !first {
            s.push(' ');
        }
        first = false;
        s.push_str(k);
        s.push('=');
        logfmt_value(s, &v.to_string());
    };
    if let Some(m) = &r.method {
        kv("method", m);
    }
    if let Some(p) = &r.path {
        kv("path", p);
    }
    kv("status", &r.status);
    kv("api", &r.api.as_str());
    if let Some(m) = &r.model {
        kv("model", m);
    }
    if let Some(v) = &r.version {
        kv("version", v);
    }
    if let Some(l) = r.latency_us {
        kv("latency_us", &l);
    }
    if let Some(t) = r.total_us {
        kv("total_us", &t);
    }
    if let Some(b) = r.request_bytes {
        kv("request_bytes", &b);
    }
    kv("response_bytes", &r.response_bytes);
    if let Some(c) = &r.client {
        kv("client", c);
    }
    if let Some(id) = &r.request_id {
        kv("request_id", id);
    }
}

/// A logfmt value, quoted when it has spaces, quotes, `=` or control characters (escaped, so a
/// message is always one line).
fn logfmt_value(s: &mut String, v: &str) {
    if !v.is_empty()
        && !v
            .chars()
            .any(|c| c == ' ' || c == '"' || c == '=' || c.is_control())
    {
        s.push_str(v);
        return;
    }
    s.push('"');
    for c in v.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(s, "\\u{:04x}", u32::from(c));
            }
            c => s.push(c),
        }
    }
    s.push('"');
}

/// How long one connect or send may take before the server counts as unreachable.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// An open connection to the syslog server.
enum Conn {
    Unix(UnixDatagram),
    Udp(UdpSocket),
    /// TCP with the bytes of the frame being built.
    Tcp(TcpStream, Vec<u8>),
}

impl Conn {
    fn open(addr: &SyslogAddr) -> io::Result<Conn> {
        match addr {
            SyslogAddr::Unix(path) => {
                let s = UnixDatagram::unbound()?;
                s.connect(path)?;
                s.set_write_timeout(Some(IO_TIMEOUT))?;
                Ok(Conn::Unix(s))
            }
            SyslogAddr::Udp(hp) => {
                let mut last =
                    io::Error::new(io::ErrorKind::NotFound, format!("{hp} did not resolve"));
                for a in hp.to_socket_addrs()? {
                    let local: std::net::SocketAddr = if a.is_ipv4() {
                        ([0, 0, 0, 0], 0).into()
                    } else {
                        ([0u16; 8], 0).into()
                    };
                    // Connected, so that the kernel reports ICMP port-unreachable on the next send.
                    match UdpSocket::bind(local).and_then(|s| s.connect(a).map(|()| s)) {
                        Ok(s) => return Ok(Conn::Udp(s)),
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
            SyslogAddr::Tcp(hp) => {
                let mut last =
                    io::Error::new(io::ErrorKind::NotFound, format!("{hp} did not resolve"));
                for a in hp.to_socket_addrs()? {
                    match TcpStream::connect_timeout(&a, IO_TIMEOUT) {
                        Ok(s) => {
                            s.set_write_timeout(Some(IO_TIMEOUT))?;
                            s.set_nodelay(true)?;
                            return Ok(Conn::Tcp(s, Vec::new()));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    }

    fn send(&mut self, msg: &[u8]) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.send(msg).map(drop),
            Conn::Udp(s) => s.send(msg).map(drop),
            Conn::Tcp(s, frame) => {
                // A server that restarted closed our connection; writing into it would "succeed"
                // and the message would vanish with the reset. Check first.
                if peer_closed(s)? {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "the server closed the connection",
                    ));
                }
                frame.clear();
                // RFC 6587 octet counting: "LEN SP MSG".
                frame.extend_from_slice(msg.len().to_string().as_bytes());
                frame.push(b' ');
                frame.extend_from_slice(msg);
                s.write_all(frame)
            }
        }
    }
}

/// Whether the peer of `s` has closed its side (a zero-byte peek without blocking).
fn peer_closed(s: &TcpStream) -> io::Result<bool> {
    let mut byte = 0u8;
    // SAFETY: the fd is open for the borrow of `s`; the buffer is one writable byte.
    let n = unsafe {
        libc::recv(
            s.as_raw_fd(),
            (&raw mut byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => Ok(true),
        n if n > 0 => Ok(false),
        _ => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                Ok(false)
            } else {
                Err(e)
            }
        }
    }
}

/// The syslog sink's thread: sends each record, reconnecting with backoff; runs until every sender
/// is gone and the queue is empty.
pub(crate) fn run(mut rx: mpsc::Receiver<Msg>, cfg: &SyslogConfig, metrics: &SinkMetrics) {
    let mut conn: Option<Conn> = None;
    let mut tally = Tally::default();
    let mut exported = Tally::default();
    let mut backoff = BACKOFF_MIN;
    let mut failing_since: Option<Instant> = None;
    let mut msg = Vec::with_capacity(512);
    while let Some(m) = rx.blocking_recv() {
        let Msg::Record(r) = m else {
            metrics.export(tally, &mut exported);
            continue;
        };
        msg.clear();
        format(&r, cfg, &mut msg);
        loop {
            let result = match conn.as_mut() {
                Some(c) => c.send(&msg),
                None => Conn::open(&cfg.address).and_then(|mut c| {
                    let r = c.send(&msg);
                    conn = Some(c);
                    r
                }),
            };
            match result {
                Ok(()) => {
                    tally.written += 1;
                    backoff = BACKOFF_MIN;
                    if let Some(since) = failing_since.take() {
                        tracing::info!(
                            address = %cfg.address,
                            "syslog server reachable again after {:.1?}",
                            since.elapsed()
                        );
                    }
                    break;
                }
                // Too big for a datagram: retrying cannot help. (Records are a few hundred bytes;
                // this guards the loop, it is not expected.)
                Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {
                    tally.errors += 1;
                    tally.dropped += 1;
                    tracing::warn!(
                        bytes = msg.len(),
                        "syslog message too large for the transport; dropped"
                    );
                    break;
                }
                Err(e) => {
                    conn = None;
                    tally.errors += 1;
                    if failing_since.is_none() {
                        failing_since = Some(Instant::now());
                        tracing::warn!(
                            address = %cfg.address,
                            error = %e,
                            "cannot send to the syslog server; retrying with backoff (records \
                             wait in the queue, then are dropped and counted in \
                             servescope_log_dropped_total{{sink=\"syslog\"}})"
                        );
                    }
                    metrics.export(tally, &mut exported);
                    // At shutdown there is no one left to wait for: give up on what is queued.
                    if !sleep_unless_closed(&rx, backoff) {
                        tally.dropped += 1;
                        while rx.try_recv().is_ok() {
                            tally.dropped += 1;
                        }
                        break;
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
        metrics.export(tally, &mut exported);
    }
    metrics.export(tally, &mut exported);
}

/// Sleeps `d` in short steps; `false` as soon as every sender is gone (the agent is stopping).
fn sleep_unless_closed(rx: &mpsc::Receiver<Msg>, d: Duration) -> bool {
    let end = Instant::now() + d;
    loop {
        if rx.is_closed() {
            return false;
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead as _, BufReader, Read as _},
        net::TcpListener,
        sync::Arc,
    };

    use super::*;
    use crate::{
        registry::Registry,
        sink::{SinkName, clock::WallClock, filter::Filter, tests::exchange},
    };

    fn cfg(format: SyslogFormat, address: SyslogAddr) -> SyslogConfig {
        SyslogConfig {
            address,
            format,
            facility: "local3".parse().unwrap_or_default(),
            app_name: "servescope".into(),
            severities: Severities::default(),
            filter: Filter::default(),
            queue: 16,
        }
    }

    fn record(target: &str, status: u16) -> Record {
        Record::from_exchange(
            &exchange(target, status),
            "vm-1",
            &mut WallClock::fixed(1_700_000_000_000_000_000),
        )
    }

    fn text(r: &Record, c: &SyslogConfig) -> String {
        let mut out = Vec::new();
        format(r, c, &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn rfc5424_message() {
        let c = cfg(SyslogFormat::Rfc5424, SyslogAddr::Udp("h:1".into()));
        // local3 (19) * 8 + info (6) = 158.
        assert_eq!(
            text(&record("/predictions/echo?x=1", 200), &c),
            "<158>1 2023-11-14T22:13:20.014000Z vm-1 servescope 4242 inference - method=POST \
             path=/predictions/echo status=200 api=inference model=echo version=default \
             latency_us=12345.5 total_us=13000 request_bytes=321 response_bytes=1234 \
             client=127.0.0.1:50000 request_id=b7c1-42"
        );
    }

    #[test]
    fn rfc3164_message() {
        let c = cfg(SyslogFormat::Rfc3164, SyslogAddr::Udp("h:1".into()));
        let mut r = record("/ping", 404);
        r.unix_ns = 1_700_000_000_000_000_000 - 13 * 86_400 * 1_000_000_000;
        // local3 * 8 + warning (4) = 156; single-digit days are space-padded.
        assert_eq!(
            text(&r, &c),
            "<156>Nov  1 22:13:20 vm-1 servescope[4242]: method=POST path=/ping status=404 \
             api=other latency_us=12345.5 total_us=13000 request_bytes=321 response_bytes=1234 \
             client=127.0.0.1:50000 request_id=b7c1-42"
        );
    }

    #[test]
    fn rfc3164_on_a_local_socket_has_no_hostname_field() {
        let c = cfg(SyslogFormat::Rfc3164, SyslogAddr::Unix("/dev/log".into()));
        let t = text(&record("/predictions/m", 200), &c);
        assert!(
            t.starts_with(
                "<158>Nov 14 22:13:20 servescope[4242]: hostname=vm-1 method=POST path=/predictions/m "
            ),
            "{t}"
        );
    }

    #[test]
    fn default_format_by_transport() {
        assert_eq!(
            SyslogFormat::default_for(&SyslogAddr::Unix("/dev/log".into())),
            SyslogFormat::Rfc3164
        );
        assert_eq!(
            SyslogFormat::default_for(&SyslogAddr::Tcp("h:1".into())),
            SyslogFormat::Rfc5424
        );
    }

    #[test]
    fn severity_by_status_class() {
        let c = cfg(SyslogFormat::Rfc5424, SyslogAddr::Udp("h:1".into()));
        let pri = |status| text(&record("/x", status), &c)[..5].to_owned();
        assert_eq!(pri(302), "<158>");
        assert_eq!(pri(404), "<156>");
        assert_eq!(pri(503), "<155>");
    }

    #[test]
    fn hostile_values_stay_on_one_line() {
        let c = cfg(SyslogFormat::Rfc5424, SyslogAddr::Udp("h:1".into()));
        let mut r = record("/predictions/a%20b%0Ac%22d=", 200);
        r.hostname = "pod name\n".into();
        let t = text(&r, &c);
        assert!(!t.contains('\n'), "{t}");
        assert!(t.contains(" pod_name_ servescope "), "{t}");
        assert!(t.contains(r#"model="a b\nc\"d=""#), "{t}");
    }

    #[test]
    fn addresses() {
        let p = |s: &str| s.parse::<SyslogAddr>();
        assert_eq!(p("/dev/log"), Ok(SyslogAddr::Unix("/dev/log".into())));
        assert_eq!(
            p("unix:/run/x.sock"),
            Ok(SyslogAddr::Unix("/run/x.sock".into()))
        );
        assert_eq!(
            p("udp://127.0.0.1:514"),
            Ok(SyslogAddr::Udp("127.0.0.1:514".into()))
        );
        assert_eq!(
            p("tcp://[::1]:601"),
            Ok(SyslogAddr::Tcp("[::1]:601".into()))
        );
        assert_eq!(
            p("logs.example:514"),
            Ok(SyslogAddr::Udp("logs.example:514".into()))
        );
        for bad in [
            "tcp://host",
            "tcp://:5",
            "udp://h:0",
            "http://h:1",
            "unix:",
            "nonsense",
        ] {
            assert!(p(bad).is_err(), "{bad}");
        }
        assert_eq!(SyslogAddr::Tcp("h:1".into()).to_string(), "tcp://h:1");
    }

    #[test]
    fn facilities() {
        assert_eq!("local0".parse(), Ok(Facility(16)));
        assert_eq!("DAEMON".parse(), Ok(Facility(3)));
        assert_eq!("23".parse(), Ok(Facility(23)));
        assert!("24".parse::<Facility>().is_err());
        assert!("local8".parse::<Facility>().is_err());
    }

    fn start(c: SyslogConfig) -> (mpsc::Sender<Msg>, std::thread::JoinHandle<()>, SinkMetrics) {
        let registry = Registry::new();
        let metrics = SinkMetrics::new(&registry, SinkName::Syslog);
        let (tx, rx) = mpsc::channel(64);
        let m = metrics.clone();
        let h = std::thread::spawn(move || run(rx, &c, &m));
        (tx, h, metrics)
    }

    /// Reads one octet-counted frame.
    fn frame(r: &mut BufReader<TcpStream>) -> anyhow::Result<String> {
        let mut len = Vec::new();
        r.read_until(b' ', &mut len)?;
        let n: usize = std::str::from_utf8(&len)?.trim_end().parse()?;
        let mut buf = vec![0; n];
        r.read_exact(&mut buf)?;
        Ok(String::from_utf8(buf)?)
    }

    #[test]
    fn tcp_octet_counting_and_reconnect_after_server_restart() -> anyhow::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let (tx, h, metrics) = start(cfg(
            SyslogFormat::Rfc5424,
            SyslogAddr::Tcp(addr.to_string()),
        ));
        for status in [200, 201] {
            tx.blocking_send(Msg::Record(Arc::new(record("/predictions/m", status))))?;
        }
        let (s, _) = listener.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut r = BufReader::new(s);
        assert!(frame(&mut r)?.contains(" status=200 "));
        assert!(frame(&mut r)?.contains(" status=201 "));
        // The server goes away (closes the connection and stops listening) and comes back.
        drop(r);
        drop(listener);
        std::thread::sleep(Duration::from_millis(100));
        tx.blocking_send(Msg::Record(Arc::new(record("/predictions/m", 202))))?;
        std::thread::sleep(Duration::from_millis(300));
        let listener = TcpListener::bind(addr)?;
        tx.blocking_send(Msg::Record(Arc::new(record("/predictions/m", 203))))?;
        let (s, _) = listener.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut r = BufReader::new(s);
        // Nothing lost across the restart: the record sent while the server was away comes first.
        assert!(frame(&mut r)?.contains(" status=202 "));
        assert!(frame(&mut r)?.contains(" status=203 "));
        drop(tx);
        h.join()
            .map_err(|_| anyhow::anyhow!("sink thread panicked"))?;
        assert_eq!(metrics.written.get(), 4);
        assert!(metrics.errors.get() >= 1);
        assert_eq!(metrics.dropped.get(), 0);
        Ok(())
    }

    #[test]
    fn udp_and_unix_datagrams() -> anyhow::Result<()> {
        let udp = UdpSocket::bind("127.0.0.1:0")?;
        udp.set_read_timeout(Some(Duration::from_secs(10)))?;
        let dir = tempfile::tempdir()?;
        let sock = dir.path().join("log.sock");
        let unix = UnixDatagram::bind(&sock)?;
        unix.set_read_timeout(Some(Duration::from_secs(10)))?;
        for (c, rx) in [
            (
                cfg(
                    SyslogFormat::Rfc3164,
                    SyslogAddr::Udp(udp.local_addr()?.to_string()),
                ),
                Box::new(|b: &mut [u8]| udp.recv(b)) as Box<dyn Fn(&mut [u8]) -> io::Result<usize>>,
            ),
            (
                cfg(SyslogFormat::Rfc5424, SyslogAddr::Unix(sock.clone())),
                Box::new(|b: &mut [u8]| unix.recv(b)),
            ),
        ] {
            let want = text(&record("/predictions/m", 200), &c);
            let (tx, h, metrics) = start(c);
            tx.blocking_send(Msg::Record(Arc::new(record("/predictions/m", 200))))?;
            let mut buf = [0u8; 2048];
            let n = rx(&mut buf)?;
            // One message per datagram, no framing, no trailing newline.
            assert_eq!(String::from_utf8_lossy(&buf[..n]), want);
            drop(tx);
            h.join()
                .map_err(|_| anyhow::anyhow!("sink thread panicked"))?;
            assert_eq!(metrics.written.get(), 1);
        }
        Ok(())
    }

    #[test]
    fn absent_server_at_shutdown_drops_and_counts() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (tx, h, metrics) = start(cfg(
            SyslogFormat::Rfc5424,
            SyslogAddr::Unix(dir.path().join("nobody.sock")),
        ));
        for _ in 0..3 {
            tx.blocking_send(Msg::Record(Arc::new(record("/predictions/m", 200))))?;
        }
        std::thread::sleep(Duration::from_millis(300));
        drop(tx);
        let t = Instant::now();
        h.join()
            .map_err(|_| anyhow::anyhow!("sink thread panicked"))?;
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "shutdown waited for the backoff"
        );
        assert_eq!(metrics.written.get(), 0);
        assert_eq!(metrics.dropped.get(), 3);
        assert!(metrics.errors.get() >= 2, "retried");
        Ok(())
    }
}
