//! The LAION aesthetic predictor: CLIP image embedding, L2-normalised, into a linear MLP
//! (`layers.0/2/4/6/7`, 768 -> 1024 -> 128 -> 64 -> 16 -> 1 for ViT-L/14, no activations; dropout only in
//! training). Loss for AlignProp: `|score - target|` (target 10).

use std::path::Path;

use alignprop_diffusion::nn::Linear;
use alignprop_io::VarBuilder;
use alignprop_io::weights::{Result, SafetensorsSource, TensorSource, WeightError};
use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

use crate::clip_vision::CLIPVisionModel;
use crate::preprocess::{CLIP_MEAN, CLIP_STD, clip_preprocess};
use crate::{Reward, RewardError, check_square_images};
use alignprop_io::pth::PthSource;

/// The MLP head, sized from the weight file (the LAION layout: Linear at indices 0, 2, 4, 6, 7).
#[derive(Module, Debug)]
pub struct AestheticMlp<B: Backend> {
    pub layers: Vec<Linear<B>>,
}

/// The module indices of the Linear layers in LAION's `nn.Sequential`.
pub const LAION_LINEAR_INDICES: [usize; 5] = [0, 2, 4, 6, 7];

impl<B: Backend> AestheticMlp<B> {
    /// Loads `layers.{0,2,4,6,7}.{weight,bias}` from a safetensors file or a PyTorch `.pth` state dict (read
    /// without executing pickle code), taking the widths from the file.
    pub fn load(path: impl AsRef<Path>, device: &B::Device, dtype: DType) -> Result<Self> {
        let path = path.as_ref();
        let shapes: std::sync::Arc<dyn TensorSource> =
            if path.extension().is_some_and(|e| e == "pth" || e == "pt") {
                std::sync::Arc::new(PthSource::open(path)?)
            } else {
                std::sync::Arc::new(SafetensorsSource::open(&[path])?)
            };
        let vb = VarBuilder::from_source(shapes.clone(), device, dtype);
        let mut layers = Vec::new();
        for i in LAION_LINEAR_INDICES {
            let key = format!("layers.{i}.weight");
            let shape =
                shapes
                    .find(&key)?
                    .map(|t| t.shape)
                    .ok_or_else(|| WeightError::Missing {
                        key: key.clone(),
                        files: path.display().to_string(),
                        hint: " (expected the LAION aesthetic MLP layout layers.0/2/4/6/7)".into(),
                    })?;
            let [out_f, in_f] =
                <[usize; 2]>::try_from(shape.as_slice()).map_err(|_| WeightError::Shape {
                    path: path.to_path_buf(),
                    key: key.clone(),
                    expected: vec![0, 0],
                    found: shape.clone(),
                })?;
            layers.push(Linear::new(&vb.pp("layers").pp(i), in_f, out_f, true)?);
        }
        Ok(Self { layers })
    }

    /// `[b, embed]` -> `[b]`.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 1> {
        let y = self.layers.iter().fold(x, |h, l| l.forward(h));
        let b = y.dims()[0];
        y.reshape([b])
    }
}

/// CLIP vision encoder + aesthetic head, with AlignProp's differentiable preprocessing.
#[derive(Module, Debug)]
pub struct AestheticScorer<B: Backend> {
    pub clip: CLIPVisionModel<B>,
    pub mlp: AestheticMlp<B>,
    /// The loss target (`|score - target|`), 10 in AlignProp.
    pub target: f64,
}

impl<B: Backend> AestheticScorer<B> {
    /// `clip_folder`: a transformers `CLIPVisionModelWithProjection` folder; `mlp`: the head as safetensors.
    pub fn load(
        clip_folder: impl AsRef<Path>,
        mlp: impl AsRef<Path>,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Self> {
        let clip_folder = clip_folder.as_ref();
        let mlp = mlp.as_ref();
        Ok(Self {
            clip: CLIPVisionModel::load(clip_folder, device, dtype)?,
            mlp: AestheticMlp::load(mlp, device, dtype)?,
            target: 10.0,
        })
    }

    /// Decoder output `[b, 3, H, H]` (square) in `[-1, 1]` -> aesthetic score `[b]`; the [`Reward`] method checks
    /// the shape first (this one panics on a non-square batch).
    pub fn score(&self, images: Tensor<B, 4>) -> Tensor<B, 1> {
        let px = clip_preprocess(images, self.clip.image_size, CLIP_MEAN, CLIP_STD);
        let emb = self.clip.forward(px);
        let norm = emb.clone().square().sum_dim(1).sqrt();
        self.mlp.forward(emb / norm)
    }
}

impl<B: Backend> Reward<B> for AestheticScorer<B> {
    fn name(&self) -> String {
        "aesthetic".into()
    }
    /// [`RewardError::Input`] unless `images` are `[batch, 3, H, W]` and square (see
    /// [`check_square_images`]).
    fn score(&self, images: Tensor<B, 4>) -> std::result::Result<Tensor<B, 1>, RewardError> {
        check_square_images("aesthetic", &images, self.clip.image_size)?;
        Ok(AestheticScorer::score(self, images))
    }
    fn loss(&self, scores: Tensor<B, 1>) -> Tensor<B, 1> {
        (scores - self.target).abs()
    }
}
