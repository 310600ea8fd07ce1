//! One ONNX graph as a session whose inputs and outputs are described from the
//! session itself (names, dtypes, shapes), never assumed. Callers pass f32 / i64
//! host arrays; this layer converts to and from the graph's dtypes (fp16 I/O,
//! int32 ids) so the pipeline is written once for every export flavour.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use half::f16;
use ndarray::{ArrayD, IxDyn};
use ort::ep::ExecutionProvider;
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{IoBinding, RunOptions, Session, SessionInputValue, SessionOutputs};
use ort::value::{
    DynTensor, DynValue, Tensor, TensorElementType, TensorValueTypeMarker, Value, ValueType,
};

use super::library::{self, LazyStatics};
use super::Runtime;
use crate::error::{Error, ErrorCode, Result};
use crate::memory;

/// Element types the pipeline exchanges with graphs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    I64,
    I32,
}

impl DType {
    fn from_ort(t: TensorElementType) -> Option<DType> {
        Some(match t {
            TensorElementType::Float32 => DType::F32,
            TensorElementType::Float16 => DType::F16,
            TensorElementType::Int64 => DType::I64,
            TensorElementType::Int32 => DType::I32,
            _ => return None,
        })
    }
    fn to_ort(self) -> TensorElementType {
        match self {
            DType::F32 => TensorElementType::Float32,
            DType::F16 => TensorElementType::Float16,
            DType::I64 => TensorElementType::Int64,
            DType::I32 => TensorElementType::Int32,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::I64 => "int64",
            DType::I32 => "int32",
        }
    }
}

/// A graph input or output: name, element type and shape (-1 = dynamic).
#[derive(Debug, Clone)]
pub struct IoSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<i64>,
}

impl IoSpec {
    /// The fixed size of dimension `i`, if the graph fixes it.
    pub fn fixed_dim(&self, i: usize) -> Option<usize> {
        self.shape
            .get(i)
            .copied()
            .filter(|d| *d > 0)
            .map(|d| d as usize)
    }
    pub fn describe(&self) -> String {
        let dims: Vec<String> = self
            .shape
            .iter()
            .map(|d| if *d < 0 { "?".into() } else { d.to_string() })
            .collect();
        format!("{} {}[{}]", self.name, self.dtype.name(), dims.join(","))
    }
}

/// A host-side input value.
pub enum Input {
    F32(ArrayD<f32>),
    I64(ArrayD<i64>),
}

impl Input {
    fn shape(&self) -> &[usize] {
        match self {
            Input::F32(a) => a.shape(),
            Input::I64(a) => a.shape(),
        }
    }
}

/// A loaded graph with its I/O description.
pub struct Graph {
    pub component: String,
    pub path: PathBuf,
    pub inputs: Vec<IoSpec>,
    /// Initializers that may be fed as inputs (e.g. LoRA slots with zero defaults).
    pub optional_inputs: Vec<IoSpec>,
    pub outputs: Vec<IoSpec>,
    session: Session,
    /// The CUDA device the session runs on, when CUDA is the first provider.
    cuda_device: Option<i32>,
}

fn io_spec(name: &str, ty: &ValueType, path: &Path) -> Result<IoSpec> {
    let (t, shape) = match ty {
        ValueType::Tensor { ty, shape, .. } => (*ty, shape.iter().copied().collect::<Vec<i64>>()),
        other => {
            return Err(Error::invalid_model(format!(
                "{}: '{name}' is {other:?}, expected a tensor",
                path.display()
            )))
        }
    };
    let dtype = DType::from_ort(t).ok_or_else(|| {
        Error::invalid_model(format!(
            "{}: '{name}' has unsupported element type {t:?}",
            path.display()
        ))
    })?;
    Ok(IoSpec {
        name: name.to_owned(),
        dtype,
        shape,
    })
}

/// A graph file must exist before ONNX Runtime is asked to open it (its own
/// message would not name the component).
fn require_file(component: &str, path: &Path) -> Result<()> {
    if path.is_file() {
        return Ok(());
    }
    Err(Error::invalid_model(format!(
        "{component}: missing graph file {}",
        path.display()
    )))
}

/// What a session is for: it decides the optimization level and whether the
/// session counts in `sessions.built`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// A model's graph, fully optimized; counted.
    Model,
    /// A gradient graph (see [`Graph::load_training`]); counted.
    Training,
    /// The runtime's own step math; one thread, not counted.
    Internal,
}

impl Graph {
    /// Opens `path` as a session on the runtime's execution providers. The
    /// error names the component and the file.
    pub fn load(rt: &Runtime, component: &str, path: &Path) -> Result<Graph> {
        Self::load_with_initializers(rt, component, path, Vec::new())
    }

    /// Like [`Graph::load`], with initializers replaced by the given values
    /// (ONNX Runtime's `AddInitializer`): how merged LoRA weights reach a session
    /// without rewriting the model file.
    pub fn load_with_initializers(
        rt: &Runtime,
        component: &str,
        path: &Path,
        initializers: Vec<(String, DynValue)>,
    ) -> Result<Graph> {
        require_file(component, path)?;
        Self::build(rt, component, path, None, initializers, Purpose::Model)
    }

    /// Opens a gradient graph (a training folder's forward or backward). It is
    /// built without ONNX Runtime's layout optimizations (level 3: the CPU's
    /// NCHWc convolution rewrite), whose kernel choice depends on the graph
    /// around each convolution. With them, a UNet cut into K segments gave
    /// gradients 1.1e-6 (relative, in norm) from the uncut one; without them
    /// the two are bit-identical, so where the cuts fall never changes a
    /// result. Measured cost on CPU: forward+backward within noise on
    /// tiny-sdxl and about 4% on the quarter-width SDXL benchmark, with a
    /// slightly lower peak memory; CUDA has no level-3 rewrites.
    ///
    /// Host memory comes from the system allocator, not ONNX Runtime's CPU
    /// arena (and no memory pattern): an arena keeps each session's peak, so
    /// the forward's and the backward's intermediates would both stay held
    /// beside the weights and the residuals. Without it the training peak is
    /// the larger of the two, not their sum. Measured on the quarter-width
    /// SDXL benchmark (`scripts/bench_grad.sh`): a forward+backward peak of
    /// 2025 MiB against 2200 with the arena, and PyTorch's 2090; the cost is
    /// malloc per tensor, about 10% of forward+backward on tiny-sdxl, where
    /// per-node overhead dominates, and within noise on the larger model.
    /// (ONNX Runtime's shared environment arena peaked at 2150 MiB.)
    pub fn load_training(rt: &Runtime, component: &str, path: &Path) -> Result<Graph> {
        require_file(component, path)?;
        Self::build(rt, component, path, None, Vec::new(), Purpose::Training)
    }

    /// A session from an in-memory `.onnx` (a rewritten graph, see
    /// [`crate::model::upcast`]); `path` is the file it came from, for messages.
    pub fn load_from_memory(
        rt: &Runtime,
        component: &str,
        path: &Path,
        bytes: &[u8],
    ) -> Result<Graph> {
        Self::build(rt, component, path, Some(bytes), Vec::new(), Purpose::Model)
    }

    /// A session for a graph the runtime builds for its own math (the step
    /// graph). It is not counted in `sessions.built`, which counts model sessions.
    pub fn load_internal(rt: &Runtime, component: &str, bytes: &[u8]) -> Result<Graph> {
        let path = PathBuf::from(format!("<{component}>"));
        Self::build(
            rt,
            component,
            &path,
            Some(bytes),
            Vec::new(),
            Purpose::Internal,
        )
    }

    fn build(
        rt: &Runtime,
        component: &str,
        path: &Path,
        bytes: Option<&[u8]>,
        initializers: Vec<(String, DynValue)>,
        purpose: Purpose,
    ) -> Result<Graph> {
        let mut builder = rt.session_builder()?;
        if purpose == Purpose::Training {
            builder = builder
                .with_optimization_level(GraphOptimizationLevel::Level2)
                .map_err(ort::Error::from)?
                .with_memory_pattern(false)
                .map_err(ort::Error::from)?;
            ort::ep::CPU::default()
                .with_arena_allocator(false)
                .register(&mut builder)?;
        }
        if purpose == Purpose::Internal {
            // The runtime's own graphs are a few element-wise ops on latents:
            // a thread pool costs more to wake than it saves.
            builder = builder.with_intra_threads(1).map_err(ort::Error::from)?;
        }
        for (name, value) in initializers {
            builder = builder.with_initializer(&name, value).map_err(|e| {
                Error::new(
                    ErrorCode::Ort,
                    format!("{component}: cannot override initializer '{name}': {e}"),
                )
            })?;
        }
        if purpose != Purpose::Internal {
            rt.note_session_built();
        }
        let committed = match bytes {
            Some(b) => builder.commit_from_memory(b),
            None => builder.commit_from_file(path),
        };
        library::release_after(LazyStatics::SessionCreated);
        let session = committed.map_err(|e| {
            let msg = format!("{component}: cannot load {}: {e}", path.display());
            match memory::ort_out_of_memory(&msg) {
                Some(oom) => oom,
                None => Error::new(ErrorCode::InvalidModel, msg),
            }
        })?;
        let inputs = session
            .inputs()
            .iter()
            .map(|o| io_spec(o.name(), o.dtype(), path))
            .collect::<Result<_>>()?;
        let optional_inputs = session
            .overridable_initializers()
            .iter()
            .filter_map(|o| io_spec(o.name(), o.dtype(), path).ok())
            .collect();
        let outputs = session
            .outputs()
            .iter()
            .map(|o| io_spec(o.name(), o.dtype(), path))
            .collect::<Result<_>>()?;
        Ok(Graph {
            cuda_device: rt.eps().cuda_device(),
            component: component.to_owned(),
            path: path.to_owned(),
            inputs,
            optional_inputs,
            outputs,
            session,
        })
    }

    pub fn input(&self, name: &str) -> Option<&IoSpec> {
        self.inputs
            .iter()
            .chain(&self.optional_inputs)
            .find(|i| i.name == name)
    }

    pub fn output(&self, name: &str) -> Option<&IoSpec> {
        self.outputs.iter().find(|i| i.name == name)
    }

    /// The input called `name`, or an error naming the graph and what it has.
    pub fn require_input(&self, name: &str) -> Result<&IoSpec> {
        self.input(name)
            .ok_or_else(|| self.missing("input", name, &self.inputs))
    }

    /// The first output among `names` that the graph has.
    pub fn require_output(&self, names: &[&str]) -> Result<&IoSpec> {
        names
            .iter()
            .find_map(|n| self.output(n))
            .ok_or_else(|| self.missing("output", &names.join("' or '"), &self.outputs))
    }

    fn missing(&self, what: &str, name: &str, have: &[IoSpec]) -> Error {
        let have: Vec<String> = have.iter().map(IoSpec::describe).collect();
        Error::invalid_model(format!(
            "{} ({}): no {what} '{name}'; it has {}",
            self.component,
            self.path.display(),
            have.join(", ")
        ))
    }

    /// Runs the graph. Inputs are converted to the graph's dtypes and checked
    /// against its fixed dimensions; the named outputs come back as f32.
    pub fn run(
        &mut self,
        inputs: Vec<(&str, Input)>,
        outputs: &[&str],
        options: Option<&RunOptions>,
    ) -> Result<Vec<ArrayD<f32>>> {
        let mut values: Vec<(Cow<'_, str>, SessionInputValue<'_>)> =
            Vec::with_capacity(inputs.len());
        for (name, input) in inputs {
            let (name, value) = self.input_value(name, input)?;
            values.push((Cow::Owned(name), SessionInputValue::from(value)));
        }
        let component = self.component.clone();
        let result = match options {
            Some(o) => self.session.run_with_options(values, o),
            None => self.session.run(values),
        };
        library::release_after(LazyStatics::FirstRun);
        let out = result.map_err(|e| run_error(&component, e))?;
        outputs
            .iter()
            .map(|name| {
                let v = out.get(*name).ok_or_else(|| {
                    Error::invalid_model(format!("{component}: no output '{name}'"))
                })?;
                to_f32(v).map_err(|e| e.context(format!("{component} output '{name}'")))
            })
            .collect()
    }

    /// Binds `fixed` inputs once for a series of [`Graph::run_bound`] calls
    /// that share them (a job's conditioning and LoRA slot tensors). On CUDA
    /// they are copied to the device here, once, instead of on every run.
    pub fn bind(&self, fixed: Vec<(&str, Input)>, output: &str) -> Result<Binding> {
        let out = self.require_output(&[output])?.name.clone();
        let mut io = self.session.create_binding()?;
        for (name, input) in fixed {
            let (name, value) = self.input_value(name, input)?;
            let value = match self.cuda_device {
                // A host copy still works (ONNX Runtime then copies per run).
                Some(id) => value.to(AllocationDevice::CUDA, id).unwrap_or(value),
                None => value,
            };
            io.bind_input(name, &value)?;
        }
        // The scheduler runs on the host, so the output comes back there.
        let host = MemoryInfo::new(
            AllocationDevice::CPU,
            0,
            AllocatorType::Device,
            MemoryType::Default,
        )?;
        io.bind_output_to_device(out.clone(), &host)?;
        Ok(Binding { io, output: out })
    }

    /// One run with the inputs bound by [`Graph::bind`] plus `inputs` (the
    /// per-call ones, bound now); returns the bound output as f32.
    pub fn run_bound(
        &mut self,
        binding: &mut Binding,
        inputs: Vec<(&str, Input)>,
        options: Option<&RunOptions>,
    ) -> Result<ArrayD<f32>> {
        let component = self.component.clone();
        let name = binding.output.clone();
        let out = self.bind_and_run(binding, inputs, options)?;
        let v = out
            .get(name.as_str())
            .ok_or_else(|| Error::invalid_model(format!("{component}: no output '{name}'")))?;
        to_f32(v).map_err(|e| e.context(format!("{component} output '{name}'")))
    }

    /// Whether the session runs on CUDA (the first provider).
    pub fn on_cuda(&self) -> bool {
        self.cuda_device.is_some()
    }

    /// Where this graph's tensors live: the CUDA device when CUDA is the first
    /// provider, else host memory.
    fn device_memory(&self) -> Result<MemoryInfo<'static>> {
        Ok(match self.cuda_device {
            Some(id) => MemoryInfo::new(
                AllocationDevice::CUDA,
                id,
                AllocatorType::Device,
                MemoryType::Default,
            )?,
            None => MemoryInfo::new(
                AllocationDevice::CPU,
                0,
                AllocatorType::Device,
                MemoryType::Default,
            )?,
        })
    }

    /// An uninitialised tensor in this graph's device memory, to bind as an
    /// output with [`Graph::run_values`].
    pub fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<DynTensor> {
        let allocator = Allocator::new(&self.session, self.device_memory()?)?;
        Ok(DynTensor::new(&allocator, dtype.to_ort(), shape.to_vec())?)
    }

    /// `input` converted to the dtype of the graph's input `name` and placed in
    /// device memory (one host-to-device copy under CUDA).
    pub fn upload(&self, name: &str, input: Input) -> Result<DynTensor> {
        let (_, value) = self.input_value(name, input)?;
        Ok(match self.cuda_device {
            Some(id) => value.to(AllocationDevice::CUDA, id)?,
            None => value,
        })
    }

    /// One run of `binding` (inputs and output buffers bound with
    /// [`Binding::input`] and [`Binding::output`]), plus `host` inputs
    /// converted and bound now. Results land in the bound output buffers.
    pub fn run_values(
        &mut self,
        binding: &mut Binding,
        host: Vec<(&str, Input)>,
        options: Option<&RunOptions>,
    ) -> Result<()> {
        self.bind_and_run(binding, host, options).map(drop)
    }

    /// Converts and binds `inputs`, then runs `binding`.
    fn bind_and_run<'b>(
        &'b mut self,
        binding: &'b mut Binding,
        inputs: Vec<(&str, Input)>,
        options: Option<&RunOptions>,
    ) -> Result<SessionOutputs<'b>> {
        for (name, input) in inputs {
            let (name, value) = self.input_value(name, input)?;
            binding.io.bind_input(name, &value)?;
        }
        let result = match options {
            Some(o) => self.session.run_binding_with_options(&binding.io, o),
            None => self.session.run_binding(&binding.io),
        };
        library::release_after(LazyStatics::FirstRun);
        result.map_err(|e| run_error(&self.component, e))
    }

    /// An empty binding, for graphs whose inputs all change per run.
    pub fn binding(&self) -> Result<Binding> {
        Ok(Binding {
            io: self.session.create_binding()?,
            output: String::new(),
        })
    }

    /// `input` as an ONNX Runtime value of the graph's dtype for `name`,
    /// after checking its shape against the graph's fixed dimensions.
    fn input_value(&self, name: &str, input: Input) -> Result<(String, DynTensor)> {
        let spec = self.require_input(name)?;
        self.check_shape(spec, input.shape())?;
        let value: DynTensor = match (input, spec.dtype) {
            (Input::F32(a), DType::F32) => Tensor::from_array(a)?.upcast(),
            (Input::F32(a), DType::F16) => Tensor::from_array(a.mapv(f16::from_f32))?.upcast(),
            (Input::F32(a), DType::I64) => Tensor::from_array(a.mapv(|v| v as i64))?.upcast(),
            (Input::F32(a), DType::I32) => Tensor::from_array(a.mapv(|v| v as i32))?.upcast(),
            (Input::I64(a), DType::I64) => Tensor::from_array(a)?.upcast(),
            (Input::I64(a), DType::I32) => Tensor::from_array(a.mapv(|v| v as i32))?.upcast(),
            (Input::I64(a), DType::F32) => Tensor::from_array(a.mapv(|v| v as f32))?.upcast(),
            (Input::I64(a), DType::F16) => {
                Tensor::from_array(a.mapv(|v| f16::from_f32(v as f32)))?.upcast()
            }
        };
        Ok((spec.name.clone(), value))
    }

    fn check_shape(&self, spec: &IoSpec, shape: &[usize]) -> Result<()> {
        let ok = spec.shape.len() == shape.len()
            && spec
                .shape
                .iter()
                .zip(shape)
                .all(|(d, s)| *d < 0 || *d as usize == *s);
        if ok {
            Ok(())
        } else {
            Err(Error::invalid_model(format!(
                "{} ({}): input {} cannot take shape {shape:?}",
                self.component,
                self.path.display(),
                spec.describe()
            )))
        }
    }
}

/// Inputs bound to one session for repeated runs (see [`Graph::bind`]).
pub struct Binding {
    io: IoBinding,
    output: String,
}

impl Binding {
    /// Binds a device (or host) tensor as input `name`, by reference: the
    /// session reads its contents at each run, with no copy when the tensor
    /// is already where the session runs.
    pub fn input(&mut self, name: &str, value: &DynTensor) -> Result<()> {
        Ok(self.io.bind_input(name, value)?)
    }

    /// Makes runs write output `name` into `value` (from [`Graph::alloc`]).
    pub fn output(&mut self, name: &str, value: &mut DynTensor) -> Result<()> {
        Ok(self.io.bind_output(name, value)?)
    }

    /// The output named when the binding was made by [`Graph::bind`].
    pub fn output_name(&self) -> &str {
        &self.output
    }
}

/// A terminated run (cancellation) is `Cancelled`, a failed allocation
/// `OutOfMemory`; anything else is `Ort`.
fn run_error(component: &str, e: ort::Error) -> Error {
    let msg = e.to_string();
    if msg.to_ascii_lowercase().contains("terminate") {
        Error::new(ErrorCode::Cancelled, format!("{component}: run cancelled"))
    } else if let Some(oom) = memory::ort_out_of_memory(&msg) {
        oom.context(component)
    } else {
        Error::new(ErrorCode::Ort, format!("{component}: {msg}"))
    }
}

/// A tensor (host or device) copied back to a host f32 array.
pub fn download(v: &DynTensor) -> Result<ArrayD<f32>> {
    if v.memory_info().is_cpu_accessible() {
        return to_f32(v);
    }
    let host = v.to(AllocationDevice::CPU, 0)?;
    to_f32(&host)
}

fn to_f32<T: TensorValueTypeMarker + ?Sized>(v: &Value<T>) -> Result<ArrayD<f32>> {
    if let Ok(a) = v.try_extract_array::<f32>() {
        return Ok(a.to_owned());
    }
    if let Ok(a) = v.try_extract_array::<f16>() {
        return Ok(a.mapv(f16::to_f32));
    }
    Err(Error::invalid_model(
        "output is neither float32 nor float16",
    ))
}

/// Shorthand for building inputs.
pub fn f32_input(shape: &[usize], data: Vec<f32>) -> Input {
    Input::F32(ArrayD::from_shape_vec(IxDyn(shape), data).expect("shape matches data length"))
}

/// Sets the f32 tensor `t` (host or device) to zero in place, with no host
/// buffer of its size on the Rust heap (a failed allocation is an error from
/// ONNX Runtime's allocator, never an abort).
pub fn fill_zeros(t: &mut DynTensor) -> Result<()> {
    if t.memory_info().is_cpu_accessible() {
        t.try_extract_tensor_mut::<f32>()?.1.fill(0.0);
        return Ok(());
    }
    let shape: Vec<usize> = t.shape().iter().map(|d| *d as usize).collect();
    let mut host = Tensor::<f32>::new(&Allocator::default(), shape)?;
    host.try_extract_tensor_mut::<f32>()?.1.fill(0.0);
    host.upcast().copy_into(t)?;
    Ok(())
}

/// Overwrites the f32 tensor `t` (host or device) with `data`, in place, so
/// that bindings holding it see the new values. The length must match.
pub fn write_f32(t: &mut DynTensor, data: &[f32]) -> Result<()> {
    if t.memory_info().is_cpu_accessible() {
        let (_, dst) = t.try_extract_tensor_mut::<f32>()?;
        if dst.len() != data.len() {
            return Err(Error::invalid_argument(format!(
                "cannot write {} values into a tensor of {}",
                data.len(),
                dst.len()
            )));
        }
        dst.copy_from_slice(data);
        return Ok(());
    }
    let shape: Vec<usize> = t.shape().iter().map(|d| *d as usize).collect();
    let host: DynTensor = Tensor::from_array((shape, data.to_vec()))?.upcast();
    host.copy_into(t)?;
    Ok(())
}
