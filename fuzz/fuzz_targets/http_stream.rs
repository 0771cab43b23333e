//! The per-connection HTTP/1.x stream parser, fed syscalls as the kernel reports them.
//!
//! Input: records of `op: u8, n: u16 LE, total: u32 LE, n bytes`. `op & 1`: 0 = the server read the
//! bytes, 1 = it wrote them; `op & 2`: the connection closes after this record. `total` is the
//! syscall's full length (at least `n`; `u32::MAX` stands for `u64::MAX`, an absurd kernel length);
//! the parser sees only the first `HEAD_MAX` bytes, as the kernel copies them. Invariants: no panic,
//! at most `MAX_PENDING` requests wait, every exchange's times run forward.

#![no_main]

use libfuzzer_sys::fuzz_target;
use servescope::{
    events::HEAD_MAX,
    http::{Conn, Exchange, ParseStats, parser::MAX_PENDING},
};

fn check(ex: &Exchange) {
    if let Some(r) = &ex.request {
        assert!(r.first_byte_ns <= r.complete_ns, "{ex:?}");
    }
    if let Some(end) = ex.response.end_ns {
        assert!(ex.response.start_ns <= end, "{ex:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let mut conn = Conn::new(1, 1, data.first().is_some_and(|b| b & 4 == 0));
    let mut stats = ParseStats::default();
    let mut rest = data;
    let mut ts = 1_000u64;
    while rest.len() >= 7 {
        let op = rest[0];
        let n = usize::from(u16::from_le_bytes([rest[1], rest[2]]));
        let total = u32::from_le_bytes([rest[3], rest[4], rest[5], rest[6]]);
        rest = &rest[7..];
        let bytes = &rest[..n.min(rest.len())];
        rest = &rest[bytes.len()..];
        let len = if total == u32::MAX {
            u64::MAX
        } else {
            u64::from(total).max(bytes.len() as u64)
        };
        let head = &bytes[..bytes.len().min(HEAD_MAX)];
        ts += 1_000;
        if op & 1 == 0 {
            conn.on_ingress(ts, head, len, &mut stats);
        } else {
            conn.on_egress(ts, head, len, &mut stats)
                .iter()
                .for_each(check);
        }
        assert!(conn.pending() <= MAX_PENDING);
        if op & 2 != 0 {
            if let Some(ex) = conn.on_close() {
                check(&ex);
            }
            conn = Conn::new(1, 1, true);
        }
    }
    if let Some(ex) = conn.on_close() {
        check(&ex);
    }
});
