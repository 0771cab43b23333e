//! Running helper commands (shell scripts, traffic.py) with a time bound and their output in a log file.

use std::{
    fs::File,
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::tail;

/// Runs `cmd` to completion with stdout and stderr appended to `log`; kills it after `timeout`. A non-zero
/// exit or a timeout is an error that quotes the end of the log.
pub fn run_logged(cmd: &mut Command, what: &str, log: &Path, timeout: Duration) -> Result<()> {
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening log {}", log.display()))?;
    let err = out.try_clone().context("duplicating the log file handle")?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {what} ({cmd:?})"))?;
    match wait_timeout(&mut child, timeout)? {
        Some(status) if status.success() => Ok(()),
        Some(status) => bail!(
            "{what} failed ({status}); end of {}:\n{}",
            log.display(),
            tail(log, 40)
        ),
        None => {
            kill_and_reap(&mut child);
            bail!(
                "{what} did not finish within {timeout:?}; killed it. End of {}:\n{}",
                log.display(),
                tail(log, 40)
            )
        }
    }
}

/// Waits for `child` for at most `timeout`; `None` if it is still running then.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().context("waiting for a child process")? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Asks `child` to stop with SIGTERM (so the agent can detach its programs and flush), waits up to
/// `grace`, then SIGKILLs it. Always reaps it. Returns the exit status if it could be collected.
pub fn terminate(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: plain kill(2) on a child we have not reaped yet, so the pid cannot have been reused.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    match wait_timeout(child, grace) {
        Ok(Some(status)) => Some(status),
        _ => {
            kill_and_reap(child);
            child.try_wait().ok().flatten()
        }
    }
}

fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}
