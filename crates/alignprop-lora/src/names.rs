//! Which names a UNet's LoRA modules go by: diffusers' (`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`)
//! or the original (sgm / LDM) UNet's (`input_blocks.4.1.transformer_blocks.0.attn1.to_q`).
//!
//! kohya's sd-scripts train SD 1.x / 2.x on the diffusers UNet and SDXL on the original one, so their SDXL LoRAs
//! (and A1111's / ComfyUI's) spell the original names: `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`,
//! `lora_unet_middle_block_1_...`, `lora_unet_output_blocks_3_1_...`. The original layout numbers its blocks
//! consecutively (resnet, attention, sampler), so translating needs the UNet's layout ([`UnetNames`]); the block
//! numbering itself is [`alignprop_io::single_file::unet_key`]'s (the same that reads single-file checkpoints).

use std::path::Path;

use alignprop_diffusion::unet::{DownBlock, UNet2DConditionConfig, UNet2DConditionModel, UpBlock};
use alignprop_io::SafetensorsSource;
use alignprop_io::TensorSource;
use alignprop_io::pipeline_files::component_weights;
use alignprop_io::single_file::{SingleFileUnetLayout, UNET_PREFIX, unet_key};
use burn::tensor::backend::Backend;

use crate::format::{LoraError, Result};

/// The top-level blocks of the original (sgm / LDM) UNet.
pub const SGM_BLOCKS: [&str; 3] = ["input_blocks", "middle_block", "output_blocks"];

/// Whether a module path is in the original UNet's naming (`input_blocks.4.1...`, `middle_block.1...`,
/// `output_blocks.3.1...`).
pub fn is_sgm_name(module: &str) -> bool {
    SGM_BLOCKS.iter().any(|b| {
        module
            .strip_prefix(b)
            .is_some_and(|r| r.is_empty() || r.starts_with('.'))
    })
}

/// What naming a UNet's LoRA modules needs to know about the UNet: from the model ([`Self::of`]) or from its
/// diffusers folder ([`Self::from_folder`], which reads `config.json` and the weight files' headers only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnetNames {
    /// The diffusers paths of the UNet's transformer stacks (`down_blocks.1.attentions.0`, `mid_block.attentions.0`,
    /// `up_blocks.0.attentions.2`, ...), in the model's order.
    pub transformers: Vec<String>,
    /// The block numbering of the original UNet; `None` when the levels have different numbers of resnets, which
    /// the original numbering (and kohya's) does not describe.
    pub layout: Option<SingleFileUnetLayout>,
    /// Whether kohya's tools name this UNet's modules the original way: SDXL (`addition_embed_type = "text_time"`).
    /// Their SD 1.x / 2.x files use the diffusers names.
    pub sgm_kohya: bool,
}

/// The transformer-stack prefix of a diffusers UNet path: `down_blocks.1.attentions.0` of
/// `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight`; `None` outside transformers.
pub fn transformer_of(path: &str) -> Option<&str> {
    let is_block = |s: &str| {
        let mut parts = s.split('.');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("mid_block"), None, _) => true,
            (Some("down_blocks" | "up_blocks"), Some(i), None) => i.parse::<usize>().is_ok(),
            _ => false,
        }
    };
    let at = path.find(".attentions.")?;
    let (block, rest) = path.split_at(at);
    let rest = &rest[".attentions.".len()..];
    let idx_len = rest.find('.').unwrap_or(rest.len());
    (is_block(block) && rest[..idx_len].parse::<usize>().is_ok())
        .then(|| &path[..at + ".attentions.".len() + idx_len])
}

impl UnetNames {
    /// The names of a built UNet (its attentions, its resnets per level, whether it is SDXL).
    pub fn of<B: Backend>(unet: &UNet2DConditionModel<B>) -> Self {
        let mut transformers: Vec<String> = Vec::new();
        for (name, _) in unet.attentions() {
            let t = transformer_of(&name).expect("attention names are in transformers");
            if transformers.last().map(String::as_str) != Some(t) {
                transformers.push(t.to_string());
            }
        }
        let down: Vec<usize> = unet
            .down_blocks
            .iter()
            .map(|b| match b {
                DownBlock::Plain(b) => b.resnets.len(),
                DownBlock::CrossAttn(b) => b.resnets.len(),
            })
            .collect();
        let up: Vec<(usize, bool)> = unet
            .up_blocks
            .iter()
            .map(|b| (b.num_resnets(), matches!(b, UpBlock::CrossAttn(_))))
            .collect();
        let layout = uniform(&down, &up.iter().map(|u| u.0).collect::<Vec<_>>()).map(|lpb| {
            SingleFileUnetLayout {
                layers_per_block: lpb,
                up_block_has_attention: up.iter().map(|u| u.1).collect(),
            }
        });
        Self {
            transformers,
            layout,
            sgm_kohya: unet.needs_text_time(),
        }
    }

    /// The names of the UNet of a diffusers folder: a model folder (with `unet/`) or the UNet's own folder (with
    /// `config.json` and its weights). Reads the config and the weight files' tensor names, no weights.
    pub fn from_folder(folder: impl AsRef<Path>) -> Result<Self> {
        let folder = folder.as_ref();
        let dir = if folder.join("unet").join("config.json").is_file() {
            folder.join("unet")
        } else {
            folder.to_path_buf()
        };
        let cfg_path = dir.join("config.json");
        let err = |msg: String| LoraError::File {
            path: cfg_path.clone(),
            msg,
        };
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| {
            err(format!(
                "cannot read the UNet config ({e}); expected a diffusers model folder or its unet/ folder"
            ))
        })?;
        let cfg: UNet2DConditionConfig =
            serde_json::from_str(&text).map_err(|e| err(format!("not a UNet config: {e}")))?;
        let keys = SafetensorsSource::open(&component_weights(&dir)?)?.keys();
        Self::from_config_and_keys(&cfg, &keys).map_err(err)
    }

    /// The names of a UNet given its config and the diffusers names of its tensors.
    pub fn from_config_and_keys(
        cfg: &UNet2DConditionConfig,
        keys: &[String],
    ) -> std::result::Result<Self, String> {
        let mut transformers: Vec<String> = Vec::new();
        for k in keys {
            if let Some(t) = transformer_of(k)
                && !transformers.iter().any(|x| x == t)
            {
                transformers.push(t.to_string());
            }
        }
        let n = cfg.down_block_types.len();
        let lpb = cfg.layers_per_block.per_block(n, "layers_per_block")?;
        let up: Vec<usize> = lpb.iter().rev().map(|l| l + 1).collect();
        let layout = uniform(&lpb, &up)
            .map(|l| SingleFileUnetLayout::from_block_types(l, &cfg.up_block_types));
        Ok(Self {
            transformers,
            layout,
            sgm_kohya: cfg.addition_embed_type.as_deref() == Some("text_time"),
        })
    }

    fn layout(&self) -> Result<&SingleFileUnetLayout> {
        self.layout.as_ref().ok_or_else(|| {
            LoraError::Invalid(
                "this UNet's levels have different numbers of resnets (layers_per_block per block): the original \
                 (sgm) UNet names do not describe it"
                    .into(),
            )
        })
    }

    /// The diffusers path of a module named the original way (`input_blocks.4.1.transformer_blocks.0.attn1.to_q` ->
    /// `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`); an error if it is in none of this UNet's
    /// transformers.
    pub fn to_diffusers(&self, sgm: &str) -> Result<String> {
        let layout = self.layout()?;
        for t in &self.transformers {
            let key = unet_key(layout, t);
            let ldm = key.strip_prefix(UNET_PREFIX).unwrap_or(&key);
            if let Some(rest) = sgm.strip_prefix(ldm).and_then(|r| r.strip_prefix('.')) {
                return Ok(format!("{t}.{rest}"));
            }
        }
        Err(LoraError::Invalid(format!(
            "LoRA module '{sgm}' (original UNet naming) is in none of this UNet's {} transformers ({}; a LoRA for \
             another model?)",
            self.transformers.len(),
            self.transformers
                .iter()
                .take(3)
                .map(|t| {
                    let k = unet_key(layout, t);
                    format!("{} = {t}", k.strip_prefix(UNET_PREFIX).unwrap_or(&k))
                })
                .collect::<Vec<_>>()
                .join(", ")
                + if self.transformers.len() > 3 {
                    ", ..."
                } else {
                    ""
                }
        )))
    }

    /// The original (sgm) path of a diffusers module of one of this UNet's transformers
    /// (`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` -> `input_blocks.4.1.transformer_blocks.0.attn1.to_q`);
    /// a path already in the original naming is returned as is.
    pub fn to_sgm(&self, module: &str) -> Result<String> {
        if is_sgm_name(module) {
            return Ok(module.to_string());
        }
        let layout = self.layout()?;
        match transformer_of(module) {
            Some(t) if self.transformers.iter().any(|x| x == t) => {
                let key = unet_key(layout, module);
                Ok(key.strip_prefix(UNET_PREFIX).unwrap_or(&key).to_string())
            }
            _ => Err(LoraError::Invalid(format!(
                "LoRA module '{module}' is in none of this UNet's {} transformers ({}...; a LoRA for another model?)",
                self.transformers.len(),
                self.transformers.first().map_or("none", String::as_str)
            ))),
        }
    }
}

/// `layers_per_block` when every down level has `down[i]` resnets equal to it and every up level one more.
fn uniform(down: &[usize], up: &[usize]) -> Option<usize> {
    let l = *down.first()?;
    (down.iter().all(|&d| d == l) && up.iter().all(|&u| u == l + 1)).then_some(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transformer_prefixes() {
        assert_eq!(
            transformer_of("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
            Some("down_blocks.1.attentions.0")
        );
        assert_eq!(
            transformer_of("mid_block.attentions.0.proj_in.weight"),
            Some("mid_block.attentions.0")
        );
        assert_eq!(
            transformer_of("up_blocks.2.attentions.12"),
            Some("up_blocks.2.attentions.12")
        );
        assert_eq!(transformer_of("down_blocks.1.resnets.0.conv1.weight"), None);
        assert_eq!(transformer_of("x.down_blocks.1.attentions.0.y"), None);
        assert_eq!(transformer_of("down_blocks.attentions.0.y"), None);
        assert!(is_sgm_name("input_blocks.4.1.proj_in"));
        assert!(is_sgm_name(
            "middle_block.1.transformer_blocks.0.attn1.to_q"
        ));
        assert!(!is_sgm_name("input_blocks_4"));
        assert!(!is_sgm_name("down_blocks.1.attentions.0"));
    }

    /// SDXL's real layout: 2 resnets per level, level 0 without attention, 2 (tiny) / 10 (real) transformer blocks
    /// at level 2; the names are those of kohya's sd-scripts and diffusers' `_maybe_map_sgm_blocks_to_diffusers`.
    #[test]
    fn sdxl_names_both_ways() {
        let mut transformers = vec![];
        for i in 1..3 {
            for j in 0..2 {
                transformers.push(format!("down_blocks.{i}.attentions.{j}"));
            }
        }
        transformers.push("mid_block.attentions.0".into());
        for i in 0..2 {
            for j in 0..3 {
                transformers.push(format!("up_blocks.{i}.attentions.{j}"));
            }
        }
        let names = UnetNames {
            transformers,
            layout: Some(SingleFileUnetLayout::from_block_types(
                2,
                &["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            )),
            sgm_kohya: true,
        };
        for (d, s) in [
            (
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
            ),
            (
                "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_out.0",
                "input_blocks.5.1.transformer_blocks.0.attn2.to_out.0",
            ),
            (
                "down_blocks.2.attentions.1.transformer_blocks.9.attn1.to_k",
                "input_blocks.8.1.transformer_blocks.9.attn1.to_k",
            ),
            (
                "mid_block.attentions.0.transformer_blocks.1.attn2.to_v",
                "middle_block.1.transformer_blocks.1.attn2.to_v",
            ),
            (
                "up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_q",
                "output_blocks.2.1.transformer_blocks.0.attn1.to_q",
            ),
            (
                "up_blocks.1.attentions.0.proj_in",
                "output_blocks.3.1.proj_in",
            ),
            (
                "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_q",
                "output_blocks.5.1.transformer_blocks.0.attn1.to_q",
            ),
        ] {
            assert_eq!(names.to_sgm(d).unwrap(), s);
            assert_eq!(names.to_sgm(s).unwrap(), s);
            assert_eq!(names.to_diffusers(s).unwrap(), d);
        }
        // Not in this UNet: level 0 has no attention; a 3rd down attention does not exist.
        for bad in [
            "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
            "input_blocks.6.1.proj_in",
        ] {
            let e = names.to_diffusers(bad).unwrap_err().to_string();
            assert!(
                e.contains(bad) && e.contains("input_blocks.4.1 = down_blocks.1.attentions.0"),
                "{e}"
            );
        }
        assert!(
            names
                .to_sgm("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
                .is_err()
        );
    }
}
