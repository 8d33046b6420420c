//! Multi-process weight transfer: rank 0 is the trainer and pushes a model's named tensors into
//! every other rank (packed buckets over the default backend's communicator); every receiver
//! checks that it got each tensor bit for bit, handed to a sink and written into its own model's
//! tensors (whose memory must not move). Then an update that one receiver's model cannot
//! take (a shape differs): every rank must fail naming that rank, and no tensor is loaded.
//!
//! `mp_weights --bench [MiB]` (under `dist run`) times the transfer of MiB (default 256) into the
//! receivers' model, median of 5: as tensors of 4 MiB, 64 KiB and 8 KiB, each alone or packed
//! into 64 MiB buckets; beside a plain broadcast of one tensor of the same bytes over the same
//! group, plain broadcasts of the 4 MiB tensors one by one, a plain memory copy and a checksum of
//! the same bytes on rank 0, in the same run.

use std::time::{Duration, Instant};

use dist::core::weights::{
    checksum64, receive_weights, receive_weights_into, send_weights, TransferOptions, WeightSpec,
};
use dist::{DType, DistEnv, HostTensor, ParallelConfig};

mod common;

use common::B;

fn model(tag: u64) -> Vec<(String, HostTensor)> {
    let mut m = vec![
        (
            "embed".to_string(),
            HostTensor::random(DType::BF16, &[512, 256], tag),
        ),
        (
            "norm".to_string(),
            HostTensor::random(DType::F32, &[256], tag + 1),
        ),
    ];
    for l in 0..4u64 {
        m.push((
            format!("layers.{l}.w13"),
            HostTensor::random(DType::BF16, &[8, 256, 128], tag + 10 + l),
        ));
        m.push((
            format!("layers.{l}.w2"),
            HostTensor::random(DType::F16, &[8, 128, 128], tag + 20 + l),
        ));
        m.push((
            format!("layers.{l}.scale"),
            HostTensor::random(DType::F32, &[8], tag + 30 + l),
        ));
    }
    m
}

fn specs(m: &[(String, HostTensor)]) -> Vec<WeightSpec> {
    m.iter()
        .map(|(n, t)| WeightSpec {
            name: n.clone(),
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
        })
        .collect()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn run(env: &DistEnv, bench: Option<usize>) -> Result<String, Box<dyn std::error::Error>> {
    let world = env.world().world_size;
    // The TP group spans the world and has the backend's device communicator.
    let state = env.initialize_model_parallel::<B>(ParallelConfig {
        tp: world,
        ..ParallelConfig::new(world)
    })?;
    let g = state.tp().clone();
    let rank = g.rank_in_group();
    let opts = TransferOptions {
        bucket_bytes: 1 << 20,
        alone_from: 512 << 10,
        deadline: Duration::from_secs(60),
        require_all: true,
    };
    if let Some(mib) = bench {
        let n = (mib / 4).max(1);
        let bytes = n * (4 << 20);
        // The same bytes as tensors of 4 MiB, 64 KiB and 8 KiB.
        let tensors = |count: usize, elems: usize| -> Vec<(String, HostTensor)> {
            (0..count)
                .map(|i| {
                    let t = HostTensor::random(DType::BF16, &[elems], i as u64);
                    (format!("t{i}"), t)
                })
                .collect()
        };
        let mut models = [
            tensors(n, 2 << 20),
            tensors(64 * n, 32 << 10),
            tensors(512 * n, 4 << 10),
        ];
        // The receivers' models: their own tensors, written in place by every transfer.
        let mut mine: Vec<Vec<(String, HostTensor)>> = models
            .iter()
            .map(|m| {
                m.iter()
                    .map(|(k, t)| (k.clone(), HostTensor::zeros(t.dtype(), t.shape())))
                    .collect()
            })
            .collect();
        let with = |alone_from: usize| TransferOptions {
            bucket_bytes: 64 << 20,
            alone_from,
            ..opts.clone()
        };
        let (alone, packed) = (with(0), with(usize::MAX));
        let variants = [
            ("4 MiB tensors, each alone (the default):", 0, &alone),
            ("4 MiB tensors, packed into 64 MiB buckets:", 0, &packed),
            ("64 KiB tensors, each alone (the default):", 1, &alone),
            ("64 KiB tensors, packed into 64 MiB buckets:", 1, &packed),
            (
                "8 KiB tensors, packed into 64 MiB buckets (the default):",
                2,
                &packed,
            ),
            ("8 KiB tensors, each alone:", 2, &alone),
        ];
        let mut times: Vec<Vec<Duration>> = vec![vec![]; variants.len()];
        let (mut plain, mut plain_each, mut copy, mut hash) = (vec![], vec![], vec![], vec![]);
        let mut raw = HostTensor::random(DType::U8, &[bytes], 9);
        let mut dst = vec![0u8; bytes];
        for i in 0..5 {
            for (v, (_, which, o)) in variants.iter().enumerate() {
                g.barrier()?;
                let t = Instant::now();
                if rank == 0 {
                    let mut w: Vec<(&str, &mut HostTensor)> = models[*which]
                        .iter_mut()
                        .map(|(k, t)| (k.as_str(), t))
                        .collect();
                    send_weights(&g, i, &mut w, o)?;
                } else {
                    let mut views: Vec<(&str, _)> = mine[*which]
                        .iter_mut()
                        .map(|(k, t)| (k.as_str(), t.view_mut()))
                        .collect();
                    receive_weights_into(&g, 0, &mut views, o)?;
                }
                times[v].push(t.elapsed());
                if rank != 0 && mine[*which] != models[*which] {
                    return Err(format!("rank {rank}: a benchmark transfer arrived wrong").into());
                }
                mine[*which]
                    .iter_mut()
                    .for_each(|(_, t)| t.as_bytes_mut().fill(0));
            }
            g.barrier()?;
            let t = Instant::now();
            g.broadcast(&mut raw, 0)?;
            plain.push(t.elapsed());
            g.barrier()?;
            let t = Instant::now();
            for (_, x) in models[0].iter_mut() {
                g.broadcast(x, 0)?;
            }
            plain_each.push(t.elapsed());
            // The copy and the checksum on rank 0 alone, the others waiting.
            if rank == 0 {
                let t = Instant::now();
                dst.copy_from_slice(raw.as_bytes());
                copy.push(t.elapsed());
                std::hint::black_box(&dst);
                let t = Instant::now();
                std::hint::black_box(checksum64(raw.as_bytes()));
                hash.push(t.elapsed());
            }
            g.barrier()?;
        }
        if rank != 0 {
            return Ok(String::new());
        }
        let gbs = |d: Duration| bytes as f64 / d.as_secs_f64() / 1e9;
        let p = median(plain);
        let row = |what: &str, d: Duration| {
            format!(
                "  {what:<62} {:7.1} ms = {:5.2} GB/s ({:.2}x the plain broadcast's time)",
                d.as_secs_f64() * 1e3,
                gbs(d),
                d.as_secs_f64() / p.as_secs_f64()
            )
        };
        let mut out = vec![format!(
            "weights bench: world {world}, {} MiB of bf16 tensors into the receivers' model, median of 5",
            bytes >> 20
        )];
        for ((what, _, _), t) in variants.iter().zip(times) {
            out.push(row(what, median(t)));
        }
        out.push(row(
            "plain broadcast of one tensor of the same bytes, same group:",
            p,
        ));
        out.push(row(
            "plain broadcasts of the 4 MiB tensors, one by one:",
            median(plain_each),
        ));
        out.push(row(
            "plain memory copy of the same bytes on rank 0:",
            median(copy),
        ));
        out.push(row(
            "checksum64 (XXH3) of the same bytes on rank 0:",
            median(hash),
        ));
        return Ok(out.join("\n"));
    }
    if world == 1 {
        return Ok("one rank: nothing to transfer".into());
    }
    // 1. A full update.
    let mut m = model(100);
    if rank == 0 {
        let mut w: Vec<(&str, &mut HostTensor)> =
            m.iter_mut().map(|(k, t)| (k.as_str(), t)).collect();
        send_weights(&g, 7, &mut w, &opts)?;
        send_weights(&g, 6, &mut w, &opts)?;
    } else {
        let mut got = Vec::new();
        let (v, _) = receive_weights(&g, 0, &specs(&m), &opts, |k, t| {
            got.push((k.to_string(), t));
            Ok(())
        })?;
        if v != 7 || got != m {
            return Err(format!("rank {rank}: received weights differ from the trainer's").into());
        }
        // The same update into the model's own tensors, which keep their memory.
        let mut mine = model(500);
        let before: Vec<usize> = mine
            .iter()
            .map(|(_, t)| t.as_bytes().as_ptr() as usize)
            .collect();
        let mut views: Vec<(&str, _)> = mine
            .iter_mut()
            .map(|(k, t)| (k.as_str(), t.view_mut()))
            .collect();
        let (v, _) = receive_weights_into(&g, 0, &mut views, &opts)?;
        drop(views);
        let after: Vec<usize> = mine
            .iter()
            .map(|(_, t)| t.as_bytes().as_ptr() as usize)
            .collect();
        if v != 6 || mine != m || before != after {
            return Err(
                format!("rank {rank}: the update into the model's tensors went wrong").into(),
            );
        }
    }
    // 2. The last rank's model has another shape for one tensor: every rank fails, naming it.
    let last = world - 1;
    let mut spec = specs(&m);
    if rank == last {
        spec[3].shape = vec![8, 256, 64];
    }
    let r = if rank == 0 {
        let mut w: Vec<(&str, &mut HostTensor)> =
            m.iter_mut().map(|(k, t)| (k.as_str(), t)).collect();
        send_weights(&g, 8, &mut w, &opts).map(|_| ())
    } else {
        let mut loaded = 0;
        let r = receive_weights(&g, 0, &spec, &opts, |_, _| {
            loaded += 1;
            Ok(())
        });
        if loaded > 0 {
            return Err(format!("rank {rank} loaded {loaded} tensors of a refused update").into());
        }
        r.map(|_| ())
    };
    match r {
        Err(e)
            if e.to_string()
                .contains(&format!("rank {last} refused the manifest")) => {}
        other => return Err(format!("rank {rank}: a refused update gave {other:?}").into()),
    }
    state.destroy()?;
    Ok("updates received bit for bit; a refused update failed every rank".into())
}

fn main() {
    if common::answered_worlds("1,2,4,8") {
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    let bench = (args.get(1).map(String::as_str) == Some("--bench"))
        .then(|| args.get(2).and_then(|s| s.parse().ok()).unwrap_or(256));
    common::rank_main("mp_weights", |env| run(env, bench));
}
