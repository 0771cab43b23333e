//! TorchServe's frontend → worker protocol (OTF, FACTS.md §6), only as far as the agent needs it: the
//! request ids of an inference frame, which tell when each request left the queue for a worker; the
//! load frame (model, archive path, batch size, handler, GPU), which ties a worker to its model. How
//! many requests a batch carries, and all their ids, the kernel finds by walking each frame in the
//! frontend's buffer (`otf_frame` in ebpf/sockets.bpf.c; records decoded by `Event::batch`): only
//! the frame's head is ever copied here.
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

/// The first request id of an inference frame, as [`inference_request_ids`] finds it, without
/// walking the rest (a batch's worker cycle is named by its first request).
pub fn first_request_id(head: &[u8]) -> Option<String> {
    let mut r = Reader { buf: head, pos: 0 };
    if r.byte()? != b'I' {
        return None;
    }
    let len = r.int()?;
    r.field(len).and_then(valid_id)
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
        for head in [&f[..], &f[..250], &f[..60]] {
            assert_eq!(first_request_id(head).as_deref(), Some(ids[0]));
        }
    }

    #[test]
    fn non_frames_are_rejected() {
        for bad in [
            &b""[..],
            b"L\x00\x00\x00\x04echo",
            b"I\x7f\xff\xff\xffabc",
            b"I\x00\x00\x00\x03a b",
            b"I\xff\xff\xff\xff",
            b"I\x00\x00\x00\x24abc",
        ] {
            assert_eq!(first_request_id(bad), None, "{bad:?}");
        }
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
}
