//! Project tasks for servescope, run as `cargo xtask <command>` (alias in `.cargo/config.toml`).
//!
//! Written in Rust rather than shell so the same code runs on a laptop, in CI and in the demo, and so
//! the demo can share the integration tests' harness (`tests/src/lib.rs`) for starting and stopping
//! TorchServe and the agent.

mod bench;
mod demo;
mod fuzz;
mod tasks;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "servescope project tasks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the agent (`target/debug/servescope`, or `target/release/servescope` with --release).
    Build {
        /// Optimised build.
        #[arg(long)]
        release: bool,
    },
    /// Regenerate ebpf/vmlinux.h from this machine's kernel BTF (needs bpftool).
    Vmlinux {
        /// Write here instead of ebpf/vmlinux.h.
        #[arg(long, value_name = "PATH")]
        out: Option<std::path::PathBuf>,
    },
    /// Everything CI checks: rustfmt, clippy, unit tests, root integration tests
    ///
    /// The integration tests run the agent against real servers, among them a real TorchServe 0.12
    /// installed under target/torchserve (cached). They need root and fail without it: they never skip.
    Test {
        /// Only formatting, clippy and unit tests (no root needed).
        #[arg(long, conflicts_with = "integration")]
        unit: bool,
        /// Only the root integration tests.
        #[arg(long)]
        integration: bool,
        /// Extra arguments for the integration test binaries, e.g. a test name filter.
        #[arg(last = true, value_name = "TEST_ARGS")]
        test_args: Vec<String>,
    },
    /// Overhead and capacity benchmarks; writes bench/RESULTS.md and bench/results.json (root)
    ///
    /// h1server and a real TorchServe, each with the agent off and on in alternating runs: throughput
    /// (wrk), added latency at a fixed rate, agent CPU and BPF run time per request, event loss at
    /// 5k/10k/20k req/s, RSS at 1/100/1,000 models, /metrics render time, start-up, connection churn.
    /// Prints PASS/FAIL per target. Fails if any event is lost or any request goes uncounted, or if a
    /// throughput ratio is below its server's regression floor (h1server 0.6, TorchServe 0.8; a
    /// quick-mode ratio below it is measured again first). Missed targets are reported, not failed
    /// (bench/MISSES.md says why the floors are not the 0.9).
    Bench(bench::Options),
    /// Fuzz the untrusted-input paths with cargo-fuzz (nightly): HTTP stream, ring records, OTF frames,
    /// routing, configuration
    ///
    /// Seeds each target's corpus (fuzz/corpus/<target>) from the real captures in tests/golden, then
    /// runs the targets one after the other and prints executions per target. Needs `rustup toolchain
    /// install nightly` and `cargo install cargo-fuzz`. `cargo xtask test` runs the stable proptest
    /// harness over the same paths instead (agent/tests/parser_props.rs).
    Fuzz(fuzz::Options),
    /// TorchServe + servescope + traffic; both /metrics side by side (root)
    ///
    /// Installs what is missing (apt packages, TorchServe under target/torchserve), starts TorchServe
    /// and the agent (on 127.0.0.1:9082), sends traffic, and prints the agent's /metrics next to
    /// TorchServe's own. Stops everything it started, also on Ctrl-C.
    Demo {
        /// Use an optimised agent build.
        #[arg(long)]
        release: bool,
        /// Plain echo predictions in the traffic mix (traffic.py --n).
        #[arg(long, default_value_t = 10)]
        n: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Build { release } => {
            tasks::build(release).map(|bin| println!("built {}", bin.display()))
        }
        Command::Vmlinux { out } => tasks::vmlinux(out),
        Command::Test {
            unit,
            integration,
            test_args,
        } => tasks::test(!integration, !unit, &test_args),
        Command::Demo { release, n } => demo::run(release, n),
        Command::Bench(options) => bench::run(options),
        Command::Fuzz(options) => fuzz::run(&options),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
