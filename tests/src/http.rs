//! A deliberately small HTTP/1.1 client over `std::net`: one request per connection, bytes exactly as
//! written, bounded by a timeout. The tests need to know precisely which requests hit a traced server (a
//! client library might retry, pool or pipeline), so they speak raw HTTP.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// One parsed response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header (name, value) pairs in wire order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `GET path` on its own connection. Sends only a `Host` header, like TorchServe's golden captures.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Response> {
    let raw = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    request(addr, raw.as_bytes(), timeout).with_context(|| format!("GET http://{addr}{path}"))
}

/// `POST path` with an `application/octet-stream` body on its own connection.
pub fn post(addr: SocketAddr, path: &str, body: &[u8], timeout: Duration) -> Result<Response> {
    let mut raw = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(body);
    request(addr, &raw, timeout).with_context(|| format!("POST http://{addr}{path}"))
}

/// Sends `raw` on a new connection and reads one response (skipping interim 1xx responses).
///
/// The response is framed by `Content-Length` or chunked encoding; reading to EOF is only the fallback,
/// because TorchServe keeps connections open even when asked to close them (FACTS.md §5).
pub fn request(addr: SocketAddr, raw: &[u8], timeout: Duration) -> Result<Response> {
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true).ok();
    stream
        .set_write_timeout(Some(timeout))
        .context("setting write timeout")?;
    stream.write_all(raw).context("sending request")?;
    let mut reader = Reader {
        stream,
        buf: Vec::new(),
        deadline,
        eof: false,
    };
    loop {
        let response = reader.response()?;
        if !(100..200).contains(&response.status) {
            return Ok(response);
        }
    }
}

struct Reader {
    stream: TcpStream,
    buf: Vec<u8>,
    deadline: Instant,
    eof: bool,
}

impl Reader {
    /// Reads more bytes into `buf`; `Ok(false)` at EOF.
    fn fill(&mut self) -> Result<bool> {
        if self.eof {
            return Ok(false);
        }
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("timed out waiting for the response");
        }
        self.stream
            .set_read_timeout(Some(left))
            .context("setting read timeout")?;
        let mut chunk = [0u8; 64 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => {
                self.eof = true;
                Ok(false)
            }
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
            // A server that closes with RST after a complete response (TorchServe on status >= 400, with
            // SO_LINGER 0) looks like this; what was already read is still the whole response.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                self.eof = true;
                Ok(false)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                bail!("timed out waiting for the response")
            }
            Err(e) => Err(e).context("reading the response"),
        }
    }

    fn response(&mut self) -> Result<Response> {
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            if !self.fill()? {
                bail!(
                    "connection closed before a complete response head ({} bytes received)",
                    self.buf.len()
                );
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        self.buf.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {status_line:?}"))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let mut response = Response {
            status,
            headers,
            body: Vec::new(),
        };
        if (100..200).contains(&status) || status == 204 || status == 304 {
            return Ok(response);
        }
        let chunked = response
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        if chunked {
            response.body = self.chunked_body()?;
        } else if let Some(len) = response.header("content-length") {
            let len: usize = len
                .parse()
                .with_context(|| format!("bad content-length {len:?}"))?;
            while self.buf.len() < len {
                if !self.fill()? {
                    bail!(
                        "connection closed after {} of {len} body bytes",
                        self.buf.len()
                    );
                }
            }
            // Split, not `drain(..).collect()`: that copies byte by byte in a debug build (xtask's),
            // which made a 3 MB scrape read as 30 ms slower than it is.
            let rest = self.buf.split_off(len);
            response.body = std::mem::replace(&mut self.buf, rest);
        } else {
            while self.fill()? {}
            response.body = std::mem::take(&mut self.buf);
        }
        Ok(response)
    }

    fn chunked_body(&mut self) -> Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = find(&self.buf, b"\r\n") {
                    break i;
                }
                if !self.fill()? {
                    bail!("connection closed inside a chunked body");
                }
            };
            let line = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
            let size_text = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_text, 16)
                .with_context(|| format!("bad chunk size {line:?}"))?;
            self.buf.drain(..line_end + 2);
            if size == 0 {
                // Trailers (none expected) end with an empty line.
                while find(&self.buf, b"\r\n").is_none() {
                    if !self.fill()? {
                        return Ok(body);
                    }
                }
                return Ok(body);
            }
            while self.buf.len() < size + 2 {
                if !self.fill()? {
                    bail!("connection closed inside a chunk");
                }
            }
            body.extend_from_slice(&self.buf[..size]);
            self.buf.drain(..size + 2);
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use std::{net::TcpListener, thread};

    use super::*;

    /// Serves one canned response on a loopback port and returns the address.
    fn serve_once(response: &'static [u8]) -> Result<SocketAddr> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        thread::spawn(move || {
            if let Ok((mut s, _)) = listener.accept() {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let _ = s.write_all(response);
                // Keep the connection open a moment, like a keep-alive server, to prove we do not wait
                // for EOF when the response is framed.
                thread::sleep(Duration::from_millis(300));
            }
        });
        Ok(addr)
    }

    #[test]
    fn content_length_response_on_kept_alive_connection() -> Result<()> {
        let addr = serve_once(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: keep-alive\r\n\r\nhello",
        )?;
        let r = get(addr, "/metrics", Duration::from_secs(5))?;
        assert_eq!((r.status, r.text().as_str()), (200, "hello"));
        Ok(())
    }

    #[test]
    fn chunked_response_after_interim_100() -> Result<()> {
        let addr = serve_once(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 \r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        )?;
        let r = post(addr, "/predictions/echo", b"x", Duration::from_secs(5))?;
        assert_eq!((r.status, r.text().as_str()), (200, "abcde"));
        Ok(())
    }
}
