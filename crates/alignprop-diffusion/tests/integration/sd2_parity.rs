//! The SD 2.1 (768-v) topology against transformers / diffusers, on the tiny SD2 fixture (`tests/fixtures/tiny-sd2`,
//! its README (a)-(c), (g)): the tokenizer padding with `!` (also inside a prompt, as transformers), the text encoder
//! with exact GELU, the UNet with linear `proj_in`/`proj_out`, per-level head counts and upcast attention, the VAE,
//! and the three networks read from the original single file (OpenCLIP text tower with fused q/k/v and one block
//! more than SD2 uses).

use crate::common;

use std::path::{Path, PathBuf};

use alignprop_diffusion::clip::{CLIPActivation, CLIPTextConfig, CLIPTextModel};
use alignprop_diffusion::tokenizer::CLIPTokenizer;
use alignprop_diffusion::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use alignprop_diffusion::vae::{AutoencoderKL, AutoencoderKLConfig};
use alignprop_io::pipeline_files::read_json;
use alignprop_io::single_file::{SdVersion, SingleFileCheckpoint};
use alignprop_io::weights::{SafetensorsSource, VarBuilder, WeightError};
use alignprop_testing::{refs_sd2, tiny_sd2};
use burn::tensor::{DType, Int, Tensor};
use common::{B, assert_close, assert_trace, ref_int, ref_tensor, rel_err};

/// f32 against the float32 references (as the SD1.5 parity tests).
const TOL_F32: f64 = 1e-4;
/// f64 against the `_f64` references (computed by the `.double()` models).
const TOL_F64: f64 = 1e-8;

/// The text encoder's reference prompts (README (a)); the third has SD2's pad token `!` inside.
const PROMPTS: [&str; 3] = ["", "a photo of a cat", "a red panda eating bamboo!"];

fn ids_of(t: Tensor<B, 2, Int>) -> Vec<i64> {
    t.into_data().convert::<i64>().to_vec::<i64>().unwrap()
}

fn tokenizer_dir() -> PathBuf {
    tiny_sd2().join("tokenizer")
}

// ------------------------------------------------------------------------------------------------ tokenizer

/// transformers' ids (`refs/text_encoder.safetensors` `input_ids`): padding with `!` = 0, and the `!` ending the
/// third prompt is the pad token too (transformers' special token), where OpenCLIP's own tokenizer, i.e. CLIP's BPE
/// without that special token, gives `!</w>` = 256 (`input_ids_open_clip`).
#[test]
fn tokenizer_pads_with_exclamation_mark_as_transformers() {
    let r = refs_sd2("text_encoder.safetensors");
    let tok = CLIPTokenizer::from_folder(tokenizer_dir()).unwrap();
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id()),
        (49406, 49407, 0)
    );
    let ours: Tensor<B, 2, Int> = tok.input_ids(&PROMPTS, &Default::default()).unwrap();
    let expected = ids_of(ref_int(&r, "input_ids"));
    assert_eq!(ids_of(ours), expected, "input_ids of {PROMPTS:?}");
    assert_eq!(
        &expected[2 * 77..2 * 77 + 9],
        &[49406, 320, 736, 12952, 4371, 16748, 0, 49407, 0]
    );

    // CLIP's BPE alone (the vocab + merges without the folder's special pad token) is OpenCLIP's tokenizer.
    let plain = CLIPTokenizer::from_vocab_merges(
        tokenizer_dir().join("vocab.json"),
        tokenizer_dir().join("merges.txt"),
    )
    .unwrap();
    let open_clip = ids_of(ref_int(&r, "input_ids_open_clip"));
    for (i, prompt) in PROMPTS.iter().enumerate() {
        let mut ids: Vec<i64> = plain
            .tokenize(prompt)
            .unwrap()
            .into_iter()
            .map(i64::from)
            .collect();
        ids.resize(77, 0);
        assert_eq!(ids, open_clip[i * 77..(i + 1) * 77], "{prompt:?}");
    }
    assert_eq!(open_clip[2 * 77 + 6], 256);

    // SD1.5's tokenizer (pad = eos) keeps `!` an ordinary symbol.
    let sd15 = CLIPTokenizer::from_folder(alignprop_testing::tiny_sd().join("tokenizer")).unwrap();
    assert_eq!(sd15.pad_id(), 49407);
    assert_eq!(sd15.tokenize(PROMPTS[2]).unwrap()[6], 256);
}

/// The pad token is read from `special_tokens_map.json` when `tokenizer_config.json` has none, and the map wins
/// when both name one (transformers' precedence: `!` only in tokenizer_config still pads with `<|endoftext|>`).
#[test]
fn pad_token_comes_from_the_special_tokens_map_first() {
    let write = |dir: &Path, name: &str, pad: Option<&str>| {
        let mut v: serde_json::Value = read_json(tokenizer_dir().join(name)).unwrap();
        match pad {
            Some(p) => v["pad_token"] = p.into(),
            None => {
                v.as_object_mut().unwrap().remove("pad_token");
            }
        }
        std::fs::write(dir.join(name), serde_json::to_string(&v).unwrap()).unwrap();
    };
    let folder = |name: &str, map: Option<&str>, config: Option<&str>| {
        let dir = common::scratch("sd2_parity", name);
        for f in ["vocab.json", "merges.txt"] {
            std::fs::copy(tokenizer_dir().join(f), dir.join(f)).unwrap();
        }
        write(&dir, "special_tokens_map.json", map);
        write(&dir, "tokenizer_config.json", config);
        CLIPTokenizer::from_folder(&dir).unwrap()
    };
    let expected = ids_of(ref_int(&refs_sd2("text_encoder.safetensors"), "input_ids"));
    let only_map = folder("pad_in_map_only", Some("!"), None);
    assert_eq!(only_map.pad_id(), 0);
    let ids: Tensor<B, 2, Int> = only_map.input_ids(&PROMPTS, &Default::default()).unwrap();
    assert_eq!(ids_of(ids), expected);
    let map_wins = folder("map_wins", Some("<|endoftext|>"), Some("!"));
    assert_eq!(map_wins.pad_id(), 49407);
    assert_eq!(map_wins.tokenize(PROMPTS[2]).unwrap()[6], 256);
    let config_only = folder("pad_in_config_only", None, Some("!"));
    assert_eq!(config_only.pad_id(), 0);
    // A pad token outside the vocabulary names the file that asks for it.
    let dir = common::scratch("sd2_parity", "unknown_pad");
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(tokenizer_dir().join(f), dir.join(f)).unwrap();
    }
    write(&dir, "special_tokens_map.json", Some("<|pad|>"));
    let msg = CLIPTokenizer::from_folder(&dir).unwrap_err().to_string();
    assert!(
        msg.contains("special_tokens_map.json") && msg.contains("<|pad|>"),
        "{msg}"
    );
}

// ------------------------------------------------------------------------------------------------ text encoder

fn te_dir() -> PathBuf {
    tiny_sd2().join("text_encoder")
}

/// `last_hidden_state`, `pooler_output` and the hidden states of the reference prompts, in f32 against the float32
/// references.
fn check_text_encoder(model: &CLIPTextModel<B>, what: &str) {
    let r = refs_sd2("text_encoder.safetensors");
    let out = model.forward_hidden_states(ref_int(&r, "input_ids"));
    assert_close(
        &format!("{what} last_hidden_state"),
        out.last_hidden_state.clone(),
        ref_tensor(&r, "last_hidden_state", DType::F32),
        TOL_F32,
    );
    assert_close(
        &format!("{what} pooler_output"),
        out.pooler_output,
        ref_tensor(&r, "pooler_output", DType::F32),
        TOL_F32,
    );
    let hidden = out.hidden_states.expect("hidden states requested");
    assert_eq!(hidden.len(), 3);
    for (i, h) in hidden.into_iter().enumerate() {
        let key = format!("debug.hidden_states.{i}");
        assert_close(
            &format!("{what} {key}"),
            h,
            ref_tensor(&r, &key, DType::F32),
            TOL_F32,
        );
    }
    // Not the output of all the single file's OpenCLIP blocks (README: rel. diff 0.51).
    let (rel, _) = rel_err(
        out.last_hidden_state,
        ref_tensor(&r, "debug.last_hidden_state_all_tower_blocks", DType::F32),
    );
    assert!(
        rel > 0.1,
        "{what}: close to the all-blocks output ({rel:.3e})"
    );
}

#[test]
fn text_encoder_f32_matches_transformers() {
    let cfg: CLIPTextConfig = read_json(te_dir().join("config.json")).unwrap();
    assert_eq!(
        (
            cfg.hidden_act,
            cfg.num_hidden_layers,
            cfg.num_attention_heads
        ),
        (CLIPActivation::Gelu, 2, 2)
    );
    let model = CLIPTextModel::<B>::load(te_dir(), &Default::default(), DType::F32).unwrap();
    check_text_encoder(&model, "f32");
}

#[test]
fn text_encoder_f64_matches_transformers() {
    let model = CLIPTextModel::<B>::load(te_dir(), &Default::default(), DType::F64).unwrap();
    let r = refs_sd2("text_encoder.safetensors");
    let out = model.forward(ref_int(&r, "input_ids"));
    assert_close(
        "f64 last_hidden_state_f64",
        out.last_hidden_state,
        ref_tensor(&r, "last_hidden_state_f64", DType::F64),
        TOL_F64,
    );
    // Only a float32 pooled reference exists.
    assert_close(
        "f64 pooler_output (vs f32 ref)",
        out.pooler_output,
        ref_tensor(&r, "pooler_output", DType::F64),
        TOL_F32,
    );
}

// ------------------------------------------------------------------------------------------------ UNet

/// `sample` [2,4,8,12], `timesteps` [2] (981, 1), `encoder_hidden_states` [2,77,16].
fn unet_inputs(
    src: &SafetensorsSource,
    dtype: DType,
) -> (Tensor<B, 4>, Tensor<B, 1>, Tensor<B, 3>) {
    (
        ref_tensor(src, "sample", dtype),
        ref_int::<1>(src, "timesteps").float(),
        ref_tensor(src, "encoder_hidden_states", dtype),
    )
}

/// The UNet's output and every traced stage against diffusers' hooks (float32 references).
fn check_unet(model: &UNet2DConditionModel<B>, dtype: DType) -> Tensor<B, 4> {
    let r = refs_sd2("unet.safetensors");
    let (sample, t, enc) = unet_inputs(&r, dtype);
    let (out, trace) = model.forward_traced(sample, t, enc, None);
    assert_trace(trace, &r, dtype, TOL_F32);
    out
}

#[test]
fn unet_f32_matches_diffusers() {
    let cfg: UNet2DConditionConfig = read_json(tiny_sd2().join("unet/config.json")).unwrap();
    assert!(cfg.use_linear_projection && cfg.upcast_attention);
    let model =
        UNet2DConditionModel::<B>::load(tiny_sd2().join("unet"), &Default::default(), DType::F32)
            .unwrap();
    let out = check_unet(&model, DType::F32);
    let r = refs_sd2("unet.safetensors");
    assert_close(
        "unet out f32",
        out,
        ref_tensor(&r, "out", DType::F32),
        TOL_F32,
    );
}

#[test]
fn unet_f64_matches_diffusers() {
    let model =
        UNet2DConditionModel::<B>::load(tiny_sd2().join("unet"), &Default::default(), DType::F64)
            .unwrap();
    let out = check_unet(&model, DType::F64);
    assert_eq!(out.dtype(), DType::F64);
    let r = refs_sd2("unet.safetensors");
    assert_close(
        "unet out f64",
        out,
        ref_tensor(&r, "out_f64", DType::F64),
        TOL_F64,
    );
}

// ------------------------------------------------------------------------------------------------ VAE

#[test]
fn vae_decode_matches_diffusers() {
    let r = refs_sd2("vae.safetensors");
    for (dtype, key, tol) in [
        (DType::F32, "decoded", TOL_F32),
        (DType::F64, "decoded_f64", TOL_F64),
    ] {
        let vae =
            AutoencoderKL::<B>::load(tiny_sd2().join("vae"), &Default::default(), dtype).unwrap();
        // `decoded_f64` divides the float32 latents by 0.18215 in float64: exactly decode_scaled.
        let out = vae.decode_scaled(ref_tensor(&r, "latents", dtype));
        assert_eq!(out.dims(), [1, 3, 32, 48]);
        assert_close(
            &format!("vae decode {dtype:?}"),
            out,
            ref_tensor(&r, key, dtype),
            tol,
        );
    }
}

// ------------------------------------------------------------------------------------------------ single file

fn single_file() -> SingleFileCheckpoint {
    SingleFileCheckpoint::open(tiny_sd2().join("single_file/tiny-sd21.safetensors")).unwrap()
}

/// The UNet, VAE and OpenCLIP text tower of the original SD2 single file, built with the diffusers folder's
/// configs, give the diffusers references (the text encoder: the first 2 of the file's 3 blocks).
#[test]
fn single_file_networks_match_diffusers() {
    let ckpt = single_file();
    assert_eq!(ckpt.version(), SdVersion::Sd2);
    let device = Default::default();

    let unet_cfg: UNet2DConditionConfig = read_json(tiny_sd2().join("unet/config.json")).unwrap();
    let unet = UNet2DConditionModel::<B>::new(
        &unet_cfg,
        &VarBuilder::from_source(ckpt.unet(), &device, DType::F32),
    )
    .unwrap();
    let u = refs_sd2("unet.safetensors");
    let (sample, t, enc) = unet_inputs(&u, DType::F32);
    assert_close(
        "single-file unet",
        unet.forward(sample, t, enc),
        ref_tensor(&u, "out", DType::F32),
        TOL_F32,
    );

    let vae_cfg: AutoencoderKLConfig = read_json(tiny_sd2().join("vae/config.json")).unwrap();
    let vae = AutoencoderKL::<B>::new(
        &vae_cfg,
        &VarBuilder::from_source(ckpt.vae(), &device, DType::F32),
    )
    .unwrap();
    let v = refs_sd2("vae.safetensors");
    assert_close(
        "single-file vae decode",
        vae.decode(ref_tensor(&v, "decoder_input", DType::F32)),
        ref_tensor(&v, "decoded", DType::F32),
        TOL_F32,
    );

    let te_cfg: CLIPTextConfig = read_json(te_dir().join("config.json")).unwrap();
    let te = CLIPTextModel::<B>::new(
        &te_cfg,
        &VarBuilder::from_source(ckpt.text_encoder(), &device, DType::F32),
    )
    .unwrap();
    check_text_encoder(&te, "single-file text encoder");
    // In f64 too: the same tensors as the diffusers file.
    let te64 = CLIPTextModel::<B>::new(
        &te_cfg,
        &VarBuilder::from_source(ckpt.text_encoder(), &device, DType::F64),
    )
    .unwrap();
    let t = refs_sd2("text_encoder.safetensors");
    assert_close(
        "single-file text encoder f64",
        te64.forward(ref_int(&t, "input_ids")).last_hidden_state,
        ref_tensor(&t, "last_hidden_state_f64", DType::F64),
        TOL_F64,
    );
}

/// A text-encoder config with more layers than SD2 uses would read the tower's unused last block: refused, naming
/// the file and the key that is not there.
#[test]
fn single_file_text_encoder_does_not_read_the_unused_block() {
    let ckpt = single_file();
    let cfg = CLIPTextConfig {
        num_hidden_layers: 3,
        ..read_json(te_dir().join("config.json")).unwrap()
    };
    let err = CLIPTextModel::<B>::new(
        &cfg,
        &VarBuilder::from_source(ckpt.text_encoder(), &Default::default(), DType::F32),
    )
    .unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(err, WeightError::Missing { .. }), "{err:?}");
    assert!(
        msg.contains("tiny-sd21.safetensors")
            && msg.contains("encoder.layers.2.layer_norm1.weight"),
        "{msg}"
    );
    // A width that does not fit: the fused projection's slice is named with its rows.
    let cfg = CLIPTextConfig {
        hidden_size: 8,
        ..read_json(te_dir().join("config.json")).unwrap()
    };
    let msg = CLIPTextModel::<B>::new(
        &cfg,
        &VarBuilder::from_source(ckpt.text_encoder(), &Default::default(), DType::F32),
    )
    .unwrap_err()
    .to_string();
    eprintln!("{msg}");
    assert!(
        msg.contains("tiny-sd21.safetensors") && msg.contains("expected shape"),
        "{msg}"
    );
}
