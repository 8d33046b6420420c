//! Charts of `dist bench` results: busbw (GB/s) against size (log scale), one line per op, as SVG
//! (text) or PNG (rasterised here: a small RGB canvas, an 8×8 bitmap font, and a PNG writer with
//! stored deflate blocks — no image library).

use font8x8::UnicodeFonts;

use super::bench::Row;

const W: usize = 900;
const H: usize = 520;
const ML: f64 = 80.0;
const MR: f64 = 200.0;
const MT: f64 = 40.0;
const MB: f64 = 60.0;
const COLORS: [[u8; 3]; 8] = [
    [0x1f, 0x77, 0xb4],
    [0xff, 0x7f, 0x0e],
    [0x2c, 0xa0, 0x2c],
    [0xd6, 0x27, 0x28],
    [0x94, 0x67, 0xbd],
    [0x8c, 0x56, 0x4b],
    [0xe3, 0x77, 0xc2],
    [0x7f, 0x7f, 0x7f],
];

/// The chart's geometry, shared by both renderers.
struct Frame {
    xmin: f64,
    xmax: f64,
    ymax: f64,
}

impl Frame {
    fn of(rows: &[Row]) -> Frame {
        let xs = rows.iter().map(|r| (r.bytes.max(1) as f64).log2());
        let (xmin, xmax) = xs.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
        let (xmin, xmax) = if rows.is_empty() {
            (0.0, 1.0)
        } else {
            (xmin, xmax)
        };
        let ymax = rows
            .iter()
            .map(|r| r.best_busbw())
            .fold(0.0, f64::max)
            .max(1e-9)
            * 1.1;
        Frame { xmin, xmax, ymax }
    }
    fn x(&self, bytes: usize) -> f64 {
        let x = (bytes.max(1) as f64).log2();
        ML + (x - self.xmin) / (self.xmax - self.xmin).max(1e-9) * (W as f64 - ML - MR)
    }
    fn y(&self, v: f64) -> f64 {
        H as f64 - MB - v / self.ymax * (H as f64 - MT - MB)
    }
    fn x_ticks(&self) -> Vec<(usize, String)> {
        let mut v = vec![];
        let mut e = self.xmin.ceil() as i32;
        while e as f64 <= self.xmax {
            let b = 1usize << e.clamp(0, 62);
            v.push((b, size_label(b)));
            e += 2;
        }
        v
    }
}

fn ops(rows: &[Row]) -> Vec<&str> {
    let mut v: Vec<&str> = vec![];
    for r in rows {
        if !v.contains(&r.op.as_str()) {
            v.push(&r.op);
        }
    }
    v
}

fn size_label(b: usize) -> String {
    match b {
        b if b >= 1 << 30 => format!("{}G", b >> 30),
        b if b >= 1 << 20 => format!("{}M", b >> 20),
        b if b >= 1 << 10 => format!("{}K", b >> 10),
        b => b.to_string(),
    }
}

/// The chart as SVG.
pub fn svg(rows: &[Row]) -> String {
    let f = Frame::of(rows);
    let (w, h) = (W as f64, H as f64);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    s += &format!(
        "<text x=\"{}\" y=\"22\" text-anchor=\"middle\">dist bench: bus bandwidth</text>\n",
        w / 2.0
    );
    s += &format!(
        "<line x1=\"{ML}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/><line x1=\"{ML}\" y1=\"{MT}\" x2=\"{ML}\" y2=\"{}\" stroke=\"black\"/>\n",
        h - MB, w - MR, h - MB, h - MB
    );
    for i in 0..=5 {
        let v = f.ymax * i as f64 / 5.0;
        s += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{v:.2}</text>\n",
            ML - 6.0,
            f.y(v) + 4.0
        );
    }
    for (b, label) in f.x_ticks() {
        s += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{label}</text>\n",
            f.x(b),
            h - MB + 18.0
        );
    }
    s += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">size (bytes)</text>\n",
        (ML + w - MR) / 2.0,
        h - 14.0
    );
    s += &format!(
        "<text x=\"18\" y=\"{}\" transform=\"rotate(-90 18 {})\" text-anchor=\"middle\">busbw (GB/s)</text>\n",
        h / 2.0,
        h / 2.0
    );
    for (i, op) in ops(rows).iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let c = format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2]);
        let pts: Vec<String> = rows
            .iter()
            .filter(|r| r.op == *op)
            .map(|r| format!("{:.1},{:.1}", f.x(r.bytes), f.y(r.best_busbw())))
            .collect();
        s += &format!(
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>\n",
            pts.join(" ")
        );
        let ly = MT + 18.0 * i as f64 + 10.0;
        s += &format!(
            "<line x1=\"{}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{c}\" stroke-width=\"3\"/><text x=\"{}\" y=\"{}\">{op}</text>\n",
            w - MR + 10.0,
            w - MR + 30.0,
            w - MR + 36.0,
            ly + 4.0
        );
    }
    s + "</svg>\n"
}

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Canvas {
            px: vec![255; W * H * 3],
        }
    }
    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            let i = (y as usize * W + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }
    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3], thick: i64) {
        let steps = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as i64).max(1);
        for i in 0..=steps {
            let t = i as f64 / steps as f64;
            let (x, y) = (
                (x0 + (x1 - x0) * t).round() as i64,
                (y0 + (y1 - y0) * t).round() as i64,
            );
            for dx in -(thick / 2)..=(thick / 2) {
                for dy in -(thick / 2)..=(thick / 2) {
                    self.set(x + dx, y + dy, c);
                }
            }
        }
    }
    /// Text with its left edge at `x` and vertical centre at `y`; `anchor` 0 left, 1 centre, 2 right.
    fn text(&mut self, x: f64, y: f64, s: &str, anchor: u8) {
        let width = 8.0 * s.chars().count() as f64;
        let x0 = match anchor {
            1 => x - width / 2.0,
            2 => x - width,
            _ => x,
        } as i64;
        let y0 = (y - 4.0) as i64;
        for (i, ch) in s.chars().enumerate() {
            if let Some(g) = font8x8::BASIC_FONTS.get(ch) {
                for (row, bits) in g.iter().enumerate() {
                    for col in 0..8 {
                        if bits & (1 << col) != 0 {
                            self.set(x0 + 8 * i as i64 + col, y0 + row as i64, [0, 0, 0]);
                        }
                    }
                }
            }
        }
    }
}

/// The chart as PNG bytes.
pub fn png(rows: &[Row]) -> Vec<u8> {
    let f = Frame::of(rows);
    let mut c = Canvas::new();
    let (w, h) = (W as f64, H as f64);
    c.text(w / 2.0, 20.0, "dist bench: bus bandwidth", 1);
    for i in 0..=5 {
        let v = f.ymax * i as f64 / 5.0;
        c.line((ML, f.y(v)), (w - MR, f.y(v)), [225, 225, 225], 1);
        c.text(ML - 6.0, f.y(v), &format!("{v:.2}"), 2);
    }
    c.line((ML, h - MB), (w - MR, h - MB), [0, 0, 0], 1);
    c.line((ML, MT), (ML, h - MB), [0, 0, 0], 1);
    for (b, label) in f.x_ticks() {
        c.line((f.x(b), h - MB), (f.x(b), h - MB + 5.0), [0, 0, 0], 1);
        c.text(f.x(b), h - MB + 16.0, &label, 1);
    }
    c.text((ML + w - MR) / 2.0, h - 18.0, "size (bytes)", 1);
    c.text(8.0, MT - 14.0, "busbw (GB/s)", 0);
    for (i, op) in ops(rows).iter().enumerate() {
        let col = COLORS[i % COLORS.len()];
        let pts: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| r.op == *op)
            .map(|r| (f.x(r.bytes), f.y(r.best_busbw())))
            .collect();
        for p in pts.windows(2) {
            c.line(p[0], p[1], col, 3);
        }
        let ly = MT + 18.0 * i as f64 + 10.0;
        c.line((w - MR + 10.0, ly), (w - MR + 30.0, ly), col, 3);
        c.text(w - MR + 36.0, ly, op, 0);
    }
    encode_png(W, H, &c.px)
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + x as u32) % 65_521;
        b = (b + a) % 65_521;
    }
    (b << 16) | a
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// An 8-bit RGB PNG of `w`×`h` pixels, zlib with stored (uncompressed) deflate blocks.
pub fn encode_png(w: usize, h: usize, rgb: &[u8]) -> Vec<u8> {
    let mut raw = Vec::with_capacity(h * (w * 3 + 1));
    for row in rgb.chunks(w * 3) {
        raw.push(0); // filter: none
        raw.extend_from_slice(row);
    }
    let mut z = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65_535).collect();
    for (i, b) in blocks.iter().enumerate() {
        z.push(u8::from(i + 1 == blocks.len()));
        z.extend_from_slice(&(b.len() as u16).to_le_bytes());
        z.extend_from_slice(&(!(b.len() as u16)).to_le_bytes());
        z.extend_from_slice(b);
    }
    z.extend_from_slice(&adler32(&raw).to_be_bytes());
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&(w as u32).to_be_bytes());
    ihdr.extend_from_slice(&(h as u32).to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &z);
    chunk(&mut out, b"IEND", &[]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(op: &str, b: usize, bw: f64) -> Row {
        Row {
            op: op.into(),
            backend: "cpu".into(),
            world: 4,
            bytes: b,
            count: b / 4,
            dtype: "f32".into(),
            redop: "sum".into(),
            root: -1,
            time_us: Some(1.0),
            algbw: Some(bw),
            busbw: Some(bw),
            ip_time_us: None,
            ip_busbw: None,
            wrong: Some(0),
            bound_gbps: None,
        }
    }

    #[test]
    fn svg_has_a_line_per_op() {
        let s = svg(&[
            row("a", 1024, 1.0),
            row("a", 4096, 2.0),
            row("b", 1024, 0.5),
        ]);
        assert_eq!(s.matches("<polyline").count(), 2);
        assert!(s.starts_with("<svg"));
    }

    #[test]
    fn crc_and_adler_known_values() {
        assert_eq!(crc32(b"IEND"), 0xAE42_6082);
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
    }

    #[test]
    fn png_is_well_formed() {
        let p = png(&[
            row("all_reduce", 1024, 1.0),
            row("all_reduce", 1 << 20, 3.0),
        ]);
        assert_eq!(&p[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&p[12..16], b"IHDR");
        assert_eq!(
            u32::from_be_bytes(p[16..20].try_into().unwrap()) as usize,
            W
        );
        assert!(p.ends_with(&[0xAE, 0x42, 0x60, 0x82]));
        // some pixels are coloured (the line), some black (text and axes)
        assert!(p.windows(3).any(|w| w == COLORS[0]));
    }
}
