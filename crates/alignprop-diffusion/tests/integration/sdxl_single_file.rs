//! The original SDXL single file (Stability generative-models "sgm" layout: `model.diffusion_model.*` with
//! `label_emb`, `first_stage_model.*`, CLIP ViT-L under `conditioner.embedders.0.transformer.`, the OpenCLIP bigG
//! tower under `conditioner.embedders.1.model.`) of the tiny SDXL fixture (`tests/fixtures/tiny-sdxl`, its README
//! section 4): the four networks read straight from the file give the diffusers references, the converted diffusers
//! folder loads and its UNet gives the fixture folder's output bitwise, and files that are not SDXL base
//! checkpoints are refused with one clear error.

use crate::common;

use std::path::{Path, PathBuf};

use alignprop_diffusion::clip::{CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection};
use alignprop_diffusion::convert::{ConvertOptions, single_file_to_diffusers};
use alignprop_diffusion::unet::{TextTimeCond, UNet2DConditionConfig, UNet2DConditionModel};
use alignprop_diffusion::vae::{AutoencoderKL, AutoencoderKLConfig};
use alignprop_io::pipeline_files::{check_pipeline_family, read_json};
use alignprop_io::single_file::{SdVersion, SingleFileCheckpoint};
use alignprop_io::weights::{SafetensorsSource, VarBuilder};
use burn::tensor::{DType, Tensor};
use common::{B, assert_close, ref_int, ref_tensor, rel_err};

/// f32 against the float32 references (as the SD1.5 / SD2 parity tests).
const TOL: f64 = 1e-4;

fn tiny_sdxl() -> PathBuf {
    alignprop_testing::fixtures_root().join("tiny-sdxl")
}

fn sdxl_file() -> PathBuf {
    tiny_sdxl().join("single_file/tiny-sdxl.safetensors")
}

fn refs(name: &str) -> SafetensorsSource {
    SafetensorsSource::open(&[tiny_sdxl().join("refs").join(name)]).expect("SDXL reference file")
}

/// The UNet on `refs/unet.safetensors` (`sample` [2,4,8,12], `timesteps` [2], `encoder_hidden_states` [2,77,24],
/// `text_embeds` [2,12], `time_ids` [2,6]).
fn unet_out(unet: &UNet2DConditionModel<B>) -> Tensor<B, 4> {
    let r = refs("unet.safetensors");
    let added = TextTimeCond {
        text_embeds: ref_tensor(&r, "text_embeds", DType::F32),
        time_ids: ref_tensor(&r, "time_ids", DType::F32),
    };
    unet.forward_added(
        ref_tensor(&r, "sample", DType::F32),
        ref_int::<1>(&r, "timesteps").float(),
        ref_tensor(&r, "encoder_hidden_states", DType::F32),
        Some(&added),
    )
}

fn max_abs_diff<const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f64 {
    rel_err(a, b).1
}

/// The four networks built from the single file's sources with the fixture folder's configs give the diffusers
/// references: the UNet (with `label_emb` as `add_embedding` and depth-2 transformers) also bitwise the fixture
/// folder's UNet; the second text encoder's penultimate states and projected pooled output (every one of the
/// tower's 10 blocks used, q/k/v cut from the fused in_proj, `text_projection` transposed).
#[test]
fn single_file_networks_match_diffusers() {
    let ckpt = SingleFileCheckpoint::open(sdxl_file()).unwrap();
    assert_eq!(ckpt.version(), SdVersion::Xl);
    let device = Default::default();

    let unet_cfg: UNet2DConditionConfig = read_json(tiny_sdxl().join("unet/config.json")).unwrap();
    let unet = UNet2DConditionModel::<B>::new(
        &unet_cfg,
        &VarBuilder::from_source(ckpt.unet(), &device, DType::F32),
    )
    .unwrap();
    assert!(unet.needs_text_time());
    let out = unet_out(&unet);
    let folder =
        UNet2DConditionModel::<B>::load(tiny_sdxl().join("unet"), &device, DType::F32).unwrap();
    let diff = max_abs_diff(out.clone(), unet_out(&folder));
    eprintln!("single-file unet vs folder unet: max abs {diff:.3e}");
    assert_eq!(diff, 0.0, "the same weights give a different output");
    assert_close(
        "single-file unet",
        out,
        ref_tensor(&refs("unet.safetensors"), "out", DType::F32),
        TOL,
    );

    let vae_cfg: AutoencoderKLConfig = read_json(tiny_sdxl().join("vae/config.json")).unwrap();
    let vae = AutoencoderKL::<B>::new(
        &vae_cfg,
        &VarBuilder::from_source(ckpt.vae(), &device, DType::F32),
    )
    .unwrap();
    let v = refs("vae.safetensors");
    assert_close(
        "single-file vae decode",
        vae.decode(ref_tensor(&v, "decoder_input", DType::F32)),
        ref_tensor(&v, "decoded", DType::F32),
        TOL,
    );

    let t = refs("text_encoders.safetensors");
    let te_cfg: CLIPTextConfig = read_json(tiny_sdxl().join("text_encoder/config.json")).unwrap();
    let te = CLIPTextModel::<B>::new(
        &te_cfg,
        &VarBuilder::from_source(ckpt.text_encoder(), &device, DType::F32),
    )
    .unwrap();
    let (penultimate, _) = te.encode_penultimate(ref_int(&t, "input_ids"));
    assert_close(
        "single-file text_encoder penultimate",
        penultimate,
        ref_tensor(&t, "text_encoder.penultimate", DType::F32),
        TOL,
    );

    let te2_cfg: CLIPTextConfig =
        read_json(tiny_sdxl().join("text_encoder_2/config.json")).unwrap();
    assert_eq!(te2_cfg.num_hidden_layers, 10);
    let te2 = CLIPTextModelWithProjection::<B>::new(
        &te2_cfg,
        &VarBuilder::from_source(ckpt.text_encoder_2().unwrap(), &device, DType::F32),
    )
    .unwrap();
    let ids2 = ref_int(&t, "input_ids_2");
    let (penultimate, text_embeds) = te2.encode_penultimate(ids2.clone());
    assert_close(
        "single-file text_encoder_2 penultimate",
        penultimate,
        ref_tensor(&t, "text_encoder_2.penultimate", DType::F32),
        TOL,
    );
    assert_close(
        "single-file text_encoder_2 text_embeds",
        text_embeds.clone(),
        ref_tensor(&t, "text_encoder_2.text_embeds", DType::F32),
        TOL,
    );
    let folder_te2 = CLIPTextModelWithProjection::<B>::load(
        tiny_sdxl().join("text_encoder_2"),
        &device,
        DType::F32,
    )
    .unwrap();
    let diff = max_abs_diff(text_embeds, folder_te2.encode_penultimate(ids2).1);
    eprintln!("single-file text_encoder_2 vs folder: text_embeds max abs {diff:.3e}");
    assert_eq!(diff, 0.0);
}

/// `single_file_to_diffusers` with the fixture's configs writes a folder that passes the pipeline-family check
/// (`StableDiffusionXLPipeline`) and whose UNet, loaded from disk, gives the fixture folder's output bitwise (and
/// diffusers' within float32 tolerance); its second text encoder loads as a `CLIPTextModelWithProjection`.
#[test]
fn converted_folder_loads_and_its_unet_equals_the_folders() {
    // A folder that does not exist yet, as a conversion's destination usually is.
    let out = common::scratch("sdxl_single_file", "converted").join("pipeline");
    let report = single_file_to_diffusers(
        sdxl_file(),
        &out,
        &ConvertOptions {
            configs_from: Some(tiny_sdxl()),
            ..Default::default()
        },
    )
    .unwrap();
    eprintln!("{:?}", report.tensors);
    assert!(report.unused_keys.is_empty(), "{:?}", report.unused_keys);
    check_pipeline_family(&out).unwrap();
    let index: serde_json::Value = read_json(out.join("model_index.json")).unwrap();
    assert_eq!(index["_class_name"], "StableDiffusionXLPipeline");
    assert_eq!(index["force_zeros_for_empty_prompt"], true);

    let device = Default::default();
    let ours = UNet2DConditionModel::<B>::load(out.join("unet"), &device, DType::F32).unwrap();
    let theirs =
        UNet2DConditionModel::<B>::load(tiny_sdxl().join("unet"), &device, DType::F32).unwrap();
    let (a, b) = (unet_out(&ours), unet_out(&theirs));
    let diff = max_abs_diff(a.clone(), b);
    eprintln!("converted unet vs fixture unet: max abs {diff:.3e}");
    assert_eq!(diff, 0.0);
    assert_close(
        "converted unet",
        a,
        ref_tensor(&refs("unet.safetensors"), "out", DType::F32),
        TOL,
    );
    let te2 =
        CLIPTextModelWithProjection::<B>::load(out.join("text_encoder_2"), &device, DType::F32)
            .unwrap();
    let t = refs("text_encoders.safetensors");
    assert_close(
        "converted text_encoder_2 text_embeds",
        te2.encode_penultimate(ref_int(&t, "input_ids_2")).1,
        ref_tensor(&t, "text_encoder_2.text_embeds", DType::F32),
        TOL,
    );
    std::fs::remove_dir_all(&out).ok();
}

/// Writes a safetensors file of 1-element float32 tensors under `keys` (and a 2-D one for each `(key, shape)`).
fn fake_file(path: &Path, keys: &[&str], shaped: &[(&str, Vec<usize>)]) {
    let bufs: Vec<Vec<u8>> = shaped
        .iter()
        .map(|(_, s)| vec![0u8; 4 * s.iter().product::<usize>()])
        .collect();
    let zeros = [0u8; 4];
    let mut tensors: Vec<(String, safetensors::tensor::TensorView)> = keys
        .iter()
        .map(|k| {
            (
                k.to_string(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &zeros)
                    .unwrap(),
            )
        })
        .collect();
    for ((k, s), b) in shaped.iter().zip(&bufs) {
        tensors.push((
            k.to_string(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap(),
        ));
    }
    safetensors::serialize_to_file(tensors, None, path).unwrap();
}

/// An SDXL refiner (its only text encoder, OpenCLIP bigG, as `conditioner.embedders.0.model.`), an SDXL file with
/// one text encoder missing, and a bigG tower whose `text_projection` does not fit are refused, each with one error
/// naming the file and what was expected.
#[test]
fn files_that_are_not_sdxl_base_checkpoints_are_refused_clearly() {
    let dir = common::scratch("sdxl_single_file", "bad");
    let unet = "model.diffusion_model.input_blocks.0.0.weight";
    let expect = |name: &str, keys: &[&str], shaped: &[(&str, Vec<usize>)], needles: &[&str]| {
        let path = dir.join(name);
        fake_file(&path, keys, shaped);
        let msg = SingleFileCheckpoint::open(&path).unwrap_err().to_string();
        eprintln!("{msg}");
        assert!(msg.contains(name), "names the file: {msg}");
        for n in needles {
            assert!(msg.contains(n), "'{n}' in: {msg}");
        }
    };
    expect(
        "refiner.safetensors",
        &[unet, "conditioner.embedders.0.model.token_embedding.weight"],
        &[],
        &["SDXL refiner", "not supported"],
    );
    expect(
        "no_bigg.safetensors",
        &[
            unet,
            "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
        ],
        &[],
        &[
            "conditioner.embedders.1.model.token_embedding.weight",
            "(missing)",
        ],
    );
    let tower = "conditioner.embedders.1.model.";
    let shaped: Vec<(String, Vec<usize>)> = vec![
        (format!("{tower}token_embedding.weight"), vec![10, 4]),
        (format!("{tower}positional_embedding"), vec![77, 4]),
        (
            format!("{tower}transformer.resblocks.0.mlp.c_fc.weight"),
            vec![16, 4],
        ),
        (
            format!("{tower}transformer.resblocks.1.mlp.c_fc.weight"),
            vec![16, 4],
        ),
        (format!("{tower}text_projection"), vec![3, 4]),
        (
            "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
                .into(),
            vec![10, 2],
        ),
        (
            "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight"
                .into(),
            vec![77, 2],
        ),
        (
            "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight".into(),
            vec![8, 2],
        ),
    ];
    let shaped: Vec<(&str, Vec<usize>)> = shaped
        .iter()
        .map(|(k, s)| (k.as_str(), s.clone()))
        .collect();
    expect(
        "bad_projection.safetensors",
        &[unet],
        &shaped,
        &[
            "conditioner.embedders.1.model.text_projection",
            "[3, 4]",
            "[4, projection_dim]",
        ],
    );
    std::fs::remove_dir_all(&dir).ok();
}
