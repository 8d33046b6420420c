//! candle dtypes and dist dtypes.

use candle_core::DType as C;
use dist_core::DType as D;

use crate::{Error, Result};

/// The dist dtype of a candle dtype; `I16` and candle's sub-byte and e8m0 types have none.
pub fn to_dist(dtype: C) -> Option<D> {
    Some(match dtype {
        C::U8 => D::U8,
        C::U32 => D::U32,
        C::I32 => D::I32,
        C::I64 => D::I64,
        C::F16 => D::F16,
        C::BF16 => D::BF16,
        C::F32 => D::F32,
        C::F64 => D::F64,
        C::F8E4M3 => D::F8E4M3,
        _ => return None,
    })
}

/// The candle dtype of a dist dtype; `I8`, `U64` and `F8E5M2` have none in candle.
pub fn to_candle(dtype: D) -> Option<C> {
    Some(match dtype {
        D::U8 => C::U8,
        D::U32 => C::U32,
        D::I32 => C::I32,
        D::I64 => C::I64,
        D::F16 => C::F16,
        D::BF16 => C::BF16,
        D::F32 => C::F32,
        D::F64 => C::F64,
        D::F8E4M3 => C::F8E4M3,
        _ => return None,
    })
}

/// [`to_dist`], or the typed error naming the op.
pub(crate) fn dist_dtype(op: &'static str, dtype: C) -> Result<D> {
    to_dist(dtype).ok_or_else(|| Error::DType {
        op,
        dtype,
        why: "has no dist equivalent (dist moves u8, u32, i32, i64, f16, bf16, f32, f64 and fp8 e4m3)"
            .into(),
    })
}

/// Refuses a reduction of a dtype that cannot be reduced (fp8 moves as bytes only).
pub(crate) fn ensure_reducible(op: &'static str, dtype: C) -> Result<()> {
    if dist_dtype(op, dtype)?.is_reducible() {
        return Ok(());
    }
    Err(Error::DType {
        op,
        dtype,
        why: "cannot be reduced (fp8 is moved as bytes only; convert to f16, bf16 or f32 first)"
            .into(),
    })
}

/// Refuses an output whose dtype is not the input's.
pub(crate) fn ensure_same(op: &'static str, input: C, output: C) -> Result<()> {
    if input == output {
        return Ok(());
    }
    Err(Error::DType {
        op,
        dtype: output,
        why: format!("cannot receive the result of a {input:?} input"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        // Every dist dtype but the three candle lacks maps, and back to itself.
        let mut mapped = 0;
        for d in D::ALL {
            match to_candle(d) {
                Some(c) => {
                    assert_eq!(to_dist(c), Some(d), "{d}");
                    mapped += 1;
                }
                None => assert!(
                    matches!(d, D::I8 | D::U64 | D::F8E5M2),
                    "{d} has no candle dtype"
                ),
            }
        }
        assert_eq!(mapped, D::ALL.len() - 3);
        for c in [C::I16, C::F6E2M3, C::F6E3M2, C::F4, C::F8E8M0] {
            assert_eq!(to_dist(c), None);
        }
        assert!(matches!(
            ensure_reducible("all_reduce", C::F8E4M3),
            Err(Error::DType { .. })
        ));
        assert!(ensure_reducible("all_reduce", C::BF16).is_ok());
    }
}
