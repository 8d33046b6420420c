//! The key-value store every group rendezvouses through (PyTorch's `Store` API).

use std::time::Duration;

use crate::Result;

/// A key-value store shared by all ranks of a job, with blocking waits that always have a deadline.
///
/// `dist-store` implements it over TCP, wire-compatible with PyTorch's `TCPStore`; the semantics
/// of each call are PyTorch's (`add` stores decimal text, `compare_set` returns the value now
/// stored, `get` waits for the key).
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Sets `key` to `value`, waking waiters.
    fn set(&self, key: &str, value: &[u8]) -> Result<()>;
    /// Waits up to `timeout` for `key`, then returns its value.
    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>>;
    /// Adds `delta` to the integer (decimal text) at `key`, creating it at 0; returns the new value.
    fn add(&self, key: &str, delta: i64) -> Result<i64>;
    /// If `key` holds `expected` (or is missing and `expected` is empty), sets it to `desired`.
    /// Returns the value stored afterwards (PyTorch's semantics: a missing key with a non-empty
    /// `expected` returns `expected` and stores nothing).
    fn compare_set(&self, key: &str, expected: &[u8], desired: &[u8]) -> Result<Vec<u8>>;
    /// True when every key exists.
    fn check(&self, keys: &[&str]) -> Result<bool>;
    /// Waits up to `timeout` for every key; the timeout error names the keys still missing.
    fn wait(&self, keys: &[&str], timeout: Duration) -> Result<()>;
    /// Deletes `key`; true when it existed.
    fn delete(&self, key: &str) -> Result<bool>;
    /// Number of keys in the store.
    fn num_keys(&self) -> Result<u64>;
    /// Waits up to `timeout` for every key and returns their values in order.
    fn multi_get(&self, keys: &[&str], timeout: Duration) -> Result<Vec<Vec<u8>>>;
    /// Sets every key to its value.
    fn multi_set(&self, keys: &[&str], values: &[&[u8]]) -> Result<()>;
    /// Appends `value` to `key` (creating it).
    fn append(&self, key: &str, value: &[u8]) -> Result<()>;
}
