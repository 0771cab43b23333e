//! HTTP/1.x reconstruction: per-connection stream parsing of the kernel's records into [`Exchange`]s.

use std::borrow::Cow;

pub mod conntrack;
pub mod parser;

pub use conntrack::ConnTable;
pub use parser::{Conn, ParseStats};

/// A request as seen on the wire by the traced server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The method; the standard ones are not copied per request ([`method_name`]).
    pub method: Cow<'static, str>,
    /// The request target as sent (path and query).
    pub target: String,
    /// Kernel time of the read that carried the request's first byte.
    pub first_byte_ns: u64,
    /// Kernel time of the read that completed the request (its last byte, or the last read before the
    /// response when the body's end cannot be seen).
    pub complete_ns: u64,
    /// Bytes of the request (head and body) read so far.
    pub bytes: u64,
}

/// The head of a final response (interim `100 Continue` is not one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// The reason phrase; the common ones are not copied per response ([`reason_phrase`]).
    pub reason: Cow<'static, str>,
    /// The response's `x-request-id` (every TorchServe frontend response has one, except Netty's own
    /// 413), sanitised and bounded.
    pub request_id: Option<String>,
    /// Kernel time of the write that carried the status line.
    pub start_ns: u64,
    /// Kernel time of the write that carried the last byte; `None` when the connection closed before
    /// the response was complete.
    pub end_ns: Option<u64>,
    /// Bytes of the response (head and body) written.
    pub bytes: u64,
}

/// One request/response pair reconstructed from a connection, reported when the response ended. `request` is `None` when a response
/// could not be matched to a request (malformed request, bytes the head copy did not show).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exchange {
    pub tgid: u32,
    pub conn_id: u64,
    /// The client's address, when the kernel reported it.
    pub peer: Option<std::net::SocketAddr>,
    pub request: Option<Request>,
    pub response: Response,
}

impl Exchange {
    /// TorchServe-style latency: from the read that completed the request to the write of the
    /// response's status line, in microseconds.
    pub fn latency_us(&self) -> Option<f64> {
        let req = self.request.as_ref()?;
        let ns = self.response.start_ns.checked_sub(req.complete_ns)?;
        #[expect(
            clippy::cast_precision_loss,
            reason = "nanosecond spans fit f64's 52-bit mantissa"
        )]
        Some(ns as f64 / 1000.0)
    }
}

impl Exchange {
    /// Time from the request's first byte to the response's last byte, in microseconds.
    pub fn total_us(&self) -> Option<f64> {
        let req = self.request.as_ref()?;
        let ns = self.response.end_ns?.checked_sub(req.first_byte_ns)?;
        #[expect(
            clippy::cast_precision_loss,
            reason = "nanosecond spans fit f64's 52-bit mantissa"
        )]
        Some(ns as f64 / 1000.0)
    }
}

/// The methods of RFC 9110 (and PATCH).
const METHOD_NAMES: [&str; 9] = [
    "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE", "CONNECT",
];

/// A request's method: a standard one is shared, any other copied.
pub fn method_name(method: &str) -> Cow<'static, str> {
    shared_or_owned(&METHOD_NAMES, method)
}

fn shared_or_owned(common: &[&'static str], s: &str) -> Cow<'static, str> {
    common
        .iter()
        .find(|c| **c == s)
        .map_or_else(|| Cow::Owned(s.to_owned()), |c| Cow::Borrowed(*c))
}

/// Reason phrases servers commonly send (TorchServe's frontend sends the standard ones).
const COMMON_REASONS: [&str; 17] = [
    "OK",
    "Created",
    "Accepted",
    "No Content",
    "Bad Request",
    "Unauthorized",
    "Forbidden",
    "Not Found",
    "Method Not Allowed",
    "Request Entity Too Large",
    "Too Many Requests",
    "Internal Server Error",
    "Not Implemented",
    "Bad Gateway",
    "Service Unavailable",
    "Gateway Timeout",
    "Insufficient Storage",
];

/// A response's reason phrase: a common one is shared, any other copied.
pub fn reason_phrase(reason: &str) -> Cow<'static, str> {
    shared_or_owned(&COMMON_REASONS, reason)
}
