//! The gradient runner: LoRA gradients of the UNet from an exported training
//! folder. Each segment (a run of UNet blocks; one by default) is a forward
//! graph that also returns residuals, and a backward graph that turns the
//! residuals plus the cotangents of the segment's outputs into parameter
//! gradients and the gradients of its activation inputs.
//!
//! Memory: everything the graphs exchange stays in ONNX Runtime values bound
//! with IoBinding, allocated once where the sessions run (the device under
//! CUDA): parameters, segment outputs, the last segment's residuals and two
//! gradient buffers per parameter. The backward graph adds its gradient to an
//! accumulator input (`grad = accum + g`), so accumulation over calls is a
//! swap of the two buffers. The residuals of earlier segments are not kept:
//! their forward is run again from the saved segment inputs just before their
//! backward (gradient checkpointing), so activation memory is one segment's.
//! Cotangents between segments are summed on the host (several later
//! segments may read one activation).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use ndarray::ArrayD;
use ort::value::DynTensor;

use super::manifest::{Segment, TrainManifest};
use crate::error::{Error, Result};
use crate::lora::{GraphTargets, WeightTarget};
use crate::model::tensors::{check_exact, NamedTensors};
use crate::model::{ModelFolder, OnnxGraph};
use crate::runtime::session::{
    download, fill_zeros, write_f32, Binding, DType, Graph, Input, IoSpec,
};
use crate::runtime::Runtime;

/// One segment's sessions and device buffers.
struct SegmentRunner {
    entry: Segment,
    forward: Graph,
    backward: Option<Graph>,
    /// This segment's parameters, in `entry.params` order, and their two
    /// accumulators; `accum[current]` holds the running sum.
    params: Vec<DynTensor>,
    accum: [Vec<DynTensor>; 2],
    current: usize,
    /// The backward's `grad.<key>` outputs and `accum.<key>` inputs, in
    /// `params` order.
    grad_names: Vec<String>,
    accum_names: Vec<String>,
    /// Outputs (`entry.outputs` order), kept between forward and backward.
    outputs: Vec<DynTensor>,
    /// The residuals, kept only by the last segment; the others recompute.
    residuals: Option<Vec<DynTensor>>,
    input_grads: Vec<DynTensor>,
    forward_binding: Binding,
    /// With kept residuals: a backward binding per accumulator parity, made
    /// once, so that a run binds only the UNet inputs and the cotangents
    /// (binding the thousands of residuals per call cost more than the
    /// backward itself on small models).
    backward_bindings: Vec<Binding>,
    /// Backward inputs bound per run: the UNet inputs it reads.
    backward_per_run: Vec<String>,
}

/// Runs a training folder's graphs; see the module docs.
pub struct GradRunner {
    dir: PathBuf,
    manifest: TrainManifest,
    segments: Vec<SegmentRunner>,
    /// Parameter key -> (segment, index in that segment).
    param_at: HashMap<String, (usize, usize)>,
    /// The UNet inputs of the last forward, uploaded where the graphs run.
    unet_inputs: HashMap<String, DynTensor>,
    /// Whether the segment outputs are those of a forward with the current parameters.
    forwarded: bool,
    /// Backward calls since the last [`GradRunner::zero_grad`].
    accumulated: usize,
}

impl GradRunner {
    /// Loads `dir` (a training folder) on the runtime's execution providers.
    /// Its graphs must agree with its manifest; the error names what differs.
    /// Parameters and gradients start at zero.
    pub fn open(rt: &Runtime, dir: &Path) -> Result<GradRunner> {
        let manifest = TrainManifest::open(dir)?;
        let last = manifest.segments.len() - 1;
        let mut segments = Vec::with_capacity(manifest.segments.len());
        for (i, entry) in manifest.segments.iter().enumerate() {
            segments.push(SegmentRunner::open(rt, dir, &manifest, entry, i == last)?);
        }
        let param_at = segments
            .iter()
            .enumerate()
            .flat_map(|(s, seg)| {
                seg.entry
                    .params
                    .iter()
                    .enumerate()
                    .map(move |(i, k)| (k.clone(), (s, i)))
            })
            .collect::<HashMap<_, _>>();
        if let Some(p) = manifest
            .params
            .iter()
            .find(|p| !param_at.contains_key(&p.key))
        {
            return Err(Error::invalid_model(format!(
                "{}: parameter '{}' belongs to no segment",
                dir.display(),
                p.key
            )));
        }
        let mut runner = GradRunner {
            dir: dir.to_owned(),
            manifest,
            segments,
            param_at,
            unet_inputs: HashMap::new(),
            forwarded: false,
            accumulated: 0,
        };
        runner.bind_boundaries()?;
        Ok(runner)
    }

    pub fn manifest(&self) -> &TrainManifest {
        &self.manifest
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Binds each segment's inputs that earlier segments make (fixed
    /// buffers), and makes the backward bindings of segments that keep their
    /// residuals.
    fn bind_boundaries(&mut self) -> Result<()> {
        for s in 0..self.segments.len() {
            let (before, after) = self.segments.split_at_mut(s);
            let seg = &mut after[0];
            for name in &seg.entry.inputs {
                if let Some(t) = find_output(before, name) {
                    seg.forward_binding.input(name, t)?;
                }
            }
            if seg.residuals.is_some() && seg.backward.is_some() {
                for parity in 0..2 {
                    let b = seg.backward_binding(parity, None, before)?;
                    seg.backward_bindings.push(b);
                }
            }
        }
        Ok(())
    }

    /// [`check_unet`] for this runner's folder.
    pub fn check_unet(&self, unet: &Graph, targets: &BTreeMap<String, WeightTarget>) -> Result<()> {
        check_unet(&self.manifest, &self.dir, unet, targets)
    }

    /// [`GradRunner::check_unet`] against the UNet of a model folder.
    pub fn check_model(&self, rt: &Runtime, model_dir: &Path) -> Result<()> {
        let path = ModelFolder::open(model_dir)?.graph("unet");
        let unet = Graph::load(rt, "unet", &path)?;
        let graph = OnnxGraph::open(&path)?;
        self.check_unet(&unet, GraphTargets::discover(&graph)?.lora_targets()?)
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
        check_exact(what, &tensors, &expected)?;
        let cotangent = tensors.remove(&m.cotangent).expect("checked");
        let params: NamedTensors = m
            .params
            .iter()
            .map(|p| (p.key.clone(), tensors.remove(&p.key).expect("checked")))
            .collect();
        let output = m.output.clone();
        self.set_params(&params)?;
        self.zero_grad()?;
        let out = self.forward(&tensors)?;
        self.backward(&cotangent)?;
        let mut result = self.grads()?;
        result.insert(output, out);
        Ok(result)
    }

    /// Sets every LoRA parameter (PEFT keys, exactly the manifest's set).
    pub fn set_params(&mut self, params: &NamedTensors) -> Result<()> {
        check_exact("LoRA parameters", params, &self.manifest.param_shapes())?;
        for (key, value) in params {
            let (s, i) = self.param_at[key];
            let a = value.as_standard_layout();
            write_f32(
                &mut self.segments[s].params[i],
                a.as_slice().expect("standard"),
            )?;
        }
        self.forwarded = false;
        Ok(())
    }

    /// Resets the accumulated gradients to zero.
    pub fn zero_grad(&mut self) -> Result<()> {
        for seg in &mut self.segments {
            let cur = seg.current;
            for t in seg.accum[cur].iter_mut() {
                fill_zeros(t)?;
            }
        }
        self.accumulated = 0;
        Ok(())
    }

    /// Runs the forward graphs on the UNet inputs (exactly the manifest's
    /// `unet_inputs`, by name) with the current parameters; returns the UNet
    /// output and keeps what [`GradRunner::backward`] needs.
    pub fn forward(&mut self, inputs: &NamedTensors) -> Result<ArrayD<f32>> {
        check_exact("UNet inputs", inputs, &self.manifest.unet_input_shapes())?;
        self.forwarded = false;
        let first = &self.segments[0].forward;
        self.unet_inputs = self
            .manifest
            .unet_inputs
            .iter()
            .map(|i| {
                Ok((
                    i.name.clone(),
                    first.upload(&i.name, Input::F32(inputs[&i.name].clone()))?,
                ))
            })
            .collect::<Result<_>>()?;
        for seg in &mut self.segments {
            for name in &seg.entry.inputs {
                if let Some(t) = self.unet_inputs.get(name) {
                    seg.forward_binding.input(name, t)?;
                }
            }
            seg.forward
                .run_values(&mut seg.forward_binding, Vec::new(), None)?;
        }
        self.forwarded = true;
        let last = self.segments.last().expect("non-empty");
        download(find_output(std::slice::from_ref(last), &self.manifest.output).expect("checked"))
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
        // Cotangents of segment outputs, summed over the segments that read them.
        let mut cots: HashMap<String, ArrayD<f32>> = HashMap::new();
        cots.insert(self.manifest.output.clone(), cotangent.clone());
        for s in (0..self.segments.len()).rev() {
            let (before, rest) = self.segments.split_at_mut(s);
            let seg = &mut rest[0];
            if seg.backward.is_none() {
                continue;
            }
            seg.run_backward(before, &self.unet_inputs, &cots)?;
            for ((x, _), t) in seg.entry.input_grads.iter().zip(&seg.input_grads) {
                let g = download(t)?;
                match cots.get_mut(x) {
                    Some(sum) => *sum += &g,
                    None => {
                        cots.insert(x.clone(), g);
                    }
                }
            }
        }
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
            .map(|p| {
                let (s, i) = self.param_at[&p.key];
                let seg = &self.segments[s];
                Ok((p.key.clone(), download(&seg.accum[seg.current][i])?))
            })
            .collect()
    }
}

impl SegmentRunner {
    fn open(
        rt: &Runtime,
        dir: &Path,
        m: &TrainManifest,
        entry: &Segment,
        keep_residuals: bool,
    ) -> Result<SegmentRunner> {
        let forward = Graph::load_training(rt, "train forward", &dir.join(&entry.forward))?;
        let backward = match &entry.backward {
            Some(b) => Some(Graph::load_training(rt, "train backward", &dir.join(b))?),
            None => None,
        };
        check_graphs(entry, &forward, backward.as_ref())?;
        let specs: Vec<_> = entry
            .params
            .iter()
            .map(|k| m.params.iter().find(|p| p.key == *k).expect("checked"))
            .collect();
        for p in &specs {
            let spec = forward.require_input(&p.key)?;
            let same = spec.shape.len() == p.shape.len()
                && spec
                    .shape
                    .iter()
                    .zip(&p.shape)
                    .all(|(g, m)| *g == *m as i64);
            if !same || spec.dtype != DType::F32 {
                return Err(Error::invalid_model(format!(
                    "{}: parameter {} does not match the manifest's float32{:?}",
                    forward.path.display(),
                    spec.describe(),
                    p.shape
                )));
            }
        }
        let shapes: Vec<Vec<usize>> = specs.iter().map(|p| p.shape.clone()).collect();
        let alloc =
            |g: &Graph| -> Result<Vec<DynTensor>> { shapes.iter().map(|s| zeros(g, s)).collect() };
        let params = alloc(&forward)?;
        let accum = match &backward {
            Some(b) => [alloc(b)?, alloc(b)?],
            None => [Vec::new(), Vec::new()],
        };
        let outputs = alloc_outputs(&forward, &entry.outputs)?;
        let residuals = match keep_residuals {
            true => Some(alloc_outputs(&forward, &entry.residuals)?),
            false => None,
        };
        let input_grads = match &backward {
            Some(b) => alloc_outputs(b, entry.input_grads.iter().map(|(_, g)| g))?,
            None => Vec::new(),
        };
        let mut seg = SegmentRunner {
            grad_names: specs.iter().map(|p| p.grad.clone()).collect(),
            accum_names: specs.iter().map(|p| p.accum.clone()).collect(),
            forward_binding: forward.binding()?,
            entry: entry.clone(),
            forward,
            backward,
            params,
            accum,
            current: 0,
            outputs,
            residuals,
            input_grads,
            backward_bindings: Vec::new(),
            backward_per_run: Vec::new(),
        };
        seg.bind_forward_static()?;
        Ok(seg)
    }

    /// Parameters and output buffers (and kept residuals) of the forward.
    fn bind_forward_static(&mut self) -> Result<()> {
        let b = &mut self.forward_binding;
        for (k, t) in self.entry.params.iter().zip(&self.params) {
            b.input(k, t)?;
        }
        for (name, t) in self.entry.outputs.iter().zip(&mut self.outputs) {
            b.output(name, t)?;
        }
        if let Some(res) = &mut self.residuals {
            for (name, t) in self.entry.residuals.iter().zip(res) {
                b.output(name, t)?;
            }
        }
        Ok(())
    }

    /// A backward binding of every input and output in a fixed buffer:
    /// `residuals` (or the kept ones), parameters, `accum[parity]` read and
    /// the other accumulator written, this and earlier segments' outputs, and
    /// the input gradients. Records the inputs left for each run (UNet inputs;
    /// cotangents are passed from the host).
    fn backward_binding(
        &mut self,
        parity: usize,
        residuals: Option<&[DynTensor]>,
        before: &[SegmentRunner],
    ) -> Result<Binding> {
        let graph = self.backward.as_ref().expect("checked by caller");
        let residuals = residuals.or(self.residuals.as_deref()).expect("one");
        let (read, write) = split_pair(&mut self.accum, parity);
        let mut fixed: HashMap<&str, &DynTensor> = HashMap::new();
        let own = [
            (&self.entry.outputs, &self.outputs),
            (&self.accum_names, read),
            (&self.entry.params, &self.params),
        ];
        let earlier = before.iter().map(|s| (&s.entry.outputs, &s.outputs));
        for (names, values) in earlier.chain(own) {
            fixed.extend(names.iter().map(String::as_str).zip(values));
        }
        fixed.extend(
            self.entry
                .residuals
                .iter()
                .map(String::as_str)
                .zip(residuals),
        );
        let mut b = graph.binding()?;
        let mut per_run = Vec::new();
        for name in &self.entry.backward_inputs {
            if self.entry.cotangents.iter().any(|(_, c)| c == name) {
                continue;
            }
            match fixed.get(name.as_str()) {
                Some(value) => b.input(name, value)?,
                None => per_run.push(name.clone()),
            }
        }
        for (name, t) in self.grad_names.iter().zip(write.iter_mut()) {
            b.output(name, t)?;
        }
        for ((_, name), t) in self.entry.input_grads.iter().zip(&mut self.input_grads) {
            b.output(name, t)?;
        }
        self.backward_per_run = per_run;
        Ok(b)
    }

    /// Runs this segment's backward (after recomputing its forward when its
    /// residuals were not kept), writing `accum[1 - current]` and the input
    /// gradients.
    fn run_backward(
        &mut self,
        before: &[SegmentRunner],
        unet_inputs: &HashMap<String, DynTensor>,
        cots: &HashMap<String, ArrayD<f32>>,
    ) -> Result<()> {
        // The recomputed residuals live until the run is done.
        let (mut fresh, _recomputed) = match self.backward_bindings.is_empty() {
            true => {
                let res = self.recompute(before, unet_inputs)?;
                (
                    Some(self.backward_binding(self.current, Some(&res), before)?),
                    Some(res),
                )
            }
            false => (None, None),
        };
        let b = match &mut fresh {
            Some(b) => b,
            None => &mut self.backward_bindings[self.current],
        };
        for name in &self.backward_per_run {
            let value = unet_inputs
                .get(name)
                .ok_or_else(|| unknown_input(&self.entry, name))?;
            b.input(name, value)?;
        }
        let mut host = Vec::new();
        for (o, input) in &self.entry.cotangents {
            let c = cots.get(o).cloned().ok_or_else(|| {
                Error::invalid_model(format!("no cotangent reaches segment output '{o}'"))
            })?;
            host.push((input.as_str(), Input::F32(c)));
        }
        let graph = self.backward.as_mut().expect("checked by caller");
        graph.run_values(b, host, None)?;
        self.current = 1 - self.current;
        Ok(())
    }

    /// Runs the forward again from the saved inputs, into fresh residual
    /// buffers that live only until this segment's backward has run (a
    /// binding of its own, so that nothing else holds them).
    fn recompute(
        &mut self,
        before: &[SegmentRunner],
        unet_inputs: &HashMap<String, DynTensor>,
    ) -> Result<Vec<DynTensor>> {
        let mut b = self.forward.binding()?;
        for name in &self.entry.inputs {
            let value = find_in(&self.entry.params, &self.params, name)
                .or_else(|| unet_inputs.get(name))
                .or_else(|| find_output(before, name))
                .ok_or_else(|| unknown_input(&self.entry, name))?;
            b.input(name, value)?;
        }
        for (name, t) in self.entry.outputs.iter().zip(&mut self.outputs) {
            b.output(name, t)?;
        }
        let mut res = alloc_outputs(&self.forward, &self.entry.residuals)?;
        for (name, t) in self.entry.residuals.iter().zip(&mut res) {
            b.output(name, t)?;
        }
        self.forward.run_values(&mut b, Vec::new(), None)?;
        Ok(res)
    }
}

fn unknown_input(entry: &Segment, name: &str) -> Error {
    Error::invalid_model(format!(
        "segment {}: input '{name}' is neither a UNet input, a parameter, an accumulator, a \
         residual nor an earlier segment's output",
        entry.forward
    ))
}

fn find_in<'a>(names: &[String], values: &'a [DynTensor], name: &str) -> Option<&'a DynTensor> {
    names.iter().position(|n| n == name).map(|i| &values[i])
}

/// The output buffer called `name` of one of `segments`.
fn find_output<'a>(segments: &'a [SegmentRunner], name: &str) -> Option<&'a DynTensor> {
    segments
        .iter()
        .find_map(|s| find_in(&s.entry.outputs, &s.outputs, name))
}

/// (`pair[current]`, `pair[1 - current]`).
fn split_pair<T>(pair: &mut [Vec<T>; 2], current: usize) -> (&Vec<T>, &mut Vec<T>) {
    let (a, b) = pair.split_at_mut(1);
    if current == 0 {
        (&a[0], &mut b[0])
    } else {
        (&b[0], &mut a[0])
    }
}

fn zeros(g: &Graph, shape: &[usize]) -> Result<DynTensor> {
    let mut t = g.alloc(DType::F32, shape)?;
    fill_zeros(&mut t)?;
    Ok(t)
}

/// Buffers for outputs `names` of `g`, whose shapes the graph must fix.
fn alloc_outputs<'a>(
    g: &Graph,
    names: impl IntoIterator<Item = &'a String>,
) -> Result<Vec<DynTensor>> {
    names
        .into_iter()
        .map(|name| {
            let spec = g.require_output(&[name])?;
            let shape: Option<Vec<usize>> =
                (0..spec.shape.len()).map(|i| spec.fixed_dim(i)).collect();
            let shape = shape.ok_or_else(|| {
                Error::invalid_model(format!(
                    "{} ({}): output {} has no fixed shape; training graphs are exported at fixed \
                     shapes",
                    g.component,
                    g.path.display(),
                    spec.describe()
                ))
            })?;
            g.alloc(spec.dtype, &shape)
        })
        .collect()
}

/// A segment's graphs must have the inputs and outputs its entry lists.
fn check_graphs(entry: &Segment, forward: &Graph, backward: Option<&Graph>) -> Result<()> {
    for name in &entry.inputs {
        forward.require_input(name)?;
    }
    for name in entry.outputs.iter().chain(&entry.residuals) {
        forward.require_output(&[name])?;
    }
    let Some(backward) = backward else {
        return Ok(());
    };
    for name in &entry.backward_inputs {
        backward.require_input(name)?;
    }
    for (_, g) in &entry.input_grads {
        backward.require_output(&[g])?;
    }
    if let Some(extra) = backward
        .inputs
        .iter()
        .find(|i| !entry.backward_inputs.contains(&i.name))
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

/// Checks the training folder `dir` (manifest `m`) against the UNet a pipeline runs: the same
/// input names, dtypes and compatible shapes, and every target a linear
/// module of that UNet with the parameter shapes' sizes. The error names
/// the input or module and both sides.
pub fn check_unet(
    m: &TrainManifest,
    dir: &Path,
    unet: &Graph,
    targets: &BTreeMap<String, WeightTarget>,
) -> Result<()> {
    let here = dir.display();
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
