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
//! TorchServe lacks: exact memory bytes, temperature and power (`servescope_gpu_*`).
//!
//! [`NvmlSource`] loads `libnvidia-ml.so.1` at run time (nvml-wrapper dlopens it), so the agent
//! starts on machines without a driver and reports that once; tests use a fake [`GpuSource`].

use nvml_wrapper::{Nvml, enum_wrappers::device::TemperatureSensor, error::NvmlError};

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
}

/// Where GPU readings come from: NVML, or a fake in tests.
pub trait GpuSource: Send {
    /// Every device, in index order.
    fn devices(&mut self) -> Result<Vec<GpuReading>, GpuError>;
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
    nvml: Nvml,
}

impl NvmlSource {
    /// Loads `libnvidia-ml.so.1` and initialises NVML. A missing library is [`GpuError::NoLibrary`]
    /// (nvml-wrapper reports dlopen failures as errors; nothing is linked at build time).
    pub fn open() -> Result<NvmlSource, GpuError> {
        match Nvml::init() {
            Ok(nvml) => Ok(NvmlSource { nvml }),
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
            });
        }
        Ok(out)
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
    }

    /// This machine (and CI) has no NVIDIA driver: opening NVML must be a clean "not available", not a
    /// panic or an abort.
    #[test]
    fn absent_library_is_an_error_value() {
        if std::path::Path::new("/dev/nvidiactl").exists() {
            // A GPU host: the real source must open and list devices instead.
            let mut s = NvmlSource::open().expect("NVML opens on a GPU host");
            assert!(s.devices().is_ok());
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
