//! GPU readings from NVML, and TorchServe's GPU families computed from them.
//!
//! TorchServe 0.12's collector (`ts/metrics/system_metrics.py`, `gpu_utilization`) takes, per device:
//! - `GPUMemoryUsed`: `nvgpu.gpu_info()["mem_used"]`, the used MiB that `nvidia-smi` prints (whole MiB);
//! - `GPUMemoryUtilization`: `nvgpu.gpu_info()["mem_used_percent"]` = `100 * used MiB / total MiB` —
//!   the share of memory *allocated*, not NVML's memory-controller busy percentage (`nvidia-smi
//!   utilization.memory`), which TorchServe does not read;
//! - `GPUUtilization`: `nvmlDeviceGetUtilizationRates().gpu`, the percent of the last sample period in
//!   which a kernel ran;
//! - `DeviceId`: the NVML index (what `nvidia-smi -L` numbers).
//!
//! servescope computes the same from NVML directly (no `nvidia-smi` process) and adds what
//! TorchServe lacks (`servescope_gpu_*`): exact memory bytes, temperature, power, SM clock, ECC
//! error counts, XID events, and the GPU memory of each TorchServe worker process.
//!
//! XID events come from an NVML event set polled with a zero timeout at every sample, so nothing
//! blocks; a device or driver that does not support them (most consumer GPUs, vGPU guests) leaves
//! the family without samples, said once in the log.
//!
//! [`NvmlSource`] loads `libnvidia-ml.so.1` at run time (nvml-wrapper dlopens it), so the agent
//! starts on machines without a driver and reports that once; tests use a fake [`GpuSource`].

use nvml_wrapper::{
    Nvml,
    bitmasks::event::EventTypes,
    enum_wrappers::device::{Clock, EccCounter, MemoryError, TemperatureSensor},
    enums::{device::UsedGpuMemory, event::XidError},
    error::NvmlError,
    event::EventSet,
};

use crate::registry::GpuValues;

/// Why GPU readings are unavailable.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// No NVIDIA driver library on this host (or in this container): GPU metrics are off.
    #[error("NVML library not available ({0}); GPU families stay empty")]
    NoLibrary(String),
    /// The library loaded but NVML failed.
    #[error("{what}: {source}")]
    Nvml {
        what: &'static str,
        #[source]
        source: NvmlError,
    },
}

/// One device's raw readings; a field is `None` when the device does not report it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GpuReading {
    /// NVML index.
    pub index: u32,
    /// Percent of the last sample period in which one or more kernels ran.
    pub utilization_percent: Option<u32>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub temperature_celsius: Option<u32>,
    pub power_milliwatts: Option<u32>,
    pub sm_clock_mhz: Option<u32>,
    /// ECC errors over the device's life (NVML's aggregate counters), when ECC is on.
    pub ecc_corrected: Option<u64>,
    pub ecc_uncorrected: Option<u64>,
    /// Processes with a compute context on the device.
    pub processes: Vec<GpuProcess>,
}

/// A process using the device for compute, and its GPU memory (`None`: NVML cannot tell, e.g. under
/// some virtualisation).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GpuProcess {
    /// In the host's PID namespace (NVML's view): the agent runs with the host's PIDs.
    pub pid: u32,
    pub used_bytes: Option<u64>,
}

/// An XID (driver-reported GPU error) event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XidEvent {
    pub device_index: u32,
    /// The XID number; `None` when NVML did not say which.
    pub xid: Option<u64>,
}

/// One process's memory on one device: `servescope_gpu_process_memory_bytes`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessMemory {
    pub device_id: u32,
    pub pid: u32,
    pub bytes: u64,
}

/// GPU memory of the processes `keep` accepts (TorchServe's workers), per device. A process on
/// several devices has a row for each; one whose memory NVML does not report has none.
///
/// This is the join point for per-model GPU memory: `keep` (and later a pid → model map) decides
/// which PIDs are a target's workers.
pub fn process_memory(devices: &[GpuReading], keep: impl Fn(u32) -> bool) -> Vec<ProcessMemory> {
    let mut out: Vec<ProcessMemory> = devices
        .iter()
        .flat_map(|d| {
            d.processes.iter().filter_map(|p| {
                Some(ProcessMemory {
                    device_id: d.index,
                    pid: p.pid,
                    bytes: p.used_bytes?,
                })
            })
        })
        .filter(|p| keep(p.pid))
        .collect();
    out.sort_by_key(|p| (p.device_id, p.pid));
    out
}

/// Where GPU readings come from: NVML, or a fake in tests.
pub trait GpuSource: Send {
    /// Every device, in index order.
    fn devices(&mut self) -> Result<Vec<GpuReading>, GpuError>;

    /// XID events since the last call, without waiting. `None`: this source cannot report them
    /// (the family then has no samples, rather than a misleading zero).
    fn xid_events(&mut self) -> Option<Vec<XidEvent>>;
}

const MIB: u64 = 1024 * 1024;

impl GpuReading {
    /// TorchServe's values for this device, plus servescope's own.
    pub fn values(&self) -> GpuValues {
        // nvidia-smi prints whole MiB; TorchServe's percentage is computed from those.
        let used_mib = self.memory_used_bytes.map(|b| b / MIB);
        let total_mib = self.memory_total_bytes.map(|b| b / MIB);
        let memory_utilization = match (used_mib, total_mib) {
            (Some(used), Some(total)) if total > 0 => Some(100.0 * u64_f64(used) / u64_f64(total)),
            _ => None,
        };
        GpuValues {
            device_id: self.index,
            utilization: self.utilization_percent.map(f64::from),
            memory_utilization,
            memory_used_mb: used_mib.map(u64_f64),
            memory_used_bytes: self.memory_used_bytes.map(u64_f64),
            memory_total_bytes: self.memory_total_bytes.map(u64_f64),
            temperature_celsius: self.temperature_celsius.map(f64::from),
            power_watts: self.power_milliwatts.map(|mw| f64::from(mw) / 1000.0),
            sm_clock_hertz: self.sm_clock_mhz.map(|mhz| f64::from(mhz) * 1e6),
            ecc_corrected: self.ecc_corrected.map(u64_f64),
            ecc_uncorrected: self.ecc_uncorrected.map(u64_f64),
        }
    }
}

#[expect(
    clippy::cast_precision_loss,
    reason = "GPU memory sizes stay far below 2^53 bytes, where f64 is exact"
)]
fn u64_f64(v: u64) -> f64 {
    v as f64
}

/// The real source: NVML through nvml-wrapper.
pub struct NvmlSource {
    /// Leaked: the XID event set borrows it, and the source lives as long as the agent.
    nvml: &'static Nvml,
    /// Per device index; empty when no device takes XID registrations.
    xid: Vec<(u32, EventSet<'static>)>,
}

/// Most XID events taken per poll: a storm must not stall the sampler (the rest wait in NVML).
const MAX_XID_PER_POLL: usize = 256;

/// One XID event set per device that supports them (registration failures release the set they
/// were made on, so a shared set would lose the devices before a refusal). Empty: XIDs off.
fn xid_event_sets(nvml: &'static Nvml) -> Vec<(u32, EventSet<'static>)> {
    let mut sets = Vec::new();
    let mut refused = 0;
    for index in 0..nvml.device_count().unwrap_or(0) {
        let registered = nvml
            .device_by_index(index)
            .map_err(|e| e.to_string())
            .and_then(|device| {
                let set = nvml.create_event_set().map_err(|e| e.to_string())?;
                device
                    .register_events(EventTypes::CRITICAL_XID_ERROR, set)
                    .map_err(|e| e.error.to_string())
            });
        match registered {
            Ok(set) => sets.push((index, set)),
            Err(e) => {
                refused += 1;
                tracing::debug!(index, error = %e, "GPU XID events not supported on this device");
            }
        }
    }
    // None watched: the sampler says so once (`xid_events` is `None`); only a partial refusal here.
    if refused > 0 && !sets.is_empty() {
        tracing::info!(
            refused,
            watched = sets.len(),
            "GPU XID events not available on every device; servescope_gpu_xid_errors_total covers the others"
        );
    }
    sets
}

impl NvmlSource {
    /// Loads `libnvidia-ml.so.1` and initialises NVML. A missing library is [`GpuError::NoLibrary`]
    /// (nvml-wrapper reports dlopen failures as errors; nothing is linked at build time).
    pub fn open() -> Result<NvmlSource, GpuError> {
        match Nvml::init() {
            Ok(nvml) => {
                let nvml: &'static Nvml = Box::leak(Box::new(nvml));
                Ok(NvmlSource {
                    nvml,
                    xid: xid_event_sets(nvml),
                })
            }
            Err(NvmlError::LibloadingError(e)) => Err(GpuError::NoLibrary(e.to_string())),
            // The library is there but the kernel driver is not (e.g. a container image with the
            // user-space libraries on a host without a GPU): the same outcome for the operator.
            Err(NvmlError::DriverNotLoaded) => Err(GpuError::NoLibrary(
                "libnvidia-ml loaded, but the NVIDIA kernel driver is not running".to_owned(),
            )),
            Err(source) => Err(GpuError::Nvml {
                what: "initialising NVML",
                source,
            }),
        }
    }
}

impl GpuSource for NvmlSource {
    fn devices(&mut self) -> Result<Vec<GpuReading>, GpuError> {
        let count = self.nvml.device_count().map_err(|source| GpuError::Nvml {
            what: "counting GPUs",
            source,
        })?;
        let mut out = Vec::new();
        for index in 0..count {
            let device = match self.nvml.device_by_index(index) {
                Ok(d) => d,
                Err(e) => {
                    // A device that fell off the bus (or is being reset) must not hide the others.
                    tracing::debug!(index, error = %e, "GPU not readable; skipped this round");
                    continue;
                }
            };
            let memory = device.memory_info().ok();
            out.push(GpuReading {
                index,
                utilization_percent: device.utilization_rates().ok().map(|u| u.gpu),
                memory_used_bytes: memory.as_ref().map(|m| m.used),
                memory_total_bytes: memory.as_ref().map(|m| m.total),
                temperature_celsius: device.temperature(TemperatureSensor::Gpu).ok(),
                power_milliwatts: device.power_usage().ok(),
                sm_clock_mhz: device.clock_info(Clock::SM).ok(),
                // NotSupported (ECC off or absent) leaves them empty.
                ecc_corrected: device
                    .total_ecc_errors(MemoryError::Corrected, EccCounter::Aggregate)
                    .ok(),
                ecc_uncorrected: device
                    .total_ecc_errors(MemoryError::Uncorrected, EccCounter::Aggregate)
                    .ok(),
                processes: device
                    .running_compute_processes()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|p| GpuProcess {
                        pid: p.pid,
                        used_bytes: match p.used_gpu_memory {
                            UsedGpuMemory::Used(b) => Some(b),
                            UsedGpuMemory::Unavailable => None,
                        },
                    })
                    .collect(),
            });
        }
        Ok(out)
    }

    fn xid_events(&mut self) -> Option<Vec<XidEvent>> {
        if self.xid.is_empty() {
            return None;
        }
        let mut out = Vec::new();
        for (index, set) in &self.xid {
            while out.len() < MAX_XID_PER_POLL {
                // Zero timeout: returns at once with an event or `Timeout`.
                match set.wait(0) {
                    Ok(ev) => out.push(XidEvent {
                        device_index: *index,
                        xid: match ev.event_data {
                            Some(XidError::Value(x)) => Some(x),
                            _ => None,
                        },
                    }),
                    Err(NvmlError::Timeout) => break,
                    Err(e) => {
                        tracing::debug!(index, error = %e, "XID event poll failed; retried next sample");
                        break;
                    }
                }
            }
        }
        Some(out)
    }
}

/// Opens the real source, boxed for [`super::run_gpu`].
pub fn open_nvml() -> Result<Box<dyn GpuSource>, GpuError> {
    NvmlSource::open().map(|s| Box::new(s) as Box<dyn GpuSource>)
}

/// A scripted source for tests: returns its readings every time, or an NVML error when it has none.
#[cfg(test)]
pub struct FakeSource {
    pub readings: Option<Vec<GpuReading>>,
    pub calls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// XID events handed out (all at the first poll); `None`: unsupported.
    pub xids: Option<Vec<XidEvent>>,
}

#[cfg(test)]
impl GpuSource for FakeSource {
    fn devices(&mut self) -> Result<Vec<GpuReading>, GpuError> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.readings.clone().ok_or(GpuError::Nvml {
            what: "fake device query",
            source: NvmlError::Unknown,
        })
    }

    fn xid_events(&mut self) -> Option<Vec<XidEvent>> {
        self.xids.as_mut().map(std::mem::take)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torchserve_gpu_values() {
        let r = GpuReading {
            index: 1,
            utilization_percent: Some(87),
            memory_used_bytes: Some(5_000 * MIB + 123_456),
            memory_total_bytes: Some(16_384 * MIB),
            temperature_celsius: Some(64),
            power_milliwatts: Some(215_250),
            sm_clock_mhz: Some(1_410),
            ecc_corrected: Some(3),
            ecc_uncorrected: Some(0),
            processes: Vec::new(),
        };
        let v = r.values();
        assert_eq!(v.device_id, 1);
        assert_eq!(v.utilization, Some(87.0));
        // Whole MiB as nvidia-smi prints them, and the percentage of those (nvgpu's mem_used_percent).
        assert_eq!(v.memory_used_mb, Some(5000.0));
        assert_eq!(v.memory_utilization, Some(100.0 * 5000.0 / 16384.0));
        assert_eq!(v.memory_used_bytes, Some(5_242_880_000.0 + 123_456.0));
        assert_eq!(v.memory_total_bytes, Some(17_179_869_184.0));
        assert_eq!(v.temperature_celsius, Some(64.0));
        assert_eq!(v.power_watts, Some(215.25));
        assert_eq!(v.sm_clock_hertz, Some(1.41e9));
        assert_eq!(v.ecc_corrected, Some(3.0));
        assert_eq!(v.ecc_uncorrected, Some(0.0));
    }

    #[test]
    fn process_memory_keeps_the_chosen_pids_per_device() {
        let proc = |pid, used_bytes| GpuProcess { pid, used_bytes };
        let devices = [
            GpuReading {
                index: 1,
                processes: vec![proc(30, Some(300)), proc(10, Some(100)), proc(99, Some(9))],
                ..GpuReading::default()
            },
            GpuReading {
                index: 0,
                // Memory NVML cannot report: no row rather than a zero.
                processes: vec![proc(10, Some(50)), proc(20, None)],
                ..GpuReading::default()
            },
        ];
        let rows = process_memory(&devices, |pid| pid != 99);
        let row = |device_id, pid, bytes| ProcessMemory {
            device_id,
            pid,
            bytes,
        };
        assert_eq!(rows, [row(0, 10, 50), row(1, 10, 100), row(1, 30, 300)]);
        assert!(process_memory(&devices, |_| false).is_empty());
    }

    #[test]
    fn unreported_fields_stay_empty() {
        let v = GpuReading {
            index: 0,
            memory_used_bytes: Some(MIB),
            memory_total_bytes: Some(0),
            ..GpuReading::default()
        }
        .values();
        assert_eq!(v.utilization, None);
        assert_eq!(v.memory_utilization, None, "no division by a zero total");
        assert_eq!(v.memory_used_mb, Some(1.0));
        assert_eq!(v.temperature_celsius, None);
        assert_eq!(v.power_watts, None);
        assert_eq!(v.sm_clock_hertz, None);
        assert_eq!(v.ecc_corrected, None, "ECC off: no sample, not zero");
    }

    /// This machine (and CI) has no NVIDIA driver: opening NVML must be a clean "not available", not a
    /// panic or an abort.
    #[test]
    fn absent_library_is_an_error_value() {
        if std::path::Path::new("/dev/nvidiactl").exists() {
            // A GPU host: the real source must open and list devices instead.
            let mut s = NvmlSource::open().expect("NVML opens on a GPU host");
            assert!(s.devices().is_ok());
            // Polling XIDs never blocks, supported or not.
            let t0 = std::time::Instant::now();
            let _ = s.xid_events();
            assert!(t0.elapsed() < std::time::Duration::from_secs(1));
            return;
        }
        match NvmlSource::open() {
            Err(e @ GpuError::NoLibrary(_)) => {
                let msg = e.to_string();
                assert!(msg.contains("not available"), "{msg}");
            }
            Err(e) => panic!("expected NoLibrary, got {e}"),
            Ok(_) => panic!("NVML opened without a driver"),
        }
    }
}
