//! `dist eplb plan` against vLLM: the binary's output on every golden case of
//! `dist-core/tests/fixtures/eplb_golden.json` (made by vLLM's own policy, `ci/eplb_golden.py`),
//! and its errors for inconsistent arguments.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(tag: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!("dist-cli-eplb-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

fn plan(dir: &Path, load: &Value, sizes: [u64; 4], old: Option<&Value>) -> (bool, String, String) {
    let lp = dir.join("load.json");
    std::fs::write(&lp, load.to_string()).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dist"));
    cmd.args(["eplb", "plan", "--load"]).arg(&lp);
    for (flag, v) in ["--replicas", "--groups", "--nodes", "--ranks"]
        .iter()
        .zip(sizes)
    {
        cmd.args([flag.to_string(), v.to_string()]);
    }
    if let Some(old) = old {
        let op = dir.join("old.json");
        std::fs::write(&op, serde_json::json!({ "phy2log": old }).to_string()).unwrap();
        cmd.arg("--old").arg(&op);
    }
    let out = cmd.output().expect("run dist");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn plan_prints_vllms_plans() {
    let text = include_str!("../../dist-core/tests/fixtures/eplb_golden.json");
    let g: Value = serde_json::from_str(text).unwrap();
    let dir = temp_dir("golden");
    let cases = g["cases"].as_array().unwrap();
    let mut checked = 0;
    for c in cases {
        let sizes = ["replicas", "groups", "nodes", "ranks"].map(|k| c[k].as_u64().unwrap());
        let (ok, out, err) = plan(&dir.0, &c["load"], sizes, c.get("old"));
        assert!(ok, "{}: {err}", c["name"]);
        let got: Value = serde_json::from_str(out.trim()).expect("one JSON line");
        assert_eq!(got["phy2log"], c["phy2log"], "{}", c["name"]);
        assert_eq!(got.as_object().unwrap().len(), 1);
        checked += 1;
    }
    assert_eq!(checked, cases.len());
}

#[test]
fn inconsistent_arguments_are_errors() {
    let dir = temp_dir("errors");
    let load = serde_json::json!([[5, 1, 7, 3, 2, 8, 4, 6]]);
    for (sizes, msg) in [
        ([10, 1, 1, 4], "not a multiple of 4 ranks"),
        ([8, 1, 1, 0], "ranks must be at least 1"),
        ([4, 1, 1, 2], "fewer than the 8 logical experts"),
        ([12, 3, 1, 4], "do not divide into 3 groups"),
    ] {
        let (ok, out, err) = plan(&dir.0, &load, sizes, None);
        assert!(!ok && out.is_empty(), "{sizes:?}: {out}");
        assert!(err.contains(msg), "{sizes:?}: {err}");
    }
    let (ok, _, err) = plan(&dir.0, &serde_json::json!([[1, -2]]), [2, 1, 1, 1], None);
    assert!(!ok && err.contains("non-negative"), "{err}");
    let old = serde_json::json!([[0, 1, 2]]);
    let (ok, _, err) = plan(&dir.0, &load, [8, 1, 1, 4], Some(&old));
    assert!(!ok && err.contains("3 slots"), "{err}");
}
