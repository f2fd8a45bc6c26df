//! Arithmetic on LoRA weights: scaling toward the base model and mixing two adapters (AlignProp's reward
//! interpolation, section 5.4 of the paper).

use std::collections::BTreeMap;

use crate::format::{LoraError, LoraPair, LoraWeights, Matrix, Result};

/// How two LoRAs are combined by [`mix`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MixMode {
    /// Interpolate the parameters: `A = c A1 + (1-c) A2`, `B = c B1 + (1-c) B2` (what AlignProp does; the
    /// weight delta is then not exactly the interpolation of the two deltas). Needs equal ranks and alphas.
    Parameters,
    /// Concatenate along the rank so the weight delta is exactly `c dW1 + (1-c) dW2` (rank r1 + r2).
    Exact,
}

impl std::str::FromStr for MixMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "parameters" | "params" => Ok(Self::Parameters),
            "exact" => Ok(Self::Exact),
            _ => Err(format!(
                "unknown mix mode '{s}' (expected parameters or exact)"
            )),
        }
    }
}

fn lerp(a: &Matrix, b: &Matrix, c: f32) -> Matrix {
    Matrix::new(
        a.shape,
        a.values
            .iter()
            .zip(&b.values)
            .map(|(x, y)| c * x + (1.0 - c) * y)
            .collect(),
    )
}

fn scale_matrix(m: &Matrix, c: f32) -> Matrix {
    Matrix::new(m.shape, m.values.iter().map(|v| v * c).collect())
}

/// `c * L`: every weight delta scaled by `c` (0 = base model, 1 = the LoRA as trained).
pub fn scale(lora: &LoraWeights, c: f64) -> LoraWeights {
    LoraWeights {
        modules: lora
            .modules
            .iter()
            .map(|(k, p)| {
                (
                    k.clone(),
                    LoraPair {
                        up: scale_matrix(&p.up, c as f32),
                        ..p.clone()
                    },
                )
            })
            .collect(),
    }
}

/// `c * L1 + (1 - c) * L2`. Both must adapt the same modules.
pub fn mix(l1: &LoraWeights, l2: &LoraWeights, c: f64, mode: MixMode) -> Result<LoraWeights> {
    let k1: Vec<&String> = l1.modules.keys().collect();
    let k2: Vec<&String> = l2.modules.keys().collect();
    if k1 != k2 {
        let only1 = k1.iter().find(|k| !l2.modules.contains_key(**k));
        let only2 = k2.iter().find(|k| !l1.modules.contains_key(**k));
        return Err(LoraError::Invalid(format!(
            "the two LoRAs adapt different modules ({} vs {}; e.g. only in the first: {:?}, only in the second: {:?})",
            k1.len(),
            k2.len(),
            only1,
            only2
        )));
    }
    let mut modules = BTreeMap::new();
    for (name, a) in &l1.modules {
        let b = &l2.modules[name];
        let pair = match mode {
            MixMode::Parameters => {
                if a.down.shape != b.down.shape
                    || a.up.shape != b.up.shape
                    || a.scale() != b.scale()
                {
                    return Err(LoraError::Invalid(format!(
                        "'{name}': parameter mixing needs equal shapes and alpha/rank (down {:?} vs {:?}, \
                         scale {} vs {}); use exact mixing",
                        a.down.shape,
                        b.down.shape,
                        a.scale(),
                        b.scale()
                    )));
                }
                LoraPair {
                    down: lerp(&a.down, &b.down, c as f32),
                    up: lerp(&a.up, &b.up, c as f32),
                    alpha: a.alpha,
                }
            }
            MixMode::Exact => {
                let (ra, rb) = (a.rank(), b.rank());
                let (inf, outf) = (a.down.shape[1], a.up.shape[0]);
                let mut down = a.down.values.clone();
                down.extend_from_slice(&b.down.values);
                // Fold each side's scale and weight into its up matrix; the result has scale 1.
                let (sa, sb) = ((c * a.scale()) as f32, ((1.0 - c) * b.scale()) as f32);
                let mut up = Vec::with_capacity(outf * (ra + rb));
                for row in 0..outf {
                    up.extend(a.up.values[row * ra..(row + 1) * ra].iter().map(|v| v * sa));
                    up.extend(b.up.values[row * rb..(row + 1) * rb].iter().map(|v| v * sb));
                }
                LoraPair {
                    down: Matrix::new([ra + rb, inf], down),
                    up: Matrix::new([outf, ra + rb], up),
                    alpha: None,
                }
            }
        };
        modules.insert(name.clone(), pair);
    }
    Ok(LoraWeights { modules })
}
