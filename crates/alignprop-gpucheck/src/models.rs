//! Every model and the AlignProp gradient on the backend under test, against the PyTorch references of the
//! fixtures (`tests/fixtures/*/refs*`), float32 throughout: the same comparisons as the CPU parity tests.

use alignprop_diffusion::clip::CLIPTextModel;
use alignprop_diffusion::unet::TextTimeCond;
use alignprop_diffusion::unet::UNet2DConditionModel;
use alignprop_diffusion::vae::AutoencoderKL;
use alignprop_io::weights::SafetensorsSource;
use alignprop_lora::LoraWeights;
use alignprop_pipeline::{AddedConditioning, Conditioning, StableDiffusion, guided_noise};
use alignprop_rewards::aesthetic::AestheticScorer;
use alignprop_rewards::hps::HpsScorer;
use alignprop_rewards::pickscore::PickScorer;
use alignprop_rewards::preprocess::{CLIP_MEAN, CLIP_STD, clip_preprocess, resize_bilinear};
use alignprop_rewards::tiny::TinyReward;
use alignprop_rewards::{Reward, RewardError};
use alignprop_schedulers::{DdimScheduler, Scheduler, SchedulerConfig};
use alignprop_testing::prompt_reward::write_prompt_reward_models;
use alignprop_testing::{
    ref_int_on, ref_tensor_on, ref_values, refs, refs_sdxl, tiny_reward, tiny_sd, tiny_sdxl,
};
use alignprop_trainer::{TrajectoryInput, Truncation, trajectory};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor};

use crate::{Check, CheckResult, Report, values};

/// Forward tolerance (relative L2), as the CPU tests' float32 parity.
const TOL: f64 = 1e-4;
/// Image-gradient tolerance of the rewards: the CPU tests' float32 bound is 1e-4; on wgpu the HPSv2 / PickScore
/// image gradients measure 1.1e-4 / 1.5e-4 (the GPU's float32 `erf` / `exp` approximations and summation orders
/// through a dozen layers), while a wrong kernel shows as 1e-2 or more.
const GRAD_TOL: f64 = 3e-4;

pub fn checks<A: AutodiffBackend>() -> Vec<Check<A>> {
    vec![
        Check {
            name: "models/text_encoder",
            run: |d| text_encoder::<A::InnerBackend>(d),
        },
        Check {
            name: "models/unet",
            run: |d| unet::<A::InnerBackend>(d),
        },
        Check {
            name: "models/lora_unet",
            run: |d| lora_unet::<A::InnerBackend>(d),
        },
        Check {
            name: "models/vae",
            run: |d| vae::<A::InnerBackend>(d),
        },
        Check {
            name: "models/sample_cfg",
            run: |d| sample_cfg::<A::InnerBackend>(d),
        },
        Check {
            name: "rewards/resize",
            run: resize::<A>,
        },
        Check {
            name: "rewards/tiny",
            run: tiny::<A>,
        },
        Check {
            name: "rewards/aesthetic",
            run: aesthetic::<A>,
        },
        Check {
            name: "rewards/hps",
            run: hps::<A>,
        },
        Check {
            name: "rewards/pickscore",
            run: pickscore::<A>,
        },
        Check {
            name: "gradient/full_chain",
            run: |d| alignprop_gradient::<A>(d, Truncation::Full, "grad_full_f32"),
        },
        Check {
            name: "gradient/k1",
            run: |d| alignprop_gradient::<A>(d, Truncation::Fixed { k: 1 }, "grad_k1_f32"),
        },
        Check {
            name: "models/sdxl",
            run: |d| sdxl::<A::InnerBackend>(d),
        },
        Check {
            name: "gradient/sdxl_k1",
            run: |d| sdxl_gradient::<A>(d, Truncation::Fixed { k: 1 }, "grad_k1_f32"),
        },
    ]
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn text_encoder<B: Backend>(d: &B::Device) -> CheckResult {
    let model =
        CLIPTextModel::<B>::load(tiny_sd().join("text_encoder"), d, DType::F32).map_err(err)?;
    let r = refs("text_encoder.safetensors");
    let out = model.forward_hidden_states(ref_int_on(&r, "input_ids", d));
    let mut rep = Report::new();
    rep.compare(
        "last_hidden_state",
        out.last_hidden_state,
        ref_tensor_on::<B, 3>(&r, "last_hidden_state", d, DType::F32),
        TOL,
    );
    rep.compare(
        "pooler_output",
        out.pooler_output,
        ref_tensor_on::<B, 2>(&r, "pooler_output", d, DType::F32),
        TOL,
    );
    rep.finish()
}

/// `sample` [2,4,16,24], `timesteps`, `encoder_hidden_states` [2,77,32] of a UNet reference file.
fn unet_out<B: Backend>(
    unet: &UNet2DConditionModel<B>,
    r: &SafetensorsSource,
    d: &B::Device,
) -> Tensor<B, 4> {
    unet.forward(
        ref_tensor_on(r, "sample", d, DType::F32),
        ref_int_on::<B, 1>(r, "timesteps", d).float(),
        ref_tensor_on(r, "encoder_hidden_states", d, DType::F32),
    )
}

fn unet<B: Backend>(d: &B::Device) -> CheckResult {
    let model =
        UNet2DConditionModel::<B>::load(&tiny_sd().join("unet"), d, DType::F32).map_err(err)?;
    let r = refs("unet.safetensors");
    let mut rep = Report::new();
    rep.compare(
        "out",
        unet_out(&model, &r, d),
        ref_tensor_on::<B, 4>(&r, "out", d, DType::F32),
        TOL,
    );
    rep.finish()
}

fn lora_unet<B: Backend>(d: &B::Device) -> CheckResult {
    let mut model =
        UNet2DConditionModel::<B>::load(&tiny_sd().join("unet"), d, DType::F32).map_err(err)?;
    let lora = LoraWeights::read(tiny_sd().join("lora_peft/pytorch_lora_weights.safetensors"))
        .map_err(err)?;
    alignprop_lora::apply(&mut model, &lora, 1.0, true).map_err(err)?;
    let r = refs("lora_unet.safetensors");
    let mut rep = Report::new();
    rep.compare(
        "out",
        unet_out(&model, &r, d),
        ref_tensor_on::<B, 4>(&r, "out", d, DType::F32),
        TOL,
    );
    rep.finish()
}

fn vae<B: Backend>(d: &B::Device) -> CheckResult {
    let vae = AutoencoderKL::<B>::load(&tiny_sd().join("vae"), d, DType::F32).map_err(err)?;
    let r = refs("vae.safetensors");
    let t = |key: &str| ref_tensor_on::<B, 4>(&r, key, d, DType::F32);
    let mut rep = Report::new();
    rep.compare("decode", vae.decode(t("decoder_input")), t("decoded"), TOL);
    let dist = vae.encode(t("image"));
    rep.compare("encode mean", dist.mean, t("encode_mean"), TOL);
    rep.compare("encode logvar", dist.logvar, t("encode_logvar"), TOL);
    rep.finish()
}

/// The 4-step DDIM run with CFG 7.5 and eta 1 (given noise) against diffusers' pipeline: every step's guided noise
/// and latents, the final latents and the decoded image.
fn sample_cfg<B: Backend>(d: &B::Device) -> CheckResult {
    let sd = StableDiffusion::<B>::load(&tiny_sd(), d, DType::F32).map_err(err)?;
    let r = refs("sample.safetensors");
    let t = |key: &str| ref_tensor_on::<B, 4>(&r, key, d, DType::F32);
    let mut rep = Report::new();
    let text = sd
        .conditioning(&["cat", "a photo of a golden retriever"], "")
        .map_err(err)?;
    rep.compare(
        "cond embeds",
        text.cond.clone(),
        ref_tensor_on::<B, 3>(&r, "cond_embeds", d, DType::F32),
        TOL,
    );
    let sched = DdimScheduler::new(&sd.scheduler_config, 4)
        .map_err(err)?
        .with_eta(1.0)
        .map_err(err)?;
    let mut x = t("x_T");
    for i in 0..4 {
        let ts = sched.timesteps()[i] as f64;
        let eps = guided_noise(&sd.unet, x.clone(), ts, &text, 7.5);
        rep.compare(
            &format!("step{i} eps"),
            eps.clone(),
            t(&format!("step{i}.eps_guided")),
            TOL,
        );
        x = sched
            .step(eps, i, x, Some(t(&format!("variance_noise.{i}"))))
            .prev_sample;
    }
    rep.compare("final latents", x.clone(), t("final_latents"), TOL);
    rep.compare("image", sd.vae.decode_scaled(x), t("image"), TOL);
    rep.finish()
}

/// The differentiable bilinear resize (two matmuls) in value and gradient against torch.
fn resize<A: AutodiffBackend>(d: &A::Device) -> CheckResult {
    let r = refs("resize.safetensors");
    let mut rep = Report::new();
    for size in [32usize, 40] {
        let x = ref_tensor_on::<A, 4>(&r, "input", d, DType::F32).require_grad();
        let y = resize_bilinear(x.clone(), [size, size]);
        rep.compare(
            &format!("bilinear {size}"),
            y.clone().inner(),
            ref_tensor_on::<A::InnerBackend, 4>(
                &r,
                &format!("bilinear_{size}_antialias0"),
                d,
                DType::F32,
            ),
            1e-5,
        );
        // The gradient of sum(y * w) for fixed w is the transposed interpolation applied to w: compare with the
        // CPU backend's (its resize is checked against torch by the CPU tests).
        let g = x
            .grad(&(y.clone() * y).sum().backward())
            .ok_or("no gradient")?;
        type RA = burn::backend::Autodiff<burn::backend::Flex>;
        let xr =
            ref_tensor_on::<RA, 4>(&r, "input", &Default::default(), DType::F64).require_grad();
        let yr = resize_bilinear(xr.clone(), [size, size]);
        let gr = xr
            .grad(&(yr.clone() * yr).sum().backward())
            .ok_or("no gradient")?;
        rep.compare(&format!("d/dx bilinear {size}"), g, gr, 1e-5);
    }
    rep.finish()
}

fn tiny<A: AutodiffBackend>(d: &A::Device) -> CheckResult {
    let reward = TinyReward::<A>::load(&tiny_sd().join("reward"), d, DType::F32).map_err(err)?;
    let r = refs("alignprop_grad.safetensors");
    let image = ref_tensor_on::<A, 4>(&r, "image_f64", d, DType::F32);
    let mut rep = Report::new();
    rep.compare(
        "preprocess",
        clip_preprocess(image.clone(), 32, CLIP_MEAN, CLIP_STD).inner(),
        ref_tensor_on::<A::InnerBackend, 4>(&r, "reward_preprocessed_f64", d, DType::F32),
        1e-5,
    );
    rep.compare(
        "score",
        reward.score(image).inner(),
        ref_tensor_on::<A::InnerBackend, 1>(&r, "reward_f64", d, DType::F32),
        1e-5,
    );
    rep.finish()
}

/// Score and d score / d image of a reward against its references (`image`, `<score_key>`, `<grad_key>`); a reward
/// error is a failure.
fn score_and_gradient<A: AutodiffBackend>(
    rep: &mut Report,
    r: &SafetensorsSource,
    d: &A::Device,
    score: impl Fn(Tensor<A, 4>) -> Result<Tensor<A, 1>, RewardError>,
    expected_scores: &[f64],
    grad_key: &str,
) {
    let image = ref_tensor_on::<A, 4>(r, "image", d, DType::F32).require_grad();
    let s = match score(image.clone()) {
        Ok(s) => s,
        Err(e) => return rep.fail(e.to_string()),
    };
    rep.compare_values("score", &values(s.clone().inner()), expected_scores, TOL);
    match image.grad(&s.sum().backward()) {
        Some(g) => rep.compare(
            "d score/d image",
            g,
            ref_tensor_on::<A::InnerBackend, 4>(r, grad_key, d, DType::F32),
            GRAD_TOL,
        ),
        None => rep.fail("no image gradient"),
    }
}

fn aesthetic<A: AutodiffBackend>(d: &A::Device) -> CheckResult {
    let dir = tiny_reward();
    let scorer = AestheticScorer::<A>::load(
        &dir.join("clip_vision"),
        &dir.join("aesthetic/mlp.safetensors"),
        d,
        DType::F32,
    )
    .map_err(err)?;
    let r = SafetensorsSource::open(&[dir.join("refs.safetensors")]).map_err(err)?;
    let mut rep = Report::new();
    let expected = ref_values(&r, "score");
    score_and_gradient::<A>(
        &mut rep,
        &r,
        d,
        |x| Ok(scorer.score(x)),
        &expected,
        "grad_image",
    );
    rep.finish()
}

/// The tiny HPSv2 / PickScore models written out in their standard layouts (a scratch folder).
fn prompt_models() -> Result<
    (
        alignprop_testing::prompt_reward::PromptRewardModels,
        std::path::PathBuf,
    ),
    String,
> {
    let dir =
        std::env::temp_dir().join(format!("alignprop-gpucheck-prompt-{}", std::process::id()));
    Ok((write_prompt_reward_models(&dir).map_err(err)?, dir))
}

fn prompt_refs() -> Result<(SafetensorsSource, Vec<String>), String> {
    let r = SafetensorsSource::open(&[
        alignprop_testing::prompt_reward::tiny_prompt_reward().join("refs.safetensors")
    ])
    .map_err(err)?;
    let prompts: Vec<String> = serde_json::from_str(&r.metadata()["prompts"]).map_err(err)?;
    Ok((r, prompts[..2].to_vec()))
}

/// A prompt reward (HPSv2 or PickScore, the tiny fixture models) loaded by `load`: score and image gradient of
/// each image with its own prompt (the diagonal of the reference image x prompt score matrix `scores_key`).
fn prompt_reward<A: AutodiffBackend, R: Reward<A>>(
    load: impl FnOnce(&alignprop_testing::prompt_reward::PromptRewardModels) -> Result<R, String>,
    d: &A::Device,
    scores_key: &str,
    grad_key: &str,
) -> CheckResult {
    let (m, dir) = prompt_models()?;
    let scorer = load(&m);
    std::fs::remove_dir_all(&dir).ok();
    let scorer = scorer?;
    let (r, p) = prompt_refs()?;
    let m = ref_values(&r, scores_key);
    let mut rep = Report::new();
    let score = |x| scorer.score_with_prompts(x, &p);
    score_and_gradient::<A>(&mut rep, &r, d, score, &[m[0], m[3]], grad_key);
    rep.finish()
}

fn hps<A: AutodiffBackend>(d: &A::Device) -> CheckResult {
    let load = |m: &alignprop_testing::prompt_reward::PromptRewardModels| {
        HpsScorer::<A>::load(
            &m.hps_weights,
            Some(&m.hps_config),
            &m.tokenizer,
            d,
            DType::F32,
        )
        .map_err(err)
    };
    prompt_reward::<A, _>(load, d, "hps_scores", "hps_grad_image")
}

fn pickscore<A: AutodiffBackend>(d: &A::Device) -> CheckResult {
    let load = |m: &alignprop_testing::prompt_reward::PromptRewardModels| {
        PickScorer::<A>::load(&m.pickscore, None, &m.tokenizer, d, DType::F32).map_err(err)
    };
    prompt_reward::<A, _>(load, d, "pick_scores", "pick_grad_image")
}

/// The decisive check: the LoRA gradient of our checkpointed backward through the 4-step CFG chain, VAE and tiny
/// reward against PyTorch autograd's (`refs/alignprop_grad.safetensors`, float32), for the whole concatenated
/// gradient vector.
fn alignprop_gradient<A: AutodiffBackend>(
    d: &A::Device,
    truncation: Truncation,
    prefix: &str,
) -> CheckResult {
    let r = refs("alignprop_grad.safetensors");
    let text = Conditioning::new(
        ref_tensor_on(&r, "uncond_embeds", d, DType::F32),
        ref_tensor_on(&r, "cond_embeds", d, DType::F32),
    );
    let fixture = GradFixture {
        root: tiny_sd(),
        lora: "lora_peft/pytorch_lora_weights.safetensors",
        guidance: 7.5,
        n_tensors: 256,
    };
    fixture_gradient::<A>(d, &fixture, &r, text, truncation, prefix)
}

/// A fixture's AlignProp gradient setup (README (f) of each fixture): its UNet with the LoRA file `lora`, its VAE
/// and scheduler (DDIM 4 steps, eta 1 with the stored noise), tiny-sd's reward, CFG `guidance`.
struct GradFixture {
    root: std::path::PathBuf,
    lora: &'static str,
    guidance: f64,
    /// The number of LoRA tensors (one gradient each).
    n_tensors: usize,
}

/// The trainer's checkpointed chain on the backend under test against the float32 references `r` (`x_T`,
/// `variance_noise.*`, `final_latents_f32`, `J_f32`, `<prefix>.unet.<key>`).
fn fixture_gradient<A: AutodiffBackend>(
    d: &A::Device,
    f: &GradFixture,
    r: &SafetensorsSource,
    text: Conditioning<A::InnerBackend>,
    truncation: Truncation,
    prefix: &str,
) -> CheckResult {
    let dtype = DType::F32;
    let mut unet = UNet2DConditionModel::<A>::load(&f.root.join("unet"), d, dtype).map_err(err)?;
    let lora = LoraWeights::read(f.root.join(f.lora)).map_err(err)?;
    alignprop_lora::apply(&mut unet, &lora, 1.0, true).map_err(err)?;
    let vae = AutoencoderKL::<A>::load(&f.root.join("vae"), d, dtype).map_err(err)?;
    let reward = TinyReward::<A>::load(&tiny_sd().join("reward"), d, dtype).map_err(err)?;
    let cfg =
        SchedulerConfig::from_file(&f.root.join("scheduler/scheduler_config.json")).map_err(err)?;
    let scheduler = DdimScheduler::new(&cfg, 4)
        .map_err(err)?
        .with_eta(1.0)
        .map_err(err)?;
    let noises: Vec<_> = (0..4)
        .map(|i| Some(ref_tensor_on(r, &format!("variance_noise.{i}"), d, dtype)))
        .collect();
    let mut rng = alignprop_pipeline::NoiseRng::new(0);
    let grad_steps = truncation.grad_steps(4, &mut rng);
    let out = trajectory(TrajectoryInput {
        unet: &unet,
        vae: &vae,
        scheduler: &scheduler,
        text: &text,
        guidance: f.guidance,
        x_t: ref_tensor_on(r, "x_T", d, dtype),
        noises: &noises,
        grad_steps: &grad_steps,
        loss_fn: |img| {
            let scores = reward.score(img);
            Ok((scores.clone().mean(), scores))
        },
    })
    .map_err(err)?;
    let mut rep = Report::new();
    rep.compare_values(
        "final latents",
        &values(out.final_latents.clone()),
        &ref_values(r, "final_latents_f32"),
        TOL,
    );
    rep.compare_values("J", &[out.loss], &ref_values(r, "J_f32"), TOL);
    if out.grads.tensors.len() != f.n_tensors {
        rep.fail(format!(
            "{} LoRA gradients, expected {}",
            out.grads.tensors.len(),
            f.n_tensors
        ));
    }
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for (key, g) in &out.grads.tensors {
        ours.extend(values(g.clone()));
        theirs.extend(ref_values(r, &format!("{prefix}.unet.{key}")));
    }
    rep.compare_values("LoRA gradient", &ours, &theirs, 1e-3);
    rep.finish()
}

/// SDXL on the backend under test (tiny-sdxl, its README (a), (b), (d)): both text encoders and the pooled
/// projection through `conditioning_sized`, and the UNet with the `text_time` embedding (pooled text + time ids).
/// The sampling loop runs in `gradient/sdxl_k1` (same loop as SD1.5's `models/sample_cfg`, one wgpu minute less).
fn sdxl<B: Backend>(d: &B::Device) -> CheckResult {
    let sd = StableDiffusion::<B>::load(&tiny_sdxl(), d, DType::F32).map_err(err)?;
    let r = refs_sdxl("sample.safetensors");
    let mut rep = Report::new();
    let text = sd
        .conditioning_sized(&["cat", "a photo of a golden retriever"], "", [64, 64])
        .map_err(err)?;
    rep.compare(
        "prompt_embeds",
        text.cond.clone(),
        ref_tensor_on::<B, 3>(&r, "prompt_embeds", d, DType::F32),
        TOL,
    );
    let added = text
        .added
        .clone()
        .ok_or("SDXL conditioning without pooled embeddings")?;
    rep.compare(
        "pooled_prompt_embeds",
        added.cond.text_embeds,
        ref_tensor_on::<B, 2>(&r, "pooled_prompt_embeds", d, DType::F32),
        TOL,
    );
    let u = refs_sdxl("unet.safetensors");
    let out = sd.unet.forward_added(
        ref_tensor_on(&u, "sample", d, DType::F32),
        ref_int_on::<B, 1>(&u, "timesteps", d).float(),
        ref_tensor_on(&u, "encoder_hidden_states", d, DType::F32),
        Some(&TextTimeCond {
            text_embeds: ref_tensor_on(&u, "text_embeds", d, DType::F32),
            time_ids: ref_tensor_on(&u, "time_ids", d, DType::F32),
        }),
    );
    rep.compare(
        "unet out",
        out,
        ref_tensor_on::<B, 4>(&u, "out", d, DType::F32),
        TOL,
    );
    rep.finish()
}

/// The AlignProp LoRA gradient of tiny-sdxl's 4-step chain (README (f): 272 LoRA tensors, CFG 5, pooled text and
/// time ids, zeros for the negative prompt) on the backend under test.
fn sdxl_gradient<A: AutodiffBackend>(
    d: &A::Device,
    truncation: Truncation,
    prefix: &str,
) -> CheckResult {
    let r = refs_sdxl("alignprop_grad.safetensors");
    let t2 = |k: &str| ref_tensor_on::<A::InnerBackend, 2>(&r, k, d, DType::F32);
    let t3 = |k: &str| ref_tensor_on::<A::InnerBackend, 3>(&r, k, d, DType::F32);
    let text = Conditioning {
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
    };
    let fixture = GradFixture {
        root: tiny_sdxl(),
        lora: "lora/pytorch_lora_weights.safetensors",
        guidance: 5.0,
        n_tensors: 272,
    };
    fixture_gradient::<A>(d, &fixture, &r, text, truncation, prefix)
}
