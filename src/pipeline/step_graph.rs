//! The per-step math between two UNet calls as a small ONNX graph: guidance,
//! the optional guidance rescale, the scheduler update and the next UNet input.
//!
//! Running it as a session beside the UNet keeps the latents in ONNX Runtime
//! values for the whole loop (in GPU memory under CUDA): a step's only host
//! traffic is the timestep, ten scheduler coefficients and, for stochastic
//! samplers, the step's noise. The scheduler supplies the coefficients of a
//! [`LinearStep`]; the same coefficients drive the host loop, and the pipeline
//! goldens check this graph against diffusers.
//!
//! Inputs (`B` images, `R` UNet rows: `2B` with guidance, else `B`):
//!
//! | name        | type          | shape          |
//! |-------------|---------------|----------------|
//! | `model_out` | UNet's dtype  | `[R, C, H, W]` |
//! | `sample`    | f32           | `[B, C, H, W]` |
//! | `history`   | f32           | `[B, C, H, W]` (the previous step's x0) |
//! | `noise`     | f32           | `[B, C, H, W]` |
//! | `coef`      | f32           | `[10]`: [`COEFS`] |
//! | `guidance`  | f32           | `[3]`: scale, rescale, `1 / (C*H*W - 1)` (with guidance only) |
//!
//! Outputs: `prev` (f32, `[B, C, H, W]`), `x0` (f32, same) and `unet_in`
//! (UNet's dtype, `[R, C, H, W]`: `prev` times the next step's input scale,
//! duplicated for guidance).

use prost::Message;

use crate::model::onnx_proto::{
    data_type, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeDimension, TensorShapeProto, TypeProto, TypeProtoTensor, ValueInfoProto,
};
use crate::runtime::session::DType;
use crate::scheduler::LinearStep;

/// The order of the `coef` input.
pub const COEFS: [&str; 10] = [
    "x0_sample",
    "x0_model",
    "clip_min",
    "clip_max",
    "prev_sample",
    "prev_model",
    "prev_x0",
    "prev_history",
    "prev_noise",
    "next_input_scale",
];

/// What varies between step graphs; one session per value is cached by the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StepGraphKind {
    /// Classifier-free guidance (the UNet output holds `[uncond; text]` rows).
    pub cfg: bool,
    /// diffusers' `rescale_noise_cfg` (only with guidance).
    pub rescale: bool,
    /// The UNet's `sample` / `out_sample` dtype.
    pub unet_dtype: DType,
}

/// The `coef` input for `step`, whose UNet input at the next step is scaled
/// by `next_input_scale`.
pub fn coefficients(step: &LinearStep, next_input_scale: f64) -> Vec<f32> {
    let (lo, hi) = match step.clip {
        Some(r) => (-r, r),
        None => (f64::NEG_INFINITY, f64::INFINITY),
    };
    [
        step.x0_sample,
        step.x0_model,
        lo,
        hi,
        step.prev_sample,
        step.prev_model,
        step.prev_x0,
        step.prev_history,
        step.prev_noise,
        next_input_scale,
    ]
    .map(|v| v as f32)
    .to_vec()
}

/// The `guidance` input: scale, rescale factor and the unbiased-variance
/// divisor for one image of `per_image` latent values.
pub fn guidance_input(scale: f64, rescale: f64, per_image: usize) -> Vec<f32> {
    vec![
        scale as f32,
        rescale as f32,
        1.0 / (per_image.saturating_sub(1).max(1)) as f32,
    ]
}

/// Collects nodes with generated intermediate names.
struct Builder {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    next: usize,
}

impl Builder {
    fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        self.next += 1;
        let out = format!("{}_{}", op.to_ascii_lowercase(), self.next);
        self.named(op, inputs, &[&out], attrs);
        out
    }

    fn named(&mut self, op: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<AttributeProto>) {
        self.nodes.push(NodeProto {
            op_type: op.into(),
            name: format!("{op}_{}", self.nodes.len()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            attribute: attrs,
            ..Default::default()
        });
    }

    fn bin(&mut self, op: &str, a: &str, b: &str) -> String {
        self.node(op, &[a, b], vec![])
    }

    /// Splits `x` along axis 0 into `n` equal parts.
    fn split(&mut self, x: &str, n: usize) -> Vec<String> {
        self.next += 1;
        let outs: Vec<String> = (0..n).map(|i| format!("split_{}_{i}", self.next)).collect();
        let refs: Vec<&str> = outs.iter().map(String::as_str).collect();
        self.named("Split", &[x], &refs, vec![attr_int("axis", 0)]);
        outs
    }

    fn constant(&mut self, name: &str, v: f32) -> String {
        self.initializers.push(TensorProto {
            name: name.into(),
            data_type: data_type::FLOAT,
            float_data: vec![v],
            dims: vec![1],
            ..Default::default()
        });
        name.into()
    }

    /// Unbiased standard deviation of each image of `x`, shape `[B, 1, 1, 1]`
    /// (`inv_nm1` = `1 / (n - 1)`), as torch's `std(dim=[1, 2, 3])`.
    fn std(&mut self, x: &str, inv_nm1: &str) -> String {
        let axes = || vec![attr_ints("axes", &[1, 2, 3]), attr_int("keepdims", 1)];
        let mean = self.node("ReduceMean", &[x], axes());
        let dev = self.bin("Sub", x, &mean);
        let ss = self.node("ReduceSumSquare", &[&dev], axes());
        let var = self.bin("Mul", &ss, inv_nm1);
        self.node("Sqrt", &[&var], vec![])
    }

    fn cast(&mut self, x: &str, to: i32) -> String {
        self.node("Cast", &[x], vec![attr_int("to", i64::from(to))])
    }
}

fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: 2,
        i: Some(v),
        ..Default::default()
    }
}

fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: 7,
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn value_info(name: &str, elem: i32, dims: &[&str]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| match d.parse::<i64>() {
            Ok(v) => TensorShapeDimension {
                dim_value: Some(v),
                ..Default::default()
            },
            Err(_) => TensorShapeDimension {
                dim_param: Some(d.to_string()),
                ..Default::default()
            },
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type: elem,
                shape: Some(TensorShapeProto { dim }),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The serialized step graph for `kind`.
pub fn build(kind: StepGraphKind) -> Vec<u8> {
    let mut b = Builder {
        nodes: Vec::new(),
        initializers: Vec::new(),
        next: 0,
    };
    let unet_elem = match kind.unet_dtype {
        DType::F16 => data_type::FLOAT16,
        _ => data_type::FLOAT,
    };
    let f32_elem = data_type::FLOAT;
    let latent = ["images", "channels", "height", "width"];
    let rows = ["rows", "channels", "height", "width"];

    // The guided model output, in f32.
    let raw = if kind.unet_dtype == DType::F32 {
        "model_out".to_string()
    } else {
        b.cast("model_out", f32_elem)
    };
    let model = if kind.cfg {
        let halves = b.split(&raw, 2);
        let (uncond, text) = (&halves[0], &halves[1]);
        let g = b.split("guidance", 3);
        let diff = b.bin("Sub", text, uncond);
        let scaled = b.bin("Mul", &diff, &g[0]);
        let guided = b.bin("Add", uncond, &scaled);
        if kind.rescale {
            // phi * guided * std(text) / std(guided) + (1 - phi) * guided
            let st = b.std(text, &g[2]);
            let sg = b.std(&guided, &g[2]);
            let factor = b.bin("Div", &st, &sg);
            let rescaled = b.bin("Mul", &guided, &factor);
            let a = b.bin("Mul", &g[1], &rescaled);
            let one = b.constant("one", 1.0);
            let keep = b.bin("Sub", &one, &g[1]);
            let c = b.bin("Mul", &keep, &guided);
            b.bin("Add", &a, &c)
        } else {
            guided
        }
    } else {
        raw
    };

    let c = b.split("coef", COEFS.len());
    // x0 = clip(x0_sample * sample + x0_model * model)
    let xs = b.bin("Mul", "sample", &c[0]);
    let xm = b.bin("Mul", &model, &c[1]);
    let x0 = b.bin("Add", &xs, &xm);
    let lo = b.bin("Max", &x0, &c[2]);
    b.named("Min", &[&lo, &c[3]], &["x0"], vec![]);
    // prev = sum of the five terms
    let terms = [
        ("sample", &c[4]),
        (model.as_str(), &c[5]),
        ("x0", &c[6]),
        ("history", &c[7]),
        ("noise", &c[8]),
    ];
    let mut acc: Option<String> = None;
    for (x, k) in terms {
        let t = b.bin("Mul", x, k);
        acc = Some(match acc {
            None => t,
            Some(a) => b.bin("Add", &a, &t),
        });
    }
    b.named("Identity", &[&acc.expect("five terms")], &["prev"], vec![]);
    // The next UNet input.
    let next = b.bin("Mul", "prev", &c[9]);
    let next = if kind.unet_dtype == DType::F32 {
        next
    } else {
        b.cast(&next, unet_elem)
    };
    let concat_inputs: Vec<&str> = if kind.cfg {
        vec![&next, &next]
    } else {
        vec![&next]
    };
    b.named(
        "Concat",
        &concat_inputs,
        &["unet_in"],
        vec![attr_int("axis", 0)],
    );

    let mut inputs = vec![
        value_info("model_out", unet_elem, &rows),
        value_info("sample", f32_elem, &latent),
        value_info("history", f32_elem, &latent),
        value_info("noise", f32_elem, &latent),
        value_info("coef", f32_elem, &["10"]),
    ];
    if kind.cfg {
        inputs.push(value_info("guidance", f32_elem, &["3"]));
    }
    let graph = GraphProto {
        name: "spo_step".into(),
        node: b.nodes,
        initializer: b.initializers,
        input: inputs,
        output: vec![
            value_info("prev", f32_elem, &latent),
            value_info("x0", f32_elem, &latent),
            value_info("unet_in", unet_elem, &rows),
        ],
        ..Default::default()
    };
    ModelProto {
        ir_version: 8,
        producer_name: "spo-runtime".into(),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}
