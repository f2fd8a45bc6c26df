//! The SDXL base 1.0 topology against transformers / diffusers, on the tiny SDXL fixture
//! (`tests/fixtures/tiny-sdxl`, its README (a)-(c)): both tokenizers (`<|endoftext|>` and `!` padding), both text
//! encoders' penultimate states (no final norm) and encoder 2's projected pooled output (`CLIPTextModelWithProjection`),
//! the UNet with the `text_time` addition embedding (pooled text + sinusoids of the six time ids) and transformer
//! depths 1 and 2, and the VAE with SDXL's scaling factor 0.13025.

use crate::common;

use alignprop_diffusion::clip::{CLIPTextModel, CLIPTextModelWithProjection};
use alignprop_diffusion::tokenizer::CLIPTokenizer;
use alignprop_diffusion::unet::{TextTimeCond, UNet2DConditionConfig, UNet2DConditionModel};
use alignprop_diffusion::vae::AutoencoderKL;
use alignprop_io::pipeline_files::read_json;
use alignprop_io::weights::SafetensorsSource;
use alignprop_testing::{refs_sdxl, tiny_sdxl};
use burn::tensor::{DType, Int, Tensor};
use common::{B, assert_close, assert_trace, ref_int, ref_tensor, rel_err};

/// f32 against the float32 references (as the SD1.5 parity tests).
const TOL_F32: f64 = 1e-4;
/// f64 against the `_f64` references (computed by the `.double()` models).
const TOL_F64: f64 = 1e-8;

fn ids_of(t: Tensor<B, 2, Int>) -> Vec<i64> {
    t.into_data().convert::<i64>().to_vec::<i64>().unwrap()
}

// ------------------------------------------------------------------------------------------------ tokenizers

/// Both tokenizers give transformers' ids for the three short prompts: `tokenizer` pads with `<|endoftext|>`,
/// `tokenizer_2` with `!` = 0, also for the `!` inside the third prompt.
#[test]
fn both_tokenizers_match_transformers() {
    let r = refs_sdxl("text_encoders.safetensors");
    let texts = ["", "a photo of a cat", "a red panda eating bamboo!"];
    for (dir, key, pad) in [
        ("tokenizer", "input_ids", 49407),
        ("tokenizer_2", "input_ids_2", 0),
    ] {
        let tok = CLIPTokenizer::from_folder(tiny_sdxl().join(dir)).unwrap();
        assert_eq!(tok.pad_id(), pad, "{dir}");
        let ours = ids_of(tok.input_ids::<B, _>(&texts, &Default::default()).unwrap());
        let all = ids_of(ref_int::<2>(&r, key));
        assert_eq!(ours, all[..3 * 77], "{dir} ids");
    }
}

// ------------------------------------------------------------------------------------------------ text encoders

fn check_encoder_1(dtype: DType, suffix: &str, tol: f64) {
    let r = refs_sdxl("text_encoders.safetensors");
    let m = CLIPTextModel::<B>::load(tiny_sdxl().join("text_encoder"), &Default::default(), dtype)
        .unwrap();
    let (pen, _) = m.encode_penultimate(ref_int(&r, "input_ids"));
    assert_close(
        &format!("text_encoder penultimate {dtype:?}"),
        pen,
        ref_tensor(&r, &format!("text_encoder.penultimate{suffix}"), dtype),
        tol,
    );
    let out = m.forward(ref_int(&r, "input_ids"));
    assert_close(
        &format!("text_encoder last_hidden_state {dtype:?}"),
        out.last_hidden_state,
        ref_tensor(
            &r,
            &format!("text_encoder.last_hidden_state{suffix}"),
            dtype,
        ),
        tol,
    );
    assert_close(
        &format!("text_encoder pooler_output {dtype:?}"),
        out.pooler_output,
        ref_tensor(&r, &format!("text_encoder.pooler_output{suffix}"), dtype),
        tol,
    );
}

fn check_encoder_2(dtype: DType, suffix: &str, tol: f64) {
    let r = refs_sdxl("text_encoders.safetensors");
    let m = CLIPTextModelWithProjection::<B>::load(
        tiny_sdxl().join("text_encoder_2"),
        &Default::default(),
        dtype,
    )
    .unwrap();
    let (pen, text_embeds) = m.encode_penultimate(ref_int(&r, "input_ids_2"));
    assert_close(
        &format!("text_encoder_2 penultimate {dtype:?}"),
        pen,
        ref_tensor(&r, &format!("text_encoder_2.penultimate{suffix}"), dtype),
        tol,
    );
    assert_close(
        &format!("text_encoder_2 text_embeds {dtype:?}"),
        text_embeds.clone(),
        ref_tensor(&r, &format!("text_encoder_2.text_embeds{suffix}"), dtype),
        tol,
    );
    let (out, embeds) = m.forward(ref_int(&r, "input_ids_2"));
    assert_close(
        &format!("text_encoder_2 last_hidden_state {dtype:?}"),
        out.last_hidden_state,
        ref_tensor(
            &r,
            &format!("text_encoder_2.last_hidden_state{suffix}"),
            dtype,
        ),
        tol,
    );
    assert_close(
        &format!("forward == encode_penultimate {dtype:?}"),
        embeds,
        text_embeds,
        1e-12,
    );
}

#[test]
fn text_encoders_f32_match_transformers() {
    check_encoder_1(DType::F32, "", TOL_F32);
    check_encoder_2(DType::F32, "", TOL_F32);
    let r = refs_sdxl("text_encoders.safetensors");
    let m = CLIPTextModelWithProjection::<B>::load(
        tiny_sdxl().join("text_encoder_2"),
        &Default::default(),
        DType::F32,
    )
    .unwrap();
    let (out, _) = m.forward(ref_int(&r, "input_ids_2"));
    assert_close(
        "text_encoder_2 pooled (unprojected)",
        out.pooler_output,
        ref_tensor(&r, "text_encoder_2.pooled_unprojected", DType::F32),
        TOL_F32,
    );
}

#[test]
fn text_encoders_f64_match_transformers() {
    check_encoder_1(DType::F64, "_f64", TOL_F64);
    check_encoder_2(DType::F64, "_f64", TOL_F64);
}

// ------------------------------------------------------------------------------------------------ UNet

/// `sample` [2,4,8,12], `timesteps` (981, 1), `encoder_hidden_states` [2,77,24], `text_embeds` [2,12], `time_ids`
/// [2,6] (two different rows).
fn unet_inputs(
    src: &SafetensorsSource,
    dtype: DType,
) -> (Tensor<B, 4>, Tensor<B, 1>, Tensor<B, 3>, TextTimeCond<B>) {
    (
        ref_tensor(src, "sample", dtype),
        ref_int::<1>(src, "timesteps").float(),
        ref_tensor(src, "encoder_hidden_states", dtype),
        TextTimeCond {
            text_embeds: ref_tensor(src, "text_embeds", dtype),
            time_ids: ref_tensor(src, "time_ids", dtype),
        },
    )
}

/// The UNet's output and every traced stage, the addition embedding included, against diffusers' hooks.
fn check_unet(model: &UNet2DConditionModel<B>, dtype: DType) -> Tensor<B, 4> {
    let r = refs_sdxl("unet.safetensors");
    let (sample, t, enc, added) = unet_inputs(&r, dtype);
    let (out, trace) = model.forward_traced(sample, t, enc, Some(&added));
    assert!(
        trace.add_embedding.is_some(),
        "an SDXL UNet traces its addition embedding"
    );
    assert_trace(trace, &r, dtype, TOL_F32);
    out
}

fn load_unet(dtype: DType) -> UNet2DConditionModel<B> {
    UNet2DConditionModel::<B>::load(tiny_sdxl().join("unet"), &Default::default(), dtype).unwrap()
}

#[test]
fn unet_f32_matches_diffusers() {
    let cfg: UNet2DConditionConfig = read_json(tiny_sdxl().join("unet/config.json")).unwrap();
    assert_eq!(cfg.addition_embed_type.as_deref(), Some("text_time"));
    assert!(
        cfg.use_linear_projection && !cfg.upcast_attention,
        "upcast_attention: null reads as false"
    );
    let model = load_unet(DType::F32);
    assert!(model.needs_text_time());
    let out = check_unet(&model, DType::F32);
    let r = refs_sdxl("unet.safetensors");
    assert_close(
        "unet out f32",
        out,
        ref_tensor(&r, "out", DType::F32),
        TOL_F32,
    );
}

#[test]
fn unet_f64_matches_diffusers() {
    let model = load_unet(DType::F64);
    let out = check_unet(&model, DType::F64);
    assert_eq!(out.dtype(), DType::F64);
    let r = refs_sdxl("unet.safetensors");
    assert_close(
        "unet out f64",
        out,
        ref_tensor(&r, "out_f64", DType::F64),
        TOL_F64,
    );
}

/// The added conditioning matters: a UNet that ignored the pooled text or mixed up the time-id rows would fail
/// the parity above; this pins that each of them moves the output well beyond the tolerance (README (b): 0.05 and
/// 0.039), and that one row of time ids broadcasts to the batch.
#[test]
fn pooled_text_and_time_ids_change_the_output() {
    let model = load_unet(DType::F32);
    let r = refs_sdxl("unet.safetensors");
    let (sample, t, enc, added) = unet_inputs(&r, DType::F32);
    let base = model.forward_added(sample.clone(), t.clone(), enc.clone(), Some(&added));
    let zero_text = TextTimeCond {
        text_embeds: added.text_embeds.zeros_like(),
        time_ids: added.time_ids.clone(),
    };
    let a = model.forward_added(sample.clone(), t.clone(), enc.clone(), Some(&zero_text));
    assert!(rel_err(a, base.clone()).0 > 1e-2);
    let swapped = TextTimeCond {
        text_embeds: added.text_embeds.clone(),
        time_ids: Tensor::cat(
            vec![
                added.time_ids.clone().slice(1..2),
                added.time_ids.clone().slice(0..1),
            ],
            0,
        ),
    };
    let b = model.forward_added(sample.clone(), t.clone(), enc.clone(), Some(&swapped));
    assert!(rel_err(b, base).0 > 1e-2);
    // One row for the whole batch equals that row repeated.
    let one = TextTimeCond {
        text_embeds: added.text_embeds.clone().slice(0..1),
        time_ids: added.time_ids.clone().slice(0..1),
    };
    let two = TextTimeCond {
        text_embeds: one.text_embeds.clone().repeat_dim(0, 2),
        time_ids: one.time_ids.clone().repeat_dim(0, 2),
    };
    assert_close(
        "single-row broadcast",
        model.forward_added(sample.clone(), t.clone(), enc.clone(), Some(&one)),
        model.forward_added(sample, t, enc, Some(&two)),
        1e-7,
    );
}

/// Misuse is a clear panic, not a shape error deep inside: an SDXL UNet without its added conditioning.
#[test]
#[should_panic(expected = "text_time")]
fn sdxl_unet_without_added_conditioning_panics_clearly() {
    let model = load_unet(DType::F32);
    let r = refs_sdxl("unet.safetensors");
    let (sample, t, enc, _) = unet_inputs(&r, DType::F32);
    let _ = model.forward(sample, t, enc);
}

// ------------------------------------------------------------------------------------------------ VAE

#[test]
fn vae_with_sdxl_scaling_factor_matches_diffusers() {
    let r = refs_sdxl("vae.safetensors");
    for (dtype, suffix, tol) in [(DType::F32, "", TOL_F32), (DType::F64, "_f64", TOL_F64)] {
        let vae =
            AutoencoderKL::<B>::load(tiny_sdxl().join("vae"), &Default::default(), dtype).unwrap();
        assert_eq!(vae.scaling_factor, 0.13025);
        let out = vae.decode_scaled(ref_tensor(&r, "latents", dtype));
        assert_eq!(out.dims(), [1, 3, 32, 48]);
        assert_close(
            &format!("vae decode {dtype:?}"),
            out,
            ref_tensor(&r, &format!("decoded{suffix}"), dtype),
            tol,
        );
        let mean = vae.encode(ref_tensor(&r, "image", dtype)).mean;
        assert_close(
            &format!("vae encode mean {dtype:?}"),
            mean,
            ref_tensor(&r, &format!("encoded_mean{suffix}"), dtype),
            tol,
        );
    }
}
