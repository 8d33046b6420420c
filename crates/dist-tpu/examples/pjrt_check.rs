//! Checks dist-tpu against a real PJRT plugin.
//!
//! ```text
//! pjrt_check probe         load the plugin, print its API version, try to create a client
//! pjrt_check conformance   world-1 dist-core conformance suite through the plugin, then one
//!                          program launched many times (compilations counted), with timings
//! ```
//!
//! The plugin comes from `DIST_PJRT_PLUGIN` (else libtpu.so, see `dist_tpu::library`). Exit
//! status: 0 passed, 1 failed, 77 skipped (no plugin found, or for `conformance`, no device).

use std::sync::Arc;
use std::time::{Duration, Instant};

use dist_core::conformance::{check_all, compare, Suite};
use dist_core::local::{MemStore, ThreadGroup};
use dist_core::{
    Backend, CommunicatorContext, DType, DeviceCommunicator, Error, HostTensor, ReduceOp,
};
use dist_tpu::TpuBackend;

fn ctx() -> CommunicatorContext {
    let hg = ThreadGroup::new(1, Duration::from_secs(120))
        .pop()
        .expect("one group");
    CommunicatorContext {
        group_name: "tpu-check".into(),
        ranks: vec![0],
        rank_in_group: 0,
        local_rank: 0,
        host_group: Arc::new(hg),
        store: Arc::new(MemStore::new()),
        timeout: Duration::from_secs(120),
    }
}

fn probe() -> i32 {
    let lib = match dist_tpu::library() {
        Ok(l) => l,
        Err(e @ Error::LibraryNotFound { .. }) => {
            println!("SKIPPED: {e}");
            return 77;
        }
        Err(e) => {
            println!("FAIL: {e}");
            return 1;
        }
    };
    println!("plugin {} reports PJRT API {}", lib.path, lib.version());
    let t = Instant::now();
    match dist_tpu::Client::create(lib, &[], None, Duration::from_secs(120)) {
        Ok(c) => println!("client: {c:?} ({:.1} s)", t.elapsed().as_secs_f64()),
        Err(e) => println!(
            "client creation failed after {:.1} s: {e}",
            t.elapsed().as_secs_f64()
        ),
    }
    0
}

fn conformance() -> Result<(), Error> {
    let c = ctx();
    let t = Instant::now();
    let comm = TpuBackend::create_communicator(&c)?;
    println!(
        "client {:?} in {:.1} s",
        comm.client(),
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let checks = check_all::<TpuBackend>(&comm, &Suite::quick(false))?;
    let s = comm.stats();
    println!(
        "conformance world 1: {checks} checks passed in {:.1} s; {} programs compiled, {} launches",
        t.elapsed().as_secs_f64(),
        s.compilations,
        s.executions
    );

    // One program, compiled once, launched many times.
    let n = 1 << 20;
    let x = HostTensor::random(DType::F32, &[n], 7);
    let dx = TpuBackend::from_host(&x, comm.device())?;
    let before = comm.stats();
    let t0 = Instant::now();
    let first = comm.all_reduce(&dx, ReduceOp::Sum)?;
    let first_s = t0.elapsed();
    let reps = 1000;
    let t1 = Instant::now();
    let mut last = first;
    for _ in 0..reps {
        last = comm.all_reduce(&dx, ReduceOp::Sum)?;
    }
    let per = t1.elapsed() / reps;
    let after = comm.stats();
    compare("all_reduce x1001", &x, &TpuBackend::to_host(&last)?, false)?;
    let compiled = after.compilations - before.compilations;
    let launched = after.executions - before.executions;
    println!(
        "all_reduce sum f32 [{n}]: {compiled} compilation(s) for {launched} launches; first call {:.1} ms (compile + run), then {:.1} us per call (launch + wait)",
        first_s.as_secs_f64() * 1e3,
        per.as_secs_f64() * 1e6
    );
    if compiled != 1 || launched != reps as u64 + 1 {
        return Err(Error::Backend {
            backend: "check",
            code: None,
            message: format!(
                "expected 1 compilation and {} launches, got {compiled} and {launched}",
                reps + 1
            ),
        });
    }
    // The same op on a second shape compiles exactly once more; the first shape none.
    let y = TpuBackend::from_host(&HostTensor::random(DType::F32, &[3, 5], 9), comm.device())?;
    comm.all_reduce(&y, ReduceOp::Sum)?;
    comm.all_reduce(&dx, ReduceOp::Sum)?;
    comm.all_reduce(&y, ReduceOp::Sum)?;
    let end = comm.stats();
    println!(
        "after a second shape: {} new compilation(s), {} programs cached",
        end.compilations - after.compilations,
        end.cached
    );
    if end.compilations - after.compilations != 1 {
        return Err(Error::Backend {
            backend: "check",
            code: None,
            message: "a cached program was compiled again".into(),
        });
    }
    // Launch cost of a tiny program (the peer figure is ci/device/tpu_jax_peer.py's).
    let tiny = TpuBackend::from_host(&HostTensor::random(DType::F32, &[1], 3), comm.device())?;
    comm.all_reduce(&tiny, ReduceOp::Sum)?;
    let t2 = Instant::now();
    for _ in 0..reps {
        comm.all_reduce(&tiny, ReduceOp::Sum)?;
    }
    println!(
        "all_reduce sum f32 [1]: {:.1} us per call (launch + wait), {reps} calls",
        (t2.elapsed() / reps).as_secs_f64() * 1e6
    );
    comm.destroy()?;
    match comm.all_reduce(&dx, ReduceOp::Sum) {
        Err(Error::NotInitialized(_)) => {}
        other => {
            return Err(Error::Backend {
                backend: "check",
                code: None,
                message: format!("use after destroy: {other:?}"),
            })
        }
    }
    Ok(())
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "probe".into());
    let code = match mode.as_str() {
        "probe" => probe(),
        "conformance" => match conformance() {
            Ok(()) => {
                println!("PASS");
                0
            }
            Err(e @ Error::LibraryNotFound { .. }) => {
                println!("SKIPPED: {e}");
                77
            }
            Err(e) => {
                println!("FAIL: {e}");
                1
            }
        },
        other => {
            eprintln!("usage: pjrt_check [probe|conformance] (got {other})");
            2
        }
    };
    std::process::exit(code);
}
