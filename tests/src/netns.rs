//! Simulated pods: code that must run inside another process's network namespace (its own loopback).

use std::{fs::File, os::fd::AsRawFd, thread};

use anyhow::{Context, Result, bail};

/// Runs `f` on a thread that has joined the network namespace of process `pid`: its sockets reach that
/// namespace's 127.0.0.1. (setns with CLONE_NEWNET affects only the calling thread, so the test's other
/// threads stay where they are.)
pub fn run_in<T: Send + 'static>(
    pid: u32,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let ns = File::open(format!("/proc/{pid}/ns/net"))
        .with_context(|| format!("opening the network namespace of process {pid}"))?;
    thread::spawn(move || {
        // SAFETY: setns on an open namespace fd; it changes only this thread's network namespace.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in the network namespace of {pid} panicked"))?
}
