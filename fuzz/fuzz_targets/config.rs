//! The configuration surface: the request-log TOML file (parsed and merged with flags) and the command
//! line (clap, then `Cli::into_config`'s checks). Bad input must be an error value, never a panic.
//!
//! Input: a TOML text; if it contains a NUL byte, what follows is command-line arguments separated by
//! NUL bytes.

#![no_main]

use clap::Parser;
use libfuzzer_sys::fuzz_target;
use servescope::{config::Cli, sink::config::SinkArgs};

fuzz_target!(|data: &[u8]| {
    let (toml, args) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    if let Ok(text) = std::str::from_utf8(toml) {
        let _ = SinkArgs {
            config: Some("fuzz.toml".into()),
            ..SinkArgs::default()
        }
        .resolve_text(text);
    }
    if let Some(args) = args {
        let args = args
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned());
        // `into_config` would open files named by --config; keep the run free of file-system effects.
        if let Ok(cli) = Cli::try_parse_from(std::iter::once("servescope".to_owned()).chain(args))
            && cli.sinks.config.is_none()
            && cli.sinks.request_log.is_none()
            && cli.sinks.latency_csv.is_none()
        {
            let _ = cli.into_config();
        }
    }
});
