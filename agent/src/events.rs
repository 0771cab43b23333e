//! The kernel/user ABI: `#[repr(C)]` mirror of `ebpf/include/events.h`, and the decoding of one
//! ring-buffer record into a borrowed [`Event`].

use std::mem::{offset_of, size_of};

use thiserror::Error;

/// `SS_HEAD_MAX`: bytes of each syscall buffer the kernel copies.
pub const HEAD_MAX: usize = 512;
/// `SS_BATCH_DATA_MAX`: data bytes of a batch record (its ids are longer than a syscall head).
pub const BATCH_DATA_MAX: usize = 4096;
/// `SS_BATCH_MAX_IDS` / `SS_BATCH_ID_MAX`: ids a batch record keeps, and the longest kept.
pub const BATCH_MAX_IDS: usize = 64;
pub const BATCH_ID_MAX: usize = 63;

/// `struct ss_event` without its data array: the fixed part of every record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawHeader {
    pub ts_ns: u64,
    pub conn_id: u64,
    pub len: u64,
    pub tgid: u32,
    pub tid: u32,
    pub fd: i32,
    pub head_len: u16,
    pub kind: u8,
    pub dir: u8,
    pub syscall: u8,
    pub family: u8,
    pub accepted: u8,
    pub flags: u8,
    pub busy_us: u32,
}

/// `struct ss_event`: the largest record the kernel can send.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RawEvent {
    pub header: RawHeader,
    pub data: [u8; HEAD_MAX],
}

const _: () = assert!(size_of::<RawHeader>() == 48);
const _: () = assert!(size_of::<RawEvent>() == 48 + HEAD_MAX);
const _: () = assert!(offset_of!(RawHeader, ts_ns) == 0);
const _: () = assert!(offset_of!(RawHeader, conn_id) == 8);
const _: () = assert!(offset_of!(RawHeader, len) == 16);
const _: () = assert!(offset_of!(RawHeader, tgid) == 24);
const _: () = assert!(offset_of!(RawHeader, tid) == 28);
const _: () = assert!(offset_of!(RawHeader, fd) == 32);
const _: () = assert!(offset_of!(RawHeader, head_len) == 36);
const _: () = assert!(offset_of!(RawHeader, kind) == 38);
const _: () = assert!(offset_of!(RawHeader, dir) == 39);
const _: () = assert!(offset_of!(RawHeader, syscall) == 40);
const _: () = assert!(offset_of!(RawHeader, family) == 41);
const _: () = assert!(offset_of!(RawHeader, accepted) == 42);
const _: () = assert!(offset_of!(RawHeader, flags) == 43);
const _: () = assert!(offset_of!(RawHeader, busy_us) == 44);
const _: () = assert!(offset_of!(RawEvent, data) == 48);

/// `struct ss_conn_key`: key of the kernel's connection map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnKey {
    pub tgid: u32,
    pub fd: i32,
}

const _: () = assert!(size_of::<ConnKey>() == 8);
const _: () = assert!(offset_of!(ConnKey, fd) == 4);

// SAFETY: ConnKey is repr(C), made of integers only, with no padding: every bit pattern is valid.
unsafe impl aya::Pod for ConnKey {}

/// `struct ss_peer`: the client's address, carried by open records.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawPeer {
    pub family: u16,
    pub port: u16,
    pub addr: [u8; 16],
}

const _: () = assert!(size_of::<RawPeer>() == 20);
const _: () = assert!(offset_of!(RawPeer, port) == 2);
const _: () = assert!(offset_of!(RawPeer, addr) == 4);

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// `enum ss_event_kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Data,
    Open,
    Close,
    /// A process exec'd (discovery: is it a TorchServe frontend?).
    Exec,
    /// A traced process's main thread exited.
    Exit,
    /// A process called listen(); `len` is the local TCP port.
    Listen,
    /// An inference frame a TorchServe frontend wrote to a worker, walked by the kernel; see
    /// [`Event::batch`].
    Batch,
}

impl Kind {
    /// Exec, exit and listen records are for discovery, not for the HTTP parser.
    pub fn is_process_event(self) -> bool {
        matches!(self, Kind::Exec | Kind::Exit | Kind::Listen)
    }
}

/// `enum ss_direction`, seen from the traced process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Bytes the traced process received.
    Ingress,
    /// Bytes the traced process sent.
    Egress,
}

/// `enum ss_loss`: indexes of the kernel's per-CPU loss counters.
pub const LOSS_RINGBUF_FULL: u32 = 0;
pub const LOSS_ARGS_FULL: u32 = 1;
pub const LOSS_CONNS_FULL: u32 = 2;
/// Names of the loss reasons, by index, as exported in `servescope_kernel_lost_events_total{reason}`.
pub const LOSS_REASONS: [(u32, &str); 3] = [
    (LOSS_RINGBUF_FULL, "ringbuf_full"),
    (LOSS_ARGS_FULL, "args_map_full"),
    (LOSS_CONNS_FULL, "conn_map_full"),
];

/// One decoded record, borrowing the ring buffer's bytes.
#[derive(Clone, Copy, Debug)]
pub struct Event<'a> {
    /// Kernel time: when received bytes arrived (syscall exit), when sent bytes left (syscall entry:
    /// a blocking write of a large response returns much later), when close began.
    pub ts_ns: u64,
    /// When a send returned (its last byte handed to the kernel): `ts_ns` plus the time it blocked.
    /// Equal to `ts_ns` for everything else.
    pub end_ns: u64,
    pub conn_id: u64,
    pub tgid: u32,
    pub fd: i32,
    pub kind: Kind,
    pub dir: Direction,
    /// Bytes the syscall moved; `head` holds the first of them.
    pub len: u64,
    pub head: &'a [u8],
    /// The connection was seen at accept(): its stream starts at a message boundary.
    pub accepted: bool,
    /// Socket family: [`FAMILY_UNIX`] for TorchServe's frontend↔worker sockets, else IPv4/IPv6.
    pub family: u8,
    /// `SS_FLAG_BODY`: the kernel framed this connection and every byte of the call is message body
    /// (by the Content-Length it read in the message's head); nothing was copied.
    pub body: bool,
}

/// `AF_UNIX`: the family of TorchServe's frontend↔worker sockets.
pub const FAMILY_UNIX: u8 = 1;
/// `SS_FLAG_BODY`: the bit of a data record's `flags` that says its bytes are all message body.
pub const FLAG_BODY: u8 = 1;
/// `SS_FAMILY_PIPE`: records of a TorchServe worker's pipe writes (its stdout/stderr).
pub const FAMILY_PIPE: u8 = 255;
/// `SS_TARGET_TRACED`: the `targets` map value of every traced process.
pub const TARGET_TRACED: u32 = 1;
/// `SS_TARGET_WORKER`: a TorchServe worker; its pipe writes are traced too.
pub const TARGET_WORKER: u32 = 2;
/// `SS_TARGETS_PER_WORD`: processes per u64 word of the `target_bits` array (two bits each).
pub const TARGETS_PER_WORD: u32 = 32;
/// `SS_PID_LIMIT`: TGIDs `target_bits` covers (the kernel's PID_MAX_LIMIT on 64-bit).
pub const PID_LIMIT: u32 = 4_194_304;

/// Where `tgid`'s flags lie in `target_bits`: the word's index and the flags' shift in it (events.h).
pub fn target_bits_slot(tgid: u32) -> (u32, u32) {
    (tgid / TARGETS_PER_WORD, tgid % TARGETS_PER_WORD * 2)
}
/// `SS_UNIX_PATH_MAX`: longest peer path in the open record of a unix socket.
pub const UNIX_PATH_MAX: usize = 108;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than the {1}-byte header")]
    Short(usize, usize),
    #[error("record head_len {head_len} exceeds its {available} data bytes")]
    HeadLen { head_len: usize, available: usize },
    #[error("unknown record kind {0}")]
    Kind(u8),
    #[error("unknown direction {0}")]
    Direction(u8),
}

impl<'a> Event<'a> {
    /// Decodes one ring-buffer record. Never trusts the kernel's lengths beyond the bytes given.
    pub fn decode(buf: &'a [u8]) -> Result<Self, DecodeError> {
        let hsize = size_of::<RawHeader>();
        if buf.len() < hsize {
            return Err(DecodeError::Short(buf.len(), hsize));
        }
        // SAFETY: `buf` holds at least size_of::<RawHeader>() bytes, RawHeader is plain old data
        // (integers only, every bit pattern valid) and read_unaligned copes with any alignment.
        let h: RawHeader = unsafe { std::ptr::read_unaligned(buf.as_ptr().cast::<RawHeader>()) };
        let data = &buf[hsize..];
        let head_len = usize::from(h.head_len);
        let max = if h.kind == KIND_BATCH {
            BATCH_DATA_MAX
        } else {
            HEAD_MAX
        };
        if head_len > data.len() || head_len > max {
            return Err(DecodeError::HeadLen {
                head_len,
                available: data.len(),
            });
        }
        let kind = match h.kind {
            1 => Kind::Data,
            2 => Kind::Open,
            3 => Kind::Close,
            4 => Kind::Exec,
            5 => Kind::Exit,
            6 => Kind::Listen,
            KIND_BATCH => Kind::Batch,
            k => return Err(DecodeError::Kind(k)),
        };
        let dir = match h.dir {
            0 => Direction::Ingress,
            1 => Direction::Egress,
            d => return Err(DecodeError::Direction(d)),
        };
        Ok(Event {
            ts_ns: h.ts_ns,
            end_ns: h.ts_ns.saturating_add(u64::from(h.busy_us) * 1000),
            conn_id: h.conn_id,
            tgid: h.tgid,
            fd: h.fd,
            kind,
            dir,
            len: h.len,
            head: &data[..head_len],
            accepted: h.accepted != 0,
            family: h.family,
            body: h.flags & FLAG_BODY != 0,
        })
    }
}

/// `SS_EV_BATCH`.
pub(crate) const KIND_BATCH: u8 = 7;

/// `struct ss_batch`: the head of a batch record's data.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct RawBatch {
    requests: u32,
    status: u8,
    ids: u8,
    _pad: [u8; 2],
}
const _: () = assert!(size_of::<RawBatch>() == 8);
const _: () = assert!(offset_of!(RawBatch, status) == 4);
const _: () = assert!(offset_of!(RawBatch, ids) == 5);

/// `enum ss_batch_status`: how the kernel's walk of a frame ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchStatus {
    /// The frame's end was reached: `requests` is the batch size.
    Ok,
    /// A length was negative or ran past the written bytes.
    Corrupt,
    /// The walk's step budget ran out first.
    Unfinished,
}

/// What a batch record says: the requests of one inference frame and the ids the kernel kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch<'a> {
    pub requests: u32,
    pub status: BatchStatus,
    /// Request ids in frame order; fewer than `requests` when some were longer than
    /// [`BATCH_ID_MAX`] or beyond [`BATCH_MAX_IDS`].
    pub ids: Vec<&'a str>,
}

impl<'a> Event<'a> {
    /// The frame a batch record describes; `None` for other records or a malformed payload (the
    /// ids' lengths are checked against the bytes given, never trusted).
    pub fn batch(&self) -> Option<Batch<'a>> {
        if self.kind != Kind::Batch || self.head.len() < size_of::<RawBatch>() {
            return None;
        }
        // SAFETY: at least size_of::<RawBatch>() bytes; RawBatch is plain old data.
        let h: RawBatch =
            unsafe { std::ptr::read_unaligned(self.head.as_ptr().cast::<RawBatch>()) };
        let status = match h.status {
            0 => BatchStatus::Ok,
            1 => BatchStatus::Corrupt,
            2 => BatchStatus::Unfinished,
            _ => return None,
        };
        let mut rest = &self.head[size_of::<RawBatch>()..];
        let mut ids = Vec::with_capacity(usize::from(h.ids).min(BATCH_MAX_IDS));
        for _ in 0..h.ids {
            let (&len, tail) = rest.split_first()?;
            let id = tail.get(..usize::from(len))?;
            ids.push(std::str::from_utf8(id).ok()?);
            rest = &tail[usize::from(len)..];
        }
        Some(Batch {
            requests: h.requests,
            status,
            ids,
        })
    }
}

impl Event<'_> {
    /// The client's address carried by an open record (IPv4-mapped IPv6 shown as IPv4).
    pub fn peer(&self) -> Option<std::net::SocketAddr> {
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
        if self.kind != Kind::Open || self.head.len() < size_of::<RawPeer>() {
            return None;
        }
        // SAFETY: at least size_of::<RawPeer>() bytes; RawPeer is plain old data.
        let p: RawPeer = unsafe { std::ptr::read_unaligned(self.head.as_ptr().cast::<RawPeer>()) };
        let ip = match p.family {
            AF_INET => IpAddr::V4(Ipv4Addr::new(p.addr[0], p.addr[1], p.addr[2], p.addr[3])),
            AF_INET6 => IpAddr::V6(Ipv6Addr::from(p.addr)).to_canonical(),
            _ => return None,
        };
        Some(SocketAddr::new(ip, p.port))
    }
}

impl Event<'_> {
    /// The peer's bound path carried by the open record of a unix socket (for the frontend's end of a
    /// worker connection, the worker's `/tmp/.ts.sock.<port>`).
    pub fn unix_peer_path(&self) -> Option<&str> {
        if self.kind != Kind::Open || self.family != FAMILY_UNIX {
            return None;
        }
        let raw = &self.head[..self.head.len().min(UNIX_PATH_MAX)];
        // The kernel's length may count the terminating NUL; an abstract address starts with one.
        let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
        std::str::from_utf8(&raw[..end])
            .ok()
            .filter(|p| !p.is_empty())
    }
}

/// Builds the bytes of a record as the kernel would send them (tests and benchmarks).
#[doc(hidden)]
pub fn encode_for_test(h: RawHeader, head: &[u8]) -> Vec<u8> {
    let mut h = h;
    let max = if h.kind == KIND_BATCH {
        BATCH_DATA_MAX
    } else {
        HEAD_MAX
    };
    h.head_len = u16::try_from(head.len().min(max)).unwrap_or(0);
    let mut out = Vec::with_capacity(size_of::<RawHeader>() + head.len());
    // SAFETY: RawHeader is repr(C) plain old data; viewing it as bytes is sound.
    let bytes = unsafe {
        std::slice::from_raw_parts(std::ptr::from_ref(&h).cast::<u8>(), size_of::<RawHeader>())
    };
    out.extend_from_slice(bytes);
    out.extend_from_slice(&head[..usize::from(h.head_len)]);
    out
}

/// A batch record's payload as the kernel writes it (`struct ss_batch`, then each id after its
/// length byte), for tests.
#[cfg(test)]
pub(crate) fn batch_payload(requests: u32, status: u8, ids: &[&[u8]]) -> Vec<u8> {
    let mut p = requests.to_ne_bytes().to_vec();
    p.push(status);
    p.push(u8::try_from(ids.len()).expect("few ids"));
    p.extend_from_slice(&[0, 0]);
    for id in ids {
        p.push(u8::try_from(id.len()).expect("short id"));
        p.extend_from_slice(id);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `#define`s of the C header equal their Rust mirrors (a struct change is caught by the size
    /// asserts above; a constant change only here).
    #[test]
    fn header_constants_match_events_h() {
        let h = include_str!("../../ebpf/include/events.h");
        let define = |name: &str| -> u64 {
            h.lines()
                .find_map(|l| {
                    let mut w = l.split_whitespace();
                    (w.next() == Some("#define") && w.next() == Some(name))
                        .then(|| w.next().and_then(|v| v.parse().ok()))
                        .flatten()
                })
                .unwrap_or_else(|| panic!("{name} not defined in events.h"))
        };
        assert_eq!(define("SS_HEAD_MAX"), HEAD_MAX as u64);
        assert_eq!(define("SS_BATCH_DATA_MAX"), BATCH_DATA_MAX as u64);
        assert_eq!(define("SS_BATCH_MAX_IDS"), BATCH_MAX_IDS as u64);
        assert_eq!(define("SS_BATCH_ID_MAX"), BATCH_ID_MAX as u64);
        assert_eq!(define("SS_FAMILY_PIPE"), u64::from(FAMILY_PIPE));
        assert_eq!(define("SS_TARGET_TRACED"), u64::from(TARGET_TRACED));
        assert_eq!(define("SS_TARGET_WORKER"), u64::from(TARGET_WORKER));
        assert_eq!(define("SS_TARGETS_PER_WORD"), u64::from(TARGETS_PER_WORD));
        assert_eq!(define("SS_PID_LIMIT"), u64::from(PID_LIMIT));
        assert_eq!(define("SS_UNIX_PATH_MAX"), UNIX_PATH_MAX as u64);
    }

    /// Two bits a process, 32 to a word, the last TGID Linux can hand out in the last word.
    #[test]
    fn target_bits_slots_follow_the_header_layout() {
        assert_eq!(target_bits_slot(0), (0, 0));
        assert_eq!(target_bits_slot(31), (0, 62));
        assert_eq!(target_bits_slot(32), (1, 0));
        assert_eq!(target_bits_slot(12_345), (385, 50));
        assert_eq!(
            target_bits_slot(PID_LIMIT - 1),
            (PID_LIMIT / TARGETS_PER_WORD - 1, 62)
        );
    }

    #[test]
    fn batch_records_decode_and_reject_lying_lengths() {
        let id = b"f9151965-e580-4808-8a1a-044686bb90ce";
        // Longer than a syscall head: batch records may carry up to BATCH_DATA_MAX bytes.
        let ids: Vec<&[u8]> = vec![id; 20];
        let rec = encode_for_test(header(7, 1), &batch_payload(20, 0, &ids));
        assert!(rec.len() > size_of::<RawHeader>() + HEAD_MAX);
        let ev = Event::decode(&rec).expect("decodes");
        let b = ev.batch().expect("a batch");
        assert_eq!(b.requests, 20);
        assert_eq!(b.status, BatchStatus::Ok);
        assert_eq!(b.ids.len(), 20);
        assert!(b.ids.iter().all(|i| i.as_bytes() == id));

        let batch_of = |kind: u8, payload: &[u8]| {
            let rec = encode_for_test(header(kind, 1), payload);
            let ev = Event::decode(&rec).expect("decodes");
            ev.batch().map(|b| {
                let ids: Vec<String> = b.ids.iter().map(|i| (*i).to_owned()).collect();
                (b.requests, b.status, ids)
            })
        };
        assert_eq!(
            batch_of(7, &batch_payload(3, 1, &[b"a"])),
            Some((3, BatchStatus::Corrupt, vec!["a".to_owned()]))
        );
        // An id count or an id length beyond the bytes given: no batch, no panic.
        let mut lying = batch_payload(2, 0, &[b"abc"]);
        lying[5] = 2;
        assert_eq!(batch_of(7, &lying), None);
        let mut lying = batch_payload(1, 0, &[b"abc"]);
        lying[8] = 200;
        assert_eq!(batch_of(7, &lying), None);
        // Unknown status, short payload, other kinds.
        assert_eq!(batch_of(7, &batch_payload(1, 9, &[])), None);
        assert_eq!(batch_of(7, &[1, 2]), None);
        assert_eq!(batch_of(1, &batch_payload(1, 0, &[])), None);
        // A data record may still not exceed HEAD_MAX.
        let mut big = encode_for_test(header(1, 1), &[b'x'; HEAD_MAX]);
        let at = offset_of!(RawHeader, head_len);
        big[at..at + 2].copy_from_slice(&u16::try_from(HEAD_MAX + 1).expect("fits").to_ne_bytes());
        big.push(b'x');
        assert!(matches!(
            Event::decode(&big),
            Err(DecodeError::HeadLen { .. })
        ));
    }

    #[test]
    fn unix_peer_path_stops_at_nul_and_needs_an_open_unix_record() {
        let mut h = header(2, 0);
        h.family = FAMILY_UNIX;
        let rec = encode_for_test(h, b"/tmp/.ts.sock.9000\0");
        let ev = Event::decode(&rec).expect("valid");
        assert_eq!(ev.unix_peer_path(), Some("/tmp/.ts.sock.9000"));
        let rec = encode_for_test(h, b"\0abstract");
        assert_eq!(Event::decode(&rec).expect("valid").unix_peer_path(), None);
        h.family = 2;
        let rec = encode_for_test(h, b"/tmp/.ts.sock.9000");
        assert_eq!(Event::decode(&rec).expect("valid").unix_peer_path(), None);
    }

    fn header(kind: u8, dir: u8) -> RawHeader {
        RawHeader {
            ts_ns: 42,
            conn_id: 7,
            len: 1000,
            tgid: 99,
            tid: 100,
            fd: 5,
            kind,
            dir,
            accepted: 1,
            ..Default::default()
        }
    }

    #[test]
    fn round_trip() {
        let bytes = encode_for_test(header(1, 1), b"HTTP/1.1 200 OK\r\n");
        let ev = Event::decode(&bytes).expect("decodes");
        assert_eq!(ev.kind, Kind::Data);
        assert_eq!(ev.dir, Direction::Egress);
        assert_eq!(ev.len, 1000);
        assert_eq!(ev.head, b"HTTP/1.1 200 OK\r\n");
        assert!(ev.accepted);
        assert_eq!((ev.tgid, ev.fd, ev.conn_id, ev.ts_ns), (99, 5, 7, 42));
    }

    #[test]
    fn open_record_carries_the_peer() {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12..].copy_from_slice(&[127, 0, 0, 1]);
        let peer = RawPeer {
            family: 10,
            port: 41000,
            addr,
        };
        // SAFETY: RawPeer is repr(C) plain old data.
        let bytes = unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(&peer).cast::<u8>(), size_of::<RawPeer>())
        };
        let rec = encode_for_test(header(2, 0), bytes);
        let ev = Event::decode(&rec).expect("decodes");
        assert_eq!(ev.peer(), Some("127.0.0.1:41000".parse().expect("addr")));
        let v4 = RawPeer {
            family: 2,
            port: 80,
            addr: [10, 1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        };
        // SAFETY: as above.
        let bytes = unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(&v4).cast::<u8>(), size_of::<RawPeer>())
        };
        let ev_rec = encode_for_test(header(2, 0), bytes);
        assert_eq!(
            Event::decode(&ev_rec).expect("decodes").peer(),
            Some("10.1.2.3:80".parse().expect("addr"))
        );
        let data = encode_for_test(header(1, 0), bytes);
        assert_eq!(
            Event::decode(&data).expect("decodes").peer(),
            None,
            "only open records carry a peer"
        );
    }

    #[test]
    fn rejects_bad_records() {
        assert_eq!(
            Event::decode(&[0; 10]).expect_err("must be rejected"),
            DecodeError::Short(10, 48)
        );
        let mut bytes = encode_for_test(header(1, 0), b"abc");
        bytes.truncate(49);
        assert!(matches!(
            Event::decode(&bytes),
            Err(DecodeError::HeadLen { .. })
        ));
        assert_eq!(
            Event::decode(&encode_for_test(header(9, 0), b"")).expect_err("must be rejected"),
            DecodeError::Kind(9)
        );
        assert_eq!(
            Event::decode(&encode_for_test(header(1, 4), b"")).expect_err("must be rejected"),
            DecodeError::Direction(4)
        );
    }
}
