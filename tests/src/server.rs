//! Small test servers run as their own processes (e.g. `tests/servers/predict_server.py`), so the agent
//! can trace them with `--pid`/`--port` without also seeing the test's own client sockets.

use std::{
    ffi::OsStr,
    fs::File,
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, PoisonError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    cleanup::{self, Registration},
    process, tail,
    torchserve::loopback,
    workspace_root,
};

/// A server process listening on a loopback port; killed (SIGTERM, then SIGKILL) when dropped.
pub struct ServerProcess {
    child: Arc<Mutex<Child>>,
    addr: SocketAddr,
    stop: Option<Registration>,
}

impl ServerProcess {
    /// `tests/servers/predict_server.py` on 127.0.0.1:`port` (reads with recvfrom, answers with two
    /// sendto calls), logging to `<log_dir>/predict_server.log`.
    pub fn predict_server(log_dir: &Path, port: u16) -> Result<ServerProcess> {
        let script = workspace_root().join("tests/servers/predict_server.py");
        let (script, port_arg) = (script.to_string_lossy().into_owned(), port.to_string());
        Self::start(
            log_dir,
            "predict_server",
            port,
            "python3",
            &[script.as_str(), port_arg.as_str()],
        )
    }

    /// Runs `program args...` with output in `<log_dir>/<name>.log` and waits (at most 10 s) until
    /// 127.0.0.1:`port` accepts connections. The readiness probe only connects and closes: it sends no
    /// bytes, so even an agent already tracing the server sees no HTTP from it.
    pub fn start<S: AsRef<OsStr>>(
        log_dir: &Path,
        name: &str,
        port: u16,
        program: S,
        args: &[S],
    ) -> Result<Self> {
        let log = log_dir.join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("duplicating the log file handle")?;
        let child = Command::new(&program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name} ({})", program.as_ref().to_string_lossy()))?;
        let pid = child.id();
        let child = Arc::new(Mutex::new(child));
        let to_stop = Arc::clone(&child);
        let stop = cleanup::register(move || {
            let mut child = to_stop.lock().unwrap_or_else(PoisonError::into_inner);
            process::terminate(&mut child, Duration::from_secs(3));
        });
        let server = ServerProcess {
            child,
            addr: loopback(port),
            stop: Some(stop),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = server
                .child
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .try_wait()
                .context("polling the server")?
            {
                bail!(
                    "{name} (pid {pid}) exited ({status}) before listening on {}:\n{}",
                    server.addr,
                    tail(&log, 30)
                );
            }
            if TcpStream::connect_timeout(&server.addr, Duration::from_millis(200)).is_ok() {
                return Ok(server);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{name} (pid {pid}) did not listen on {} within 10 s:\n{}",
                    server.addr,
                    tail(&log, 30)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .id()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(reg) = self.stop.take() {
            reg.run();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;
    use crate::http;

    #[test]
    fn starts_answers_and_stops() -> Result<()> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir =
            std::env::temp_dir().join(format!("servescope-server-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let port_arg = port.to_string();
        let server = ServerProcess::start(
            &dir,
            "http.server",
            port,
            "python3",
            &[
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                port_arg.as_str(),
            ],
        )?;
        let pid = server.pid();
        let r = http::get(server.addr(), "/", Duration::from_secs(5))?;
        assert_eq!(r.status, 200);
        drop(server);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "server {pid} still running after drop"
        );
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
