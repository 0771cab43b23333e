//! The running agent's operability: /metrics behind TLS and a bearer token (scraped with curl, a
//! self-signed certificate made by openssl), and SIGHUP rereading the request-log configuration, the
//! log level, the certificate and the token — with a bad new file keeping the old setting and saying
//! why in the log.

use std::{
    fs,
    net::SocketAddr,
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use servescope_integration::{Agent, ServerProcess, http, log_dir, require_root, workspace_root};

const TIMEOUT: Duration = Duration::from_secs(15);

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn predict_server(logs: &Path, port: u16) -> Result<ServerProcess> {
    let script = workspace_root().join("tests/servers/predict_server.py");
    let (script, port_arg) = (script.to_string_lossy().into_owned(), port.to_string());
    ServerProcess::start(
        logs,
        "predict_server",
        port,
        "python3",
        &[script.as_str(), port_arg.as_str()],
    )
}

fn hup(agent: &Agent) -> Result<()> {
    let pid = i32::try_from(agent.pid())?;
    // SAFETY: kill(2) has no memory preconditions.
    ensure!(
        unsafe { libc::kill(pid, libc::SIGHUP) } == 0,
        "kill -HUP {pid}"
    );
    Ok(())
}

/// Waits until the agent's log has `n` lines containing `needle`.
fn wait_log(agent: &Agent, needle: &str, n: usize) -> Result<String> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        agent.check_running()?;
        let log = fs::read_to_string(agent.log_path())?;
        if log.matches(needle).count() >= n {
            return Ok(log);
        }
        if Instant::now() > deadline {
            bail!(
                "no `{needle}` (x{n}) in the agent's log:\n{}",
                agent.log_tail()
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// `curl` against the agent: (status, headers, body). `scheme` http or https.
fn curl(
    scheme: &str,
    agent: SocketAddr,
    ca: &Path,
    token: Option<&str>,
) -> Result<(u16, String, String)> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "5", "-D", "-", "--cacert"])
        .arg(ca)
        .arg(format!("{scheme}://localhost:{}/metrics", agent.port()))
        .args([
            "--resolve",
            &format!("localhost:{}:127.0.0.1", agent.port()),
        ]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = cmd.output().context("running curl")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Ok((
            0,
            String::from_utf8_lossy(&out.stderr).into_owned(),
            String::new(),
        ));
    };
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, head.to_owned(), body.to_owned()))
}

fn self_signed(dir: &Path, name: &str) -> Result<()> {
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args([
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
        ])
        .arg("-keyout")
        .arg(dir.join(format!("{name}.key")))
        .arg("-out")
        .arg(dir.join(format!("{name}.crt")))
        .output()
        .context("running openssl")?;
    ensure!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn tls_and_bearer_token_and_their_reload() -> Result<()> {
    require_root()?;
    let logs = log_dir("reload_tls")?;
    let server = predict_server(&logs, 18_192)?;
    self_signed(&logs, "one")?;
    self_signed(&logs, "two")?;
    let (cert, key, token) = (
        logs.join("tls.crt"),
        logs.join("tls.key"),
        logs.join("token"),
    );
    fs::copy(logs.join("one.crt"), &cert)?;
    fs::copy(logs.join("one.key"), &key)?;
    fs::write(&token, "first-t0ken\n")?;
    let listen = loopback(19_192);
    let agent = Agent::start(
        &logs,
        listen,
        &[
            "--no-discovery",
            "--port",
            "18192",
            "--tls-cert",
            &cert.to_string_lossy(),
            "--tls-key",
            &key.to_string_lossy(),
            "--auth-token-file",
            &token.to_string_lossy(),
        ],
    )?;
    let ca_one = logs.join("one.crt");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        agent.check_running()?;
        let (status, _, body) = curl("https", listen, &ca_one, Some("first-t0ken"))?;
        if status == 200 && body.contains("servescope_targets 1") {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "agent not ready over TLS: {status} {body}"
        );
        thread::sleep(Duration::from_millis(200));
    }
    let r = http::post(server.addr(), "/predictions/m", b"x", TIMEOUT)?;
    ensure!(r.status == 200);

    let (status, head, body) = curl("https", listen, &ca_one, None)?;
    assert_eq!(status, 401, "{head}");
    ensure!(
        head.to_ascii_lowercase()
            .contains("www-authenticate: bearer realm=\"servescope\""),
        "{head}"
    );
    ensure!(!body.contains("# TYPE"), "metrics leaked without the token");
    assert_eq!(curl("https", listen, &ca_one, Some("wrong"))?.0, 401);
    let (status, _, _) = curl("http", listen, &ca_one, Some("first-t0ken"))?;
    ensure!(
        status != 200,
        "plain HTTP must not be answered on the TLS port"
    );

    // Rotated token and renewed certificate: SIGHUP, then only the new ones work.
    fs::write(&token, "second-t0ken")?;
    fs::copy(logs.join("two.crt"), &cert)?;
    fs::copy(logs.join("two.key"), &key)?;
    hup(&agent)?;
    wait_log(
        &agent,
        "SIGHUP: /metrics access reloaded (TLS, bearer token)",
        1,
    )?;
    let ca_two = logs.join("two.crt");
    assert_eq!(curl("https", listen, &ca_two, Some("first-t0ken"))?.0, 401);
    assert_eq!(curl("https", listen, &ca_two, Some("second-t0ken"))?.0, 200);
    assert_eq!(
        curl("https", listen, &ca_one, Some("second-t0ken"))?.0,
        0,
        "the old certificate is no longer served"
    );

    // A broken key and an empty token: logged, and the running setting stays.
    fs::write(&key, "not a key")?;
    fs::write(&token, "")?;
    hup(&agent)?;
    let log = wait_log(
        &agent,
        "SIGHUP: keeping the previous /metrics TLS and token",
        1,
    )?;
    ensure!(
        log.contains(&key.to_string_lossy().into_owned()),
        "the log names the bad file"
    );
    assert_eq!(curl("https", listen, &ca_two, Some("second-t0ken"))?.0, 200);
    agent.check_running()?;
    let status = agent.stop()?;
    ensure!(status.success(), "agent exited with {status}");
    Ok(())
}

fn json_lines(path: &Path) -> usize {
    fs::read_to_string(path).map_or(0, |s| s.lines().count())
}

fn wait_lines(path: &Path, n: usize) -> Result<()> {
    let deadline = Instant::now() + TIMEOUT;
    while json_lines(path) < n {
        ensure!(
            Instant::now() < deadline,
            "{} has {} lines, want {n}",
            path.display(),
            json_lines(path)
        );
        thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

#[test]
fn sighup_reloads_the_request_logs_and_log_level_and_keeps_them_when_the_file_is_bad() -> Result<()>
{
    require_root()?;
    let logs = log_dir("reload_config")?;
    let server = predict_server(&logs, 18_193)?;
    let (first, second) = (logs.join("first.jsonl"), logs.join("second.jsonl"));
    let config = logs.join("servescope.toml");
    fs::write(
        &config,
        format!("[request_log]\npath = \"{}\"\n", first.display()),
    )?;
    let agent = Agent::start(
        &logs,
        loopback(19_193),
        &[
            "--no-discovery",
            "--port",
            "18193",
            "--config",
            &config.to_string_lossy(),
        ],
    )?;
    agent.wait_ready(Duration::from_secs(30))?;
    let send = |n: usize| -> Result<()> {
        for _ in 0..n {
            let r = http::post(server.addr(), "/predictions/m", b"x", TIMEOUT)?;
            ensure!(r.status == 200);
        }
        Ok(())
    };
    send(5)?;
    wait_lines(&first, 5)?;
    ensure!(
        !fs::read_to_string(agent.log_path())?.contains("DEBUG"),
        "the default level is info"
    );

    // New path and a debug log level.
    fs::write(
        &config,
        format!(
            "log_level = \"debug\"\n[request_log]\npath = \"{}\"\n",
            second.display()
        ),
    )?;
    hup(&agent)?;
    wait_log(
        &agent,
        "SIGHUP: request-log sinks restarted with the new configuration",
        1,
    )?;
    wait_log(&agent, "log filter changed", 1)?;
    send(3)?;
    wait_lines(&second, 3)?;
    assert_eq!(json_lines(&first), 5, "the old file gets nothing more");
    wait_log(&agent, "DEBUG", 1)?;

    // A bad file: the error names the key; the sinks and level stay as they were.
    fs::write(
        &config,
        format!(
            "[request_log]\npath = \"{}\"\nsample_rat = 0.5\n",
            first.display()
        ),
    )?;
    hup(&agent)?;
    let log = wait_log(
        &agent,
        "SIGHUP: keeping the previous request-log configuration",
        1,
    )?;
    ensure!(
        log.contains("sample_rat"),
        "the error names the bad key:\n{}",
        agent.log_tail()
    );
    send(2)?;
    wait_lines(&second, 5)?;
    assert_eq!(json_lines(&first), 5);

    // SIGHUP with the same file: logrotate's rename, then a new file at the same path.
    fs::write(
        &config,
        format!(
            "log_level = \"debug\"\n[request_log]\npath = \"{}\"\n",
            second.display()
        ),
    )?;
    let rotated = logs.join("second.jsonl.1");
    fs::rename(&second, &rotated)?;
    hup(&agent)?;
    wait_log(
        &agent,
        "request-log configuration unchanged; reopening the log files",
        1,
    )?;
    send(4)?;
    wait_lines(&second, 4)?;
    assert_eq!(json_lines(&rotated), 5);

    // SIGTERM: what is queued is written, the agent exits 0.
    let status = agent.stop()?;
    ensure!(status.success(), "agent exited with {status}");
    assert_eq!(json_lines(&second), 4);
    Ok(())
}
