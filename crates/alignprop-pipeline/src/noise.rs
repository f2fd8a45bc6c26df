//! Seeded Gaussian noise that is the same on every backend and machine.
//!
//! Noise is drawn on the host with a fixed generator (xoshiro256++ seeded through splitmix64, Box-Muller
//! transform in f64) and uploaded, so a seed gives bit-identical initial latents on the CPU and on CUDA, in f32 and
//! f64, independent of burn's backend RNGs.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};

/// A small, fast, reproducible random generator (xoshiro256++).
#[derive(Clone, Debug)]
pub struct NoiseRng {
    s: [u64; 4],
    /// The second Box-Muller value, kept for the next draw.
    spare: Option<f64>,
}

impl NoiseRng {
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            // splitmix64
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Self {
            s: [next(), next(), next(), next()],
            spare: None,
        }
    }

    /// The generator's full state (to checkpoint a run and resume it exactly).
    pub fn state(&self) -> ([u64; 4], Option<f64>) {
        (self.s, self.spare)
    }

    /// A generator continuing from a saved [`NoiseRng::state`].
    pub fn from_state(s: [u64; 4], spare: Option<f64>) -> Self {
        Self { s, spare }
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A uniform integer in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (2.0 * std::f64::consts::PI * u2).sin_cos();
        self.spare = Some(r * s);
        r * c
    }

    /// A standard normal tensor of the given shape on `device`, in `dtype`.
    pub fn normal_tensor<B: Backend, const D: usize>(
        &mut self,
        shape: [usize; D],
        device: &B::Device,
        dtype: DType,
    ) -> Tensor<B, D> {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| self.normal()).collect();
        Tensor::from_data(TensorData::new(v, shape), (device, dtype))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reproducible_and_standard() {
        let mut a = NoiseRng::new(42);
        let mut b = NoiseRng::new(42);
        let va: Vec<f64> = (0..10_000).map(|_| a.normal()).collect();
        let vb: Vec<f64> = (0..10_000).map(|_| b.normal()).collect();
        assert_eq!(va, vb);
        let mean = va.iter().sum::<f64>() / va.len() as f64;
        let var = va.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / va.len() as f64;
        assert!(
            mean.abs() < 0.05 && (var - 1.0).abs() < 0.05,
            "mean {mean}, var {var}"
        );
        let (st, sp) = a.state();
        let mut resumed = NoiseRng::from_state(st, sp);
        assert_eq!(resumed.normal(), a.normal());
        let mut c = NoiseRng::new(43);
        assert_ne!(c.normal(), va[0]);
        assert!((0..1000).all(|_| c.below(7) < 7));
    }
}
