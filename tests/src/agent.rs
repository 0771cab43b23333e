//! The servescope agent under test, run as its binary.

use std::{
    env,
    fs::File,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, PoisonError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};

use crate::{
    Metrics,
    cleanup::{self, Registration},
    http, process, tail, target_dir, workspace_root,
};

/// How long the agent gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Timeout of one scrape of the agent.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// A running `servescope` process. Stopped (SIGTERM, then SIGKILL) when dropped; its stderr goes to a log
/// file that is printed when the guard drops, which `cargo test` shows only for a failing test.
pub struct Agent {
    child: Arc<Mutex<Child>>,
    listen: SocketAddr,
    log: PathBuf,
    echo_log_on_drop: bool,
    stop: Option<Registration>,
}

impl Agent {
    /// The binary to run: `$SERVESCOPE_BIN` if set (xtask sets it; a relative path is taken from the
    /// workspace root, since `cargo test` runs tests in the package directory), else
    /// `target/debug/servescope`.
    pub fn binary() -> Result<PathBuf> {
        let bin = match env::var_os("SERVESCOPE_BIN") {
            Some(b) if !b.is_empty() => workspace_root().join(b),
            _ => target_dir().join("debug/servescope"),
        };
        if !bin.is_file() {
            bail!(
                "agent binary {} not found: build it first (`cargo xtask test` does, or `cargo build -p servescope`), \
                 or point SERVESCOPE_BIN at it",
                bin.display()
            );
        }
        Ok(bin)
    }

    /// Starts the agent serving on `listen`, with `args` appended (`--port`, `--pid`, `--no-discovery`,
    /// ...). Logs go to `<log_dir>/servescope.log`; `RUST_LOG` defaults to `info`. Returns at once: call
    /// [`Agent::wait_ready`] before sending traffic that must be counted.
    pub fn start(log_dir: &Path, listen: SocketAddr, args: &[&str]) -> Result<Agent> {
        Self::start_binary(&Self::binary()?, log_dir, listen, args)
    }

    /// [`Agent::start`] with an explicit binary (the demo runs the debug or the release build).
    pub fn start_binary(
        bin: &Path,
        log_dir: &Path,
        listen: SocketAddr,
        args: &[&str],
    ) -> Result<Agent> {
        let log = log_dir.join("servescope.log");
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("duplicating the log file handle")?;
        let mut cmd = Command::new(bin);
        cmd.arg("--listen").arg(listen.to_string()).args(args);
        if env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        // The log is a file, read by people in test output: no colour escapes.
        cmd.env("NO_COLOR", "1");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {} {}", bin.display(), args.join(" ")))?;
        let child = Arc::new(Mutex::new(child));
        let to_stop = Arc::clone(&child);
        let stop = cleanup::register(move || {
            let mut child = to_stop.lock().unwrap_or_else(PoisonError::into_inner);
            match process::terminate(&mut child, STOP_GRACE) {
                Some(status) if status.success() => {}
                Some(status) => eprintln!(
                    "servescope (pid {}) exited with {status} when stopped",
                    child.id()
                ),
                None => eprintln!("servescope (pid {}) could not be reaped", child.id()),
            }
        });
        Ok(Agent {
            child,
            listen,
            log,
            echo_log_on_drop: true,
            stop: Some(stop),
        })
    }

    /// The agent's PID (to read its kernel maps, see [`crate::kernel`]).
    pub fn pid(&self) -> u32 {
        self.child
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .id()
    }

    /// The address the agent serves /metrics on.
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// Its log file (stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Whether dropping the guard prints the agent's log (default: yes; `cargo test` hides it unless the
    /// test fails). The demo turns it off and prints the log itself on error.
    pub fn echo_log_on_drop(&mut self, on: bool) {
        self.echo_log_on_drop = on;
    }

    /// The end of the agent's log, for error messages.
    pub fn log_tail(&self) -> String {
        tail(&self.log, 60)
    }

    /// An error if the agent has exited (with its status and log).
    pub fn check_running(&self) -> Result<()> {
        let mut child = self.child.lock().unwrap_or_else(PoisonError::into_inner);
        match child.try_wait().context("polling the agent process")? {
            None => Ok(()),
            Some(status) => Err(anyhow!(
                "servescope exited ({status}); end of its log:\n{}",
                self.log_tail()
            )),
        }
    }

    /// `GET /metrics` (optionally with a query such as `?name[]=Requests2XX`): the body of a 200 answer.
    pub fn scrape_text(&self, query: &str) -> Result<String> {
        let r = http::get(self.listen, &format!("/metrics{query}"), SCRAPE_TIMEOUT)?;
        if r.status != 200 {
            bail!(
                "servescope /metrics{query} answered {}: {}",
                r.status,
                r.text()
            );
        }
        String::from_utf8(r.body).context("servescope /metrics is not UTF-8")
    }

    /// `GET /metrics`, parsed.
    pub fn scrape(&self) -> Result<Metrics> {
        let text = self.scrape_text("")?;
        Metrics::parse(&text).context("parsing servescope /metrics")
    }

    /// Polls until /metrics answers and `servescope_targets` >= 1, i.e. at least one process is traced.
    /// Fails early if the agent exits (e.g. BPF could not load), with its log.
    pub fn wait_ready(&self, timeout: Duration) -> Result<Metrics> {
        self.wait_until(timeout, "servescope_targets >= 1", |m| {
            m.sum("servescope_targets") >= 1.0
        })
        .context("waiting for servescope to trace its target")
    }

    /// Polls /metrics (every 100 ms, at most `timeout`) until `done` holds for a scrape; returns that
    /// scrape. Used after traffic, because the agent counts asynchronously from its ring buffer.
    pub fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        done: impl Fn(&Metrics) -> bool,
    ) -> Result<Metrics> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_running()?;
            let last = match self.scrape() {
                Ok(m) if done(&m) => return Ok(m),
                other => other,
            };
            if Instant::now() >= deadline {
                let state = match &last {
                    Ok(m) => format!("last scrape had {} series", m.samples.len()),
                    Err(e) => format!("last scrape failed: {e:#}"),
                };
                bail!(
                    "servescope did not reach `{what}` within {timeout:?} ({state}); end of its log:\n{}",
                    self.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the agent (SIGTERM, then SIGKILL after 5 s) and returns how it exited. A clean stop exits 0.
    pub fn stop(mut self) -> Result<ExitStatus> {
        self.echo_log_on_drop = false;
        let mut child = self.child.lock().unwrap_or_else(PoisonError::into_inner);
        let status =
            process::terminate(&mut child, STOP_GRACE).context("the agent could not be reaped")?;
        drop(child);
        // Already stopped: forget the registered action instead of running it.
        if let Some(reg) = self.stop.take() {
            reg.run();
        }
        Ok(status)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(reg) = self.stop.take() {
            reg.run();
        }
        if self.echo_log_on_drop {
            eprintln!(
                "---- servescope log ({}) ----\n{}---- end of servescope log ----",
                self.log.display(),
                self.log_tail()
            );
        }
    }
}
