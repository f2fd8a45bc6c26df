//! Compressibility: how small an image's JPEG file is (quality 95, in KiB), the reward of DDPO / AlignProp's
//! compressibility experiments.
//!
//! The true JPEG size is not differentiable, so training uses a learned surrogate: the CLIP image embedding
//! (L2-normalised, AlignProp's preprocessing) into a small MLP (`layers.0`: embed -> hidden, GELU, `layers.2`:
//! hidden -> 1) that predicts the size in KiB. [`fit_head`] fits the MLP on images against their true JPEG sizes
//! (the `alignprop fit-compressibility` command); [`jpeg_size_kib`] is the exact, non-differentiable metric for
//! evaluation. The reward is `-predicted size` (higher = more compressible).

use std::collections::BTreeMap;
use std::path::Path;

use alignprop_diffusion::nn::Linear;
use alignprop_io::VarBuilder;
use alignprop_io::weights::{
    Result, SafetensorsSource, TensorSource, WeightError, write_safetensors,
};
use burn::module::Module;
use burn::tensor::activation::gelu;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor, TensorData};
use image::RgbImage;

use crate::clip_vision::CLIPVisionModel;
use crate::preprocess::{CLIP_MEAN, CLIP_STD, clip_preprocess};
use crate::{Reward, RewardError, check_square_images};

/// The JPEG quality of the compressibility reward.
pub const JPEG_QUALITY: u8 = 95;

/// Size in KiB of the picture encoded as JPEG at `quality` (the `image` crate's baseline encoder).
pub fn jpeg_size_kib(img: &RgbImage, quality: u8) -> f64 {
    let mut buf = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, quality)
        .encode_image(img)
        .expect("JPEG encoding into memory");
    buf.len() as f64 / 1024.0
}

/// The surrogate MLP: `[b, embed]` -> predicted JPEG KiB `[b]`.
#[derive(Module, Debug)]
pub struct CompressibilityHead<B: Backend> {
    pub layers: Vec<Linear<B>>,
}

impl<B: Backend> CompressibilityHead<B> {
    /// Loads `layers.0` and `layers.2` (weights and biases) from a safetensors file, widths from the file.
    pub fn load(path: impl AsRef<Path>, device: &B::Device, dtype: DType) -> Result<Self> {
        let path = path.as_ref();
        let src = SafetensorsSource::open(&[path])?;
        let shape = |key: &str| -> Result<[usize; 2]> {
            let s = src
                .find(key)?
                .map(|t| t.shape)
                .ok_or_else(|| WeightError::Missing {
                    key: key.into(),
                    files: path.display().to_string(),
                    hint: " (expected a compressibility head: layers.0 and layers.2)".into(),
                })?;
            <[usize; 2]>::try_from(s.as_slice()).map_err(|_| WeightError::Shape {
                path: path.to_path_buf(),
                key: key.into(),
                expected: vec![0, 0],
                found: s.clone(),
            })
        };
        let [hidden, embed] = shape("layers.0.weight")?;
        let [one, hidden2] = shape("layers.2.weight")?;
        if one != 1 || hidden2 != hidden {
            return Err(WeightError::Shape {
                path: path.to_path_buf(),
                key: "layers.2.weight".into(),
                expected: vec![1, hidden],
                found: vec![one, hidden2],
            });
        }
        let vb = VarBuilder::from_source(src, device, dtype);
        Ok(Self {
            layers: vec![
                Linear::new(&vb.pp("layers.0"), embed, hidden, true)?,
                Linear::new(&vb.pp("layers.2"), hidden, 1, true)?,
            ],
        })
    }

    /// `[b, embed]` (normalised CLIP embeddings) -> `[b]` KiB.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 1> {
        let h = gelu(self.layers[0].forward(x));
        let y = self.layers[1].forward(h);
        let b = y.dims()[0];
        y.reshape([b])
    }
}

/// The L2-normalised CLIP embedding of decoded images `[b, 3, H, W]` in `[-1, 1]` -> `[b, embed]`.
pub fn clip_embedding<B: Backend>(clip: &CLIPVisionModel<B>, images: Tensor<B, 4>) -> Tensor<B, 2> {
    let px = clip_preprocess(images, clip.image_size, CLIP_MEAN, CLIP_STD);
    let emb = clip.forward(px);
    let norm = emb.clone().square().sum_dim(1).sqrt();
    emb / norm
}

/// CLIP + surrogate head as a differentiable reward: `score = -predicted JPEG KiB`.
#[derive(Module, Debug)]
pub struct CompressibilityScorer<B: Backend> {
    pub clip: CLIPVisionModel<B>,
    pub head: CompressibilityHead<B>,
}

impl<B: Backend> CompressibilityScorer<B> {
    /// `clip_folder`: a transformers CLIP vision folder; `head`: a file written by [`save_head`].
    pub fn load(
        clip_folder: impl AsRef<Path>,
        head: impl AsRef<Path>,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Self> {
        let clip_folder = clip_folder.as_ref();
        let head = head.as_ref();
        Ok(Self {
            clip: CLIPVisionModel::load(clip_folder, device, dtype)?,
            head: CompressibilityHead::load(head, device, dtype)?,
        })
    }

    /// Predicted JPEG size in KiB, `[b]`.
    pub fn predicted_kib(&self, images: Tensor<B, 4>) -> Tensor<B, 1> {
        self.head.forward(clip_embedding(&self.clip, images))
    }
}

impl<B: Backend> Reward<B> for CompressibilityScorer<B> {
    fn name(&self) -> String {
        "compressibility".into()
    }
    /// [`RewardError::Input`] unless `images` are `[batch, 3, H, W]` and square (see
    /// [`check_square_images`]).
    fn score(&self, images: Tensor<B, 4>) -> std::result::Result<Tensor<B, 1>, RewardError> {
        check_square_images("compressibility", &images, self.clip.image_size)?;
        Ok(-self.predicted_kib(images))
    }
}

/// The fitted head's tensors (float32, row-major) and how well it fits.
#[derive(Clone, Debug)]
pub struct FitResult {
    /// `layers.0.weight` `[hidden, embed]`, `layers.0.bias`, `layers.2.weight` `[1, hidden]`, `layers.2.bias`.
    pub tensors: Vec<(String, TensorData)>,
    /// Mean squared error (KiB^2) of predicting the mean size for every image: the baseline.
    pub mse_of_mean: f64,
    /// Mean squared error of the fitted head on the fitting set.
    pub mse: f64,
}

/// Fits the surrogate MLP on `embeddings` `[n, embed]` against `sizes_kib` (`n` values) by full-batch Adam on the
/// mean squared error, from a seeded initialisation whose output starts at the mean size.
pub fn fit_head<B: AutodiffBackend>(
    embeddings: Tensor<B::InnerBackend, 2>,
    sizes_kib: &[f64],
    hidden: usize,
    steps: usize,
    lr: f64,
    seed: u64,
) -> FitResult {
    let [n, embed] = embeddings.dims();
    assert_eq!(n, sizes_kib.len(), "one size per embedding");
    assert!(n > 0 && hidden > 0);
    let device = embeddings.device();
    let mean = sizes_kib.iter().sum::<f64>() / n as f64;
    let mse_of_mean = sizes_kib.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / n as f64;
    let scale = mse_of_mean.sqrt().max(1e-6);
    // Targets standardised for a well-conditioned fit; the scale goes back into the last layer at the end.
    let y = Tensor::<B::InnerBackend, 1>::from_data(
        TensorData::new(
            sizes_kib
                .iter()
                .map(|s| ((s - mean) / scale) as f32)
                .collect(),
            [n],
        ),
        &device,
    );
    let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut uniform = |bound: f64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        ((rng >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * bound
    };
    let mut init = |rows: usize, cols: usize, bound: f64| {
        let v: Vec<f32> = (0..rows * cols).map(|_| uniform(bound) as f32).collect();
        Tensor::<B::InnerBackend, 2>::from_data(TensorData::new(v, [rows, cols]), &device)
    };
    let mut params: Vec<Tensor<B::InnerBackend, 2>> = vec![
        init(hidden, embed, 1.0 / (embed as f64).sqrt()),
        init(1, hidden, 0.0),
        init(1, hidden, 1.0 / (hidden as f64).sqrt()),
        init(1, 1, 0.0),
    ];
    let mut m: Vec<_> = params.iter().map(|p| p.zeros_like()).collect();
    let mut v: Vec<_> = params.iter().map(|p| p.zeros_like()).collect();
    let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
    let x = Tensor::<B, 2>::from_inner(embeddings);
    let yt = Tensor::<B, 1>::from_inner(y);
    let forward = |p: &[Tensor<B, 2>]| -> Tensor<B, 1> {
        let h = gelu(alignprop_kernels::linear(x.clone(), p[0].clone()) + p[1].clone());
        let out = alignprop_kernels::linear(h, p[2].clone()) + p[3].clone();
        out.reshape([n])
    };
    for t in 1..=steps {
        let p: Vec<Tensor<B, 2>> = params
            .iter()
            .map(|p| Tensor::from_inner(p.clone()).require_grad())
            .collect();
        let loss = (forward(&p) - yt.clone()).square().mean();
        let grads = loss.backward();
        for i in 0..params.len() {
            let g = p[i].grad(&grads).expect("parameter gradient");
            m[i] = m[i].clone() * b1 + g.clone() * (1.0 - b1);
            v[i] = v[i].clone() * b2 + g.square() * (1.0 - b2);
            let mh = m[i].clone() / (1.0 - b1.powi(t as i32));
            let vh = v[i].clone() / (1.0 - b2.powi(t as i32));
            params[i] = params[i].clone() - mh / (vh.sqrt() + eps) * lr;
        }
    }
    let p: Vec<Tensor<B, 2>> = params
        .iter()
        .map(|p| Tensor::from_inner(p.clone()))
        .collect();
    let pred: Vec<f64> = forward(&p)
        .inner()
        .into_data()
        .convert::<f64>()
        .to_vec()
        .expect("f64");
    let mse = pred
        .iter()
        .zip(sizes_kib)
        .map(|(p, s)| (p * scale + mean - s).powi(2))
        .sum::<f64>()
        / n as f64;
    // Undo the standardisation: out_kib = scale * out + mean.
    let [w0, b0, w2, b2t] =
        <[Tensor<B::InnerBackend, 2>; 4]>::try_from(params).expect("four tensors");
    let w2 = w2 * scale;
    let b2t = b2t * scale + mean;
    let data = |t: Tensor<B::InnerBackend, 2>, shape: Vec<usize>| {
        let mut d = t.into_data().convert_dtype(DType::F32);
        d.shape = shape.into();
        d
    };
    FitResult {
        tensors: vec![
            ("layers.0.weight".into(), data(w0, vec![hidden, embed])),
            ("layers.0.bias".into(), data(b0, vec![hidden])),
            ("layers.2.weight".into(), data(w2, vec![1, hidden])),
            ("layers.2.bias".into(), data(b2t, vec![1])),
        ],
        mse_of_mean,
        mse,
    }
}

/// Writes a fitted head as safetensors (with its unit and JPEG quality in the metadata).
pub fn save_head(fit: &FitResult, path: &Path) -> Result<()> {
    let meta = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        (
            "alignprop_reward".to_string(),
            "compressibility-surrogate".to_string(),
        ),
        ("unit".to_string(), "KiB".to_string()),
        ("jpeg_quality".to_string(), JPEG_QUALITY.to_string()),
    ]);
    write_safetensors(path, &fit.tensors, &meta)
}
