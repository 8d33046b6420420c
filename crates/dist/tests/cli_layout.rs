//! Runs `dist layout` and `dist pp-split` on configurations the unit tests do not use and compares
//! them with vLLM's formulas written out independently with explicit coordinates
//! (rank = ((((e·DP + d)·PP + p)·PCP + c)·TP + t)).

use std::process::Command;

fn dist(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_dist"))
        .args(args)
        .env_remove("DIST_PP_LAYER_PARTITION")
        .output()
        .expect("run dist");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

struct Cfg {
    ext: usize,
    dp: usize,
    pp: usize,
    pcp: usize,
    tp: usize,
    dcp: usize,
}

impl Cfg {
    fn rank(&self, e: usize, d: usize, p: usize, c: usize, t: usize) -> usize {
        (((e * self.dp + d) * self.pp + p) * self.pcp + c) * self.tp + t
    }
    fn expected(&self) -> serde_json::Value {
        let (ext, dp, pp, pcp, tp) = (self.ext, self.dp, self.pp, self.pcp, self.tp);
        let mut tpg = vec![];
        let mut ppg = vec![];
        let mut dpg = vec![];
        let mut pcpg = vec![];
        let mut epg = vec![];
        for e in 0..ext {
            for d in 0..dp {
                for p in 0..pp {
                    for c in 0..pcp {
                        tpg.push(
                            (0..tp)
                                .map(|t| self.rank(e, d, p, c, t))
                                .collect::<Vec<_>>(),
                        );
                    }
                }
            }
            // transpose(2,4): axes (E, DP, TP, PCP | PP)
            for d in 0..dp {
                for t in 0..tp {
                    for c in 0..pcp {
                        ppg.push(
                            (0..pp)
                                .map(|p| self.rank(e, d, p, c, t))
                                .collect::<Vec<_>>(),
                        );
                    }
                }
            }
            // transpose(1,4): axes (E, TP, PP, PCP | DP)
            for t in 0..tp {
                for p in 0..pp {
                    for c in 0..pcp {
                        dpg.push(
                            (0..dp)
                                .map(|d| self.rank(e, d, p, c, t))
                                .collect::<Vec<_>>(),
                        );
                    }
                }
            }
            // transpose(3,4): axes (E, DP, PP, TP | PCP)
            for d in 0..dp {
                for p in 0..pp {
                    for t in 0..tp {
                        pcpg.push(
                            (0..pcp)
                                .map(|c| self.rank(e, d, p, c, t))
                                .collect::<Vec<_>>(),
                        );
                    }
                }
            }
            // transpose(1,2), rows of DP*PCP*TP: rows (E, PP), inside (DP, PCP, TP)
            for p in 0..pp {
                let mut row = vec![];
                for d in 0..dp {
                    for c in 0..pcp {
                        for t in 0..tp {
                            row.push(self.rank(e, d, p, c, t));
                        }
                    }
                }
                epg.push(row);
            }
        }
        let world = ext * dp * pp * pcp * tp;
        let dcpg: Vec<Vec<usize>> = (0..world)
            .collect::<Vec<_>>()
            .chunks(self.dcp)
            .map(|c| c.to_vec())
            .collect();
        serde_json::json!({"tp": tpg, "pp": ppg, "dp": dpg, "pcp": pcpg, "dcp": dcpg, "ep": epg})
    }
}

#[test]
fn layout_matches_vllm_formulas() {
    let cases = [
        Cfg {
            ext: 1,
            dp: 3,
            pp: 2,
            pcp: 1,
            tp: 2,
            dcp: 1,
        },
        Cfg {
            ext: 2,
            dp: 1,
            pp: 3,
            pcp: 2,
            tp: 2,
            dcp: 2,
        },
        Cfg {
            ext: 1,
            dp: 2,
            pp: 1,
            pcp: 3,
            tp: 4,
            dcp: 4,
        },
        Cfg {
            ext: 3,
            dp: 2,
            pp: 2,
            pcp: 1,
            tp: 1,
            dcp: 1,
        },
        Cfg {
            ext: 1,
            dp: 1,
            pp: 5,
            pcp: 1,
            tp: 3,
            dcp: 3,
        },
    ];
    for c in cases {
        let world = c.ext * c.dp * c.pp * c.pcp * c.tp;
        let args = [
            "layout".to_string(),
            "--world".into(),
            world.to_string(),
            "--tp".into(),
            c.tp.to_string(),
            "--pp".into(),
            c.pp.to_string(),
            "--dp".into(),
            c.dp.to_string(),
            "--pcp".into(),
            c.pcp.to_string(),
            "--dcp".into(),
            c.dcp.to_string(),
            "--ep".into(),
            "--json".into(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out, err) = dist(&args);
        assert_eq!(code, 0, "{err}");
        let got: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(got, c.expected(), "world {world}");
    }
}

#[test]
fn layout_without_ep_has_no_ep_key() {
    let (code, out, _) = dist(&["layout", "--world", "4", "--tp", "2", "--json"]);
    assert_eq!(code, 0);
    let got: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(got.get("ep").is_none());
    assert_eq!(got["tp"], serde_json::json!([[0, 1], [2, 3]]));
}

/// vLLM's get_pp_indices, written as the Python does it.
fn vllm_pp(layers: usize, pp: usize) -> Vec<[usize; 2]> {
    let mut parts = vec![layers / pp; pp];
    let r = layers % pp;
    for i in 2..r + 2 {
        let idx = pp - i;
        parts[idx] += 1;
    }
    let mut out = vec![];
    let mut s = 0;
    for p in parts {
        out.push([s, s + p]);
        s += p;
    }
    out
}

#[test]
fn pp_split_matches_vllm() {
    for (layers, pp) in [(61, 4), (80, 3), (7, 7), (95, 8), (33, 5), (2, 1)] {
        let (code, out, err) = dist(&[
            "pp-split",
            "--layers",
            &layers.to_string(),
            "--pp",
            &pp.to_string(),
            "--json",
        ]);
        assert_eq!(code, 0, "{err}");
        let got: Vec<[usize; 2]> = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(got, vllm_pp(layers, pp), "{layers} layers / {pp}");
    }
}

#[test]
fn pp_split_env_override_and_errors() {
    let o = Command::new(env!("CARGO_BIN_EXE_dist"))
        .args(["pp-split", "--layers", "10", "--pp", "3", "--json"])
        .env("DIST_PP_LAYER_PARTITION", "2,5,3")
        .output()
        .unwrap();
    assert!(o.status.success());
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "[[0,2],[2,7],[7,10]]"
    );
    let o = Command::new(env!("CARGO_BIN_EXE_dist"))
        .args(["pp-split", "--layers", "10", "--pp", "3"])
        .env("DIST_PP_LAYER_PARTITION", "2,5,")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("invalid partition string"), "{err}");
}

#[test]
fn bad_arguments_are_one_line_errors() {
    for args in [
        vec!["layout", "--world", "7", "--tp", "2"],
        vec!["layout", "--world", "x"],
        vec!["layout", "--world", "8", "--tp", "2", "--dcp", "4"],
        vec!["layout", "--world", "0"],
        vec!["pp-split", "--layers", "4"],
    ] {
        let (code, out, err) = dist(&args);
        assert_ne!(code, 0, "{args:?}");
        assert!(out.is_empty());
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
}
