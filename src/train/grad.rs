//! The gradient runner: LoRA gradients of the UNet from an exported training
//! folder (a forward graph that also returns residuals, and a backward graph
//! that turns residuals plus a cotangent into parameter gradients).
//!
//! Everything the graphs exchange stays in ONNX Runtime values bound with
//! IoBinding, allocated once where the sessions run (the device under CUDA):
//! the LoRA parameters, the residuals, the UNet output and two gradient
//! buffers. The backward graph adds its gradient to an accumulator input
//! (`grad = accum + g`), so accumulation over calls is a swap of the two
//! buffers, with no host round trip.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ndarray::ArrayD;
use ort::value::DynTensor;

use super::manifest::TrainManifest;
use super::tensors::NamedTensors;
use crate::error::{Error, Result};
use crate::model::graph::{OnnxGraph, WeightTarget};
use crate::model::ModelFolder;
use crate::runtime::session::{download, write_f32, Binding, DType, Graph, Input, IoSpec};
use crate::runtime::Runtime;

/// Where a backward-graph input comes from.
#[derive(Debug, Clone, Copy)]
enum Source {
    Cotangent,
    Residual(usize),
    UnetInput(usize),
    Param(usize),
    Accum(usize),
}

/// Runs a training folder's graphs; see the module docs.
pub struct GradRunner {
    dir: PathBuf,
    manifest: TrainManifest,
    forward: Graph,
    backward: Graph,
    forward_binding: Binding,
    /// `backward_bindings[p]` reads `accum[p]` and writes `accum[1 - p]`.
    backward_bindings: [Binding; 2],
    sources: Vec<(String, Source)>,
    params: Vec<DynTensor>,
    accum: [Vec<DynTensor>; 2],
    /// Which accumulator holds the running sum.
    current: usize,
    residuals: Vec<DynTensor>,
    out: DynTensor,
    /// Whether the residuals are those of a forward with the current parameters.
    forwarded: bool,
    /// Backward calls since the last [`GradRunner::zero_grad`].
    accumulated: usize,
}

impl GradRunner {
    /// Loads `dir` (a training folder) on the runtime's execution providers.
    /// Its graphs must agree with its manifest; the error names what differs.
    /// Parameters start at zero, gradients at zero.
    pub fn open(rt: &Runtime, dir: &Path) -> Result<GradRunner> {
        let manifest = TrainManifest::open(dir)?;
        let seg = &manifest.segments[0];
        let forward = Graph::load(rt, "train forward", &dir.join(&seg.forward))?;
        let backward = Graph::load(rt, "train backward", &dir.join(&seg.backward))?;
        check_graphs(&manifest, &forward, &backward)?;
        let alloc_params = |g: &Graph| -> Result<Vec<DynTensor>> {
            manifest.params.iter().map(|p| zeros(g, &p.shape)).collect()
        };
        let params = alloc_params(&forward)?;
        let accum = [alloc_params(&backward)?, alloc_params(&backward)?];
        let residuals = seg
            .residuals
            .iter()
            .map(|r| alloc_output(&forward, r))
            .collect::<Result<Vec<_>>>()?;
        let out = alloc_output(&forward, &manifest.output)?;
        let sources = backward_sources(&manifest)?;
        let mut runner = GradRunner {
            dir: dir.to_owned(),
            forward_binding: forward.binding()?,
            backward_bindings: [backward.binding()?, backward.binding()?],
            forward,
            backward,
            manifest,
            sources,
            params,
            accum,
            current: 0,
            residuals,
            out,
            forwarded: false,
            accumulated: 0,
        };
        runner.bind_static()?;
        Ok(runner)
    }

    pub fn manifest(&self) -> &TrainManifest {
        &self.manifest
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Binds what never changes between calls: parameters, residual and
    /// output buffers, accumulators.
    fn bind_static(&mut self) -> Result<()> {
        let m = &self.manifest;
        let fb = &mut self.forward_binding;
        for (p, t) in m.params.iter().zip(&self.params) {
            fb.input(&p.key, t)?;
        }
        fb.output(&m.output, &mut self.out)?;
        for (name, t) in m.segments[0].residuals.iter().zip(&mut self.residuals) {
            fb.output(name, t)?;
        }
        for parity in 0..2 {
            let (read, write) = if parity == 0 {
                let (a, b) = self.accum.split_at_mut(1);
                (&a[0], &mut b[0])
            } else {
                let (a, b) = self.accum.split_at_mut(1);
                (&b[0], &mut a[0])
            };
            let bb = &mut self.backward_bindings[parity];
            for (name, src) in &self.sources {
                match *src {
                    Source::Residual(i) => bb.input(name, &self.residuals[i])?,
                    Source::Param(i) => bb.input(name, &self.params[i])?,
                    Source::Accum(i) => bb.input(name, &read[i])?,
                    Source::Cotangent | Source::UnetInput(_) => {}
                }
            }
            for (p, t) in m.params.iter().zip(write.iter_mut()) {
                bb.output(&p.grad, t)?;
            }
        }
        Ok(())
    }

    /// Checks the training folder against the UNet a pipeline runs: the same
    /// input names, dtypes and compatible shapes, and every target a linear
    /// module of that UNet with the parameter shapes' sizes. The error names
    /// the input or module and both sides.
    pub fn check_unet(&self, unet: &Graph, targets: &BTreeMap<String, WeightTarget>) -> Result<()> {
        let m = &self.manifest;
        let here = self.dir.display();
        for want in &m.unet_inputs {
            let have = unet.input(&want.name).ok_or_else(|| {
                Error::invalid_model(format!(
                    "training folder {here} was built for a UNet with input '{}' {:?}; this UNet \
                     ({}) has {}",
                    want.name,
                    want.shape,
                    unet.path.display(),
                    describe(&unet.inputs)
                ))
            })?;
            check_input(want, have).map_err(|e| e.context(format!("training folder {here}")))?;
        }
        if let Some(extra) = unet
            .inputs
            .iter()
            .find(|i| !m.unet_inputs.iter().any(|w| w.name == i.name))
        {
            return Err(Error::invalid_model(format!(
                "training folder {here}: the UNet ({}) has input {} that the training graphs \
                 lack; they were built for another UNet",
                unet.path.display(),
                extra.describe()
            )));
        }
        for (module, pair) in m.targets.iter().zip(m.params.chunks(2)) {
            let t = targets.get(module).ok_or_else(|| {
                Error::invalid_model(format!(
                    "training folder {here}: target module '{module}' is not a weight of the \
                     UNet ({})",
                    unet.path.display()
                ))
            })?;
            let torch = t.torch_shape();
            let (a, b) = (&pair[0].shape, &pair[1].shape);
            if torch.len() != 2 || a[1] != torch[1] || b[0] != torch[0] {
                return Err(Error::invalid_model(format!(
                    "training folder {here}: module '{module}' has weight [out,in] {torch:?} in \
                     the UNet, but LoRA A {a:?} / B {b:?} in the training graphs"
                )));
            }
        }
        Ok(())
    }

    /// [`GradRunner::check_unet`] against the UNet of a model folder.
    pub fn check_model(&self, rt: &Runtime, model_dir: &Path) -> Result<()> {
        let path = ModelFolder::open(model_dir)?.graph("unet");
        let unet = Graph::load(rt, "unet", &path)?;
        let graph = OnnxGraph::open(&path)?;
        self.check_unet(&unet, graph.lora_targets()?)
    }

    /// The `spo grad` contract: `tensors` holds exactly the UNet inputs, the
    /// `cotangent` and the LoRA parameters (PEFT keys); the result holds
    /// `out_sample` and, under the parameter keys, the gradient of
    /// `sum(cotangent * out_sample)`. `what` names the source in errors.
    pub fn run_contract(&mut self, what: &str, mut tensors: NamedTensors) -> Result<NamedTensors> {
        let m = &self.manifest;
        let out_shape = m.output_shape();
        let mut expected: Vec<(&str, &[usize])> = m
            .unet_inputs
            .iter()
            .map(|i| (i.name.as_str(), i.shape.as_slice()))
            .collect();
        expected.push((m.cotangent.as_str(), out_shape.as_slice()));
        expected.extend(
            m.params
                .iter()
                .map(|p| (p.key.as_str(), p.shape.as_slice())),
        );
        super::tensors::check_exact(what, &tensors, &expected)?;
        let cotangent = tensors.remove(&m.cotangent).expect("checked");
        let params: NamedTensors = m
            .params
            .iter()
            .map(|p| (p.key.clone(), tensors.remove(&p.key).expect("checked")))
            .collect();
        self.set_params(&params)?;
        self.zero_grad()?;
        let out = self.forward(&tensors)?;
        self.backward(&cotangent)?;
        let mut result = self.grads()?;
        result.insert(self.manifest.output.clone(), out);
        Ok(result)
    }

    /// Sets every LoRA parameter (PEFT keys, exactly the manifest's set).
    pub fn set_params(&mut self, params: &NamedTensors) -> Result<()> {
        let expected: Vec<(&str, &[usize])> = self
            .manifest
            .params
            .iter()
            .map(|p| (p.key.as_str(), p.shape.as_slice()))
            .collect();
        super::tensors::check_exact("LoRA parameters", params, &expected)?;
        for (p, t) in self.manifest.params.iter().zip(&mut self.params) {
            let a = params[&p.key].as_standard_layout();
            write_f32(t, a.as_slice().expect("standard layout"))?;
        }
        self.forwarded = false;
        Ok(())
    }

    /// Resets the accumulated gradients to zero.
    pub fn zero_grad(&mut self) -> Result<()> {
        for (p, t) in self
            .manifest
            .params
            .iter()
            .zip(&mut self.accum[self.current])
        {
            let n: usize = p.shape.iter().product();
            write_f32(t, &vec![0.0; n])?;
        }
        self.accumulated = 0;
        Ok(())
    }

    /// Runs the forward graph on the UNet inputs (exactly the manifest's
    /// `unet_inputs`, by name) with the current parameters; returns the UNet
    /// output and keeps the residuals for [`GradRunner::backward`].
    pub fn forward(&mut self, inputs: &NamedTensors) -> Result<ArrayD<f32>> {
        let expected: Vec<(&str, &[usize])> = self
            .manifest
            .unet_inputs
            .iter()
            .map(|i| (i.name.as_str(), i.shape.as_slice()))
            .collect();
        super::tensors::check_exact("UNet inputs", inputs, &expected)?;
        for (k, i) in self.manifest.unet_inputs.iter().enumerate() {
            let v = self
                .forward
                .upload(&i.name, Input::F32(inputs[&i.name].clone()))?;
            self.forward_binding.input(&i.name, &v)?;
            for (name, src) in &self.sources {
                if matches!(src, Source::UnetInput(j) if *j == k) {
                    for b in &mut self.backward_bindings {
                        b.input(name, &v)?;
                    }
                }
            }
        }
        self.forward
            .run_values(&mut self.forward_binding, Vec::new(), None)?;
        self.forwarded = true;
        download(&self.out)
    }

    /// Adds the gradient of `sum(cotangent * out_sample)` for the last
    /// forward to the accumulated gradients.
    pub fn backward(&mut self, cotangent: &ArrayD<f32>) -> Result<()> {
        if !self.forwarded {
            return Err(Error::invalid_argument(
                "backward needs a forward with the current parameters first",
            ));
        }
        let shape = self.manifest.output_shape();
        if cotangent.shape() != shape.as_slice() {
            return Err(Error::invalid_argument(format!(
                "cotangent has shape {:?}, expected {shape:?} (the UNet output)",
                cotangent.shape()
            )));
        }
        let name = self.manifest.cotangent.clone();
        let b = &mut self.backward_bindings[self.current];
        self.backward.run_values(
            b,
            vec![(name.as_str(), Input::F32(cotangent.clone()))],
            None,
        )?;
        self.current = 1 - self.current;
        self.accumulated += 1;
        Ok(())
    }

    /// Backward calls accumulated since the last zero.
    pub fn accumulated(&self) -> usize {
        self.accumulated
    }

    /// The accumulated gradients, by PEFT key, copied to the host.
    pub fn grads(&self) -> Result<NamedTensors> {
        self.manifest
            .params
            .iter()
            .zip(&self.accum[self.current])
            .map(|(p, t)| Ok((p.key.clone(), download(t)?)))
            .collect()
    }
}

fn zeros(g: &Graph, shape: &[usize]) -> Result<DynTensor> {
    let mut t = g.alloc(DType::F32, shape)?;
    write_f32(&mut t, &vec![0.0; shape.iter().product()])?;
    Ok(t)
}

/// A buffer for output `name` of `g`, whose shape the graph must fix.
fn alloc_output(g: &Graph, name: &str) -> Result<DynTensor> {
    let spec = g.require_output(&[name])?;
    let shape: Option<Vec<usize>> = (0..spec.shape.len()).map(|i| spec.fixed_dim(i)).collect();
    let shape = shape.ok_or_else(|| {
        Error::invalid_model(format!(
            "{} ({}): output {} has no fixed shape; training graphs are exported at fixed shapes",
            g.component,
            g.path.display(),
            spec.describe()
        ))
    })?;
    g.alloc(spec.dtype, &shape)
}

/// Resolves every backward input to what feeds it.
fn backward_sources(m: &TrainManifest) -> Result<Vec<(String, Source)>> {
    let seg = &m.segments[0];
    seg.backward_inputs
        .iter()
        .map(|name| {
            let pos = |mut v: Box<dyn Iterator<Item = &String> + '_>| v.position(|n| n == name);
            let src = if *name == m.cotangent {
                Source::Cotangent
            } else if let Some(i) = pos(Box::new(seg.residuals.iter())) {
                Source::Residual(i)
            } else if let Some(i) = pos(Box::new(m.unet_inputs.iter().map(|i| &i.name))) {
                Source::UnetInput(i)
            } else if let Some(i) = pos(Box::new(m.params.iter().map(|p| &p.key))) {
                Source::Param(i)
            } else if let Some(i) = pos(Box::new(m.params.iter().map(|p| &p.accum))) {
                Source::Accum(i)
            } else {
                return Err(Error::invalid_model(format!(
                    "backward input '{name}' is neither the cotangent, a residual, a UNet input, \
                     a parameter nor an accumulator"
                )));
            };
            Ok((name.clone(), src))
        })
        .collect()
}

/// The graphs' inputs and outputs must be the ones the manifest lists.
fn check_graphs(m: &TrainManifest, forward: &Graph, backward: &Graph) -> Result<()> {
    for i in &m.unet_inputs {
        forward.require_input(&i.name)?;
    }
    for p in &m.params {
        forward.require_input(&p.key)?;
        backward.require_output(&[&p.grad])?;
    }
    forward.require_output(&[&m.output])?;
    for r in &m.segments[0].residuals {
        forward.require_output(&[r])?;
    }
    for name in &m.segments[0].backward_inputs {
        backward.require_input(name)?;
    }
    if let Some(extra) = backward
        .inputs
        .iter()
        .find(|i| !m.segments[0].backward_inputs.contains(&i.name))
    {
        return Err(Error::invalid_model(format!(
            "{}: input {} is not in the manifest's backward_inputs",
            backward.path.display(),
            extra.describe()
        )));
    }
    Ok(())
}

fn check_input(want: &super::manifest::IoEntry, have: &IoSpec) -> Result<()> {
    let shape_ok = have.shape.len() == want.shape.len()
        && have
            .shape
            .iter()
            .zip(&want.shape)
            .all(|(h, w)| *h < 0 || *h as usize == *w);
    if have.dtype.name() != want.dtype || !shape_ok {
        return Err(Error::invalid_model(format!(
            "UNet input {} does not take the training graphs' '{}' {}{:?}",
            have.describe(),
            want.name,
            want.dtype,
            want.shape
        )));
    }
    Ok(())
}

fn describe(specs: &[IoSpec]) -> String {
    specs
        .iter()
        .map(IoSpec::describe)
        .collect::<Vec<_>>()
        .join(", ")
}
