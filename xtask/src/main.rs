//! `cargo xtask <task>`: the project's automation (matklad's xtask pattern; std only, so it builds fast).
//!
//! - `cargo xtask test`: installs missing system packages, then `cargo fmt --check`, `cargo clippy -D warnings`,
//!   `cargo test --workspace`, the tests that need NVRTC or libtpu but no hardware ([`hw_free`]), the
//!   mutation check (one line per deliberately corrupted communicator and the conformance check that
//!   caught it), `cargo doc` (warnings denied) and the multi-process suite.
//! - `cargo xtask test-multiproc [--filter S] [--timeout SECS]`: builds every `mp_*` example and runs it under
//!   `dist run --nproc-per-node N` for each world size it declares (`prog --worlds`), each run with a deadline.
//! - `cargo xtask bench [ARGS…]`: builds release and runs `dist bench ARGS…` (default: 4 local ranks, CPU backend).
//! - `cargo xtask deps`: only the system-package step.

mod hw_free;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// Debian packages the default build and tests need: (package, probe command that succeeds when present).
const SYSTEM_PACKAGES: &[(&str, &[&str])] = &[
    ("pkg-config", &["pkg-config", "--version"]),
    ("libzmq3-dev", &["pkg-config", "--exists", "libzmq"]),
    (
        "libgloo-dev",
        &["test", "-e", "/usr/include/gloo/allreduce.h"],
    ),
    // HIP runtime (no AMD GPU needed): the ROCm backend's "no device" paths are tested with it.
    (
        "libamdhip64-dev",
        &["sh", "-c", "ldconfig -p | grep -q libamdhip64"],
    ),
];

/// Cargo features every build and test of the workspace turns on: the gloo path of dist-cpu and
/// every hardware backend of the facade (they build without their hardware and say so at run time).
const FEATURES: &[&str] = &[
    "--features",
    "dist-cpu/gloo,dist/cuda,dist/rocm,dist/tpu,dist-kv/cuda",
];
/// The mutation check: building dist-cpu's mutation tests (normally already built by
/// `cargo test --workspace`) and running them.
const MUTATION_DEADLINE: Duration = Duration::from_secs(20 * 60);
/// One step of `cargo xtask` (a cargo build, test or doc run of the workspace, an install).
const STEP_DEADLINE: Duration = Duration::from_secs(3 * 60 * 60);
/// A probe for an installed tool or module.
const PROBE_DEADLINE: Duration = Duration::from_secs(60);
/// Making target/pyenv and installing its packages.
const PIP_DEADLINE: Duration = Duration::from_secs(15 * 60);
/// A multi-process test program's `--worlds` listing (it prints and exits).
const LISTING_DEADLINE: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (task, rest) = match args.split_first() {
        Some((t, r)) => (t.as_str(), r.to_vec()),
        None => ("help", vec![]),
    };
    let root = project_root();
    std::env::set_current_dir(&root).expect("cd to the project root");
    let r = match task {
        "test" => test(&rest),
        "test-multiproc" => test_multiproc(&rest),
        "bench" => bench(&rest),
        "deps" => ensure_system_packages(),
        _ => {
            eprintln!(
                "usage: cargo xtask <test | test-multiproc [--filter S] [--timeout SECS] | bench [ARGS…] | deps>"
            );
            return if task == "help" {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            };
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask {task}: {e}");
            ExitCode::FAILURE
        }
    }
}

type Result<T = ()> = std::result::Result<T, String>;

fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the root")
        .to_path_buf()
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Runs `cmd` (its output shown) and waits at most `deadline`: `Ok(exit code)` (`None` when a
/// signal ended it), or `Err` when it could not start or was killed at the deadline.
fn finish(cmd: &mut Command, deadline: Duration) -> std::result::Result<Option<i32>, String> {
    let mut child = ChildGuard(cmd.spawn().map_err(|e| format!("cannot start: {e}"))?);
    wait_with_deadline(&mut child, deadline)
        .map(|(code, _)| code)
        .map_err(|_| format!("killed after {deadline:?}"))
}

fn run(step: &str, cmd: &mut Command) -> Result {
    eprintln!("==> {step}");
    match finish(cmd, STEP_DEADLINE) {
        Ok(Some(0)) => Ok(()),
        Ok(code) => Err(format!("{step} failed (exit {code:?})")),
        Err(e) => Err(format!("{step}: {e}")),
    }
}

fn probe(cmd: &[&str]) -> bool {
    let mut c = Command::new(cmd[0]);
    c.args(&cmd[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    finish(&mut c, PROBE_DEADLINE) == Ok(Some(0))
}

fn is_root() -> bool {
    let Ok(child) = Command::new("id")
        .arg("-u")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    else {
        return false;
    };
    wait_with_deadline(&mut ChildGuard(child), PROBE_DEADLINE)
        .is_ok_and(|(code, out)| code == Some(0) && out.trim() == "0")
}

/// Installs the Debian packages the build needs when they are missing (as root), or stops with the command to run.
fn ensure_system_packages() -> Result {
    let missing: Vec<&str> = SYSTEM_PACKAGES
        .iter()
        .filter(|(_, p)| !probe(p))
        .map(|(n, _)| *n)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let cmd = format!(
        "apt-get update && apt-get install -y --no-install-recommends {}",
        missing.join(" ")
    );
    if !is_root() {
        return Err(format!(
            "missing system packages {missing:?}; run as root: {cmd}"
        ));
    }
    run(
        "install system packages",
        Command::new("sh").args(["-c", &format!("DEBIAN_FRONTEND=noninteractive {cmd}")]),
    )
}

/// A Python with pyzmq and msgspec for the cross-language KV-event tests, made once in target/pyenv.
/// Best effort: without it those tests report that they skipped.
fn ensure_python_env() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("DIST_KV_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let venv = project_root().join("target/pyenv");
    let py = venv.join("bin/python");
    let ok = |py: &Path| {
        probe(&[
            py.to_str().unwrap_or("python3"),
            "-c",
            "import zmq, msgspec",
        ])
    };
    if py.exists() && ok(&py) {
        return Some(py);
    }
    eprintln!("==> python env for cross-language tests (target/pyenv)");
    let made = finish(
        Command::new("python3").args(["-m", "venv"]).arg(&venv),
        PIP_DEADLINE,
    ) == Ok(Some(0))
        && finish(
            Command::new(&py).args(["-m", "pip", "install", "-q", "pyzmq", "msgspec"]),
            PIP_DEADLINE,
        ) == Ok(Some(0));
    if made && ok(&py) {
        Some(py)
    } else {
        eprintln!(
            "    (no python with pyzmq+msgspec: the cross-language tests will say they skipped)"
        );
        None
    }
}

fn test(args: &[String]) -> Result {
    ensure_system_packages()?;
    let py = ensure_python_env();
    let hw = hw_free::prepare(py.as_deref())?;
    run(
        "cargo fmt --check",
        cargo().args(["fmt", "--all", "--", "--check"]),
    )?;
    run(
        "cargo clippy",
        cargo()
            .args(["clippy", "--workspace", "--all-targets"])
            .args(FEATURES)
            .args(["--", "-D", "warnings"]),
    )?;
    // Tests that find at run time that they cannot run here record themselves in this file
    // (cargo would count them as passed); build-time skips are cargo's "ignored".
    let skips = target_dir().join("test-runtime-skips.txt");
    let _ = std::fs::remove_file(&skips);
    let mut t = cargo();
    t.args(["test", "--workspace"])
        .args(FEATURES)
        .env("DIST_TEST_SKIPS", &skips);
    if let Some(py) = &py {
        t.env("DIST_KV_PYTHON", py);
    }
    let tested = run("cargo test --workspace", &mut t);
    report_runtime_skips(&skips);
    tested?;
    hw_free::nvrtc_tests(&hw)?;
    mutation_check()?;
    run(
        "cargo doc",
        cargo()
            .args(["doc", "--workspace", "--no-deps"])
            .args(FEATURES)
            .env("RUSTDOCFLAGS", "-D warnings"),
    )?;
    if args.iter().any(|a| a == "--no-multiproc") {
        return Ok(());
    }
    test_multiproc(&[])
}

/// Prints the tests that skipped themselves at run time (each with its reason), which cargo's
/// own summary counts as passed.
fn report_runtime_skips(file: &Path) {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    println!(
        "tests skipped at run time: {} (cargo lists them as ok; build-time skips are its \"ignored\")",
        lines.len()
    );
    for l in lines {
        println!("  skipped {l}");
    }
}

/// Runs dist-cpu's mutation tests again with their output shown, and prints one line per
/// mutation: which conformance check caught the corrupted communicator. The tests themselves
/// fail when a mutation goes uncaught, so this step fails then too, and it fails when a mutation
/// test that ran printed no such line.
fn mutation_check() -> Result {
    let step = "mutation check (conformance suite vs. a corrupted shared-memory communicator)";
    eprintln!("==> {step}");
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--test", "mutations"])
        .args(FEATURES)
        .args(["--", "--nocapture", "--test-threads=1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = ChildGuard(
        cmd.spawn()
            .map_err(|e| format!("{step}: cannot start: {e}"))?,
    );
    let (code, log) = wait_with_deadline(&mut child, MUTATION_DEADLINE)
        .map_err(|log| format!("{step}: killed after {MUTATION_DEADLINE:?}\n{log}"))?;
    let lines: Vec<&str> = log
        .lines()
        .filter_map(|l| l.find("mutation ").map(|i| &l[i..]))
        .filter(|l| l.contains(": caught by "))
        .collect();
    for l in &lines {
        println!("  {l}");
    }
    if code != Some(0) {
        return Err(format!("{step} failed (exit {code:?}):\n{log}"));
    }
    // with --nocapture a test's own line may share the line cargo starts with `test NAME ... `
    let ran = log.matches("test mutation_").count();
    if ran == 0 || lines.len() != ran {
        return Err(format!(
            "{step}: {} of {ran} mutation tests reported the check that caught them\n{log}",
            lines.len()
        ));
    }
    Ok(())
}

/// Kills and reaps a child when dropped (so an interrupted xtask leaves no ranks behind).
struct ChildGuard(Child);
impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn test_multiproc(args: &[String]) -> Result {
    let mut filter = String::new();
    let mut timeout = 180u64;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--filter" => filter = it.next().cloned().unwrap_or_default(),
            "--timeout" => {
                timeout = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .ok_or("--timeout needs seconds")?
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    run(
        "build multi-process test programs (release)",
        cargo()
            .args(["build", "--release", "--workspace", "--examples", "--bins"])
            .args(FEATURES),
    )?;
    let target = target_dir();
    let launcher = target.join("release/dist");
    let mut progs: Vec<PathBuf> = std::fs::read_dir(target.join("release/examples"))
        .map_err(|e| format!("no examples folder: {e}"))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            n.starts_with("mp_") && !n.contains('-') && !n.contains('.') && p.is_file()
        })
        .filter(|p| p.to_string_lossy().contains(&filter))
        .collect();
    progs.sort();
    if progs.is_empty() {
        return Err(if filter.is_empty() {
            "no multi-process test program (mp_*) was built".into()
        } else {
            format!("no multi-process test program matches --filter {filter:?}")
        });
    }
    let (mut passed, mut failed) = (0, 0);
    let mut skips: Vec<(String, String)> = vec![];
    let mut failures = vec![];
    for prog in &progs {
        let name = prog.file_name().unwrap().to_string_lossy().into_owned();
        let mut child = ChildGuard(
            Command::new(prog)
                .arg("--worlds")
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("{name} --worlds: {e}"))?,
        );
        // `PROGRAM --worlds` prints the world sizes on its first line; each further line may name
        // an extra run with one environment variable set (`DIST_CPU_BACKEND=gloo`).
        let (_, listing) = wait_with_deadline(&mut child, LISTING_DEADLINE)
            .map_err(|_| format!("{name} --worlds: killed after {LISTING_DEADLINE:?}"))?;
        let mut lines = listing.lines();
        let worlds: Vec<usize> = lines
            .next()
            .unwrap_or("")
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect();
        let worlds = if worlds.is_empty() {
            vec![1, 2, 4, 8]
        } else {
            worlds
        };
        let mut runs: Vec<Option<(String, String)>> = vec![None];
        runs.extend(lines.filter_map(|l| {
            let (k, v) = l.trim().split_once('=')?;
            let env_like = !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                && !v.contains(char::is_whitespace);
            env_like.then(|| Some((k.to_string(), v.to_string())))
        }));
        for (variant, n) in runs
            .iter()
            .flat_map(|v| worlds.iter().map(move |n| (v.clone(), *n)))
        {
            let label = match &variant {
                Some((k, v)) => format!("{name} world={n} {k}={v}"),
                None => format!("{name} world={n}"),
            };
            let start = Instant::now();
            let mut cmd = Command::new(&launcher);
            cmd.args([
                "run",
                "--nproc-per-node",
                &n.to_string(),
                "--timeout",
                &timeout.to_string(),
                "--",
            ])
            .arg(prog)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
            if let Some((k, v)) = &variant {
                cmd.env(k, v);
            }
            let mut child = ChildGuard(
                cmd.spawn()
                    .map_err(|e| format!("start {}: {e}", launcher.display()))?,
            );
            let out = wait_with_deadline(&mut child, Duration::from_secs(timeout + 15));
            let secs = start.elapsed().as_secs_f64();
            match out {
                Ok((code, log)) if code == Some(SKIP_CODE) => {
                    let why = skip_reason(&log);
                    eprintln!("  skip   {label}: {why}");
                    skips.push((label.clone(), why));
                }
                Ok((Some(0), _)) => {
                    passed += 1;
                    eprintln!("  ok     {label} ({secs:.1}s)");
                }
                Ok((_, log)) => {
                    failed += 1;
                    eprintln!("  FAILED {label} ({secs:.1}s)\n{}", indent(&log));
                    failures.push(label.clone());
                }
                Err(log) => {
                    failed += 1;
                    eprintln!(
                        "  HUNG   {label}: killed after {secs:.0}s\n{}",
                        indent(&log)
                    );
                    failures.push(format!("{label} (hung)"));
                }
            }
        }
    }
    println!(
        "multiproc: {passed} passed, {failed} failed, {} skipped",
        skips.len()
    );
    for (label, why) in &skips {
        println!("  skipped {label}: {why}");
    }
    if failed > 0 {
        return Err(format!("failed: {}", failures.join(", ")));
    }
    Ok(())
}

/// Why a program that exited with [`SKIP_CODE`] skipped: its `SKIPPED: …` line (the text after
/// the marker), or a note that it gave none.
fn skip_reason(log: &str) -> String {
    log.lines()
        .find_map(|l| l.split_once("SKIPPED").map(|(_, why)| why))
        .map(|why| clip(why.trim_start_matches([':', ' ']).trim(), 200))
        .filter(|why| !why.is_empty())
        .unwrap_or_else(|| format!("exited {SKIP_CODE} without a SKIPPED line saying why"))
}

/// `s` cut to at most `max` characters, with `…` where it was cut (a loader's list of every
/// file name it tried says nothing more after the first few).
fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// Exit status of a test program that could not run here (no GPU…): counted as skipped, never passed.
const SKIP_CODE: i32 = 77;

fn indent(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    let tail = &lines[lines.len().saturating_sub(40)..];
    tail.iter().map(|l| format!("    | {l}\n")).collect()
}

/// Waits for the child; Ok((success, output)) or Err(output) when the deadline passed and it was killed.
fn wait_with_deadline(
    child: &mut ChildGuard,
    deadline: Duration,
) -> std::result::Result<(Option<i32>, String), String> {
    use std::io::Read;
    let mut out = child.0.stdout.take();
    let mut err = child.0.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(o) = out.as_mut() {
            let _ = o.read_to_string(&mut s);
        }
        s
    });
    let ereader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(e) = err.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        s
    });
    let start = Instant::now();
    let status = loop {
        match child.0.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if start.elapsed() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.0.kill();
                let _ = child.0.wait();
                break None;
            }
        }
    };
    let log = format!(
        "{}{}",
        reader.join().unwrap_or_default(),
        ereader.join().unwrap_or_default()
    );
    match status {
        Some(s) => Ok((s.code(), log)),
        None => Err(log),
    }
}

fn target_dir() -> PathBuf {
    std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| project_root().join("target"))
}

fn bench(args: &[String]) -> Result {
    ensure_system_packages()?;
    run(
        "build dist (release)",
        cargo().args(["build", "--release", "-p", "dist", "--bin", "dist"]),
    )?;
    let mut cmd = Command::new(target_dir().join("release/dist"));
    cmd.arg("bench").args(args);
    run("dist bench", &mut cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_reasons_are_found_and_clipped() {
        assert_eq!(clip("abc", 3), "abc");
        assert_eq!(clip("abcd", 3), "abc…");
        assert_eq!(clip("ééé", 2), "éé…");
        assert_eq!(skip_reason("x\nSKIPPED: no GPU\n"), "no GPU");
        let long = format!("SKIPPED: {}", "t".repeat(500));
        assert_eq!(skip_reason(&long).chars().count(), 201);
        assert!(skip_reason("nothing").contains("without a SKIPPED line"));
    }

    #[test]
    fn finish_reports_the_exit_and_kills_at_the_deadline() {
        let d = Duration::from_secs(30);
        assert_eq!(finish(&mut Command::new("true"), d), Ok(Some(0)));
        assert_eq!(
            finish(Command::new("sh").args(["-c", "exit 3"]), d),
            Ok(Some(3))
        );
        let start = Instant::now();
        let r = finish(Command::new("sleep").arg("30"), Duration::from_millis(200));
        assert!(r.is_err_and(|e| e.starts_with("killed after")));
        assert!(start.elapsed() < Duration::from_secs(10));
        assert!(finish(&mut Command::new("/nonexistent/xtask-tool"), d).is_err());
    }
}
