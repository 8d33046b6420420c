//! Checkpoints in the layout of a Hugging Face Llama: `config.json` and `model.safetensors`
//! with the tensor names and shapes `LlamaForCausalLM` saves; written from a seed, read with the
//! `safetensors` crate, one rank's block of each tensor at a time.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use safetensors::tensor::{Dtype, SafeTensorError, SafeTensors, TensorView};

use crate::{Error, LlamaConfig, Result};

/// The configuration's file name.
pub const CONFIG_FILE: &str = "config.json";
/// The weights' file name.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// Every tensor of a checkpoint of `cfg`: Hugging Face names and shapes (`[out, in]` for
/// linear layers), in the order `LlamaForCausalLM` lists them.
pub fn tensor_specs(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
    let (q, kv) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads() * hd);
    let mut v = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, h],
    )];
    for l in 0..cfg.num_hidden_layers {
        let p = |s: &str| format!("model.layers.{l}.{s}.weight");
        v.extend([
            (p("input_layernorm"), vec![h]),
            (p("self_attn.q_proj"), vec![q, h]),
            (p("self_attn.k_proj"), vec![kv, h]),
            (p("self_attn.v_proj"), vec![kv, h]),
            (p("self_attn.o_proj"), vec![h, q]),
            (p("post_attention_layernorm"), vec![h]),
            (p("mlp.gate_proj"), vec![i, h]),
            (p("mlp.up_proj"), vec![i, h]),
            (p("mlp.down_proj"), vec![h, i]),
        ]);
    }
    v.push(("model.norm.weight".into(), vec![h]));
    if !cfg.tie_word_embeddings {
        v.push(("lm_head.weight".into(), vec![cfg.vocab_size, h]));
    }
    v
}

/// A uniform value in `[-1, 1)` for element `i` of tensor `name` under `seed` (splitmix64).
fn uniform(seed: u64, name: &str, i: u64) -> f32 {
    let mut h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    h ^= seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut z = h.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

/// The seeded value of every element of tensor `name` of `shape`: norms near 1, embeddings in
/// `[-1, 1)`, linear layers scaled by `1/sqrt(in)`.
fn values(seed: u64, name: &str, shape: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let scale = match (name.ends_with("norm.weight"), name.contains("embed_tokens")) {
        (true, _) => 0.1,
        (_, true) => 1.0,
        _ => 1.0 / (shape[1] as f32).sqrt(),
    };
    let offset = if name.ends_with("norm.weight") {
        1.0
    } else {
        0.0
    };
    (0..n as u64)
        .map(|i| offset + scale * uniform(seed, name, i))
        .collect()
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes a checkpoint of `cfg` into `dir` (created if needed): `config.json` and an f32
/// `model.safetensors` whose weights are drawn from `seed`. `skip` names tensors to leave out
/// (to make broken checkpoints for tests).
pub fn write_random(dir: &Path, cfg: &LlamaConfig, seed: u64, skip: &[&str]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let cfg_path = dir.join(CONFIG_FILE);
    let mut json = serde_json::to_value(cfg).map_err(|e| Error::Config(e.to_string()))?;
    json["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
    json["model_type"] = "llama".into();
    json["torch_dtype"] = "float32".into();
    std::fs::write(
        &cfg_path,
        serde_json::to_vec_pretty(&json).map_err(|e| Error::Config(e.to_string()))?,
    )
    .map_err(io(&cfg_path))?;
    let specs: Vec<(String, Vec<usize>)> = tensor_specs(cfg)
        .into_iter()
        .filter(|(n, _)| !skip.contains(&n.as_str()))
        .collect();
    let data: Vec<Vec<u8>> = specs
        .iter()
        .map(|(n, s)| {
            values(seed, n, s)
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect()
        })
        .collect();
    let path = dir.join(WEIGHTS_FILE);
    let views = specs
        .iter()
        .zip(&data)
        .map(|((n, s), d)| {
            let v = TensorView::new(Dtype::F32, s.clone(), d).map_err(|e| Error::Format {
                path: path.clone(),
                detail: e.to_string(),
            })?;
            Ok((n.clone(), v))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), &path).map_err(|e| Error::Format {
        path: path.clone(),
        detail: e.to_string(),
    })
}

/// A checkpoint read into memory: its configuration and its weights' bytes.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    /// The model's configuration.
    pub config: LlamaConfig,
    bytes: Vec<u8>,
}

impl Checkpoint {
    /// Reads `dir/config.json` and `dir/model.safetensors` and checks the header.
    pub fn open(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join(CONFIG_FILE);
        let text = std::fs::read(&cfg_path).map_err(io(&cfg_path))?;
        let config: LlamaConfig = serde_json::from_slice(&text)
            .map_err(|e| Error::Config(format!("{}: {e}", cfg_path.display())))?;
        config.validate()?;
        let path = dir.join(WEIGHTS_FILE);
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        let ck = Checkpoint {
            dir: dir.to_path_buf(),
            config,
            bytes,
        };
        ck.tensors()?;
        Ok(ck)
    }

    /// The weights file.
    pub fn weights_path(&self) -> PathBuf {
        self.dir.join(WEIGHTS_FILE)
    }

    /// The parsed weights.
    pub fn tensors(&self) -> Result<Tensors<'_>> {
        let st = SafeTensors::deserialize(&self.bytes).map_err(|e| Error::Format {
            path: self.weights_path(),
            detail: e.to_string(),
        })?;
        Ok(Tensors {
            st,
            path: self.weights_path(),
        })
    }
}

/// A checkpoint's parsed tensors.
#[derive(Debug)]
pub struct Tensors<'a> {
    st: SafeTensors<'a>,
    path: PathBuf,
}

impl Tensors<'_> {
    /// Rows `rows` and columns `cols` of tensor `name` (shape `[r, c]`, or `[c]` with `rows`
    /// `0..1`), checked against `shape`, as a contiguous f32 candle tensor of shape
    /// `[rows.len(), cols.len()]` (`[cols.len()]` for 1-D). F32, BF16 and F16 are read.
    pub fn block(
        &self,
        name: &str,
        shape: &[usize],
        rows: Range<usize>,
        cols: Range<usize>,
    ) -> Result<Tensor> {
        let v = self.st.tensor(name).map_err(|e| match e {
            SafeTensorError::TensorNotFound(_) => Error::MissingTensor {
                name: name.into(),
                file: self.path.clone(),
            },
            e => Error::Format {
                path: self.path.clone(),
                detail: format!("tensor `{name}`: {e}"),
            },
        })?;
        if v.shape() != shape {
            return Err(Error::Shape {
                name: name.into(),
                got: v.shape().to_vec(),
                want: shape.to_vec(),
            });
        }
        let ncols = *shape.last().unwrap_or(&1);
        let nrows = if shape.len() == 2 { shape[0] } else { 1 };
        debug_assert!(rows.end <= nrows && cols.end <= ncols);
        let es = match v.dtype() {
            Dtype::F32 => 4,
            Dtype::BF16 | Dtype::F16 => 2,
            d => {
                return Err(Error::DType {
                    name: name.into(),
                    dtype: format!("{d:?}"),
                })
            }
        };
        let data = v.data();
        let mut out = Vec::with_capacity(rows.len() * cols.len());
        for r in rows.clone() {
            let row = &data[(r * ncols + cols.start) * es..(r * ncols + cols.end) * es];
            match v.dtype() {
                Dtype::F32 => out.extend(
                    row.chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                ),
                Dtype::BF16 => out.extend(
                    row.chunks_exact(2)
                        .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
                ),
                _ => out.extend(
                    row.chunks_exact(2)
                        .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
                ),
            }
        }
        let dims: Vec<usize> = match shape.len() {
            2 => vec![rows.len(), cols.len()],
            _ => vec![cols.len()],
        };
        Ok(Tensor::from_vec(out, dims, &Device::Cpu)?)
    }

    /// The whole of tensor `name`, checked against `shape`.
    pub fn full(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let rows = if shape.len() == 2 { shape[0] } else { 1 };
        self.block(name, shape, 0..rows, 0..*shape.last().unwrap_or(&1))
    }
}
