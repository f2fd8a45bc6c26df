//! Converting decoded images to 8-bit pictures and writing PNG files and grids.

use std::path::Path;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use image::{Rgb, RgbImage};

/// `[batch, 3, height, width]` images in `[-1, 1]` (VAE output) to 8-bit RGB pictures, exactly as diffusers'
/// PIL conversion: `round(clamp(x / 2 + 0.5, 0, 1) * 255)`.
pub fn to_rgb8<B: Backend>(images: Tensor<B, 4>) -> Vec<RgbImage> {
    let [b, c, h, w] = images.dims();
    assert_eq!(
        c, 3,
        "expected RGB images [batch, 3, height, width], got {c} channels"
    );
    let v: Vec<f32> = ((images / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0)
        .round()
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("f32 image data");
    (0..b)
        .map(|n| {
            let base = n * 3 * h * w;
            RgbImage::from_fn(w as u32, h as u32, |x, y| {
                let i = base + y as usize * w + x as usize;
                Rgb([v[i] as u8, v[i + h * w] as u8, v[i + 2 * h * w] as u8])
            })
        })
        .collect()
}

/// Lays pictures out in a grid of `cols` columns (all must have the same size), with a 2-pixel white gutter.
pub fn grid(images: &[RgbImage], cols: usize) -> RgbImage {
    assert!(!images.is_empty(), "grid of no images");
    let (w, h) = images[0].dimensions();
    let cols = cols.clamp(1, images.len()) as u32;
    let rows = (images.len() as u32).div_ceil(cols);
    let gap = 2;
    let mut out = RgbImage::from_pixel(
        cols * (w + gap) + gap,
        rows * (h + gap) + gap,
        Rgb([255, 255, 255]),
    );
    for (i, img) in images.iter().enumerate() {
        let (c, r) = (i as u32 % cols, i as u32 / cols);
        image::imageops::replace(
            &mut out,
            img,
            (gap + c * (w + gap)) as i64,
            (gap + r * (h + gap)) as i64,
        );
    }
    out
}

/// Saves a picture as PNG, creating the parent folder.
pub fn save_png(img: &RgbImage, path: &Path) -> Result<(), String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("{}: cannot create folder: {e}", dir.display()))?;
    }
    img.save(path)
        .map_err(|e| format!("{}: cannot write PNG: {e}", path.display()))
}
