//! Image filters and the chain a task carries (`grayscale,blur:2.0`), applied by workers and by
//! the in-process benchmark baseline. Pure CPU work: callers run it off the async runtime.

use std::fmt;
use std::io::Cursor;
use std::path::Path;

use image::imageops::FilterType;
use image::{DynamicImage, ImageFormat, ImageReader, Limits};

/// Why a filter specification is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("empty filter specification")]
    Empty,
    #[error("unknown filter {0:?} (known: grayscale, invert, blur:SIGMA, resize:WxH, thumbnail:N, brighten:N, contrast:C, edges)")]
    Unknown(String),
    #[error("filter {name:?} needs {what}, got {arg:?}")]
    BadArgument {
        name: String,
        what: &'static str,
        arg: String,
    },
}

/// Why one image could not be processed; the message is the per-file reason users see.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read: {0}")]
    Read(std::io::Error),
    #[error("not a supported image: {0}")]
    Decode(image::ImageError),
    #[error("cannot encode as {format:?}: {source}")]
    Encode {
        format: ImageFormat,
        source: image::ImageError,
    },
    #[error("no image format for output extension of {0:?}")]
    OutputFormat(String),
}

/// One step of a chain.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Step {
    Grayscale,
    Invert,
    Blur(f32),
    Resize(u32, u32),
    Thumbnail(u32),
    Brighten(i32),
    Contrast(f32),
    Edges,
}

/// A validated chain of filters, applied left to right.
#[derive(Debug, Clone, PartialEq)]
pub struct Chain(Vec<Step>);

impl Chain {
    pub fn parse(spec: &str) -> Result<Self, SpecError> {
        let steps = spec
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(parse_step)
            .collect::<Result<Vec<_>, _>>()?;
        if steps.is_empty() {
            return Err(SpecError::Empty);
        }
        Ok(Self(steps))
    }

    pub fn steps(&self) -> &[Step] {
        &self.0
    }

    pub fn apply(&self, mut img: DynamicImage) -> DynamicImage {
        for step in &self.0 {
            img = match *step {
                Step::Grayscale => img.grayscale(),
                Step::Invert => {
                    img.invert();
                    img
                }
                Step::Blur(sigma) => img.blur(sigma),
                Step::Resize(w, h) => img.resize_exact(w, h, FilterType::Triangle),
                Step::Thumbnail(n) => img.thumbnail(n, n),
                Step::Brighten(v) => img.brighten(v),
                Step::Contrast(c) => img.adjust_contrast(c),
                // Laplacian on the luminance: bright where intensity changes, black elsewhere.
                Step::Edges => img
                    .grayscale()
                    .filter3x3(&[-1.0, -1.0, -1.0, -1.0, 8.0, -1.0, -1.0, -1.0, -1.0]),
            };
        }
        img
    }
}

impl fmt::Display for Chain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|s| match s {
                Step::Grayscale => "grayscale".to_string(),
                Step::Invert => "invert".to_string(),
                Step::Blur(v) => format!("blur:{v}"),
                Step::Resize(w, h) => format!("resize:{w}x{h}"),
                Step::Thumbnail(n) => format!("thumbnail:{n}"),
                Step::Brighten(v) => format!("brighten:{v}"),
                Step::Contrast(v) => format!("contrast:{v}"),
                Step::Edges => "edges".to_string(),
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

fn parse_step(text: &str) -> Result<Step, SpecError> {
    let (name, arg) = match text.split_once(':') {
        Some((n, a)) => (n.trim(), Some(a.trim())),
        None => (text, None),
    };
    let bad = |what: &'static str| SpecError::BadArgument {
        name: name.to_string(),
        what,
        arg: arg.unwrap_or("").to_string(),
    };
    let positive_f32 = |what| {
        arg.and_then(|a| a.parse::<f32>().ok())
            .filter(|v| v.is_finite() && *v > 0.0 && *v <= 100.0)
            .ok_or_else(|| bad(what))
    };
    let size = |a: &str| a.parse::<u32>().ok().filter(|v| (1..=65_535).contains(v));
    match name.to_ascii_lowercase().as_str() {
        "grayscale" | "gray" | "grey" => Ok(Step::Grayscale),
        "invert" => Ok(Step::Invert),
        "edges" | "edge" => Ok(Step::Edges),
        "blur" => positive_f32("a sigma in (0, 100]").map(Step::Blur),
        "resize" => arg
            .and_then(|a| a.split_once('x'))
            .and_then(|(w, h)| Some(Step::Resize(size(w)?, size(h)?)))
            .ok_or_else(|| bad("WIDTHxHEIGHT in pixels")),
        "thumbnail" | "thumb" => arg
            .and_then(size)
            .map(Step::Thumbnail)
            .ok_or_else(|| bad("a maximum side in pixels")),
        "brighten" => arg
            .and_then(|a| a.parse::<i32>().ok())
            .filter(|v| (-255..=255).contains(v))
            .map(Step::Brighten)
            .ok_or_else(|| bad("an integer in [-255, 255]")),
        "contrast" => arg
            .and_then(|a| a.parse::<f32>().ok())
            .filter(|v| v.is_finite() && (-100.0..=100.0).contains(v))
            .map(Step::Contrast)
            .ok_or_else(|| bad("a number in [-100, 100]")),
        _ => Err(SpecError::Unknown(text.to_string())),
    }
}

/// Whether the master sends a file as a task (by extension); anything else is reported as
/// "not an image" without bothering a worker.
pub fn is_image_path(path: &Path) -> bool {
    ImageFormat::from_path(path).is_ok_and(|f| {
        matches!(
            f,
            ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::Gif | ImageFormat::Bmp
        )
    })
}

/// Decodes `bytes` (format sniffed from the content), applies `chain`, and encodes in the format
/// named by `output_name`'s extension. `max_alloc` bounds the decoder's memory.
pub fn process(
    bytes: &[u8],
    chain: &Chain,
    output_name: &str,
    max_alloc: u64,
) -> Result<Vec<u8>, ImageError> {
    let format = ImageFormat::from_path(output_name)
        .map_err(|_| ImageError::OutputFormat(output_name.to_string()))?;
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(ImageError::Read)?;
    let mut limits = Limits::default();
    limits.max_alloc = Some(max_alloc);
    reader.limits(limits);
    let img = reader.decode().map_err(ImageError::Decode)?;
    let out = encodable(chain.apply(img), format);
    let mut buf = Cursor::new(Vec::new());
    out.write_to(&mut buf, format)
        .map_err(|source| ImageError::Encode { format, source })?;
    Ok(buf.into_inner())
}

/// Converts to a pixel type the output format's encoder accepts.
fn encodable(img: DynamicImage, format: ImageFormat) -> DynamicImage {
    use DynamicImage as D;
    match (format, &img) {
        (ImageFormat::Jpeg, D::ImageLuma8(_) | D::ImageRgb8(_)) => img,
        (ImageFormat::Jpeg, D::ImageLuma16(_) | D::ImageLumaA8(_) | D::ImageLumaA16(_)) => {
            D::ImageLuma8(img.to_luma8())
        }
        (ImageFormat::Jpeg, _) => D::ImageRgb8(img.to_rgb8()),
        (ImageFormat::Gif, _) => D::ImageRgba8(img.to_rgba8()),
        (_, D::ImageLuma8(_) | D::ImageLumaA8(_) | D::ImageRgb8(_) | D::ImageRgba8(_)) => img,
        (_, _) if img.color().has_alpha() => D::ImageRgba8(img.to_rgba8()),
        (_, _) => D::ImageRgb8(img.to_rgb8()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_chains() {
        let c = Chain::parse(
            "grayscale, blur:2.0,resize:10x20,thumbnail:8,brighten:-5,contrast:1.5,edges,invert",
        )
        .expect("valid");
        assert_eq!(c.steps().len(), 8);
        assert_eq!(c.steps()[1], Step::Blur(2.0));
        assert_eq!(Chain::parse(&c.to_string()).expect("round trip"), c);
    }

    #[test]
    fn refuses_bad_chains() {
        assert_eq!(Chain::parse(" , "), Err(SpecError::Empty));
        assert!(matches!(Chain::parse("sepia"), Err(SpecError::Unknown(_))));
        for bad in [
            "blur",
            "blur:-1",
            "blur:x",
            "resize:10",
            "resize:0x5",
            "brighten:999",
        ] {
            assert!(Chain::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn processes_png_to_jpeg_and_rejects_garbage() {
        let img = DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(
            16,
            8,
            image::Rgba([200, 10, 10, 128]),
        ));
        let mut png = Cursor::new(Vec::new());
        img.write_to(&mut png, ImageFormat::Png).expect("encode");
        let chain = Chain::parse("grayscale,thumbnail:4").expect("valid");
        let jpeg = process(png.get_ref(), &chain, "a.jpg", 1 << 26).expect("processed");
        let back = image::load_from_memory(&jpeg).expect("decodes");
        assert_eq!((back.width(), back.height()), (4, 2));
        assert!(matches!(
            process(b"not an image", &chain, "a.png", 1 << 26),
            Err(ImageError::Decode(_))
        ));
    }
}
