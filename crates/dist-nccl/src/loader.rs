//! Finding and loading `libnccl` / `librccl` at run time, once per flavour.

use std::ffi::{c_int, CStr};
use std::path::PathBuf;
use std::sync::OnceLock;

use dist_core::{Error, Result};

use crate::sys;

/// Which library: NVIDIA's NCCL or AMD's RCCL (same C ABI).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Flavor {
    /// `libnccl.so.2`.
    Nccl,
    /// `librccl.so.1`.
    Rccl,
}

impl Flavor {
    /// The library's common name, as `LibraryNotFound` reports it.
    pub const fn library(self) -> &'static str {
        match self {
            Flavor::Nccl => "libnccl",
            Flavor::Rccl => "librccl",
        }
    }
}

/// The environment variable that overrides the library path (vLLM's `VLLM_NCCL_SO_PATH`).
pub const SO_PATH_ENV: &str = "DIST_NCCL_SO_PATH";

/// The paths to try, in order: the override, then the file names the vendor ships (found
/// through the dynamic loader's search path), then, for RCCL, the same names under `$ROCM_PATH/lib`.
///
/// A pure function of its inputs so that the order is unit-tested.
pub fn candidates(
    flavor: Flavor,
    override_path: Option<&str>,
    rocm_path: Option<&str>,
) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = override_path.filter(|p| !p.is_empty()) {
        out.push(PathBuf::from(p));
    }
    let names: &[&str] = match flavor {
        Flavor::Nccl => &["libnccl.so.2", "libnccl.so"],
        Flavor::Rccl => &["librccl.so.1", "librccl.so"],
    };
    match flavor {
        Flavor::Nccl => out.extend(names.iter().map(PathBuf::from)),
        Flavor::Rccl => out.extend(rocm_candidates(names, rocm_path)),
    }
    out
}

/// A ROCm library's paths to try: its file `names` as they are (found through the dynamic
/// loader's search path), then the same names under `$ROCM_PATH/lib` (`rocm_path`, default
/// `/opt/rocm`).
pub fn rocm_candidates(names: &[&str], rocm_path: Option<&str>) -> Vec<PathBuf> {
    let root = rocm_path.filter(|p| !p.is_empty()).unwrap_or("/opt/rocm");
    let lib = PathBuf::from(root).join("lib");
    let bare = names.iter().map(PathBuf::from);
    bare.chain(names.iter().map(|n| lib.join(n))).collect()
}

/// Formats NCCL's version code: `21903` → `"2.19.3"` (the 2.9+ code `MAJOR*10000+MINOR*100+PATCH`),
/// and the older `MAJOR*1000+MINOR*100+PATCH` (`2708` → `"2.7.8"`).
pub fn format_version(code: i32) -> String {
    let c = code.max(0);
    if c >= 10_000 {
        format!("{}.{}.{}", c / 10_000, (c % 10_000) / 100, c % 100)
    } else {
        format!("{}.{}.{}", c / 1000, (c % 1000) / 100, c % 100)
    }
}

/// A loaded NCCL or RCCL: its function table, path and version. Lives for the whole process.
pub struct Library {
    // Kept loaded for the process's lifetime: the function pointers below point into it (none
    // for a table given to `from_functions`).
    _lib: Option<libloading::Library>,
    /// Path or file name the library was loaded from (or the description of a given table).
    pub path: String,
    /// Which library.
    pub flavor: Flavor,
    /// `ncclGetVersion`'s code.
    pub version_code: i32,
    /// The function table.
    pub fns: sys::Functions,
}

impl std::fmt::Debug for Library {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Library")
            .field("path", &self.path)
            .field("flavor", &self.flavor)
            .field("version", &self.version())
            .field("async_error", &self.fns.comm_get_async_error.is_some())
            .field(
                "init_rank_config",
                &self.fns.comm_init_rank_config.is_some(),
            )
            .field("window_register", &self.fns.comm_window_register.is_some())
            .finish()
    }
}

impl Library {
    /// The version as `"2.19.3"`.
    pub fn version(&self) -> String {
        format_version(self.version_code)
    }

    /// NCCL's message for a status code.
    pub fn error_string(&self, code: sys::ncclResult_t) -> String {
        // SAFETY: ncclGetErrorString returns a pointer to a static NUL-terminated string (or null).
        let p = unsafe { (self.fns.get_error_string)(code) };
        if p.is_null() {
            return format!("unknown NCCL status {code}");
        }
        // SAFETY: non-null, NUL-terminated, static storage per NCCL's API.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    /// A library over a function table bound by the caller (a test double of NCCL, say);
    /// `description` stands where a path would.
    ///
    /// # Safety
    /// Every function of `fns` behaves as the NCCL function of its field (C signature, status
    /// values, semantics) and stays valid for the rest of the process.
    pub unsafe fn from_functions(
        flavor: Flavor,
        fns: sys::Functions,
        description: &str,
    ) -> Result<Library> {
        let mut v: c_int = 0;
        // SAFETY: the caller vouches for the table; one int written through a valid pointer.
        let st = unsafe { (fns.get_version)(&mut v) };
        if st != sys::ncclSuccess {
            return Err(Error::invalid(format!(
                "ncclGetVersion of {description} failed with status {st}"
            )));
        }
        Ok(Library {
            _lib: None,
            path: description.to_string(),
            flavor,
            version_code: v,
            fns,
        })
    }

    /// Loads the first library that opens and has every required symbol. `Err` lists each
    /// candidate with the reason it was rejected.
    pub fn open(flavor: Flavor) -> Result<Library> {
        let over = std::env::var(SO_PATH_ENV).ok();
        let rocm = std::env::var("ROCM_PATH").ok();
        Self::open_with(flavor, over.as_deref(), rocm.as_deref())
    }

    /// [`Library::open`] with the override path and `ROCM_PATH` given instead of read from the environment.
    pub fn open_with(
        flavor: Flavor,
        override_path: Option<&str>,
        rocm_path: Option<&str>,
    ) -> Result<Library> {
        let mut tried = Vec::new();
        for path in candidates(flavor, override_path, rocm_path) {
            match Self::open_path(flavor, &path) {
                Ok(lib) => {
                    tracing::info!(path = %lib.path, version = %lib.version(), "loaded {}", flavor.library());
                    return Ok(lib);
                }
                Err(reason) => tried.push(format!("{}: {reason}", path.display())),
            }
        }
        Err(Error::LibraryNotFound {
            library: flavor.library().to_string(),
            tried,
        })
    }

    /// Loads one path; the error is a one-line reason.
    pub fn open_path(
        flavor: Flavor,
        path: &std::path::Path,
    ) -> std::result::Result<Library, String> {
        // SAFETY: loading a shared library runs its initialisers; NCCL's and RCCL's are the
        // vendor's own and have no preconditions beyond a sane process.
        let lib = unsafe { libloading::Library::new(path) }.map_err(|e| {
            // dlerror() repeats the path; keep the reason only.
            let e = e.to_string();
            let p = format!("{}: ", path.display());
            e.strip_prefix(&p).map(str::to_string).unwrap_or(e)
        })?;
        macro_rules! req {
            ($name:literal) => {{
                // SAFETY: the symbol's type is the one nccl.h declares for this name (see sys).
                let s = unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                    .map_err(|e| format!("missing symbol {}: {e}", $name))?;
                *s
            }};
        }
        macro_rules! opt {
            ($name:literal) => {{
                // SAFETY: as above; an absent optional symbol is `None`.
                unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                    .ok()
                    .map(|s| *s)
            }};
        }
        let fns = sys::Functions {
            get_error_string: req!("ncclGetErrorString"),
            get_version: req!("ncclGetVersion"),
            get_unique_id: req!("ncclGetUniqueId"),
            comm_init_rank: req!("ncclCommInitRank"),
            all_reduce: req!("ncclAllReduce"),
            reduce: req!("ncclReduce"),
            all_gather: req!("ncclAllGather"),
            reduce_scatter: req!("ncclReduceScatter"),
            send: req!("ncclSend"),
            recv: req!("ncclRecv"),
            broadcast: req!("ncclBroadcast"),
            comm_destroy: req!("ncclCommDestroy"),
            comm_abort: req!("ncclCommAbort"),
            group_start: req!("ncclGroupStart"),
            group_end: req!("ncclGroupEnd"),
            comm_get_async_error: opt!("ncclCommGetAsyncError"),
            comm_init_rank_config: opt!("ncclCommInitRankConfig"),
            comm_window_register: opt!("ncclCommWindowRegister"),
            comm_window_deregister: opt!("ncclCommWindowDeregister"),
        };
        let mut v: c_int = 0;
        // SAFETY: get_version writes one int through a valid pointer.
        let st = unsafe { (fns.get_version)(&mut v) };
        if st != sys::ncclSuccess {
            return Err(format!("ncclGetVersion failed with status {st}"));
        }
        if flavor == Flavor::Nccl && fns.comm_window_register.is_none() {
            tracing::debug!(
                "ncclCommWindowRegister absent (NCCL < 2.27.3): no symmetric-memory windows"
            );
        }
        Ok(Library {
            _lib: Some(lib),
            path: path.display().to_string(),
            flavor,
            version_code: v,
            fns,
        })
    }
}

static NCCL: OnceLock<std::result::Result<Library, Vec<String>>> = OnceLock::new();
static RCCL: OnceLock<std::result::Result<Library, Vec<String>>> = OnceLock::new();

/// The process-wide library of `flavor`, loaded on first use. A failed load is remembered
/// (the environment is read once) and reported as [`Error::LibraryNotFound`] each time.
pub fn library(flavor: Flavor) -> Result<&'static Library> {
    let cell = match flavor {
        Flavor::Nccl => &NCCL,
        Flavor::Rccl => &RCCL,
    };
    let r = cell.get_or_init(|| {
        Library::open(flavor).map_err(|e| match e {
            Error::LibraryNotFound { tried, .. } => tried,
            other => vec![other.to_string()],
        })
    });
    match r {
        Ok(l) => Ok(l),
        Err(tried) => Err(Error::LibraryNotFound {
            library: flavor.library().to_string(),
            tried: tried.clone(),
        }),
    }
}

/// Makes `lib` the process's library of its flavour instead of loading one (a test double, or
/// a library bound by hand). [`Error::InvalidArgument`] when that flavour was already chosen
/// (loaded, or its load failed): call it first.
pub fn install_library(lib: Library) -> Result<&'static Library> {
    let (cell, desc) = match lib.flavor {
        Flavor::Nccl => (&NCCL, lib.path.clone()),
        Flavor::Rccl => (&RCCL, lib.path.clone()),
    };
    let mut fresh = false;
    let r = cell.get_or_init(|| {
        fresh = true;
        Ok(lib)
    });
    match (fresh, r) {
        (true, Ok(l)) => Ok(l),
        _ => Err(Error::invalid(format!(
            "install_library({desc}): the library was already chosen in this process"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_formats() {
        assert_eq!(format_version(21903), "2.19.3");
        assert_eq!(format_version(22703), "2.27.3");
        assert_eq!(format_version(22101), "2.21.1");
        assert_eq!(format_version(2708), "2.7.8");
        assert_eq!(format_version(21000), "2.10.0");
    }

    #[test]
    fn candidate_order() {
        let n = candidates(Flavor::Nccl, None, None);
        assert_eq!(
            n,
            vec![PathBuf::from("libnccl.so.2"), PathBuf::from("libnccl.so")]
        );
        let n = candidates(Flavor::Nccl, Some("/x/libnccl.so.2"), Some("/rocm"));
        assert_eq!(n[0], PathBuf::from("/x/libnccl.so.2"));
        assert_eq!(n.len(), 3);
        let r = candidates(Flavor::Rccl, Some(""), Some("/opt/rocm-6.2"));
        assert_eq!(
            r,
            vec![
                PathBuf::from("librccl.so.1"),
                PathBuf::from("librccl.so"),
                PathBuf::from("/opt/rocm-6.2/lib/librccl.so.1"),
                PathBuf::from("/opt/rocm-6.2/lib/librccl.so"),
            ]
        );
        assert_eq!(
            candidates(Flavor::Rccl, None, None)[2],
            PathBuf::from("/opt/rocm/lib/librccl.so.1")
        );
    }

    #[test]
    fn not_found_lists_every_candidate_with_its_reason() {
        match Library::open_with(
            Flavor::Rccl,
            Some("/nonexistent/librccl.so.1"),
            Some("/nonexistent-rocm"),
        ) {
            Err(Error::LibraryNotFound { library, tried }) => {
                assert_eq!(library, "librccl");
                assert!(
                    tried[0].starts_with("/nonexistent/librccl.so.1: "),
                    "{tried:?}"
                );
                assert!(
                    tried
                        .iter()
                        .any(|t| t.starts_with("/nonexistent-rocm/lib/librccl.so.1: ")),
                    "{tried:?}"
                );
                assert_eq!(tried.len(), 5);
                assert!(
                    tried.iter().all(|t| t.len() > t.find(": ").unwrap() + 2),
                    "each has a reason: {tried:?}"
                );
            }
            Ok(l) => panic!("loaded {l:?} from nonexistent paths"),
            Err(e) => panic!("wrong error {e}"),
        }
    }

    #[test]
    fn missing_path_is_a_reason_not_a_panic() {
        let e = Library::open_path(
            Flavor::Nccl,
            std::path::Path::new("/nonexistent/libnccl.so.2"),
        )
        .unwrap_err();
        assert!(!e.is_empty());
        // A library that exists but is not NCCL: rejected for a missing symbol.
        let libc = [
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
            "/lib/aarch64-linux-gnu/libc.so.6",
        ]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
        if let Some(p) = libc {
            let e = Library::open_path(Flavor::Nccl, std::path::Path::new(p)).unwrap_err();
            assert!(e.contains("missing symbol ncclGetErrorString"), "{e}");
        }
    }
}
