//! h1server — a small, fast HTTP/1.1 server for servescope's integration tests and benchmarks.
//!
//! Shapes each response from the request's query string, so one test can drive every status, delay,
//! size and syscall pattern the agent must handle, and say exactly which syscalls carried the response.
//!
//! ```text
//! h1server [--family v4|v6|mapped|dual] [--port P]...
//!
//!   --family v4      127.0.0.1 (AF_INET)                       default
//!            v6      [::1] (AF_INET6)
//!            mapped  [::ffff:127.0.0.1] (AF_INET6 socket, v4-mapped address; what TorchServe binds)
//!            dual    [::] (AF_INET6, dual-stack: IPv4 clients arrive v4-mapped; all interfaces, so
//!                    only use it inside a network namespace of its own)
//!   --port P         listen on port P (0 = any free port); repeatable: one listener per port.
//!                    Default: one listener on a free port.
//! ```
//!
//! Prints `ready P1 [P2 ...]` (the bound ports, in `--port` order) on stdout once every listener
//! accepts, then serves until killed. One thread per connection, keep-alive, pipelined requests
//! answered in order. Any method and path; the request body (Content-Length or chunked) is read and
//! discarded; `Expect: 100-continue` gets a `100 Continue` first.
//!
//! Query parameters (all optional):
//! ```text
//!   status=N      response status (default 200); reason phrase "OK" for 200, "Status" otherwise
//!   delay_ms=D    sleep D ms between reading the whole request and writing the status line
//!   size=N        response body of N bytes (default: the 2-byte body "ok")
//!   mode=M        how the response leaves the socket (default write):
//!                   write     one write(2) with head and body
//!                   writev    one writev(2) with two iovecs [head, body] (Netty's pattern)
//!                   multi     head in two write(2)s (status line, then headers), body in 64 KiB write(2)s
//!                   stream    head with the body's first 64 KiB in one write(2), the rest in 64 KiB
//!                             write(2)s: one Content-Length response in many writes
//!                   sendfile  head with write(2), body with sendfile(2) from a temp file
//!                   send      head and body in one send(2) (sendto), like Python's socket layer
//!   chunked=1     Transfer-Encoding: chunked response; each 64 KiB chunk is its own write(2)
//!   gap_ms=G      with mode=multi, mode=stream or chunked=1: sleep G ms before each body write, so
//!                 the response takes longer than its first byte (time-to-last-byte >
//!                 time-to-first-byte)
//!   relocate=dup|dup2
//!                 after the response, write two log lines to a file and move the connection onto
//!                 that file's fd number: close the file and dup(2) the socket (which takes the freed
//!                 number), or dup2(2) the socket over it. Later requests are read and answered
//!                 through the new fd (the old one stays open, unused, until the connection ends), so
//!                 one thread writes a file fd and then a socket fd of the same number. If dup(2) did
//!                 not reuse the number, every later response on the connection is a 409.
//!   close=fin|rst after the response, close the connection (rst: SO_LINGER 0 first, so the close sends
//!                 RST like TorchServe's on status >= 400); also `Connection: close` from the client
//! ```
//!
//! Requests are read with read(2), like Netty; connections are accepted after poll(2), so a closed
//! connection's fd number goes to the next one at once, as in event-loop servers. Standard library plus
//! libc only. From Rust, `servescope_integration::h1::H1Server` runs it as a guarded process.
//!
//! Build: `cargo build -p servescope-integration --bin h1server [--release]`.

use std::{
    collections::HashMap,
    env,
    fs::File,
    io::{self, Write as _},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd, RawFd},
    process::ExitCode,
    sync::{Mutex, OnceLock, PoisonError},
    thread,
    time::Duration,
};

/// Largest request head accepted; a longer one gets 431 and a close.
const MAX_HEAD: usize = 64 * 1024;
/// Body bytes per write in `multi` and `chunked` modes.
const PIECE: usize = 64 * 1024;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("h1server: {e}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<(), String> {
    let mut family = "v4".to_owned();
    let mut ports = Vec::new();
    let mut args = env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--family" => family = args.next().ok_or("--family needs a value")?,
            "--port" => {
                let p = args.next().ok_or("--port needs a value")?;
                ports.push(p.parse::<u16>().map_err(|e| format!("--port {p}: {e}"))?);
            }
            "-h" | "--help" => {
                println!("usage: h1server [--family v4|v6|mapped|dual] [--port P]...");
                return Ok(());
            }
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    if ports.is_empty() {
        ports.push(0);
    }
    let ip: std::net::IpAddr = match family.as_str() {
        "v4" => Ipv4Addr::LOCALHOST.into(),
        "v6" => Ipv6Addr::LOCALHOST.into(),
        "mapped" => Ipv4Addr::LOCALHOST.to_ipv6_mapped().into(),
        "dual" => Ipv6Addr::UNSPECIFIED.into(),
        other => return Err(format!("--family {other}: expected v4, v6, mapped or dual")),
    };
    let mut bound = Vec::new();
    for port in ports {
        let addr = SocketAddr::new(ip, port);
        // std sets no IPV6_V6ONLY, so Linux's default (bindv6only=0) applies: [::] is dual-stack and a
        // v4-mapped address can be bound on an AF_INET6 socket.
        let l = TcpListener::bind(addr).map_err(|e| format!("binding {addr}: {e}"))?;
        let port = l.local_addr().map_err(|e| e.to_string())?.port();
        bound.push((l, port));
    }
    let list: Vec<String> = bound.iter().map(|(_, p)| p.to_string()).collect();
    println!("ready {}", list.join(" "));
    io::stdout().flush().map_err(|e| e.to_string())?;
    let mut handles = Vec::new();
    for (l, _) in bound {
        handles.push(thread::spawn(move || accept_loop(&l)));
    }
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

fn accept_loop(l: &TcpListener) {
    loop {
        // Wait for a connection first and accept it after: a blocking accept(2) reserves its fd number
        // while it waits, so a connection closed meanwhile would never hand its fd to the next one.
        // Event-loop servers (Netty, nginx) accept after epoll, and so reuse a freed fd at once.
        let mut pfd = libc::pollfd {
            fd: l.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one live pollfd.
        unsafe { libc::poll(&raw mut pfd, 1, -1) };
        match l.accept() {
            Ok((s, _)) => {
                thread::spawn(move || {
                    // A client that resets or vanishes ends its connection thread; nothing to report.
                    let _ = serve(&s);
                });
            }
            // EMFILE and friends: back off instead of spinning.
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Bytes read from the connection and not consumed yet, refilled with read(2).
struct Conn<'a> {
    s: &'a TcpStream,
    fd: RawFd,
    buf: Vec<u8>,
    /// The fd `relocate=` moved the connection to (`fd` then); closed with the connection.
    moved: Option<std::os::fd::OwnedFd>,
    /// `relocate=dup` did not get the log file's fd number: later responses are 409s.
    reuse_failed: bool,
}

impl Conn<'_> {
    /// Reads more bytes; `Ok(false)` at EOF.
    fn fill(&mut self) -> io::Result<bool> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            // SAFETY: reading into a local buffer of the stated length from a socket we own.
            let n = unsafe { libc::read(self.fd, chunk.as_mut_ptr().cast(), chunk.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let n = n.unsigned_abs();
            self.buf.extend_from_slice(&chunk[..n]);
            return Ok(n > 0);
        }
    }

    /// Consumes `n` bytes (reading as needed); errors at EOF.
    fn skip(&mut self, mut n: u64) -> io::Result<()> {
        loop {
            let have = self.buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
            self.buf.drain(..have);
            n -= have as u64;
            if n == 0 {
                return Ok(());
            }
            if !self.fill()? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// One CRLF-terminated line (without the CRLF).
    fn line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                let line = self.buf[..i].to_vec();
                self.buf.drain(..i + 2);
                return Ok(line);
            }
            if self.buf.len() > MAX_HEAD || !self.fill()? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

/// Serves one connection until the client closes it or a response asks for a close.
fn serve(s: &TcpStream) -> io::Result<()> {
    let mut c = Conn {
        s,
        fd: s.as_raw_fd(),
        buf: Vec::new(),
        moved: None,
        reuse_failed: false,
    };
    loop {
        // Request head.
        let head_end = loop {
            if let Some(i) = find(&c.buf, b"\r\n\r\n") {
                break i + 4;
            }
            if c.buf.len() > MAX_HEAD {
                write_all(c.fd, b"HTTP/1.1 431 Status\r\ncontent-length: 0\r\n\r\n")?;
                return Ok(());
            }
            if !c.fill()? {
                return Ok(()); // client closed between requests
            }
        };
        let head = String::from_utf8_lossy(&c.buf[..head_end]).into_owned();
        c.buf.drain(..head_end);
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap_or_default();
        let mut parts = request_line.split(' ');
        let (_method, target, version) = (
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
        );
        let mut content_length = 0u64;
        let mut chunked = false;
        let mut client_close = version == "HTTP/1.0";
        let mut expect_continue = false;
        for (k, v) in lines.filter_map(|l| l.split_once(':')) {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase());
            match k.as_str() {
                "content-length" => content_length = v.parse().unwrap_or(0),
                "transfer-encoding" => chunked = v.contains("chunked"),
                "connection" => client_close = v.contains("close"),
                "expect" => expect_continue = v == "100-continue",
                _ => {}
            }
        }
        if expect_continue {
            write_all(c.fd, b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        // Request body: read and discard.
        if chunked {
            loop {
                let line = c.line()?;
                let size_text = String::from_utf8_lossy(&line);
                let size_text = size_text.split(';').next().unwrap_or_default().trim();
                let size = u64::from_str_radix(size_text, 16)
                    .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
                if size == 0 {
                    // Trailers, then the empty line.
                    while !c.line()?.is_empty() {}
                    break;
                }
                c.skip(size + 2)?;
            }
        } else {
            c.skip(content_length)?;
        }

        let q = Query::parse(target);
        if q.delay_ms > 0 {
            thread::sleep(Duration::from_millis(q.delay_ms));
        }
        let close = q.close.is_some() || client_close;
        respond(&c, &q, close)?;
        if let Some(how) = &q.relocate {
            relocate(&mut c, how == "dup2")?;
        }
        if close {
            if q.close.as_deref() == Some("rst") {
                set_linger_zero(c.fd);
            }
            return Ok(());
        }
    }
}

/// The response parameters from a request target's query string.
#[derive(Clone)]
struct Query {
    status: u16,
    delay_ms: u64,
    size: Option<usize>,
    mode: String,
    chunked: bool,
    gap_ms: u64,
    close: Option<String>,
    relocate: Option<String>,
}

impl Query {
    fn parse(target: &str) -> Query {
        let mut q = Query {
            status: 200,
            delay_ms: 0,
            size: None,
            mode: "write".to_owned(),
            chunked: false,
            gap_ms: 0,
            close: None,
            relocate: None,
        };
        let query = target.split_once('?').map(|(_, q)| q).unwrap_or_default();
        for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
            match k {
                "status" => q.status = v.parse().unwrap_or(200),
                "delay_ms" => q.delay_ms = v.parse().unwrap_or(0),
                "size" => q.size = v.parse().ok(),
                "mode" => q.mode = v.to_owned(),
                "chunked" => q.chunked = v == "1",
                "gap_ms" => q.gap_ms = v.parse().unwrap_or(0),
                "close" => q.close = Some(v.to_owned()),
                "relocate" => q.relocate = Some(v.to_owned()),
                _ => {}
            }
        }
        q
    }
}

/// `relocate=`: two log lines to a file fd, then the connection moves onto that fd number.
fn relocate(c: &mut Conn<'_>, dup2: bool) -> io::Result<()> {
    use std::os::fd::{FromRawFd as _, IntoRawFd as _, OwnedFd};
    let log = File::options().append(true).open("/dev/null")?;
    write_all(log.as_raw_fd(), b"POST /predictions/x 200\n")?;
    write_all(log.as_raw_fd(), b"POST /predictions/x 200\n")?;
    let log_fd = log.as_raw_fd();
    let fd = if dup2 {
        let log_fd = log.into_raw_fd();
        // SAFETY: both fds are open; dup2 closes the file's description and reuses its number,
        // which is owned below.
        unsafe { libc::dup2(c.fd, log_fd) }
    } else {
        drop(log);
        // SAFETY: dup of the connection's open socket; the new fd is owned below.
        unsafe { libc::dup(c.fd) }
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    c.reuse_failed |= fd != log_fd;
    c.fd = fd;
    // SAFETY: `fd` is open and owned by nothing else.
    c.moved = Some(unsafe { OwnedFd::from_raw_fd(fd) });
    Ok(())
}

/// Writes the response the query asked for.
fn respond(c: &Conn<'_>, q: &Query, close: bool) -> io::Result<()> {
    let status = if c.reuse_failed { 409 } else { q.status };
    let q = &Query {
        status,
        ..q.clone()
    };
    let reason = if q.status == 200 { "OK" } else { "Status" };
    let size = q.size.unwrap_or(2);
    let framing = if q.chunked {
        "transfer-encoding: chunked\r\n".to_owned()
    } else {
        format!("content-length: {size}\r\n")
    };
    let connection = if close { "close" } else { "keep-alive" };
    let status_line = format!("HTTP/1.1 {} {reason}\r\n", q.status);
    let rest = format!("{framing}connection: {connection}\r\n\r\n");
    let head = format!("{status_line}{rest}");
    let body = body(size);
    let gap = Duration::from_millis(q.gap_ms);
    let pause = || {
        if !gap.is_zero() {
            thread::sleep(gap);
        }
    };

    if q.chunked {
        write_all(c.fd, head.as_bytes())?;
        for piece in body.chunks(PIECE) {
            pause();
            let mut chunk = format!("{:x}\r\n", piece.len()).into_bytes();
            chunk.extend_from_slice(piece);
            chunk.extend_from_slice(b"\r\n");
            write_all(c.fd, &chunk)?;
        }
        return write_all(c.fd, b"0\r\n\r\n");
    }
    match q.mode.as_str() {
        "writev" => writev_all(c.fd, head.as_bytes(), &body),
        "multi" => {
            write_all(c.fd, status_line.as_bytes())?;
            write_all(c.fd, rest.as_bytes())?;
            for piece in body.chunks(PIECE) {
                pause();
                write_all(c.fd, piece)?;
            }
            Ok(())
        }
        "stream" => {
            let first = body.len().min(PIECE);
            let mut all = head.into_bytes();
            all.extend_from_slice(&body[..first]);
            write_all(c.fd, &all)?;
            for piece in body[first..].chunks(PIECE) {
                pause();
                write_all(c.fd, piece)?;
            }
            Ok(())
        }
        "sendfile" => {
            write_all(c.fd, head.as_bytes())?;
            sendfile_all(c.fd, size)
        }
        "send" => {
            let mut all = head.into_bytes();
            all.extend_from_slice(&body);
            // std's TcpStream writes with send(2) (the sendto syscall).
            let mut s = c.s;
            s.write_all(&all)
        }
        _ => {
            let mut all = head.into_bytes();
            all.extend_from_slice(&body);
            write_all(c.fd, &all)
        }
    }
}

/// The response body: "ok" by default, else `size` bytes of filler (shared, built once per size).
fn body(size: usize) -> std::sync::Arc<Vec<u8>> {
    static BODIES: OnceLock<Mutex<HashMap<usize, std::sync::Arc<Vec<u8>>>>> = OnceLock::new();
    let mut map = BODIES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    map.entry(size)
        .or_insert_with(|| {
            std::sync::Arc::new(if size == 2 {
                b"ok".to_vec()
            } else {
                vec![b'x'; size]
            })
        })
        .clone()
}

fn write_all(fd: RawFd, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        // SAFETY: writing from a live slice of the stated length to a socket we own.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        data = &data[n.unsigned_abs()..];
    }
    Ok(())
}

/// writev(head, body), continuing with plain writes if the kernel took only part of it.
fn writev_all(fd: RawFd, head: &[u8], body: &[u8]) -> io::Result<()> {
    let iov = [
        libc::iovec {
            iov_base: head.as_ptr() as *mut libc::c_void,
            iov_len: head.len(),
        },
        libc::iovec {
            iov_base: body.as_ptr() as *mut libc::c_void,
            iov_len: body.len(),
        },
    ];
    let n = loop {
        // SAFETY: both iovecs point into live slices of the stated lengths.
        let n = unsafe { libc::writev(fd, iov.as_ptr(), 2) };
        if n >= 0 {
            break n.unsigned_abs();
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    if n < head.len() {
        write_all(fd, &head[n..])?;
        write_all(fd, body)
    } else {
        write_all(fd, &body[n - head.len()..])
    }
}

/// Sends `size` bytes of an (unlinked) temp file with sendfile(2).
fn sendfile_all(fd: RawFd, size: usize) -> io::Result<()> {
    let file = filler_file(size)?;
    let mut offset: libc::off_t = 0;
    let mut left = size;
    while left > 0 {
        // SAFETY: `offset` is a live local; both fds are open for the duration of the call.
        let n = unsafe { libc::sendfile(fd, file.as_raw_fd(), &raw mut offset, left) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        left -= n.unsigned_abs();
    }
    Ok(())
}

/// A temp file holding at least `size` filler bytes; one per process, grown on demand and unlinked at
/// once so nothing is left behind.
fn filler_file(size: usize) -> io::Result<File> {
    static FILE: OnceLock<Mutex<Option<(File, usize)>>> = OnceLock::new();
    let mut slot = FILE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if slot.as_ref().is_none_or(|(_, len)| *len < size) {
        let path = env::temp_dir().join(format!("h1server-{}.body", std::process::id()));
        let mut f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        let _ = std::fs::remove_file(&path);
        f.write_all(&body(size))?;
        *slot = Some((f, size));
    }
    match slot.as_ref() {
        Some((f, _)) => f.try_clone(),
        None => Err(io::ErrorKind::NotFound.into()),
    }
}

/// SO_LINGER {on, 0}: the next close() sends RST instead of FIN.
fn set_linger_zero(fd: RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt with a pointer to a live linger struct of the stated size.
    unsafe {
        libc::setsockopt(
            fd,
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
