//! The opt-in bf16 products (`alignprop_kernels::flex_bf16`) through autodiff: a two-layer MLP's value and
//! gradients with the products in bf16 against the same in f32. Its own test binary, so that the process-wide
//! switch cannot reach the f32 parity tests.

use alignprop_kernels::flex_bf16::{bf16_supported, set_bf16_products};
use alignprop_kernels::{linear_with_bias, silu};
use burn::backend::{Autodiff, Flex};
use burn::tensor::{Distribution, Tensor};

type A = Autodiff<Flex>;

fn rel(a: Tensor<Flex, 2>, b: Tensor<Flex, 2>) -> f32 {
    let scale = b.clone().abs().max().into_scalar();
    (a - b).abs().max().into_scalar() / scale
}

#[test]
fn bf16_products_match_f32_within_bf16_rounding() {
    if !bf16_supported() {
        eprintln!("no AVX512_BF16 on this CPU: nothing to check");
        return;
    }
    let dev = Default::default();
    let r = |s: [usize; 2], sd: f64| Tensor::<A, 2>::random(s, Distribution::Normal(0.0, sd), &dev);
    let (x, w1, b1, w2, g) = (
        r([200, 96], 1.0),
        r([128, 96], 0.1),
        Tensor::<A, 1>::random([128], Distribution::Normal(0.0, 0.1), &dev),
        r([80, 128], 0.1),
        r([200, 80], 1.0),
    );
    let run = |bf16: bool| {
        set_bf16_products(bf16);
        let (x, w1, w2) = (
            x.clone().require_grad(),
            w1.clone().require_grad(),
            w2.clone().require_grad(),
        );
        let h = silu(linear_with_bias(x.clone(), w1.clone(), Some(b1.clone())));
        let y = linear_with_bias(h, w2.clone(), None);
        let grads = (y.clone() * g.clone()).sum().backward();
        let out = (
            y.inner(),
            x.grad(&grads).unwrap(),
            w1.grad(&grads).unwrap(),
            w2.grad(&grads).unwrap(),
        );
        set_bf16_products(false);
        out
    };
    let (y0, dx0, dw10, dw20) = run(false);
    let (y1, dx1, dw11, dw21) = run(true);
    // bf16 keeps 8 significant bits: each rounded operand is within 2^-9 relative; sums of products with random
    // signs land near 1e-3 of their scale. f32 alone would differ by ~1e-7.
    for (what, e) in [
        ("output", rel(y1, y0)),
        ("dx", rel(dx1, dx0)),
        ("dw1", rel(dw11, dw10)),
        ("dw2", rel(dw21, dw20)),
    ] {
        eprintln!("{what}: relative max difference {e:.2e}");
        assert!(e > 1e-5 && e < 2e-2, "{what}: {e}");
    }
}
