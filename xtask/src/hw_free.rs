//! The tests that need a vendor library but no hardware, run by `cargo xtask test` wherever the
//! library is found:
//!
//! - NVRTC (`libnvrtc.so.13`, from the `nvidia-cuda-nvrtc` wheel): dist-cuda compiles its custom
//!   all-reduce and paged-copy kernels to PTX for sm_80 and sm_90 (`#[ignore]`d in a plain
//!   `cargo test`, run here with `--ignored` and the library's folder on `LD_LIBRARY_PATH`).
//! - libtpu (`libtpu.so`, from the `libtpu` wheel): dist-tpu loads it and checks the "no TPU"
//!   error. Its build script un-ignores that test when `DIST_TEST_LIBTPU` names the library, so it
//!   is exported before the first build and every cargo step builds the same.
//!
//! Both are looked for in the Python environment of the cross-language tests (target/pyenv, or the
//! one `DIST_KV_PYTHON` names), or where `DIST_NVRTC_LIB_DIR` / `DIST_TEST_LIBTPU` point. Missing,
//! the step prints a `SKIP` line with the reason and the install command; with
//! `DIST_REQUIRE_NVRTC=1` / `DIST_REQUIRE_LIBTPU=1` (set by .ci/run, which installs both) it fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{cargo, project_root, wait_with_deadline, ChildGuard, Result, FEATURES};

/// The NVRTC library dist-cuda's loader asks for (cudarc's name for CUDA 13).
const NVRTC_SO: &str = "libnvrtc.so.13";
/// The wheels .ci/run installs into target/pyenv; a SKIP line names the one missing.
const NVRTC_WHEEL: &str = "nvidia-cuda-nvrtc==13.0.88";
const LIBTPU_WHEEL: &str = "libtpu==0.0.52";
/// The ignored tests that need NVRTC only, by their full path in dist-cuda's unit tests.
const NVRTC_TESTS: &[&str] = &[
    "custom_ar::tests::kernels_compile_for_sm80_and_sm90",
    "paged::tests::kernels_compile_for_sm80_and_sm90",
];
/// Building dist-cuda's unit tests (normally already built by `cargo test --workspace`) and
/// running them.
const NVRTC_DEADLINE: Duration = Duration::from_secs(20 * 60);

/// What [`prepare`] found.
#[derive(Debug)]
pub struct Found {
    nvrtc_dir: Option<PathBuf>,
}

fn required(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

/// A missing library: an error when `require_var` is set, else a SKIP line.
fn missing(what: &str, why: &str, require_var: &str, wheel: &str) -> Result {
    let install = format!("target/pyenv/bin/pip install {wheel}");
    if required(require_var) {
        return Err(format!(
            "{what}: {why} ({require_var}=1 requires it; {install})"
        ));
    }
    eprintln!("SKIP {what}: {why} (to run it: {install})");
    Ok(())
}

/// The site-packages folders to look in: those of `py`'s virtual environment and of target/pyenv.
fn site_packages(py: Option<&Path>) -> Vec<PathBuf> {
    let mut venvs: Vec<PathBuf> = py
        .and_then(|p| p.parent()?.parent().map(Path::to_path_buf))
        .into_iter()
        .collect();
    venvs.push(project_root().join("target/pyenv"));
    let mut out = vec![];
    for v in venvs {
        let Ok(dir) = std::fs::read_dir(v.join("lib")) else {
            continue;
        };
        for e in dir.flatten() {
            let sp = e.path().join("site-packages");
            if e.file_name().to_string_lossy().starts_with("python") && sp.is_dir() {
                out.push(sp);
            }
        }
    }
    out
}

fn find_nvrtc_dir(sites: &[PathBuf]) -> std::result::Result<PathBuf, String> {
    if let Ok(d) = std::env::var("DIST_NVRTC_LIB_DIR") {
        let d = PathBuf::from(d);
        return if d.join(NVRTC_SO).exists() {
            Ok(d)
        } else {
            Err(format!(
                "DIST_NVRTC_LIB_DIR={} has no {NVRTC_SO}",
                d.display()
            ))
        };
    }
    let ld = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = sites.iter().map(|s| s.join("nvidia/cu13/lib")).collect();
    dirs.extend(ld.split(':').filter(|s| !s.is_empty()).map(PathBuf::from));
    dirs.push(PathBuf::from("/usr/local/cuda/lib64"));
    dirs.iter()
        .find(|d| d.join(NVRTC_SO).exists())
        .cloned()
        .ok_or_else(|| {
            let looked: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
            format!("no {NVRTC_SO} in {}", looked.join(", "))
        })
}

fn find_libtpu(sites: &[PathBuf]) -> std::result::Result<PathBuf, String> {
    if let Ok(p) = std::env::var("DIST_TEST_LIBTPU") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("DIST_TEST_LIBTPU={} is not a file", p.display()))
        };
    }
    let tried: Vec<PathBuf> = sites.iter().map(|s| s.join("libtpu/libtpu.so")).collect();
    tried.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        let looked: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
        format!("no libtpu.so in {}", looked.join(", "))
    })
}

/// Before the first cargo step: finds NVRTC and libtpu, and exports `DIST_TEST_LIBTPU` for every
/// cargo step that follows (so dist-tpu's build is the same for clippy, test and doc).
pub fn prepare(py: Option<&Path>) -> Result<Found> {
    let sites = site_packages(py);
    match find_libtpu(&sites) {
        Ok(p) => {
            eprintln!("==> libtpu test: {}", p.display());
            std::env::set_var("DIST_TEST_LIBTPU", &p);
        }
        Err(why) => missing(
            "dist-tpu libtpu test",
            &why,
            "DIST_REQUIRE_LIBTPU",
            LIBTPU_WHEEL,
        )?,
    }
    let nvrtc_dir = match find_nvrtc_dir(&sites) {
        Ok(d) => Some(d),
        Err(why) => {
            missing(
                "dist-cuda NVRTC kernel compiles",
                &why,
                "DIST_REQUIRE_NVRTC",
                NVRTC_WHEEL,
            )?;
            None
        }
    };
    Ok(Found { nvrtc_dir })
}

/// After `cargo test --workspace`: runs dist-cuda's NVRTC tests (with the workspace's features,
/// so nothing is rebuilt) and checks that each of them ran and passed.
pub fn nvrtc_tests(found: &Found) -> Result {
    let Some(dir) = &found.nvrtc_dir else {
        return Ok(());
    };
    let step = "dist-cuda NVRTC kernel compiles";
    eprintln!("==> {step} ({})", dir.join(NVRTC_SO).display());
    let ld = match std::env::var("LD_LIBRARY_PATH") {
        Ok(old) if !old.is_empty() => format!("{}:{old}", dir.display()),
        _ => dir.display().to_string(),
    };
    let mut cmd: Command = cargo();
    cmd.args(["test", "--workspace", "--lib"])
        .args(FEATURES)
        .args(["--", "--ignored", "--exact"])
        .args(NVRTC_TESTS)
        .env("LD_LIBRARY_PATH", ld)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = ChildGuard(
        cmd.spawn()
            .map_err(|e| format!("{step}: cannot start: {e}"))?,
    );
    let (code, log) = wait_with_deadline(&mut child, NVRTC_DEADLINE)
        .map_err(|log| format!("{step}: killed after {NVRTC_DEADLINE:?}\n{log}"))?;
    let ran: Vec<&str> = log
        .lines()
        .filter(|l| NVRTC_TESTS.iter().any(|t| *l == format!("test {t} ... ok")))
        .collect();
    for l in &ran {
        eprintln!("    {l}");
    }
    if code != Some(0) || ran.len() != NVRTC_TESTS.len() {
        return Err(format!(
            "{step}: {} of {} passed (exit {code:?})\n{log}",
            ran.len(),
            NVRTC_TESTS.len()
        ));
    }
    Ok(())
}
