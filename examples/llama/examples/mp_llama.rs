//! The candle Llama sharded over real processes on the CPU backend.
//!
//! Under `dist run --nproc-per-node N` (N = 1, 2, 4; `LLAMA_PP=2` splits the layers over two
//! pipeline stages, TP N/2 in each): rank 0 writes a seeded checkpoint in Hugging Face's layout,
//! every rank loads its shard, and the job generates 32 greedy tokens after a fixed prompt. The
//! last rank also runs the whole model in one process; the sharded prompt logits must match it
//! within 1e-4 relative (`max |a - b| / max |b|`) and every rank's tokens must be identical to
//! it. Then broken checkpoints: a missing tensor fails exactly the ranks whose stage holds it,
//! and (TP > 1) an intermediate size that does not divide fails every rank, each error naming
//! the tensor.
//!
//! `--bench`: a larger model (`LlamaConfig::bench`), 32 prompt tokens and 64 decoded, median of
//! three runs; rank 0 prints prefill and decode tokens/s and, per decoded token, the time inside
//! the TP group's collectives. `--checkpoint DIR` uses an existing checkpoint instead of writing one.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use dist::{DistEnv, InitOptions, ParallelConfig};
use llama::checkpoint::write_random;
use llama::{
    generate, single_rank_group, Checkpoint, Error, Groups, LlamaConfig, LlamaShard, Placement,
};

type B = dist::DefaultBackend;
type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const SKIP: u8 = 77;
const SEED: u64 = 2024;

struct Args {
    bench: bool,
    steps: usize,
    checkpoint: Option<PathBuf>,
}

fn parse() -> Res<Args> {
    let mut a = Args {
        bench: false,
        steps: 32,
        checkpoint: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(s) = it.next() {
        match s.as_str() {
            "--bench" => a.bench = true,
            "--steps" => a.steps = it.next().ok_or("--steps needs a count")?.parse()?,
            "--checkpoint" => {
                a.checkpoint = Some(it.next().ok_or("--checkpoint needs a directory")?.into())
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok(a)
}

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("--worlds") {
        println!("1,2,4\nLLAMA_PP=2");
        return ExitCode::SUCCESS;
    }
    match run() {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("mp_llama: {e}");
            ExitCode::FAILURE
        }
    }
}

fn prompt(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 97 + 13) % vocab) as u32).collect()
}

/// `max |a - b| / max |b|`.
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = b
        .iter()
        .fold(0f32, |m, x| m.max(x.abs()))
        .max(f32::MIN_POSITIVE);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn run() -> Res<u8> {
    let args = parse()?;
    let env = DistEnv::init(&InitOptions::default())?;
    let (rank, world) = (env.world().rank, env.world().world_size);
    let pp: usize = match std::env::var("LLAMA_PP") {
        Ok(s) if !s.is_empty() => s.parse()?,
        _ => 1,
    };
    if pp == 0 || world % pp != 0 || pp > world {
        println!("SKIPPED: PP {pp} needs a multiple of {pp} processes, the job has {world}");
        return Ok(SKIP);
    }
    let tp = world / pp;
    let state = env.initialize_model_parallel::<B>(ParallelConfig {
        tp,
        pp,
        ..ParallelConfig::new(world)
    })?;
    let wg = state.world();
    let cfg = match args.bench {
        true => LlamaConfig::bench(),
        false => LlamaConfig::tiny(),
    };
    // Rank 0 writes the checkpoints and tells the others where they are.
    let mut made = vec![];
    let dir = match &args.checkpoint {
        Some(d) => d.clone(),
        None => {
            let dirs: Vec<String> = match rank {
                0 => {
                    let base =
                        std::env::temp_dir().join(format!("dist-llama-{}", std::process::id()));
                    let good = base.join("model");
                    write_random(&good, &cfg, SEED, &[])?;
                    let mut d = vec![good.display().to_string()];
                    if !args.bench {
                        let missing = base.join("missing");
                        write_random(
                            &missing,
                            &cfg,
                            SEED,
                            &["model.layers.1.mlp.down_proj.weight"],
                        )?;
                        let odd = base.join("indivisible");
                        let cfg = LlamaConfig {
                            intermediate_size: 353,
                            ..cfg.clone()
                        };
                        write_random(&odd, &cfg, SEED, &[])?;
                        d.push(missing.display().to_string());
                        d.push(odd.display().to_string());
                    }
                    made.push(base);
                    wg.broadcast_object(Some(&d), 0)?
                }
                _ => wg.broadcast_object::<Vec<String>>(None, 0)?,
            };
            let r = run_checks(&args, &state, &dirs, tp, pp);
            // Every rank is done with the files before rank 0 removes them.
            let b = wg.barrier();
            for d in made {
                let _ = std::fs::remove_dir_all(d);
            }
            b?;
            return r;
        }
    };
    let dirs = vec![dir.display().to_string()];
    run_checks(&args, &state, &dirs, tp, pp)
}

fn run_checks(
    args: &Args,
    state: &dist::ParallelState<B>,
    dirs: &[String],
    tp: usize,
    pp: usize,
) -> Res<u8> {
    let (rank, world) = (state.world().rank_in_group(), state.world().world_size());
    let placement = Placement {
        tp_rank: state.tp().rank_in_group(),
        tp,
        pp_rank: state.pp().rank_in_group(),
        pp,
    };
    let ckpt = Checkpoint::open(Path::new(&dirs[0]))?;
    let mut model = LlamaShard::load(&ckpt, placement)?;
    let groups = Groups::new(state.tp(), state.pp());
    if args.bench {
        return bench(state, &mut model, &groups, tp, pp);
    }
    let vocab = ckpt.config.vocab_size;
    let prompt = prompt(12, vocab);
    let got = generate(&mut model, &groups, &prompt, args.steps)?;

    // The oracle: the whole model in one process, on the last rank (a last-stage rank, which
    // holds the gathered logits), its tokens then broadcast to every rank.
    let mut ok = true;
    let last = world - 1;
    let want_tokens: Vec<u32> = if rank == last {
        let mut whole = LlamaShard::load(&ckpt, Placement::SINGLE)?;
        let t1 = single_rank_group::<dist::LocalBackend>("tp:single")?;
        let p1 = single_rank_group::<dist::LocalBackend>("pp:single")?;
        let want = generate(&mut whole, &Groups::new(&t1, &p1), &prompt, args.steps)?;
        let (a, b) = (
            got.prompt_logits
                .as_deref()
                .ok_or("the last rank has no logits")?,
            want.prompt_logits
                .as_deref()
                .ok_or("the single process has no logits")?,
        );
        let d = rel_diff(a, b);
        println!(
            "mp_llama: tp={tp} pp={pp}: prompt logits ({} x {vocab}) within {d:.2e} of one process (limit 1e-4)",
            prompt.len()
        );
        if a.len() != b.len() || d > 1e-4 {
            eprintln!("mp_llama: rank {rank}: prompt logits differ by {d:.3e} relative");
            ok = false;
        }
        state.world().broadcast_object(Some(&want.tokens), last)?
    } else {
        state.world().broadcast_object::<Vec<u32>>(None, last)?
    };
    if (placement.is_first_stage() || placement.is_last_stage()) && got.tokens != want_tokens {
        eprintln!(
            "mp_llama: rank {rank}: greedy tokens {:?} differ from one process's {want_tokens:?}",
            got.tokens
        );
        ok = false;
    }
    if rank == last && ok {
        println!(
            "mp_llama: tp={tp} pp={pp}: {} greedy tokens identical to one process: {want_tokens:?}",
            want_tokens.len()
        );
    }

    // Broken checkpoints: errors naming the tensor, on exactly the ranks that read it.
    let missing = "model.layers.1.mlp.down_proj.weight";
    match (
        LlamaShard::load(&Checkpoint::open(Path::new(&dirs[1]))?, placement),
        model.layers().contains(&1),
    ) {
        (Err(Error::MissingTensor { name, .. }), true) if name == missing => {}
        (Ok(_), false) => {}
        (r, holds) => {
            eprintln!(
                "mp_llama: rank {rank}: loading a checkpoint without {missing} (stage holds layer 1: {holds}) gave {:?}",
                r.map(|_| ())
            );
            ok = false;
        }
    }
    let odd = LlamaShard::load(&Checkpoint::open(Path::new(&dirs[2]))?, placement);
    let want_name = format!("model.layers.{}.mlp.gate_proj.weight", model.layers().start);
    match (odd, tp) {
        (Ok(_), 1) => {}
        (Err(e @ Error::NotDivisible { .. }), t) if t > 1 && e.to_string().contains(&want_name) => {
            if rank == 0 {
                println!("mp_llama: tp={tp}: indivisible checkpoint refused: {e}");
            }
        }
        (r, _) => {
            eprintln!(
                "mp_llama: rank {rank}: intermediate_size 353 over TP {tp} gave {:?}",
                r.map(|_| ())
            );
            ok = false;
        }
    }
    Ok(if ok { 0 } else { 1 })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn bench(
    state: &dist::ParallelState<B>,
    model: &mut LlamaShard,
    groups: &Groups<'_, B>,
    tp: usize,
    pp: usize,
) -> Res<u8> {
    let (prompt_len, steps, reps) = (32, 65, 3);
    let prompt = prompt(prompt_len, model.config().vocab_size);
    generate(model, groups, &prompt, 8)?; // warm-up
    let (mut pre, mut dec, mut dec_ms, mut dec_comm_ms) = (vec![], vec![], vec![], vec![]);
    for _ in 0..reps {
        let g = generate(model, groups, &prompt, steps)?;
        let n = (steps - 1) as f64;
        pre.push(prompt_len as f64 / g.prefill.as_secs_f64());
        dec.push(n / g.decode.as_secs_f64());
        dec_ms.push(g.decode.as_secs_f64() * 1e3 / n);
        dec_comm_ms.push(g.decode_comm.as_secs_f64() * 1e3 / n);
    }
    state.world().barrier()?;
    if state.world().rank_in_group() == 0 {
        let c = model.config();
        println!(
            "llama bench: tp={tp} pp={pp} (hidden {}, {} layers, vocab {}, {} threads per rank): prefill {:.0} tok/s, decode {:.1} tok/s = {:.2} ms/token, of which {:.2} ms inside TP collectives on rank 0 (waits for the slowest rank included); median of {reps}",
            c.hidden_size,
            c.num_hidden_layers,
            c.vocab_size,
            candle_core::utils::get_num_threads(),
            median(pre),
            median(dec),
            median(dec_ms),
            median(dec_comm_ms),
        );
    }
    Ok(0)
}
