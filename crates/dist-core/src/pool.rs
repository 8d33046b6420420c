//! [`HostPool`]: the output buffers of a host communicator, kept touched between calls.
//!
//! A fresh large allocation costs a page fault per page the first time it is written (in a
//! virtual machine, more than the collective itself at 64 MiB). A communicator therefore makes
//! the outputs of its out-of-place calls from a pool: buffers are size-classed (powers of two of
//! at least [`HostPool::MIN_BYTES`]), a [`HostTensor`] made from the pool goes back to it when it
//! drops, the pool keeps at most a few buffers per class and a bounded number of bytes in all, and
//! [`HostPool::close`] (called by the communicator's destroy) frees what it holds and makes later
//! returns plain frees. Small tensors are ordinary allocations: the allocator already reuses them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::tensor::checked_nbytes;
use crate::{DType, HostTensor, Result};

/// What a pool holds and how often it served a request (benchmarks and tests read it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes of the buffers kept for reuse.
    pub retained_bytes: usize,
    /// Requests served by a kept buffer.
    pub hits: u64,
    /// Requests that allocated.
    pub misses: u64,
}

#[derive(Debug, Default)]
struct State {
    /// Free buffers by class (length in 8-byte words, a power of two).
    free: BTreeMap<usize, Vec<Vec<u64>>>,
    stats: PoolStats,
    closed: bool,
}

/// A bounded, size-classed pool of host buffers (see the module docs).
#[derive(Debug)]
pub struct HostPool {
    state: Mutex<State>,
    limit_bytes: usize,
}

impl HostPool {
    /// Tensors smaller than this are not pooled.
    pub const MIN_BYTES: usize = 64 << 10;
    /// Most free buffers kept per size class.
    pub const PER_CLASS: usize = 4;
    /// The default bound on retained bytes.
    pub const DEFAULT_LIMIT: usize = 1 << 30;

    /// A pool that keeps at most `limit_bytes` of free buffers.
    pub fn new(limit_bytes: usize) -> Arc<HostPool> {
        Arc::new(HostPool {
            state: Mutex::new(State::default()),
            limit_bytes,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A tensor of `dtype` and `shape` whose contents are unspecified (whatever the buffer last
    /// held; zeros when freshly allocated). It returns its buffer to the pool when it drops.
    pub fn tensor(self: &Arc<Self>, dtype: DType, shape: &[usize]) -> Result<HostTensor> {
        let nbytes = checked_nbytes(dtype, shape)?;
        if nbytes < Self::MIN_BYTES {
            return Ok(HostTensor::zeros(dtype, shape));
        }
        let class = nbytes.div_ceil(8).next_power_of_two();
        let words = {
            let mut st = self.lock();
            let got = st.free.get_mut(&class).and_then(Vec::pop);
            match got {
                Some(w) => {
                    st.stats.hits += 1;
                    st.stats.retained_bytes -= class * 8;
                    Some(w)
                }
                None => {
                    st.stats.misses += 1;
                    None
                }
            }
        };
        let words = words.unwrap_or_else(|| vec![0u64; class]);
        Ok(HostTensor::from_pool_words(
            dtype,
            shape,
            words,
            nbytes,
            self.clone(),
        ))
    }

    /// Takes back the buffer of a dropped tensor (or frees it when full or closed).
    pub(crate) fn give_back(&self, words: Vec<u64>) {
        let class = words.len();
        if !class.is_power_of_two() {
            return;
        }
        let mut st = self.lock();
        if st.closed || st.stats.retained_bytes + class * 8 > self.limit_bytes {
            return;
        }
        let list = st.free.entry(class).or_default();
        if list.len() < Self::PER_CLASS {
            list.push(words);
            st.stats.retained_bytes += class * 8;
        }
    }

    /// Frees every kept buffer; buffers returned later are freed too.
    pub fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        st.free.clear();
        st.stats.retained_bytes = 0;
    }

    /// The pool's counters.
    pub fn stats(&self) -> PoolStats {
        self.lock().stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_and_are_bounded() {
        let p = HostPool::new(4 << 20);
        let a = p.tensor(DType::F32, &[1 << 18]).unwrap(); // 1 MiB
        assert_eq!(a.nbytes(), 1 << 20);
        let addr = a.as_bytes().as_ptr() as usize;
        drop(a);
        assert_eq!(p.stats().retained_bytes, 1 << 20);
        // Another shape of the same class reuses the buffer.
        let b = p.tensor(DType::BF16, &[3, 1 << 18]).unwrap(); // 1.5 MiB -> 2 MiB class
        assert_eq!(p.stats().misses, 2);
        drop(b);
        let c = p.tensor(DType::F32, &[4, 1 << 16]).unwrap();
        assert_eq!(c.as_bytes().as_ptr() as usize, addr);
        assert_eq!(p.stats().hits, 1);
        // Over the limit: freed, not kept.
        let big = p.tensor(DType::U8, &[8 << 20]).unwrap();
        drop(big);
        assert_eq!(p.stats().retained_bytes, 2 << 20);
        // Small tensors are not pooled; clones are plain tensors.
        let s = p.tensor(DType::F32, &[16]).unwrap();
        assert_eq!(s.nbytes(), 64);
        let c2 = c.clone();
        drop(c2);
        assert_eq!(p.stats().retained_bytes, 2 << 20);
        p.close();
        drop(c);
        assert_eq!(p.stats().retained_bytes, 0);
        assert!(p.tensor(DType::F64, &[usize::MAX / 4, 2]).is_err());
    }
}
