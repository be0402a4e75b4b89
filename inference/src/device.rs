//! Backend selection: the one place that maps a run-time device choice to a Burn backend type.
//!
//! Backends are cargo features: `flex` (pure-Rust CPU, the default), `wgpu` (Vulkan/Metal/DX12,
//! or Mesa's lavapipe on a machine without a GPU) and `cuda`. A [`DeviceChoice`] (`cpu`, `wgpu`,
//! `cuda` or `auto`) is resolved at run time into a [`Device`], probing GPUs without letting a
//! missing driver crash the process; model code is generic over `B: Backend` and is instantiated
//! through [`Device::visit`] with a [`BackendVisitor`].
//!
//! A build without any backend feature (a model-less proxy node) still compiles: `Device` then
//! has no variants and every choice resolves to an error naming the feature to enable.
#![cfg_attr(
    not(any(feature = "flex", feature = "wgpu", feature = "cuda")),
    allow(unreachable_code, unused_variables)
)]

use std::fmt;
use std::str::FromStr;

use crate::llm::qweight::QuantOps;

/// The device a user asks for (CLI flag or config value).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// The CPU (`flex` backend, quantized kernels for the chat model).
    Cpu,
    /// A GPU through wgpu (Vulkan, Metal, DX12); lavapipe counts when explicitly chosen.
    Wgpu,
    /// An NVIDIA GPU through CUDA.
    Cuda,
    /// The best backend that is both compiled in and present: CUDA, then a hardware wgpu
    /// adapter, then the CPU.
    #[default]
    Auto,
}

impl DeviceChoice {
    /// Every accepted spelling, for help texts.
    pub const VARIANTS: [&'static str; 4] = ["cpu", "wgpu", "cuda", "auto"];

    /// Resolves the choice into a usable device, probing GPUs as needed. The decision and the
    /// reason for every fallback are logged.
    pub fn resolve(self) -> Result<Device, DeviceError> {
        match self {
            DeviceChoice::Cpu => cpu_device(),
            DeviceChoice::Wgpu => wgpu_device(true),
            DeviceChoice::Cuda => cuda_device(),
            DeviceChoice::Auto => {
                let mut reasons = Vec::new();
                match cuda_device() {
                    Ok(device) => return Ok(logged(device, "auto")),
                    Err(e) => reasons.push(e.to_string()),
                }
                match wgpu_device(false) {
                    Ok(device) => return Ok(logged(device, "auto")),
                    Err(e) => reasons.push(e.to_string()),
                }
                match cpu_device() {
                    Ok(device) => {
                        tracing::info!(
                            reasons = %reasons.join("; "),
                            "no usable gpu backend, using the cpu"
                        );
                        return Ok(logged(device, "auto"));
                    }
                    Err(e) => reasons.push(e.to_string()),
                }
                // A build without `flex` still runs on a software wgpu adapter.
                match wgpu_device(true) {
                    Ok(device) => Ok(logged(device, "auto")),
                    Err(e) => {
                        reasons.push(e.to_string());
                        Err(DeviceError::NoneAvailable {
                            reasons: reasons.join("; "),
                        })
                    }
                }
            }
        }
    }
}

fn logged(device: Device, how: &str) -> Device {
    tracing::info!(device = %device, choice = how, "inference device selected");
    device
}

impl FromStr for DeviceChoice {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(DeviceChoice::Cpu),
            "wgpu" | "gpu" | "vulkan" => Ok(DeviceChoice::Wgpu),
            "cuda" => Ok(DeviceChoice::Cuda),
            "auto" => Ok(DeviceChoice::Auto),
            other => Err(DeviceError::UnknownChoice(other.to_string())),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Wgpu => "wgpu",
            DeviceChoice::Cuda => "cuda",
            DeviceChoice::Auto => "auto",
        })
    }
}

/// Why a device could not be used.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DeviceError {
    /// The device name is not one of `cpu`, `wgpu`, `cuda`, `auto`.
    #[error("unknown device {0:?}: expected one of cpu, wgpu, cuda, auto")]
    UnknownChoice(String),
    /// The backend was not compiled into this binary.
    #[error(
        "the {backend} backend is not compiled into this build; rebuild with `--features {feature}` or choose another device"
    )]
    NotCompiled {
        /// The backend asked for.
        backend: &'static str,
        /// The cargo feature that enables it.
        feature: &'static str,
    },
    /// The backend is compiled in but no usable device was found.
    #[error("no usable {backend} device: {reason}")]
    Unavailable {
        /// The backend probed.
        backend: &'static str,
        /// What the probe reported.
        reason: String,
    },
    /// `auto` found nothing usable at all.
    #[error("no inference device is usable: {reasons}")]
    NoneAvailable {
        /// Why each backend was rejected.
        reasons: String,
    },
}

/// A resolved device of one of the compiled backends (a build without any backend feature has
/// none, and every [`DeviceChoice`] resolves to an error naming the feature to enable).
#[derive(Clone, Debug, PartialEq)]
pub enum Device {
    /// The CPU through the `flex` backend.
    #[cfg(feature = "flex")]
    Cpu,
    /// A wgpu adapter.
    #[cfg(feature = "wgpu")]
    Wgpu {
        /// The burn device handle.
        device: burn::backend::wgpu::WgpuDevice,
        /// The adapter's name and type, for logs.
        adapter: String,
        /// Whether the adapter is a software rasteriser on the CPU (lavapipe, llvmpipe).
        software: bool,
    },
    /// An NVIDIA GPU.
    #[cfg(feature = "cuda")]
    Cuda(burn::backend::cuda::CudaDevice),
}

impl Device {
    /// Whether this is the CPU backend (where the chat model runs on quantized kernels).
    pub fn is_cpu(&self) -> bool {
        #[cfg(feature = "flex")]
        if matches!(self, Device::Cpu) {
            return true;
        }
        false
    }

    /// The backend's short name: `cpu`, `wgpu` or `cuda`.
    pub fn backend_name(&self) -> &'static str {
        match *self {
            #[cfg(feature = "flex")]
            Device::Cpu => "cpu",
            #[cfg(feature = "wgpu")]
            Device::Wgpu { .. } => "wgpu",
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => "cuda",
        }
    }

    /// Runs `visitor` with this device's backend type: the single place where a run-time device
    /// becomes a compile-time `B: Backend`.
    pub fn visit<V: BackendVisitor>(&self, visitor: V) -> V::Output {
        // `match *self` (not `self`) so that a build without any backend, where `Device` has no
        // variants, still compiles.
        match *self {
            #[cfg(feature = "flex")]
            Device::Cpu => visitor.visit::<Cpu>(Default::default(), self),
            #[cfg(feature = "wgpu")]
            Device::Wgpu { ref device, .. } => visitor.visit::<Wgpu>(device.clone(), self),
            #[cfg(feature = "cuda")]
            Device::Cuda(ref device) => visitor.visit::<Cuda>(device.clone(), self),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            #[cfg(feature = "flex")]
            Device::Cpu => f.write_str("cpu"),
            #[cfg(feature = "wgpu")]
            Device::Wgpu { ref adapter, .. } => write!(f, "wgpu ({adapter})"),
            #[cfg(feature = "cuda")]
            Device::Cuda(ref d) => write!(f, "cuda:{}", d.index),
        }
    }
}

/// Code generic over the backend, instantiated by [`Device::visit`].
pub trait BackendVisitor {
    /// What the visit produces.
    type Output;
    /// Called with the backend type `B`, its device handle, and the resolved [`Device`].
    fn visit<B: QuantOps>(self, device: B::Device, resolved: &Device) -> Self::Output;
}

/// The CPU backend type.
#[cfg(feature = "flex")]
pub type Cpu = burn::backend::Flex;
/// The wgpu backend type (with kernel fusion).
#[cfg(feature = "wgpu")]
pub type Wgpu = burn::backend::Wgpu<f32, i32>;
/// The CUDA backend type (with kernel fusion).
#[cfg(feature = "cuda")]
pub type Cuda = burn::backend::Cuda<f32, i32>;

fn cpu_device() -> Result<Device, DeviceError> {
    #[cfg(feature = "flex")]
    {
        Ok(Device::Cpu)
    }
    #[cfg(not(feature = "flex"))]
    {
        Err(DeviceError::NotCompiled {
            backend: "cpu",
            feature: "flex",
        })
    }
}

/// Runs `probe`, turning a panic (a missing driver, no adapter) into an error message. The
/// panic hook is silenced meanwhile so the probe does not print a backtrace.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn catch_probe<T>(probe: impl FnOnce() -> T) -> Result<T, String> {
    use std::sync::Mutex;
    static PROBE_LOCK: Mutex<()> = Mutex::new(());
    let _guard = PROBE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(probe));
    std::panic::set_hook(previous);
    result.map_err(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_string()))
            .unwrap_or_else(|| "the driver panicked without a message".to_string())
    })
}

#[cfg(feature = "wgpu")]
fn wgpu_device(allow_software: bool) -> Result<Device, DeviceError> {
    use burn::backend::wgpu::{RuntimeOptions, WgpuDevice, graphics::AutoGraphicsApi, init_setup};
    use std::sync::OnceLock;

    // Initialising the default device twice would create a second wgpu device: probe once.
    static PROBE: OnceLock<Result<(String, bool), String>> = OnceLock::new();
    let probe = PROBE.get_or_init(|| {
        catch_probe(|| {
            let setup = init_setup::<AutoGraphicsApi>(
                &WgpuDevice::DefaultDevice,
                RuntimeOptions::default(),
            );
            let info = setup.adapter.get_info();
            // `wgpu::DeviceType` is not re-exported by burn; its Debug name is stable.
            let kind = format!("{:?}", info.device_type);
            let software = kind == "Cpu";
            (
                format!("{}, {kind}, {:?}", info.name, info.backend),
                software,
            )
        })
    });
    match probe {
        Ok((adapter, software)) => {
            if *software && !allow_software {
                return Err(DeviceError::Unavailable {
                    backend: "wgpu",
                    reason: format!(
                        "the only adapter is a software renderer ({adapter}), slower than the cpu backend"
                    ),
                });
            }
            Ok(Device::Wgpu {
                device: WgpuDevice::DefaultDevice,
                adapter: adapter.clone(),
                software: *software,
            })
        }
        Err(reason) => Err(DeviceError::Unavailable {
            backend: "wgpu",
            reason: format!("{reason} (install a vulkan driver, e.g. mesa-vulkan-drivers)"),
        }),
    }
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_device(_allow_software: bool) -> Result<Device, DeviceError> {
    Err(DeviceError::NotCompiled {
        backend: "wgpu",
        feature: "wgpu",
    })
}

#[cfg(feature = "cuda")]
fn cuda_device() -> Result<Device, DeviceError> {
    use burn::backend::cuda::CudaDevice;
    use burn::tensor::Tensor;
    use std::sync::OnceLock;

    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    let probe = PROBE.get_or_init(|| {
        catch_probe(|| {
            let device = CudaDevice { index: 0 };
            let t = Tensor::<Cuda, 1>::from_floats([1.0f32, 2.0], &device);
            (t.clone() + t).into_data().to_vec::<f32>().map(|_| ())
        })
        .and_then(|r| r.map_err(|e| format!("{e:?}")))
    });
    match probe {
        Ok(()) => Ok(Device::Cuda(CudaDevice { index: 0 })),
        Err(reason) => Err(DeviceError::Unavailable {
            backend: "cuda",
            reason: format!("{reason} (needs an nvidia gpu with its driver and libnvrtc)"),
        }),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_device() -> Result<Device, DeviceError> {
    Err(DeviceError::NotCompiled {
        backend: "cuda",
        feature: "cuda",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_print() {
        for name in DeviceChoice::VARIANTS {
            let choice: DeviceChoice = name.parse().expect("valid name");
            assert_eq!(choice.to_string(), name);
        }
        assert_eq!("CPU".parse::<DeviceChoice>(), Ok(DeviceChoice::Cpu));
        let err = "tpu".parse::<DeviceChoice>().unwrap_err();
        assert!(
            err.to_string()
                .contains("expected one of cpu, wgpu, cuda, auto")
        );
    }

    #[cfg(feature = "flex")]
    #[test]
    fn cpu_resolves_and_auto_never_fails_with_flex() {
        assert_eq!(DeviceChoice::Cpu.resolve(), Ok(Device::Cpu));
        let device = DeviceChoice::Auto
            .resolve()
            .expect("auto falls back to the cpu");
        assert!(!device.backend_name().is_empty());
    }

    #[cfg(all(feature = "wgpu", feature = "flex"))]
    #[test]
    fn auto_never_picks_a_software_adapter() {
        if let Ok(Device::Wgpu {
            software, adapter, ..
        }) = DeviceChoice::Auto.resolve()
        {
            assert!(!software, "auto chose the software adapter {adapter}");
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn missing_backend_names_the_feature() {
        let err = DeviceChoice::Cuda.resolve().unwrap_err();
        assert!(err.to_string().contains("--features cuda"), "{err}");
    }

    #[cfg(feature = "flex")]
    #[test]
    fn visitor_sees_the_backend() {
        struct Name;
        impl BackendVisitor for Name {
            type Output = String;
            fn visit<B: crate::llm::qweight::QuantOps>(
                self,
                _device: B::Device,
                resolved: &Device,
            ) -> String {
                format!(
                    "{} {}",
                    resolved.backend_name(),
                    B::name(&Default::default())
                )
            }
        }
        let name = Device::Cpu.visit(Name);
        assert!(name.starts_with("cpu "), "{name}");
    }
}
