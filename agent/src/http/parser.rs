//! HTTP/1.x stream parser for one connection of a traced *server*.
//!
//! Input: the kernel's records for the connection, in order — for each syscall, its full length and the
//! bounded head of its bytes (`events::HEAD_MAX`). Output: one [`Exchange`] per final response.
//!
//! Framing rules (DESIGN.md §4):
//! - Request heads are parsed with httparse; `Content-Length` bodies are skipped by length, so
//!   keep-alive, split reads and pipelined requests stay aligned without seeing body bytes.
//! - A request whose end cannot be seen — chunked body (chunk-size lines may lie beyond the copied head)
//!   or a head longer than the copied bytes — ends when the server starts its response: a server answers
//!   only after it has read the whole request.
//! - Responses are paired with requests in arrival order (FIFO). TorchServe may answer pipelined
//!   requests out of order; then status classes stay exact but a pair's model attribution and latency
//!   may be swapped between the pipelined requests (README "How it counts").
//! - Only the first `events::HEAD_MAX` bytes of each read are copied. Pipelined requests whose heads
//!   begin beyond them (a burst sent in one write and read in one syscall) cannot be seen: their
//!   responses count in their status class and in `unmatched_responses`, not under a model; the next
//!   read that starts at a request boundary restores exact attribution.
//! - `100 Continue` is interim: it neither pairs nor counts.
//! - A connection first seen mid-stream (open before the agent started, or evicted from the kernel map)
//!   is picked up at the first read that begins with a request line; bytes before it are ignored.

use std::{borrow::Cow, collections::VecDeque, mem::MaybeUninit, net::SocketAddr};

use super::{Exchange, Request, Response, method_name, reason_phrase};
use crate::events::Direction;

/// Longest request or response head accumulated across reads before the bytes are declared not HTTP.
const MAX_HEAD: usize = 16 * 1024;
/// Header slots offered to httparse; a head with more headers is a parse error.
const MAX_HEADERS: usize = 64;

const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
];

/// Counters the parser feeds; the pipeline exports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ParseStats {
    /// Bytes that were not HTTP where a message head was expected.
    pub parse_errors: u64,
    /// Final responses with no request to pair with.
    pub unmatched_responses: u64,
    /// Requests dropped unanswered because a connection had [`MAX_PENDING`] waiting already.
    pub dropped_requests: u64,
    /// Reads and writes the kernel sent as message body (it framed the message from its head) where
    /// this parser expected a message head: the two disagree on where a message ends.
    pub framing_mismatches: u64,
}

/// Most requests kept waiting for their responses on one connection. A client may pipeline without
/// reading replies; past this the oldest is dropped (counted) so one connection cannot grow the agent.
pub const MAX_PENDING: usize = 1024;

#[derive(Debug)]
enum ReqState {
    /// Between requests.
    Idle,
    /// A request head is arriving (possibly split across reads).
    Head {
        buf: Vec<u8>,
        first_ns: u64,
        bytes: u64,
    },
    /// A `Content-Length` body is arriving.
    Body { req: Request, remaining: u64 },
    /// A body whose end cannot be seen: ends when the response starts.
    UntilResponse { req: Request },
    /// The rest of a body the server already answered (e.g. after an early 413).
    Discard { remaining: u64 },
    /// A request whose head lies beyond the bytes the kernel copied of a read (a burst of pipelined
    /// requests): it exists, but cannot be seen. Like `UntilResponse`, ends when a response starts;
    /// that response, and any other with nothing left to pair with, counts as unmatched.
    Unseen,
}

#[derive(Debug)]
enum RespState {
    Idle,
    Head {
        buf: Vec<u8>,
        start_ns: u64,
    },
    /// A `Content-Length` body is being written; the exchange is reported when it ends.
    Body {
        remaining: u64,
        ex: Exchange,
    },
    /// Chunked or close-delimited body (or bytes of a response we never saw the head of): writes are
    /// body until one begins with a status line, or the connection closes, or — `chunked` — a write
    /// seen whole ends with the last chunk.
    UntilNextHead {
        ex: Option<Exchange>,
        chunked: bool,
    },
}

/// Parses a message head of which `buf` holds the bytes of earlier syscalls and `more` those of this
/// one. Nearly every head comes whole in one read or write: it is parsed where the kernel's copy lies,
/// and `buf` is filled (an allocation and a copy) only when the head is still incomplete, so that
/// the next syscall's bytes can join it.
fn parse_head<P: Partial>(buf: &mut Vec<u8>, more: &[u8], parse: impl Fn(&[u8]) -> P) -> P {
    if buf.is_empty() {
        let parsed = parse(more);
        if parsed.is_partial() {
            buf.extend_from_slice(more);
        }
        return parsed;
    }
    buf.extend_from_slice(more);
    parse(buf)
}

/// What [`parse_head`] needs to know of a parse's result.
trait Partial {
    fn is_partial(&self) -> bool;
}

impl Partial for HeadParse {
    fn is_partial(&self) -> bool {
        matches!(self, HeadParse::Partial)
    }
}

impl Partial for RespParse {
    fn is_partial(&self) -> bool {
        matches!(self, RespParse::Partial)
    }
}

/// Reports `ex` as ended at `end_ns` and readies the connection for the next response.
fn finish(out: &mut Vec<Exchange>, mut ex: Exchange, end_ns: u64, state: &mut RespState) {
    ex.response.end_ns = Some(end_ns);
    out.push(ex);
    *state = RespState::Idle;
}

/// Parser state for one connection.
#[derive(Debug)]
pub struct Conn {
    tgid: u32,
    conn_id: u64,
    /// Whether the parser knows where requests start. False for connections picked up mid-stream and
    /// after bytes that were not HTTP, until a read begins with a request line.
    req_synced: bool,
    /// Whether the parser knows where responses start. Only lost for connections picked up mid-stream:
    /// a server's status lines stay findable after a malformed request (TorchServe answers it with 400).
    resp_synced: bool,
    req: ReqState,
    /// Complete requests awaiting their response, oldest first.
    pending: VecDeque<Request>,
    resp: RespState,
    last_read_ns: u64,
    last_write_ns: u64,
    /// Kernel time of the last traced read or write, whatever it held (for eviction).
    last_active_ns: u64,
    /// The client's address, when the kernel reported it.
    peer: Option<SocketAddr>,
}

impl Conn {
    /// `at_boundary`: the stream is known to start at a message boundary (seen at accept()).
    pub fn new(tgid: u32, conn_id: u64, at_boundary: bool) -> Self {
        Conn {
            tgid,
            conn_id,
            req_synced: at_boundary,
            resp_synced: at_boundary,
            req: ReqState::Idle,
            pending: VecDeque::new(),
            resp: RespState::Idle,
            last_read_ns: 0,
            last_write_ns: 0,
            last_active_ns: 0,
            peer: None,
        }
    }

    /// Records the client's address (from the kernel's open record).
    pub fn set_peer(&mut self, peer: Option<SocketAddr>) {
        self.peer = peer;
    }

    pub fn tgid(&self) -> u32 {
        self.tgid
    }

    /// Kernel time of this connection's last traced read or write (0: none yet).
    pub fn last_active_ns(&self) -> u64 {
        self.last_active_ns
    }

    /// Whether the next bytes in direction `dir` must begin a message head: the kernel then has no
    /// business calling them body (see [`ParseStats::framing_mismatches`]). False wherever the
    /// parser does not know where messages start, or is inside a body or a head.
    pub fn expects_head(&self, dir: Direction) -> bool {
        match dir {
            Direction::Ingress => self.req_synced && matches!(self.req, ReqState::Idle),
            Direction::Egress => self.resp_synced && matches!(self.resp, RespState::Idle),
        }
    }

    /// Requests received and not yet answered.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Requests in flight: received and not yet answered in full (those waiting for their status
    /// line, and the one whose response body is being written).
    pub fn in_flight(&self) -> usize {
        let writing = matches!(
            self.resp,
            RespState::Body { .. } | RespState::UntilNextHead { ex: Some(_), .. }
        );
        self.pending.len() + usize::from(writing)
    }

    /// Bytes the server read: `len` in all, of which `head` were copied.
    pub fn on_ingress(&mut self, ts_ns: u64, head: &[u8], len: u64, stats: &mut ParseStats) {
        self.last_read_ns = ts_ns;
        self.last_active_ns = self.last_active_ns.max(ts_ns);
        if !self.req_synced {
            if !starts_with_method(head) {
                return;
            }
            self.req_synced = true;
            self.req = ReqState::Idle;
            if !self.resp_synced {
                // First request boundary of a connection picked up mid-stream: whatever response is
                // still being written belongs to a request we never saw.
                self.resp_synced = true;
                self.resp = RespState::UntilNextHead {
                    ex: None,
                    chunked: false,
                };
            }
        }
        let mut off: u64 = 0;
        while off < len {
            let captured = usize::try_from(off)
                .ok()
                .and_then(|o| head.get(o..))
                .unwrap_or(&[]);
            let rest = len - off;
            match &mut self.req {
                ReqState::Idle => {
                    self.req = ReqState::Head {
                        buf: Vec::new(),
                        first_ns: ts_ns,
                        bytes: 0,
                    };
                }
                ReqState::Head {
                    buf,
                    first_ns,
                    bytes,
                } => {
                    let before = buf.len();
                    let take = captured.len().min(MAX_HEAD.saturating_sub(before));
                    let parsed = parse_head(buf, &captured[..take], parse_request_head);
                    match parsed {
                        HeadParse::Complete {
                            used,
                            mut req,
                            framing,
                        } => {
                            // Bytes of this syscall that belonged to the head.
                            let used_here = (used - before) as u64;
                            off += used_here;
                            req.first_byte_ns = *first_ns;
                            req.bytes = *bytes + used_here;
                            req.complete_ns = ts_ns;
                            self.req = match framing {
                                Framing::None => {
                                    self.queue(req, stats);
                                    ReqState::Idle
                                }
                                Framing::Length(0) => {
                                    self.queue(req, stats);
                                    ReqState::Idle
                                }
                                Framing::Length(n) => ReqState::Body { req, remaining: n },
                                Framing::UntilOther => ReqState::UntilResponse { req },
                            };
                        }
                        HeadParse::Partial => {
                            let more_unseen = (take as u64) < rest;
                            if !more_unseen {
                                // The head continues in a later read.
                                *bytes += rest;
                                off = len;
                            } else if let Some(mut req) = parse_request_line(buf) {
                                // The head is longer than the bytes the kernel copied: keep what the
                                // request line says and let the response end the request.
                                req.first_byte_ns = *first_ns;
                                req.bytes = *bytes + rest;
                                req.complete_ns = ts_ns;
                                self.req = ReqState::UntilResponse { req };
                                off = len;
                            } else {
                                // A valid beginning (httparse said Partial, possibly of nothing at
                                // all) cut off by the copy limit: a real request we cannot read, not a
                                // parse error.
                                self.req = ReqState::Unseen;
                                off = len;
                            }
                        }
                        HeadParse::Invalid => {
                            stats.parse_errors += 1;
                            self.desync();
                            return;
                        }
                    }
                }
                ReqState::Body { req, remaining } => {
                    let n = rest.min(*remaining);
                    *remaining -= n;
                    req.bytes += n;
                    off += n;
                    if *remaining == 0 {
                        let mut req = match std::mem::replace(&mut self.req, ReqState::Idle) {
                            ReqState::Body { req, .. } => req,
                            _ => unreachable!("matched Body above"),
                        };
                        req.complete_ns = ts_ns;
                        self.queue(req, stats);
                    }
                }
                ReqState::UntilResponse { req } => {
                    req.bytes += rest;
                    req.complete_ns = ts_ns;
                    off = len;
                }
                ReqState::Unseen => off = len,
                ReqState::Discard { remaining } => {
                    let n = rest.min(*remaining);
                    *remaining -= n;
                    off += n;
                    if *remaining == 0 {
                        self.req = ReqState::Idle;
                    }
                }
            }
        }
    }

    /// Bytes the server wrote: `len` in all, of which `head` were copied; the write began at `ts_ns` (the
    /// response's first byte, if it starts here) and returned at `end_ns` (its last byte, if it ends
    /// here: a blocking write of a large response returns only once all of it is queued). Appends to
    /// `out` the exchanges whose response ended in this write (or, for a response whose end cannot be
    /// seen, whose successor began): the caller's vector is reused from record to record.
    pub fn on_egress(
        &mut self,
        ts_ns: u64,
        end_ns: u64,
        head: &[u8],
        len: u64,
        stats: &mut ParseStats,
        out: &mut Vec<Exchange>,
    ) {
        // max: writes are stamped when they began, so a long write may carry an earlier time.
        self.last_active_ns = self.last_active_ns.max(ts_ns);
        if !self.resp_synced {
            return;
        }
        let mut off: u64 = 0;
        while off < len {
            let captured = usize::try_from(off)
                .ok()
                .and_then(|o| head.get(o..))
                .unwrap_or(&[]);
            let rest = len - off;
            match &mut self.resp {
                RespState::Idle => {
                    if captured.is_empty() {
                        // A response starting beyond the copied bytes: invisible; resynchronise on
                        // the next write that begins with a status line.
                        self.resp = RespState::UntilNextHead {
                            ex: None,
                            chunked: false,
                        };
                        break;
                    }
                    if !b"HTTP/".starts_with(&captured[..captured.len().min(5)]) {
                        stats.parse_errors += 1;
                        self.resp = RespState::UntilNextHead {
                            ex: None,
                            chunked: false,
                        };
                        break;
                    }
                    self.resp = RespState::Head {
                        buf: Vec::new(),
                        start_ns: ts_ns,
                    };
                }
                RespState::Head { buf, start_ns } => {
                    let start_ns = *start_ns;
                    let before = buf.len();
                    let take = captured.len().min(MAX_HEAD.saturating_sub(before));
                    let head_bytes = (before + take) as u64;
                    let parsed = parse_head(buf, &captured[..take], parse_response_head);
                    let (used_here, head_info) = match parsed {
                        RespParse::Complete { used, head } => ((used - before) as u64, head),
                        RespParse::Partial if (take as u64) >= rest => {
                            off = len; // the head continues in a later write
                            continue;
                        }
                        RespParse::Partial => match parse_status_line(buf) {
                            // Head longer than the copied bytes: the status is all we need.
                            Some(head) => (rest, head),
                            None => {
                                stats.parse_errors += 1;
                                self.resp = RespState::UntilNextHead {
                                    ex: None,
                                    chunked: false,
                                };
                                break;
                            }
                        },
                        RespParse::Invalid => {
                            stats.parse_errors += 1;
                            self.resp = RespState::UntilNextHead {
                                ex: None,
                                chunked: false,
                            };
                            break;
                        }
                    };
                    off += used_here;
                    if head_info.status == 100 {
                        // Interim response to `Expect: 100-continue`: the request goes on.
                        self.resp = RespState::Idle;
                        continue;
                    }
                    let request = self.take_request_for_response();
                    let head_request = request
                        .as_ref()
                        .is_some_and(|r| r.method.eq_ignore_ascii_case("HEAD"));
                    if request.is_none() && self.req_synced {
                        stats.unmatched_responses += 1;
                    }
                    let no_body = head_request
                        || head_info.status < 200
                        || head_info.status == 204
                        || head_info.status == 304;
                    let ex = Exchange {
                        tgid: self.tgid,
                        conn_id: self.conn_id,
                        peer: self.peer,
                        request,
                        response: Response {
                            status: head_info.status,
                            reason: head_info.reason,
                            request_id: head_info.request_id,
                            start_ns,
                            end_ns: None,
                            bytes: head_bytes.min(used_here + before as u64),
                        },
                    };
                    let body_rest = len - off;
                    match head_info.framing {
                        _ if no_body => finish(out, ex, end_ns, &mut self.resp),
                        Framing::Length(n) if n <= body_rest => {
                            off += n;
                            let mut ex = ex;
                            ex.response.bytes += n;
                            finish(out, ex, end_ns, &mut self.resp);
                        }
                        Framing::Length(n) => {
                            let mut ex = ex;
                            ex.response.bytes += body_rest;
                            self.resp = RespState::Body {
                                remaining: n - body_rest,
                                ex,
                            };
                            off = len;
                        }
                        Framing::UntilOther | Framing::None => {
                            // Chunked or close-delimited: over if this write ends with the last chunk;
                            // otherwise at the next status line or the close.
                            let mut ex = ex;
                            ex.response.bytes += body_rest;
                            off = len;
                            let whole_write_seen = head.len() as u64 == len;
                            if head_info.framing == Framing::UntilOther
                                && whole_write_seen
                                && head.ends_with(b"0\r\n\r\n")
                            {
                                finish(out, ex, end_ns, &mut self.resp);
                            } else {
                                self.last_write_ns = end_ns;
                                self.resp = RespState::UntilNextHead {
                                    ex: Some(ex),
                                    chunked: head_info.framing == Framing::UntilOther,
                                };
                            }
                        }
                    }
                }
                RespState::Body { remaining, ex } => {
                    let n = rest.min(*remaining);
                    *remaining -= n;
                    ex.response.bytes += n;
                    off += n;
                    if *remaining == 0
                        && let RespState::Body { ex, .. } =
                            std::mem::replace(&mut self.resp, RespState::Idle)
                    {
                        finish(out, ex, end_ns, &mut self.resp);
                    }
                }
                RespState::UntilNextHead { ex, chunked } => {
                    if off == 0 && captured.starts_with(b"HTTP/1.") {
                        if let Some(ex) = ex.take() {
                            let end = self.last_write_ns;
                            finish(out, ex, end, &mut self.resp);
                        }
                        self.resp = RespState::Idle;
                    } else {
                        if let Some(ex) = ex {
                            ex.response.bytes += rest;
                        }
                        self.last_write_ns = end_ns;
                        // Servers that stream chunks write the terminating `0\r\n\r\n` on its own (or
                        // with the last chunk): the response ends there, not at the next response,
                        // which on an idle keep-alive connection may never come.
                        let last_chunk =
                            off == 0 && head.len() as u64 == len && head.ends_with(b"0\r\n\r\n");
                        if *chunked
                            && last_chunk
                            && let Some(ex) = ex.take()
                        {
                            finish(out, ex, end_ns, &mut self.resp);
                        }
                        break;
                    }
                }
            }
        }
    }

    /// The connection closed: a response still being written ends here. Returns it, if any: a response
    /// cut short (client reset) still counts, as the server sent its status; `end_ns` stays `None`
    /// unless the response was close-delimited.
    pub fn on_close(&mut self) -> Option<Exchange> {
        match std::mem::replace(&mut self.resp, RespState::Idle) {
            RespState::Body { ex, .. } => Some(ex),
            RespState::UntilNextHead {
                ex: Some(mut ex), ..
            } => {
                ex.response.end_ns = Some(self.last_write_ns);
                Some(ex)
            }
            _ => None,
        }
    }

    /// The request a final response answers: the oldest complete one, else the one still arriving
    /// (the server answered before the body ended: early 413, or a body whose end we cannot see).
    fn take_request_for_response(&mut self) -> Option<Request> {
        if let Some(req) = self.pending.pop_front() {
            return Some(req);
        }
        match std::mem::replace(&mut self.req, ReqState::Idle) {
            ReqState::Body { mut req, remaining } => {
                req.complete_ns = self.last_read_ns;
                self.req = ReqState::Discard { remaining };
                Some(req)
            }
            ReqState::UntilResponse { req } => Some(req),
            ReqState::Unseen => None,
            ReqState::Head {
                buf,
                first_ns,
                bytes,
            } => {
                // A head the server answered before it was complete (e.g. 400 for a malformed or
                // oversized head): pair it if the request line is readable.
                parse_request_line(&buf).map(|mut req| {
                    req.first_byte_ns = first_ns;
                    req.bytes = bytes;
                    req.complete_ns = self.last_read_ns;
                    req
                })
            }
            other => {
                self.req = other;
                None
            }
        }
    }

    /// Queues a complete request for its response, within [`MAX_PENDING`].
    fn queue(&mut self, req: Request, stats: &mut ParseStats) {
        if self.pending.len() >= MAX_PENDING {
            self.pending.pop_front();
            stats.dropped_requests += 1;
        }
        self.pending.push_back(req);
    }

    /// Lose track of message boundaries (bytes that are not HTTP): wait for the next request line.
    fn desync(&mut self) {
        self.req_synced = false;
        self.req = ReqState::Idle;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// No body (request without Content-Length/Transfer-Encoding).
    None,
    Length(u64),
    /// Chunked (or, for responses, unknown): ends at the other side's next message.
    UntilOther,
}

enum HeadParse {
    Complete {
        used: usize,
        req: Request,
        framing: Framing,
    },
    Partial,
    Invalid,
}

fn starts_with_method(b: &[u8]) -> bool {
    METHODS.iter().any(|m| b.starts_with(m))
}

/// Header slots for one parse, left uninitialised: httparse writes those it fills, and initialising
/// all 64 (2 KiB) for every head was a tenth of the agent's CPU under load (perf, h1server).
fn header_slots<'b>() -> [MaybeUninit<httparse::Header<'b>>; MAX_HEADERS] {
    [const { MaybeUninit::uninit() }; MAX_HEADERS]
}

fn parse_request_head(buf: &[u8]) -> HeadParse {
    let mut headers = header_slots();
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(used)) => {
            let (Some(method), Some(path)) = (req.method, req.path) else {
                return HeadParse::Invalid;
            };
            match body_framing(req.headers) {
                Some(framing) => HeadParse::Complete {
                    used,
                    req: Request {
                        method: method_name(method),
                        target: path.to_owned(),
                        first_byte_ns: 0,
                        complete_ns: 0,
                        bytes: 0,
                    },
                    framing,
                },
                None => HeadParse::Invalid,
            }
        }
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => HeadParse::Partial,
        _ => HeadParse::Invalid,
    }
}

/// `Some(framing)`, or `None` when the framing headers are contradictory or malformed (a request
/// smuggling shape that servers reject).
fn body_framing(headers: &[httparse::Header<'_>]) -> Option<Framing> {
    let mut framing = Framing::None;
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let v = std::str::from_utf8(h.value).ok()?;
            if v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("chunked"))
            {
                framing = Framing::UntilOther;
            }
        } else if h.name.eq_ignore_ascii_case("content-length") && framing != Framing::UntilOther {
            let v = std::str::from_utf8(h.value).ok()?.trim();
            let n: u64 = v.parse().ok()?;
            if let Framing::Length(prev) = framing
                && prev != n
            {
                return None;
            }
            framing = Framing::Length(n);
        }
    }
    Some(framing)
}

/// Method and target from a request line alone (the rest of the head was not copied).
fn parse_request_line(buf: &[u8]) -> Option<Request> {
    let end = buf.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&buf[..end]).ok()?;
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if !version.starts_with("HTTP/1.")
        || method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_uppercase())
    {
        return None;
    }
    Some(Request {
        method: method_name(method),
        target: target.to_owned(),
        first_byte_ns: 0,
        complete_ns: 0,
        bytes: 0,
    })
}

struct RespHead {
    status: u16,
    reason: Cow<'static, str>,
    request_id: Option<String>,
    framing: Framing,
}

enum RespParse {
    Complete { used: usize, head: RespHead },
    Partial,
    Invalid,
}

fn parse_response_head(buf: &[u8]) -> RespParse {
    let mut headers = header_slots();
    let mut resp = httparse::Response::new(&mut []);
    match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(used)) => {
            let Some(status) = resp.code else {
                return RespParse::Invalid;
            };
            let request_id = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("x-request-id"))
                .map(|h| request_id(h.value));
            // Framing::None: close-delimited (HTTP/1.0 style); UntilOther: chunked.
            let Some(framing) = body_framing(resp.headers) else {
                return RespParse::Invalid;
            };
            RespParse::Complete {
                used,
                head: RespHead {
                    status,
                    reason: reason_phrase(resp.reason.unwrap_or("")),
                    request_id,
                    framing,
                },
            }
        }
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => RespParse::Partial,
        _ => RespParse::Invalid,
    }
}

/// Longest `x-request-id` value kept; TorchServe's are 36-character UUIDs.
const MAX_REQUEST_ID: usize = 128;

/// An `x-request-id` value as it may be logged: trimmed, printable ASCII only, bounded in length.
fn request_id(raw: &[u8]) -> String {
    raw.iter()
        .copied()
        .filter(|b| b.is_ascii_graphic())
        .take(MAX_REQUEST_ID)
        .map(char::from)
        .collect()
}

/// Status and reason from a status line alone (the rest of the head was not copied).
fn parse_status_line(buf: &[u8]) -> Option<RespHead> {
    let end = buf.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&buf[..end]).ok()?;
    let rest = line.strip_prefix("HTTP/1.")?.get(2..)?;
    let (code, reason) = rest.split_once(' ').unwrap_or((rest, ""));
    let status: u16 = code.parse().ok().filter(|c| (100..1000).contains(c))?;
    let request_id = buf
        .split(|b| *b == b'\n')
        .find(|l| l.len() > 13 && l[..13].eq_ignore_ascii_case(b"x-request-id:"))
        .map(|l| request_id(&l[13..]));
    Some(RespHead {
        status,
        reason: reason_phrase(reason),
        request_id,
        framing: Framing::UntilOther,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD_MAX: usize = crate::events::HEAD_MAX;

    /// Feeds bytes the way the kernel reports them: full length, head clipped at HEAD_MAX.
    struct Wire {
        conn: Conn,
        stats: ParseStats,
        t: u64,
        out: Vec<Exchange>,
    }

    impl Wire {
        fn new(at_boundary: bool) -> Self {
            Wire {
                conn: Conn::new(1, 1, at_boundary),
                stats: ParseStats::default(),
                t: 0,
                out: Vec::new(),
            }
        }
        fn read(&mut self, bytes: &[u8]) -> u64 {
            self.t += 1000;
            let head = &bytes[..bytes.len().min(HEAD_MAX)];
            self.conn
                .on_ingress(self.t, head, bytes.len() as u64, &mut self.stats);
            self.t
        }
        fn write(&mut self, bytes: &[u8]) -> u64 {
            self.t += 1000;
            let head = &bytes[..bytes.len().min(HEAD_MAX)];
            self.conn.on_egress(
                self.t,
                self.t,
                head,
                bytes.len() as u64,
                &mut self.stats,
                &mut self.out,
            );
            self.t
        }
        fn statuses(&self) -> Vec<(Option<String>, u16)> {
            self.out
                .iter()
                .map(|e| {
                    (
                        e.request.as_ref().map(|r| r.target.clone()),
                        e.response.status,
                    )
                })
                .collect()
        }
    }

    fn post(path: &str, body: &[u8]) -> Vec<u8> {
        let mut v = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        v.extend_from_slice(body);
        v
    }

    fn ok(body: &[u8]) -> Vec<u8> {
        let mut v = format!(
            "HTTP/1.1 200 \r\nx-request-id: abc\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        v.extend_from_slice(body);
        v
    }

    /// A blocking write: its first byte leaves at entry, its last when it returns (R2).
    #[test]
    fn one_blocking_write_starts_at_entry_and_ends_at_return() {
        let mut w = Wire::new(true);
        w.read(&post("/predictions/m", b"x"));
        let resp = ok(&vec![b'b'; 4 << 20]);
        let head = &resp[..HEAD_MAX];
        let mut ex = Vec::new();
        w.conn.on_egress(
            5_000,
            905_000,
            head,
            resp.len() as u64,
            &mut w.stats,
            &mut ex,
        );
        assert_eq!(ex.len(), 1);
        assert_eq!(ex[0].response.start_ns, 5_000);
        assert_eq!(ex[0].response.end_ns, Some(905_000));
    }

    #[test]
    fn keep_alive_sequence_and_latency() {
        let mut w = Wire::new(true);
        for i in 0..3 {
            let done = w.read(&post("/predictions/echo", b"hello"));
            let start = w.write(&ok(b"hello"));
            let ex = &w.out[i];
            let req = ex.request.as_ref().expect("paired");
            assert_eq!(req.complete_ns, done);
            assert_eq!(ex.response.start_ns, start);
            assert_eq!(req.bytes, post("/predictions/echo", b"hello").len() as u64);
            assert_eq!(ex.response.request_id.as_deref(), Some("abc"));
            assert_eq!(ex.response.end_ns, Some(start));
            assert_eq!(ex.response.bytes, ok(b"hello").len() as u64);
        }
        assert_eq!(w.stats, ParseStats::default());
    }

    #[test]
    fn split_head_byte_by_byte() {
        let mut w = Wire::new(true);
        let req = post("/predictions/a", b"xy");
        let mut last = 0;
        for b in &req {
            last = w.read(std::slice::from_ref(b));
        }
        w.write(&ok(b""));
        assert_eq!(w.statuses(), vec![(Some("/predictions/a".into()), 200)]);
        assert_eq!(w.out[0].request.as_ref().map(|r| r.complete_ns), Some(last));
    }

    #[test]
    fn in_flight_until_the_response_ends() {
        let mut w = Wire::new(true);
        assert_eq!(w.conn.in_flight(), 0);
        let mut both = post("/predictions/a", b"1");
        both.extend(post("/predictions/b", b"22"));
        w.read(&both);
        assert_eq!(w.conn.in_flight(), 2);
        // a's head and half its body: still in flight until the last byte.
        let resp = ok(b"0123456789");
        w.write(&resp[..resp.len() - 5]);
        assert_eq!(w.conn.in_flight(), 2);
        w.write(&resp[resp.len() - 5..]);
        assert_eq!(w.conn.in_flight(), 1);
        w.write(&ok(b"22"));
        assert_eq!(w.conn.in_flight(), 0);
        assert_eq!(w.out.len(), 2);
    }

    #[test]
    fn pipelined_pair_in_one_read() {
        let mut w = Wire::new(true);
        let mut both = post("/predictions/a", b"1");
        both.extend(post("/predictions/b", b"22"));
        w.read(&both);
        assert_eq!(w.conn.pending(), 2);
        // Both responses in one write as well.
        let mut resp = ok(b"1");
        resp.extend(ok(b"22"));
        w.write(&resp);
        assert_eq!(
            w.statuses(),
            vec![
                (Some("/predictions/a".into()), 200),
                (Some("/predictions/b".into()), 200)
            ]
        );
    }

    #[test]
    fn large_content_length_body_is_skipped_by_length() {
        let mut w = Wire::new(true);
        let body = vec![b'z'; 1 << 20];
        let req = post("/predictions/big", &body);
        // Netty reads 4096 bytes at a time.
        let mut last = 0;
        for chunk in req.chunks(4096) {
            last = w.read(chunk);
        }
        w.write(&ok(&body));
        w.read(&post("/predictions/next", b""));
        w.write(&ok(b""));
        assert_eq!(
            w.statuses(),
            vec![
                (Some("/predictions/big".into()), 200),
                (Some("/predictions/next".into()), 200)
            ]
        );
        assert_eq!(w.out[0].request.as_ref().map(|r| r.complete_ns), Some(last));
        assert_eq!(w.stats.parse_errors, 0);
    }

    #[test]
    fn chunked_body_ends_at_response() {
        let mut w = Wire::new(true);
        w.read(b"POST /predictions/c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        w.read(b"5\r\nhello\r\n");
        let last = w.read(b"0\r\n\r\n");
        w.write(&ok(b"hello"));
        w.read(&post("/predictions/d", b""));
        w.write(&ok(b""));
        assert_eq!(
            w.statuses(),
            vec![
                (Some("/predictions/c".into()), 200),
                (Some("/predictions/d".into()), 200)
            ]
        );
        assert_eq!(w.out[0].request.as_ref().map(|r| r.complete_ns), Some(last));
    }

    #[test]
    fn expect_continue_and_early_413() {
        let mut w = Wire::new(true);
        w.read(
            b"POST /predictions/e HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
        );
        w.write(b"HTTP/1.1 100 Continue\r\n\r\n");
        w.read(b"abc");
        w.write(&ok(b"abc"));
        assert_eq!(w.statuses(), vec![(Some("/predictions/e".into()), 200)]);

        let mut w = Wire::new(true);
        w.read(b"POST /predictions/e HTTP/1.1\r\nContent-Length: 7000000\r\n\r\n");
        w.write(b"HTTP/1.1 413 Request Entity Too Large\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(w.statuses(), vec![(Some("/predictions/e".into()), 413)]);
        assert!(w.out[0].response.request_id.is_none());
        assert_eq!(w.out[0].response.reason, "Request Entity Too Large");
    }

    #[test]
    fn malformed_request_still_counts_its_response() {
        let mut w = Wire::new(true);
        w.read(b"GARBAGE\r\n\r\n");
        w.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        assert_eq!(w.statuses(), vec![(None, 400)]);
        assert_eq!(w.stats.parse_errors, 1);
        assert_eq!(
            w.stats.unmatched_responses, 0,
            "desynced: not counted as unmatched"
        );
    }

    #[test]
    fn writev_header_then_body_and_multi_write_response() {
        let mut w = Wire::new(true);
        w.read(&post("/predictions/m", b""));
        let head = b"HTTP/1.1 200 \r\ncontent-length: 10\r\n\r\n";
        w.write(head);
        w.write(b"01234");
        w.write(b"56789");
        w.read(&post("/predictions/n", b""));
        w.write(&ok(b""));
        assert_eq!(
            w.statuses(),
            vec![
                (Some("/predictions/m".into()), 200),
                (Some("/predictions/n".into()), 200)
            ]
        );
    }

    #[test]
    fn head_longer_than_copy_ends_at_response() {
        let mut w = Wire::new(true);
        let mut req = b"POST /predictions/long HTTP/1.1\r\n".to_vec();
        req.extend(format!("X-Pad: {}\r\n", "p".repeat(2000)).as_bytes());
        req.extend(b"Content-Length: 2\r\n\r\nhi");
        w.read(&req);
        w.write(&ok(b"hi"));
        w.read(&post("/predictions/after", b""));
        w.write(&ok(b""));
        assert_eq!(
            w.statuses(),
            vec![
                (Some("/predictions/long".into()), 200),
                (Some("/predictions/after".into()), 200)
            ]
        );
    }

    #[test]
    fn mid_stream_pickup_waits_for_request_boundary() {
        let mut w = Wire::new(false);
        w.read(b"tail of an old body");
        w.write(b"...rest of an old response");
        w.write(&ok(b""));
        assert!(w.out.is_empty());
        w.read(&post("/predictions/p", b""));
        w.write(&ok(b""));
        assert_eq!(w.statuses(), vec![(Some("/predictions/p".into()), 200)]);
        assert_eq!(w.stats, ParseStats::default());
    }

    #[test]
    fn chunked_and_close_delimited_responses() {
        let mut w = Wire::new(true);
        w.read(&post("/a", b""));
        w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n");
        w.write(b"5\r\nhello\r\n");
        w.write(b"0\r\n\r\n");
        w.read(&post("/b", b""));
        w.write(b"HTTP/1.1 201 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n");
        w.read(&post("/c", b""));
        w.write(&ok(b""));
        assert_eq!(
            w.statuses(),
            vec![
                (Some("/a".into()), 200),
                (Some("/b".into()), 201),
                (Some("/c".into()), 200)
            ]
        );
    }

    #[test]
    fn junk_is_counted_not_fatal() {
        let mut w = Wire::new(true);
        w.read(&[0xff, 0x00, 0x13, 0x37]);
        w.write(b"\x00\x01junk");
        assert_eq!(
            w.stats.parse_errors, 2,
            "one for the request side, one for the response side"
        );
        w.read(&post("/predictions/ok", b""));
        w.write(&ok(b""));
        assert_eq!(w.statuses(), vec![(Some("/predictions/ok".into()), 200)]);
    }

    #[test]
    fn contradictory_content_length_is_invalid() {
        let mut w = Wire::new(true);
        w.read(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab");
        assert_eq!(w.stats.parse_errors, 1);
        assert_eq!(w.conn.pending(), 0);
    }

    #[test]
    fn close_ends_a_close_delimited_or_cut_response() {
        // HTTP/1.0-style response without Content-Length: ends at close, at its last write.
        let mut w = Wire::new(true);
        w.read(b"GET /old HTTP/1.0\r\n\r\n");
        w.write(b"HTTP/1.0 200 OK\r\n\r\n");
        let last = w.write(b"body bytes");
        assert!(w.out.is_empty(), "not over until the close");
        let ex = w.conn.on_close().expect("flushed at close");
        assert_eq!(ex.response.end_ns, Some(last));
        assert_eq!(ex.response.bytes, 19 + 10);

        // A response cut short by a reset still counts (its status was sent), with no end time.
        let mut w = Wire::new(true);
        w.read(&post("/predictions/big", b""));
        w.write(b"HTTP/1.1 200 \r\ncontent-length: 1000000\r\n\r\npartial");
        let ex = w.conn.on_close().expect("flushed at close");
        assert_eq!(ex.response.status, 200);
        assert_eq!(ex.response.end_ns, None);
        assert!(w.conn.on_close().is_none(), "reported once");
    }

    #[test]
    fn pipelining_without_reading_is_bounded() {
        let mut w = Wire::new(true);
        let one = b"GET /p HTTP/1.1\r\n\r\n";
        for _ in 0..MAX_PENDING + 10 {
            w.read(one);
        }
        assert_eq!(w.conn.pending(), MAX_PENDING);
        assert_eq!(w.stats.dropped_requests, 10);
    }

    #[test]
    fn pipelined_burst_beyond_the_copy_counts_unseen_requests_as_unmatched() {
        // Wherever the copy limit cuts the burst (in a request line, in a header, between requests),
        // every response counts once: attributed if its request was seen, else unmatched.
        for pad in 0..64 {
            let mut w = Wire::new(true);
            let path = format!("/predictions/burst?pad={}", "p".repeat(pad));
            let burst: Vec<u8> = (0..40)
                .flat_map(|_| format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes())
                .collect();
            w.read(&burst);
            for _ in 0..40 {
                w.write(&ok(b""));
            }
            let seen = w.out.iter().filter(|e| e.request.is_some()).count();
            assert_eq!(w.out.len(), 40, "pad {pad}: every response counts");
            assert!(
                seen >= 3,
                "pad {pad}: the heads within the copy are attributed"
            );
            assert_eq!(
                w.stats,
                ParseStats {
                    unmatched_responses: 40 - seen as u64,
                    ..ParseStats::default()
                },
                "pad {pad}"
            );
            // The next request, read on its own, is attributed again.
            w.read(&post("/predictions/after", b""));
            w.write(&ok(b""));
            assert_eq!(
                w.out
                    .last()
                    .and_then(|e| e.request.as_ref())
                    .map(|r| r.target.as_str()),
                Some("/predictions/after")
            );
        }
    }

    #[test]
    fn streamed_chunks_end_at_the_terminating_write() {
        let mut w = Wire::new(true);
        w.read(&post("/predictions/stream", b""));
        w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n");
        w.write(&[b"10000\r\n".as_slice(), &[b'x'; 0x10000], b"\r\n"].concat());
        w.write(b"5\r\nhello\r\n");
        assert!(w.out.is_empty(), "chunks still coming");
        let last = w.write(b"0\r\n\r\n");
        // Reported at once, on an idle keep-alive connection, with its end time.
        assert_eq!(
            w.statuses(),
            vec![(Some("/predictions/stream".into()), 200)]
        );
        assert_eq!(w.out[0].response.end_ns, Some(last));
        w.read(&post("/predictions/next", b""));
        w.write(&ok(b""));
        assert_eq!(w.out.len(), 2);
        assert_eq!(w.stats, ParseStats::default());

        // A close-delimited body that happens to end like a last chunk is not cut short.
        let mut w = Wire::new(true);
        w.read(b"GET /old HTTP/1.0\r\n\r\n");
        w.write(b"HTTP/1.0 200 OK\r\n\r\n");
        w.write(b"text 0\r\n\r\n");
        assert!(w.out.is_empty());
        assert!(w.conn.on_close().is_some());
    }

    #[test]
    fn head_request_response_has_no_body() {
        let mut w = Wire::new(true);
        w.read(b"HEAD /x HTTP/1.1\r\n\r\n");
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n");
        w.read(b"GET /y HTTP/1.1\r\n\r\n");
        w.write(&ok(b""));
        assert_eq!(
            w.statuses(),
            vec![(Some("/x".into()), 200), (Some("/y".into()), 200)]
        );
    }
}
