//! Request-log configuration: command-line flags (with `SERVESCOPE_*` environment equivalents) and
//! a TOML file (`--config`) for what flags cannot say (filters, sampling, per-sink rotation).
//!
//! Precedence, highest first: flags/environment, the sink's own table in the file, the file's
//! `[rotation]` table, built-in defaults. Relative paths are taken from the agent's working
//! directory. The file format, with every key:
//!
//! ```toml
//! [rotation]                # defaults for request_log and latency_csv
//! size = 104857600          # bytes; 0 turns size rotation off
//! interval = 86400          # seconds; 0 = off; rotates at multiples of it since the epoch (UTC)
//! retain = 5                # rotated files kept: PATH.1 (newest) ... PATH.5
//!
//! [request_log]             # JSON lines; `--request-log PATH` enables it too
//! enabled = true            # default true once the table exists
//! path = "/var/log/servescope/requests.jsonl"
//! models = ["resnet18"]     # only these models (leaves out non-inference requests)
//! status = ["4xx", "5xx"]   # only these status classes
//! sample_rate = 0.1         # fraction of matching requests written, exactly every 10th here
//! queue = 8192              # records waiting for the writer before the reader drops (counted)
//! rotation = { size = 10485760, retain = 10 }
//!
//! [latency_csv]             # same keys as [request_log]; only completed inference requests
//! path = "/var/log/servescope/latency.csv"
//!
//! [syslog]                  # `--syslog ADDR` enables it too
//! address = "udp://127.0.0.1:514"   # unix:/dev/log, /dev/log, tcp://host:port, host:port (UDP)
//! format = "rfc5424"        # or "rfc3164"; default 5424, but 3164 on a local socket
//! facility = "local0"
//! app_name = "servescope"
//! severity = { "2xx" = "info", "4xx" = "warning", "5xx" = "err" }
//! models = ["resnet18"]     # and status, sample_rate, queue as above
//! ```

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::sink::{
    filter::{Filter, PPM},
    rotate::Rotation,
    syslog::{Facility, Severities, Severity, SyslogAddr, SyslogFormat},
};

/// Default rotation: 100 MiB files, no time rotation, five rotated files kept.
pub const DEFAULT_ROTATION: Rotation = Rotation {
    max_bytes: Some(100 * 1024 * 1024),
    interval: None,
    retain: 5,
};
/// Default queue per sink: a few seconds of a busy server's requests.
pub const DEFAULT_QUEUE: usize = 8192;
const MAX_QUEUE: usize = 1 << 20;
/// More rotated files than this is a typo, and each rotation would stat them all.
const MAX_RETAIN: u32 = 10_000;

/// The request-log flags (flattened into the agent's command line).
#[derive(Clone, Debug, Default, clap::Args)]
#[command(next_help_heading = "Request logs")]
pub struct SinkArgs {
    /// TOML file configuring the request-log sinks: enable, path, rotation, filters by model and
    /// status class, sampling rate. Flags override it.
    #[arg(long = "config", env = "SERVESCOPE_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Write one JSON object per request to PATH (JSON lines), rotated by size/time.
    #[arg(long, env = "SERVESCOPE_REQUEST_LOG", value_name = "PATH")]
    pub request_log: Option<PathBuf>,

    /// Send one syslog message per request: unix:PATH or /dev/log (local socket), udp://host:port,
    /// tcp://host:port (octet-counted framing), or host:port (UDP).
    #[arg(long, env = "SERVESCOPE_SYSLOG", value_name = "ADDR")]
    pub syslog: Option<SyslogAddr>,

    /// Syslog message format. Default: rfc5424 over UDP and TCP, rfc3164 on a local socket (what
    /// rsyslog and journald parse there).
    #[arg(
        long,
        env = "SERVESCOPE_SYSLOG_FORMAT",
        value_enum,
        value_name = "FORMAT"
    )]
    pub syslog_format: Option<SyslogFormat>,

    /// Syslog facility, by name (local0, daemon, ...) or number. Default: user.
    #[arg(long, env = "SERVESCOPE_SYSLOG_FACILITY", value_name = "FACILITY")]
    pub syslog_facility: Option<Facility>,

    /// Write one CSV row (timestamp,model,version,status,latency_ms) per completed inference request.
    #[arg(long, env = "SERVESCOPE_LATENCY_CSV", value_name = "PATH")]
    pub latency_csv: Option<PathBuf>,

    /// Rotate the request log and the latency CSV before they exceed BYTES (0: never by size).
    /// Default: 104857600.
    #[arg(long, env = "SERVESCOPE_LOG_ROTATE_SIZE", value_name = "BYTES")]
    pub log_rotate_size: Option<u64>,

    /// Also rotate them every SECS seconds, on multiples of SECS since the epoch (0: never by time,
    /// the default).
    #[arg(long, env = "SERVESCOPE_LOG_ROTATE_INTERVAL", value_name = "SECS")]
    pub log_rotate_interval: Option<u64>,

    /// Rotated files to keep (PATH.1 newest ... PATH.N). Default: 5.
    #[arg(long, env = "SERVESCOPE_LOG_RETAIN", value_name = "N")]
    pub log_retain: Option<u32>,
}

/// A file sink (request log or latency CSV).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileSinkConfig {
    pub path: PathBuf,
    pub rotation: Rotation,
    pub filter: Filter,
    pub queue: usize,
}

/// The syslog sink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyslogConfig {
    pub address: SyslogAddr,
    pub format: SyslogFormat,
    pub facility: Facility,
    pub app_name: String,
    pub severities: Severities,
    pub filter: Filter,
    pub queue: usize,
}

/// Which sinks run, and how. All `None`: no request logs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SinksConfig {
    pub request_log: Option<FileSinkConfig>,
    pub latency_csv: Option<FileSinkConfig>,
    pub syslog: Option<SyslogConfig>,
    /// The agent's own log filter (`RUST_LOG` syntax, e.g. `info,servescope=debug`) from the file's
    /// top-level `log_level`. Not a sink setting, but in the file SIGHUP rereads, so the level can be
    /// changed without a restart.
    pub log_level: Option<String>,
}

/// A config file that cannot be used; the message names the file, line and key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "config file {path}, line {line}, column {column}{}: {message}",
        key_note(key)
    )]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        /// Dotted key path (`request_log.rotation.size`); empty when the error is not inside a key.
        key: String,
        message: String,
    },
    #[error("config file {path}{}, key `{key}`: {message}", line.map(|l| format!(", line {l}")).unwrap_or_default())]
    Invalid {
        path: PathBuf,
        line: Option<usize>,
        key: String,
        message: String,
    },
}

fn key_note(key: &str) -> String {
    if key.is_empty() || key == "." {
        String::new()
    } else {
        format!(", key `{key}`")
    }
}

// ---- the file's schema ---------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileToml {
    log_level: Option<LogLevel>,
    rotation: Option<RotationToml>,
    request_log: Option<FileSinkToml>,
    latency_csv: Option<FileSinkToml>,
    syslog: Option<SyslogToml>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RotationToml {
    size: Option<u64>,
    interval: Option<u64>,
    retain: Option<Retain>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSinkToml {
    enabled: Option<bool>,
    path: Option<NonEmptyPath>,
    rotation: Option<RotationToml>,
    models: Option<BTreeSet<String>>,
    status: Option<Vec<StatusClass>>,
    sample_rate: Option<SampleRate>,
    queue: Option<Queue>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SyslogToml {
    enabled: Option<bool>,
    address: Option<AddressToml>,
    format: Option<SyslogFormat>,
    facility: Option<Facility>,
    app_name: Option<AppName>,
    severity: Option<SeverityToml>,
    models: Option<BTreeSet<String>>,
    status: Option<Vec<StatusClass>>,
    sample_rate: Option<SampleRate>,
    queue: Option<Queue>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SeverityToml {
    #[serde(rename = "1xx")]
    c1: Option<Severity>,
    #[serde(rename = "2xx")]
    c2: Option<Severity>,
    #[serde(rename = "3xx")]
    c3: Option<Severity>,
    #[serde(rename = "4xx")]
    c4: Option<Severity>,
    #[serde(rename = "5xx")]
    c5: Option<Severity>,
}

// Values checked while parsing, so that a bad one is reported with its line and key.

#[derive(Debug, Deserialize)]
#[serde(try_from = "String")]
struct LogLevel(String);

impl TryFrom<String> for LogLevel {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        tracing_subscriber::EnvFilter::try_new(&s)
            .map(|_| LogLevel(s.clone()))
            .map_err(|e| {
                format!("log_level `{s}` is not a log filter (e.g. `info,servescope=debug`): {e}")
            })
    }
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(try_from = "u32")]
struct Retain(u32);

impl TryFrom<u32> for Retain {
    type Error = String;
    fn try_from(n: u32) -> Result<Self, String> {
        if n <= MAX_RETAIN {
            Ok(Retain(n))
        } else {
            Err(format!("retain {n} is more than {MAX_RETAIN}"))
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(try_from = "String")]
struct NonEmptyPath(PathBuf);

impl TryFrom<String> for NonEmptyPath {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s.trim().is_empty() {
            Err("path is empty".to_owned())
        } else {
            Ok(NonEmptyPath(PathBuf::from(s)))
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(try_from = "String")]
struct StatusClass(u8);

impl TryFrom<String> for StatusClass {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "1xx" => Ok(StatusClass(1)),
            "2xx" => Ok(StatusClass(2)),
            "3xx" => Ok(StatusClass(3)),
            "4xx" => Ok(StatusClass(4)),
            "5xx" => Ok(StatusClass(5)),
            _ => Err(format!(
                "`{s}` is not a status class (1xx, 2xx, 3xx, 4xx or 5xx)"
            )),
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(try_from = "f64")]
struct SampleRate(u32);

impl TryFrom<f64> for SampleRate {
    type Error = String;
    fn try_from(r: f64) -> Result<Self, String> {
        if (0.0..=1.0).contains(&r) {
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "r is within 0..=1, so the product is within 0..=1e6"
            )]
            Ok(SampleRate((r * f64::from(PPM)).round() as u32))
        } else {
            Err(format!("sample_rate {r} is not between 0 and 1"))
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(try_from = "usize")]
struct Queue(usize);

impl TryFrom<usize> for Queue {
    type Error = String;
    fn try_from(n: usize) -> Result<Self, String> {
        if (1..=MAX_QUEUE).contains(&n) {
            Ok(Queue(n))
        } else {
            Err(format!("queue {n} is not between 1 and {MAX_QUEUE}"))
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(try_from = "String")]
struct AddressToml(SyslogAddr);

impl TryFrom<String> for AddressToml {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse().map(AddressToml)
    }
}

#[derive(Debug, Deserialize)]
#[serde(try_from = "String")]
struct AppName(String);

impl TryFrom<String> for AppName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if !s.is_empty() && s.len() <= 48 && s.chars().all(|c| c.is_ascii_graphic()) {
            Ok(AppName(s))
        } else {
            Err(format!(
                "app_name `{s}` must be 1 to 48 printable ASCII characters without spaces"
            ))
        }
    }
}

// ---- loading and merging -------------------------------------------------------------------------

/// Parses the config file at `path`.
fn load(path: &Path) -> Result<(FileToml, String), ConfigFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let parsed = parse_text(path, &text)?;
    Ok((parsed, text))
}

/// Parses `text`, the contents of the config file at `path` (named in errors).
fn parse_text(path: &Path, text: &str) -> Result<FileToml, ConfigFileError> {
    parse(text).map_err(|(span, key, message)| {
        let (line, column) = line_column(text, span.map_or(0, |s| s.start));
        ConfigFileError::Syntax {
            path: path.to_owned(),
            line,
            column,
            key,
            message,
        }
    })
}

/// The file's tables, or (where, which key, what is wrong).
fn parse(text: &str) -> Result<FileToml, (Option<std::ops::Range<usize>>, String, String)> {
    let de = toml::Deserializer::parse(text)
        .map_err(|e| (e.span(), String::new(), e.message().to_owned()))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        (inner.span(), key, inner.message().to_owned())
    })
}

/// 1-based line and column of byte `offset`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The line of table header `[name]`, for errors about a table as a whole.
fn table_line(text: &str, name: &str) -> Option<usize> {
    let header = format!("[{name}]");
    text.lines()
        .position(|l| l.trim_start().starts_with(&header))
        .map(|i| i + 1)
}

fn overlay(mut r: Rotation, t: Option<&RotationToml>) -> Rotation {
    if let Some(t) = t {
        if let Some(size) = t.size {
            r.max_bytes = (size > 0).then_some(size);
        }
        if let Some(secs) = t.interval {
            r.interval = (secs > 0).then(|| Duration::from_secs(secs));
        }
        if let Some(Retain(n)) = t.retain {
            r.retain = n;
        }
    }
    r
}

fn filter(
    models: Option<BTreeSet<String>>,
    status: Option<Vec<StatusClass>>,
    rate: Option<SampleRate>,
) -> Filter {
    let classes: Option<Vec<u8>> = status.map(|v| v.into_iter().map(|c| c.0).collect());
    Filter::new(models, classes.as_deref(), rate.map_or(PPM, |r| r.0))
}

impl SinkArgs {
    /// Reads the config file (if any) and merges it with the flags.
    pub fn resolve(&self) -> anyhow::Result<SinksConfig> {
        let (file, text) = match &self.config {
            Some(p) => load(p)?,
            None => (FileToml::default(), String::new()),
        };
        self.merge(file, &text)
    }

    /// As [`SinkArgs::resolve`], with `text` standing for the config file's contents (the fuzz target
    /// `sink_config` drives parsing and merging without a file per input).
    pub fn resolve_text(&self, text: &str) -> anyhow::Result<SinksConfig> {
        let path = self.config.clone().unwrap_or_default();
        let file = parse_text(&path, text)?;
        self.merge(file, text)
    }

    /// Merges the parsed config file (`text` is its contents, for line numbers) with the flags.
    fn merge(&self, file: FileToml, text: &str) -> anyhow::Result<SinksConfig> {
        let config_path = self.config.clone().unwrap_or_default();
        let invalid = |table: &str, key: &str, message: String| ConfigFileError::Invalid {
            path: config_path.clone(),
            line: table_line(text, table),
            key: format!("{table}.{key}"),
            message,
        };
        anyhow::ensure!(
            self.log_retain.is_none_or(|n| n <= MAX_RETAIN),
            "--log-retain {} is more than {MAX_RETAIN}",
            self.log_retain.unwrap_or(0)
        );
        let base = overlay(DEFAULT_ROTATION, file.rotation.as_ref());
        let cli = RotationToml {
            size: self.log_rotate_size,
            interval: self.log_rotate_interval,
            retain: self.log_retain.map(Retain),
        };

        let file_sink = |table: &str,
                         flag: &Option<PathBuf>,
                         section: Option<FileSinkToml>|
         -> Result<Option<FileSinkConfig>, ConfigFileError> {
            // The flag enables the sink even if the file says `enabled = false`, with the file's
            // other settings.
            let in_file = section.as_ref().is_some_and(|s| s.enabled.unwrap_or(true));
            if flag.is_none() && !in_file {
                return Ok(None);
            }
            let s = section.unwrap_or_default();
            let path = match (flag, s.path) {
                (Some(p), _) => p.clone(),
                (None, Some(NonEmptyPath(p))) => p,
                (None, None) => {
                    return Err(invalid(
                        table,
                        "path",
                        "the sink is enabled but has no path".into(),
                    ));
                }
            };
            let rotation = overlay(overlay(base.clone(), s.rotation.as_ref()), Some(&cli));
            Ok(Some(FileSinkConfig {
                path,
                rotation,
                filter: filter(s.models, s.status, s.sample_rate),
                queue: s.queue.map_or(DEFAULT_QUEUE, |q| q.0),
            }))
        };
        let request_log = file_sink("request_log", &self.request_log, file.request_log)?;
        let latency_csv = file_sink("latency_csv", &self.latency_csv, file.latency_csv)?;
        if let (Some(a), Some(b)) = (&request_log, &latency_csv) {
            anyhow::ensure!(
                a.path != b.path,
                "the request log and the latency CSV both write to {}",
                a.path.display()
            );
        }

        let syslog = match file.syslog {
            Some(s) if self.syslog.is_some() || s.enabled.unwrap_or(true) => {
                let address = match (&self.syslog, s.address) {
                    (Some(a), _) => a.clone(),
                    (None, Some(AddressToml(a))) => a,
                    (None, None) => {
                        return Err(invalid(
                            "syslog",
                            "address",
                            "the sink is enabled but has no address".into(),
                        )
                        .into());
                    }
                };
                let mut severities = Severities::default();
                if let Some(t) = s.severity {
                    for (class, sev) in [(1, t.c1), (2, t.c2), (3, t.c3), (4, t.c4), (5, t.c5)] {
                        if let Some(sev) = sev {
                            severities.by_class[class] = sev;
                        }
                    }
                }
                let format = self
                    .syslog_format
                    .or(s.format)
                    .unwrap_or_else(|| SyslogFormat::default_for(&address));
                Some(SyslogConfig {
                    address,
                    format,
                    facility: self.syslog_facility.or(s.facility).unwrap_or_default(),
                    app_name: s.app_name.map_or_else(|| "servescope".to_owned(), |a| a.0),
                    severities,
                    filter: filter(s.models, s.status, s.sample_rate),
                    queue: s.queue.map_or(DEFAULT_QUEUE, |q| q.0),
                })
            }
            _ => self.syslog.as_ref().map(|a| SyslogConfig {
                address: a.clone(),
                format: self
                    .syslog_format
                    .unwrap_or_else(|| SyslogFormat::default_for(a)),
                facility: self.syslog_facility.unwrap_or_default(),
                app_name: "servescope".to_owned(),
                severities: Severities::default(),
                filter: Filter::default(),
                queue: DEFAULT_QUEUE,
            }),
        };
        Ok(SinksConfig {
            request_log,
            latency_csv,
            syslog,
            log_level: file.log_level.map(|l| l.0),
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sinks: SinkArgs,
    }

    fn resolve(args: &[&str]) -> anyhow::Result<SinksConfig> {
        Cli::try_parse_from(std::iter::once("servescope").chain(args.iter().copied()))?
            .sinks
            .resolve()
    }

    fn with_file(toml: &str, args: &[&str]) -> anyhow::Result<SinksConfig> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("servescope.toml");
        std::fs::write(&path, toml)?;
        let p = path.to_string_lossy().into_owned();
        let mut all = vec!["--config", p.as_str()];
        all.extend_from_slice(args);
        resolve(&all)
    }

    fn err(toml: &str) -> String {
        match with_file(toml, &[]) {
            Ok(c) => panic!("accepted {toml:?}: {c:?}"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn log_level_is_checked_where_it_is_written() -> anyhow::Result<()> {
        let c = with_file("log_level = \"info,servescope=debug\"\n", &[])?;
        assert_eq!(c.log_level.as_deref(), Some("info,servescope=debug"));
        assert_eq!(with_file("", &[])?.log_level, None);
        let e = err("log_level = \"servescope=[\"\n");
        assert!(e.contains("line 1") && e.contains("key `log_level`"), "{e}");
        assert!(e.contains("is not a log filter"), "{e}");
        // resolve_text (the fuzz target's path) agrees with the file.
        let args = SinkArgs {
            config: Some("x.toml".into()),
            ..SinkArgs::default()
        };
        assert_eq!(
            args.resolve_text("log_level = \"warn\"\n")?
                .log_level
                .as_deref(),
            Some("warn")
        );
        Ok(())
    }

    #[test]
    fn nothing_configured_means_no_sinks() -> anyhow::Result<()> {
        assert_eq!(resolve(&[])?, SinksConfig::default());
        Ok(())
    }

    #[test]
    fn flags() -> anyhow::Result<()> {
        let c = resolve(&[
            "--request-log",
            "/tmp/r.jsonl",
            "--latency-csv",
            "/tmp/l.csv",
            "--syslog",
            "tcp://127.0.0.1:601",
            "--syslog-format",
            "rfc3164",
            "--syslog-facility",
            "local4",
            "--log-rotate-size",
            "1000",
            "--log-rotate-interval",
            "3600",
            "--log-retain",
            "3",
        ])?;
        let r = c.request_log.expect("request log");
        assert_eq!(r.path, PathBuf::from("/tmp/r.jsonl"));
        let want = Rotation {
            max_bytes: Some(1000),
            interval: Some(Duration::from_secs(3600)),
            retain: 3,
        };
        assert_eq!(r.rotation, want);
        assert_eq!(c.latency_csv.expect("csv").rotation, want);
        let s = c.syslog.expect("syslog");
        assert_eq!(s.address, SyslogAddr::Tcp("127.0.0.1:601".into()));
        assert_eq!(s.format, SyslogFormat::Rfc3164);
        assert_eq!(s.facility, Facility(20));
        Ok(())
    }

    #[test]
    fn defaults_of_a_flag_enabled_sink() -> anyhow::Result<()> {
        let c = resolve(&["--request-log", "r.jsonl", "--log-rotate-size", "0"])?;
        let r = c.request_log.expect("request log");
        assert_eq!(r.rotation.max_bytes, None, "0 turns size rotation off");
        assert_eq!(r.rotation.retain, DEFAULT_ROTATION.retain);
        assert_eq!(r.queue, DEFAULT_QUEUE);
        assert_eq!(r.filter, Filter::default());
        Ok(())
    }

    #[test]
    fn full_file() -> anyhow::Result<()> {
        let c = with_file(
            r#"
[rotation]
size = 5000
retain = 2

[request_log]
path = "/var/log/r.jsonl"
models = ["a"]
status = ["5xx"]
sample_rate = 0.5
queue = 10
rotation = { interval = 60 }

[latency_csv]
enabled = false
path = "/var/log/l.csv"

[syslog]
address = "unix:/dev/log"
facility = "daemon"
app_name = "ts"
severity = { "2xx" = "notice" }
"#,
            &["--log-retain", "9"],
        )?;
        let r = c.request_log.expect("request log");
        assert_eq!(
            r.rotation,
            Rotation {
                max_bytes: Some(5000),
                interval: Some(Duration::from_secs(60)),
                retain: 9,
            }
        );
        assert_eq!(r.queue, 10);
        assert_eq!(
            r.filter,
            Filter::new(Some(["a".to_owned()].into()), Some(&[5]), PPM / 2)
        );
        assert!(c.latency_csv.is_none());
        let s = c.syslog.expect("syslog");
        assert_eq!(s.address, SyslogAddr::Unix("/dev/log".into()));
        assert_eq!(s.facility, Facility(3));
        assert_eq!(s.app_name, "ts");
        assert_eq!(s.severities.by_class[2], Severity::Notice);
        assert_eq!(s.severities.by_class[5], Severity::Err);
        Ok(())
    }

    #[test]
    fn flags_override_the_file() -> anyhow::Result<()> {
        let c = with_file(
            "[request_log]\nenabled = false\npath = \"/a\"\n[syslog]\naddress = \"h:514\"\n",
            &["--request-log", "/b", "--syslog", "tcp://h:601"],
        )?;
        assert_eq!(
            c.request_log.expect("enabled by the flag").path,
            PathBuf::from("/b")
        );
        assert_eq!(
            c.syslog.expect("syslog").address,
            SyslogAddr::Tcp("h:601".into())
        );
        Ok(())
    }

    #[test]
    fn malformed_files_name_file_line_and_key() {
        let e = err("[rotation]\nsize = \"big\"\n");
        assert!(
            e.contains("servescope.toml, line 2, column 8, key `rotation.size`"),
            "{e}"
        );
        assert!(
            e.contains("invalid type: string \"big\", expected u64"),
            "{e}"
        );

        let e = err("[request_log]\npath = \"/x\"\nsample_rate = 1.5\n");
        assert!(
            e.contains("line 3") && e.contains("`request_log.sample_rate`"),
            "{e}"
        );
        assert!(e.contains("not between 0 and 1"), "{e}");

        let e = err("[request_log]\npath = \"/x\"\nstatus = [\"2xx\", \"6xx\"]\n");
        assert!(
            e.contains("line 3") && e.contains("`request_log.status[1]`"),
            "{e}"
        );
        assert!(e.contains("`6xx` is not a status class"), "{e}");

        let e = err("[syslog]\naddres = \"h:1\"\n");
        assert!(e.contains("line 2") && e.contains("`syslog.addres`"), "{e}");
        assert!(e.contains("unknown field `addres`"), "{e}");

        let e = err("[syslog]\naddress = \"ftp://h:1\"\n");
        assert!(
            e.contains("`syslog.address`") && e.contains("unknown scheme"),
            "{e}"
        );

        let e = err("[syslog]\naddress = \"h:1\"\nfacility = \"local9\"\n");
        assert!(
            e.contains("line 3") && e.contains("unknown syslog facility `local9`"),
            "{e}"
        );

        let e = err("[syslog]\naddress = \"h:1\"\nseverity = { \"2xx\" = \"loud\" }\n");
        assert!(
            e.contains("`syslog.severity.2xx`") && e.contains("unknown variant `loud`"),
            "{e}"
        );

        let e = err("[request_log\npath = 1\n");
        assert!(
            e.contains("line 1, column 13") && e.contains("unclosed table"),
            "{e}"
        );

        let e = err("\n\n[latency_csv]\nqueue = 100\n");
        assert!(
            e.contains("line 3, key `latency_csv.path`") && e.contains("no path"),
            "{e}"
        );

        let e = err("[request_log]\npath = \"\"\n");
        assert!(e.contains("line 2") && e.contains("path is empty"), "{e}");

        let e = err("[rotation]\nretain = 100000\n");
        assert!(
            e.contains("`rotation.retain`") && e.contains("more than"),
            "{e}"
        );
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let e = resolve(&["--config", "/nonexistent/servescope.toml"])
            .map(|_| ())
            .expect_err("must fail");
        assert!(
            e.to_string()
                .contains("cannot read config file /nonexistent/servescope.toml"),
            "{e}"
        );
    }

    #[test]
    fn bad_flags() {
        let e = |a: &[&str]| format!("{:#}", resolve(a).map(|_| ()).expect_err("must fail"));
        assert!(e(&["--syslog", "tcp://nohost"]).contains("expected tcp://host:port"));
        assert!(e(&["--syslog-facility", "nope"]).contains("unknown syslog facility"));
        assert!(e(&["--syslog-format", "rfc1"]).contains("invalid value"));
        assert!(e(&["--request-log", "/a", "--latency-csv", "/a"]).contains("both write to /a"));
    }
}
