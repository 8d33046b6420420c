//! What the multi-process examples share: the launcher's `--worlds` query, a rank's `main`
//! around its checks, and the expert-parallel groups. Each example uses the part it needs.
#![allow(dead_code)]

use std::sync::Arc;

use dist::{DistEnv, GroupCoordinator, InitOptions, ParallelConfig, ParallelState};

/// The backend the examples run on.
pub type B = dist::DefaultBackend;

/// A check's result: its report, or what failed.
pub type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Answers the launcher's `--worlds` (the world sizes the example runs at, `worlds`): true when
/// the first argument asked, and the caller returns.
pub fn answered_worlds(worlds: &str) -> bool {
    let asked = std::env::args().nth(1).as_deref() == Some("--worlds");
    if asked {
        println!("{worlds}");
    }
    asked
}

/// The distributed environment from the launcher's variables; exits 1 saying why it could not.
pub fn init_env() -> DistEnv {
    match DistEnv::init(&InitOptions::default()) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("init failed: {e}");
            std::process::exit(1);
        }
    }
}

/// A rank's `main`: `run` on the environment, whose report rank 0 prints as
/// `{name}: world {world}: {report}`, then the environment's teardown. A failure of either exits
/// 1, naming the rank.
pub fn rank_main(name: &str, run: impl FnOnce(&DistEnv) -> Res<String>) {
    let env = init_env();
    let (world, rank) = (env.world().world_size, env.world().rank);
    match run(&env) {
        Ok(r) if rank == 0 => println!("{name}: world {world}: {r}"),
        Ok(_) => {}
        Err(e) => {
            eprintln!("rank {rank}: FAILED: {e}");
            std::process::exit(1);
        }
    }
    if let Err(e) = env.destroy::<B>() {
        eprintln!("rank {rank}: destroy failed: {e}");
        std::process::exit(1);
    }
}

/// Every rank in one expert-parallel group (data parallel over the world): the groups and the
/// EP group.
pub fn ep_groups(env: &DistEnv) -> Res<(ParallelState<B>, Arc<GroupCoordinator<B>>)> {
    let world = env.world().world_size;
    let state = env.initialize_model_parallel::<B>(ParallelConfig {
        dp: world,
        ep: true,
        ..ParallelConfig::new(world)
    })?;
    let ep = state.ep().ok_or("no EP group")?.clone();
    Ok((state, ep))
}
