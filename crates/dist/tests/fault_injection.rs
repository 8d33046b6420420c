//! Fault injection: a rank killed with SIGKILL during all_reduce, barrier, broadcast_object (the
//! MessageQueue) or a store wait; a rank stopped with SIGSTOP; a rank that skips a collective;
//! mismatched sizes; the store host dying; a `/dev/shm` too small. In every case every surviving
//! rank must exit with an error that names the culprit within its deadline plus one second, and
//! no shared-memory segment may be left behind.
//!
//! The ranks are this test binary re-executed (`--exact fault_worker_entry --include-ignored`)
//! with `DIST_FAULT_CASE` set; the parent hosts the store, as `dist run` does.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dist::core::diag::now_ms;
use dist::{DType, DistEnv, HostGroupExt, HostTensor, InitOptions, ParallelConfig};
use dist_store::{ServerOptions, StoreServer};

const CASE_ENV: &str = "DIST_FAULT_CASE";
const DEADLINE_S: u64 = 4;
static SERIAL: Mutex<()> = Mutex::new(());
/// The arguments that make this test binary a rank process (run the ignored entry point alone).
const WORKER_ARGS: [&str; 5] = [
    "--exact",
    "fault_worker_entry",
    "--include-ignored",
    "--nocapture",
    "--test-threads=1",
];

/// Entry point of the rank processes, which run it with `--include-ignored`; ignored in a normal
/// test run, so it is never counted as a passed test.
#[test]
#[ignore = "entry point of the rank processes the fault tests start"]
fn fault_worker_entry() {
    let Ok(case) = std::env::var(CASE_ENV) else {
        // `--include-ignored` without the parent: not a test, nothing to do
        return;
    };
    let code = match worker(&case) {
        Ok(()) => 0,
        Err(e) => {
            println!("RANK_ERROR: {e}");
            1
        }
    };
    println!("EXIT_AT {}", now_ms());
    std::process::exit(code);
}

fn fault() -> ! {
    println!("FAULT_AT {}", now_ms());
    // SAFETY: raising SIGKILL on ourselves: the process ends here.
    unsafe { libc::raise(libc::SIGKILL) };
    unreachable!("SIGKILL returned")
}

fn worker(case: &str) -> Result<(), Box<dyn std::error::Error>> {
    let culprit: usize = std::env::var("CULPRIT")?.parse()?;
    let env = DistEnv::init(&InitOptions::default())?;
    let rank = env.world().rank;
    let world = env.world().world_size;
    let state = env.initialize_model_parallel::<dist::DefaultBackend>(ParallelConfig {
        tp: world,
        ..ParallelConfig::new(world)
    })?;
    let tp = state.tp();
    let x = |n: usize, i: u64| HostTensor::random(DType::F32, &[n], i);
    for i in 0..3 {
        tp.all_reduce(x(1024, i))?;
    }
    println!("READY {rank}");
    let start = Instant::now();
    let until = Duration::from_secs(DEADLINE_S * 3);
    match case {
        "kill_all_reduce" | "sigstop" | "store_dies" => {
            let mut i = 0;
            while start.elapsed() < until {
                if case == "kill_all_reduce"
                    && rank == culprit
                    && start.elapsed() > Duration::from_millis(700)
                {
                    fault();
                }
                if case == "store_dies" {
                    tp.barrier()?;
                } else {
                    tp.all_reduce(x(4096, i))?;
                }
                i += 1;
            }
        }
        "kill_barrier" => {
            if rank == culprit {
                fault();
            }
            tp.barrier()?;
        }
        "kill_broadcast_object" => {
            // the writer of the TP group's MessageQueue (group rank 0) dies
            for i in 0..5u64 {
                let v: u64 = tp.broadcast_object((rank == 0).then_some(&i), 0)?;
                assert_eq!(v, i);
            }
            if rank == culprit {
                fault();
            }
            let _: u64 = tp.broadcast_object((rank == 0).then_some(&7u64), 0)?;
        }
        "kill_store_wait" => {
            if rank == culprit {
                fault();
            }
            // wait on a store key the culprit would have written
            let _: u64 = env.world_group().recv_obj(culprit)?;
        }
        "hang" => {
            // The culprit stops calling collectives (as if stuck in a long host-side step).
            if rank == culprit {
                std::thread::sleep(Duration::from_secs(60));
            }
            tp.all_reduce(x(64, 1))?;
        }
        "skip" => {
            if rank != culprit {
                tp.all_reduce(x(16, 99))?;
            }
            tp.barrier()?;
        }
        "mismatch" => {
            let n = if rank == culprit { 32 } else { 16 };
            tp.all_reduce(x(n, 5))?;
        }
        other => return Err(format!("unknown case {other}").into()),
    }
    Ok(())
}

struct Rank {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Drop for Rank {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn field(lines: &[String], tag: &str) -> Option<u64> {
    lines
        .iter()
        .find_map(|l| l.split(tag).nth(1))
        .and_then(|s| s.trim().parse().ok())
}

/// Runs one case with `world` ranks and checks the survivors.
fn run_case(case: &str, world: usize, culprit: usize, check: bool, expect: &str) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut server = Some(
        StoreServer::start(ServerOptions {
            host: "127.0.0.1".into(),
            port: 0,
            ..Default::default()
        })
        .unwrap(),
    );
    let port = server.as_ref().unwrap().port();
    let exe = std::env::current_exe().unwrap();
    let mut ranks: Vec<Rank> = (0..world)
        .map(|r| {
            let mut c = Command::new(&exe);
            c.args(WORKER_ARGS)
                .env(CASE_ENV, case)
                .env("CULPRIT", culprit.to_string())
                .env("RANK", r.to_string())
                .env("LOCAL_RANK", r.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("TORCHELASTIC_USE_AGENT_STORE", "True")
                .env("DIST_TIMEOUT", DEADLINE_S.to_string())
                .env("RUST_LOG", "error")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            if check {
                c.env("DIST_CHECK_COLLECTIVES", "1");
            }
            let mut child = c.spawn().unwrap();
            let lines = Arc::new(Mutex::new(Vec::new()));
            for stream in [
                Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
                Box::new(child.stderr.take().unwrap()),
            ] {
                let l = lines.clone();
                std::thread::spawn(move || {
                    for line in BufReader::new(stream).lines().map_while(Result::ok) {
                        l.lock().unwrap().push(line);
                    }
                });
            }
            Rank { child, lines }
        })
        .collect();
    let pids: Vec<u32> = ranks.iter().map(|r| r.child.id()).collect();
    let t0 = Instant::now();
    let ready = |ranks: &Vec<Rank>| {
        ranks
            .iter()
            .all(|r| r.lines.lock().unwrap().iter().any(|l| l.contains("READY ")))
    };
    while !ready(&ranks) && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    if !ready(&ranks) {
        let logs: Vec<String> = ranks
            .iter()
            .map(|r| r.lines.lock().unwrap().join("\n"))
            .collect();
        panic!(
            "{case}: ranks did not get ready:\n{}",
            logs.join("\n----\n")
        );
    }
    let mut fault_at = None;
    match case {
        "sigstop" => {
            std::thread::sleep(Duration::from_millis(700));
            // SAFETY: signalling a child process we own.
            unsafe { libc::kill(pids[culprit] as i32, libc::SIGSTOP) };
            fault_at = Some(now_ms());
        }
        "store_dies" => {
            std::thread::sleep(Duration::from_millis(200));
            server.take();
            fault_at = Some(now_ms());
        }
        _ => {}
    }
    // Wait for every survivor (and the culprit when it is not killed) to exit.
    let limit = Duration::from_secs(DEADLINE_S * 3 + 30);
    let survivors: Vec<usize> = (0..world)
        .filter(|&r| r != culprit || !(case.starts_with("kill") || case == "sigstop"))
        .collect();
    let mut codes = vec![None; world];
    let start = Instant::now();
    while start.elapsed() < limit {
        for &r in &survivors {
            if codes[r].is_none() {
                if let Ok(Some(s)) = ranks[r].child.try_wait() {
                    codes[r] = Some(s.code().unwrap_or(-1));
                }
            }
        }
        if survivors.iter().all(|&r| codes[r].is_some()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100)); // let the readers drain
    if fault_at.is_none() {
        fault_at = field(&ranks[culprit].lines.lock().unwrap(), "FAULT_AT ");
    }
    let fault_at = fault_at.or(Some(now_ms()));
    for &r in &survivors {
        let lines = ranks[r].lines.lock().unwrap().clone();
        let log = lines.join("\n");
        assert!(
            codes[r].is_some(),
            "{case}: rank {r} hung (still running after {limit:?}):\n{log}"
        );
        assert_ne!(codes[r], Some(0), "{case}: rank {r} exited 0:\n{log}");
        let err = lines
            .iter()
            .find(|l| l.contains("RANK_ERROR"))
            .cloned()
            .unwrap_or_else(|| panic!("{case}: rank {r} printed no error:\n{log}"));
        assert!(
            names(&err, expect),
            "{case}: rank {r}'s error does not name {expect:?} (as a whole word): {err}"
        );
        if let (Some(f), Some(e)) = (fault_at, field(&lines, "EXIT_AT ")) {
            let took = e.saturating_sub(f);
            assert!(
                took <= (DEADLINE_S + 1) * 1000,
                "{case}: rank {r} took {took} ms after the fault (deadline {DEADLINE_S} s + 1 s): {err}"
            );
        }
        eprintln!("{case}: rank {r}: {err}");
    }
    drop(ranks);
    // No listening socket may remain: the store's port is closed once its host is gone (the
    // ranks' own listeners, the MessageQueue's TCP side, close with their processes).
    drop(server);
    assert!(
        std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_millis(300)
        )
        .is_err(),
        "{case}: the store port {port} still accepts connections"
    );
    // No shared-memory segment of these processes may remain: creators unlink their names once
    // every peer has mapped them, so even a rank killed later leaves nothing. Checked before any
    // cleanup; stale ones are removed only so that a failure here does not leak into later runs.
    let left: Vec<String> = std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| pids.iter().any(|p| n.starts_with(&format!("distrs.{p}."))))
                .collect()
        })
        .unwrap_or_default();
    if !left.is_empty() {
        dist::dist_cpu::shm::remove_stale_segments();
        panic!("{case}: segments left behind: {left:?}");
    }
}

/// True when `text` contains `word` delimited as a whole word: neither end touches a letter,
/// digit or `_`, and a number is not part of a longer one (`0` does not match `10`, `0.5` or
/// `rank0`).
fn names(text: &str, word: &str) -> bool {
    let part_of_word = |c: char| c.is_alphanumeric() || c == '_';
    text.match_indices(word).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let mut after = text[i + word.len()..].chars();
        let next = after.next();
        let joined_before =
            word.starts_with(part_of_word) && before.is_some_and(|c| part_of_word(c) || c == '.');
        let joined_after = word.ends_with(part_of_word)
            && next.is_some_and(|c| {
                part_of_word(c) || (c == '.' && after.next().is_some_and(|d| d.is_ascii_digit()))
            });
        !joined_before && !joined_after
    })
}

#[test]
fn names_matches_whole_words() {
    assert!(names("peer rank 0 lost", "0"));
    assert!(names("missing ranks [0]", "0"));
    assert!(names("rank 0.", "0"));
    assert!(!names("waited 4.0 s for rank 10", "0"));
    assert!(!names("rank0 and 0.5 s", "0"));
    assert!(names("missing ranks [1]", "[1]"));
    assert!(!names("missing ranks [1, 2]", "[1]"));
    assert!(names("rank 2 called all_reduce", "rank 2 called"));
    assert!(!names("rank 21 called all_reduce", "rank 2"));
}

#[test]
fn kill_during_all_reduce() {
    run_case("kill_all_reduce", 3, 2, false, "peer rank 2 lost");
}

#[test]
fn kill_during_barrier() {
    run_case("kill_barrier", 3, 1, false, "did not answer: [1]");
}

#[test]
fn kill_mq_writer_during_broadcast_object() {
    run_case("kill_broadcast_object", 3, 0, false, "peer rank 0 lost");
}

#[test]
fn kill_during_store_wait() {
    run_case("kill_store_wait", 3, 2, false, "did not answer: [2]");
}

#[test]
fn sigstop_a_rank() {
    run_case("sigstop", 3, 1, false, "did not answer: [1]");
}

#[test]
fn a_rank_skips_a_collective() {
    run_case("skip", 3, 2, true, "but rank 2 called");
}

#[test]
fn mismatched_sizes() {
    run_case("mismatch", 3, 1, true, "but rank 1 called");
}

#[test]
fn the_store_host_dies() {
    run_case("store_dies", 3, 0, false, "store");
}

/// `dist run` prints what every rank was last doing when it tears a job down.
#[test]
fn launcher_prints_what_each_rank_was_doing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dist"))
        .args(["run", "--nproc-per-node", "3", "--timeout", "60", "--"])
        .arg(&exe)
        .args(WORKER_ARGS)
        .env(CASE_ENV, "hang")
        .env("CULPRIT", "1")
        .env("DIST_TIMEOUT", DEADLINE_S.to_string())
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("what each rank was last doing"), "{err}");
    assert!(err.contains("rank 1 (pid"), "{err}");
    assert!(err.contains("tp:0 all_reduce"), "{err}");
}
