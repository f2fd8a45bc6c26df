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

use crate::common;

use alignprop_pipeline::Conditioning;
use alignprop_pipeline::guided_noise;
use alignprop_schedulers::{DdimScheduler, SchedulerConfig};
use alignprop_testing::{ref_tensor_on, refs_sd2, rel_err_values, tiny_sd2, values};
use alignprop_trainer::lora_params::lora_grads_from;
use alignprop_trainer::{Truncation, trajectory_full_graph};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use common::{A, Setup};

/// float64, the trainer's checkpointed chain against autodiff over the whole graph (measured 1.6e-14).
const TOL_F64: f64 = 1e-8;
/// The trainer's float64 chain against the float64 references (measured 9.8e-9 .. 1.22e-8: the float32 timestep
/// sinusoid's last ulps, see the crate comment).
const TOL_F64_DIRECT: f64 = 2e-8;
/// float32 against the `_f32` references (measured up to 1.3e-5).
const TOL_F32: f64 = 1e-4;

fn setup(dtype: DType) -> Setup {
    let r = refs_sd2("alignprop_grad.safetensors");
    let s = common::setup(&tiny_sd2(), &r, dtype, 7.5, |r, dtype| {
        let d = Default::default();
        Conditioning::new(
            ref_tensor_on(r, "uncond_embeds", &d, dtype),
            ref_tensor_on(r, "cond_embeds", &d, dtype),
        )
    });
    let cfg =
        SchedulerConfig::from_file(&tiny_sd2().join("scheduler/scheduler_config.json")).unwrap();
    assert_eq!(cfg.prediction_type, "v_prediction");
    s
}

/// Runs the chain in `dtype` against `grad_{which}_{f64,f32}` (176 LoRA tensors) with bound `tol`.
fn check(dtype: DType, truncation: Truncation, which: &str, tol: f64) -> f64 {
    let r = refs_sd2("alignprop_grad.safetensors");
    common::check(&setup(dtype), &r, dtype, truncation, which, 176, tol)
}

/// The trainer's float64 chain against the float64 references, full / K = 1 / K = 2.
#[test]
fn full_k1_k2_f64() {
    let mut rng = alignprop_pipeline::NoiseRng::new(0);
    assert_eq!(
        Truncation::Fixed { k: 2 }.grad_steps(4, &mut rng),
        [false, false, true, true]
    );
    for (truncation, which) in common::truncations() {
        check(DType::F64, truncation, which, TOL_F64_DIRECT);
    }
}

#[test]
fn full_k1_k2_f32() {
    for (truncation, which) in common::truncations() {
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
    let text = Conditioning::<A>::from_inner(&s.text);
    let mut x = Tensor::<A, 4>::from_inner(s.x_t.clone());
    let ts = s.scheduler.timesteps().to_vec();
    for (i, &t) in ts.iter().enumerate() {
        let mut v = guided_noise(&s.unet, x.clone(), t as f64, &text, s.guidance);
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
        let out = s.run(truncation);
        let ours: Grads = out
            .grads
            .tensors
            .iter()
            .map(|(key, t)| (key.clone(), values(t.clone())))
            .collect();
        let (e_lat, _) = rel_err_values(&values(out.final_latents.clone()), &lat);
        let e_j = ((out.loss - j) / j).abs();
        let e_g = grad_err(&ours, &g);
        let full = trajectory_full_graph(s.input(&grad_steps)).unwrap();
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
