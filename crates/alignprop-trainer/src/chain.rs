//! The differentiable sampling chain with our own checkpointed backward.
//!
//! One trajectory is `x_T -> (DDIM step with guided UNet noise) x n -> VAE decode -> reward -> loss`. Storing the
//! autodiff graph of every UNet call would take memory linear in the number of steps (gigabytes per step at SD
//! size), so instead:
//!
//! 1. **Forward, no graph.** Run the whole chain on the inner (non-autodiff) backend, keeping only each step's
//!    input latent `x_i` and its noise `z_i` (a few kilobytes each).
//! 2. **Loss gradient.** Decode `x_n` and score it with autodiff on, giving `g_n = dL/dx_n`.
//! 3. **Backward, one step at a time.** For `i = n-1, ..., first kept step`: rebuild step `i` with autodiff from the
//!    stored `x_i`, take the vector-Jacobian product with `g_{i+1}` (backward of `sum(x_{i+1} * g_{i+1})`), add the
//!    LoRA gradients it yields, and carry `g_i = dL/dx_i` on. The graph of one step is freed before the next is
//!    built, so activation memory does not grow with the number of kept steps.
//!
//! Steps whose noise prediction is detached (before the truncation point, or the random detaches of the first
//! AlignProp release) contribute no parameter gradient; the latent gradient still passes through their linear
//! DDIM update, `dx_{i+1}/dx_i = sqrt(a_prev) / sqrt(a_t)` when eps is held fixed.

use alignprop_diffusion::unet::UNet2DConditionModel;
use alignprop_diffusion::vae::AutoencoderKL;
use alignprop_pipeline::{Conditioning, guided_noise};
use alignprop_schedulers::{DdimScheduler, Scheduler};
use burn::module::AutodiffModule;
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;

use crate::lora_params::{LoraGrads, lora_grads_from};

/// The result of one trajectory's forward and checkpointed backward.
pub struct TrajectoryOutput<B: AutodiffBackend> {
    /// The scalar loss.
    pub loss: f64,
    /// Per-image reward scores `[batch]` (as returned by the loss closure).
    pub scores: Vec<f64>,
    /// `x_0` latents `[batch, 4, h, w]`.
    pub final_latents: Tensor<B::InnerBackend, 4>,
    /// Decoded images `[batch, 3, H, W]`.
    pub images: Tensor<B::InnerBackend, 4>,
    /// dLoss/dLoRA, summed over the steps that carry gradient.
    pub grads: LoraGrads<B::InnerBackend>,
    /// `dL/dx_T` (the latent gradient that reached the initial noise).
    pub latent_grad: Tensor<B::InnerBackend, 4>,
}

/// Runs one trajectory and its checkpointed backward.
///
/// - `x_t`: initial noise `[batch, 4, h, w]`; `noises[i]`: the DDIM noise of step `i` (needed when eta > 0);
/// - `text`: conditioning (constant: the text encoder is frozen);
/// - `grad_steps[i]`: whether step `i`'s noise prediction carries gradient (e.g. only the last K);
/// - `loss_fn(images) -> (scalar loss, per-image scores)`, built from autodiff tensor ops.
#[allow(clippy::too_many_arguments)]
pub fn trajectory<B, F>(
    unet: &UNet2DConditionModel<B>,
    vae: &AutoencoderKL<B>,
    scheduler: &DdimScheduler,
    text: &Conditioning<B::InnerBackend>,
    guidance: f64,
    x_t: Tensor<B::InnerBackend, 4>,
    noises: &[Option<Tensor<B::InnerBackend, 4>>],
    grad_steps: &[bool],
    loss_fn: F,
) -> TrajectoryOutput<B>
where
    B: AutodiffBackend,
    F: Fn(Tensor<B, 4>) -> (Tensor<B, 1>, Tensor<B, 1>),
{
    let n = scheduler.timesteps().len();
    assert_eq!(
        grad_steps.len(),
        n,
        "grad_steps must have one entry per step"
    );
    let noise = |i: usize| noises.get(i).cloned().flatten();

    // 1. Forward on the inner backend, storing each step's input.
    let inner_unet = unet.valid();
    let mut inputs = Vec::with_capacity(n);
    let mut x = x_t;
    for i in 0..n {
        inputs.push(x.clone());
        let t = scheduler.timesteps()[i] as f64;
        let eps = guided_noise(&inner_unet, x.clone(), t, text, guidance);
        x = scheduler.step(eps, i, x, noise(i)).prev_sample;
    }
    drop(inner_unet);

    // 2. Loss and dL/dx_n through the decoder and the reward.
    let x_n = Tensor::<B, 4>::from_inner(x.clone()).require_grad();
    let images = vae.decode_scaled(x_n.clone());
    let (loss, scores) = loss_fn(images.clone());
    let loss_value = scalar(loss.clone().inner());
    let scores: Vec<f64> = scores
        .inner()
        .into_data()
        .convert::<f64>()
        .to_vec()
        .expect("f64 scores");
    let grads = loss.backward();
    let mut g = x_n
        .grad(&grads)
        .expect("the loss depends on the final latents");
    drop(grads);

    // 3. Backward through the steps, one recomputed step at a time.
    let mut acc = LoraGrads::default();
    let text_ad = Conditioning::<B> {
        uncond: Tensor::from_inner(text.uncond.clone()),
        cond: Tensor::from_inner(text.cond.clone()),
    };
    let first = grad_steps.iter().position(|&k| k).unwrap_or(n);
    for i in (first..n).rev() {
        if grad_steps[i] {
            let xi = Tensor::<B, 4>::from_inner(inputs[i].clone()).require_grad();
            let t = scheduler.timesteps()[i] as f64;
            let eps = guided_noise(unet, xi.clone(), t, &text_ad, guidance);
            let next = scheduler
                .step(eps, i, xi.clone(), noise(i).map(Tensor::from_inner))
                .prev_sample;
            let vjp = (next * Tensor::from_inner(g)).sum();
            let grads = vjp.backward();
            acc.add(lora_grads_from(unet, &grads));
            g = xi.grad(&grads).expect("the step depends on its input");
        } else {
            let c = scheduler.coefficients(i);
            g = g * (c.sqrt_alpha_prev / c.alpha_prod_t.sqrt());
        }
    }
    // Steps before the first kept one are linear in x with no parameters: carry g to x_T for completeness.
    for i in (0..first).rev() {
        let c = scheduler.coefficients(i);
        g = g * (c.sqrt_alpha_prev / c.alpha_prod_t.sqrt());
    }

    TrajectoryOutput {
        loss: loss_value,
        scores,
        final_latents: x,
        images: images.inner(),
        grads: acc,
        latent_grad: g,
    }
}

fn scalar<B: burn::tensor::backend::Backend>(t: Tensor<B, 1>) -> f64 {
    t.into_data()
        .convert::<f64>()
        .to_vec::<f64>()
        .expect("scalar")[0]
}

/// The same trajectory differentiated the plain way: the autodiff graph of every kept step is built during the
/// forward pass and freed only after one backward. Memory grows linearly with the number of kept steps; kept for
/// comparison (tests, benchmarks) with the checkpointed [`trajectory`]. Returns `(loss, LoRA gradients)`.
#[allow(clippy::too_many_arguments)]
pub fn trajectory_full_graph<B, F>(
    unet: &UNet2DConditionModel<B>,
    vae: &AutoencoderKL<B>,
    scheduler: &DdimScheduler,
    text: &Conditioning<B::InnerBackend>,
    guidance: f64,
    x_t: Tensor<B::InnerBackend, 4>,
    noises: &[Option<Tensor<B::InnerBackend, 4>>],
    grad_steps: &[bool],
    loss_fn: F,
) -> (f64, LoraGrads<B::InnerBackend>)
where
    B: AutodiffBackend,
    F: Fn(Tensor<B, 4>) -> (Tensor<B, 1>, Tensor<B, 1>),
{
    let n = scheduler.timesteps().len();
    let inner_unet = unet.valid();
    let text_ad = Conditioning::<B> {
        uncond: Tensor::from_inner(text.uncond.clone()),
        cond: Tensor::from_inner(text.cond.clone()),
    };
    let mut x = Tensor::<B, 4>::from_inner(x_t);
    for i in 0..n {
        let t = scheduler.timesteps()[i] as f64;
        let eps = if grad_steps[i] {
            guided_noise(unet, x.clone(), t, &text_ad, guidance)
        } else {
            Tensor::from_inner(guided_noise(
                &inner_unet,
                x.clone().inner(),
                t,
                text,
                guidance,
            ))
        };
        let z = noises.get(i).cloned().flatten().map(Tensor::from_inner);
        x = scheduler.step(eps, i, x, z).prev_sample;
    }
    let (loss, _) = loss_fn(vae.decode_scaled(x));
    let value = scalar(loss.clone().inner());
    let grads = loss.backward();
    (value, lora_grads_from(unet, &grads))
}
