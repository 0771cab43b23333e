//! fake_frontend — stands in for TorchServe's frontend on its worker socket, to feed the kernel's walk
//! of inference frames what a real TorchServe never writes: corrupt lengths, frames too long to walk,
//! batches beyond the ids a record keeps, junk. Integration tests only (tests/tests/otf_frames.rs).
//!
//! ```text
//! fake_frontend PORT        run as `java … org.pytorch.serve.ModelServer` (the test sets argv[0] and
//!                           the class argument, so the agent discovers it as a TorchServe frontend)
//! ```
//!
//! The frontend starts its worker — itself again, as `python ts/model_service_worker.py --sock-name
//! /tmp/.ts.sock.PORT`, which only accepts one connection and reads everything — connects to it, prints
//! `ready`, then takes one command per stdin line and answers `ok` once it is written:
//!
//! ```text
//! load DIR              a load frame for model "fake" unpacked at DIR (batch size 8)
//! batch N BODY          an inference frame of N requests (ids fake-<seq>-<k>), each with two headers
//!                       and a BODY-byte body; written non-blocking, in as many writes as the socket
//!                       takes (a large frame is written in several, like Netty's)
//! past-end              a frame whose header length runs past the bytes written
//! negative              a frame whose id length is -7
//! long HEADERS          one request with HEADERS headers (more fields than the kernel walks)
//! junk                  bytes that are no frame at all
//! ```

use std::{
    io::{BufRead, ErrorKind, Read, Write},
    os::{
        fd::AsRawFd,
        unix::{
            net::{UnixListener, UnixStream},
            process::CommandExt,
        },
    },
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args
        .get(1)
        .is_some_and(|a| a.ends_with("ts/model_service_worker.py"))
    {
        return worker(args.get(3).context("worker: no socket path")?);
    }
    let port: u16 = args
        .iter()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .context("usage: fake_frontend PORT")?;
    frontend(port)
}

/// The worker: accepts the frontend's connection and reads (and drops) everything until it closes.
fn worker(path: &str) -> Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).with_context(|| format!("binding {path}"))?;
    let (mut conn, _) = listener.accept()?;
    let mut buf = vec![0u8; 1 << 16];
    while conn.read(&mut buf)? > 0 {}
    let _ = std::fs::remove_file(path);
    Ok(())
}

fn frontend(port: u16) -> Result<()> {
    let path = format!("/tmp/.ts.sock.{port}");
    let _ = std::fs::remove_file(&path);
    let me = std::env::current_exe()?;
    let mut child = Command::new(me)
        .arg0("python")
        .args(["ts/model_service_worker.py", "--sock-name", &path])
        .stdin(Stdio::null())
        .spawn()
        .context("starting the worker")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let sock = loop {
        match UnixStream::connect(&path) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => bail!("connecting to the worker at {path}: {e}"),
        }
    };
    // A small send buffer, so that a large frame takes several writes.
    set_sndbuf(&sock, 64 * 1024)?;
    sock.set_nonblocking(true)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    let mut seq = 0u32;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let frame = match words.as_slice() {
            ["load", dir] => load_frame(dir),
            ["batch", n, body] => {
                seq += 1;
                inference_frame(seq, n.parse()?, body.parse()?, 2)
            }
            ["past-end"] => {
                let mut f = vec![b'I'];
                field(&mut f, b"fake-past-end");
                f.extend(1_000_000i32.to_be_bytes());
                f.extend(b"short");
                f
            }
            ["negative"] => {
                let mut f = vec![b'I'];
                f.extend((-7i32).to_be_bytes());
                f.extend([0u8; 16]);
                f
            }
            ["long", headers] => {
                seq += 1;
                inference_frame(seq, 1, 1, headers.parse()?)
            }
            ["junk"] => b"hello, worker: this is no frame\n".to_vec(),
            other => bail!("unknown command {other:?}"),
        };
        write_all_nonblocking(&sock, &frame)?;
        writeln!(out, "ok")?;
        out.flush()?;
    }
    drop(sock);
    let _ = child.wait();
    Ok(())
}

fn field(f: &mut Vec<u8>, bytes: &[u8]) {
    f.extend(i32::try_from(bytes.len()).unwrap_or(i32::MAX).to_be_bytes());
    f.extend(bytes);
}

/// `'L'`, model name, model path, batch size, handler, gpu id, envelope, limitMaxImagePixels.
fn load_frame(dir: &str) -> Vec<u8> {
    let mut f = vec![b'L'];
    field(&mut f, b"fake");
    field(&mut f, dir.as_bytes());
    f.extend(8i32.to_be_bytes());
    field(&mut f, b"fake_handler.py");
    f.extend((-1i32).to_be_bytes());
    field(&mut f, b"");
    f.push(1);
    f
}

/// `'I'`, then per request: id, headers (pairs, ended by -1), parameters (triples, ended by -1);
/// -1 after the last request.
fn inference_frame(seq: u32, requests: usize, body: usize, headers: usize) -> Vec<u8> {
    let mut f = vec![b'I'];
    for k in 0..requests {
        field(&mut f, format!("fake-{seq}-{k}").as_bytes());
        for h in 0..headers {
            field(&mut f, format!("h{h}").as_bytes());
            field(&mut f, b"v");
        }
        f.extend((-1i32).to_be_bytes());
        field(&mut f, b"body");
        field(&mut f, b"application/octet-stream");
        field(&mut f, &vec![b'x'; body]);
        f.extend((-1i32).to_be_bytes());
    }
    f.extend((-1i32).to_be_bytes());
    f
}

/// Writes all of `buf` on a non-blocking socket with write(2), as Netty does (std's `UnixStream`
/// would use sendto(2)), each call taking what the socket accepts.
fn write_all_nonblocking(sock: &UnixStream, mut buf: &[u8]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !buf.is_empty() {
        // SAFETY: a valid fd and a buffer of buf.len() readable bytes.
        let n = unsafe { libc::write(sock.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if let Ok(n) = usize::try_from(n) {
            buf = &buf[n..];
            continue;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        } else {
            return Err(e).context("writing to the worker");
        }
    }
    Ok(())
}

fn set_sndbuf(sock: &UnixStream, bytes: i32) -> Result<()> {
    // SAFETY: a valid socket fd and a pointer to an int of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            std::ptr::from_ref(&bytes).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!("SO_SNDBUF: {}", std::io::Error::last_os_error());
    }
    Ok(())
}
