//! The machine's float32 peak: `threads x FMA per cycle x lanes x 2 x clock`, measured with an FMA loop.
//!
//! Each thread runs a loop of independent fused multiply-adds on the widest vectors the CPU has (AVX-512: 16
//! lanes, AVX2 + FMA: 8), enough chains in flight to cover the FMA latency on every FMA unit; all threads run at
//! once, the best of a few runs counts. Divided by the clock `/proc/cpuinfo` states, the result gives the FMA
//! instructions retired per cycle and core (2 on a core with two FMA units at its stated clock; more when it runs
//! above it).

use std::time::Instant;

/// The measured peak and what it is made of.
#[derive(Clone, Debug)]
pub struct Peak {
    /// Measured float32 GFLOP/s of all `threads` together.
    pub gflops: f64,
    pub threads: usize,
    /// Float32 lanes of the vectors the loop used.
    pub lanes: usize,
    /// `avx512f`, `avx2+fma` or `scalar`.
    pub isa: &'static str,
    /// The clock `/proc/cpuinfo` states (`cpu MHz` of the first core), when it does.
    pub mhz: Option<f64>,
    /// FMA instructions per cycle and thread at that clock: `gflops / (threads * lanes * 2 * GHz)`.
    pub fma_per_cycle: Option<f64>,
}

/// Measures the float32 FMA peak of `threads` threads.
pub fn measure(threads: usize) -> Peak {
    let (isa, threads) = (Isa::detect(), threads.max(1));
    let iters: u64 = 20_000_000;
    let best = (0..3)
        .map(|_| {
            let t0 = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(|| std::hint::black_box(isa.fma_loop(std::hint::black_box(iters))));
                }
            });
            t0.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    // Each iteration: CHAINS FMAs of `lanes` lanes, 2 operations per lane.
    let lanes = isa.lanes();
    let gflops = threads as f64 * iters as f64 * (CHAINS * lanes * 2) as f64 / best / 1e9;
    let mhz = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse::<f64>().ok());
    Peak {
        gflops,
        threads,
        lanes,
        isa: isa.name(),
        mhz,
        fma_per_cycle: mhz.map(|m| gflops / (threads as f64 * lanes as f64 * 2.0 * m / 1e3)),
    }
}

/// Independent FMA chains per iteration: 2 FMA units x 4-5 cycles of latency need 8-10 in flight.
const CHAINS: usize = 12;

/// The widest float32 FMA vectors of this CPU.
#[derive(Clone, Copy)]
enum Isa {
    Avx512,
    Avx2Fma,
    Scalar,
}

impl Isa {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Self::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Self::Avx2Fma;
            }
        }
        Self::Scalar
    }

    fn name(self) -> &'static str {
        match self {
            Self::Avx512 => "avx512f",
            Self::Avx2Fma => "avx2+fma",
            Self::Scalar => "scalar",
        }
    }

    fn lanes(self) -> usize {
        match self {
            Self::Avx512 => 16,
            Self::Avx2Fma => 8,
            Self::Scalar => 1,
        }
    }

    /// `iters` iterations of [`CHAINS`] FMAs on these vectors; returns a value that depends on all of them.
    fn fma_loop(self, iters: u64) -> f32 {
        match self {
            // SAFETY: `detect` found AVX-512 F.
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => unsafe { x86::fma512(iters) },
            // SAFETY: `detect` found AVX2 and FMA.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2Fma => unsafe { x86::fma256(iters) },
            _ => {
                let mut acc = [1f32; CHAINS];
                for _ in 0..iters {
                    for a in &mut acc {
                        *a = a.mul_add(0.999_999, 1e-7);
                    }
                }
                acc.iter().sum()
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::CHAINS;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn fma256(iters: u64) -> f32 {
        let (m, a) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        let mut acc = [_mm256_set1_ps(1.0); CHAINS];
        for _ in 0..iters {
            for v in &mut acc {
                *v = _mm256_fmadd_ps(*v, m, a);
            }
        }
        let mut out = [0f32; 8];
        let sum = acc
            .iter()
            .fold(_mm256_setzero_ps(), |s, v| _mm256_add_ps(s, *v));
        // SAFETY: `out` holds 8 floats.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), sum) };
        out.iter().sum()
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn fma512(iters: u64) -> f32 {
        let (m, a) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        let mut acc = [_mm512_set1_ps(1.0); CHAINS];
        for _ in 0..iters {
            for v in &mut acc {
                *v = _mm512_fmadd_ps(*v, m, a);
            }
        }
        let sum = acc
            .iter()
            .fold(_mm512_setzero_ps(), |s, v| _mm512_add_ps(s, *v));
        _mm512_reduce_add_ps(sum)
    }
}
