//! servescope: watches TorchServe from the kernel and serves its metrics in TorchServe's own format.
//!
//! The data path, one module per stage (DESIGN.md):
//! [`probes`] (load/attach the eBPF programs, read the ring buffer) → [`events`] (the kernel/user ABI)
//! → [`http`] (per-connection HTTP/1.x reconstruction) → [`routing`] (URL → model/version) →
//! [`registry`] (TorchServe's counting rules) → [`exposition`] (the :8082 endpoint).
//! [`discovery`] finds the processes to trace; [`sampler`] adds system and GPU metrics; [`config`] holds
//! the command line.
//! [`sink`] writes per-request logs (JSON lines, syslog, latency CSV) from the same exchanges.

pub mod config;
pub mod discovery;
pub mod doctor;
pub mod events;
pub mod exposition;
pub mod http;
pub mod metric_lines;
pub mod otf;
pub mod pipeline;
pub mod privileges;
pub mod probe_site;
pub mod probes;
pub mod reader_thread;
pub mod recent_ids;
pub mod registry;
pub mod routing;
pub mod sampler;
pub mod sink;
pub mod workers;

/// Hash maps on the per-record path (connection ids, PIDs, request ids): foldhash instead of std's
/// SipHash, which took ~10% of the agent's CPU under TorchServe load (perf, bench/RESULTS.md). Each
/// map is seeded at random, so keys a client can influence still hash unpredictably.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub(crate) type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
