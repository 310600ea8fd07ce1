//! The SPO trainer: a sampling round with the current LoRA, then one pass of
//! AdamW steps over the round's (win, lose) pairs, shuffled.
//!
//! The models: the pipeline's text encoders and VAE; the training folder's
//! `sample.onnx` (the LoRA-injected UNet) for sampling, fed the current
//! parameters as inputs (an update costs no merge and no session rebuild)
//! and, with zero parameters, as the frozen reference; its forward/backward
//! graphs for the policy's gradients; and the preference model.
//!
//! Randomness: each round draws from a generator seeded by (seed, round),
//! so the trainer's whole random state is those two numbers and a resumed
//! run continues bit for bit. A round that fails or is cancelled leaves the
//! trainer as it was before the round.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use ndarray::{ArrayD, Axis, IxDyn};

use super::config::{TrainConfig, TrainerSpec};
use super::grad::GradRunner;
use super::manifest::TrainManifest;
use super::optim::{clip_gradients, AdamW};
use super::preference::PreferenceModel;
use super::sampler::{sample_prompt, Denoiser, Pair, Schedule};
use super::spo::{guide, pair_loss, Branch, LossConfig};
use crate::error::{Error, ErrorCode, Result};
use crate::lora::{lora_bytes, write_lora, GraphTargets, LoraDialect, LoraFile, LoraOut};
use crate::lora::{Component, UnetLayout};
use crate::memory;
use crate::model::tensors::NamedTensors;
use crate::model::{ModelKind, OnnxGraph};
use crate::pipeline::denoise::{cat_batch, timestep_input, vae_decode};
use crate::pipeline::job::{CancelToken, ProgressFn};
use crate::pipeline::rng::TorchRng;
use crate::pipeline::{BusyGuard, Lora, LoraMode, Pipeline};
use crate::runtime::session::{Binding, Graph, Input};
use crate::scheduler::Prediction;
use crate::text::LongPrompt;

/// Prompts one round may take.
pub const MAX_ROUND_PROMPTS: usize = 4096;

/// What the trainer learns and keeps: the LoRA, the optimizer, the round.
#[derive(Clone)]
pub struct TrainState {
    /// PEFT keys: `<module>.lora_A.weight` [r,in], `.lora_B.weight` [out,r].
    pub params: NamedTensors,
    pub adam: AdamW,
    /// Rounds completed; with the seed, the generator of the next round.
    pub round: u64,
}

/// What one round did. Means are over the round; times in seconds.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct RoundMetrics {
    pub round: u64,
    /// Mean loss over the trained pairs (NaN when none).
    pub loss: f64,
    pub pairs: usize,
    pub pools: usize,
    /// Pools whose score gap passed the threshold, over all pools.
    pub accepted_ratio: f64,
    pub score_mean: f64,
    /// Mean best-minus-worst score of a pool.
    pub score_gap: f64,
    /// Mean global gradient norm before clipping, over applied updates.
    pub grad_norm: f64,
    /// Branches whose ratio left the clamp (no gradient), over all branches.
    pub clamp_fraction: f64,
    pub updates: usize,
    /// Updates skipped because the loss or a gradient was not finite.
    pub skipped_updates: usize,
    pub time_sampling: f64,
    pub time_scoring: f64,
    pub time_forward: f64,
    pub time_backward: f64,
    pub time_optimizer: f64,
    /// The whole round, wall clock.
    pub time_total: f64,
}

/// The trainer. One thread at a time; [`Trainer::cancel_token`] works from any.
pub struct Trainer {
    pipeline: Pipeline,
    spec: TrainerSpec,
    grad: GradRunner,
    sampler: Graph,
    preference: PreferenceModel,
    schedule: Schedule,
    /// One latent: [1, C, h, w].
    latent: [usize; 4],
    layout: Option<UnetLayout>,
    state: TrainState,
    cancel: Arc<CancelToken>,
    progress: Option<Box<ProgressFn>>,
}

impl Trainer {
    /// Opens the training folder and the preference model for `pipeline`,
    /// checking that the folder was exported from the pipeline's UNet.
    pub fn new(pipeline: &Pipeline, spec: TrainerSpec) -> Result<Trainer> {
        spec.config.check()?;
        let rt = pipeline.runtime();
        let inner = &pipeline.inner;
        // Everything that can be checked without sessions comes first: a
        // mismatched folder fails at once, not after loading its graphs.
        let manifest = TrainManifest::open(&spec.train_dir)?;
        check_folder(pipeline, &manifest, &spec.train_dir)?;
        let sample = manifest.sample.as_deref().ok_or_else(|| {
            Error::invalid_model(format!(
                "{}: the training folder has no sampling graph (sample.onnx); export it again \
                 with this version's spo_onnx.export.train",
                spec.train_dir.display()
            ))
        })?;
        let preference = PreferenceModel::open(rt, &spec.preference)?;
        let sampler = Graph::load(rt, "sample", &spec.train_dir.join(sample))?;
        for p in &manifest.params {
            sampler.require_input(&p.key)?;
        }
        let grad = GradRunner::open(rt, &spec.train_dir)?;
        let m = grad.manifest();
        let cfg = &spec.config;
        let schedule = Schedule::new(&inner.scheduler_config, cfg.steps, cfg.eta)?;
        let channels = m.output_shape().get(1).copied().unwrap_or(0);
        let latent = [1, channels, m.latent_height, m.latent_width];
        let params = initial_params(&grad, cfg)?;
        let adam = AdamW::new(cfg.adamw(), &params)?;
        // kohya names SDXL modules by SGM block; SD 1.x ones by the
        // flattened diffusers path (what A1111, ComfyUI and diffusers read).
        let layout = (inner.folder.kind == ModelKind::Sdxl)
            .then(|| read_layout(&inner.folder.dir.join("unet/config.json")))
            .flatten();
        let mut t = Trainer {
            pipeline: pipeline.clone(),
            grad,
            sampler,
            preference,
            schedule,
            latent,
            layout,
            state: TrainState {
                params,
                adam,
                round: 0,
            },
            cancel: Arc::new(CancelToken::new()?),
            progress: None,
            spec,
        };
        t.reset_gradients()?;
        Ok(t)
    }

    pub fn config(&self) -> &TrainConfig {
        &self.spec.config
    }

    pub fn state(&self) -> &TrainState {
        &self.state
    }

    /// One latent's shape, [1, C, h, w].
    pub fn latent_shape(&self) -> [usize; 4] {
        self.latent
    }

    /// The schedule index of `timestep`; an error names the schedule.
    pub fn step_index(&self, timestep: i64) -> Result<usize> {
        let ts = &self.schedule.timesteps;
        ts.iter().position(|t| *t == timestep).ok_or_else(|| {
            Error::invalid_argument(format!(
                "timestep {timestep} is not in the trainer's DDIM schedule {ts:?}"
            ))
        })
    }

    /// The LoRA rank and alpha of the training folder.
    pub fn rank_alpha(&self) -> (usize, f32) {
        let m = self.grad.manifest();
        (m.rank, m.lora_alpha as f32)
    }

    /// Cancels the running round from any thread; the round then fails with
    /// `Cancelled` and leaves the trainer as before it.
    pub fn cancel_token(&self) -> Arc<CancelToken> {
        self.cancel.clone()
    }

    /// Called with (done, total) as a round advances; `false` cancels it.
    pub fn set_progress(&mut self, f: Option<Box<ProgressFn>>) {
        self.progress = f;
    }

    /// Replaces the state (a loaded checkpoint): keys and shapes must be
    /// this training folder's, and `seed` becomes the run's seed.
    pub fn restore(&mut self, state: TrainState, seed: u64) -> Result<()> {
        crate::model::tensors::check_exact(
            "checkpoint LoRA",
            &state.params,
            &self.grad.manifest().param_shapes(),
        )?;
        let mut adam = AdamW::new(self.spec.config.adamw(), &state.params)?;
        let (m, v) = state.adam.moments();
        adam.restore(state.adam.step, m.clone(), v.clone())?;
        self.state = TrainState { adam, ..state };
        self.spec.config.seed = seed;
        self.reset_gradients()
    }

    /// One round: samples `prompts` with the current LoRA, then trains on the
    /// pairs. On error or cancellation nothing of the round is kept.
    pub fn step(&mut self, prompts: &[&str]) -> Result<RoundMetrics> {
        if prompts.is_empty() || prompts.len() > MAX_ROUND_PROMPTS {
            return Err(Error::invalid_argument(format!(
                "a round takes 1 to {MAX_ROUND_PROMPTS} prompts, not {}",
                prompts.len()
            )));
        }
        let _busy = BusyGuard::acquire(&self.pipeline)?;
        let snapshot = self.state.clone();
        let result = self.round(prompts);
        if result.is_err() {
            self.state = snapshot;
            self.reset_gradients()?;
            if self.cancel.is_cancelled() {
                self.cancel.reset()?;
            }
        }
        result
    }

    /// Trains on given pairs (a host's own sampler): `conds[p.prompt]` is
    /// each pair's conditioning ([`Trainer::condition`]). The pairs are used
    /// in the order given, in mini-batches as configured.
    pub fn update(&mut self, pairs: &[Pair], conds: &[NamedTensors]) -> Result<RoundMetrics> {
        let start = Instant::now();
        let _busy = BusyGuard::acquire(&self.pipeline)?;
        let snapshot = self.state.clone();
        let mut metrics = RoundMetrics {
            round: self.state.round,
            ..RoundMetrics::default()
        };
        let mut ticks = Ticks::new(pairs.len());
        let result = self.train_pairs(pairs, conds, &mut metrics, &mut ticks);
        if let Err(e) = result {
            self.state = snapshot;
            self.reset_gradients()?;
            return Err(e);
        }
        finish(&mut metrics, &[], &[]);
        metrics.time_total = start.elapsed().as_secs_f64();
        Ok(metrics)
    }

    /// The UNet conditioning of `prompt` for one guided call: rows
    /// [negative (the empty prompt), prompt], and SDXL's pooled embeddings
    /// and size ids.
    pub fn condition(&self, prompt: &str) -> Result<NamedTensors> {
        let (pos, neg) =
            self.pipeline
                .encode_prompts(prompt, Some(""), true, 0, LongPrompt::Truncate)?;
        let neg = neg.expect("CFG gives a negative");
        let mut c = NamedTensors::new();
        c.insert(
            "encoder_hidden_states".into(),
            cat_batch(&[&neg.embeds, &pos.embeds])?,
        );
        if self.pipeline.kind() == ModelKind::Sdxl {
            let (Some(np), Some(pp)) = (&neg.pooled, &pos.pooled) else {
                return Err(Error::invalid_model(
                    "SDXL text encoders gave no pooled output",
                ));
            };
            c.insert("text_embeds".into(), cat_batch(&[np, pp])?);
            let f = self.pipeline.inner.vae_factor as f32;
            let (h, w) = (self.latent[2] as f32 * f, self.latent[3] as f32 * f);
            let ids = [h, w, 0.0, 0.0, h, w].repeat(2);
            c.insert(
                "time_ids".into(),
                ArrayD::from_shape_vec(IxDyn(&[2, 6]), ids).expect("12 ids"),
            );
        }
        Ok(c)
    }

    /// Writes the current LoRA (kohya names of SDXL use the SGM numbering).
    pub fn save_lora(&self, path: &Path, dialect: LoraDialect) -> Result<()> {
        write_lora(path, &self.state.params, self.lora_out(dialect))
    }

    /// Applies the current LoRA to `pipeline` from memory (slots when its
    /// UNet has them, else merged), replacing what it had.
    pub fn apply(&self, pipeline: &Pipeline) -> Result<()> {
        let bytes = lora_bytes(&self.state.params, self.lora_out(LoraDialect::Diffusers))?;
        let file = LoraFile::from_bytes(&bytes, Path::new("<trainer LoRA>"), None)?;
        pipeline.set_loras(&[(Lora(Arc::new(file)), 1.0)], LoraMode::Auto)?;
        Ok(())
    }

    fn lora_out(&self, dialect: LoraDialect) -> LoraOut<'_> {
        let (rank, alpha) = self.rank_alpha();
        LoraOut {
            rank,
            alpha,
            dialect,
            layout: self.layout.as_ref(),
        }
    }

    fn reset_gradients(&mut self) -> Result<()> {
        self.grad.set_params(&self.state.params)?;
        self.grad.zero_grad()
    }

    fn round(&mut self, prompts: &[&str]) -> Result<RoundMetrics> {
        let start = Instant::now();
        let cfg = self.spec.config.clone();
        let mut rng = TorchRng::new(stream_seed(cfg.seed, self.state.round));
        let conds: Vec<NamedTensors> = prompts
            .iter()
            .map(|p| self.condition(p))
            .collect::<Result<_>>()?;
        let trained_steps = cfg.steps - cfg.divert_start;
        let mut ticks = Ticks::new(prompts.len() * (cfg.steps + trained_steps));
        let mut metrics = RoundMetrics {
            round: self.state.round,
            ..RoundMetrics::default()
        };
        let (mut pairs, mut scores, mut gaps) = (Vec::new(), Vec::new(), Vec::new());
        for (i, prompt) in prompts.iter().enumerate() {
            let s = self.sample(prompt, &conds[i], i, &mut rng, &mut metrics, &mut ticks)?;
            metrics.pools += s.pools;
            metrics.accepted_ratio += s.accepted as f64;
            pairs.extend(s.pairs);
            scores.extend(s.scores);
            gaps.extend(s.gaps);
        }
        // One permutation of the round's pairs (Fisher-Yates).
        for i in (1..pairs.len()).rev() {
            pairs.swap(i, rng.below(i + 1));
        }
        ticks.total = ticks.done + pairs.len();
        self.train_pairs(&pairs, &conds, &mut metrics, &mut ticks)?;
        self.state.round += 1;
        finish(&mut metrics, &scores, &gaps);
        metrics.time_total = start.elapsed().as_secs_f64();
        Ok(metrics)
    }

    fn sample(
        &mut self,
        prompt: &str,
        cond: &NamedTensors,
        index: usize,
        rng: &mut TorchRng,
        metrics: &mut RoundMetrics,
        ticks: &mut Ticks,
    ) -> Result<super::sampler::Sampled> {
        let pipeline = self.pipeline.clone();
        let inner = &pipeline.inner;
        let mut models = inner.models.lock();
        let mut policy = bind_params(&self.sampler, &self.state.params, self.output())?;
        let mut den = RoundModels {
            sampler: &mut self.sampler,
            policy: &mut policy,
            cond,
            prompt,
            schedule: &self.schedule,
            guidance: self.spec.config.guidance as f32,
            vae: &mut models.vae_decoder,
            scaling: (
                inner.folder.vae_scaling_factor,
                inner.folder.vae_shift_factor,
            ),
            preference: &mut self.preference,
            cancel: &self.cancel,
            progress: &mut self.progress,
            ticks,
            metrics,
        };
        sample_prompt(
            &mut den,
            &self.schedule,
            &self.spec.config,
            index,
            &self.latent,
            rng,
        )
    }

    fn output(&self) -> String {
        self.grad.manifest().output.clone()
    }

    /// Mini-batches of `batch` pairs, `grad_accum` of them per update.
    fn train_pairs(
        &mut self,
        pairs: &[Pair],
        conds: &[NamedTensors],
        metrics: &mut RoundMetrics,
        ticks: &mut Ticks,
    ) -> Result<()> {
        if let Some(p) = pairs
            .iter()
            .find(|p| p.prompt >= conds.len() || p.step >= self.schedule.steps.len())
        {
            return Err(Error::invalid_argument(format!(
                "a pair names prompt {} of {} and step {} of {}",
                p.prompt,
                conds.len(),
                p.step,
                self.schedule.steps.len()
            )));
        }
        let zeros: NamedTensors = self
            .state
            .params
            .iter()
            .map(|(k, v)| (k.clone(), ArrayD::zeros(v.raw_dim())))
            .collect();
        let mut reference = bind_params(&self.sampler, &zeros, self.output())?;
        let cfg = self.spec.config.clone();
        let batches: Vec<&[Pair]> = pairs.chunks(cfg.batch).collect();
        let (mut loss_sum, mut branches) = (0.0, 0usize);
        for group in batches.chunks(cfg.grad_accum) {
            let n: usize = group.iter().map(|b| b.len()).sum();
            let mut loss = 0.0;
            for pair in group.iter().flat_map(|b| b.iter()) {
                let l =
                    self.pair_gradient(pair, &conds[pair.prompt], &mut reference, n, metrics)?;
                loss += l;
                branches += 2;
                ticks.tick(&mut self.progress, &self.cancel)?;
            }
            loss_sum += loss * n as f64;
            self.optimizer_step(loss, metrics)?;
        }
        metrics.pairs = pairs.len();
        metrics.loss = loss_sum / pairs.len() as f64;
        metrics.clamp_fraction /= branches.max(1) as f64;
        ticks.finish(&mut self.progress);
        Ok(())
    }

    /// Accumulates one pair's gradient (its loss weighted 1/n); returns the
    /// weighted loss (NaN when not finite: the update is then skipped).
    fn pair_gradient(
        &mut self,
        pair: &Pair,
        cond: &NamedTensors,
        reference: &mut Binding,
        n: usize,
        metrics: &mut RoundMetrics,
    ) -> Result<f64> {
        let t = self.schedule.timesteps[pair.step];
        let step = self.schedule.steps[pair.step];
        let opts = self.cancel.run_options();
        let t0 = Instant::now();
        let mut refs = Vec::with_capacity(2);
        for x in &pair.x_t {
            refs.push(guided_pair(&mut self.sampler, reference, cond, x, t, opts)?);
        }
        let inputs: Vec<NamedTensors> = pair
            .x_t
            .iter()
            .map(|x| unet_inputs(cond, x, t))
            .collect::<Result<_>>()?;
        let win = split_rows(&self.grad.forward(&inputs[0])?);
        let lose = split_rows(&self.grad.forward(&inputs[1])?);
        metrics.time_forward += t0.elapsed().as_secs_f64();
        let outs = [&win, &lose];
        let branch = |b: usize| Branch {
            x_t: pair.x_t[b].view(),
            x_prev: pair.x_prev[b].view(),
            eps_u: outs[b][0].view(),
            eps_c: outs[b][1].view(),
            ref_u: refs[b][0].view(),
            ref_c: refs[b][1].view(),
        };
        let cfg = &self.spec.config;
        let loss_cfg = LossConfig {
            beta: cfg.beta,
            clip: cfg.clip,
            guidance: cfg.guidance as f32,
        };
        let pl = pair_loss(&step, &loss_cfg, &branch(0), &branch(1), n)?;
        if !(pl.loss.is_finite() && pl.log_ratio.iter().all(|l| l.is_finite())) {
            return Ok(f64::NAN);
        }
        metrics.clamp_fraction += pl.active.iter().filter(|a| !**a).count() as f64;
        // The lose branch was forwarded last; the win branch is forwarded
        // again (its residuals were replaced) only when it has a gradient.
        for b in [1, 0] {
            if !pl.active[b] {
                continue;
            }
            let t0 = Instant::now();
            if b == 0 {
                self.grad.forward(&inputs[0])?;
            }
            let t1 = Instant::now();
            metrics.time_forward += (t1 - t0).as_secs_f64();
            let cot = cat_batch(&[&pl.cot_u[b], &pl.cot_c[b]])?;
            self.grad.backward(&cot)?;
            metrics.time_backward += t1.elapsed().as_secs_f64();
        }
        Ok(pl.loss)
    }

    /// Clips and applies the accumulated gradients, unless the loss or a
    /// gradient is not finite (then they are dropped and counted).
    fn optimizer_step(&mut self, loss: f64, metrics: &mut RoundMetrics) -> Result<()> {
        let t0 = Instant::now();
        let mut grads = self.grad.grads()?;
        self.grad.zero_grad()?;
        let finite = loss.is_finite() && grads.values().all(|g| g.iter().all(|v| v.is_finite()));
        if !finite {
            metrics.skipped_updates += 1;
            return Ok(());
        }
        metrics.grad_norm += clip_gradients(&mut grads, self.spec.config.grad_clip());
        self.state.adam.update(&mut self.state.params, &grads)?;
        self.grad.set_params(&self.state.params)?;
        metrics.updates += 1;
        metrics.time_optimizer += t0.elapsed().as_secs_f64();
        Ok(())
    }
}

/// The training folder must come from the pipeline's UNet: same inputs,
/// same target modules and sizes.
fn check_folder(pipeline: &Pipeline, manifest: &TrainManifest, dir: &Path) -> Result<()> {
    let inner = &pipeline.inner;
    let path = inner.folder.graph(Component::Unet.folder());
    let graph = OnnxGraph::open(&path)?;
    let targets = GraphTargets::discover(&graph)?;
    super::grad::check_unet(
        manifest,
        dir,
        &inner.models.lock().unet,
        targets.lora_targets()?,
    )?;
    if inner.scheduler_config.prediction()? != Prediction::Epsilon {
        return Err(Error::unsupported(
            "SPO's log-probabilities are written for epsilon-prediction models",
        ));
    }
    if manifest.batch != 2 {
        return Err(Error::unsupported(format!(
            "{}: batch {}; the trainer runs one guided pair (batch 2) per call: export with \
             --batch 2",
            dir.display(),
            manifest.batch
        )));
    }
    Ok(())
}

/// PEFT's gaussian init: A ~ N(0, std) (std 1/rank unless set), B = 0, so
/// the policy starts as the reference.
fn initial_params(grad: &GradRunner, cfg: &TrainConfig) -> Result<NamedTensors> {
    let m = grad.manifest();
    let std = cfg.init_std.unwrap_or(1.0 / m.rank as f64) as f32;
    let mut rng = TorchRng::new(stream_seed(cfg.seed, u64::MAX));
    m.params
        .iter()
        .map(|p| {
            let n = memory::count::<f32>(&p.shape, &p.key)?;
            let v = if p.key.ends_with(".lora_A.weight") {
                let mut v = rng.try_randn(n, &p.key)?;
                v.iter_mut().for_each(|z| *z *= std);
                v
            } else {
                memory::filled(n, 0.0, &p.key)?
            };
            let a = ArrayD::from_shape_vec(IxDyn(&p.shape), v).expect("sized");
            Ok((p.key.clone(), a))
        })
        .collect()
}

fn read_layout(config: &Path) -> Option<UnetLayout> {
    let text = std::fs::read_to_string(config).ok()?;
    UnetLayout::from_config(&serde_json::from_str(&text).ok()?)
}

/// The generator seed of stream `stream` (a round, or init) of run `seed`
/// (splitmix64 of the pair).
fn stream_seed(seed: u64, stream: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn bind_params(graph: &Graph, params: &NamedTensors, output: String) -> Result<Binding> {
    let fixed = params
        .iter()
        .map(|(k, v)| (k.as_str(), Input::F32(v.clone())))
        .collect();
    graph.bind(fixed, &output)
}

/// The UNet inputs of one guided call on latent `x` [1,C,h,w] at `t`.
fn unet_inputs(cond: &NamedTensors, x: &ArrayD<f32>, t: i64) -> Result<NamedTensors> {
    let mut inputs = cond.clone();
    inputs.insert("sample".into(), cat_batch(&[x, x])?);
    inputs.insert("timestep".into(), ArrayD::from_elem(IxDyn(&[2]), t as f32));
    Ok(inputs)
}

/// The sampling graph's [unconditional, conditional] outputs for `x` at `t`.
fn guided_pair(
    graph: &mut Graph,
    binding: &mut Binding,
    cond: &NamedTensors,
    x: &ArrayD<f32>,
    t: i64,
    opts: &ort::session::RunOptions,
) -> Result<[ArrayD<f32>; 2]> {
    let mut inputs = vec![
        ("sample", Input::F32(cat_batch(&[x, x])?)),
        ("timestep", timestep_input(graph, t as f64, 2)?),
    ];
    for (k, v) in cond {
        inputs.push((k.as_str(), Input::F32(v.clone())));
    }
    Ok(split_rows(&graph.run_bound(binding, inputs, Some(opts))?))
}

fn split_rows(out: &ArrayD<f32>) -> [ArrayD<f32>; 2] {
    [0, 1].map(|i| out.slice_axis(Axis(0), (i..i + 1).into()).to_owned())
}

/// Means from the sums the round collected.
fn finish(m: &mut RoundMetrics, scores: &[f32], gaps: &[f64]) {
    let mean = |s: f64, n: usize| if n == 0 { f64::NAN } else { s / n as f64 };
    m.accepted_ratio = mean(m.accepted_ratio, m.pools);
    m.score_mean = mean(scores.iter().map(|s| f64::from(*s)).sum(), scores.len());
    m.score_gap = mean(gaps.iter().sum(), gaps.len());
    m.grad_norm = mean(m.grad_norm, m.updates);
}

/// Progress of a round: (done, total) to the host's callback.
struct Ticks {
    done: usize,
    total: usize,
}

impl Ticks {
    fn new(total: usize) -> Ticks {
        Ticks { done: 0, total }
    }

    fn tick(&mut self, progress: &mut Option<Box<ProgressFn>>, cancel: &CancelToken) -> Result<()> {
        self.done += 1;
        if let Some(p) = progress.as_mut() {
            if !p(self.done.min(self.total), self.total) {
                cancel.cancel();
            }
        }
        if cancel.is_cancelled() {
            return Err(Error::new(
                ErrorCode::Cancelled,
                "the training round was cancelled",
            ));
        }
        Ok(())
    }

    fn finish(&mut self, progress: &mut Option<Box<ProgressFn>>) {
        if let Some(p) = progress.as_mut() {
            p(self.total, self.total);
        }
    }
}

/// The models of a sampling round, as the sampler sees them.
struct RoundModels<'a> {
    sampler: &'a mut Graph,
    policy: &'a mut Binding,
    cond: &'a NamedTensors,
    prompt: &'a str,
    schedule: &'a Schedule,
    guidance: f32,
    vae: &'a mut Graph,
    /// The VAE's scaling factor and shift.
    scaling: (f64, f64),
    preference: &'a mut PreferenceModel,
    cancel: &'a CancelToken,
    progress: &'a mut Option<Box<ProgressFn>>,
    ticks: &'a mut Ticks,
    metrics: &'a mut RoundMetrics,
}

impl Denoiser for RoundModels<'_> {
    fn eps(&mut self, x: &ArrayD<f32>, i: usize) -> Result<ArrayD<f32>> {
        let t0 = Instant::now();
        let t = self.schedule.timesteps[i];
        let opts = self.cancel.run_options();
        let [u, c] = guided_pair(self.sampler, self.policy, self.cond, x, t, opts)?;
        self.metrics.time_sampling += t0.elapsed().as_secs_f64();
        Ok(guide(&u.view(), &c.view(), self.guidance))
    }

    fn score(&mut self, x0: &ArrayD<f32>, timestep: i64) -> Result<Vec<f32>> {
        let t0 = Instant::now();
        let (factor, shift) = self.scaling;
        let latents = x0.mapv(|v| (f64::from(v) / factor + shift) as f32);
        let images = vae_decode(self.vae, latents, self.cancel.run_options())?;
        let n = images.shape()[0];
        let scores = self
            .preference
            .score(&images, &vec![timestep; n], &vec![self.prompt; n])?;
        self.metrics.time_scoring += t0.elapsed().as_secs_f64();
        Ok(scores)
    }

    fn tick(&mut self) -> Result<()> {
        self.ticks.tick(self.progress, self.cancel)
    }
}
