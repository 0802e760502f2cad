//! A photo (PNG or JPEG bytes) to SqueezeNet's input: resized so its shorter side is 256
//! (bilinear, with the filter widened when shrinking, as PIL does), the center 224x224 cut
//! out, channels in BGR order as floats 0..255 minus the Caffe mean (B 104, G 117, R 123),
//! laid out NCHW: 1x3x224x224 little-endian `f32`.
//!
//! `image` decodes and resizes: it is the Rust ecosystem's standard image crate and builds for
//! WebAssembly as it is (pure Rust decoders).

use image::imageops::{self, FilterType};

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
        .to_rgb8();
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
    let resized = imageops::resize(&image, new_width, new_height, FilterType::Triangle);
    // The center crop's offsets round down.
    let left = (new_width - CROP) / 2;
    let top = (new_height - CROP) / 2;
    let mut tensor = Vec::with_capacity((3 * CROP * CROP * 4) as usize);
    for (channel, mean) in PLANES {
        for y in top..top + CROP {
            for x in left..left + CROP {
                let value = f32::from(resized.get_pixel(x, y)[channel]) - mean;
                tensor.extend_from_slice(&value.to_le_bytes());
            }
        }
    }
    Ok(tensor)
}

squall_sdk::handler!(handle);
