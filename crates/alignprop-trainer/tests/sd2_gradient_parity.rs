//! AlignProp's LoRA gradient through an SD 2.1-topology chain with v-prediction equals PyTorch autograd's
//! (`tests/fixtures/tiny-sd2/refs/alignprop_grad.safetensors`, its README (f): the tiny SD2 UNet with the LoRA of
//! `lora/`, 4 DDIM steps with CFG 7.5, eta 1 with the stored noise, VAE decode, tiny-sd's tiny reward; J = mean
//! reward; every reference gradient checked against finite differences there), for the full chain and for K = 1 and
//! K = 2, in float64 and float32.
//!
//! The float64 references run diffusers' `DDIMScheduler.step` with its `alphas_cumprod` widened to float64, so that
//! the step scalars (`a ** 0.5`, `(1 - a) ** 0.5`, eta-1's `std_dev_t`) are float64 arithmetic as ours are (diffusers
//! keeps them in float32 even for float64 latents; `1 - a_t / a_prev` then loses digits: with them our float64 chain
//! was 5e-7 .. 6.5e-6 away). Measured, trainer's f64 chain against the references: 1.10e-8 (full), 1.22e-8 (K = 1),
//! 9.8e-9 (K = 2), final latents 8.9e-10. What remains is the UNet's float32 timestep sinusoid (diffusers computes it
//! in float32 for every dtype, and so do we): last-ulp sin/cos differences between Rust's and torch's float32
//! functions (UNet output 1.7e-9 apart in float64), which classifier-free guidance at 7.5 multiplies. The
//! checkpointed chain (`trajectory`) equals a chain built here with autodiff over the whole graph to 1.4e-14.
//!
//! The detached steps' latent-gradient shortcut (the v-prediction step Jacobian) does not enter the LoRA gradients
//! (no parameter is upstream of a detached step), and the references hold no `dL/dx_T`: it is checked against the
//! full-graph autodiff chain (`trajectory_full_graph`) for K = 1 and K = 2.

use alignprop_diffusion::unet::UNet2DConditionModel;
use alignprop_diffusion::vae::AutoencoderKL;
use alignprop_lora::LoraWeights;
use alignprop_pipeline::Conditioning;
use alignprop_pipeline::guided_noise;
use alignprop_rewards::tiny::TinyReward;
use alignprop_schedulers::{DdimScheduler, SchedulerConfig};
use alignprop_testing::{
    ref_tensor_on, ref_values, refs_sd2, rel_err_values, tiny_sd, tiny_sd2, values,
};
use alignprop_trainer::lora_params::lora_grads_from;
use alignprop_trainer::{
    TrajectoryInput, TrajectoryOutput, Truncation, trajectory, trajectory_full_graph,
};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

type I = burn::backend::Flex;
type A = Autodiff<I>;

/// float64, the trainer's checkpointed chain against autodiff over the whole graph (measured 1.6e-14).
const TOL_F64: f64 = 1e-8;
/// The trainer's float64 chain against the float64 references (measured 9.8e-9 .. 1.22e-8: the float32 timestep
/// sinusoid's last ulps, see the crate comment).
const TOL_F64_DIRECT: f64 = 2e-8;
/// float32 against the `_f32` references (measured up to 1.3e-5).
const TOL_F32: f64 = 1e-4;

struct Setup {
    unet: UNet2DConditionModel<A>,
    vae: AutoencoderKL<A>,
    reward: TinyReward<A>,
    text: Conditioning<I>,
    x_t: Tensor<I, 4>,
    noises: Vec<Option<Tensor<I, 4>>>,
    scheduler: DdimScheduler,
}

fn setup(dtype: DType) -> Setup {
    let d = Default::default();
    let r = refs_sd2("alignprop_grad.safetensors");
    let mut unet = UNet2DConditionModel::<A>::load(tiny_sd2().join("unet"), &d, dtype).unwrap();
    let lora = LoraWeights::read(tiny_sd2().join("lora/pytorch_lora_weights.safetensors")).unwrap();
    alignprop_lora::apply(&mut unet, &lora, 1.0, true).unwrap();
    let cfg =
        SchedulerConfig::from_file(&tiny_sd2().join("scheduler/scheduler_config.json")).unwrap();
    assert_eq!(cfg.prediction_type, "v_prediction");
    let scheduler = DdimScheduler::new(&cfg, 4).unwrap().with_eta(1.0).unwrap();
    let ts: Vec<f64> = scheduler.timesteps().iter().map(|&t| t as f64).collect();
    assert_eq!(ts, ref_values(&r, "timesteps"));
    Setup {
        unet,
        vae: AutoencoderKL::load(tiny_sd2().join("vae"), &d, dtype).unwrap(),
        reward: TinyReward::load(&tiny_sd().join("reward"), &d, dtype).unwrap(),
        text: Conditioning {
            uncond: ref_tensor_on(&r, "uncond_embeds", &d, dtype),
            cond: ref_tensor_on(&r, "cond_embeds", &d, dtype),
        },
        x_t: ref_tensor_on(&r, "x_T", &d, dtype),
        noises: (0..4)
            .map(|i| Some(ref_tensor_on(&r, &format!("variance_noise.{i}"), &d, dtype)))
            .collect(),
        scheduler,
    }
}

/// Our checkpointed chain with the steps `truncation` keeps.
fn run(s: &Setup, truncation: Truncation) -> TrajectoryOutput<A> {
    let mut rng = alignprop_pipeline::NoiseRng::new(0);
    let grad_steps = truncation.grad_steps(4, &mut rng);
    trajectory(TrajectoryInput {
        unet: &s.unet,
        vae: &s.vae,
        scheduler: &s.scheduler,
        text: &s.text,
        guidance: 7.5,
        x_t: s.x_t.clone(),
        noises: &s.noises,
        grad_steps: &grad_steps,
        loss_fn: |img| {
            let scores = s.reward.score(img);
            Ok((scores.clone().mean(), scores))
        },
    })
    .expect("every step's noise is given")
}

/// Runs the chain in `dtype` and compares the forward values (`_f64` / `_f32`) and the gradient under
/// `grad_{which}_{f64,f32}` with relative L2 bound `tol`, for the whole vector and for each tensor (relative to its
/// own norm, with a floor of `tol` times the whole gradient's norm). Returns the measured relative error.
fn check(dtype: DType, truncation: Truncation, which: &str, tol: f64) -> f64 {
    let suffix = if dtype == DType::F64 { "f64" } else { "f32" };
    let prefix = format!("grad_{which}_{suffix}");
    let out = run(&setup(dtype), truncation);
    let r = refs_sd2("alignprop_grad.safetensors");
    let (e_lat, _) = rel_err_values(
        &values(out.final_latents.clone()),
        &ref_values(&r, &format!("final_latents_{suffix}")),
    );
    let (e_r, _) = rel_err_values(&out.scores, &ref_values(&r, &format!("reward_{suffix}")));
    let j = ref_values(&r, &format!("J_{suffix}"))[0];
    let e_j = ((out.loss - j) / j).abs();
    eprintln!(
        "{prefix}: final latents rel {e_lat:.2e}, rewards rel {e_r:.2e}, J {} vs {j} (rel {e_j:.2e})",
        out.loss
    );
    assert!(
        e_lat < tol && e_r < tol && e_j < tol,
        "{prefix}: forward values"
    );

    assert_eq!(out.grads.tensors.len(), 176, "one gradient per LoRA tensor");
    let (mut ours, mut theirs, mut per_tensor) = (Vec::new(), Vec::new(), Vec::new());
    for (key, g) in &out.grads.tensors {
        let a = values(g.clone());
        let b = ref_values(&r, &format!("{prefix}.unet.{key}"));
        per_tensor.push((key.clone(), a.clone(), b.clone()));
        ours.extend(a);
        theirs.extend(b);
    }
    let (rel, max_abs) = rel_err_values(&ours, &theirs);
    let norm = theirs.iter().map(|x| x * x).sum::<f64>().sqrt();
    eprintln!("{prefix}: gradient rel L2 {rel:.3e} (max abs {max_abs:.2e}, |g| {norm:.3e})");
    assert!(
        rel <= tol,
        "{prefix}: gradient relative error {rel:.3e} > {tol:e}"
    );
    let mut worst = 0f64;
    for (key, a, b) in per_tensor {
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f64>()
            .sqrt();
        let scale = b.iter().map(|y| y * y).sum::<f64>().sqrt();
        worst = worst.max(diff / (scale + norm));
        assert!(
            diff <= tol * (scale + norm),
            "{prefix}.{key}: |diff| {diff:.3e} vs |g| {scale:.3e}"
        );
    }
    eprintln!("{prefix}: worst tensor |diff| / (|g_tensor| + |g|) {worst:.3e}");
    rel
}

/// The trainer's float64 chain against the float64 references, full / K = 1 / K = 2.
#[test]
fn full_k1_k2_f64() {
    let mut rng = alignprop_pipeline::NoiseRng::new(0);
    assert_eq!(
        Truncation::Fixed { k: 2 }.grad_steps(4, &mut rng),
        [false, false, true, true]
    );
    for (truncation, which) in [
        (Truncation::Full, "full"),
        (Truncation::Fixed { k: 1 }, "k1"),
        (Truncation::Fixed { k: 2 }, "k2"),
    ] {
        check(DType::F64, truncation, which, TOL_F64_DIRECT);
    }
}

#[test]
fn full_k1_k2_f32() {
    for (truncation, which) in [
        (Truncation::Full, "full"),
        (Truncation::Fixed { k: 1 }, "k1"),
        (Truncation::Fixed { k: 2 }, "k2"),
    ] {
        check(DType::F32, truncation, which, TOL_F32);
    }
}

// ------------------------------------------------------------------------- float64: checkpointed vs full graph

/// The scalars of one DDIM v-prediction step: `x0 = sa x - sb v`, `eps = sa v + sb x`,
/// `x_prev = sqrt_a_prev x0 + direction eps + sigma z`.
#[derive(Clone, Copy, Debug)]
struct StepScalars {
    sa: f64,
    sb: f64,
    sqrt_a_prev: f64,
    direction: f64,
    sigma: f64,
}

impl StepScalars {
    /// Ours: the scheduler's float64 coefficients.
    fn ours(s: &DdimScheduler, i: usize) -> Self {
        let c = s.coefficients(i);
        Self {
            sa: c.alpha_prod_t.sqrt(),
            sb: (1.0 - c.alpha_prod_t).sqrt(),
            sqrt_a_prev: c.sqrt_alpha_prev,
            direction: c.direction,
            sigma: c.sigma,
        }
    }

    fn step<Bk: Backend>(
        &self,
        v: Tensor<Bk, 4>,
        x: Tensor<Bk, 4>,
        z: Tensor<Bk, 4>,
    ) -> Tensor<Bk, 4> {
        let x0 = x.clone() * self.sa - v.clone() * self.sb;
        let eps = v * self.sa + x * self.sb;
        x0 * self.sqrt_a_prev + eps * self.direction + z * self.sigma
    }
}

/// LoRA gradients as `(<module>.lora_{A,B}.weight, values)`, in key order.
type Grads = Vec<(String, Vec<f64>)>;

/// The whole chain with autodiff over the whole graph (as the generator's `sample_loop`), our float64 step scalars,
/// the UNet outputs of the steps before the last `k` detached; returns the final latents, J and the LoRA
/// gradients (keyed `<module>.lora_{A,B}.weight`).
fn full_graph_chain(s: &Setup, k: Option<usize>) -> (Vec<f64>, f64, Grads) {
    let text = Conditioning {
        uncond: Tensor::<A, 3>::from_inner(s.text.uncond.clone()),
        cond: Tensor::<A, 3>::from_inner(s.text.cond.clone()),
    };
    let mut x = Tensor::<A, 4>::from_inner(s.x_t.clone());
    let ts = s.scheduler.timesteps().to_vec();
    for (i, &t) in ts.iter().enumerate() {
        let mut v = guided_noise(&s.unet, x.clone(), t as f64, &text, 7.5);
        if k.is_some_and(|k| i < ts.len() - k) {
            v = v.detach();
        }
        let z = Tensor::from_inner(s.noises[i].clone().unwrap());
        x = StepScalars::ours(&s.scheduler, i).step(v, x, z);
    }
    let latents = values(x.clone().inner());
    let j = s.reward.score(s.vae.decode_scaled(x)).mean();
    let j_value = values(j.clone().inner())[0];
    let grads = j.backward();
    let g = lora_grads_from(&s.unet, &grads)
        .tensors
        .into_iter()
        .map(|(key, g)| (key, values(g)))
        .collect();
    (latents, j_value, g)
}

/// The relative L2 error of two gradient sets with the same keys.
fn grad_err(a: &Grads, b: &Grads) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for ((ka, va), (kb, vb)) in a.iter().zip(b) {
        assert_eq!(ka, kb);
        x.extend(va);
        y.extend(vb);
    }
    rel_err_values(&x, &y).0
}

fn variants() -> [(Option<usize>, Truncation, &'static str); 3] {
    [
        (None, Truncation::Full, "full"),
        (Some(1), Truncation::Fixed { k: 1 }, "k1"),
        (Some(2), Truncation::Fixed { k: 2 }, "k2"),
    ]
}

/// The trainer's checkpointed chain equals the full-graph chain with our float64 step scalars; and its
/// latent gradient through the detached v-prediction steps equals autodiff's (`trajectory_full_graph`; the latent
/// gradient is float32, hence the bound).
#[test]
fn f64_checkpointed_chain_equals_the_full_graph() {
    let s = setup(DType::F64);
    for (k, truncation, which) in variants() {
        let (lat, j, g) = full_graph_chain(&s, k);
        let mut rng = alignprop_pipeline::NoiseRng::new(0);
        let grad_steps = truncation.grad_steps(4, &mut rng);
        let out = run(&s, truncation);
        let ours: Grads = out
            .grads
            .tensors
            .iter()
            .map(|(key, t)| (key.clone(), values(t.clone())))
            .collect();
        let (e_lat, _) = rel_err_values(&values(out.final_latents.clone()), &lat);
        let e_j = ((out.loss - j) / j).abs();
        let e_g = grad_err(&ours, &g);
        let full = trajectory_full_graph(TrajectoryInput {
            unet: &s.unet,
            vae: &s.vae,
            scheduler: &s.scheduler,
            text: &s.text,
            guidance: 7.5,
            x_t: s.x_t.clone(),
            noises: &s.noises,
            grad_steps: &grad_steps,
            loss_fn: |img| {
                let scores = s.reward.score(img);
                Ok((scores.clone().mean(), scores))
            },
        })
        .unwrap();
        let (e_x, _) = rel_err_values(&values(out.latent_grad), &values(full.latent_grad));
        eprintln!(
            "{which} f64, checkpointed vs full graph: final latents {e_lat:.2e}, J {e_j:.2e}, LoRA gradient \
             {e_g:.3e}, dL/dx_T {e_x:.2e}"
        );
        assert!(
            e_lat < TOL_F64 && e_j < TOL_F64 && e_g < TOL_F64 && e_x < 1e-6,
            "{which}: latents {e_lat:.2e}, J {e_j:.2e}, gradient {e_g:.2e}, dL/dx_T {e_x:.2e}"
        );
    }
}
