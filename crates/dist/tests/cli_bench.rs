//! `dist bench` reports correctness only when it checked: with `--no-check` the table and the
//! JSON rows say nothing about it; without, every row has its `#wrong` count and the summary
//! line its verdict.

use std::process::Command;

fn bench(extra: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_dist"))
        .args([
            "bench",
            "--world",
            "2",
            "--ops",
            "all_reduce,all_gather",
            "--sizes",
            "1K,4K",
            "--iters",
            "2",
            "--job-timeout",
            "120",
        ])
        .args(extra)
        .output()
        .expect("run dist bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "dist bench {extra:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The data rows of the table: (`#wrong` column, op).
fn rows(table: &str) -> Vec<(String, String)> {
    table
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let op = f[f.len() - 1].to_string();
            (f[f.len() - 3].to_string(), op)
        })
        .collect()
}

#[test]
fn no_check_says_nothing_about_correctness() {
    let t = bench(&["--no-check"]);
    assert!(t.contains("# correctness: not checked (--no-check)"), "{t}");
    assert!(!t.contains("Out of bounds") && !t.contains(" OK"), "{t}");
    let r = rows(&t);
    assert_eq!(r.len(), 4, "{t}");
    assert!(r.iter().all(|(w, _)| w == "-"), "{t}");
    let j = bench(&["--no-check", "--json"]);
    let lines: Vec<&str> = j.lines().filter(|l| l.starts_with('{')).collect();
    assert_eq!(lines.len(), 4, "{j}");
    assert!(lines.iter().all(|l| l.contains("\"wrong\":null")), "{j}");
}

#[test]
fn checked_run_counts_and_says_ok() {
    let t = bench(&[]);
    assert!(t.contains("# Out of bounds values : 0 OK"), "{t}");
    assert!(!t.contains("not checked"), "{t}");
    let r = rows(&t);
    assert_eq!(r.len(), 4, "{t}");
    assert!(r.iter().all(|(w, _)| w == "0"), "{t}");
}
