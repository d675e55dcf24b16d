//! The loss curve as a PNG, drawn by hand (a few lines, a grid and a tiny bitmap font) so that
//! no font or plotting stack is needed.

use std::path::Path;

use super::metrics::MetricRecord;
use crate::{Error, Result};

const W: usize = 800;
const H: usize = 480;
const LEFT: usize = 70;
const RIGHT: usize = 20;
const TOP: usize = 30;
const BOTTOM: usize = 40;
const TRAIN_COLOR: [u8; 3] = [31, 119, 180];
const VALID_COLOR: [u8; 3] = [255, 127, 14];

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Self {
            px: vec![255; W * H * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if (0..W as i64).contains(&x) && (0..H as i64).contains(&y) {
            let i = (y as usize * W + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3], thick: i64) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
        for i in 0..=n {
            let t = i as f64 / n as f64;
            let (x, y) = (
                (x0 + (x1 - x0) * t).round() as i64,
                (y0 + (y1 - y0) * t).round() as i64,
            );
            for dx in 0..thick {
                for dy in 0..thick {
                    self.set(x + dx - thick / 2, y + dy - thick / 2, c);
                }
            }
        }
    }

    fn text(&mut self, s: &str, x: i64, y: i64, c: [u8; 3]) {
        const SCALE: i64 = 2;
        for (k, ch) in s.chars().enumerate() {
            let rows = glyph(ch);
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..3 {
                    if bits >> (2 - col) & 1 == 1 {
                        for sx in 0..SCALE {
                            for sy in 0..SCALE {
                                self.set(
                                    x + (k as i64 * 4 + col) * SCALE + sx,
                                    y + r as i64 * SCALE + sy,
                                    c,
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// 3×5 bitmaps, one row per byte (bit 2 = left pixel).
fn glyph(c: char) -> [u8; 5] {
    match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        'a' => [0, 3, 5, 5, 3],
        'd' => [1, 3, 5, 5, 3],
        'e' => [0, 6, 7, 4, 3],
        'i' => [2, 0, 2, 2, 2],
        'l' => [6, 2, 2, 2, 7],
        'n' => [0, 6, 5, 5, 5],
        'o' => [0, 2, 5, 5, 2],
        'p' => [0, 6, 5, 6, 4],
        'r' => [0, 5, 6, 4, 4],
        's' => [0, 3, 6, 3, 6],
        't' => [2, 7, 2, 2, 3],
        'v' => [0, 5, 5, 5, 2],
        _ => [0; 5],
    }
}

/// Draws training loss (blue) and validation loss (orange) against the step, with the loss
/// range and step range labelled, and writes it atomically as a PNG.
pub fn plot_loss_curve(history: &[MetricRecord], path: &Path) -> Result<()> {
    if history.is_empty() {
        return Err(Error::Msg("no metrics to plot".into()));
    }
    let train: Vec<(f64, f64)> = history
        .iter()
        .filter(|r| r.loss.is_finite())
        .map(|r| (r.step as f64, r.loss))
        .collect();
    let valid: Vec<(f64, f64)> = history
        .iter()
        .filter_map(|r| {
            r.val_loss
                .filter(|v| v.is_finite())
                .map(|v| (r.step as f64, v))
        })
        .collect();
    let all = train.iter().chain(&valid);
    let (mut lo, mut hi) = all
        .clone()
        .fold((f64::MAX, f64::MIN), |(l, h), &(_, y)| (l.min(y), h.max(y)));
    if !(lo.is_finite() && hi.is_finite()) {
        return Err(Error::Msg("no finite loss to plot".into()));
    }
    if hi - lo < 1e-9 {
        hi += 0.5;
        lo -= 0.5;
    }
    let pad = (hi - lo) * 0.05;
    let (lo, hi) = (lo - pad, hi + pad);
    let max_step = all.fold(1f64, |m, &(x, _)| m.max(x));
    let (pw, ph) = ((W - LEFT - RIGHT) as f64, (H - TOP - BOTTOM) as f64);
    let to_px = |(x, y): (f64, f64)| {
        (
            LEFT as f64 + x / max_step * pw,
            TOP as f64 + (hi - y) / (hi - lo) * ph,
        )
    };

    let mut c = Canvas::new();
    let grid = [225, 225, 225];
    for i in 0..=4 {
        let y = TOP as f64 + ph * i as f64 / 4.0;
        c.line((LEFT as f64, y), (LEFT as f64 + pw, y), grid, 1);
        c.text(
            &format!("{:.3}", hi - (hi - lo) * i as f64 / 4.0),
            4,
            y as i64 - 5,
            [0, 0, 0],
        );
    }
    let axis = [0, 0, 0];
    c.line(
        (LEFT as f64, TOP as f64),
        (LEFT as f64, TOP as f64 + ph),
        axis,
        1,
    );
    c.line(
        (LEFT as f64, TOP as f64 + ph),
        (LEFT as f64 + pw, TOP as f64 + ph),
        axis,
        1,
    );
    c.text("0", LEFT as i64 - 2, (H - BOTTOM + 8) as i64, axis);
    let last = format!("{}", max_step as usize);
    c.text(
        &last,
        (W - RIGHT) as i64 - last.len() as i64 * 8,
        (H - BOTTOM + 8) as i64,
        axis,
    );
    c.text(
        "step",
        (LEFT as f64 + pw / 2.0) as i64 - 16,
        (H - BOTTOM + 8) as i64,
        axis,
    );
    c.text("loss", 4, 8, axis);
    c.text("train", LEFT as i64 + 20, 8, TRAIN_COLOR);
    if !valid.is_empty() {
        c.text("valid", LEFT as i64 + 90, 8, VALID_COLOR);
    }
    for w in train.windows(2) {
        c.line(to_px(w[0]), to_px(w[1]), TRAIN_COLOR, 2);
    }
    if train.len() == 1 {
        let (x, y) = to_px(train[0]);
        c.line((x - 2.0, y), (x + 2.0, y), TRAIN_COLOR, 3);
    }
    for w in valid.windows(2) {
        c.line(to_px(w[0]), to_px(w[1]), VALID_COLOR, 2);
    }
    for &p in &valid {
        let (x, y) = to_px(p);
        c.line((x - 3.0, y), (x + 3.0, y), VALID_COLOR, 5);
    }

    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, W as u32, H as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let err = |e: png::EncodingError| {
            Error::Msg(format!("{}: PNG encoding failed: {e}", path.display()))
        };
        let mut writer = enc.write_header().map_err(err)?;
        writer.write_image_data(&c.px).map_err(err)?;
    }
    crate::fs::write_atomic(path, &bytes)
}
