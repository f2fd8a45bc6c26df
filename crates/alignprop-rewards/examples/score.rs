//! Score PNG images with a reward: the LAION aesthetic predictor (a transformers CLIP ViT-L/14 vision folder and
//! the linear head, `.pth` or safetensors), or mean brightness when no model is given. Images are read by
//! `alignprop_pipeline::images::load_image`.
//!
//! ```text
//! cargo run --release --example score -- a.png b.png
//! cargo run --release --example score -- --aesthetic /models/clip-vit-large-patch14 \
//!     /models/sac+logos+ava1-l14-linearMSE.pth a.png b.png
//! ```

use alignprop_pipeline::images::load_image;
use alignprop_rewards::Brightness;
use alignprop_rewards::Reward;
use alignprop_rewards::aesthetic::AestheticScorer;
use burn::tensor::DType;

type B = burn::backend::Flex;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let device = Default::default();
    let reward: Box<dyn Reward<B>> = if args.first().map(String::as_str) == Some("--aesthetic") {
        if args.len() < 4 {
            eprintln!("usage: score --aesthetic CLIP_FOLDER HEAD IMAGE.png...");
            std::process::exit(2);
        }
        let rest = args.split_off(3);
        let scorer = AestheticScorer::<B>::load(&args[1], &args[2], &device, DType::F32)?;
        args = rest;
        Box::new(scorer)
    } else {
        Box::new(Brightness)
    };
    if args.is_empty() {
        eprintln!("usage: score [--aesthetic CLIP_FOLDER HEAD] IMAGE.png...");
        std::process::exit(2);
    }
    for path in &args {
        // `[1, 3, height, width]` in [-1, 1].
        let image = load_image::<B>(path, &device)?;
        // One score per image: `[1]`.
        let score = reward.score(image)?.into_scalar();
        println!("{path}\t{}\t{score:.4}", reward.name());
    }
    Ok(())
}
