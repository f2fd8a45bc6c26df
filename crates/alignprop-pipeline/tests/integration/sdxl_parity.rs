//! SDXL end to end on the tiny SDXL fixture (`tests/fixtures/tiny-sdxl`, README (a), (d)): the folder loaded by
//! `StableDiffusion::load` (two text encoders and tokenizers, `force_zeros_for_empty_prompt`, the Euler scheduler
//! config driving DDIM), SDXL's `encode_prompt` (penultimate states side by side, encoder 2's pooled projection,
//! zeros for the default negative prompt), the time ids, and the 4-step CFG sampling run against diffusers'
//! `StableDiffusionXLPipeline` step by step (eta 0, and eta 1 with the stored noise), the decoded image.

use alignprop_pipeline::{Conditioning, SampleOptions, StableDiffusion, guided_noise};
use alignprop_schedulers::{DdimScheduler, Scheduler};
use alignprop_testing::{assert_close, ref_int_on, ref_tensor_on, refs_sdxl, tiny_sdxl};
use burn::tensor::{DType, Tensor};

use crate::shared::assert_ddim_update;

type B = burn::backend::Flex;
const TOL: f64 = 1e-4;

fn r<const D: usize>(file: &str, key: &str) -> Tensor<B, D> {
    ref_tensor_on(&refs_sdxl(file), key, &Default::default(), DType::F32)
}

fn t<const D: usize>(key: &str) -> Tensor<B, D> {
    r("sample.safetensors", key)
}

fn load() -> StableDiffusion<B> {
    StableDiffusion::<B>::load(tiny_sdxl(), &Default::default(), DType::F32).unwrap()
}

const PROMPTS: [&str; 2] = ["cat", "a photo of a golden retriever"];

/// `text_prompts` of the fixture's manifest (README (a)).
fn text_prompts() -> Vec<String> {
    let m: serde_json::Value =
        alignprop_io::pipeline_files::read_json(&tiny_sdxl().join("manifest.json")).unwrap();
    serde_json::from_value(m["text_prompts"].clone()).unwrap()
}

#[test]
fn folder_loads_as_sdxl_and_prompts_encode_to_the_reference() {
    let sd = load();
    let second = sd
        .text_encoder_2
        .as_ref()
        .expect("SDXL has a second text encoder");
    assert!(second.force_zeros_for_empty_prompt);
    assert_eq!(
        (sd.tokenizer.pad_id(), second.tokenizer.pad_id()),
        (49407, 0)
    );
    assert_eq!(sd.scheduler_config.prediction_type, "epsilon");
    assert_eq!(sd.vae.scaling_factor, 0.13025);
    assert_eq!(sd.default_image_size(), 64);
    let ids = |key: &str| {
        ref_int_on::<B, 2>(&refs_sdxl("sample.safetensors"), key, &Default::default())
            .into_data()
            .convert::<i64>()
    };
    let d = Default::default();
    assert_eq!(
        sd.tokenizer
            .input_ids::<B, _>(&PROMPTS, &d)
            .unwrap()
            .into_data()
            .convert::<i64>(),
        ids("input_ids")
    );
    assert_eq!(
        second
            .tokenizer
            .input_ids::<B, _>(&PROMPTS, &d)
            .unwrap()
            .into_data()
            .convert::<i64>(),
        ids("input_ids_2")
    );
    // The default (empty) negative prompt: diffusers' `negative_prompt=None`, all zeros.
    let text = sd.conditioning_sized(&PROMPTS, "", [64, 64]).unwrap();
    assert_close("prompt_embeds", text.cond.clone(), t("prompt_embeds"), TOL);
    assert_close(
        "negative_prompt_embeds",
        text.uncond.clone(),
        t("negative_prompt_embeds"),
        0.0,
    );
    let added = text
        .added
        .as_ref()
        .expect("SDXL conditioning has pooled embeddings and time ids");
    assert_close(
        "pooled_prompt_embeds",
        added.cond.text_embeds.clone(),
        t("pooled_prompt_embeds"),
        TOL,
    );
    assert_close(
        "negative_pooled_prompt_embeds",
        added.uncond.text_embeds.clone(),
        t("negative_pooled_prompt_embeds"),
        0.0,
    );
    assert_close(
        "add_time_ids",
        text.stacked_added().unwrap().time_ids,
        t("add_time_ids"),
        0.0,
    );
    // `conditioning` uses the model's default size (64 here): the same time ids.
    let default = sd.conditioning(&PROMPTS, "").unwrap();
    assert_close(
        "default-size time ids",
        default.stacked_added().unwrap().time_ids,
        t("add_time_ids"),
        0.0,
    );
    // Time ids follow the requested size: (h, w, 0, 0, h, w).
    let wide = sd.conditioning_sized(&PROMPTS, "", [48, 80]).unwrap();
    let row: Vec<f32> = wide
        .added
        .unwrap()
        .cond
        .time_ids
        .slice(0..1)
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap();
    assert_eq!(row, [48.0, 80.0, 0.0, 0.0, 48.0, 80.0]);
}

/// The three negative-prompt cases of README (a): none (zeros), a given "" and a given text (both encoded). Ours has
/// no "none": the empty string is the default and means diffusers' `None` under `force_zeros_for_empty_prompt`; a
/// non-empty negative prompt is encoded like diffusers'.
#[test]
fn negative_prompts_as_diffusers() {
    let sd = load();
    let e = "text_encoders.safetensors";
    // README (a): `encode_prompt` ran on the text prompts but the first (the long one is truncated at 77 tokens).
    let prompts = text_prompts();
    let prompts = &prompts[1..];
    let text = sd
        .conditioning_sized(prompts, "blurry, low quality", [64, 64])
        .unwrap();
    assert_close(
        "prompt_embeds (batch 3)",
        text.cond.clone(),
        r(e, "encode_prompt.prompt_embeds"),
        TOL,
    );
    assert_close(
        "negative text",
        text.uncond.clone(),
        r(e, "encode_prompt.negative_prompt_embeds.text"),
        TOL,
    );
    let added = text.added.unwrap();
    assert_close(
        "pooled (batch 3)",
        added.cond.text_embeds,
        r(e, "encode_prompt.pooled_prompt_embeds"),
        TOL,
    );
    assert_close(
        "negative pooled text",
        added.uncond.text_embeds,
        r(e, "encode_prompt.negative_pooled_prompt_embeds.text"),
        TOL,
    );
    let zeros = sd.conditioning_sized(prompts, "", [64, 64]).unwrap();
    assert_close(
        "negative none",
        zeros.uncond,
        r(e, "encode_prompt.negative_prompt_embeds.none"),
        0.0,
    );
    // diffusers' explicitly given "" is the encoding of "": what `encode_prompts_sdxl(&[""])` gives.
    let (empty, pooled_empty) = sd.encode_prompts_sdxl(&["", "", ""]).unwrap();
    assert_close(
        "negative empty",
        empty,
        r(e, "encode_prompt.negative_prompt_embeds.empty"),
        TOL,
    );
    assert_close(
        "negative pooled empty",
        pooled_empty,
        r(e, "encode_prompt.negative_pooled_prompt_embeds.empty"),
        TOL,
    );
}

/// eta 0, CFG 5: both halves' epsilon, the guided one, x0, each DDIM update, the final latents and the image.
#[test]
fn ddim_cfg_loop_matches_the_sdxl_pipeline_step_by_step() {
    let sd = load();
    let text = sd.conditioning_sized(&PROMPTS, "", [64, 64]).unwrap();
    let sched = DdimScheduler::new(&sd.scheduler_config, 4).unwrap();
    assert_eq!(sched.timesteps(), [751, 501, 251, 1]);
    let mut x = t::<4>("x_T");
    for i in 0..4 {
        let ts = sched.timesteps()[i] as f64;
        let step = |name: &str| format!("step{i}.{name}");
        let both = sd.unet.forward_added_with_timestep(
            Tensor::cat(vec![x.clone(), x.clone()], 0),
            ts,
            text.stacked(),
            text.stacked_added().as_ref(),
        );
        let [u, c] = both.chunk(2, 0).try_into().unwrap();
        assert_close(&step("eps_uncond"), u, t(&step("eps_uncond")), TOL);
        assert_close(&step("eps_cond"), c, t(&step("eps_cond")), TOL);
        let eps = guided_noise(&sd.unet, x.clone(), ts, &text, 5.0);
        assert_close(
            &step("eps_guided"),
            eps.clone(),
            t(&step("eps_guided")),
            TOL,
        );
        x = assert_ddim_update(i, sched.step(eps, i, x, None), t::<4>, TOL);
    }
    assert_close("final_latents", x.clone(), t("final_latents"), TOL);
    assert_close("image", sd.vae.decode_scaled(x), t("image"), TOL);
}

/// eta 1 with the stored variance noise, through `denoise` (the loop `sample` runs); and `sample` itself runs at a
/// non-square size (its own noise), giving finite images of that size.
#[test]
fn eta1_loop_through_denoise_matches_and_sample_runs() {
    let sd = load();
    let sched = DdimScheduler::new(&sd.scheduler_config, 4)
        .unwrap()
        .with_eta(1.0)
        .unwrap();
    let noises = (0..4)
        .map(|i| Some(t::<4>(&format!("variance_noise.{i}"))))
        .collect();
    let text: Conditioning<B> = sd.conditioning_sized(&PROMPTS, "", [64, 64]).unwrap();
    let x = alignprop_pipeline::denoise(
        &sd.unet,
        &sched,
        t("x_T"),
        &text,
        5.0,
        noises,
        &mut |_, _| {},
    );
    assert_close("final_latents_eta1", x, t("final_latents_eta1"), TOL);

    let opts = SampleOptions {
        steps: 2,
        guidance_scale: 5.0,
        height: 48,
        width: 80,
        ..Default::default()
    };
    let out = sd.sample(&PROMPTS, &opts, &mut |_, _| {}).unwrap();
    assert_eq!(out.images.dims(), [2, 3, 48, 80]);
    let v: Vec<f32> = out.images.into_data().convert::<f32>().to_vec().unwrap();
    assert!(v.iter().all(|x| x.is_finite()));
}
