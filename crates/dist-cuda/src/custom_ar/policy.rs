//! vLLM's custom all-reduce rules as pure functions: world sizes, maximum size, per-call
//! eligibility and the one-shot / two-shot choice.

use dist_core::{DType, Error, Result};

/// World sizes the kernels are instantiated for (the C++ side rejects odd sizes and > 8).
pub const WORLD_SIZES: [usize; 4] = [2, 4, 6, 8];
/// Constructor default of `max_size`: 8 MiB.
pub const DEFAULT_MAX_SIZE: usize = 8192 * 1024;
/// `kMaxBlocks`: size of the per-block signal arrays.
pub const MAX_BLOCKS: usize = 36;
/// Default block limit on CUDA.
pub const DEFAULT_BLOCK_LIMIT: usize = 36;
/// Threads per block.
pub const THREADS: usize = 512;
/// `sizeof(Signal)`: `start[36][8]`, `end[36][8]`, `_flag[36]` of u32, each 128-byte aligned.
pub const SIGNAL_BYTES: usize = 2560;
/// `sizeof(RankData)`: 8 pointers.
pub const RANK_DATA_BYTES: usize = 64;
/// The `rank_data` array: 8 MiB of `RankData` entries (131 072 registrations).
pub const RANK_DATA_CAPACITY_BYTES: usize = 8 * 1024 * 1024;
/// Environment switch that disables the custom all-reduce (vLLM: `disable_custom_all_reduce`).
pub const DISABLE_ENV: &str = "DIST_DISABLE_CUSTOM_ALL_REDUCE";
/// Environment variable that forces the algorithm (vLLM: `VLLM_CUSTOM_ALLREDUCE_ALGO`).
pub const ALGO_ENV: &str = "DIST_CUSTOM_ALLREDUCE_ALGO";

/// The two kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Algo {
    /// `cross_device_reduce_1stage`: every rank reads every input and reduces all of it.
    OneShot,
    /// `cross_device_reduce_2stage`: reduce-scatter into scratch, then all-gather.
    TwoShot,
}

/// Parses `DIST_CUSTOM_ALLREDUCE_ALGO`: unset or empty → `None` (automatic); `1stage`/`oneshot`,
/// `2stage`/`twoshot` force one; anything else is an error (vLLM throws).
pub fn parse_algo(v: Option<&str>) -> Result<Option<Algo>> {
    match v.map(str::trim) {
        None | Some("") => Ok(None),
        Some("1stage") | Some("oneshot") => Ok(Some(Algo::OneShot)),
        Some("2stage") | Some("twoshot") => Ok(Some(Algo::TwoShot)),
        Some(other) => Err(Error::invalid(format!(
            "{ALGO_ENV}={other}: expected 1stage, oneshot, 2stage or twoshot"
        ))),
    }
}

/// True when an environment flag is set to a true value (`1`, `true`, `yes`, `on`).
pub fn env_flag(v: Option<&str>) -> bool {
    matches!(
        v.map(|s| s.trim().to_ascii_lowercase()).as_deref(),
        Some("1" | "true" | "yes" | "on")
    )
}

/// The algorithm for one call: forced if given; else one-shot for 2 ranks; fully connected:
/// `(ws <= 4 && bytes < 512 KiB) || (ws <= 8 && bytes < 256 KiB)` → one-shot, else two-shot.
/// `None` where nothing is launched (more than 2 ranks, not fully connected).
pub fn choose_algo(
    world: usize,
    nbytes: usize,
    fully_connected: bool,
    forced: Option<Algo>,
) -> Option<Algo> {
    if world > 2 && !fully_connected {
        return None;
    }
    if let Some(a) = forced {
        return Some(a);
    }
    if world == 2 {
        return Some(Algo::OneShot);
    }
    if (world <= 4 && nbytes < 512 * 1024) || (world <= 8 && nbytes < 256 * 1024) {
        Some(Algo::OneShot)
    } else {
        Some(Algo::TwoShot)
    }
}

/// The torch-symmetric-memory table that caps `max_size` when symmetric memory is active:
/// by compute capability and world size (`None`: no entry, so no cap).
pub fn symm_mem_cap(cc: (i32, i32), world: usize) -> Option<usize> {
    const MIB: usize = 1024 * 1024;
    let row: [usize; 4] = match cc {
        (9, 0) => [64 * MIB, 32 * MIB, MIB / 2, MIB / 4],
        (10, 0) => [2 * MIB, 2 * MIB, MIB, MIB],
        (10, 3) => [4 * MIB, 4 * MIB, 8 * MIB, 4 * MIB],
        _ => return None,
    };
    let i = WORLD_SIZES.iter().position(|w| *w == world)?;
    Some(row[i])
}

/// `max_size` of a communicator: 8 MiB, or `min(table[cc][ws], 8 MiB)` when torch symmetric
/// memory is active on CUDA.
pub fn max_size(cc: (i32, i32), world: usize, symm_mem_active: bool) -> usize {
    match (symm_mem_active, symm_mem_cap(cc, world)) {
        (true, Some(c)) => c.min(DEFAULT_MAX_SIZE),
        _ => DEFAULT_MAX_SIZE,
    }
}

/// Whether a communicator gets a custom all-reduce at all (before any device work): the group
/// name contains `"tp"`, not disabled, world size in {2, 4, 6, 8}, one node.
pub fn should_create(
    group_name: &str,
    disabled: bool,
    world: usize,
    single_node: bool,
) -> Result<(), String> {
    if disabled {
        return Err(format!("{DISABLE_ENV} is set"));
    }
    if !group_name.contains("tp") {
        return Err(format!(
            "group {group_name:?} is not a tensor-parallel group"
        ));
    }
    if !WORLD_SIZES.contains(&world) {
        return Err(format!("world size {world} is not one of {WORLD_SIZES:?}"));
    }
    if !single_node {
        return Err("the group spans several nodes".into());
    }
    Ok(())
}

/// What the group does after exchanging each rank's `(disabled by env, algorithm env valid)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SetupVerdict {
    /// Every rank is willing and valid.
    Go,
    /// These ranks disabled it: nobody creates it (NCCL serves every all-reduce).
    Disabled(Vec<usize>),
    /// These ranks have an invalid algorithm setting: every rank fails alike.
    BadAlgo(Vec<usize>),
}

/// The group's one decision from every rank's `(disabled, algo_ok)`: disabled anywhere wins,
/// then an invalid setting anywhere is an error everywhere.
pub fn setup_verdict(ranks: &[(bool, bool)]) -> SetupVerdict {
    let off: Vec<usize> = (0..ranks.len()).filter(|r| ranks[*r].0).collect();
    if !off.is_empty() {
        return SetupVerdict::Disabled(off);
    }
    let bad: Vec<usize> = (0..ranks.len()).filter(|r| !ranks[*r].1).collect();
    if !bad.is_empty() {
        return SetupVerdict::BadAlgo(bad);
    }
    SetupVerdict::Go
}

/// Dtypes the kernels reduce (bf16 needs sm80+).
pub fn supports_dtype(dtype: DType, cc: (i32, i32)) -> bool {
    match dtype {
        DType::F32 | DType::F16 => true,
        DType::BF16 => cc.0 >= 8,
        _ => false,
    }
}

/// `should_custom_ar`: byte size a multiple of 16, contiguous, `(ws == 2 || fully_connected)`
/// and strictly below `max_size`; plus a dtype the kernels have.
pub fn should_custom_ar(
    nbytes: usize,
    contiguous: bool,
    dtype_ok: bool,
    world: usize,
    fully_connected: bool,
    max_size: usize,
) -> bool {
    dtype_ok
        && nbytes % 16 == 0
        && contiguous
        && (world == 2 || fully_connected)
        && nbytes < max_size
}

/// Launch shape: `(blocks, threads)` for `packed` 16-byte elements.
pub fn launch_shape(packed: usize, block_limit: usize) -> (usize, usize) {
    let blocks = packed
        .div_ceil(THREADS)
        .clamp(1, block_limit.min(MAX_BLOCKS));
    (blocks, THREADS)
}

#[cfg(test)]
mod tests {
    use super::*;
    const KIB: usize = 1024;

    #[test]
    fn algo_env() {
        assert_eq!(parse_algo(None).unwrap(), None);
        assert_eq!(parse_algo(Some("")).unwrap(), None);
        assert_eq!(parse_algo(Some("oneshot")).unwrap(), Some(Algo::OneShot));
        assert_eq!(parse_algo(Some("1stage")).unwrap(), Some(Algo::OneShot));
        assert_eq!(parse_algo(Some("twoshot")).unwrap(), Some(Algo::TwoShot));
        assert_eq!(parse_algo(Some("2stage")).unwrap(), Some(Algo::TwoShot));
        assert!(parse_algo(Some("3stage")).is_err());
        assert!(
            env_flag(Some("1"))
                && env_flag(Some("True"))
                && !env_flag(Some("0"))
                && !env_flag(None)
        );
    }

    #[test]
    fn algo_choice_matches_vllm() {
        assert_eq!(choose_algo(2, 64 << 20, false, None), Some(Algo::OneShot));
        assert_eq!(
            choose_algo(4, 512 * KIB - 16, true, None),
            Some(Algo::OneShot)
        );
        assert_eq!(choose_algo(4, 512 * KIB, true, None), Some(Algo::TwoShot));
        assert_eq!(
            choose_algo(6, 256 * KIB - 16, true, None),
            Some(Algo::OneShot)
        );
        assert_eq!(choose_algo(6, 256 * KIB, true, None), Some(Algo::TwoShot));
        assert_eq!(choose_algo(8, 300 * KIB, true, None), Some(Algo::TwoShot));
        assert_eq!(choose_algo(8, 16, false, None), None);
        assert_eq!(
            choose_algo(8, 16, true, Some(Algo::TwoShot)),
            Some(Algo::TwoShot)
        );
        assert_eq!(
            choose_algo(2, 16, false, Some(Algo::TwoShot)),
            Some(Algo::TwoShot)
        );
    }

    #[test]
    fn max_size_table() {
        let mib = 1024 * 1024;
        assert_eq!(max_size((9, 0), 2, false), 8 * mib);
        assert_eq!(max_size((9, 0), 2, true), 8 * mib); // min(64 MiB, 8 MiB)
        assert_eq!(max_size((9, 0), 6, true), mib / 2);
        assert_eq!(max_size((9, 0), 8, true), mib / 4);
        assert_eq!(max_size((10, 0), 4, true), 2 * mib);
        assert_eq!(max_size((10, 3), 6, true), 8 * mib);
        assert_eq!(max_size((8, 0), 8, true), 8 * mib);
        assert_eq!(symm_mem_cap((9, 0), 3), None);
    }

    #[test]
    fn eligibility() {
        let m = DEFAULT_MAX_SIZE;
        assert!(should_custom_ar(16, true, true, 2, false, m));
        assert!(!should_custom_ar(8, true, true, 2, true, m));
        assert!(!should_custom_ar(m, true, true, 2, true, m)); // strict
        assert!(should_custom_ar(m - 16, true, true, 8, true, m));
        assert!(!should_custom_ar(64, true, true, 4, false, m));
        assert!(!should_custom_ar(64, false, true, 2, true, m));
        assert!(!should_custom_ar(64, true, false, 2, true, m));
        assert!(supports_dtype(DType::BF16, (9, 0)) && !supports_dtype(DType::BF16, (7, 5)));
        assert!(!supports_dtype(DType::F64, (9, 0)));
        assert!(should_create("tp:0", false, 4, true).is_ok());
        assert!(should_create("pp:0", false, 4, true).is_err());
        assert!(should_create("tp:0", true, 4, true).is_err());
        assert!(should_create("tp:0", false, 3, true).is_err());
        assert!(should_create("tp:0", false, 16, true).is_err());
        assert!(should_create("tp:0", false, 2, false).is_err());
    }

    #[test]
    fn setup_agreement() {
        assert_eq!(setup_verdict(&[(false, true); 4]), SetupVerdict::Go);
        assert_eq!(
            setup_verdict(&[(false, true), (true, true), (false, false)]),
            SetupVerdict::Disabled(vec![1])
        );
        assert_eq!(
            setup_verdict(&[(false, true), (false, false), (false, false)]),
            SetupVerdict::BadAlgo(vec![1, 2])
        );
    }

    #[test]
    fn launch_shapes() {
        assert_eq!(launch_shape(1, 36), (1, 512));
        assert_eq!(launch_shape(512 * 10, 36), (10, 512));
        assert_eq!(launch_shape(512 * 100, 36), (36, 512));
        assert_eq!(launch_shape(512 * 100, 16), (16, 512));
    }
}
