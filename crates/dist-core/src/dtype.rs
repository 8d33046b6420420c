//! Element types, reduction operators and the reduction kernel the host backends share (the
//! oracles in [`crate::reference`] compute the same contract independently).

use half::{bf16, f16};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The element types a tensor may hold. The discriminants are NCCL's `ncclDataType_t`
/// values where NCCL has the type (fp8 e5m2 is 11 as in NCCL ≥ 2.24).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum DType {
    /// `i8`
    I8,
    /// `u8`
    U8,
    /// `i32`
    I32,
    /// `u32`
    U32,
    /// `i64`
    I64,
    /// `u64`
    U64,
    /// IEEE half precision.
    F16,
    /// `f32`
    F32,
    /// `f64`
    F64,
    /// bfloat16.
    BF16,
    /// fp8 e4m3 (fn). Moved as bytes; not reducible on the host.
    F8E4M3,
    /// fp8 e5m2. Moved as bytes; not reducible on the host.
    F8E5M2,
}

impl DType {
    /// Every dtype, in NCCL order.
    pub const ALL: [DType; 12] = [
        DType::I8,
        DType::U8,
        DType::I32,
        DType::U32,
        DType::I64,
        DType::U64,
        DType::F16,
        DType::F32,
        DType::F64,
        DType::BF16,
        DType::F8E4M3,
        DType::F8E5M2,
    ];

    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::I8 | DType::U8 | DType::F8E4M3 | DType::F8E5M2 => 1,
            DType::F16 | DType::BF16 => 2,
            DType::I32 | DType::U32 | DType::F32 => 4,
            DType::I64 | DType::U64 | DType::F64 => 8,
        }
    }

    /// The short name used in tables and on the command line (`f32`, `bf16`, `fp8e4m3`…).
    pub const fn name(self) -> &'static str {
        match self {
            DType::I8 => "i8",
            DType::U8 => "u8",
            DType::I32 => "i32",
            DType::U32 => "u32",
            DType::I64 => "i64",
            DType::U64 => "u64",
            DType::F16 => "f16",
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::BF16 => "bf16",
            DType::F8E4M3 => "fp8e4m3",
            DType::F8E5M2 => "fp8e5m2",
        }
    }

    /// True for the floating-point types.
    pub const fn is_float(self) -> bool {
        matches!(
            self,
            DType::F16 | DType::F32 | DType::F64 | DType::BF16 | DType::F8E4M3 | DType::F8E5M2
        )
    }

    /// True when host reductions are defined for this type (every type but fp8).
    pub const fn is_reducible(self) -> bool {
        !matches!(self, DType::F8E4M3 | DType::F8E5M2)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let d = match s.to_ascii_lowercase().as_str() {
            "i8" | "int8" => DType::I8,
            "u8" | "uint8" => DType::U8,
            "i32" | "int32" | "int" => DType::I32,
            "u32" | "uint32" => DType::U32,
            "i64" | "int64" | "long" => DType::I64,
            "u64" | "uint64" => DType::U64,
            "f16" | "fp16" | "float16" | "half" => DType::F16,
            "f32" | "fp32" | "float32" | "float" => DType::F32,
            "f64" | "fp64" | "float64" | "double" => DType::F64,
            "bf16" | "bfloat16" => DType::BF16,
            "fp8e4m3" | "f8e4m3" | "float8_e4m3fn" => DType::F8E4M3,
            "fp8e5m2" | "f8e5m2" | "float8_e5m2" => DType::F8E5M2,
            other => return Err(Error::invalid(format!("unknown dtype '{other}'"))),
        };
        Ok(d)
    }
}

/// Reduction operators. Discriminants are NCCL's `ncclRedOp_t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum ReduceOp {
    /// Sum (integers wrap, as in torch and NCCL).
    #[default]
    Sum,
    /// Product.
    Prod,
    /// Maximum.
    Max,
    /// Minimum.
    Min,
    /// Sum divided by the world size (integer division for integer types).
    Avg,
}

impl ReduceOp {
    /// Every operator.
    pub const ALL: [ReduceOp; 5] = [
        ReduceOp::Sum,
        ReduceOp::Prod,
        ReduceOp::Max,
        ReduceOp::Min,
        ReduceOp::Avg,
    ];
    /// Lower-case name (`sum`, `prod`, …).
    pub const fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Prod => "prod",
            ReduceOp::Max => "max",
            ReduceOp::Min => "min",
            ReduceOp::Avg => "avg",
        }
    }
}

impl std::fmt::Display for ReduceOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ReduceOp {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "sum" => ReduceOp::Sum,
            "prod" | "product" => ReduceOp::Prod,
            "max" => ReduceOp::Max,
            "min" => ReduceOp::Min,
            "avg" | "mean" => ReduceOp::Avg,
            other => return Err(Error::invalid(format!("unknown reduce op '{other}'"))),
        })
    }
}

/// A host element type with a [`DType`] and the arithmetic reductions need.
///
/// Reductions run in the accumulator type `Acc` (f32 for the half types) and are rounded once
/// at the end, combining ranks in ascending order, so every rank computes bit-identical results
/// (and [`crate::reference`], which implements the same contract separately, checks them bit for
/// bit).
pub trait Element: bytemuck::Pod + PartialEq + std::fmt::Debug + Send + Sync + 'static {
    /// The dtype tag.
    const DTYPE: DType;
    /// Accumulator type.
    type Acc: Copy + Default + Send + Sync;
    /// Widen to the accumulator.
    fn to_acc(self) -> Self::Acc;
    /// Round from the accumulator.
    fn from_acc(a: Self::Acc) -> Self;
    /// `a op b` in the accumulator (`Avg` combines as `Sum`).
    fn combine(a: Self::Acc, b: Self::Acc, op: ReduceOp) -> Self::Acc;
    /// Divide the accumulator by the world size (for `Avg`).
    fn div(a: Self::Acc, n: usize) -> Self::Acc;
    /// A value made from a small integer (for tests and fills).
    fn from_i64(v: i64) -> Self;
    /// The value as f64 (for tolerance checks and reports).
    fn to_f64(self) -> f64;
    /// A random-ish value from a 64-bit word, within a range that sums of up to 64 ranks keep exact
    /// for integer types and finite for floats.
    fn from_bits_sample(bits: u64) -> Self;
}

/// [`Element`] for a primitive type that accumulates in itself: `$add` and `$mul` are its sum
/// and product (wrapping for the integers, as in torch and NCCL), `$sample` its
/// [`Element::from_bits_sample`] of the word `$bits`.
macro_rules! native_elem {
    ($t:ty, $d:expr, $add:expr, $mul:expr, |$bits:ident| $sample:expr) => {
        impl Element for $t {
            const DTYPE: DType = $d;
            type Acc = $t;
            #[inline(always)]
            fn to_acc(self) -> $t {
                self
            }
            #[inline(always)]
            fn from_acc(a: $t) -> $t {
                a
            }
            #[inline(always)]
            fn combine(a: $t, b: $t, op: ReduceOp) -> $t {
                match op {
                    ReduceOp::Sum | ReduceOp::Avg => ($add)(a, b),
                    ReduceOp::Prod => ($mul)(a, b),
                    ReduceOp::Max => a.max(b),
                    ReduceOp::Min => a.min(b),
                }
            }
            #[inline(always)]
            fn div(a: $t, n: usize) -> $t {
                a / n as $t
            }
            fn from_i64(v: i64) -> $t {
                v as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn from_bits_sample($bits: u64) -> $t {
                $sample
            }
        }
    };
}

/// A float sample: uniform in [-2, 2).
fn float_sample(bits: u64) -> f64 {
    (bits >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0
}

/// An integer sample: uniform in [-r, r].
fn int_sample(bits: u64, r: i64) -> i64 {
    (bits % (2 * r as u64 + 1)) as i64 - r
}

macro_rules! float_elem {
    ($t:ty, $d:expr) => {
        native_elem!($t, $d, std::ops::Add::add, std::ops::Mul::mul, |bits| {
            float_sample(bits) as $t
        });
    };
}
float_elem!(f32, DType::F32);
float_elem!(f64, DType::F64);

macro_rules! half_elem {
    ($t:ty, $d:expr) => {
        impl Element for $t {
            const DTYPE: DType = $d;
            type Acc = f32;
            #[inline(always)]
            fn to_acc(self) -> f32 {
                self.to_f32()
            }
            #[inline(always)]
            fn from_acc(a: f32) -> $t {
                <$t>::from_f32(a)
            }
            #[inline(always)]
            fn combine(a: f32, b: f32, op: ReduceOp) -> f32 {
                <f32 as Element>::combine(a, b, op)
            }
            #[inline(always)]
            fn div(a: f32, n: usize) -> f32 {
                a / n as f32
            }
            fn from_i64(v: i64) -> $t {
                <$t>::from_f32(v as f32)
            }
            fn to_f64(self) -> f64 {
                <$t>::to_f64(self)
            }
            fn from_bits_sample(bits: u64) -> $t {
                <$t>::from_f32(<f32 as Element>::from_bits_sample(bits))
            }
        }
    };
}
half_elem!(f16, DType::F16);
half_elem!(bf16, DType::BF16);

macro_rules! int_elem {
    ($t:ty, $d:expr, $range:expr) => {
        native_elem!($t, $d, <$t>::wrapping_add, <$t>::wrapping_mul, |bits| {
            int_sample(bits, $range) as $t
        });
    };
}
int_elem!(i8, DType::I8, 1);
int_elem!(u8, DType::U8, 1);
int_elem!(i32, DType::I32, 1000);
int_elem!(u32, DType::U32, 1000);
int_elem!(i64, DType::I64, 1_000_000);
int_elem!(u64, DType::U64, 1_000_000);

/// Block length of [`reduce_slices`]; chosen so the accumulator block stays in L1.
const BLOCK: usize = 512;

/// `out[i] = inputs[0][i] op inputs[1][i] op … op inputs[n-1][i]` (then `/ n` for `Avg`).
///
/// Ranks are combined in slice order in the accumulator type and rounded once, so the result is
/// the same bits whoever computes it. The loops are written to auto-vectorise: one pass over each
/// input per block of 512 elements.
///
/// `out` may alias none of the inputs (callers with an in-place buffer reduce into a scratch block).
pub fn reduce_slices<T: Element>(out: &mut [T], inputs: &[&[T]], op: ReduceOp) {
    let n = inputs.len();
    assert!(n > 0, "reduce_slices needs at least one input");
    for s in inputs {
        assert_eq!(s.len(), out.len(), "reduce_slices: length mismatch");
    }
    let mut acc = [T::Acc::default(); BLOCK];
    let mut start = 0;
    while start < out.len() {
        let len = BLOCK.min(out.len() - start);
        let acc = &mut acc[..len];
        for (a, x) in acc.iter_mut().zip(&inputs[0][start..start + len]) {
            *a = x.to_acc();
        }
        for s in &inputs[1..] {
            for (a, x) in acc.iter_mut().zip(&s[start..start + len]) {
                *a = T::combine(*a, x.to_acc(), op);
            }
        }
        let o = &mut out[start..start + len];
        if op == ReduceOp::Avg {
            for (y, a) in o.iter_mut().zip(acc.iter()) {
                *y = T::from_acc(T::div(*a, n));
            }
        } else {
            for (y, a) in o.iter_mut().zip(acc.iter()) {
                *y = T::from_acc(*a);
            }
        }
        start += len;
    }
}

/// Calls `$body` with the type alias `$T` bound to the host element type of `$dtype`;
/// returns [`Error::Unsupported`] from the enclosing function for fp8.
#[macro_export]
macro_rules! dispatch_dtype {
    ($dtype:expr, $T:ident => $body:expr) => {
        $crate::dispatch_dtype!(@arms $dtype, $T => $body;
            F32 = f32, F64 = f64, F16 = $crate::half::f16, BF16 = $crate::half::bf16,
            I8 = i8, U8 = u8, I32 = i32, U32 = u32, I64 = i64, U64 = u64)
    };
    (@arms $dtype:expr, $T:ident => $body:expr; $($variant:ident = $ty:ty),*) => {{
        match $dtype {
            $($crate::DType::$variant => {
                type $T = $ty;
                $body
            })*
            other => {
                return Err($crate::Error::unsupported(format!(
                    "host arithmetic on {other} (fp8 is moved as bytes only)"
                )))
            }
        }
    }};
}

/// Reduces byte buffers of `dtype` elements: `out = inputs[0] op … op inputs[n-1]`.
///
/// The byte slices must be aligned for `dtype` (host tensors and shared segments are).
pub fn reduce_bytes(dtype: DType, out: &mut [u8], inputs: &[&[u8]], op: ReduceOp) -> Result<()> {
    dispatch_dtype!(dtype, T => {
        let o: &mut [T] = bytemuck::try_cast_slice_mut(out)
            .map_err(|e| Error::invalid(format!("reduce output not a {dtype} slice: {e}")))?;
        let ins: Vec<&[T]> = inputs
            .iter()
            .map(|b| bytemuck::try_cast_slice(b))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error::invalid(format!("reduce input not a {dtype} slice: {e}")))?;
        reduce_slices(o, &ins, op);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(DType::BF16.size(), 2);
        assert_eq!(DType::F8E5M2.size(), 1);
        assert_eq!(DType::U64.size(), 8);
        for d in DType::ALL {
            assert_eq!(d.name().parse::<DType>().unwrap(), d);
        }
    }

    #[test]
    fn reduce_ops_small() {
        let a = [1i32, 5, -3];
        let b = [2i32, -7, 4];
        let c = [3i32, 1, 0];
        let mut o = [0i32; 3];
        reduce_slices(&mut o, &[&a, &b, &c], ReduceOp::Sum);
        assert_eq!(o, [6, -1, 1]);
        reduce_slices(&mut o, &[&a, &b, &c], ReduceOp::Max);
        assert_eq!(o, [3, 5, 4]);
        reduce_slices(&mut o, &[&a, &b, &c], ReduceOp::Min);
        assert_eq!(o, [1, -7, -3]);
        reduce_slices(&mut o, &[&a, &b, &c], ReduceOp::Prod);
        assert_eq!(o, [6, -35, 0]);
        reduce_slices(&mut o, &[&a, &b, &c], ReduceOp::Avg);
        assert_eq!(o, [2, 0, 0]);
    }

    #[test]
    fn half_accumulates_in_f32() {
        // 2048 + 1 + 1 in f16 step by step would stay 2048; in f32 it is 2050.
        let a = [f16::from_f32(2048.0)];
        let b = [f16::from_f32(1.0)];
        let mut o = [f16::ZERO];
        reduce_slices(&mut o, &[&a, &b, &b], ReduceOp::Sum);
        assert_eq!(o[0].to_f32(), 2050.0);
    }

    #[test]
    fn long_and_odd_lengths() {
        for len in [0usize, 1, 7, 511, 512, 513, 2000] {
            let a: Vec<f32> = (0..len).map(|i| i as f32).collect();
            let b: Vec<f32> = (0..len).map(|i| 2.0 * i as f32).collect();
            let mut o = vec![0f32; len];
            reduce_slices(&mut o, &[&a, &b], ReduceOp::Sum);
            for (i, v) in o.iter().enumerate() {
                assert_eq!(*v, 3.0 * i as f32);
            }
        }
    }

    #[test]
    fn fp8_is_not_reducible() {
        let mut o = [0u8; 2];
        let e = reduce_bytes(DType::F8E4M3, &mut o, &[&[1, 2]], ReduceOp::Sum).unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)));
    }
}
