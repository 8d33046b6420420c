//! Mappings from the workspace's vocabulary to NCCL's enums, as pure functions.

use dist_core::{DType, Error, ReduceOp, Result};

use crate::sys;

/// NCCL's data type for `dtype` in a collective. fp8 maps to NCCL's native fp8 types
/// (e4m3 = 10, e5m2 = 11; NCCL >= 2.24), which only reductions need: data movement of fp8
/// goes as bytes (see [`wire_dtype`]).
pub fn nccl_dtype(dtype: DType) -> Result<sys::ncclDataType_t> {
    Ok(match dtype {
        DType::I8 => sys::ncclInt8,
        DType::U8 => sys::ncclUint8,
        DType::I32 => sys::ncclInt32,
        DType::U32 => sys::ncclUint32,
        DType::I64 => sys::ncclInt64,
        DType::U64 => sys::ncclUint64,
        DType::F16 => sys::ncclFloat16,
        DType::F32 => sys::ncclFloat32,
        DType::F64 => sys::ncclFloat64,
        DType::BF16 => sys::ncclBfloat16,
        DType::F8E4M3 => sys::ncclFloat8e4m3,
        DType::F8E5M2 => sys::ncclFloat8e5m2,
        other => {
            return Err(Error::unsupported(format!(
                "NCCL has no data type for {other}"
            )))
        }
    })
}

/// The data type and element count with which `numel` elements of `dtype` travel when nothing
/// is reduced (gather, broadcast, send/recv): fp8 goes as `uint8` (as vLLM's pynccl does for
/// send/recv), so it works on NCCL versions without fp8 types; everything else as itself.
pub fn wire_dtype(dtype: DType, numel: usize) -> Result<(sys::ncclDataType_t, usize)> {
    match dtype {
        DType::F8E4M3 | DType::F8E5M2 => Ok((sys::ncclUint8, numel)),
        d => Ok((nccl_dtype(d)?, numel)),
    }
}

/// NCCL's reduction operator. `Avg` needs NCCL >= 2.10 (`version_code >= 21000`).
pub fn nccl_op(op: ReduceOp) -> sys::ncclRedOp_t {
    match op {
        ReduceOp::Sum => sys::ncclSum,
        ReduceOp::Prod => sys::ncclProd,
        ReduceOp::Max => sys::ncclMax,
        ReduceOp::Min => sys::ncclMin,
        ReduceOp::Avg => sys::ncclAvg,
    }
}

/// Checks that `dtype` can be reduced with `op` by a library of `version_code`.
pub fn check_reduction(dtype: DType, op: ReduceOp, version_code: i32) -> Result<()> {
    if !dtype.is_reducible() {
        return Err(Error::invalid(format!("cannot reduce {dtype}")));
    }
    if op == ReduceOp::Avg && version_code < 21000 {
        return Err(Error::unsupported(format!(
            "ReduceOp::Avg needs NCCL >= 2.10, loaded {}",
            crate::format_version(version_code)
        )));
    }
    if dtype == DType::BF16 && version_code < 21000 {
        return Err(Error::unsupported("bf16 needs NCCL >= 2.10"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_values_are_ncclh() {
        let want = [
            (DType::I8, 0),
            (DType::U8, 1),
            (DType::I32, 2),
            (DType::U32, 3),
            (DType::I64, 4),
            (DType::U64, 5),
            (DType::F16, 6),
            (DType::F32, 7),
            (DType::F64, 8),
            (DType::BF16, 9),
            (DType::F8E4M3, 10),
            (DType::F8E5M2, 11),
        ];
        for (d, v) in want {
            assert_eq!(nccl_dtype(d).unwrap(), v, "{d}");
        }
        // Every dtype the workspace has maps.
        for d in DType::ALL {
            nccl_dtype(d).unwrap();
        }
    }

    #[test]
    fn fp8_travels_as_bytes() {
        assert_eq!(wire_dtype(DType::F8E4M3, 7).unwrap(), (1, 7));
        assert_eq!(wire_dtype(DType::F8E5M2, 7).unwrap(), (1, 7));
        assert_eq!(wire_dtype(DType::BF16, 7).unwrap(), (9, 7));
    }

    #[test]
    fn op_values_and_checks() {
        let got: Vec<_> = ReduceOp::ALL.iter().map(|o| nccl_op(*o)).collect();
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
        assert!(check_reduction(DType::F8E4M3, ReduceOp::Sum, 22703).is_err());
        assert!(check_reduction(DType::F32, ReduceOp::Avg, 20903).is_err());
        check_reduction(DType::F32, ReduceOp::Avg, 21903).unwrap();
        check_reduction(DType::BF16, ReduceOp::Max, 22703).unwrap();
    }
}
