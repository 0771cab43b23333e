//! The agent's side of connection state: one [`Conn`] parser per kernel connection id.

use super::{Conn, Exchange, ParseStats};
use crate::{
    FastMap,
    events::{Direction, Event, FAMILY_UNIX, Kind},
    otf,
    recent_ids::RecentIds,
};

/// Most worker dispatches remembered while their HTTP responses are pending.
pub const MAX_DISPATCHED: usize = 65_536;

/// Most connections tracked at once; past it the least recently active connection is evicted (and
/// counted), so a flood of connections cannot grow the agent without bound. Least recently *active*,
/// like the kernel's LRU `conns` map, not oldest: a pooled keep-alive connection that lives for hours
/// and is busy must not be the first to go.
pub const MAX_CONNS: usize = 65_536;

#[derive(Debug, Default)]
pub struct ConnTable {
    conns: FastMap<u64, Conn>,
    /// Request id → kernel time its inference frame was written to a TorchServe worker, until its
    /// HTTP response is seen; at most [`MAX_DISPATCHED`] (ids whose response never comes, e.g. on a
    /// connection adopted mid-stream, age out).
    dispatched: RecentIds<u64, MAX_DISPATCHED>,
    pub stats: ParseStats,
    /// A batch record came: the kernel walks every inference frame (bpf_loop), so the frames' copied
    /// heads need not be parsed for their ids too (kernels without bpf_loop send none).
    kernel_walks_frames: bool,
    /// Connections dropped to stay under [`MAX_CONNS`].
    pub evicted: u64,
}

impl ConnTable {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Requests in flight on every traced connection ([`Conn::in_flight`]).
    pub fn in_flight(&self) -> usize {
        self.conns.values().map(Conn::in_flight).sum()
    }

    /// Applies one kernel record; appends the exchanges it completed to `out`.
    pub fn apply(&mut self, ev: &Event<'_>, out: &mut Vec<Exchange>) {
        if ev.family == FAMILY_UNIX {
            // Frontend→worker socket: not HTTP. Only the inference frames the frontend writes matter:
            // the kernel's walk of each (every id of a batch), and the frame's own head (its first
            // ids; what is left where the kernel cannot walk frames).
            if ev.kind == Kind::Batch
                && let Some(batch) = ev.batch()
            {
                self.kernel_walks_frames = true;
                for id in batch.ids {
                    self.note_dispatch(id, ev.ts_ns);
                }
            } else if ev.kind == Kind::Data
                && ev.dir == Direction::Egress
                && !self.kernel_walks_frames
                && let Some(ids) = otf::inference_request_ids(ev.head)
            {
                for id in ids {
                    self.note_dispatch(&id, ev.ts_ns);
                }
            }
            return;
        }
        match ev.kind {
            // Process events are discovery's; batch records come from unix sockets only (above).
            Kind::Exec | Kind::Exit | Kind::Listen | Kind::Batch => {}
            Kind::Open => {
                self.make_room();
                // `accepted`: seen at accept(), so the stream starts at a message boundary; otherwise
                // picked up mid-stream (open before the agent started, or evicted from the kernel map).
                let mut conn = Conn::new(ev.tgid, ev.conn_id, ev.accepted);
                conn.set_peer(ev.peer());
                self.conns.insert(ev.conn_id, conn);
            }
            // A response still being written when the connection closes (close-delimited, or cut
            // short by a client's reset) ends here: the server sent its status, so it counts.
            Kind::Close => out.extend(
                self.conns
                    .remove(&ev.conn_id)
                    .and_then(|mut conn| conn.on_close()),
            ),
            Kind::Data => {
                if !self.conns.contains_key(&ev.conn_id) {
                    self.make_room();
                }
                // Data of a connection this table does not hold (evicted here, or its open record was
                // lost) may fall anywhere in the stream, whatever the kernel saw at accept(): it is
                // picked up at its next request boundary, never parsed from the middle of a body.
                let conn = self
                    .conns
                    .entry(ev.conn_id)
                    .or_insert_with(|| Conn::new(ev.tgid, ev.conn_id, false));
                // The kernel's framing (http_framing) and the parser's read the same head; should
                // they ever disagree, the parser degrades as for an unseen message and this says so.
                if ev.body && conn.expects_head(ev.dir) {
                    self.stats.framing_mismatches += 1;
                }
                match ev.dir {
                    Direction::Ingress => {
                        conn.on_ingress(ev.ts_ns, ev.head, ev.len, &mut self.stats);
                    }
                    Direction::Egress => {
                        conn.on_egress(ev.ts_ns, ev.end_ns, ev.head, ev.len, &mut self.stats, out)
                    }
                }
            }
        }
    }

    fn note_dispatch(&mut self, id: &str, ts_ns: u64) {
        self.dispatched.insert(id, ts_ns);
    }

    /// When the inference frame of request `id` went to its worker (once: the entry is consumed).
    pub fn take_dispatch(&mut self, id: &str) -> Option<u64> {
        self.dispatched.take(id)
    }

    /// Forgets every connection of a process that is no longer traced.
    pub fn forget_process(&mut self, tgid: u32) {
        self.conns.retain(|_, c| c.tgid() != tgid);
    }

    fn make_room(&mut self) {
        if self.conns.len() < MAX_CONNS {
            return;
        }
        // Least recently active first; among equals (never active) the oldest id.
        let victim = self
            .conns
            .iter()
            .min_by_key(|(id, c)| (c.last_active_ns(), **id))
            .map(|(id, _)| *id);
        if let Some(conn) = victim.and_then(|id| self.conns.remove(&id)) {
            self.evicted += 1;
            // Their responses can no longer be paired: counted, not silently lost.
            self.stats.dropped_requests += conn.pending() as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{RawHeader, encode_for_test};

    fn rec(kind: u8, dir: u8, conn: u64, accepted: u8, data: &[u8]) -> Vec<u8> {
        rec_at(1, kind, dir, conn, accepted, data)
    }

    fn header(ts_ns: u64, kind: u8, dir: u8, conn: u64, accepted: u8) -> RawHeader {
        RawHeader {
            ts_ns,
            conn_id: conn,
            tgid: 7,
            kind,
            dir,
            accepted,
            ..Default::default()
        }
    }

    fn rec_at(ts_ns: u64, kind: u8, dir: u8, conn: u64, accepted: u8, data: &[u8]) -> Vec<u8> {
        let len = data.len() as u64;
        encode_for_test(
            RawHeader {
                len,
                ..header(ts_ns, kind, dir, conn, accepted)
            },
            data,
        )
    }

    fn apply(t: &mut ConnTable, bytes: &[u8]) -> Vec<Exchange> {
        let mut out = Vec::new();
        t.apply(&Event::decode(bytes).expect("valid record"), &mut out);
        out
    }

    #[test]
    fn fd_reuse_gets_fresh_state() {
        let mut t = ConnTable::new();
        apply(&mut t, &rec(2, 0, 1, 1, b""));
        // Old connection dies with half a request head.
        apply(
            &mut t,
            &rec(1, 0, 1, 1, b"POST /predictions/old HTTP/1.1\r\nContent-Le"),
        );
        apply(&mut t, &rec(3, 0, 1, 1, b""));
        assert!(t.is_empty());
        // Same fd, new connection id from the kernel.
        apply(&mut t, &rec(2, 0, 2, 1, b""));
        apply(&mut t, &rec(1, 0, 2, 1, b"GET /ping HTTP/1.1\r\n\r\n"));
        let ex = apply(
            &mut t,
            &rec(1, 1, 2, 1, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
        );
        assert_eq!(ex.len(), 1);
        assert_eq!(
            ex[0].request.as_ref().map(|r| r.target.as_str()),
            Some("/ping")
        );
        assert_eq!(t.stats, ParseStats::default());
    }

    #[test]
    fn connection_picked_up_mid_stream_waits_for_a_request_boundary() {
        let mut t = ConnTable::new();
        // The kernel adopts a connection at its first traced syscall (accepted = 0): here the response
        // to a request the agent never saw, then the tail of an upload it never saw the head of.
        apply(&mut t, &rec(2, 1, 1, 0, b""));
        let ex = apply(
            &mut t,
            &rec(1, 1, 1, 0, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
        );
        assert!(
            ex.is_empty(),
            "a response to an unseen request is not counted"
        );
        apply(&mut t, &rec(1, 0, 1, 0, b"uuuuuuuu tail of a body"));
        apply(
            &mut t,
            &rec(1, 0, 1, 0, b"GET /predictions/next HTTP/1.1\r\n\r\n"),
        );
        let ex = apply(
            &mut t,
            &rec(1, 1, 1, 0, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
        );
        assert_eq!(ex.len(), 1);
        assert_eq!(
            ex[0].request.as_ref().map(|r| r.target.as_str()),
            Some("/predictions/next")
        );
        assert_eq!(t.stats, ParseStats::default());
    }

    #[test]
    fn close_reports_the_response_it_ends() {
        let mut t = ConnTable::new();
        apply(&mut t, &rec(2, 0, 1, 1, b""));
        apply(
            &mut t,
            &rec(1, 0, 1, 1, b"GET /predictions/cut HTTP/1.1\r\n\r\n"),
        );
        // The client reset after the first bytes of a large response.
        let ex = apply(
            &mut t,
            &rec(
                1,
                1,
                1,
                1,
                b"HTTP/1.1 200 OK\r\ncontent-length: 8388608\r\n\r\nxxxx",
            ),
        );
        assert!(ex.is_empty(), "not over until the close");
        let ex = apply(&mut t, &rec(3, 0, 1, 1, b""));
        assert_eq!(ex.len(), 1);
        assert_eq!(ex[0].response.status, 200);
        assert_eq!(ex[0].response.end_ns, None, "cut short");
        assert!(t.is_empty());
    }

    #[test]
    fn eviction_takes_the_least_recently_active_connection() {
        let mut t = ConnTable::new();
        let n = MAX_CONNS as u64;
        for id in 1..=n {
            apply(&mut t, &rec_at(id, 2, 0, id, 1, b""));
            apply(&mut t, &rec_at(id, 1, 0, id, 1, b"GET /a HTTP/1.1\r\n\r\n"));
        }
        // The oldest connection (a pooled keep-alive one) is busy again, after all the others.
        apply(
            &mut t,
            &rec_at(
                n + 1,
                1,
                1,
                1,
                1,
                b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            ),
        );
        apply(&mut t, &rec_at(n + 2, 2, 0, n + 1, 1, b""));
        assert_eq!(t.len(), MAX_CONNS);
        assert_eq!(t.evicted, 1);
        assert!(t.conns.contains_key(&1), "the busy old connection stays");
        assert!(
            !t.conns.contains_key(&2),
            "the least recently active one goes"
        );
        assert_eq!(
            t.stats.dropped_requests, 1,
            "its unanswered request is counted as dropped"
        );
    }

    #[test]
    fn data_of_an_unknown_connection_waits_for_a_request_boundary() {
        let mut t = ConnTable::new();
        // No open record (evicted, or lost), though the kernel saw the accept: the first bytes are
        // the middle of a body, which must not be taken for a request head.
        apply(&mut t, &rec(1, 0, 9, 1, b"tail of a request body\r\n\r\n"));
        apply(
            &mut t,
            &rec(1, 0, 9, 1, b"GET /predictions/next HTTP/1.1\r\n\r\n"),
        );
        let ex = apply(
            &mut t,
            &rec(1, 1, 9, 1, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
        );
        assert_eq!(ex.len(), 1);
        assert_eq!(
            ex[0].request.as_ref().map(|r| r.target.as_str()),
            Some("/predictions/next")
        );
        assert_eq!(t.stats, ParseStats::default());
    }

    /// A data record the kernel sent as body (`SS_FLAG_BODY`): `len` bytes, none copied.
    fn body_rec(dir: u8, conn: u64, len: u64) -> Vec<u8> {
        encode_for_test(
            RawHeader {
                len,
                flags: crate::events::FLAG_BODY,
                ..header(1, 1, dir, conn, 1)
            },
            b"",
        )
    }

    #[test]
    fn kernel_body_records_agree_with_the_parser_or_are_counted() {
        let mut t = ConnTable::new();
        apply(&mut t, &rec(2, 0, 1, 1, b""));
        // The kernel framed a 10-byte upload from its head: the body's read comes with no bytes.
        apply(
            &mut t,
            &rec(
                1,
                0,
                1,
                1,
                b"POST /predictions/m HTTP/1.1\r\nContent-Length: 10\r\n\r\n",
            ),
        );
        apply(&mut t, &body_rec(0, 1, 10));
        apply(
            &mut t,
            &rec(1, 1, 1, 1, b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"),
        );
        let ex = apply(&mut t, &body_rec(1, 1, 5));
        assert_eq!(ex.len(), 1, "the response ends with its counted-down body");
        assert_eq!(ex[0].request.as_ref().map(|r| r.bytes), Some(52 + 10));
        assert_eq!(t.stats, ParseStats::default(), "kernel and parser agree");

        // Body where the parser expects the next request's head, then the next response's: the two
        // disagree, and it shows.
        apply(&mut t, &body_rec(0, 1, 7));
        apply(&mut t, &body_rec(1, 1, 7));
        assert_eq!(t.stats.framing_mismatches, 2);
        // On a connection whose start the parser never saw, body is what it expects to skip.
        apply(&mut t, &body_rec(0, 2, 7));
        assert_eq!(t.stats.framing_mismatches, 2);
    }

    #[test]
    fn forget_process_drops_its_connections() {
        let mut t = ConnTable::new();
        apply(&mut t, &rec(2, 0, 1, 1, b""));
        apply(&mut t, &rec(2, 0, 2, 1, b""));
        t.forget_process(7);
        assert!(t.is_empty());
    }
}
