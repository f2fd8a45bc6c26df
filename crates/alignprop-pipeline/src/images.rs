//! Converting decoded images to 8-bit pictures and back, reading image files and writing PNG files and grids.

use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
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

/// Pixel height of one caption line (8-pixel glyphs plus spacing).
const LINE_H: u32 = 10;

/// Draws `text` (printable ASCII; other characters as `?`) with the 8x8 bitmap font at `(x, y)`, clipped to
/// `max_chars` characters (an ellipsis `..` marks the cut).
fn draw_text(img: &mut RgbImage, text: &str, x: u32, y: u32, max_chars: usize, color: Rgb<u8>) {
    let mut chars: Vec<char> = text.chars().collect();
    if chars.len() > max_chars {
        chars.truncate(max_chars.saturating_sub(2));
        chars.extend(['.', '.']);
    }
    for (i, ch) in chars.into_iter().enumerate() {
        let code = if ch.is_ascii() && !ch.is_ascii_control() {
            ch as usize
        } else {
            '?' as usize
        };
        let glyph = font8x8::legacy::BASIC_LEGACY[code];
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits & (1 << col) != 0 {
                    let (px, py) = (x + i as u32 * 8 + col, y + row as u32);
                    if px < img.width() && py < img.height() {
                        img.put_pixel(px, py, color);
                    }
                }
            }
        }
    }
}

/// Splits `text` into at most `lines` lines of at most `width` characters at spaces (the last line is cut).
fn wrap(text: &str, width: usize, lines: usize) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut cur = String::new();
    for word in text.split_whitespace() {
        if !cur.is_empty() && cur.len() + 1 + word.len() > width {
            out.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(word);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    if out.len() > lines {
        let rest = out[lines - 1..].join(" ");
        out.truncate(lines - 1);
        out.push(rest);
    }
    out
}

/// A grid as [`grid`], with a caption under each picture: `captions[i]` is a list of lines (e.g. the prompt and
/// `reward 6.31`); the first line wraps onto two lines, long lines are cut with `..`. Black text on white.
pub fn captioned_grid(images: &[RgbImage], captions: &[Vec<String>], cols: usize) -> RgbImage {
    assert!(!images.is_empty(), "grid of no images");
    assert_eq!(images.len(), captions.len(), "one caption per picture");
    let (w, h) = images[0].dimensions();
    let chars = (w as usize / 8).max(1);
    let laid_out: Vec<Vec<String>> = captions
        .iter()
        .map(|lines| {
            let mut v = Vec::new();
            for (i, line) in lines.iter().enumerate() {
                if i == 0 {
                    v.extend(wrap(line, chars, 2));
                } else {
                    v.push(line.clone());
                }
            }
            v
        })
        .collect();
    let n_lines = laid_out.iter().map(Vec::len).max().unwrap_or(0) as u32;
    let cell_h = h + n_lines * LINE_H + 2;
    let cols = cols.clamp(1, images.len()) as u32;
    let rows = (images.len() as u32).div_ceil(cols);
    let gap = 2;
    let mut out = RgbImage::from_pixel(
        cols * (w + gap) + gap,
        rows * (cell_h + gap) + gap,
        Rgb([255, 255, 255]),
    );
    for (i, (img, lines)) in images.iter().zip(&laid_out).enumerate() {
        let (c, r) = (i as u32 % cols, i as u32 / cols);
        let (x0, y0) = (gap + c * (w + gap), gap + r * (cell_h + gap));
        image::imageops::replace(&mut out, img, x0 as i64, y0 as i64);
        for (j, line) in lines.iter().enumerate() {
            draw_text(
                &mut out,
                line,
                x0,
                y0 + h + 2 + j as u32 * LINE_H,
                chars,
                Rgb([0, 0, 0]),
            );
        }
    }
    out
}

/// Pictures enlarged by the smallest whole factor (nearest neighbour: the pixels stay sharp) that makes them at
/// least `min_width` wide; unchanged when they already are. Grids of tiny models' 64-pixel pictures get room for
/// their captions this way.
pub fn enlarge_to(images: Vec<RgbImage>, min_width: u32) -> Vec<RgbImage> {
    let Some(w) = images.first().map(|i| i.width().max(1)) else {
        return images;
    };
    let factor = min_width.div_ceil(w);
    if factor <= 1 {
        return images;
    }
    images
        .into_iter()
        .map(|img| {
            let (w, h) = img.dimensions();
            image::imageops::resize(
                &img,
                w * factor,
                h * factor,
                image::imageops::FilterType::Nearest,
            )
        })
        .collect()
}

/// Stacks pictures top to bottom, each under its header line (e.g. `before training: mean reward 0.41`), on white;
/// as wide as the widest picture.
pub fn labelled_stack(parts: &[(String, RgbImage)]) -> RgbImage {
    assert!(!parts.is_empty(), "stack of no pictures");
    let gap = 4;
    let width = parts.iter().map(|(_, p)| p.width()).max().unwrap_or(1);
    let height: u32 = parts
        .iter()
        .map(|(_, p)| gap + LINE_H + 2 + p.height())
        .sum::<u32>()
        + gap;
    let mut out = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    let mut y = gap;
    for (label, picture) in parts {
        draw_text(
            &mut out,
            label,
            gap,
            y,
            ((width - gap) / 8) as usize,
            Rgb([0, 0, 0]),
        );
        y += LINE_H + 2;
        image::imageops::replace(&mut out, picture, 0, y as i64);
        y += picture.height() + gap;
    }
    out
}

/// The largest width or height [`load_image`] decodes: rewards score pictures of a few hundred pixels, and a
/// file claiming more is refused before anything is allocated for it.
pub const MAX_IMAGE_SIDE: u32 = 8192;

/// An image file (PNG, JPEG) as `[1, 3, height, width]` in `[-1, 1]`, the range of the VAE decoder's output that
/// every reward takes. The format is told from the file's content (a PNG named `.jpg` reads); a file that is no
/// image, is truncated, or claims more than [`MAX_IMAGE_SIDE`] pixels a side is a one-line error naming the file.
pub fn load_image<B: Backend>(
    path: impl AsRef<Path>,
    device: &B::Device,
) -> Result<Tensor<B, 4>, String> {
    let path = path.as_ref();
    let err = |e: &dyn std::fmt::Display| {
        let msg = e.to_string();
        let msg = msg.split_whitespace().collect::<Vec<_>>().join(" ");
        format!("{}: cannot read image: {msg}", path.display())
    };
    let mut reader = image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| err(&e))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| err(&e))?.to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut v = vec![0f32; 3 * h * w];
    for (x, y, p) in img.enumerate_pixels() {
        for c in 0..3 {
            v[c * h * w + y as usize * w + x as usize] = p[c] as f32 / 127.5 - 1.0;
        }
    }
    Ok(Tensor::from_data(TensorData::new(v, [1, 3, h, w]), device))
}

/// Saves a picture as PNG, creating the parent folder.
pub fn save_png(img: &RgbImage, path: impl AsRef<Path>) -> Result<(), String> {
    let path = path.as_ref();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("{}: cannot create folder: {e}", dir.display()))?;
    }
    img.save(path)
        .map_err(|e| format!("{}: cannot write PNG: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_splits_at_spaces_and_cuts_the_rest_into_the_last_line() {
        assert_eq!(wrap("a photo of a cat", 8, 2), vec!["a photo", "of a cat"]);
        assert_eq!(
            wrap("one two three four", 8, 2),
            vec!["one two", "three four"]
        );
        assert_eq!(wrap("", 8, 2), Vec::<String>::new());
    }

    /// Captions add rows under each picture and put dark pixels there; the pictures themselves are untouched.
    #[test]
    fn captioned_grid_draws_text_under_each_picture() {
        let pic = RgbImage::from_pixel(32, 16, Rgb([200, 10, 10]));
        let g = captioned_grid(
            &[pic.clone(), pic.clone()],
            &[
                vec!["cat".into(), "r 1.0".into()],
                vec!["dog".into(), "r 2.0".into()],
            ],
            2,
        );
        assert_eq!(g.dimensions(), (2 + 2 * 34, 2 + 16 + 2 * 10 + 2 + 2));
        assert_eq!(*g.get_pixel(2, 2), Rgb([200, 10, 10]));
        let g = &g;
        let dark_below = |x0: u32| {
            (x0..x0 + 32)
                .flat_map(|x| (20..g.height()).map(move |y| (x, y)))
                .filter(|&(x, y)| g.get_pixel(x, y)[0] == 0)
                .count()
        };
        assert!(dark_below(2) > 10 && dark_below(36) > 10);
        // Different text, different pixels.
        let strip = |x0: u32| -> Vec<u8> {
            (20..g.height())
                .flat_map(|y| (x0..x0 + 32).map(move |x| g.get_pixel(x, y)[0]))
                .collect()
        };
        assert_ne!(strip(2), strip(36));
    }

    /// Whole-factor nearest-neighbour enlargement: every source pixel becomes a `factor x factor` block.
    #[test]
    fn enlarge_to_repeats_pixels_by_a_whole_factor() {
        let img = RgbImage::from_fn(50, 20, |x, y| Rgb([x as u8, y as u8, 7]));
        let big = enlarge_to(vec![img.clone()], 128);
        assert_eq!(big[0].dimensions(), (150, 60));
        assert_eq!(*big[0].get_pixel(3 * 17 + 2, 3 * 9 + 1), Rgb([17, 9, 7]));
        let same = enlarge_to(vec![img.clone()], 50);
        assert_eq!(same[0], img);
    }

    /// Each part sits under its own header, in order, and the headers are drawn (dark pixels above each part).
    #[test]
    fn labelled_stack_puts_each_picture_under_its_header() {
        let red = RgbImage::from_pixel(40, 10, Rgb([200, 0, 0]));
        let blue = RgbImage::from_pixel(60, 10, Rgb([0, 0, 200]));
        let s = labelled_stack(&[("before".into(), red), ("after".into(), blue)]);
        assert_eq!(s.width(), 60);
        let (y_red, y_blue) = (4 + 12, 4 + 12 + 10 + 4 + 12);
        assert_eq!(s.height(), y_blue + 10 + 4);
        assert_eq!(*s.get_pixel(0, y_red), Rgb([200, 0, 0]));
        assert_eq!(*s.get_pixel(59, y_blue), Rgb([0, 0, 200]));
        let dark = |y0: u32| {
            (y0..y0 + 8)
                .flat_map(|y| (0..60).map(move |x| (x, y)))
                .filter(|&(x, y)| s.get_pixel(x, y)[0] == 0 && s.get_pixel(x, y)[2] == 0)
                .count()
        };
        assert!(dark(4) > 10 && dark(y_red + 10 + 4) > 10);
    }
}
