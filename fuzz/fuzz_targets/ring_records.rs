//! Ring-buffer records as the kernel sends them: decoded (`events::Event::decode`, which must reject
//! what does not fit) and applied to the connection table (HTTP parser, OTF frames on Unix sockets,
//! connection eviction).
//!
//! Input: records of `size: u16 LE, size bytes`, each one raw `struct ss_event`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use servescope::{
    events::{BATCH_DATA_MAX, Event, HEAD_MAX, Kind},
    http::{ConnTable, conntrack::MAX_CONNS},
};

fuzz_target!(|data: &[u8]| {
    let mut table = ConnTable::new();
    let mut rest = data;
    while rest.len() >= 2 {
        let size = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        rest = &rest[2..];
        let record = &rest[..size.min(rest.len())];
        rest = &rest[record.len()..];
        let Ok(ev) = Event::decode(record) else {
            continue;
        };
        let max = if ev.kind == Kind::Batch {
            BATCH_DATA_MAX
        } else {
            HEAD_MAX
        };
        assert!(ev.head.len() <= max && ev.head.len() <= record.len());
        let _ = ev.peer();
        let _ = ev.batch();
        let _ = table.apply(&ev);
        assert!(table.len() <= MAX_CONNS);
    }
});
