//! Every filter, through the real master and worker: a pixel property of its output, checked
//! against the input (lossless PNG), so that a filter not applied, or the wrong one, fails.
#![allow(clippy::unwrap_used)]

mod support;

use image::{Rgb, RgbImage};
use support::*;

const DARK: [u8; 3] = [40, 80, 120];
const BRIGHT: [u8; 3] = [200, 150, 100];

/// 64 x 48, dark on the left half and bright on the right: flat areas and one sharp edge.
fn input() -> RgbImage {
    RgbImage::from_fn(64, 48, |x, _| Rgb(if x < 32 { DARK } else { BRIGHT }))
}

/// Runs one batch of the input through `filter` and returns the output image.
fn filtered(filter: &str) -> RgbImage {
    let dir = Scratch::new("filter");
    let (inp, output) = (dir.path("in"), dir.path("out"));
    std::fs::create_dir_all(&inp).unwrap();
    input().save(inp.join("a.png")).unwrap();
    let (mut m, connect) = master(&inp, &output, &["--filter", filter, "--stop-workers"]);
    let _w = worker(&connect, "w1", &[]);
    assert!(m.wait().success(), "{filter}: {}", m.stderr());
    assert_eq!(m.summary()["done"], 1, "{filter}: {}", m.summary());
    assert_outputs(&output, &["a.png".to_string()]);
    image::open(output.join("a.png")).unwrap().to_rgb8()
}

fn each_pixel(out: &RgbImage, what: &str, ok: impl Fn(u32, u32, [u8; 3], [u8; 3]) -> bool) {
    let inp = input();
    assert_eq!(out.dimensions(), inp.dimensions(), "{what}: size changed");
    for (x, y, p) in out.enumerate_pixels() {
        let before = inp.get_pixel(x, y).0;
        assert!(
            ok(x, y, before, p.0),
            "{what} at ({x},{y}): {before:?} -> {:?}",
            p.0
        );
    }
}

#[test]
fn grayscale_makes_every_pixel_gray() {
    each_pixel(&filtered("grayscale"), "grayscale", |_, _, _, [r, g, b]| {
        r == g && g == b
    });
}

#[test]
fn invert_complements_every_channel() {
    each_pixel(&filtered("invert"), "invert", |_, _, i, o| {
        (0..3).all(|c| o[c] == 255 - i[c])
    });
}

#[test]
fn brighten_adds_to_every_channel() {
    each_pixel(&filtered("brighten:30"), "brighten", |_, _, i, o| {
        (0..3).all(|c| o[c] == i[c].saturating_add(30))
    });
}

#[test]
fn contrast_moves_channels_away_from_the_middle() {
    let out = filtered("contrast:50");
    each_pixel(&out, "contrast", |_, _, i, o| {
        (0..3).all(|c| (o[c] as i32 - 128).abs() >= (i[c] as i32 - 128).abs())
    });
    assert_ne!(out, input(), "contrast changed nothing");
}

#[test]
fn blur_softens_the_edge_and_keeps_flat_areas() {
    let out = filtered("blur:2.0");
    each_pixel(&out, "blur", |x, _, i, o| {
        let far = !(20..44).contains(&x);
        let between = (0..3).all(|c| {
            (DARK[c].min(BRIGHT[c]).saturating_sub(1)..=DARK[c].max(BRIGHT[c]).saturating_add(1))
                .contains(&o[c])
        });
        between && (!far || (0..3).all(|c| o[c].abs_diff(i[c]) <= 1))
    });
    let (left, right) = (out.get_pixel(31, 24).0, out.get_pixel(32, 24).0);
    assert!(
        left != DARK && right != BRIGHT,
        "the edge is still sharp: {left:?} {right:?}"
    );
}

#[test]
fn edges_are_bright_on_the_edge_and_black_elsewhere() {
    let out = filtered("edges");
    // The Laplacian is positive on the bright side of the step, negative (black) on the dark.
    for (x, y, p) in out.enumerate_pixels() {
        let inner = (1..63).contains(&x) && (1..47).contains(&y);
        if inner && x == 32 {
            assert!(p.0[0] > 20, "no edge at ({x},{y}): {:?}", p.0);
        } else if inner {
            assert_eq!(p.0, [0, 0, 0], "not black at ({x},{y})");
        }
    }
}

#[test]
fn resize_gives_the_exact_size() {
    assert_eq!(filtered("resize:20x10").dimensions(), (20, 10));
}

#[test]
fn thumbnail_bounds_the_longer_side_and_keeps_the_aspect() {
    assert_eq!(filtered("thumbnail:16").dimensions(), (16, 12));
}
