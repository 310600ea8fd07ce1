//! The one alias table from LoRA key stems to `(component, diffusers module path)`.
//!
//! Keys are never reverse-parsed: every module path the model actually has is
//! written out in every spelling a LoRA file may use (dotted diffusers path, PEFT
//! and diffusers prefixes, kohya's underscore-flattened form, and the kohya SGM
//! form derived from the UNet block layout), and stems are looked up in that
//! table. Flattened names that two modules share are reported as ambiguous.

use std::collections::HashMap;
use std::fmt;

/// Which model a LoRA module belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    Unet,
    TextEncoder,
    TextEncoder2,
}

impl Component {
    /// The diffusers folder name (`unet`, `text_encoder`, `text_encoder_2`).
    pub fn folder(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
        }
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.folder())
    }
}

/// The UNet facts the SGM (`input_blocks` / `output_blocks`) numbering depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnetLayout {
    /// Resnets per down level (up levels have one more).
    pub layers_per_block: usize,
    /// Whether down level `i` ends with a downsampler.
    pub down_has_downsampler: Vec<bool>,
    /// Whether up level `i` has attentions (moves its upsampler to slot 2).
    pub up_has_attn: Vec<bool>,
}

impl UnetLayout {
    /// From a diffusers `unet/config.json`.
    pub fn from_config(v: &serde_json::Value) -> Option<UnetLayout> {
        let lpb = v.get("layers_per_block")?.as_u64()? as usize;
        let down = v.get("down_block_types")?.as_array()?;
        let up = v.get("up_block_types")?.as_array()?;
        let n = down.len();
        Some(UnetLayout {
            layers_per_block: lpb,
            down_has_downsampler: (0..n).map(|i| i + 1 < n).collect(),
            up_has_attn: up
                .iter()
                .map(|t| t.as_str().is_some_and(|s| s.contains("CrossAttn")))
                .collect(),
        })
    }

    /// Inferred from the module paths the graph has (`down_blocks.i.resnets.j...`).
    pub fn infer<'a>(paths: impl IntoIterator<Item = &'a str>) -> Option<UnetLayout> {
        let mut lpb = 0usize;
        let mut downs: Vec<bool> = Vec::new();
        let mut ups: Vec<bool> = Vec::new();
        let idx = |s: Option<&str>| s.and_then(|x| x.parse::<usize>().ok());
        for p in paths {
            let seg: Vec<&str> = p.split('.').collect();
            match seg.first().copied() {
                Some("down_blocks") => {
                    let Some(i) = idx(seg.get(1).copied()) else {
                        continue;
                    };
                    if i >= 64 {
                        continue;
                    }
                    if downs.len() <= i {
                        downs.resize(i + 1, false);
                    }
                    match seg.get(2).copied() {
                        Some("resnets") => {
                            if let Some(j) = idx(seg.get(3).copied()) {
                                lpb = lpb.max(j + 1);
                            }
                        }
                        Some("downsamplers") => downs[i] = true,
                        _ => {}
                    }
                }
                Some("up_blocks") => {
                    let Some(i) = idx(seg.get(1).copied()) else {
                        continue;
                    };
                    if i >= 64 {
                        continue;
                    }
                    if ups.len() <= i {
                        ups.resize(i + 1, false);
                    }
                    if seg.get(2) == Some(&"attentions") {
                        ups[i] = true;
                    }
                }
                _ => {}
            }
        }
        (lpb > 0 && !downs.is_empty()).then_some(UnetLayout {
            layers_per_block: lpb,
            down_has_downsampler: downs,
            up_has_attn: ups,
        })
    }

    /// The SGM module path of a diffusers UNet module path
    /// (`down_blocks.1.attentions.0.proj_in` -> `input_blocks.4.1.proj_in`).
    pub fn sgm_path(&self, path: &str) -> Option<String> {
        let fixed = match path {
            "conv_in" => Some("input_blocks.0.0"),
            "time_embedding.linear_1" => Some("time_embed.0"),
            "time_embedding.linear_2" => Some("time_embed.2"),
            "add_embedding.linear_1" => Some("label_emb.0.0"),
            "add_embedding.linear_2" => Some("label_emb.0.2"),
            "conv_norm_out" => Some("out.0"),
            "conv_out" => Some("out.2"),
            _ => None,
        };
        if let Some(f) = fixed {
            return Some(f.to_string());
        }
        let seg: Vec<&str> = path.split('.').collect();
        let num = |k: usize| seg.get(k).and_then(|s| s.parse::<usize>().ok());
        let l = self.layers_per_block;
        let tail = |from: usize| seg.get(from..).map(|s| s.join("."));
        match *seg.first()? {
            "down_blocks" => {
                let i = num(1)?;
                if i >= self.down_has_downsampler.len() {
                    return None;
                }
                let start = 1
                    + (0..i)
                        .map(|k| l + usize::from(self.down_has_downsampler[k]))
                        .sum::<usize>();
                match *seg.get(2)? {
                    "downsamplers" if seg.get(3..) == Some(&["0", "conv"][..]) => {
                        Some(format!("input_blocks.{}.0.op", start + l))
                    }
                    "resnets" => {
                        let j = num(3).filter(|&j| j < l)?;
                        Some(format!(
                            "input_blocks.{}.0.{}",
                            start + j,
                            resnet_part(&tail(4)?)
                        ))
                    }
                    "attentions" => {
                        let j = num(3).filter(|&j| j < l)?;
                        Some(format!("input_blocks.{}.1.{}", start + j, tail(4)?))
                    }
                    _ => None,
                }
            }
            "mid_block" => match (*seg.get(1)?, num(2)?) {
                ("resnets", 0) => Some(format!("middle_block.0.{}", resnet_part(&tail(3)?))),
                ("resnets", 1) => Some(format!("middle_block.2.{}", resnet_part(&tail(3)?))),
                ("attentions", 0) => Some(format!("middle_block.1.{}", tail(3)?)),
                _ => None,
            },
            "up_blocks" => {
                let i = num(1)?;
                let attn = *self.up_has_attn.get(i)?;
                let start = i * (l + 1);
                match *seg.get(2)? {
                    "upsamplers" if seg.get(3..) == Some(&["0", "conv"][..]) => Some(format!(
                        "output_blocks.{}.{}.conv",
                        start + l,
                        1 + usize::from(attn)
                    )),
                    "resnets" => {
                        let j = num(3).filter(|&j| j <= l)?;
                        Some(format!(
                            "output_blocks.{}.0.{}",
                            start + j,
                            resnet_part(&tail(4)?)
                        ))
                    }
                    "attentions" => {
                        let j = num(3).filter(|&j| j <= l)?;
                        Some(format!("output_blocks.{}.1.{}", start + j, tail(4)?))
                    }
                    _ => None,
                }
            }
            _ => None,
        }
    }
}

/// Resnet child names: diffusers -> SGM.
fn resnet_part(rest: &str) -> String {
    match rest {
        "conv1" => "in_layers.2",
        "conv2" => "out_layers.3",
        "time_emb_proj" => "emb_layers.1",
        "conv_shortcut" => "skip_connection",
        "norm1" => "in_layers.0",
        "norm2" => "out_layers.0",
        other => other,
    }
    .to_string()
}

/// kohya's flattening: `.` -> `_`.
pub fn flatten(path: &str) -> String {
    path.replace('.', "_")
}

#[derive(Debug, Clone)]
enum Entry {
    One(Component, String),
    Ambiguous(Vec<(Component, String)>),
}

/// Alias -> target table over every component of a model.
#[derive(Debug, Clone, Default)]
pub struct AliasTable {
    map: HashMap<String, Entry>,
    components: Vec<Component>,
}

impl AliasTable {
    pub fn new() -> AliasTable {
        AliasTable::default()
    }

    fn add(&mut self, alias: String, comp: Component, path: &str) {
        match self.map.get_mut(&alias) {
            None => {
                self.map.insert(alias, Entry::One(comp, path.to_string()));
            }
            Some(Entry::One(c, p)) if *c == comp && p == path => {}
            Some(e) => {
                let mut all = match e {
                    Entry::One(c, p) => vec![(*c, p.clone())],
                    Entry::Ambiguous(v) => v.clone(),
                };
                if !all.iter().any(|(c, p)| *c == comp && p == path) {
                    all.push((comp, path.to_string()));
                }
                *e = Entry::Ambiguous(all);
            }
        }
    }

    /// Adds every spelling of every module path of `comp`. For the UNet, `layout`
    /// enables the SGM spellings (inferred from `paths` when `None`).
    pub fn add_component<'a, I>(&mut self, comp: Component, paths: I, layout: Option<&UnetLayout>)
    where
        I: IntoIterator<Item = &'a str>,
        I::IntoIter: Clone,
    {
        let paths = paths.into_iter();
        self.components.push(comp);
        let inferred;
        let layout = match (comp, layout) {
            (Component::Unet, Some(l)) => Some(l),
            (Component::Unet, None) => {
                inferred = UnetLayout::infer(paths.clone());
                inferred.as_ref()
            }
            _ => None,
        };
        for p in paths {
            match comp {
                Component::Unet => {
                    self.add(p.to_string(), comp, p);
                    self.add(format!("unet.{p}"), comp, p);
                    self.add(format!("lora_unet_{}", flatten(p)), comp, p);
                    if let Some(s) = layout.and_then(|l| l.sgm_path(p)) {
                        self.add(format!("lora_unet_{}", flatten(&s)), comp, p);
                        self.add(format!("diffusion_model.{s}"), comp, p);
                        self.add(format!("model.diffusion_model.{s}"), comp, p);
                    }
                }
                Component::TextEncoder | Component::TextEncoder2 => {
                    let (prefix, kohya): (&str, &[&str]) = if comp == Component::TextEncoder {
                        ("text_encoder", &["lora_te_", "lora_te1_"])
                    } else {
                        ("text_encoder_2", &["lora_te2_"])
                    };
                    // CLIP paths with and without the `text_model.` root (transformers
                    // versions differ; kohya names always carry it).
                    let other = match p.strip_prefix("text_model.") {
                        Some(short) => short.to_string(),
                        None => format!("text_model.{p}"),
                    };
                    for v in [p, other.as_str()] {
                        self.add(v.to_string(), comp, p);
                        self.add(format!("{prefix}.{v}"), comp, p);
                        for k in kohya {
                            self.add(format!("{k}{}", flatten(v)), comp, p);
                        }
                    }
                }
            }
        }
    }

    /// The target of a LoRA key stem, or why there is none.
    pub fn resolve(&self, stem: &str) -> std::result::Result<(Component, &str), String> {
        let mut candidates = vec![stem];
        if let Some(s) = stem.strip_prefix("base_model.model.") {
            candidates.push(s);
        }
        for c in candidates {
            match self.map.get(c) {
                Some(Entry::One(comp, path)) => return Ok((*comp, path.as_str())),
                Some(Entry::Ambiguous(all)) => {
                    let list: Vec<String> = all.iter().map(|(c, p)| format!("{c}:{p}")).collect();
                    return Err(format!("ambiguous: matches {}", list.join(", ")));
                }
                None => {}
            }
        }
        let comps: Vec<&str> = self.components.iter().map(|c| c.folder()).collect();
        Err(format!(
            "no module of the model ({}) has this name in any known spelling",
            comps.join(", ")
        ))
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
