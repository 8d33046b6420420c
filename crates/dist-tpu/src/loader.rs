//! Finding and loading a PJRT plugin at run time, once per process, and checking its API version.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dist_core::{Error, Result};

use crate::{result, sys};

/// Path of the plugin to load first (any PJRT plugin: `libtpu.so`, `xla_cuda_plugin.so`…).
pub const PLUGIN_ENV: &str = "DIST_PJRT_PLUGIN";
/// libtpu's own variable: the path of `libtpu.so` (or a directory holding it).
pub const TPU_LIBRARY_PATH_ENV: &str = "TPU_LIBRARY_PATH";
/// The lowest `PJRT_API_MINOR` accepted. The slots and fields used exist since about minor 30,
/// but plugins older than this compared `struct_size` for equality (`CheckMatchingStructSizes`)
/// instead of accepting larger structs, which [`sys::Args`]'s zeroed tail relies on.
pub const MIN_API_MINOR: i32 = 60;

/// Where PCI devices are listed.
pub const PCI_DEVICES: &str = "/sys/bus/pci/devices";
/// Google's PCI vendor id (TPU chips).
pub const GOOGLE_PCI_VENDOR: &str = "0x1ae0";

/// Number of PCI devices under `pci_devices` (a sysfs `devices` directory) whose vendor is
/// Google: TPU chips, as JAX counts them before loading libtpu. 0 when the directory is missing.
pub fn tpu_chip_count(pci_devices: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(pci_devices) else {
        return 0;
    };
    rd.filter_map(|e| e.ok())
        .filter(|e| {
            std::fs::read_to_string(e.path().join("vendor"))
                .is_ok_and(|v| v.trim().eq_ignore_ascii_case(GOOGLE_PCI_VENDOR))
        })
        .count()
}

/// Checks a plugin's reported `(major, minor)` against what this crate speaks. Pure, so tested.
pub fn check_version(major: i32, minor: i32) -> std::result::Result<(), String> {
    if major != sys::PJRT_API_MAJOR {
        return Err(format!(
            "PJRT API major version {major} (plugin) differs from {} (dist-tpu): incompatible ABI",
            sys::PJRT_API_MAJOR
        ));
    }
    if minor < MIN_API_MINOR {
        return Err(format!(
            "PJRT API version {major}.{minor} is older than {}.{MIN_API_MINOR}, the oldest dist-tpu \
             accepts; install a newer plugin (libtpu / jax plugin)",
            sys::PJRT_API_MAJOR
        ));
    }
    Ok(())
}

/// The paths to try, in order: `DIST_PJRT_PLUGIN`, `TPU_LIBRARY_PATH` (a file, or a directory
/// holding `libtpu.so`), the `libtpu` Python package's directory, then `libtpu.so` through the
/// dynamic loader's search path. Pure, so the order is unit-tested.
pub fn candidates(
    plugin: Option<&str>,
    tpu_library_path: Option<&str>,
    python_libtpu_dir: Option<&Path>,
) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = plugin.filter(|p| !p.is_empty()) {
        out.push(PathBuf::from(p));
    }
    if let Some(p) = tpu_library_path.filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if p.is_dir() {
            out.push(p.join("libtpu.so"));
        } else {
            out.push(p);
        }
    }
    if let Some(d) = python_libtpu_dir {
        out.push(d.join("libtpu.so"));
    }
    out.push(PathBuf::from("libtpu.so"));
    out
}

/// Asks `python3` where the `libtpu` package lives, with a 10 s limit. `None` when Python, the
/// package or the answer is missing: never an error.
pub fn python_libtpu_dir() -> Option<PathBuf> {
    use std::process::{Command, Stdio};
    let mut child = Command::new("python3")
        .args([
            "-c",
            "import libtpu, os; print(os.path.dirname(libtpu.__file__))",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => break,
            Ok(Some(_)) | Err(_) => return None,
            Ok(None) if start.elapsed() > Duration::from_secs(10) => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    let mut s = String::new();
    use std::io::Read;
    child.stdout.take()?.read_to_string(&mut s).ok()?;
    let dir = PathBuf::from(s.trim());
    dir.is_dir().then_some(dir)
}

/// A loaded PJRT plugin: its function table, where it came from and the version it reports.
/// Lives for the whole process (plugins cannot be unloaded safely).
pub struct Library {
    _lib: libloading::Library,
    api: *const sys::PJRT_Api,
    /// Path or file name the plugin was loaded from.
    pub path: String,
    /// `PJRT_API_MAJOR` the plugin was built with.
    pub major: i32,
    /// `PJRT_API_MINOR` the plugin was built with.
    pub minor: i32,
    initialized: Mutex<Option<std::result::Result<(), String>>>,
}

// SAFETY: the PJRT_Api table is immutable after GetPjrtApi returns, and PJRT's functions are
// thread-safe (the C API's contract; JAX calls them from many threads).
unsafe impl Send for Library {}
// SAFETY: as above.
unsafe impl Sync for Library {}

impl std::fmt::Debug for Library {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Library")
            .field("path", &self.path)
            .field("version", &self.version())
            .finish()
    }
}

impl Library {
    /// The reported version as `"0.83"`.
    pub fn version(&self) -> String {
        format!("{}.{}", self.major, self.minor)
    }

    /// The function table.
    pub fn api(&self) -> &sys::PJRT_Api {
        // SAFETY: checked non-null and long enough at load; the plugin keeps it alive while loaded,
        // and the library is never unloaded.
        unsafe { &*self.api }
    }

    /// True when this looks like Google's TPU runtime (used to word "no TPU" errors).
    pub fn is_libtpu(&self) -> bool {
        Path::new(&self.path)
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("libtpu"))
    }

    /// Loads the first candidate that opens and exports `GetPjrtApi`. A missing plugin is
    /// [`Error::LibraryNotFound`] listing every candidate with its reason; a plugin whose API
    /// version is too old or of another major version is [`Error::Unsupported`] at once.
    pub fn open() -> Result<Library> {
        let plugin = std::env::var(PLUGIN_ENV).ok();
        let tpu = std::env::var(TPU_LIBRARY_PATH_ENV).ok();
        Self::open_with(plugin.as_deref(), tpu.as_deref(), true)
    }

    /// [`Library::open`] with the variables given instead of read from the environment;
    /// `ask_python` allows the last resort of asking `python3` for the libtpu package.
    pub fn open_with(
        plugin: Option<&str>,
        tpu_library_path: Option<&str>,
        ask_python: bool,
    ) -> Result<Library> {
        let mut tried = Vec::new();
        let try_path = |path: &Path, tried: &mut Vec<String>| -> Option<Result<Library>> {
            match Self::open_path(path) {
                Ok(lib) => Some(Ok(lib)),
                Err(OpenError::Unusable(e)) => Some(Err(e)),
                Err(OpenError::NotLoaded(reason)) => {
                    tried.push(format!("{}: {reason}", path.display()));
                    None
                }
            }
        };
        for path in candidates(plugin, tpu_library_path, None) {
            if let Some(r) = try_path(&path, &mut tried) {
                return r;
            }
        }
        if ask_python {
            // Last resort: ask Python where the libtpu wheel is (only now: it spawns a process).
            match python_libtpu_dir() {
                Some(dir) => {
                    if let Some(r) = try_path(&dir.join("libtpu.so"), &mut tried) {
                        return r;
                    }
                }
                None => tried
                    .push("python3 -c 'import libtpu': no libtpu package (or no python3)".into()),
            }
        }
        Err(Error::LibraryNotFound {
            library: "PJRT plugin (libtpu.so or DIST_PJRT_PLUGIN)".into(),
            tried,
        })
    }

    /// `PJRT_Plugin_Initialize`, once (later calls return the first call's outcome). For
    /// libtpu, first checks that this host has TPU chips ([`tpu_chip_count`]): libtpu's
    /// initialisation on a host without them spends minutes querying the cloud metadata server
    /// before failing. `DIST_TPU_SKIP_CHIP_CHECK=1` skips the check.
    pub fn initialize(&self) -> Result<()> {
        let mut g = self.initialized.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = &*g {
            return r.clone().map_err(|m| Error::Backend {
                backend: "pjrt",
                code: None,
                message: m,
            });
        }
        let skip = std::env::var("DIST_TPU_SKIP_CHIP_CHECK").is_ok_and(|v| v == "1");
        if self.is_libtpu() && !skip {
            let n = tpu_chip_count(Path::new(PCI_DEVICES));
            if n == 0 {
                // Not cached: chips do not appear at run time, but the answer is cheap.
                return Err(Error::Backend {
                    backend: "pjrt",
                    code: None,
                    message: format!(
                        "no TPU: no Google TPU chip (PCI vendor {GOOGLE_PCI_VENDOR}) under {PCI_DEVICES}; \
                         libtpu ({}, PJRT API {}) needs a TPU host (set DIST_TPU_SKIP_CHIP_CHECK=1 to try anyway)",
                        self.path,
                        self.version()
                    ),
                });
            }
        }
        let r = result::plugin_initialize(self);
        *g = Some(r.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        r
    }

    /// Loads one path: `dlopen`, `GetPjrtApi`, the table's length and the version check
    /// (`PJRT_Plugin_Initialize` runs later, at the first client: [`Library::initialize`]).
    pub fn open_path(path: &Path) -> std::result::Result<Library, OpenError> {
        // SAFETY: loading a shared library runs its initialisers; PJRT plugins are vendor
        // libraries with no preconditions beyond a sane process.
        let lib = unsafe { libloading::Library::new(path) }.map_err(|e| {
            let e = e.to_string();
            let p = format!("{}: ", path.display());
            OpenError::NotLoaded(e.strip_prefix(&p).map(str::to_string).unwrap_or(e))
        })?;
        // SAFETY: GetPjrtApi has the signature sys::GetPjrtApi in every PJRT plugin.
        let get: sys::GetPjrtApi = unsafe { lib.get::<sys::GetPjrtApi>(b"GetPjrtApi\0") }
            .map(|s| *s)
            .map_err(|e| OpenError::NotLoaded(format!("not a PJRT plugin (no GetPjrtApi): {e}")))?;
        // SAFETY: GetPjrtApi takes no arguments and returns a pointer to a static table.
        let api = unsafe { get() };
        if api.is_null() {
            return Err(OpenError::NotLoaded("GetPjrtApi returned null".into()));
        }
        // SAFETY: non-null; the first fields (struct_size, extension_start, version) exist in
        // every version of the table.
        let (size, major, minor) = unsafe {
            (
                (*api).struct_size,
                (*api).pjrt_api_version.major_version,
                (*api).pjrt_api_version.minor_version,
            )
        };
        let shown = path.display().to_string();
        check_version(major, minor).map_err(|m| {
            OpenError::Unusable(Error::Unsupported(format!("PJRT plugin {shown}: {m}")))
        })?;
        if size < std::mem::size_of::<sys::PJRT_Api>() {
            return Err(OpenError::Unusable(Error::Unsupported(format!(
                "PJRT plugin {shown}: function table of {size} bytes is shorter than the {} dist-tpu reads",
                std::mem::size_of::<sys::PJRT_Api>()
            ))));
        }
        let l = Library {
            _lib: lib,
            api,
            path: shown,
            major,
            minor,
            initialized: Mutex::new(None),
        };
        tracing::info!(path = %l.path, version = %l.version(), "loaded PJRT plugin");
        Ok(l)
    }
}

/// Why one candidate was not used.
#[derive(Debug)]
pub enum OpenError {
    /// It could not be opened or is not a plugin: try the next candidate.
    NotLoaded(String),
    /// It is a plugin but cannot be used (version, initialisation): stop with this error.
    Unusable(Error),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::NotLoaded(s) => f.write_str(s),
            OpenError::Unusable(e) => write!(f, "{e}"),
        }
    }
}

static LIBRARY: Mutex<Option<&'static Library>> = Mutex::new(None);

/// The process's plugin, loaded at the first call ([`Library::open`]). A failed load is
/// retried at the next call (nothing is cached but success).
pub fn library() -> Result<&'static Library> {
    let mut g = LIBRARY.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(l) = *g {
        return Ok(l);
    }
    let l: &'static Library = Box::leak(Box::new(Library::open()?));
    *g = Some(l);
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_check_is_a_pure_function() {
        assert!(check_version(0, MIN_API_MINOR).is_ok());
        assert!(check_version(0, 200).is_ok());
        let e = check_version(0, MIN_API_MINOR - 1).unwrap_err();
        assert!(e.contains("older than"), "{e}");
        assert!(e.contains(&format!("0.{}", MIN_API_MINOR - 1)), "{e}");
        let e = check_version(1, 90).unwrap_err();
        assert!(e.contains("major version 1"), "{e}");
    }

    #[test]
    fn tpu_chips_are_counted_by_pci_vendor() {
        let root = std::env::temp_dir().join(format!("dist-tpu-pci-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (dev, vendor) in [
            ("0000:00:04.0", "0x1ae0\n"),
            ("0000:00:05.0", "0x10de\n"),
            ("0000:00:06.0", "0x1AE0"),
        ] {
            std::fs::create_dir_all(root.join(dev)).unwrap();
            std::fs::write(root.join(dev).join("vendor"), vendor).unwrap();
        }
        std::fs::create_dir_all(root.join("0000:00:07.0")).unwrap(); // no vendor file
        assert_eq!(tpu_chip_count(&root), 2);
        assert_eq!(tpu_chip_count(&root.join("missing")), 0);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn candidate_order() {
        let dir = std::env::temp_dir();
        let c = candidates(
            Some("/x/plugin.so"),
            Some(dir.to_str().unwrap()),
            Some(Path::new("/py/libtpu")),
        );
        assert_eq!(
            c,
            vec![
                PathBuf::from("/x/plugin.so"),
                dir.join("libtpu.so"),
                PathBuf::from("/py/libtpu/libtpu.so"),
                PathBuf::from("libtpu.so"),
            ]
        );
        // a file path is used as is; empty values are ignored
        let c = candidates(Some(""), Some("/opt/libtpu-custom.so"), None);
        assert_eq!(
            c,
            vec![
                PathBuf::from("/opt/libtpu-custom.so"),
                PathBuf::from("libtpu.so")
            ]
        );
    }

    #[test]
    fn missing_or_foreign_libraries_are_reasons_not_panics() {
        match Library::open_path(Path::new("/nonexistent/libtpu.so")) {
            Err(OpenError::NotLoaded(r)) => assert!(!r.is_empty()),
            other => panic!("{other:?}"),
        }
        let libc = [
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
            "/lib/aarch64-linux-gnu/libc.so.6",
        ]
        .into_iter()
        .find(|p| Path::new(p).exists());
        if let Some(p) = libc {
            match Library::open_path(Path::new(p)) {
                Err(OpenError::NotLoaded(r)) => assert!(r.contains("GetPjrtApi"), "{r}"),
                other => panic!("{other:?}"),
            }
        }
    }
}
