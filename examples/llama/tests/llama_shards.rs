//! The sharded model with TP ranks as threads over the shared-memory communicator, against the
//! whole model in one process; and checkpoints that cannot be loaded, each error naming the tensor.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dist_core::local::{run_threads, ThreadGroup};
use dist_core::{CoordinatorParts, GroupCoordinator, HostGroup, LocalBackend};
use dist_cpu::{CpuBackend, CpuCommunicator, ShmCommunicator};
use llama::checkpoint::{write_random, CONFIG_FILE};
use llama::{
    generate, single_rank_group, Checkpoint, Error, Groups, LlamaConfig, LlamaShard, Placement,
};

const T: Duration = Duration::from_secs(60);

/// A fresh directory under the system's temporary directory, removed on drop.
struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(format!("llama-test-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        TempDir(d)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn coordinator(name: &str, rank: usize, n: usize, g: ThreadGroup) -> GroupCoordinator<CpuBackend> {
    let host: Arc<dyn HostGroup> = Arc::new(g);
    let comm = (n > 1)
        .then(|| CpuCommunicator::Shm(ShmCommunicator::new(host.as_ref(), name, T).expect("shm")));
    GroupCoordinator::new(CoordinatorParts {
        unique_name: name.into(),
        ranks: (0..n).collect(),
        rank,
        local_rank: rank,
        device: dist_core::Device::CPU,
        host,
        comm,
        mq: None,
        diag: None,
        check_collectives: false,
    })
    .unwrap()
}

fn prompt(vocab: usize) -> Vec<u32> {
    (0..9).map(|i| ((i * 131 + 7) % vocab) as u32).collect()
}

fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn tp_matches_one_process(cfg: LlamaConfig, tag: &str) {
    let dir = TempDir::new(tag);
    write_random(&dir.0, &cfg, 7, &[]).unwrap();
    let ckpt = Checkpoint::open(&dir.0).unwrap();
    let prompt = prompt(cfg.vocab_size);
    let (t1, p1) = (
        single_rank_group::<LocalBackend>("tp").unwrap(),
        single_rank_group::<LocalBackend>("pp").unwrap(),
    );
    let mut whole = LlamaShard::load(&ckpt, Placement::SINGLE).unwrap();
    let want = generate(&mut whole, &Groups::new(&t1, &p1), &prompt, 8).unwrap();
    let want_logits = want.prompt_logits.unwrap();
    assert_eq!(want_logits.len(), prompt.len() * cfg.vocab_size);
    for tp in [2, 4] {
        let got = run_threads(tp, T, |r, g| {
            let tpc = coordinator(&format!("{tag}-tp{tp}"), r, tp, g);
            let ppc = single_rank_group::<CpuBackend>("pp").unwrap();
            let p = Placement {
                tp_rank: r,
                tp,
                pp_rank: 0,
                pp: 1,
            };
            let mut m = LlamaShard::load(&ckpt, p).unwrap();
            generate(&mut m, &Groups::new(&tpc, &ppc), &prompt, 8).unwrap()
        });
        for (r, g) in got.into_iter().enumerate() {
            let g = g.expect("rank panicked");
            let logits = g.prompt_logits.as_deref().unwrap();
            // `rel_diff` zips: a shorter (or longer) logits vector must fail on its own.
            assert_eq!(logits.len(), want_logits.len(), "tp {tp} rank {r}");
            let d = rel_diff(logits, &want_logits);
            assert!(
                d <= 1e-4,
                "tp {tp} rank {r}: logits {d:e} relative from one process"
            );
            assert_eq!(g.tokens, want.tokens, "tp {tp} rank {r}");
        }
    }
}

#[test]
fn tp_shards_match_the_whole_model() {
    tp_matches_one_process(LlamaConfig::tiny(), "untied");
}

#[test]
fn tied_embeddings_shard_the_embedding_as_the_head() {
    let cfg = LlamaConfig {
        tie_word_embeddings: true,
        num_hidden_layers: 2,
        ..LlamaConfig::tiny()
    };
    tp_matches_one_process(cfg, "tied");
}

#[test]
fn pp_stages_split_the_layers_as_vllm() {
    let dir = TempDir::new("pp");
    let cfg = LlamaConfig {
        num_hidden_layers: 5,
        ..LlamaConfig::tiny()
    };
    write_random(&dir.0, &cfg, 1, &[]).unwrap();
    let ckpt = Checkpoint::open(&dir.0).unwrap();
    let ranges: Vec<_> = (0..2)
        .map(|s| {
            let p = Placement {
                tp_rank: 0,
                tp: 1,
                pp_rank: s,
                pp: 2,
            };
            LlamaShard::load(&ckpt, p).unwrap().layers()
        })
        .collect();
    // vLLM gives the remainder to the stages before the last: 5 layers over 2 stages = 3 + 2.
    assert_eq!(ranges, vec![0..3, 3..5]);
}

fn load_err(dir: &TempDir, tp: usize) -> Error {
    let ckpt = Checkpoint::open(&dir.0).unwrap();
    let p = Placement {
        tp_rank: tp - 1,
        tp,
        pp_rank: 0,
        pp: 1,
    };
    LlamaShard::load(&ckpt, p).unwrap_err()
}

#[test]
fn bad_checkpoints_name_the_tensor() {
    let cfg = LlamaConfig::tiny();
    // A missing tensor.
    let dir = TempDir::new("missing");
    let name = "model.layers.2.self_attn.v_proj.weight";
    write_random(&dir.0, &cfg, 1, &[name]).unwrap();
    let e = load_err(&dir, 2);
    assert!(
        matches!(&e, Error::MissingTensor { name: n, .. } if n == name),
        "{e}"
    );
    assert!(e.to_string().contains(name), "{e}");
    // A tensor whose shape is not the configuration's.
    let dir = TempDir::new("shape");
    write_random(&dir.0, &cfg, 1, &[]).unwrap();
    let bigger = LlamaConfig {
        intermediate_size: 384,
        ..cfg.clone()
    };
    std::fs::write(
        dir.0.join(CONFIG_FILE),
        serde_json::to_vec(&bigger).unwrap(),
    )
    .unwrap();
    let e = load_err(&dir, 1);
    assert!(
        matches!(&e, Error::Shape { name, got, want } if name == "model.layers.0.mlp.gate_proj.weight" && got == &[352, 128] && want == &[384, 128]),
        "{e}"
    );
    // Dimensions that do not divide over TP: heads, key/value heads, the padded vocabulary.
    let cases = [
        (
            LlamaConfig {
                num_attention_heads: 4,
                num_key_value_heads: Some(4),
                ..cfg.clone()
            },
            8,
            "model.layers.0.self_attn.q_proj.weight",
        ),
        (
            LlamaConfig {
                num_attention_heads: 8,
                num_key_value_heads: Some(4),
                ..cfg.clone()
            },
            8,
            "",
        ),
        (
            LlamaConfig {
                hidden_size: 96,
                num_attention_heads: 6,
                num_key_value_heads: Some(3),
                ..cfg.clone()
            },
            2,
            "model.layers.0.self_attn.k_proj.weight",
        ),
        (
            // Heads and MLP divide by 3; the 1024 rows of the padded vocabulary do not.
            LlamaConfig {
                hidden_size: 96,
                num_attention_heads: 6,
                num_key_value_heads: Some(3),
                intermediate_size: 288,
                ..cfg.clone()
            },
            3,
            "model.embed_tokens.weight",
        ),
    ];
    for (i, (c, tp, name)) in cases.into_iter().enumerate() {
        let dir = TempDir::new(&format!("div{i}"));
        write_random(&dir.0, &c, 1, &[]).unwrap();
        let ckpt = Checkpoint::open(&dir.0).unwrap();
        let r = LlamaShard::load(
            &ckpt,
            Placement {
                tp_rank: 0,
                tp,
                pp_rank: 0,
                pp: 1,
            },
        );
        match (r, name) {
            // 4 key/value heads replicate over TP 8: it loads.
            (Ok(_), "") => {}
            (Err(e @ Error::NotDivisible { .. }), n) if !n.is_empty() => {
                assert!(e.to_string().contains(n), "case {i}: {e}")
            }
            (r, _) => panic!("case {i}: {:?}", r.map(|_| ())),
        }
    }
}
