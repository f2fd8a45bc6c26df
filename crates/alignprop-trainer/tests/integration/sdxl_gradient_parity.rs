//! AlignProp's LoRA gradient through an SDXL-topology chain equals PyTorch autograd's
//! (`tests/fixtures/tiny-sdxl/refs/alignprop_grad.safetensors`, its README (f): the tiny SDXL UNet with the LoRA of
//! `lora/` on all 136 attention projections, SDXL's conditioning — the two encoders' states side by side, encoder 2's
//! pooled projection, the time ids, zeros for the negative prompt — 4 DDIM (epsilon) steps with CFG 5, eta 1 with the
//! stored noise, VAE decode with scaling factor 0.13025, tiny-sd's tiny reward; J = mean reward; every reference
//! gradient checked against finite differences there), for the full chain and for K = 1 and K = 2, in float64 and
//! float32. The conditioning is also rebuilt by `StableDiffusion::conditioning_sized` from the prompts and checked
//! against the stored one.

use crate::common;

use alignprop_diffusion::unet::TextTimeCond;
use alignprop_pipeline::{AddedConditioning, Conditioning, StableDiffusion};
use alignprop_testing::{
    assert_close, ref_tensor_on, refs_sdxl, rel_err_values, tiny_sdxl, values,
};
use burn::tensor::{DType, Tensor};
use common::{I, Setup};

/// float64 against the float64 references: 2e-8 as for SD2 (`sd2_gradient_parity.rs`). What remains is float32
/// sinusoids, which diffusers computes in float32 for every dtype, and so do we: the timestep's and here also the six
/// time ids' (`add_time_proj`); Rust's and torch's float32 sin/cos differ in last ulps (`time_proj` 2.1e-8 apart in
/// `sdxl_parity.rs`), which puts one float64 UNet call 1.8e-9 from diffusers' and CFG 5 over 4 steps multiplies.
const TOL_F64: f64 = 4e-8;
/// float32 against the `_f32` references.
const TOL_F32: f64 = 1e-4;

/// The stored conditioning: `prompt_embeds` / `negative_prompt_embeds` [2,77,24], the pooled [2,12] pair, and the
/// time ids [2,6] for both halves.
fn stored_text(r: &alignprop_io::SafetensorsSource, dtype: DType) -> Conditioning<I> {
    let d = Default::default();
    let t2 = |k: &str| ref_tensor_on::<I, 2>(r, k, &d, dtype);
    let t3 = |k: &str| ref_tensor_on::<I, 3>(r, k, &d, dtype);
    Conditioning {
        uncond: t3("negative_prompt_embeds"),
        cond: t3("prompt_embeds"),
        added: Some(AddedConditioning {
            uncond: TextTimeCond {
                text_embeds: t2("negative_pooled_prompt_embeds"),
                time_ids: t2("add_time_ids"),
            },
            cond: TextTimeCond {
                text_embeds: t2("pooled_prompt_embeds"),
                time_ids: t2("add_time_ids"),
            },
        }),
    }
}

fn setup(dtype: DType) -> Setup {
    let r = refs_sdxl("alignprop_grad.safetensors");
    common::setup(&tiny_sdxl(), &r, dtype, 5.0, stored_text)
}

/// Our prompt encoding gives the stored conditioning (the chain below starts from the stored tensors).
#[test]
fn the_pipeline_builds_the_stored_conditioning() {
    let r = refs_sdxl("alignprop_grad.safetensors");
    let m: serde_json::Value =
        alignprop_io::pipeline_files::read_json(&tiny_sdxl().join("manifest.json")).unwrap();
    let prompts: Vec<String> = serde_json::from_value(m["sample_prompts"].clone()).unwrap();
    let sd = StableDiffusion::<I>::load(tiny_sdxl(), &Default::default(), DType::F32).unwrap();
    let ours = sd.conditioning_sized(&prompts, "", [64, 64]).unwrap();
    let stored = stored_text(&r, DType::F32);
    assert_close("cond", ours.cond, stored.cond, 1e-4);
    assert_close("uncond", ours.uncond, stored.uncond, 0.0);
    let (a, b) = (ours.added.unwrap(), stored.added.unwrap());
    assert_close("pooled", a.cond.text_embeds, b.cond.text_embeds, 1e-4);
    assert_close(
        "negative pooled",
        a.uncond.text_embeds,
        b.uncond.text_embeds,
        0.0,
    );
    assert_close("time ids", a.cond.time_ids, b.cond.time_ids, 0.0);
    let _: Tensor<I, 2> = a.uncond.time_ids;
}

#[test]
fn full_k1_k2_f64() {
    let r = refs_sdxl("alignprop_grad.safetensors");
    let s = setup(DType::F64);
    for (truncation, which) in common::truncations() {
        common::check(&s, &r, DType::F64, truncation, which, 272, TOL_F64);
    }
}

#[test]
fn full_k1_k2_f32() {
    let r = refs_sdxl("alignprop_grad.safetensors");
    let s = setup(DType::F32);
    for (truncation, which) in common::truncations() {
        common::check(&s, &r, DType::F32, truncation, which, 272, TOL_F32);
    }
}

/// The trainer's checkpointed chain equals autodiff over the whole graph (`trajectory_full_graph`) with SDXL's added
/// conditioning, in float64: LoRA gradient and `dL/dx_T`, full / K = 1 / K = 2.
#[test]
fn f64_checkpointed_chain_equals_the_full_graph() {
    let s = setup(DType::F64);
    for (truncation, which) in common::truncations() {
        let mut rng = alignprop_pipeline::NoiseRng::new(0);
        let grad_steps = truncation.grad_steps(4, &mut rng);
        let ours = alignprop_trainer::trajectory(s.input(&grad_steps)).unwrap();
        let full = alignprop_trainer::trajectory_full_graph(s.input(&grad_steps)).unwrap();
        let flat = |g: &alignprop_trainer::LoraGrads<I>| -> Vec<f64> {
            g.tensors
                .iter()
                .flat_map(|(_, t)| values(t.clone()))
                .collect()
        };
        let (e_g, _) = rel_err_values(&flat(&ours.grads), &flat(&full.grads));
        let (e_x, _) = rel_err_values(&values(ours.latent_grad), &values(full.latent_grad));
        eprintln!(
            "{which} f64, checkpointed vs full graph: LoRA gradient {e_g:.3e}, dL/dx_T {e_x:.2e}"
        );
        assert!(
            e_g < 1e-12 && e_x < 1e-6,
            "{which}: gradient {e_g:.2e}, dL/dx_T {e_x:.2e}"
        );
    }
}
