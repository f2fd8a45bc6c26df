//! The three networks loaded from the single-file SD1.5 checkpoint (original `model.diffusion_model.*`,
//! `first_stage_model.*`, `cond_stage_model.transformer.*` names) give the same outputs as diffusers; and
//! half-precision files (fp16 UNet, bf16 VAE, fp16 single file) load with their stored values.

use crate::common;

use alignprop_diffusion::clip::{CLIPTextConfig, CLIPTextModel};
use alignprop_diffusion::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use alignprop_diffusion::vae::{AutoencoderKL, AutoencoderKLConfig};
use alignprop_io::pipeline_files::read_json;
use alignprop_io::single_file::SingleFileCheckpoint;
use alignprop_io::weights::VarBuilder;
use burn::tensor::DType;
use common::{B, assert_close, ref_int, ref_tensor, refs, tiny_sd};

const TOL: f64 = 1e-4;

fn unet_from(ckpt: &SingleFileCheckpoint, dtype: DType) -> UNet2DConditionModel<B> {
    let cfg: UNet2DConditionConfig = read_json(&tiny_sd().join("unet/config.json")).unwrap();
    let vb = VarBuilder::from_source(ckpt.unet(), &Default::default(), dtype);
    UNet2DConditionModel::new(&cfg, &vb).unwrap()
}

fn unet_out(unet: &UNet2DConditionModel<B>, dtype: DType) -> burn::tensor::Tensor<B, 4> {
    let r = refs("unet.safetensors");
    unet.forward(
        ref_tensor(&r, "sample", dtype),
        ref_int::<1>(&r, "timesteps").float(),
        ref_tensor(&r, "encoder_hidden_states", dtype),
    )
}

#[test]
fn single_file_unet_vae_text_encoder_match_diffusers() {
    let ckpt =
        SingleFileCheckpoint::open(tiny_sd().join("single_file/tiny-sd15.safetensors")).unwrap();
    let device = Default::default();

    let unet = unet_from(&ckpt, DType::F32);
    assert_close(
        "single-file unet",
        unet_out(&unet, DType::F32),
        ref_tensor(&refs("unet.safetensors"), "out", DType::F32),
        TOL,
    );

    let vae_cfg: AutoencoderKLConfig = read_json(&tiny_sd().join("vae/config.json")).unwrap();
    let vae = AutoencoderKL::new(
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
    assert_close(
        "single-file vae encode mean",
        vae.encode(ref_tensor(&v, "image", DType::F32)).mean,
        ref_tensor(&v, "encode_mean", DType::F32),
        TOL,
    );

    let te_cfg: CLIPTextConfig = read_json(&tiny_sd().join("text_encoder/config.json")).unwrap();
    let te = CLIPTextModel::new(
        &te_cfg,
        &VarBuilder::from_source(ckpt.text_encoder(), &device, DType::F32),
    )
    .unwrap();
    let t = refs("text_encoder.safetensors");
    assert_close(
        "single-file text encoder",
        te.forward(ref_int::<2>(&t, "input_ids")).last_hidden_state,
        ref_tensor(&t, "last_hidden_state", DType::F32),
        TOL,
    );
}

#[test]
fn half_precision_files_load_their_stored_values() {
    let device = Default::default();
    // fp16 UNet folder (diffusion_pytorch_model.fp16.safetensors), run in f32 and f64.
    for dtype in [DType::F32, DType::F64] {
        let unet =
            UNet2DConditionModel::<B>::load(&tiny_sd().join("extra/fp16/unet"), &device, dtype)
                .unwrap();
        let expected = ref_tensor(&refs("unet_fp16_weights.safetensors"), "out", dtype);
        assert_close(
            &format!("fp16 unet in {dtype:?}"),
            unet_out(&unet, dtype),
            expected,
            TOL,
        );
    }
    // bf16 VAE folder.
    let vae =
        AutoencoderKL::<B>::load(&tiny_sd().join("extra/bf16/vae"), &device, DType::F32).unwrap();
    let v = refs("vae.safetensors");
    assert_close(
        "bf16 vae decode",
        vae.decode(ref_tensor(&v, "decoder_input", DType::F32)),
        ref_tensor(&refs("vae_bf16_weights.safetensors"), "decoded", DType::F32),
        TOL,
    );
    // fp16 single file: the same .half() UNet weights as the fp16 folder.
    let ckpt = SingleFileCheckpoint::open(tiny_sd().join("single_file/tiny-sd15.fp16.safetensors"))
        .unwrap();
    let unet = unet_from(&ckpt, DType::F32);
    let expected = ref_tensor(&refs("unet_fp16_weights.safetensors"), "out", DType::F32);
    assert_close(
        "fp16 single-file unet",
        unet_out(&unet, DType::F32),
        expected,
        TOL,
    );
}

#[test]
fn single_file_errors_name_the_file() {
    let path = tiny_sd().join("vae/diffusion_pytorch_model.safetensors");
    let err = SingleFileCheckpoint::open(&path).unwrap_err().to_string();
    assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
}
