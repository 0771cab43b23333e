//! TorchServe's frontend → worker protocol (OTF, FACTS.md §6), only as far as the agent needs it: the
//! request ids of an inference frame, which tell when each request left the queue for a worker; the
//! load frame (model, archive path, batch size, handler, GPU), which ties a worker to its model; and,
//! from the worker's side of the socket ([`WorkerStream`]), how many requests each batch carried.
//!
//! Frame: `'I'`, then per request: id (int32 length + bytes), headers as (name, value) pairs ended by
//! int32 -1, parameters as (name, content type, value) ended by int32 -1; after the last request int32
//! -1. Integers are big-endian. Nothing from the wire is trusted: every length is bounded by the bytes
//! at hand, and a frame that does not parse is reported as not a frame.

/// Longest request id accepted (TorchServe's are 36-character UUIDs).
const MAX_ID: usize = 128;

/// Request ids found in the head of an inference frame, in order. Ids beyond the copied head are not
/// seen (a batch whose first requests carry large headers); at least the first one must be, or the
/// bytes are not an inference frame.
pub fn inference_request_ids(head: &[u8]) -> Option<Vec<String>> {
    let mut r = Reader { buf: head, pos: 0 };
    if r.byte()? != b'I' {
        return None;
    }
    let mut ids = Vec::new();
    while let Some(len) = r.int() {
        if len == -1 {
            break;
        }
        let Some(id) = r.field(len).and_then(valid_id) else {
            // The first id must be whole and well-formed; a later one may be cut by the head copy.
            if ids.is_empty() {
                return None;
            }
            break;
        };
        ids.push(id);
        // Headers (pairs) and parameters (triples), each list ended by -1.
        if r.skip_list(2).is_none() || r.skip_list(3).is_none() {
            break;
        }
    }
    (!ids.is_empty()).then_some(ids)
}

/// Longest model name, path or handler accepted from a load frame.
const MAX_NAME: usize = 4096;

/// A load frame (`'L'`): what the frontend tells a new worker to load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadFrame {
    pub model_name: String,
    /// Where the archive was unpacked (`/tmp/models/<hex>`): the worker's working directory too.
    pub model_path: String,
    pub batch_size: i32,
    pub handler: String,
    /// -1: CPU.
    pub gpu_id: i32,
}

/// Decodes a load frame: `'L'`, model name, model path, int batch size, handler, int gpu id, envelope,
/// 1-byte bool. `None` for anything else or a frame whose fields do not all fit in `head`.
pub fn load_frame(head: &[u8]) -> Option<LoadFrame> {
    let mut r = Reader { buf: head, pos: 0 };
    if r.byte()? != b'L' {
        return None;
    }
    let text = |r: &mut Reader<'_>| -> Option<String> {
        let len = r.int()?;
        let b = r.field(len)?;
        (b.len() <= MAX_NAME)
            .then(|| std::str::from_utf8(b).ok().map(str::to_owned))
            .flatten()
    };
    let model_name = text(&mut r).filter(|n| !n.is_empty())?;
    let model_path = text(&mut r)?;
    let batch_size = r.int().filter(|b| *b >= 1)?;
    let handler = text(&mut r)?;
    let gpu_id = r.int()?;
    Some(LoadFrame {
        model_name,
        model_path,
        batch_size,
        handler,
        gpu_id,
    })
}

fn valid_id(bytes: &[u8]) -> Option<String> {
    if bytes.is_empty()
        || bytes.len() > MAX_ID
        || !bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
    {
        return None;
    }
    std::str::from_utf8(bytes).ok().map(str::to_owned)
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.buf.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    fn int(&mut self) -> Option<i32> {
        let b = self.buf.get(self.pos..self.pos + 4)?;
        self.pos += 4;
        Some(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// `len` bytes, if all are at hand and `len` is a sane length.
    fn field(&mut self, len: i32) -> Option<&'a [u8]> {
        let len = usize::try_from(len).ok()?;
        let end = self.pos.checked_add(len)?;
        let b = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(b)
    }

    /// Skips a list of `arity`-field entries ended by int32 -1.
    fn skip_list(&mut self, arity: usize) -> Option<()> {
        loop {
            let len = self.int()?;
            if len == -1 {
                return Some(());
            }
            self.field(len)?;
            for _ in 1..arity {
                let len = self.int()?;
                self.field(len)?;
            }
        }
    }
}

/// Longest field the worker-side decoder accepts (skips): far above TorchServe's 6.5 MB default
/// `max_request_size`; a larger length is taken as corruption.
const MAX_FIELD: u64 = 1 << 30;
/// Most requests accepted in one batch frame.
const MAX_BATCH: u32 = 1 << 16;

/// Most request ids of one batch kept for matching (the rest are still counted).
const MAX_BATCH_IDS: usize = 1024;

/// A frame the worker finished reading.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkerFrame {
    /// A load frame.
    Load,
    /// An inference frame of `requests` requests; kernel times of its first and last read.
    Inference {
        requests: u32,
        /// The batch's request ids (well-formed ones, at most [`MAX_BATCH_IDS`]).
        ids: Vec<String>,
        first_ns: u64,
        last_ns: u64,
    },
}

/// What the decoder reads next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// The 1-byte command of the next frame.
    Cmd,
    /// Load frame field `i` of [`LOAD_FIELDS`].
    Load(u8),
    /// Inference frame: a request id's length (-1 ends the frame), then the id.
    IdLen,
    /// `n` more bytes of a request id.
    Id(u32),
    /// A header name's length (-1 ends the headers), then name and value.
    HeaderName,
    HeaderValue,
    /// A parameter name's length (-1 ends the request), then name, content type and value.
    ParamName,
    ParamType,
    ParamValue,
    /// Lost the frame structure: wait for a 1-byte read of a command.
    Desync,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LoadField {
    Text,
    Int,
    Byte,
}

/// model name, model path, batch size, handler, gpu id, envelope, limitMaxImagePixels.
const LOAD_FIELDS: [LoadField; 7] = [
    LoadField::Text,
    LoadField::Text,
    LoadField::Int,
    LoadField::Text,
    LoadField::Int,
    LoadField::Text,
    LoadField::Byte,
];

/// The stream a TorchServe worker reads from the frontend, decoded from the worker's own reads.
///
/// The worker reads each field with its own `recvfrom` of the exact size (FACTS.md §6), so even a
/// batch whose first request is megabytes long is seen whole: the kernel copies the first bytes of
/// every read and reports the full length, and the decoder needs only lengths and counts, never the
/// payload. Bytes the kernel did not copy are skipped when they fall inside a field; when the decoder
/// needed them (a length), it counts the frame as corrupt and waits for the next 1-byte command read.
/// Nothing from the wire is trusted: lengths are bounded by [`MAX_FIELD`] and batches by [`MAX_BATCH`].
#[derive(Debug)]
pub struct WorkerStream {
    step: Step,
    /// Bytes of the 4-byte integer being read.
    int: [u8; 4],
    int_len: usize,
    /// Field bytes still to skip before `step` resumes.
    skip: u64,
    requests: u32,
    first_ns: u64,
    ids: Vec<String>,
    id: Vec<u8>,
    /// Frames that did not decode.
    pub corrupt: u64,
}

impl Default for WorkerStream {
    fn default() -> Self {
        Self::new()
    }
}

impl WorkerStream {
    pub fn new() -> Self {
        // A worker first traced mid-stream may be inside a frame: wait for a command read.
        WorkerStream {
            step: Step::Desync,
            int: [0; 4],
            int_len: 0,
            skip: 0,
            requests: 0,
            first_ns: 0,
            ids: Vec::new(),
            id: Vec::new(),
            corrupt: 0,
        }
    }

    /// Feeds one read of the worker: `len` bytes arrived at `ts_ns`, the first of which are `head`.
    /// Returns the frames it completed.
    pub fn feed(&mut self, ts_ns: u64, head: &[u8], len: u64) -> Vec<WorkerFrame> {
        let mut out = Vec::new();
        let head = &head[..head.len().min(usize::try_from(len).unwrap_or(usize::MAX))];
        if self.step == Step::Desync {
            // The worker reads a command alone: a 1-byte read of a known command starts a frame.
            if len == 1 && matches!(head.first(), Some(b'I' | b'L')) {
                self.step = Step::Cmd;
            } else {
                return out;
            }
        }
        let mut i = 0;
        while i < head.len() {
            if self.skip > 0 {
                let n = self.skip.min((head.len() - i) as u64);
                self.skip -= n;
                i += usize::try_from(n).unwrap_or(head.len());
                continue;
            }
            let b = head[i];
            i += 1;
            self.byte(b, ts_ns, &mut out);
            if self.step == Step::Desync {
                return out;
            }
        }
        // Bytes the kernel counted but did not copy: fine inside a skipped field, fatal otherwise.
        let gap = len - head.len() as u64;
        if gap > 0 {
            if self.skip >= gap {
                self.skip -= gap;
            } else {
                self.lose();
            }
        }
        out
    }

    fn lose(&mut self) {
        self.corrupt += 1;
        self.step = Step::Desync;
        self.skip = 0;
        self.int_len = 0;
    }

    fn byte(&mut self, b: u8, ts_ns: u64, out: &mut Vec<WorkerFrame>) {
        match self.step {
            Step::Desync => {}
            Step::Cmd => match b {
                b'I' => {
                    self.requests = 0;
                    self.ids.clear();
                    self.first_ns = ts_ns;
                    self.step = Step::IdLen;
                }
                b'L' => self.step = Step::Load(0),
                _ => self.lose(),
            },
            Step::Load(k) => match LOAD_FIELDS.get(usize::from(k)) {
                Some(LoadField::Byte) => {
                    out.push(WorkerFrame::Load);
                    self.step = Step::Cmd;
                }
                Some(field) => {
                    let Some(v) = self.int(b) else { return };
                    let next = if usize::from(k) + 1 < LOAD_FIELDS.len() {
                        Step::Load(k + 1)
                    } else {
                        Step::Cmd
                    };
                    if *field == LoadField::Text && !self.field(v) {
                        return;
                    }
                    self.step = next;
                }
                None => self.lose(),
            },
            Step::IdLen => {
                let Some(v) = self.int(b) else { return };
                if v == -1 {
                    out.push(WorkerFrame::Inference {
                        requests: self.requests,
                        ids: std::mem::take(&mut self.ids),
                        first_ns: self.first_ns,
                        last_ns: ts_ns,
                    });
                    self.step = Step::Cmd;
                } else if self.requests >= MAX_BATCH {
                    self.lose();
                } else if let Some(n) = u32::try_from(v)
                    .ok()
                    .filter(|n| (1..=MAX_ID as u32).contains(n))
                {
                    // Ids are short: read them (the worker reads each whole, so it is copied).
                    self.requests += 1;
                    self.id.clear();
                    self.step = Step::Id(n);
                } else if self.field(v) {
                    // An empty or overlong id: skipped, still a request.
                    self.requests += 1;
                    self.step = Step::HeaderName;
                }
            }
            Step::Id(n) => {
                self.id.push(b);
                if n > 1 {
                    self.step = Step::Id(n - 1);
                    return;
                }
                if self.ids.len() < MAX_BATCH_IDS
                    && let Some(id) = valid_id(&self.id)
                {
                    self.ids.push(id);
                }
                self.step = Step::HeaderName;
            }
            Step::HeaderName | Step::ParamName => {
                let Some(v) = self.int(b) else { return };
                let header = self.step == Step::HeaderName;
                if v == -1 {
                    self.step = if header { Step::ParamName } else { Step::IdLen };
                } else if self.field(v) {
                    self.step = if header {
                        Step::HeaderValue
                    } else {
                        Step::ParamType
                    };
                }
            }
            Step::HeaderValue | Step::ParamType | Step::ParamValue => {
                let Some(v) = self.int(b) else { return };
                if self.field(v) {
                    self.step = match self.step {
                        Step::HeaderValue => Step::HeaderName,
                        Step::ParamType => Step::ParamValue,
                        _ => Step::ParamName,
                    };
                }
            }
        }
    }

    /// Collects one byte of a big-endian int32; the value once all four are in.
    fn int(&mut self, b: u8) -> Option<i32> {
        self.int[self.int_len] = b;
        self.int_len += 1;
        if self.int_len < 4 {
            return None;
        }
        self.int_len = 0;
        Some(i32::from_be_bytes(self.int))
    }

    /// Starts skipping a field of length `v`; a negative or absurd length loses the frame.
    fn field(&mut self, v: i32) -> bool {
        match u64::try_from(v) {
            Ok(n) if n <= MAX_FIELD => {
                self.skip = n;
                true
            }
            _ => {
                self.lose();
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &mut Vec<u8>, x: &[u8]) {
        v.extend(i32::try_from(x.len()).expect("short").to_be_bytes());
        v.extend(x);
    }

    /// The frame of FACTS.md §6 / golden/strace_echo_and_fail.txt (echo, body "hello world").
    fn golden_frame(ids: &[&str]) -> Vec<u8> {
        let mut v = vec![b'I'];
        for id in ids {
            s(&mut v, id.as_bytes());
            for (k, val) in [
                ("explain", "False"),
                ("Host", "127.0.0.1:8080"),
                ("Content-Length", "11"),
                ("Content-Type", "application/octet-stream"),
                ("url_path", ""),
            ] {
                s(&mut v, k.as_bytes());
                s(&mut v, val.as_bytes());
            }
            v.extend((-1i32).to_be_bytes());
            s(&mut v, b"body");
            s(&mut v, b"application/octet-stream");
            s(&mut v, b"hello world");
            v.extend((-1i32).to_be_bytes());
        }
        v.extend((-1i32).to_be_bytes());
        v
    }

    #[test]
    fn golden_frame_is_decoded() {
        let f = golden_frame(&["b44aa24c-cde0-4de2-81b2-509f2f6b4133"]);
        assert_eq!(f.len(), 234, "same size as the captured frame");
        assert_eq!(
            inference_request_ids(&f),
            Some(vec!["b44aa24c-cde0-4de2-81b2-509f2f6b4133".to_owned()])
        );
    }

    #[test]
    fn batch_frames_give_every_id_in_the_head() {
        let ids = [
            "11111111-1111-1111-1111-111111111111",
            "22222222-2222-2222-2222-222222222222",
        ];
        let f = golden_frame(&ids);
        assert_eq!(inference_request_ids(&f).map(|v| v.len()), Some(2));
        // Cut inside the second request: the first id is still reported.
        assert_eq!(
            inference_request_ids(&f[..250]),
            Some(vec![ids[0].to_owned()])
        );
    }

    #[test]
    fn non_frames_are_rejected() {
        assert_eq!(inference_request_ids(b""), None);
        assert_eq!(
            inference_request_ids(b"L\x00\x00\x00\x04echo"),
            None,
            "load frame"
        );
        assert_eq!(
            inference_request_ids(b"I\x7f\xff\xff\xffabc"),
            None,
            "absurd length"
        );
        assert_eq!(
            inference_request_ids(b"I\x00\x00\x00\x03a b"),
            None,
            "not an id"
        );
        assert_eq!(
            inference_request_ids(b"I\xff\xff\xff\xff"),
            None,
            "empty batch"
        );
        assert_eq!(
            inference_request_ids(b"I\x00\x00\x00\x24abc"),
            None,
            "id cut short"
        );
    }

    #[test]
    fn load_frame_is_decoded() {
        let mut f = vec![b'L'];
        s(&mut f, b"batched");
        s(&mut f, b"/tmp/models/0123abcd");
        f.extend(4i32.to_be_bytes());
        s(&mut f, b"echo_handler.py");
        f.extend((-1i32).to_be_bytes());
        s(&mut f, b"");
        f.push(0);
        assert_eq!(
            load_frame(&f),
            Some(LoadFrame {
                model_name: "batched".into(),
                model_path: "/tmp/models/0123abcd".into(),
                batch_size: 4,
                handler: "echo_handler.py".into(),
                gpu_id: -1,
            })
        );
        assert_eq!(load_frame(&f[..20]), None, "cut short");
        assert_eq!(load_frame(&golden_frame(&["x"])), None, "inference frame");
        let mut bad = f.clone();
        bad[1..5].copy_from_slice(&i32::MAX.to_be_bytes());
        assert_eq!(load_frame(&bad), None, "absurd length");
    }

    /// Splits a frame into the reads the worker makes: 1-byte command, 4-byte ints, exact fields.
    fn worker_reads(frame: &[u8]) -> Vec<Vec<u8>> {
        let mut out = vec![frame[..1].to_vec()];
        let mut pos = 1;
        // Every int is either a length followed by its field, or a -1 / plain int; the test frames
        // have ints only as lengths or -1, except the load frame, which tests feed whole.
        while pos + 4 <= frame.len() {
            let n = i32::from_be_bytes(frame[pos..pos + 4].try_into().expect("4 bytes"));
            out.push(frame[pos..pos + 4].to_vec());
            pos += 4;
            if n > 0 {
                let n = usize::try_from(n).expect("positive");
                out.push(frame[pos..pos + n].to_vec());
                pos += n;
            }
        }
        out
    }

    fn feed_all(w: &mut WorkerStream, reads: &[Vec<u8>]) -> Vec<WorkerFrame> {
        let mut frames = Vec::new();
        for (t, r) in reads.iter().enumerate() {
            let head = &r[..r.len().min(crate::events::HEAD_MAX)];
            frames.extend(w.feed(t as u64, head, r.len() as u64));
        }
        frames
    }

    #[test]
    fn worker_stream_counts_the_requests_of_each_batch() {
        let mut w = WorkerStream::new();
        let mut reads = worker_reads(&golden_frame(&["a", "b", "c"]));
        reads.extend(worker_reads(&golden_frame(&["d"])));
        let frames = feed_all(&mut w, &reads);
        let counts: Vec<u32> = frames
            .iter()
            .map(|f| match f {
                WorkerFrame::Inference { requests, .. } => *requests,
                WorkerFrame::Load => 0,
            })
            .collect();
        assert_eq!(counts, vec![3, 1]);
        assert!(
            matches!(&frames[0], WorkerFrame::Inference { ids, .. } if ids == &["a", "b", "c"]),
            "every id of the batch: {frames:?}"
        );
        assert_eq!(w.corrupt, 0);
        if let WorkerFrame::Inference {
            first_ns, last_ns, ..
        } = frames[0].clone()
        {
            assert_eq!(first_ns, 0, "the command read");
            assert!(last_ns > first_ns);
        }
    }

    #[test]
    fn worker_stream_skips_bodies_beyond_the_copied_head() {
        let mut v = vec![b'I'];
        s(&mut v, b"big");
        v.extend((-1i32).to_be_bytes());
        s(&mut v, b"body");
        s(&mut v, b"application/octet-stream");
        s(&mut v, &vec![b'x'; 100_000]);
        v.extend((-1i32).to_be_bytes());
        v.extend((-1i32).to_be_bytes());
        let mut w = WorkerStream::new();
        let frames = feed_all(&mut w, &worker_reads(&v));
        assert!(matches!(
            frames.as_slice(),
            [WorkerFrame::Inference { requests: 1, .. }]
        ));
        assert_eq!(w.corrupt, 0);
    }

    #[test]
    fn worker_stream_resyncs_after_a_load_and_after_garbage() {
        let mut load = vec![b'L'];
        s(&mut load, b"m");
        s(&mut load, b"/tmp/models/x");
        load.extend(1i32.to_be_bytes());
        s(&mut load, b"h.py");
        load.extend((-1i32).to_be_bytes());
        s(&mut load, b"");
        load.push(1);
        let mut w = WorkerStream::new();
        // Traced mid-stream: garbage first, then a command read starts the first frame.
        assert!(w.feed(0, b"zzzz", 4).is_empty());
        assert_eq!(w.feed(1, b"L", 1), vec![]);
        assert_eq!(
            w.feed(2, &load[1..], (load.len() - 1) as u64),
            vec![WorkerFrame::Load]
        );
        // An unknown command is counted and skipped until the next command read.
        assert!(w.feed(3, b"Q", 1).is_empty());
        assert_eq!(w.corrupt, 1);
        // A length the kernel did not copy cannot be read: counted, not fatal.
        let f = golden_frame(&["a"]);
        assert!(w.feed(4, &f[..1], 1).is_empty());
        assert!(w.feed(5, &f[1..3], 4).is_empty());
        assert_eq!(w.corrupt, 2);
        let frames = feed_all(&mut w, &worker_reads(&f));
        assert_eq!(frames.len(), 1);
        // A negative length other than -1 is corruption.
        assert!(w.feed(6, b"I", 1).is_empty());
        assert!(w.feed(7, &(-7i32).to_be_bytes(), 4).is_empty());
        assert_eq!(w.corrupt, 3);
    }

    proptest::proptest! {
        /// Whatever the wire holds, decoding never panics and never reports more than it read.
        #[test]
        fn random_bytes_never_panic(
            reads in proptest::collection::vec(
                (proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64), 0u64..1 << 40),
                0..64,
            )
        ) {
            let mut w = WorkerStream::new();
            for (t, (head, extra)) in reads.iter().enumerate() {
                let _ = inference_request_ids(head);
                let _ = load_frame(head);
                for f in w.feed(t as u64, head, head.len() as u64 + extra % 3 * extra) {
                    if let WorkerFrame::Inference { requests, ids, .. } = f {
                        proptest::prop_assert!(requests <= MAX_BATCH);
                        proptest::prop_assert!(ids.len() <= requests as usize);
                    }
                }
            }
        }
    }
}
