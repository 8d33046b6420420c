//! The collectives as StableHLO programs: the MLIR text generator, the key programs are cached
//! under, and the serialized `CompileOptionsProto` that goes with them. Pure functions, tested
//! with golden strings.
//!
//! Every program is a `func.func @main` of one argument and one result in a module carrying
//! `mhlo.num_replicas` (= the participating ranks) and `mhlo.num_partitions = 1`. Collectives
//! are cross-replica (no channel handle), replica `i` being the `i`-th device of the compile
//! options' device assignment, so one group's programs name its ranks `0..n`. Ops are written
//! in MLIR's generic form (`"stablehlo.op"(…) {attrs} : (types) -> types`), whose syntax does
//! not change between StableHLO releases.
//!
//! | op | program |
//! | --- | --- |
//! | all_reduce sum/prod/max/min | `stablehlo.all_reduce` with an add/multiply/maximum/minimum region |
//! | all_reduce avg | the sum, then `stablehlo.divide` by the replica count (integers truncate, as the oracle) |
//! | all_gather(dim) | `stablehlo.all_gather`, `all_gather_dim = dim` |
//! | reduce_scatter(dim) | `stablehlo.reduce_scatter`, `scatter_dimension = dim` |
//! | send/recv | a 2-replica `stablehlo.collective_permute` with pairs `[[0, 1]]` over (sender, receiver) |
//! | broadcast(src) | all_reduce-sum of the input's bytes (`bitcast_convert` to `ui8` with a trailing dim of the element size), masked to zero on every replica but `src` (`replica_id`, `compare`, `select`), bitcast back: bit-exact for every dtype, one collective |
//! | all_gatherv | each rank pads its part to the largest size (a one-device program), then all_gather, `slice` of each rank's rows and `concatenate` |
//! | reduce_scatterv | all_reduce, then a one-device `slice` of this rank's rows |
//!
//! fp8 tensors move as `ui8` (a `bitcast_convert` around the collective).

use dist_core::{DType, Error, ReduceOp, Result};

/// What a program does (the part of the cache key that is not dtype, shape or devices).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// `all_reduce(op)` over all replicas.
    AllReduce(ReduceOp),
    /// `all_gather` along `dim`.
    AllGather {
        /// Normalised dimension.
        dim: usize,
    },
    /// `reduce_scatter` along `dim`.
    ReduceScatter {
        /// Normalised dimension.
        dim: usize,
        /// Reduction.
        op: ReduceOp,
    },
    /// `collective_permute` with these (source, target) replica pairs.
    Permute {
        /// (source, target) replica pairs.
        pairs: Vec<(usize, usize)>,
    },
    /// Broadcast from replica `src` (masked bit-sum).
    Broadcast {
        /// Source replica.
        src: usize,
    },
    /// all_gather of inputs padded to the largest size along `dim`, then each replica's first
    /// `sizes[r]` rows concatenated.
    GatherV {
        /// Normalised dimension.
        dim: usize,
        /// Rows each replica contributes.
        sizes: Vec<usize>,
    },
    /// One-device: zero-pad along `dim` to `len` rows.
    PadTo {
        /// Normalised dimension.
        dim: usize,
        /// Rows after padding.
        len: usize,
    },
    /// One-device: rows `[start, start+len)` along `dim`.
    Slice {
        /// Normalised dimension.
        dim: usize,
        /// First row.
        start: usize,
        /// Rows kept.
        len: usize,
    },
}

/// The key programs are compiled and cached under: the op, the input's dtype and shape, the
/// replica groups and the global device ids of the replicas (the device assignment).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ProgramKey {
    /// What the program does.
    pub op: OpKind,
    /// Input element type.
    pub dtype: DType,
    /// Input shape.
    pub shape: Vec<usize>,
    /// Replica groups of the collective (all replicas in one group for a communicator's ops).
    pub replica_groups: Vec<Vec<usize>>,
    /// Global device id of each replica.
    pub devices: Vec<i64>,
}

impl ProgramKey {
    /// Number of replicas.
    pub fn replicas(&self) -> usize {
        self.devices.len()
    }
    /// The MLIR text of the program.
    pub fn text(&self) -> Result<String> {
        program_text(self)
    }
    /// The output shape.
    pub fn output_shape(&self) -> Vec<usize> {
        let mut s = self.shape.clone();
        let n = self.replicas();
        match &self.op {
            OpKind::AllGather { dim } => s[*dim] *= n,
            OpKind::ReduceScatter { dim, .. } => s[*dim] /= n.max(1),
            OpKind::GatherV { dim, sizes } => s[*dim] = sizes.iter().sum(),
            OpKind::PadTo { dim, len } => s[*dim] = *len,
            OpKind::Slice { dim, len, .. } => s[*dim] = *len,
            OpKind::AllReduce(_) | OpKind::Permute { .. } | OpKind::Broadcast { .. } => {}
        }
        s
    }
}

/// The MLIR element type of a dtype.
pub fn mlir_elem(d: DType) -> &'static str {
    match d {
        DType::I8 => "i8",
        DType::U8 => "ui8",
        DType::I32 => "i32",
        DType::U32 => "ui32",
        DType::I64 => "i64",
        DType::U64 => "ui64",
        DType::F16 => "f16",
        DType::F32 => "f32",
        DType::F64 => "f64",
        DType::BF16 => "bf16",
        DType::F8E4M3 => "f8E4M3FN",
        DType::F8E5M2 => "f8E5M2",
        _ => "ui8",
    }
}

/// `tensor<2x3xf32>`, or `tensor<f32>` for a 0-d shape.
pub fn tensor_ty(shape: &[usize], elem: &str) -> String {
    let mut s = String::from("tensor<");
    for d in shape {
        s.push_str(&d.to_string());
        s.push('x');
    }
    s.push_str(elem);
    s.push('>');
    s
}

fn is_fp8(d: DType) -> bool {
    matches!(d, DType::F8E4M3 | DType::F8E5M2)
}

fn groups_attr(groups: &[Vec<usize>]) -> String {
    let n = groups.len();
    let m = groups.first().map_or(0, Vec::len);
    let inner: Vec<String> = groups
        .iter()
        .map(|g| {
            let v: Vec<String> = g.iter().map(|x| x.to_string()).collect();
            format!("[{}]", v.join(", "))
        })
        .collect();
    format!("dense<[{}]> : tensor<{n}x{m}xi64>", inner.join(", "))
}

fn i64_array(v: &[usize]) -> String {
    if v.is_empty() {
        return "array<i64>".into();
    }
    let s: Vec<String> = v.iter().map(|x| x.to_string()).collect();
    format!("array<i64: {}>", s.join(", "))
}

fn zero_literal(d: DType) -> &'static str {
    if d.is_float() {
        "0.000000e+00"
    } else {
        "0"
    }
}

fn region(op: ReduceOp, elem: &str) -> String {
    let name = match op {
        ReduceOp::Sum | ReduceOp::Avg => "add",
        ReduceOp::Prod => "multiply",
        ReduceOp::Max => "maximum",
        ReduceOp::Min => "minimum",
    };
    let s = tensor_ty(&[], elem);
    format!(
        "({{\n    ^bb0(%a: {s}, %b: {s}):\n      %r = \"stablehlo.{name}\"(%a, %b) : ({s}, {s}) -> {s}\n      \"stablehlo.return\"(%r) : ({s}) -> ()\n    }})"
    )
}

/// Builds the body line by line with numbered values.
struct Body {
    lines: Vec<String>,
    next: usize,
}

impl Body {
    fn new() -> Self {
        Body {
            lines: Vec::new(),
            next: 0,
        }
    }
    fn push(&mut self, rhs: String) -> String {
        let v = format!("%{}", self.next);
        self.next += 1;
        self.lines.push(format!("    {v} = {rhs}"));
        v
    }
}

/// The MLIR text of `key`'s program.
pub fn program_text(key: &ProgramKey) -> Result<String> {
    let n = key.replicas();
    dist_core::ensure_arg!(n >= 1, "a program needs at least one replica");
    let d = key.dtype;
    let shape = &key.shape;
    let elem = mlir_elem(d);
    let in_ty = tensor_ty(shape, elem);
    let out_shape = key.output_shape();
    let out_ty = tensor_ty(&out_shape, elem);
    let groups = groups_attr(&key.replica_groups);
    let mut b = Body::new();
    // fp8 data moves as ui8
    let (mv_elem, x) = if is_fp8(d) && !matches!(key.op, OpKind::Broadcast { .. }) {
        let t = tensor_ty(shape, "ui8");
        let v = b.push(format!(
            "\"stablehlo.bitcast_convert\"(%arg0) : ({in_ty}) -> {t}"
        ));
        ("ui8", v)
    } else {
        (elem, "%arg0".to_string())
    };
    let mv_in = tensor_ty(shape, mv_elem);
    let mv_out = tensor_ty(&out_shape, mv_elem);
    let mut y = match &key.op {
        OpKind::AllReduce(op) => {
            if !d.is_reducible() {
                return Err(Error::invalid(format!("cannot reduce {d}")));
            }
            let r = b.push(format!(
                "\"stablehlo.all_reduce\"({x}) {} {{replica_groups = {groups}}} : ({mv_in}) -> {mv_in}",
                region(*op, elem)
            ));
            if *op == ReduceOp::Avg {
                let lit = if d.is_float() {
                    float_lit(n)
                } else {
                    n.to_string()
                };
                let c = b.push(format!(
                    "\"stablehlo.constant\"() {{value = dense<{lit}> : {in_ty}}} : () -> {in_ty}"
                ));
                b.push(format!(
                    "\"stablehlo.divide\"({r}, {c}) : ({in_ty}, {in_ty}) -> {in_ty}"
                ))
            } else {
                r
            }
        }
        OpKind::AllGather { dim } => b.push(format!(
            "\"stablehlo.all_gather\"({x}) {{all_gather_dim = {dim} : i64, replica_groups = {groups}}} : ({mv_in}) -> {mv_out}"
        )),
        OpKind::ReduceScatter { dim, op } => {
            if !d.is_reducible() {
                return Err(Error::invalid(format!("cannot reduce {d}")));
            }
            b.push(format!(
                "\"stablehlo.reduce_scatter\"({x}) {} {{replica_groups = {groups}, scatter_dimension = {dim} : i64}} : ({mv_in}) -> {mv_out}",
                region(*op, elem)
            ))
        }
        OpKind::Permute { pairs } => {
            let v: Vec<String> = pairs.iter().map(|(s, t)| format!("[{s}, {t}]")).collect();
            b.push(format!(
                "\"stablehlo.collective_permute\"({x}) {{source_target_pairs = dense<[{}]> : tensor<{}x2xi64>}} : ({mv_in}) -> {mv_in}",
                v.join(", "),
                pairs.len()
            ))
        }
        OpKind::Broadcast { src } => {
            // The bits as ui8 (a trailing dim of the element's size): every runtime reduces
            // ui8 (NCCL has no 16-bit unsigned type), and x + 0 + ... + 0 is exact in integers.
            let mut bshape = shape.clone();
            if d.size() > 1 {
                bshape.push(d.size());
            }
            let bt = tensor_ty(&bshape, "ui8");
            let u32t = tensor_ty(&[], "ui32");
            let rid = b.push(format!("\"stablehlo.replica_id\"() : () -> {u32t}"));
            let s = b.push(format!(
                "\"stablehlo.constant\"() {{value = dense<{src}> : {u32t}}} : () -> {u32t}"
            ));
            let p = b.push(format!(
                "\"stablehlo.compare\"({rid}, {s}) {{comparison_direction = #stablehlo<comparison_direction EQ>}} : ({u32t}, {u32t}) -> tensor<i1>"
            ));
            let bx = b.push(format!(
                "\"stablehlo.bitcast_convert\"(%arg0) : ({in_ty}) -> {bt}"
            ));
            let z = b.push(format!(
                "\"stablehlo.constant\"() {{value = dense<0> : {bt}}} : () -> {bt}"
            ));
            let m = b.push(format!(
                "\"stablehlo.select\"({p}, {bx}, {z}) : (tensor<i1>, {bt}, {bt}) -> {bt}"
            ));
            let r = b.push(format!(
                "\"stablehlo.all_reduce\"({m}) {} {{replica_groups = {groups}}} : ({bt}) -> {bt}",
                region(ReduceOp::Sum, "ui8")
            ));
            b.push(format!(
                "\"stablehlo.bitcast_convert\"({r}) : ({bt}) -> {in_ty}"
            ))
        }
        OpKind::GatherV { dim, sizes } => {
            dist_core::ensure_arg!(sizes.len() == n, "GatherV: {} sizes for {n} replicas", sizes.len());
            let max = shape[*dim];
            let mut gs = shape.clone();
            gs[*dim] = max * n;
            let gt = tensor_ty(&gs, mv_elem);
            let g = b.push(format!(
                "\"stablehlo.all_gather\"({x}) {{all_gather_dim = {dim} : i64, replica_groups = {groups}}} : ({mv_in}) -> {gt}"
            ));
            let mut parts = Vec::new();
            for (r, &len) in sizes.iter().enumerate() {
                if len == 0 {
                    continue;
                }
                let mut start = vec![0usize; gs.len()];
                start[*dim] = r * max;
                let mut limit = gs.clone();
                limit[*dim] = r * max + len;
                let mut ps = gs.clone();
                ps[*dim] = len;
                let pt = tensor_ty(&ps, mv_elem);
                let v = b.push(format!(
                    "\"stablehlo.slice\"({g}) {{limit_indices = {}, start_indices = {}, strides = {}}} : ({gt}) -> {pt}",
                    i64_array(&limit),
                    i64_array(&start),
                    i64_array(&vec![1; gs.len()])
                ));
                parts.push((v, pt));
            }
            match parts.len() {
                0 => return Err(Error::invalid("GatherV of nothing")),
                1 => parts.remove(0).0,
                _ => {
                    let names: Vec<&str> = parts.iter().map(|p| p.0.as_str()).collect();
                    let tys: Vec<&str> = parts.iter().map(|p| p.1.as_str()).collect();
                    b.push(format!(
                        "\"stablehlo.concatenate\"({}) {{dimension = {dim} : i64}} : ({}) -> {mv_out}",
                        names.join(", "),
                        tys.join(", ")
                    ))
                }
            }
        }
        OpKind::PadTo { dim, len } => {
            dist_core::ensure_arg!(*len >= shape[*dim], "PadTo shrinks dim {dim}");
            let st = tensor_ty(&[], mv_elem);
            let zl = if mv_elem == "ui8" && is_fp8(d) { "0" } else { zero_literal(d) };
            let z = b.push(format!(
                "\"stablehlo.constant\"() {{value = dense<{zl}> : {st}}} : () -> {st}"
            ));
            let mut high = vec![0usize; shape.len()];
            high[*dim] = len - shape[*dim];
            let zeros = vec![0usize; shape.len()];
            b.push(format!(
                "\"stablehlo.pad\"({x}, {z}) {{edge_padding_high = {}, edge_padding_low = {}, interior_padding = {}}} : ({mv_in}, {st}) -> {mv_out}",
                i64_array(&high),
                i64_array(&zeros),
                i64_array(&zeros)
            ))
        }
        OpKind::Slice { dim, start, len } => {
            dist_core::ensure_arg!(start + len <= shape[*dim], "Slice past the end of dim {dim}");
            let mut st = vec![0usize; shape.len()];
            st[*dim] = *start;
            let mut limit = shape.clone();
            limit[*dim] = start + len;
            b.push(format!(
                "\"stablehlo.slice\"({x}) {{limit_indices = {}, start_indices = {}, strides = {}}} : ({mv_in}) -> {mv_out}",
                i64_array(&limit),
                i64_array(&st),
                i64_array(&vec![1; shape.len()])
            ))
        }
    };
    if mv_elem != elem {
        y = b.push(format!(
            "\"stablehlo.bitcast_convert\"({y}) : ({mv_out}) -> {out_ty}"
        ));
    }
    let name = match &key.op {
        OpKind::AllReduce(op) => format!("all_reduce_{op}"),
        OpKind::AllGather { .. } => "all_gather".into(),
        OpKind::ReduceScatter { op, .. } => format!("reduce_scatter_{op}"),
        OpKind::Permute { .. } => "collective_permute".into(),
        OpKind::Broadcast { .. } => "broadcast".into(),
        OpKind::GatherV { .. } => "all_gatherv".into(),
        OpKind::PadTo { .. } => "pad".into(),
        OpKind::Slice { .. } => "slice".into(),
    };
    let mut out = format!(
        "module @dist_{name} attributes {{mhlo.num_partitions = 1 : i32, mhlo.num_replicas = {n} : i32}} {{\n  func.func public @main(%arg0: {in_ty}) -> {out_ty} {{\n"
    );
    for l in &b.lines {
        out.push_str(l);
        out.push('\n');
    }
    out.push_str(&format!("    func.return {y} : {out_ty}\n  }}\n}}\n"));
    Ok(out)
}

fn float_lit(n: usize) -> String {
    // MLIR prints float literals as 2.000000e+00
    let s = format!("{:.6e}", n as f64);
    let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
    let e: i32 = e.parse().unwrap_or(0);
    format!("{m}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs())
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_len(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_varint(out, ((field << 3) | 2) as u64);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_int(out: &mut Vec<u8>, field: u32, v: i64) {
    put_varint(out, (field << 3) as u64);
    put_varint(out, v as u64);
}

/// The serialized `xla.CompileOptionsProto` for a program over `devices` (replica `i` on
/// global device `devices[i]`), one partition:
///
/// ```text
/// CompileOptionsProto { executable_build_options (3): ExecutableBuildOptionsProto {
///   device_ordinal (1) = -1, num_replicas (4) = n, num_partitions (5) = 1,
///   device_assignment (9): DeviceAssignmentProto { replica_count (1) = n, computation_count (2) = 1,
///     computation_devices (3): { replica_device_ids (1, packed) = devices } } } }
/// ```
pub fn compile_options(devices: &[i64]) -> Vec<u8> {
    let n = devices.len() as i64;
    let mut ids = Vec::new();
    for &d in devices {
        put_varint(&mut ids, d as u64);
    }
    let mut comp = Vec::new();
    put_len(&mut comp, 1, &ids);
    let mut da = Vec::new();
    put_int(&mut da, 1, n);
    put_int(&mut da, 2, 1);
    put_len(&mut da, 3, &comp);
    let mut ebo = Vec::new();
    put_int(&mut ebo, 1, -1);
    put_int(&mut ebo, 4, n);
    put_int(&mut ebo, 5, 1);
    put_len(&mut ebo, 9, &da);
    let mut out = Vec::new();
    put_len(&mut out, 3, &ebo);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(op: OpKind, dtype: DType, shape: &[usize], n: usize) -> ProgramKey {
        ProgramKey {
            op,
            dtype,
            shape: shape.to_vec(),
            replica_groups: vec![(0..n).collect()],
            devices: (0..n as i64).collect(),
        }
    }

    #[test]
    fn golden_all_reduce_sum() {
        let t = key(OpKind::AllReduce(ReduceOp::Sum), DType::F32, &[4], 2)
            .text()
            .unwrap();
        assert_eq!(
            t,
            r#"module @dist_all_reduce_sum attributes {mhlo.num_partitions = 1 : i32, mhlo.num_replicas = 2 : i32} {
  func.func public @main(%arg0: tensor<4xf32>) -> tensor<4xf32> {
    %0 = "stablehlo.all_reduce"(%arg0) ({
    ^bb0(%a: tensor<f32>, %b: tensor<f32>):
      %r = "stablehlo.add"(%a, %b) : (tensor<f32>, tensor<f32>) -> tensor<f32>
      "stablehlo.return"(%r) : (tensor<f32>) -> ()
    }) {replica_groups = dense<[[0, 1]]> : tensor<1x2xi64>} : (tensor<4xf32>) -> tensor<4xf32>
    func.return %0 : tensor<4xf32>
  }
}
"#
        );
    }

    #[test]
    fn golden_all_reduce_avg_divides_by_the_replica_count() {
        let t = key(OpKind::AllReduce(ReduceOp::Avg), DType::BF16, &[2, 3], 4)
            .text()
            .unwrap();
        assert!(t.contains("\"stablehlo.add\""), "{t}");
        assert!(
            t.contains("%1 = \"stablehlo.constant\"() {value = dense<4.000000e+00> : tensor<2x3xbf16>} : () -> tensor<2x3xbf16>"),
            "{t}"
        );
        assert!(
            t.contains("%2 = \"stablehlo.divide\"(%0, %1) : (tensor<2x3xbf16>, tensor<2x3xbf16>) -> tensor<2x3xbf16>"),
            "{t}"
        );
        assert!(t.contains("func.return %2 : tensor<2x3xbf16>"), "{t}");
        let t = key(OpKind::AllReduce(ReduceOp::Avg), DType::I32, &[5], 3)
            .text()
            .unwrap();
        assert!(t.contains("dense<3> : tensor<5xi32>"), "{t}");
        for (op, name) in [
            (ReduceOp::Prod, "multiply"),
            (ReduceOp::Max, "maximum"),
            (ReduceOp::Min, "minimum"),
        ] {
            let t = key(OpKind::AllReduce(op), DType::U8, &[7], 2)
                .text()
                .unwrap();
            assert!(
                t.contains(&format!(
                    "\"stablehlo.{name}\"(%a, %b) : (tensor<ui8>, tensor<ui8>) -> tensor<ui8>"
                )),
                "{t}"
            );
        }
    }

    #[test]
    fn float_literals_print_as_mlir_does() {
        assert_eq!(float_lit(1), "1.000000e+00");
        assert_eq!(float_lit(4), "4.000000e+00");
        assert_eq!(float_lit(16), "1.600000e+01");
        assert_eq!(float_lit(1024), "1.024000e+03");
    }

    #[test]
    fn golden_all_gather_and_reduce_scatter_any_dim() {
        let k = key(OpKind::AllGather { dim: 1 }, DType::F16, &[2, 3, 4], 2);
        assert_eq!(k.output_shape(), vec![2, 6, 4]);
        let t = k.text().unwrap();
        assert!(t.contains("%0 = \"stablehlo.all_gather\"(%arg0) {all_gather_dim = 1 : i64, replica_groups = dense<[[0, 1]]> : tensor<1x2xi64>} : (tensor<2x3x4xf16>) -> tensor<2x6x4xf16>"), "{t}");
        let k = key(
            OpKind::ReduceScatter {
                dim: 2,
                op: ReduceOp::Sum,
            },
            DType::I64,
            &[2, 3, 8],
            4,
        );
        assert_eq!(k.output_shape(), vec![2, 3, 2]);
        let t = k.text().unwrap();
        assert!(t.contains("{replica_groups = dense<[[0, 1, 2, 3]]> : tensor<1x4xi64>, scatter_dimension = 2 : i64} : (tensor<2x3x8xi64>) -> tensor<2x3x2xi64>"), "{t}");
        assert!(t.contains("\"stablehlo.reduce_scatter\"(%arg0) ({"), "{t}");
    }

    #[test]
    fn golden_fp8_moves_as_bytes_and_is_not_reduced() {
        let t = key(OpKind::AllGather { dim: 0 }, DType::F8E4M3, &[5], 2)
            .text()
            .unwrap();
        assert!(
            t.contains(
                "%0 = \"stablehlo.bitcast_convert\"(%arg0) : (tensor<5xf8E4M3FN>) -> tensor<5xui8>"
            ),
            "{t}"
        );
        assert!(t.contains("%1 = \"stablehlo.all_gather\"(%0)"), "{t}");
        assert!(
            t.contains(
                "%2 = \"stablehlo.bitcast_convert\"(%1) : (tensor<10xui8>) -> tensor<10xf8E4M3FN>"
            ),
            "{t}"
        );
        assert!(
            key(OpKind::AllReduce(ReduceOp::Sum), DType::F8E5M2, &[5], 2)
                .text()
                .is_err()
        );
    }

    #[test]
    fn golden_send_recv_permute_and_broadcast() {
        let t = key(
            OpKind::Permute {
                pairs: vec![(0, 1)],
            },
            DType::F32,
            &[3],
            2,
        )
        .text()
        .unwrap();
        assert!(t.contains("\"stablehlo.collective_permute\"(%arg0) {source_target_pairs = dense<[[0, 1]]> : tensor<1x2xi64>} : (tensor<3xf32>) -> tensor<3xf32>"), "{t}");
        let t = key(OpKind::Broadcast { src: 0 }, DType::U8, &[2, 2], 1)
            .text()
            .unwrap();
        assert!(
            t.contains(
                "\"stablehlo.bitcast_convert\"(%arg0) : (tensor<2x2xui8>) -> tensor<2x2xui8>"
            ),
            "{t}"
        );
        let t = key(OpKind::Broadcast { src: 2 }, DType::BF16, &[3], 4)
            .text()
            .unwrap();
        assert_eq!(
            t,
            r#"module @dist_broadcast attributes {mhlo.num_partitions = 1 : i32, mhlo.num_replicas = 4 : i32} {
  func.func public @main(%arg0: tensor<3xbf16>) -> tensor<3xbf16> {
    %0 = "stablehlo.replica_id"() : () -> tensor<ui32>
    %1 = "stablehlo.constant"() {value = dense<2> : tensor<ui32>} : () -> tensor<ui32>
    %2 = "stablehlo.compare"(%0, %1) {comparison_direction = #stablehlo<comparison_direction EQ>} : (tensor<ui32>, tensor<ui32>) -> tensor<i1>
    %3 = "stablehlo.bitcast_convert"(%arg0) : (tensor<3xbf16>) -> tensor<3x2xui8>
    %4 = "stablehlo.constant"() {value = dense<0> : tensor<3x2xui8>} : () -> tensor<3x2xui8>
    %5 = "stablehlo.select"(%2, %3, %4) : (tensor<i1>, tensor<3x2xui8>, tensor<3x2xui8>) -> tensor<3x2xui8>
    %6 = "stablehlo.all_reduce"(%5) ({
    ^bb0(%a: tensor<ui8>, %b: tensor<ui8>):
      %r = "stablehlo.add"(%a, %b) : (tensor<ui8>, tensor<ui8>) -> tensor<ui8>
      "stablehlo.return"(%r) : (tensor<ui8>) -> ()
    }) {replica_groups = dense<[[0, 1, 2, 3]]> : tensor<1x4xi64>} : (tensor<3x2xui8>) -> tensor<3x2xui8>
    %7 = "stablehlo.bitcast_convert"(%6) : (tensor<3x2xui8>) -> tensor<3xbf16>
    func.return %7 : tensor<3xbf16>
  }
}
"#
        );
    }

    #[test]
    fn golden_gatherv_pad_and_slice() {
        // rank sizes [1, 0, 3] along dim 1, padded to 3
        let k = key(
            OpKind::GatherV {
                dim: 1,
                sizes: vec![1, 0, 3],
            },
            DType::I32,
            &[2, 3],
            3,
        );
        assert_eq!(k.output_shape(), vec![2, 4]);
        let t = k.text().unwrap();
        assert!(t.contains("-> tensor<2x9xi32>"), "{t}");
        assert!(t.contains("%1 = \"stablehlo.slice\"(%0) {limit_indices = array<i64: 2, 1>, start_indices = array<i64: 0, 0>, strides = array<i64: 1, 1>} : (tensor<2x9xi32>) -> tensor<2x1xi32>"), "{t}");
        assert!(t.contains("%2 = \"stablehlo.slice\"(%0) {limit_indices = array<i64: 2, 9>, start_indices = array<i64: 0, 6>, strides = array<i64: 1, 1>} : (tensor<2x9xi32>) -> tensor<2x3xi32>"), "{t}");
        assert!(t.contains("%3 = \"stablehlo.concatenate\"(%1, %2) {dimension = 1 : i64} : (tensor<2x1xi32>, tensor<2x3xi32>) -> tensor<2x4xi32>"), "{t}");
        let k = ProgramKey {
            devices: vec![7],
            replica_groups: vec![vec![0]],
            ..key(OpKind::PadTo { dim: 0, len: 3 }, DType::F32, &[1, 2], 1)
        };
        let t = k.text().unwrap();
        assert!(t.contains("mhlo.num_replicas = 1 : i32"), "{t}");
        assert!(t.contains("%0 = \"stablehlo.constant\"() {value = dense<0.000000e+00> : tensor<f32>} : () -> tensor<f32>"), "{t}");
        assert!(t.contains("%1 = \"stablehlo.pad\"(%arg0, %0) {edge_padding_high = array<i64: 2, 0>, edge_padding_low = array<i64: 0, 0>, interior_padding = array<i64: 0, 0>} : (tensor<1x2xf32>, tensor<f32>) -> tensor<3x2xf32>"), "{t}");
        let t = key(
            OpKind::Slice {
                dim: 0,
                start: 1,
                len: 2,
            },
            DType::U8,
            &[4],
            1,
        )
        .text()
        .unwrap();
        assert!(t.contains("{limit_indices = array<i64: 3>, start_indices = array<i64: 1>, strides = array<i64: 1>} : (tensor<4xui8>) -> tensor<2xui8>"), "{t}");
        assert!(key(
            OpKind::Slice {
                dim: 0,
                start: 3,
                len: 2
            },
            DType::U8,
            &[4],
            1
        )
        .text()
        .is_err());
    }

    #[test]
    fn zero_d_tensors_print_without_dims() {
        assert_eq!(tensor_ty(&[], "f32"), "tensor<f32>");
        assert_eq!(tensor_ty(&[0, 3], "i8"), "tensor<0x3xi8>");
    }

    #[test]
    fn compile_options_bytes() {
        // devices [0, 1]: hand-encoded protobuf
        let b = compile_options(&[0, 1]);
        let ebo: Vec<u8> = [
            vec![0x08],
            vec![0xff; 9],
            vec![0x01],                               // device_ordinal = -1
            vec![0x20, 0x02],                         // num_replicas = 2
            vec![0x28, 0x01],                         // num_partitions = 1
            vec![0x4a, 0x0a],                         // device_assignment, 10 bytes
            vec![0x08, 0x02, 0x10, 0x01],             // replica_count 2, computation_count 1
            vec![0x1a, 0x04, 0x0a, 0x02, 0x00, 0x01], // computation_devices { ids [0, 1] }
        ]
        .concat();
        let mut want = vec![0x1a, ebo.len() as u8];
        want.extend(ebo);
        assert_eq!(b, want);
        // a large device id is a multi-byte varint
        let b = compile_options(&[300]);
        assert!(b.windows(3).any(|w| w == [0x02, 0xac, 0x02]), "{b:x?}");
    }

    #[test]
    fn cache_keys_separate_what_compiles_differently() {
        use std::collections::HashSet;
        let base = key(OpKind::AllReduce(ReduceOp::Sum), DType::F32, &[4], 2);
        let mut set = HashSet::new();
        set.insert(base.clone());
        assert!(!set.insert(base.clone()), "same key twice");
        let variants = [
            ProgramKey {
                op: OpKind::AllReduce(ReduceOp::Max),
                ..base.clone()
            },
            ProgramKey {
                dtype: DType::BF16,
                ..base.clone()
            },
            ProgramKey {
                shape: vec![5],
                ..base.clone()
            },
            ProgramKey {
                shape: vec![4, 1],
                ..base.clone()
            },
            ProgramKey {
                replica_groups: vec![vec![0], vec![1]],
                ..base.clone()
            },
            ProgramKey {
                devices: vec![1, 0],
                ..base.clone()
            },
        ];
        for v in variants {
            assert!(set.insert(v.clone()), "{v:?} collided");
        }
        assert_eq!(set.len(), 7);
    }
}
