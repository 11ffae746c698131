//! The GPU context: a device and queue (owned or borrowed from the caller), the adapter's limits,
//! a cache of compiled kernels, and the error-scope plumbing that turns wgpu's asynchronous
//! validation and out-of-memory reports into [`Error`] values.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
#[cfg(not(target_arch = "wasm32"))]
use std::sync::OnceLock;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::kernels::Storage;
use crate::tensor::DType;

/// How to pick and configure the device. Every field defaults to "ask the environment".
#[derive(Clone, Debug, Default)]
pub struct ContextOptions {
    /// Backends to consider. `None` honours `WGPU_BACKEND` (e.g. `vulkan`, `gl`), else all.
    pub backends: Option<wgpu::Backends>,
    /// Pick the first adapter whose name contains this (case-insensitive). `None` honours
    /// `WGPU_ADAPTER_NAME`; when that is unset too, wgpu's default choice is used.
    pub adapter_name: Option<String>,
    /// Pick the adapter at this index of those on the chosen backends (that contain
    /// `adapter_name`, when given), in enumeration order: one process or thread per GPU passes
    /// its rank modulo [`Context::adapters_blocking`]'s length. Default `None`.
    pub adapter_index: Option<usize>,
    /// `None` honours `WGPU_POWER_PREF`, else prefers a high-performance adapter.
    pub power_preference: Option<wgpu::PowerPreference>,
    /// Limits to request. `None` requests the adapter's own limits, so that storage bindings
    /// and buffers can be as large as the hardware allows (wgpu's defaults stop at 128/256 MiB).
    /// Tests pass deliberately small limits here to exercise the limit checks.
    pub limits: Option<wgpu::Limits>,
    /// Store f16 activations packed in `u32` words even when the device has `SHADER_F16`.
    /// Default `false`: native f16 where available, packed elsewhere. Tests set it to run the
    /// fallback path on devices that have the feature.
    pub force_packed_f16: bool,
    /// Optional features (of [`OPTIONAL_FEATURES`]) not to request even where the adapter has
    /// them, so that kernels take their fallback paths. Default empty. Tests set it to run
    /// the fallbacks on devices that have the features (e.g. `SUBGROUP | SHADER_INT64`).
    pub disabled_features: wgpu::Features,
}

/// Optional adapter features normdrop uses when present. Each has a fallback path:
/// `SHADER_F16` (native f16 storage, else packed in u32), `TIMESTAMP_QUERY` (GPU timestamps in
/// `bench`, else wall time), `SUBGROUP` (subgroup operations in BatchNorm's workgroup
/// reductions, else workgroup memory only; on CPU adapters LayerNorm's row-per-subgroup
/// passes, else the row-block path) and `SHADER_INT64` (Philox's 32×32-bit products as
/// one 64-bit multiply, else from 16-bit halves).
pub const OPTIONAL_FEATURES: wgpu::Features = wgpu::Features::SHADER_F16
    .union(wgpu::Features::TIMESTAMP_QUERY)
    .union(wgpu::Features::SUBGROUP)
    .union(wgpu::Features::SHADER_INT64);

/// A GPU device and queue with normdrop's kernel cache. Cheap to clone (shared inside).
///
/// Create one with [`Context::new`] / [`Context::new_blocking`] (normdrop picks and owns the
/// device) or wrap an existing device with [`Context::from_wgpu`].
#[derive(Clone)]
pub struct Context {
    inner: Arc<Inner>,
}

struct Inner {
    /// Unique per context made by [`Context::new`], [`Context::with_options`] or
    /// [`Context::from_wgpu`] (clones share it): what a [`crate::Tensor`] records as its owner.
    id: u64,
    device: wgpu::Device,
    queue: wgpu::Queue,
    adapter_info: wgpu::AdapterInfo,
    kernels: Mutex<HashMap<(TypeId, Storage), Arc<dyn Any + Send + Sync>>>,
    force_packed_f16: bool,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("adapter", &self.inner.adapter_info.name)
            .field("backend", &self.inner.adapter_info.backend)
            .finish_non_exhaustive()
    }
}

/// A kernel object that can be built once per device and activation storage, and cached in a
/// [`Context`].
pub trait Kernel: Send + Sync + 'static {
    /// Compiles the kernel's pipelines for `device`, with activations stored as `storage`
    /// (kernels without activations, like SGD on f32 parameters, ignore it). The caller has
    /// checked that the device supports `storage` ([`crate::kernels::check_storage`]).
    fn build(device: &wgpu::Device, storage: Storage) -> Self;
}

impl Context {
    /// Picks an adapter (honouring `WGPU_BACKEND` and `WGPU_ADAPTER_NAME`) and creates a device
    /// with the adapter's own limits and the optional features it has.
    pub async fn new() -> Result<Self> {
        Self::with_options(ContextOptions::default()).await
    }

    /// Blocking [`Context::new`].
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new_blocking() -> Result<Self> {
        pollster::block_on(Self::new())
    }

    /// The adapters a context can open on `backends` (`None`: `WGPU_BACKEND`, else all), in the
    /// enumeration order [`ContextOptions::adapter_index`] counts in.
    pub async fn adapters(backends: Option<wgpu::Backends>) -> Vec<wgpu::AdapterInfo> {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        if let Some(backends) = backends {
            desc.backends = backends;
        }
        shared_adapters(desc)
            .await
            .iter()
            .map(wgpu::Adapter::get_info)
            .collect()
    }

    /// Blocking [`Context::adapters`].
    #[cfg(not(target_arch = "wasm32"))]
    pub fn adapters_blocking(backends: Option<wgpu::Backends>) -> Vec<wgpu::AdapterInfo> {
        pollster::block_on(Self::adapters(backends))
    }

    /// Blocking [`Context::with_options`].
    #[cfg(not(target_arch = "wasm32"))]
    pub fn with_options_blocking(options: ContextOptions) -> Result<Self> {
        pollster::block_on(Self::with_options(options))
    }

    /// Creates a context as described by `options`.
    pub async fn with_options(options: ContextOptions) -> Result<Self> {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        if let Some(backends) = options.backends {
            desc.backends = backends;
        }
        let backends = desc.backends;
        let adapters = shared_adapters(desc).await;
        let adapter = pick_adapter(&adapters, backends, &options)?;
        let limits = options.limits.clone().unwrap_or_else(|| adapter.limits());
        let features = adapter.features() & OPTIONAL_FEATURES & !options.disabled_features;
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("normdrop"),
                required_features: features,
                required_limits: limits,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::RequestDevice(e.to_string()))?;
        let mut ctx = Self::wrap(device, queue, adapter.get_info());
        Arc::get_mut(&mut ctx.inner).expect("not shared yet").force_packed_f16 = options.force_packed_f16;
        Ok(ctx)
    }

    /// Wraps a device and queue the caller already has. normdrop records into it, allocates on
    /// it and never creates another. Optional features are used only if the device was created
    /// with them; limits are the device's own.
    pub fn from_wgpu(device: wgpu::Device, queue: wgpu::Queue) -> Self {
        let adapter_info = device.adapter_info();
        Self::wrap(device, queue, adapter_info)
    }

    fn wrap(device: wgpu::Device, queue: wgpu::Queue, adapter_info: wgpu::AdapterInfo) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Self {
            inner: Arc::new(Inner {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                device,
                queue,
                adapter_info,
                kernels: Mutex::new(HashMap::new()),
                force_packed_f16: false,
            }),
        }
    }

    /// This context's identity, shared by its clones: tensors record it, and every call checks
    /// that the tensors it is given carry it.
    pub(crate) fn id(&self) -> u64 {
        self.inner.id
    }

    /// Checks that `tensor` (argument `what` of `op`) was made by this context or a clone of
    /// it: [`Error::WrongDevice`] otherwise.
    pub fn check_owns(&self, op: &'static str, what: &'static str, tensor: &crate::Tensor) -> Result<()> {
        if tensor.owner() == self.id() {
            Ok(())
        } else {
            Err(Error::WrongDevice {
                op,
                what,
                detail: String::new(),
            })
        }
    }

    /// The wgpu device.
    pub fn device(&self) -> &wgpu::Device {
        &self.inner.device
    }

    /// The wgpu queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.inner.queue
    }

    /// Name, backend, device type and driver of the adapter.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.inner.adapter_info
    }

    /// The limits the device was created with.
    pub fn limits(&self) -> wgpu::Limits {
        self.inner.device.limits()
    }

    /// The features the device was created with.
    pub fn features(&self) -> wgpu::Features {
        self.inner.device.features()
    }

    /// The f32 kernel `K` for this device, compiled on first use and cached afterwards.
    /// Compilation runs inside error scopes, so a shader the driver rejects becomes an [`Error`].
    pub fn kernel<K: Kernel>(&self) -> Result<Arc<K>> {
        self.kernel_for::<K>(DType::F32)
    }

    /// The kernel `K` for activations of `dtype`, stored as [`Context::storage`] says.
    pub fn kernel_for<K: Kernel>(&self, dtype: DType) -> Result<Arc<K>> {
        self.kernel_with::<K>(self.storage(dtype))
    }

    /// The kernel `K` with activations stored as `storage`, which the device must support.
    pub fn kernel_with<K: Kernel>(&self, storage: Storage) -> Result<Arc<K>> {
        crate::kernels::check_storage(self.device(), storage)?;
        let key = (TypeId::of::<K>(), storage);
        if let Some(k) = self.lock_kernels().get(&key) {
            return Ok(k.clone().downcast::<K>().expect("kernel cache keyed by TypeId"));
        }
        let kernel = Arc::new(self.scoped(|| K::build(self.device(), storage))?);
        self.lock_kernels().insert(key, kernel.clone());
        Ok(kernel)
    }

    /// How this context stores activations of `dtype`: f32 as f32; f16 natively when the device
    /// has `SHADER_F16` (and [`ContextOptions::force_packed_f16`] is off), else packed in u32.
    pub fn storage(&self, dtype: DType) -> Storage {
        match dtype {
            DType::F32 => Storage::F32,
            DType::F16 if !self.inner.force_packed_f16 && self.features().contains(wgpu::Features::SHADER_F16) => {
                Storage::F16
            }
            DType::F16 => Storage::F16Packed,
        }
    }

    #[allow(clippy::type_complexity)]
    fn lock_kernels(&self) -> std::sync::MutexGuard<'_, HashMap<(TypeId, Storage), Arc<dyn Any + Send + Sync>>> {
        // A panic while holding the lock cannot leave the map inconsistent (insert is atomic
        // from our point of view), so a poisoned lock is still usable.
        self.inner
            .kernels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` inside validation, out-of-memory and internal error scopes and returns the first
    /// error wgpu reported in them. On native backends wgpu reports errors synchronously, so the
    /// scope futures are already resolved and `block_on` does not wait.
    pub fn scoped<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        scoped_on(self.device(), f)
    }

    /// Submits `encoder` inside error scopes; does not wait.
    pub fn submit(&self, encoder: wgpu::CommandEncoder) -> Result<()> {
        self.scoped(|| {
            self.queue().submit([encoder.finish()]);
        })
    }

    /// Creates a buffer inside error scopes, so an allocation failure is an [`Error`].
    pub fn create_buffer(&self, label: &str, size: u64, usage: wgpu::BufferUsages) -> Result<wgpu::Buffer> {
        self.scoped(|| {
            self.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage,
                mapped_at_creation: false,
            })
        })
    }

    /// Waits until all submitted work has finished. On the web the browser runs the queue by
    /// itself and this returns at once (a wait would stall the page; readbacks await instead).
    #[cfg(target_arch = "wasm32")]
    pub fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    /// Waits until all submitted work has finished.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn synchronize(&self) -> Result<()> {
        self.device()
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| Error::Readback(e.to_string()))
    }

    /// Copies `size` bytes at `offset` of `buffer` back to the host. The buffer needs
    /// `COPY_SRC`; `offset` and `size` must be multiples of 4.
    pub async fn read_buffer(&self, buffer: &wgpu::Buffer, offset: u64, size: u64) -> Result<Vec<u8>> {
        if size == 0 {
            return Ok(Vec::new());
        }
        // Storage buffers cannot be mapped; copy into a MAP_READ staging buffer first.
        let staging = self.create_buffer(
            "normdrop readback",
            size,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        )?;
        self.scoped(|| {
            let mut encoder = self.device().create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("readback"),
            });
            encoder.copy_buffer_to_buffer(buffer, offset, &staging, 0, size);
            self.queue().submit([encoder.finish()]);
        })?;
        let (sender, receiver) = futures_intrusive::channel::shared::oneshot_channel();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |result| {
            // The receiver only disappears if the caller dropped the future; nothing to do then.
            let _ = sender.send(result);
        });
        // Native backends make progress only when polled; this also waits for the copy.
        self.synchronize()?;
        match receiver.receive().await {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(Error::Readback(e.to_string())),
            None => return Err(Error::Readback("map callback was dropped".into())),
        }
        let bytes = {
            let view = staging
                .slice(..)
                .get_mapped_range()
                .map_err(|e| Error::Readback(e.to_string()))?;
            view.to_vec()
        };
        // The view must be dropped before unmapping: wgpu forbids unmapping a viewed range.
        staging.unmap();
        Ok(bytes)
    }
}

/// The adapters of one wgpu instance per set of backends, enumerated once for the whole
/// process and shared by every context normdrop creates.
///
/// One instance: wgpu identifies devices and buffers by indices into their instance's tables,
/// so handles of two instances can compare equal, and a buffer of one used on a device of the
/// other reads an unrelated resource or panics inside wgpu. With one instance, wgpu's handle
/// equality and its own device checks are exact across normdrop's contexts.
///
/// One enumeration: every GL adapter of an instance shares the instance's EGL context, each
/// behind its own lock, so devices of two enumerations of one instance could make that context
/// current on two threads at once (EGL refuses with `BadAccess`, and wgpu panics). Devices of
/// one adapter share its lock.
///
/// On the web every call enumerates afresh: a WebGPU adapter creates one device and is then
/// "consumed", and the browser's handles are objects of their own (no instance tables to
/// collide in).
#[cfg(target_arch = "wasm32")]
async fn shared_adapters(desc: wgpu::InstanceDescriptor) -> Vec<wgpu::Adapter> {
    let backends = desc.backends;
    wgpu::Instance::new(desc).enumerate_adapters(backends).await
}

#[cfg(not(target_arch = "wasm32"))]
async fn shared_adapters(desc: wgpu::InstanceDescriptor) -> Vec<wgpu::Adapter> {
    type Cache = Mutex<Vec<(wgpu::Backends, wgpu::InstanceFlags, Vec<wgpu::Adapter>)>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = (desc.backends, desc.flags);
    let lookup = || {
        cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .find(|(b, f, _)| (*b, *f) == key)
            .map(|(_, _, adapters)| adapters.clone())
    };
    if let Some(adapters) = lookup() {
        return adapters;
    }
    // Enumerate without holding the lock (enumeration awaits); if another thread got there
    // first, its list wins and this instance is dropped.
    let instance = wgpu::Instance::new(desc);
    let adapters = instance.enumerate_adapters(key.0).await;
    let mut cache = cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, _, first)) = cache.iter().find(|(b, f, _)| (*b, *f) == key) {
        return first.clone();
    }
    cache.push((key.0, key.1, adapters.clone()));
    adapters
}

/// wgpu's `request_adapter` order for a power preference: discrete, integrated, other,
/// virtual, CPU (integrated first for `LowPower`; enumeration order for `None`).
fn adapter_rank(device_type: wgpu::DeviceType, preference: wgpu::PowerPreference) -> u8 {
    use wgpu::DeviceType as T;
    match (preference, device_type) {
        (wgpu::PowerPreference::None, _) => 0,
        (wgpu::PowerPreference::LowPower, T::IntegratedGpu) => 1,
        (wgpu::PowerPreference::LowPower, T::DiscreteGpu) => 2,
        (_, T::DiscreteGpu) => 1,
        (_, T::IntegratedGpu) => 2,
        (_, T::Other) => 3,
        (_, T::VirtualGpu) => 4,
        (_, T::Cpu) => 5,
    }
}

fn pick_adapter(
    adapters: &[wgpu::Adapter],
    backends: wgpu::Backends,
    options: &ContextOptions,
) -> Result<wgpu::Adapter> {
    let wanted = options
        .adapter_name
        .clone()
        .or_else(|| std::env::var("WGPU_ADAPTER_NAME").ok())
        .filter(|s| !s.is_empty());
    let describe = |list: &[wgpu::Adapter]| {
        let names: Vec<String> = list
            .iter()
            .map(|a| {
                let i = a.get_info();
                format!("{} ({:?})", i.name, i.backend)
            })
            .collect();
        if names.is_empty() {
            format!(
                "no adapters on backends {backends:?}; install a Vulkan driver (on Debian: \
                 apt-get install mesa-vulkan-drivers) or set WGPU_BACKEND"
            )
        } else {
            format!("available: {}", names.join(", "))
        }
    };
    if let Some(index) = options.adapter_index {
        let needle = wanted.as_deref().unwrap_or("").to_lowercase();
        let matching: Vec<&wgpu::Adapter> = adapters
            .iter()
            .filter(|a| a.get_info().name.to_lowercase().contains(&needle))
            .collect();
        return matching.get(index).map(|a| (*a).clone()).ok_or_else(|| {
            Error::NoAdapter(format!(
                "adapter index {index} of {} matching adapters ({})",
                matching.len(),
                describe(adapters)
            ))
        });
    }
    if let Some(name) = wanted {
        let needle = name.to_lowercase();
        return match adapters
            .iter()
            .position(|a| a.get_info().name.to_lowercase().contains(&needle))
        {
            Some(i) => Ok(adapters[i].clone()),
            None => Err(Error::NoAdapter(format!(
                "no adapter name contains {name:?} ({})",
                describe(adapters)
            ))),
        };
    }
    let power_preference = options
        .power_preference
        .or_else(wgpu::PowerPreference::from_env)
        .unwrap_or(wgpu::PowerPreference::HighPerformance);
    // The first of the best rank, as wgpu's request_adapter picks (a stable sort).
    adapters
        .iter()
        .min_by_key(|a| adapter_rank(a.get_info().device_type, power_preference))
        .cloned()
        .ok_or_else(|| Error::NoAdapter(describe(adapters)))
}

/// Runs `f` inside validation, out-of-memory and internal error scopes on `device` and returns
/// the first error wgpu reported in them ([`Context`]'s `scoped`, for callers without one).
///
/// On the web the scopes' results arrive asynchronously (a promise per scope), and waiting for
/// them would stall the page: there `f` runs without scopes, and what wgpu refuses goes to the
/// device's uncaptured-error handler. normdrop's own argument checks, which run before anything
/// is recorded, are the same on every target.
#[cfg(target_arch = "wasm32")]
pub(crate) fn scoped_on<T>(_device: &wgpu::Device, f: impl FnOnce() -> T) -> Result<T> {
    Ok(f())
}

/// Runs `f` inside validation, out-of-memory and internal error scopes on `device` and returns
/// the first error wgpu reported in them ([`Context`]'s `scoped`, for callers without one).
#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn scoped_on<T>(device: &wgpu::Device, f: impl FnOnce() -> T) -> Result<T> {
    let internal = device.push_error_scope(wgpu::ErrorFilter::Internal);
    let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let out = f();
    // Scopes pop in reverse order of pushing.
    let validation = validation.pop();
    let oom = oom.pop();
    let internal = internal.pop();
    let first_error = [
        pollster::block_on(validation),
        pollster::block_on(oom),
        pollster::block_on(internal),
    ]
    .into_iter()
    .flatten()
    .next();
    match first_error {
        Some(e) => Err(e.into()),
        None => Ok(out),
    }
}
