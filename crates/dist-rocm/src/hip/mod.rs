//! The HIP runtime, loaded at run time, in cudarc's three layers:
//!
//! - [`sys`]: the raw ABI (handle types, `hipIpcMemHandle_t`, enum values, the function table);
//! - [`result`]: one thin function per C call, a failing status turned into
//!   [`dist_core::Error::Backend`] carrying `hipGetErrorName` and `hipGetErrorString`;
//! - [`safe`]: owning [`safe::Stream`], [`safe::Event`], IPC handles
//!   and graph capture, whose `Drop` never panics.
//!
//! ## Loading
//! [`runtime`] opens the library once per process behind a `OnceLock`: `DIST_HIP_SO_PATH` alone
//! when it is set (as vLLM's `VLLM_NCCL_SO_PATH`: a path asked for is never silently swapped for
//! another), else `libamdhip64.so`, `.so.7`, `.so.6`, `.so.5` through the dynamic loader's search
//! path, then the same names under `$ROCM_PATH/lib` (default `/opt/rocm/lib`). A library that is
//! missing or lacks a symbol is [`Error::LibraryNotFound`] listing every candidate with its
//! reason, never a panic. A machine with the library but no AMD GPU loads fine and answers
//! "no ROCm device" from [`crate::driver`].
//!
//! [`install_runtime`] puts in a function table that did not come from `libamdhip64` (it must
//! be called before anything else in this crate touches HIP). HIP's NVIDIA platform is exactly
//! that: each `hipX` is `cudaX` of the same signature and status values. The crate's ABI test
//! on NVIDIA machines uses it to run this backend over `libcudart` and NCCL.

pub mod result;
pub mod safe;
pub mod sys;

use std::path::PathBuf;
use std::sync::OnceLock;

use dist_core::{Error, Result};

/// The environment variable that overrides the HIP runtime's path.
pub const SO_PATH_ENV: &str = "DIST_HIP_SO_PATH";

/// The library's common name, as [`Error::LibraryNotFound`] reports it.
pub const LIBRARY: &str = "libamdhip64";

/// The file names AMD ships, newest first after the unversioned development link.
pub const SO_NAMES: [&str; 4] = [
    "libamdhip64.so",
    "libamdhip64.so.7",
    "libamdhip64.so.6",
    "libamdhip64.so.5",
];

/// The paths to try, in order: the override alone when it is set and not empty; else the
/// shipped names (found through the dynamic loader's search path), then the same names under
/// `$ROCM_PATH/lib` (default `/opt/rocm`). A pure function of its inputs so that the order is
/// unit-tested.
pub fn candidates(override_path: Option<&str>, rocm_path: Option<&str>) -> Vec<PathBuf> {
    if let Some(p) = override_path.filter(|p| !p.is_empty()) {
        return vec![PathBuf::from(p)];
    }
    let mut out = Vec::new();
    out.extend(SO_NAMES.iter().map(PathBuf::from));
    let root = rocm_path.filter(|p| !p.is_empty()).unwrap_or("/opt/rocm");
    out.extend(
        SO_NAMES
            .iter()
            .map(|n| PathBuf::from(root).join("lib").join(n)),
    );
    out
}

/// Formats HIP's version code: `50221153` → `"5.2.21153"` (`major * 10^7 + minor * 10^5 + patch`).
/// Smaller codes (CUDA's `13000` from a runtime installed with [`install_runtime`]) print as
/// CUDA prints them: `"13.0"`.
pub fn format_version(code: i32) -> String {
    let c = code.max(0);
    if c >= 10_000_000 {
        format!(
            "{}.{}.{}",
            c / 10_000_000,
            (c % 10_000_000) / 100_000,
            c % 100_000
        )
    } else {
        format!("{}.{}", c / 1000, (c % 1000) / 10)
    }
}

/// A loaded HIP runtime: its function table, where it came from and its version. Lives for
/// the whole process.
pub struct Runtime {
    // Kept loaded for the process's lifetime: the function pointers below point into it.
    _lib: Option<libloading::Library>,
    /// Path or file name the library was loaded from (or the description given to
    /// [`install_runtime`]).
    pub path: String,
    /// `hipRuntimeGetVersion`'s code.
    pub version_code: i32,
    /// The function table.
    pub fns: sys::Functions,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("path", &self.path)
            .field("version", &self.version())
            .finish()
    }
}

impl Runtime {
    /// The version as `"5.2.21153"`.
    pub fn version(&self) -> String {
        format_version(self.version_code)
    }

    /// A runtime over a function table bound by the caller (see [`install_runtime`]).
    ///
    /// # Safety
    /// Every function in `fns` must behave as the HIP function of its name (same signature,
    /// same status values) and stay valid for the rest of the process.
    pub unsafe fn from_functions(fns: sys::Functions, description: &str) -> Result<Runtime> {
        let mut v = 0;
        // SAFETY: the caller vouches for the table; one int written through a valid pointer.
        let st = unsafe { (fns.runtime_get_version)(&mut v) };
        if st != sys::hipSuccess {
            return Err(Error::Backend {
                backend: "hip",
                code: Some(st as i64),
                message: format!("hipRuntimeGetVersion of {description} failed"),
            });
        }
        Ok(Runtime {
            _lib: None,
            path: description.to_string(),
            version_code: v,
            fns,
        })
    }

    /// Loads the first candidate that opens and has every symbol, reading `DIST_HIP_SO_PATH`
    /// and `ROCM_PATH`. `Err` lists each candidate with the reason it was rejected.
    pub fn open() -> Result<Runtime> {
        let over = std::env::var(SO_PATH_ENV).ok();
        let rocm = std::env::var("ROCM_PATH").ok();
        Self::open_with(over.as_deref(), rocm.as_deref())
    }

    /// [`Runtime::open`] with the override path and `ROCM_PATH` given instead of read from the environment.
    pub fn open_with(override_path: Option<&str>, rocm_path: Option<&str>) -> Result<Runtime> {
        Self::open_first(candidates(override_path, rocm_path))
    }

    /// Loads the first of `paths` that opens and has every symbol; `Err` lists each with its reason.
    pub fn open_first(paths: impl IntoIterator<Item = PathBuf>) -> Result<Runtime> {
        let mut tried = Vec::new();
        for path in paths {
            match Self::open_path(&path) {
                Ok(rt) => {
                    tracing::info!(path = %rt.path, version = %rt.version(), "loaded the HIP runtime");
                    return Ok(rt);
                }
                Err(reason) => tried.push(format!("{}: {reason}", path.display())),
            }
        }
        Err(Error::LibraryNotFound {
            library: LIBRARY.to_string(),
            tried,
        })
    }

    /// Loads one path; the error is a one-line reason.
    pub fn open_path(path: &std::path::Path) -> std::result::Result<Runtime, String> {
        // SAFETY: loading a shared library runs its initialisers; libamdhip64's are AMD's own
        // and have no preconditions beyond a sane process (without a GPU they do nothing).
        let lib = unsafe { libloading::Library::new(path) }.map_err(|e| e.to_string())?;
        // SAFETY: each name is looked up in the library it belongs to and bound with the
        // signature hip_runtime_api.h declares for it (see sys); the library is kept loaded.
        let fns = unsafe {
            sys::Functions::bind(|name| {
                let mut sym = name.as_bytes().to_vec();
                sym.push(0);
                lib.get::<*const std::ffi::c_void>(&sym)
                    .map(|s| *s)
                    .map_err(|e| e.to_string())
            })
        }?;
        let mut v = 0;
        // SAFETY: one int written through a valid pointer.
        let st = unsafe { (fns.runtime_get_version)(&mut v) };
        if st != sys::hipSuccess {
            return Err(format!("hipRuntimeGetVersion failed with status {st}"));
        }
        Ok(Runtime {
            _lib: Some(lib),
            path: path.display().to_string(),
            version_code: v,
            fns,
        })
    }
}

type Loaded = std::result::Result<Runtime, Vec<String>>;
static RUNTIME: OnceLock<Loaded> = OnceLock::new();

/// The process-wide HIP runtime, loaded on first use. A failed load is remembered (the
/// environment is read once) and reported as [`Error::LibraryNotFound`] each time.
pub fn runtime() -> Result<&'static Runtime> {
    let r = RUNTIME.get_or_init(|| {
        Runtime::open().map_err(|e| match e {
            Error::LibraryNotFound { tried, .. } => tried,
            other => vec![other.to_string()],
        })
    });
    match r {
        Ok(rt) => Ok(rt),
        Err(tried) => Err(Error::LibraryNotFound {
            library: LIBRARY.to_string(),
            tried: tried.clone(),
        }),
    }
}

/// Makes `rt` the process's HIP runtime instead of loading `libamdhip64`. Fails with
/// [`Error::InvalidArgument`] when a runtime was already loaded (or its load already failed):
/// call it first thing in `main`.
pub fn install_runtime(rt: Runtime) -> Result<&'static Runtime> {
    let desc = rt.path.clone();
    let mut fresh = false;
    let r = RUNTIME.get_or_init(|| {
        fresh = true;
        Ok(rt)
    });
    match (fresh, r) {
        (true, Ok(rt)) => {
            tracing::info!(runtime = %rt.path, version = %rt.version(), "installed a HIP-compatible runtime");
            Ok(rt)
        }
        _ => Err(Error::invalid(format!(
            "install_runtime({desc}): the HIP runtime was already chosen in this process"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidate_order() {
        let c = candidates(None, None);
        assert_eq!(c.len(), 8);
        assert_eq!(c[0], PathBuf::from("libamdhip64.so"));
        assert_eq!(c[1], PathBuf::from("libamdhip64.so.7"));
        assert_eq!(c[3], PathBuf::from("libamdhip64.so.5"));
        assert_eq!(c[4], PathBuf::from("/opt/rocm/lib/libamdhip64.so"));
        let c = candidates(None, Some("/opt/rocm-6.2"));
        assert_eq!(c[6], PathBuf::from("/opt/rocm-6.2/lib/libamdhip64.so.6"));
        // The override is the only candidate.
        let c = candidates(Some("/x/libamdhip64.so.6"), Some("/opt/rocm-6.2"));
        assert_eq!(c, vec![PathBuf::from("/x/libamdhip64.so.6")]);
        assert_eq!(candidates(Some(""), Some("")).len(), 8);
    }

    #[test]
    fn versions_format() {
        assert_eq!(format_version(50221153), "5.2.21153");
        assert_eq!(format_version(60342134), "6.3.42134");
        assert_eq!(format_version(13000), "13.0");
        assert_eq!(format_version(12080), "12.8");
    }

    #[test]
    fn not_found_lists_every_candidate_with_its_reason() {
        let paths: Vec<PathBuf> = candidates(None, Some("/nonexistent-rocm"))
            .into_iter()
            .skip(SO_NAMES.len())
            .collect();
        match Runtime::open_first(paths) {
            Err(Error::LibraryNotFound { library, tried }) => {
                assert_eq!(library, "libamdhip64");
                assert_eq!(tried.len(), 4, "{tried:?}");
                assert!(tried[0].starts_with("/nonexistent-rocm/lib/libamdhip64.so: "));
                assert!(tried[2].starts_with("/nonexistent-rocm/lib/libamdhip64.so.6: "));
                assert!(tried.iter().all(|t| t.len() > t.find(": ").unwrap() + 2));
            }
            other => panic!("expected LibraryNotFound, got {other:?}"),
        }
        match Runtime::open_with(Some("/nonexistent/libamdhip64.so.6"), None) {
            Err(Error::LibraryNotFound { tried, .. }) => {
                assert_eq!(tried.len(), 1, "{tried:?}");
                assert!(tried[0].starts_with("/nonexistent/libamdhip64.so.6: "));
            }
            other => panic!("expected LibraryNotFound, got {other:?}"),
        }
    }

    #[test]
    fn a_library_that_is_not_hip_is_rejected_for_a_missing_symbol() {
        // glibc, by its soname: the dynamic loader finds it wherever the distribution put it
        // (this process is linked to it), so the check always runs.
        let e = Runtime::open_path(std::path::Path::new("libc.so.6")).unwrap_err();
        assert!(e.contains("missing symbol hipGetErrorString"), "{e}");
    }
}
