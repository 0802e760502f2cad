//! A photo (PNG or JPEG bytes) to SqueezeNet's input: resized so its shorter side is 256
//! (bilinear, with the filter widened when shrinking, as PIL does), the center 224x224 cut
//! out, channels in BGR order as floats 0..255 minus the Caffe mean (B 104, G 117, R 123),
//! laid out NCHW: 1x3x224x224 little-endian `f32`.
//!
//! Only the crop is resampled: the source rectangle that lands on the 224x224 center of the
//! 256-pixel image is resized straight to 224x224 with the same scale, so every output pixel
//! has the filter center and support it would have in the full resize (a third of the work).
//!
//! `image` decodes: it is the Rust ecosystem's standard image crate and builds for WebAssembly
//! as it is (pure Rust decoders). `fast_image_resize` resamples: its convolution follows
//! Pillow's (the reference tensors were made with PIL) and has WebAssembly SIMD kernels, which
//! `examples/functions/.cargo/config.toml` turns on; `image`'s generic resize took 25 times
//! longer.

use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

const SHORT_SIDE: u32 = 256;
const CROP: u32 = 224;
/// The Caffe means subtracted, and the RGB channel each output plane takes, in BGR order.
const PLANES: [(usize, f32); 3] = [(2, 104.0), (1, 117.0), (0, 123.0)];
/// Photos larger than this are refused (decoding them would take too long and too much memory).
const MAX_PIXELS: u64 = 40_000_000;

fn handle(input: &[u8]) -> Result<Vec<u8>, String> {
    let mut reader = image::ImageReader::new(std::io::Cursor::new(input))
        .with_guessed_format()
        .map_err(|e| format!("reading the image: {e}"))?;
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_PIXELS * 4);
    reader.limits(limits);
    let image = reader
        .decode()
        .map_err(|e| format!("the input is not a PNG or JPEG image: {e}"))?
        .into_rgb8();
    let (width, height) = image.dimensions();
    if width < 1 || height < 1 {
        return Err("the image is empty".into());
    }
    // The shorter side becomes 256 and the longer keeps the aspect ratio, rounded to the
    // nearest pixel (what the reference tensors were made with: 451x300 becomes 385x256).
    let scaled = |long: u32, short: u32| {
        ((u64::from(long) * u64::from(SHORT_SIDE) * 2 + u64::from(short)) / (2 * u64::from(short)))
            as u32
    };
    let (new_width, new_height) = if width <= height {
        (SHORT_SIDE, scaled(height, width))
    } else {
        (scaled(width, height), SHORT_SIDE)
    };
    // The center crop's offsets round down; in source pixels they and the crop's size scale
    // by the resize's factors.
    let (x_scale, y_scale) = (
        f64::from(width) / f64::from(new_width),
        f64::from(height) / f64::from(new_height),
    );
    let left = f64::from((new_width - CROP) / 2) * x_scale;
    let top = f64::from((new_height - CROP) / 2) * y_scale;
    let source = Image::from_vec_u8(width, height, image.into_raw(), PixelType::U8x3)
        .map_err(|e| format!("the decoded image: {e}"))?;
    let mut cropped = Image::new(CROP, CROP, PixelType::U8x3);
    let options = ResizeOptions::new()
        .resize_alg(ResizeAlg::Convolution(FilterType::Bilinear))
        .crop(
            left,
            top,
            f64::from(CROP) * x_scale,
            f64::from(CROP) * y_scale,
        );
    Resizer::new()
        .resize(&source, &mut cropped, &options)
        .map_err(|e| format!("resizing: {e}"))?;
    let pixels = cropped.buffer();
    let plane_bytes = pixels.len() / 3 * 4;
    let mut tensor = vec![0; PLANES.len() * plane_bytes];
    for ((channel, mean), plane) in PLANES.into_iter().zip(tensor.chunks_exact_mut(plane_bytes)) {
        for (value, pixel) in plane.chunks_exact_mut(4).zip(pixels.chunks_exact(3)) {
            value.copy_from_slice(&(f32::from(pixel[channel]) - mean).to_le_bytes());
        }
    }
    Ok(tensor)
}

squall_sdk::handler!(handle);
