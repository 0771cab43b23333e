//! Property tests of the input path: whatever bytes arrive, in whatever pieces, the decoder, the HTTP
//! parser and the router never panic; and a stream of valid HTTP/1.1 exchanges cut at arbitrary points
//! (as the kernel reports them: full length, head clipped at HEAD_MAX) is reconstructed exactly.
//!
//! CI runs the default case count; `PROPTEST_CASES=100000 cargo test -p servescope --test parser_props`
//! is the long run.

use proptest::prelude::*;
use servescope::{
    events::{Event, HEAD_MAX, RawHeader, encode_for_test},
    http::{Conn, ParseStats},
    routing::route,
};

/// Feeds `bytes` to the parser as one syscall, clipping the copied head like the kernel does.
fn feed(conn: &mut Conn, stats: &mut ParseStats, t: u64, ingress: bool, bytes: &[u8]) -> usize {
    let head = &bytes[..bytes.len().min(HEAD_MAX)];
    if ingress {
        conn.on_ingress(t, head, bytes.len() as u64, stats);
        0
    } else {
        let mut out = Vec::new();
        conn.on_egress(t, t, head, bytes.len() as u64, stats, &mut out);
        out.len()
    }
}

/// Cuts `bytes` into pieces at the given fractions.
fn split<'a>(bytes: &'a [u8], cuts: &[u16]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = cuts
        .iter()
        .map(|c| usize::from(*c) * bytes.len() / usize::from(u16::MAX))
        .collect();
    points.push(0);
    points.push(bytes.len());
    points.sort_unstable();
    points.dedup();
    points
        .windows(2)
        .map(|w| &bytes[w[0]..w[1]])
        .filter(|p| !p.is_empty())
        .collect()
}

#[derive(Clone, Debug)]
struct Req {
    method: &'static str,
    path: String,
    body: usize,
    chunked: bool,
    pad_headers: usize,
}

fn req_strategy() -> impl Strategy<Value = Req> {
    (
        prop::sample::select(vec!["GET", "POST", "PUT", "DELETE"]),
        "/[a-z]{1,12}(/[a-z0-9.]{1,8}){0,3}",
        prop_oneof![Just(0usize), 1usize..64, 64usize..20_000],
        any::<bool>(),
        prop_oneof![Just(0usize), 0usize..3000],
    )
        .prop_map(|(method, path, body, chunked, pad_headers)| Req {
            method,
            path,
            body,
            chunked,
            pad_headers,
        })
}

fn encode(r: &Req) -> Vec<u8> {
    let mut v = format!("{} {} HTTP/1.1\r\nHost: t\r\n", r.method, r.path).into_bytes();
    if r.pad_headers > 0 {
        v.extend(format!("X-Pad: {}\r\n", "p".repeat(r.pad_headers)).as_bytes());
    }
    if r.chunked {
        v.extend(b"Transfer-Encoding: chunked\r\n\r\n");
        if r.body > 0 {
            v.extend(format!("{:x}\r\n", r.body).as_bytes());
            v.extend(std::iter::repeat_n(b'c', r.body));
            v.extend(b"\r\n");
        }
        v.extend(b"0\r\n\r\n");
    } else {
        v.extend(format!("Content-Length: {}\r\n\r\n", r.body).as_bytes());
        v.extend(std::iter::repeat_n(b'b', r.body));
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(
        chunks in prop::collection::vec((any::<bool>(), prop::collection::vec(any::<u8>(), 0..700), 0u64..100_000), 0..40),
        at_boundary in any::<bool>(),
    ) {
        let mut conn = Conn::new(1, 1, at_boundary);
        let mut stats = ParseStats::default();
        for (i, (ingress, bytes, extra)) in chunks.iter().enumerate() {
            let head = &bytes[..bytes.len().min(HEAD_MAX)];
            let len = bytes.len() as u64 + extra;
            if *ingress {
                conn.on_ingress(i as u64, head, len, &mut stats);
            } else {
                conn.on_egress(i as u64, i as u64, head, len, &mut stats, &mut Vec::new());
            }
        }
        let _ = conn.on_close();
    }

    #[test]
    fn http_looking_junk_never_panics(
        pieces in prop::collection::vec(prop_oneof![
            Just(b"GET / HTTP/1.1\r\n".to_vec()),
            Just(b"HTTP/1.1 200 OK\r\n".to_vec()),
            Just(b"Content-Length: 18446744073709551615\r\n".to_vec()),
            Just(b"Content-Length: -1\r\n".to_vec()),
            Just(b"Transfer-Encoding: chunked\r\n".to_vec()),
            Just(b"\r\n".to_vec()),
            Just(b"ffffffffffffffffff\r\n".to_vec()),
            prop::collection::vec(any::<u8>(), 0..40),
        ], 0..30),
        dirs in prop::collection::vec(any::<bool>(), 30),
    ) {
        let mut conn = Conn::new(1, 1, true);
        let mut stats = ParseStats::default();
        for (i, p) in pieces.iter().enumerate() {
            feed(&mut conn, &mut stats, i as u64, dirs[i % dirs.len()], p);
        }
        let _ = conn.on_close();
    }

    #[test]
    fn decoder_and_router_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..700), target in ".{0,300}") {
        if let Ok(ev) = Event::decode(&bytes) {
            let _ = ev.batch();
        }
        let _ = route(&target);
    }

    /// The kernel's batch records with any payload: decoded without panic, every id inside the
    /// record's bytes.
    #[test]
    fn batch_records_never_panic(payload in prop::collection::vec(any::<u8>(), 0..4200)) {
        let h = RawHeader { kind: 7, dir: 1, ..Default::default() };
        let rec = encode_for_test(h, &payload);
        let ev = Event::decode(&rec).expect("a well-framed record");
        if let Some(b) = ev.batch() {
            let bytes: usize = b.ids.iter().map(|i| i.len() + 1).sum();
            prop_assert!(bytes + 8 <= ev.head.len());
        }
    }

    /// Keep-alive stream of valid requests, each answered, cut into reads at random points: every
    /// exchange is reconstructed, in order, with its path; nothing is counted as a parse error.
    #[test]
    fn valid_streams_are_reconstructed_exactly(
        reqs in prop::collection::vec(req_strategy(), 1..12),
        cuts in prop::collection::vec(prop::collection::vec(any::<u16>(), 0..6), 12),
        resp_body in prop::collection::vec(0usize..10_000, 12),
    ) {
        let mut conn = Conn::new(1, 1, true);
        let mut stats = ParseStats::default();
        let mut t = 0;
        let mut got = 0;
        for (i, r) in reqs.iter().enumerate() {
            let bytes = encode(r);
            for piece in split(&bytes, &cuts[i]) {
                t += 1;
                feed(&mut conn, &mut stats, t, true, piece);
            }
            let mut resp = format!("HTTP/1.1 200 \r\ncontent-length: {}\r\n\r\n", resp_body[i]).into_bytes();
            resp.extend(std::iter::repeat_n(b'r', resp_body[i]));
            for piece in split(&resp, &cuts[(i + 1) % cuts.len()]) {
                t += 1;
                got += feed(&mut conn, &mut stats, t, false, piece);
            }
        }
        prop_assert_eq!(got, reqs.len());
        prop_assert_eq!(stats, ParseStats::default());
    }

    /// Pipelined: all requests in one burst (cut anywhere), then all responses: FIFO pairing holds.
    #[test]
    fn pipelined_streams_pair_in_order(
        reqs in prop::collection::vec(req_strategy().prop_filter("framed", |r| !r.chunked && r.pad_headers < 200), 1..8),
        cuts in prop::collection::vec(any::<u16>(), 0..10),
    ) {
        let mut conn = Conn::new(1, 1, true);
        let mut stats = ParseStats::default();
        let burst: Vec<u8> = reqs.iter().flat_map(encode).collect();
        // Pieces are at most HEAD_MAX long so every request head is seen (the documented rule: heads
        // beyond the copied bytes of one syscall cannot be framed).
        let mut t = 0;
        for piece in split(&burst, &cuts) {
            for small in piece.chunks(HEAD_MAX) {
                t += 1;
                feed(&mut conn, &mut stats, t, true, small);
            }
        }
        prop_assert_eq!(conn.pending(), reqs.len());
        let mut exchanges = Vec::new();
        for _ in &reqs {
            t += 1;
            let resp = b"HTTP/1.1 200 \r\ncontent-length: 2\r\n\r\nok";
            conn.on_egress(t, t, resp, resp.len() as u64, &mut stats, &mut exchanges);
        }
        let paths: Vec<String> = exchanges.iter().filter_map(|e| e.request.as_ref().map(|r| r.target.clone())).collect();
        let want: Vec<String> = reqs.iter().map(|r| r.path.clone()).collect();
        prop_assert_eq!(paths, want);
        prop_assert_eq!(stats, ParseStats::default());
    }
}
