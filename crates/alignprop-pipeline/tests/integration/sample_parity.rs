//! The 4-step DDIM sampling run with classifier-free guidance (eta 1 and eta 0) against diffusers'
//! `StableDiffusionPipeline` (`refs/sample.safetensors`), step by step, then the decoded image and its 8-bit PNG
//! conversion.

use alignprop_io::weights::TensorSource;
use alignprop_pipeline::images::to_rgb8;
use alignprop_pipeline::{Conditioning, StableDiffusion, guided_noise};
use alignprop_schedulers::{DdimScheduler, Scheduler};
use alignprop_testing::{assert_close, ref_tensor_on, refs, tiny_sd};
use burn::tensor::{DType, Tensor};

use crate::shared::{assert_ddim_update, assert_prompt_ids};

type B = burn::backend::Flex;
const TOL: f64 = 1e-4;

fn t<const D: usize>(key: &str, dtype: DType) -> Tensor<B, D> {
    ref_tensor_on(&refs("sample.safetensors"), key, &Default::default(), dtype)
}

#[test]
fn prompts_encode_to_the_reference_conditioning() {
    let sd = StableDiffusion::<B>::load(&tiny_sd(), &Default::default(), DType::F32).unwrap();
    assert_prompt_ids(&sd, &refs("sample.safetensors"));
    let text = sd
        .conditioning(&["cat", "a photo of a golden retriever"], "")
        .unwrap();
    assert_close(
        "uncond embeds",
        text.uncond,
        t("uncond_embeds", DType::F32),
        TOL,
    );
    assert_close("cond embeds", text.cond, t("cond_embeds", DType::F32), TOL);
    assert_eq!(sd.default_image_size(), 128);
}

#[test]
fn ddim_cfg_loop_matches_diffusers_step_by_step() {
    let sd = StableDiffusion::<B>::load(&tiny_sd(), &Default::default(), DType::F32).unwrap();
    let text = Conditioning::new(t("uncond_embeds", DType::F32), t("cond_embeds", DType::F32));
    let sched = DdimScheduler::new(&sd.scheduler_config, 4)
        .unwrap()
        .with_eta(1.0)
        .unwrap();
    assert_eq!(sched.timesteps(), [751, 501, 251, 1]);
    let mut x = t::<4>("x_T", DType::F32);
    for i in 0..4 {
        let ts = sched.timesteps()[i] as f64;
        // The two halves of the batched call, then the guided combination.
        let both = sd.unet.forward_with_timestep(
            Tensor::cat(vec![x.clone(), x.clone()], 0),
            ts,
            text.stacked(),
        );
        let [u, c] = both.chunk(2, 0).try_into().unwrap();
        assert_close(
            &format!("step{i}.eps_uncond"),
            u,
            t(&format!("step{i}.eps_uncond"), DType::F32),
            TOL,
        );
        assert_close(
            &format!("step{i}.eps_cond"),
            c,
            t(&format!("step{i}.eps_cond"), DType::F32),
            TOL,
        );
        let eps = guided_noise(&sd.unet, x.clone(), ts, &text, 7.5);
        assert_close(
            &format!("step{i}.eps_guided"),
            eps.clone(),
            t(&format!("step{i}.eps_guided"), DType::F32),
            TOL,
        );
        let out = sched.step(
            eps,
            i,
            x,
            Some(t(&format!("variance_noise.{i}"), DType::F32)),
        );
        x = assert_ddim_update(i, out, |key| t(key, DType::F32), TOL);
    }
    assert_close(
        "final_latents",
        x.clone(),
        t("final_latents", DType::F32),
        TOL,
    );
    let image = sd.vae.decode_scaled(x);
    assert_close("image", image.clone(), t("image", DType::F32), TOL);
    // diffusers' PIL conversion: round(clamp(x/2+0.5)*255), HWC.
    let ours = to_rgb8(image);
    let raw = refs("sample.safetensors")
        .find("image_uint8_hwc")
        .unwrap()
        .unwrap();
    let expected: Vec<u8> = raw.data.to_vec::<u8>().unwrap();
    let flat: Vec<u8> = ours
        .iter()
        .flat_map(|img| img.as_raw().iter().copied())
        .collect();
    let off = flat.iter().zip(&expected).filter(|(a, b)| a != b).count();
    let max = flat
        .iter()
        .zip(&expected)
        .map(|(a, b)| (*a as i32 - *b as i32).abs())
        .max()
        .unwrap();
    // Values sitting on a rounding boundary may differ by one level.
    assert!(
        max <= 1 && off * 1000 < flat.len(),
        "{off} of {} bytes differ (max {max})",
        flat.len()
    );
}

#[test]
fn eta0_loop_through_denoise_matches() {
    let sd = StableDiffusion::<B>::load(&tiny_sd(), &Default::default(), DType::F32).unwrap();
    let text = Conditioning::new(t("uncond_embeds", DType::F32), t("cond_embeds", DType::F32));
    let sched = DdimScheduler::new(&sd.scheduler_config, 4).unwrap();
    let x = alignprop_pipeline::denoise(
        &sd.unet,
        &sched,
        t("x_T", DType::F32),
        &text,
        7.5,
        vec![],
        &mut |_, _| {},
    );
    assert_close(
        "final_latents_eta0",
        x,
        t("final_latents_eta0", DType::F32),
        TOL,
    );
}

#[test]
fn seeded_sampling_is_reproducible_and_writes_pngs() {
    let sd = StableDiffusion::<B>::load(&tiny_sd(), &Default::default(), DType::F32).unwrap();
    let opts = alignprop_pipeline::SampleOptions {
        steps: 3,
        eta: 1.0,
        height: 64,
        width: 48,
        seed: 7,
        ..Default::default()
    };
    let a = sd.sample(&["a cat"], &opts, &mut |_, _| {}).unwrap();
    let b = sd.sample(&["a cat"], &opts, &mut |_, _| {}).unwrap();
    assert_eq!(a.images.dims(), [1, 3, 64, 48]);
    assert_eq!(a.latents.clone().into_data(), b.latents.into_data());
    let c = sd
        .sample(
            &["a cat"],
            &alignprop_pipeline::SampleOptions {
                seed: 8,
                ..opts.clone()
            },
            &mut |_, _| {},
        )
        .unwrap();
    assert_ne!(a.latents.into_data(), c.latents.into_data());
    let err = sd.sample(
        &["a cat"],
        &alignprop_pipeline::SampleOptions { height: 60, ..opts },
        &mut |_, _| {},
    );
    assert!(err.is_err());
}
