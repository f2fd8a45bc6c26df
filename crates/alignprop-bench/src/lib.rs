//! Benchmark workloads of the AlignProp stack and a small runner for them.
//!
//! Every workload of `xtask/bench/WORKLOADS.md` is built here by name ([`prepare`]) as a closure that runs one
//! iteration; [`measure`] times it (warm-up, then the median of timed runs, each followed by a device sync) and
//! [`peak_rss_mib`] reads the process's peak resident memory. The `alignprop-bench` binary runs one workload per
//! process (so each peak memory is its own) and prints one JSON line; `cargo xtask bench` drives it beside the
//! PyTorch script `xtask/bench/bench_torch.py`, and `cargo bench -p alignprop-bench` runs the op and model
//! workloads under criterion.
//!
//! Inputs are made before timing, with values from a seeded generator (values do not matter for timing). A
//! forward+backward workload times the forward and the backward of `sum(out * g)` for a fixed random `g`.

pub mod parallel;
pub mod peak;
pub mod plot;

use std::path::PathBuf;
use std::time::Instant;

use alignprop_diffusion::clip::{CLIPTextConfig, CLIPTextModel};
use alignprop_diffusion::nn::{
    Conv2d, GroupNorm, LayerNorm, Linear, scaled_dot_product_attention, softmax,
};
use alignprop_diffusion::unet::{OneOrMany, UNet2DConditionConfig, UNet2DConditionModel};
use alignprop_diffusion::vae::{AutoencoderKL, AutoencoderKLConfig};
use alignprop_io::VarBuilder;
use alignprop_io::pipeline_files::read_json;
use alignprop_pipeline::{Conditioning, NoiseRng};
use alignprop_rewards::tiny::{TinyReward, TinyRewardConfig};
use alignprop_schedulers::{DdimScheduler, Scheduler, SchedulerConfig};
use alignprop_trainer::{
    AdamW, AdamWConfig, TrajectoryInput, Truncation, trajectory, trajectory_full_graph,
};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Distribution, ElementConversion, Int, Tensor};

/// One iteration of a workload.
pub type Workload = Box<dyn FnMut()>;

/// The op workloads (SD1.5 first-level shapes at 256x256).
pub const OPS: &[&str] = &[
    "op/conv3x3_fwd",
    "op/conv3x3_fwdbwd",
    "op/attn_scores_softmax",
    "op/attention_fwd",
    "op/attention_fwdbwd",
    "op/linear_fwd",
    "op/linear_fwdbwd",
    "op/groupnorm_fwd",
    "op/groupnorm_fwdbwd",
    "op/layernorm_fwd",
];

/// The model workloads (random weights, diffusers configs).
pub const MODELS: &[&str] = &[
    "unet/tiny_fwd",
    "unet/mid_fwd",
    "unet/mid_fwdbwd",
    "vae/decode_256",
    "clip/text_encode",
    "ddim/step",
];

/// The AlignProp training steps on the mid config (20 DDIM steps, CFG 7.5, tiny reward).
pub const STEPS: &[&str] = &["step/k1", "step/kall"];

/// The scaling sweeps: step time and memory against K (checkpointed or not) and against the latent size.
pub const SCALING: &[&str] = &[
    "scale/k1",
    "scale/k2",
    "scale/k4",
    "scale/k8",
    "scale/k20",
    "scale/k1_nockpt",
    "scale/k2_nockpt",
    "scale/k4_nockpt",
    "scale/k8_nockpt",
    "scale/k20_nockpt",
    "scale/s16_k1",
    "scale/s32_k1",
    "scale/s64_k1",
];

/// Full-size SD1.5 (its UNet, VAE and 77-token text states with random weights) at 512x512: one AlignProp step
/// of 50 DDIM steps with CFG 7.5, K = 1 or all 50 kept, float32 or bfloat16 base. For GPUs (`cargo xtask
/// gpu-check`); not in [`names`] (a CPU would take hours).
pub const GPU: &[&str] = &[
    "gpu/sd15_512_k1_f32",
    "gpu/sd15_512_k50_f32",
    "gpu/sd15_512_k1_bf16",
    "gpu/sd15_512_k50_bf16",
];

/// Every workload name, in table order.
pub fn names() -> Vec<&'static str> {
    [OPS, MODELS, STEPS, SCALING, parallel::PARALLEL].concat()
}

/// Workloads of well under a millisecond: 1000 timed runs (0.1-0.5 s in all), so that their median is not one
/// moment of a shared host (20 runs of 0.1 ms moved their median up to 2x between runs). `bench_torch.py` has
/// the same list.
pub const FAST_OPS: [&str; 4] = [
    "op/groupnorm_fwd",
    "op/groupnorm_fwdbwd",
    "op/layernorm_fwd",
    "ddim/step",
];

/// Default `(warmup, iters)` for a workload: cheap ops are repeated more than training steps.
pub fn default_iters(name: &str) -> (usize, usize) {
    if FAST_OPS.contains(&name) {
        (10, 1000)
    } else if name.starts_with("op/") {
        (3, 20)
    } else if name.starts_with("gpu/") {
        (1, 2)
    } else if name.starts_with("step/")
        || name.starts_with("scale/")
        || name.starts_with("parallel/")
    {
        (1, 3)
    } else {
        (2, 5)
    }
}

/// Timing of one workload, in milliseconds.
#[derive(Clone, Debug)]
pub struct Timing {
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub iters: usize,
}

/// Runs `f` `warmup` times untimed, then `iters` times timed; `sync` is called after every run (device sync).
pub fn measure(f: &mut dyn FnMut(), sync: &dyn Fn(), warmup: usize, iters: usize) -> Timing {
    for _ in 0..warmup {
        f();
        sync();
    }
    let mut ms: Vec<f64> = (0..iters.max(1))
        .map(|_| {
            let t0 = Instant::now();
            f();
            sync();
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    let n = ms.len();
    let median = if n % 2 == 1 {
        ms[n / 2]
    } else {
        0.5 * (ms[n / 2 - 1] + ms[n / 2])
    };
    Timing {
        median_ms: median,
        min_ms: ms[0],
        max_ms: ms[n - 1],
        iters: n,
    }
}

/// Peak resident set size of this process in MiB (`VmHWM` of `/proc/self/status`; `None` where there is none).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The repository's tiny fixture model.
pub fn tiny_sd() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-sd")
}

/// The "mid" SD1.5-topology UNet of the benchmarks: block_out_channels 64/128/256/256, 32 groups, 8 heads,
/// cross-attention 768, sample size 32; everything else SD1.5's.
pub fn mid_unet_config() -> UNet2DConditionConfig {
    UNet2DConditionConfig {
        block_out_channels: vec![64, 128, 256, 256],
        sample_size: OneOrMany::One(32),
        ..Default::default()
    }
}

/// The "mid" VAE of the benchmarks: SD1.5's AutoencoderKL with block_out_channels 32/64/128/128.
pub fn mid_vae_config() -> AutoencoderKLConfig {
    AutoencoderKLConfig {
        block_out_channels: vec![32, 64, 128, 128],
        sample_size: 256,
        ..Default::default()
    }
}

fn first(v: &OneOrMany<usize>) -> usize {
    match v {
        OneOrMany::One(x) => *x,
        OneOrMany::Many(xs) => xs[0],
    }
}

fn randn<B: Backend, const D: usize>(shape: [usize; D], device: &B::Device) -> Tensor<B, D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
}

fn trainable<B: Backend, const D: usize>(shape: [usize; D], device: &B::Device) -> Tensor<B, D> {
    randn::<B, D>(shape, device).require_grad()
}

/// The vector-Jacobian product with a fixed cotangent `g` (torch's `out.backward(g)`), as the trainer runs it:
/// `alignprop_kernels::vjp_scalar`.
fn vjp<A: AutodiffBackend, const D: usize>(out: Tensor<A, D>, g: &Tensor<A, D>) {
    let grads = alignprop_kernels::vjp_scalar(out, g.clone()).backward();
    drop(grads);
}

/// Builds workload `name` on `device` (`A` with autodiff; forward-only workloads run on its inner backend).
pub fn prepare<A: AutodiffBackend>(name: &str, device: &A::Device) -> Result<Workload, String> {
    type I<A> = <A as AutodiffBackend>::InnerBackend;
    let d = device.clone();
    let rand_vb = || VarBuilder::<I<A>>::random(&d, DType::F32);
    let rand_vb_ad = || VarBuilder::<A>::random(&d, DType::F32);
    let w: Workload = match name {
        "op/conv3x3_fwd" => {
            let conv = Conv2d::new(&rand_vb(), 320, 320, 3, 1, 1).map_err(|e| e.to_string())?;
            let x = randn::<I<A>, 4>([2, 320, 32, 32], &d);
            Box::new(move || drop(conv.forward(x.clone())))
        }
        "op/conv3x3_fwdbwd" => {
            let mut conv =
                Conv2d::new(&rand_vb_ad(), 320, 320, 3, 1, 1).map_err(|e| e.to_string())?;
            conv.weight = conv.weight.set_require_grad(true);
            conv.bias = conv.bias.map(|b| b.set_require_grad(true));
            let x = trainable::<A, 4>([2, 320, 32, 32], &d);
            let g = randn::<A, 4>([2, 320, 32, 32], &d);
            Box::new(move || vjp(conv.forward(x.clone()), &g))
        }
        "op/attn_scores_softmax" => {
            let q = randn::<I<A>, 3>([16, 1024, 40], &d);
            let k = randn::<I<A>, 3>([16, 1024, 40], &d);
            let scale = 40f64.powf(-0.5);
            Box::new(move || {
                // The one product here is burn's own matmul: counted by hand.
                alignprop_kernels::flops::add(
                    alignprop_kernels::flops::matmul(16 * 1024, 1024, 40),
                    0,
                );
                drop(softmax(q.clone().matmul(k.clone().swap_dims(1, 2)) * scale))
            })
        }
        "op/attention_fwd" => {
            let [q, k, v] = [0; 3].map(|_| randn::<I<A>, 3>([16, 1024, 40], &d));
            Box::new(move || {
                drop(scaled_dot_product_attention(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    false,
                ))
            })
        }
        "op/attention_fwdbwd" => {
            let [q, k, v] = [0; 3].map(|_| trainable::<A, 3>([16, 1024, 40], &d));
            let g = randn::<A, 3>([16, 1024, 40], &d);
            Box::new(move || {
                vjp(
                    scaled_dot_product_attention(q.clone(), k.clone(), v.clone(), false),
                    &g,
                )
            })
        }
        "op/linear_fwd" => {
            let lin = Linear::new(&rand_vb(), 320, 1280, true).map_err(|e| e.to_string())?;
            let x = randn::<I<A>, 2>([2048, 320], &d);
            Box::new(move || drop(lin.forward(x.clone())))
        }
        "op/linear_fwdbwd" => {
            let mut lin = Linear::new(&rand_vb_ad(), 320, 1280, true).map_err(|e| e.to_string())?;
            lin.weight = lin.weight.set_require_grad(true);
            lin.bias = lin.bias.map(|b| b.set_require_grad(true));
            let x = trainable::<A, 2>([2048, 320], &d);
            let g = randn::<A, 2>([2048, 1280], &d);
            Box::new(move || vjp(lin.forward(x.clone()), &g))
        }
        "op/groupnorm_fwd" => {
            let gn = GroupNorm::new(&rand_vb(), 32, 320, 1e-5).map_err(|e| e.to_string())?;
            let x = randn::<I<A>, 4>([2, 320, 32, 32], &d);
            Box::new(move || drop(gn.forward(x.clone())))
        }
        "op/groupnorm_fwdbwd" => {
            let mut gn = GroupNorm::new(&rand_vb_ad(), 32, 320, 1e-5).map_err(|e| e.to_string())?;
            gn.weight = gn.weight.set_require_grad(true);
            gn.bias = gn.bias.set_require_grad(true);
            let x = trainable::<A, 4>([2, 320, 32, 32], &d);
            let g = randn::<A, 4>([2, 320, 32, 32], &d);
            Box::new(move || vjp(gn.forward(x.clone()), &g))
        }
        "op/layernorm_fwd" => {
            let ln = LayerNorm::new(&rand_vb(), 320, 1e-5).map_err(|e| e.to_string())?;
            let x = randn::<I<A>, 3>([2, 1024, 320], &d);
            Box::new(move || drop(ln.forward(x.clone())))
        }
        "unet/tiny_fwd" => {
            let folder = tiny_sd().join("unet");
            let cfg: UNet2DConditionConfig =
                read_json(&folder.join("config.json")).map_err(|e| e.to_string())?;
            let unet = UNet2DConditionModel::<I<A>>::load(&folder, &d, DType::F32)
                .map_err(|e| e.to_string())?;
            let (s, ctx) = (first(&cfg.sample_size), first(&cfg.cross_attention_dim));
            let x = randn::<I<A>, 4>([2, 4, s, s], &d);
            let text = randn::<I<A>, 3>([2, 77, ctx], &d);
            Box::new(move || drop(unet.forward_with_timestep(x.clone(), 500.0, text.clone())))
        }
        "unet/mid_fwd" => {
            let unet = UNet2DConditionModel::new(&mid_unet_config(), &rand_vb())
                .map_err(|e| e.to_string())?;
            let x = randn::<I<A>, 4>([2, 4, 32, 32], &d);
            let text = randn::<I<A>, 3>([2, 77, 768], &d);
            Box::new(move || drop(unet.forward_with_timestep(x.clone(), 500.0, text.clone())))
        }
        "unet/mid_fwdbwd" => {
            let mut unet = UNet2DConditionModel::new(&mid_unet_config(), &rand_vb_ad())
                .map_err(|e| e.to_string())?;
            alignprop_lora::inject_seeded(&mut unet, &Default::default(), 1)
                .map_err(|e| e.to_string())?;
            let x = randn::<A, 4>([2, 4, 32, 32], &d);
            let text = randn::<A, 3>([2, 77, 768], &d);
            let g = randn::<A, 4>([2, 4, 32, 32], &d);
            Box::new(move || {
                vjp(
                    unet.forward_with_timestep(x.clone(), 500.0, text.clone()),
                    &g,
                )
            })
        }
        "vae/decode_256" => {
            let vae = AutoencoderKL::<I<A>>::new(&AutoencoderKLConfig::default(), &rand_vb())
                .map_err(|e| e.to_string())?;
            let z = randn::<I<A>, 4>([1, 4, 32, 32], &d);
            Box::new(move || drop(vae.decode_scaled(z.clone())))
        }
        "clip/text_encode" => {
            let clip = CLIPTextModel::<I<A>>::new(&CLIPTextConfig::default(), &rand_vb())
                .map_err(|e| e.to_string())?;
            let ids: Tensor<I<A>, 2, Int> =
                Tensor::random([2, 77], Distribution::Uniform(0.0, 49407.0), &d);
            Box::new(move || drop(clip.forward(ids.clone())))
        }
        "ddim/step" => {
            let sched =
                DdimScheduler::new(&SchedulerConfig::default(), 50).map_err(|e| e.to_string())?;
            let x = randn::<I<A>, 4>([2, 4, 64, 64], &d);
            let eps = randn::<I<A>, 4>([2, 4, 64, 64], &d);
            Box::new(move || drop(sched.step(eps.clone(), 0, x.clone(), None)))
        }
        "step/k1" => alignprop_step::<A>(&d, &StepSpec::mid(1, 32, true))?,
        "step/kall" => alignprop_step::<A>(&d, &StepSpec::mid(20, 32, true))?,
        other if other.starts_with("gpu/") => match parse_gpu(other) {
            Some(spec) => alignprop_step::<A>(&d, &spec)?,
            None => {
                return Err(format!(
                    "unknown workload '{other}' (known: {})",
                    GPU.join(", ")
                ));
            }
        },
        other => match parse_scale(other) {
            Some((k, s, ckpt)) => alignprop_step::<A>(&d, &StepSpec::mid(k, s, ckpt))?,
            None => {
                return Err(format!(
                    "unknown workload '{other}' (known: {})",
                    names().join(", ")
                ));
            }
        },
    };
    Ok(w)
}

/// `scale/k{K}`, `scale/k{K}_nockpt`, `scale/s{S}_k1` -> `(K, S, checkpointed)`.
fn parse_scale(name: &str) -> Option<(usize, usize, bool)> {
    let rest = name.strip_prefix("scale/")?;
    if let Some(s) = rest.strip_prefix('s') {
        let s = s.strip_suffix("_k1")?;
        return Some((1, s.parse().ok()?, true));
    }
    let k = rest.strip_prefix('k')?;
    match k.strip_suffix("_nockpt") {
        Some(k) => Some((k.parse().ok()?, 32, false)),
        None => Some((k.parse().ok()?, 32, true)),
    }
}

/// `gpu/sd15_512_k{K}_{f32|bf16}` -> its step.
fn parse_gpu(name: &str) -> Option<StepSpec> {
    let rest = name.strip_prefix("gpu/sd15_512_k")?;
    let (k, dtype) = rest.split_once('_')?;
    let dtype = match dtype {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        _ => return None,
    };
    let k: usize = k.parse().ok()?;
    (1..=50).contains(&k).then(|| StepSpec {
        unet: UNet2DConditionConfig::default(),
        vae: AutoencoderKLConfig::default(),
        steps: 50,
        k,
        latent: 64,
        checkpointed: true,
        dtype,
    })
}

/// One AlignProp step's setup: networks, chain length, kept steps, latent size, checkpointing, base dtype.
#[derive(Clone, Debug)]
pub struct StepSpec {
    pub unet: UNet2DConditionConfig,
    pub vae: AutoencoderKLConfig,
    /// DDIM steps of the chain.
    pub steps: usize,
    /// The last `k` steps carry gradient.
    pub k: usize,
    /// Latent side (image side / 8).
    pub latent: usize,
    pub checkpointed: bool,
    /// Frozen networks' dtype (LoRA adapters and optimizer in f32).
    pub dtype: DType,
}

impl StepSpec {
    /// The mid UNet + mid VAE, 20 steps, float32 (the CPU benchmark steps).
    pub fn mid(k: usize, latent: usize, checkpointed: bool) -> Self {
        Self {
            unet: mid_unet_config(),
            vae: mid_vae_config(),
            steps: 20,
            k,
            latent,
            checkpointed,
            dtype: DType::F32,
        }
    }
}

/// One AlignProp training step (the mid UNet + mid VAE by default, full SD1.5 for `gpu/*`) + tiny reward:
/// `spec.steps` DDIM steps (eta 0, CFG 7.5) from a `[1, 4, s, s]` latent, gradient through the last `k` steps
/// (checkpointed per step or the whole graph kept), loss `-reward`, one AdamW step on the LoRA adapters.
fn alignprop_step<A: AutodiffBackend>(d: &A::Device, spec: &StepSpec) -> Result<Workload, String> {
    let (k, s, checkpointed, dtype) = (spec.k, spec.latent, spec.checkpointed, spec.dtype);
    let err = |e: alignprop_io::weights::WeightError| e.to_string();
    let vb = VarBuilder::<A>::random(d, dtype);
    let mut unet = UNet2DConditionModel::new(&spec.unet, &vb).map_err(err)?;
    alignprop_lora::inject_seeded(&mut unet, &Default::default(), 1).map_err(|e| e.to_string())?;
    let vae = AutoencoderKL::<A>::new(&spec.vae, &vb).map_err(err)?;
    let reward = TinyReward::<A>::new(&TinyRewardConfig::default(), &vb).map_err(err)?;
    let n = spec.steps;
    let scheduler =
        DdimScheduler::new(&SchedulerConfig::default(), n).map_err(|e| e.to_string())?;
    let mut rng = NoiseRng::new(7);
    let cross = first(&spec.unet.cross_attention_dim);
    let text = Conditioning::new(
        rng.normal_tensor([1, 77, cross], d, dtype),
        rng.normal_tensor([1, 77, cross], d, dtype),
    );
    let x_t: Tensor<A::InnerBackend, 4> = rng.normal_tensor([1, 4, s, s], d, dtype);
    let steps = Truncation::Fixed { k }.grad_steps(n, &mut rng);
    let mut opt = AdamW::new(AdamWConfig::default());
    Ok(Box::new(move || {
        let loss = |img: Tensor<A, 4>| {
            let r = reward.score(img).cast(DType::F32);
            Ok((-r.clone().mean(), r))
        };
        let input = TrajectoryInput {
            unet: &unet,
            vae: &vae,
            scheduler: &scheduler,
            text: &text,
            guidance: 7.5,
            x_t: x_t.clone(),
            noises: &[],
            grad_steps: &steps,
            loss_fn: loss,
        };
        let grads = if checkpointed {
            trajectory(input).expect("trajectory").grads
        } else {
            trajectory_full_graph(input).expect("trajectory").grads
        };
        opt.step(&mut unet, grads);
    }))
}

/// The LoRA gradient of the `unet/mid_fwdbwd` workload (the "mid" UNet with fresh rank-4 adapters: up factors 0,
/// so the up factors carry the whole gradient) computed twice on one model, with the linear layers' products in f32
/// and in bf16 (`alignprop_kernels::flex_bf16`): the relative error of the whole gradient (`|g_bf16 - g_f32| /
/// |g_f32|` over all LoRA tensors), the largest per-tensor one, and the cosine of the two. One JSON object.
pub fn bf16_lora_gradient_error<A: AutodiffBackend>(
    device: &A::Device,
) -> Result<serde_json::Value, String> {
    use alignprop_kernels::flex_bf16::set_bf16_products;
    let mut unet = UNet2DConditionModel::new(
        &mid_unet_config(),
        &VarBuilder::<A>::random(device, DType::F32),
    )
    .map_err(|e| e.to_string())?;
    alignprop_lora::inject_seeded(&mut unet, &Default::default(), 1).map_err(|e| e.to_string())?;
    let x = randn::<A, 4>([2, 4, 32, 32], device);
    let text = randn::<A, 3>([2, 77, 768], device);
    let g = randn::<A, 4>([2, 4, 32, 32], device);
    let grads = |bf16: bool| {
        set_bf16_products(bf16);
        let out = unet.forward_with_timestep(x.clone(), 500.0, text.clone());
        let grads = alignprop_kernels::vjp_scalar(out, g.clone()).backward();
        set_bf16_products(false);
        alignprop_trainer::lora_params::lora_grads_from(&unet, &grads)
    };
    let (f32s, bf16s) = (grads(false), grads(true));
    let sum = |t: Tensor<A::InnerBackend, 2>| t.sum().into_scalar().elem::<f64>();
    let (mut diff2, mut norm2, mut dot, mut other2, mut worst) = (0.0, 0.0, 0.0, 0.0, 0f64);
    for (key, a) in &f32s.tensors {
        let b = bf16s
            .tensors
            .get(key)
            .ok_or(format!("{key}: no bf16 gradient"))?;
        let (d2, a2) = (
            sum((b.clone() - a.clone()).powi_scalar(2)),
            sum(a.clone().powi_scalar(2)),
        );
        diff2 += d2;
        norm2 += a2;
        dot += sum(a.clone() * b.clone());
        other2 += sum(b.clone().powi_scalar(2));
        if a2 > 0.0 {
            worst = worst.max((d2 / a2).sqrt());
        }
    }
    Ok(serde_json::json!({
        "workload": "unet/mid_fwdbwd",
        "lora_tensors": f32s.tensors.len(),
        "relative_error": (diff2 / norm2).sqrt(),
        "worst_tensor_relative_error": worst,
        "cosine": dot / (norm2.sqrt() * other2.sqrt()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_prepares_and_scale_names_parse() {
        assert_eq!(parse_scale("scale/k8_nockpt"), Some((8, 32, false)));
        assert_eq!(parse_scale("scale/s64_k1"), Some((1, 64, true)));
        assert_eq!(parse_scale("scale/k20"), Some((20, 32, true)));
        for name in GPU {
            let spec = parse_gpu(name).unwrap_or_else(|| panic!("{name}"));
            assert_eq!(
                (spec.steps, spec.latent),
                (50, 64),
                "{name}: 512x512, 50 steps"
            );
        }
        let k50 = parse_gpu("gpu/sd15_512_k50_bf16").unwrap();
        assert_eq!((k50.k, k50.dtype), (50, DType::BF16));
        assert!(
            parse_gpu("gpu/sd15_512_k51_f32").is_none()
                && parse_gpu("gpu/sd15_512_k1_f16").is_none()
        );
        assert!(
            prepare::<burn::backend::Autodiff<burn::backend::Flex>>("nope", &Default::default())
                .is_err()
        );
        let mut n = names();
        n.sort();
        n.dedup();
        assert_eq!(n.len(), names().len(), "duplicate workload names");
    }

    #[test]
    fn op_workloads_run_once() {
        type A = burn::backend::Autodiff<burn::backend::Flex>;
        let d = Default::default();
        for name in OPS.iter().chain(&["unet/tiny_fwd", "ddim/step"]) {
            let mut w = prepare::<A>(name, &d).unwrap_or_else(|e| panic!("{name}: {e}"));
            w();
        }
    }
}
