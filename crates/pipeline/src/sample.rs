//! The built-in sample set: varied synthetic images, so the master works on a fresh machine
//! without `--input`, and tests and the benchmark have inputs.

use std::path::Path;

use image::{DynamicImage, ImageFormat, Rgb, RgbImage};

/// Writes `count` images of about `side` pixels (sizes vary around it) under `dir`, in PNG, JPEG,
/// BMP and GIF, some in a `nested/` subdirectory. Deterministic. Returns the relative paths.
pub fn generate(dir: &Path, count: usize, side: u32) -> std::io::Result<Vec<String>> {
    let mut paths = Vec::with_capacity(count);
    for i in 0..count {
        let (ext, format) = match i % 4 {
            0 | 1 => ("png", ImageFormat::Png),
            2 => ("jpg", ImageFormat::Jpeg),
            _ => ("bmp", ImageFormat::Bmp),
        };
        let (ext, format) = if i % 11 == 10 {
            ("gif", ImageFormat::Gif)
        } else {
            (ext, format)
        };
        let w = (side / 2 + (i as u32 * 37) % side).max(8);
        let h = (side / 2 + (i as u32 * 53) % side).max(8);
        let rel = if i % 3 == 0 {
            format!("nested/sample-{i:03}.{ext}")
        } else {
            format!("sample-{i:03}.{ext}")
        };
        let img = DynamicImage::ImageRgb8(picture(i, w, h));
        let img = if format == ImageFormat::Gif {
            DynamicImage::ImageRgba8(img.to_rgba8())
        } else {
            img
        };
        let dest = dir.join(&rel);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)?;
        }
        img.save_with_format(&dest, format)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        paths.push(rel);
    }
    Ok(paths)
}

/// One of four motifs: gradient, checkerboard, rings, noise.
fn picture(seed: usize, w: u32, h: u32) -> RgbImage {
    let mut state = (seed as u64)
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1);
    RgbImage::from_fn(w, h, |x, y| match seed % 4 {
        0 => Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, (seed * 40) as u8]),
        1 => {
            let on = ((x / 16) + (y / 16)) % 2 == 0;
            if on {
                Rgb([240, 200, (seed * 30) as u8])
            } else {
                Rgb([20, 40, 90])
            }
        }
        2 => {
            let dx = x as i64 - w as i64 / 2;
            let dy = y as i64 - h as i64 / 2;
            let r = ((dx * dx + dy * dy) as f64).sqrt() as u32;
            Rgb([(r * 7 % 256) as u8, (r * 3 % 256) as u8, 128])
        }
        _ => {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let v = (state >> 33) as u32;
            Rgb([v as u8, (v >> 8) as u8, (v >> 16) as u8])
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_readable_images() {
        let d = std::env::temp_dir().join(format!("pipeline-sample-test-{}", std::process::id()));
        let paths = generate(&d, 12, 32).expect("generate");
        assert_eq!(paths.len(), 12);
        for p in &paths {
            image::open(d.join(p)).expect("sample decodes");
        }
        let _ = std::fs::remove_dir_all(&d);
    }
}
