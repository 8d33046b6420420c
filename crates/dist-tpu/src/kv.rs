//! The key-value store callbacks of `PJRT_Client_Create`, backed by a dist-core [`Store`].
//!
//! Multi-process PJRT clients (several hosts, or one process per chip) exchange topology and
//! communicator ids through a key-value store the caller provides. Here that is the job's store
//! (`ctx.store`, dist-store's TCP store in production). Keys are prefixed with
//! `dist-tpu/pjrt/` so they cannot collide with the job's other keys. Every get is bounded by
//! the timeout the plugin passes (or the adapter's default when the plugin passes none), and
//! fails with `DEADLINE_EXCEEDED` naming the key. A panic inside a callback is caught and
//! becomes an `INTERNAL` error: nothing unwinds into C.

use std::ffi::{c_char, c_void};
use std::sync::Arc;
use std::time::Duration;

use dist_core::{Error, Store};

use crate::sys;

/// Prefix of every key the plugin stores.
pub const KEY_PREFIX: &str = "dist-tpu/pjrt/";
/// Largest value the get callback hands to the plugin (the plugin's values are small: topology
/// protos and ids). Larger values are refused before allocating.
pub const MAX_VALUE_BYTES: usize = 64 << 20;

/// What the callbacks reach through their `user_arg`.
#[derive(Debug)]
pub struct KvAdapter {
    store: Arc<dyn Store>,
    default_timeout: Duration,
}

/// The two callbacks and their shared user argument, for `PJRT_Client_Create_Args`.
#[derive(Debug, Clone, Copy)]
pub struct RawCallbacks {
    /// `kv_get_callback`.
    pub get: sys::PJRT_KeyValueGetCallback,
    /// `kv_put_callback`.
    pub put: sys::PJRT_KeyValuePutCallback,
    /// A `*const KvAdapter` (the same for both).
    pub user_arg: *mut c_void,
}

impl KvAdapter {
    /// An adapter over `store`; gets with no timeout from the plugin wait `default_timeout`.
    pub fn new(store: Arc<dyn Store>, default_timeout: Duration) -> KvAdapter {
        KvAdapter {
            store,
            default_timeout,
        }
    }

    /// The callbacks, with `self` as user argument. `self` must outlive every use of them (the
    /// client keeps them for its whole life; dist-tpu leaks the adapter of its process-wide client).
    pub fn callbacks(&'static self) -> RawCallbacks {
        RawCallbacks {
            get: kv_get,
            put: kv_put,
            user_arg: self as *const KvAdapter as *mut c_void,
        }
    }

    fn get(&self, key: &str, timeout_ms: i32) -> Result<Vec<u8>, (i32, String)> {
        let timeout = if timeout_ms > 0 {
            Duration::from_millis(timeout_ms as u64)
        } else {
            self.default_timeout
        };
        let k = format!("{KEY_PREFIX}{key}");
        match self.store.get(&k, timeout) {
            Ok(v) if v.len() > MAX_VALUE_BYTES => Err((
                sys::code::INVALID_ARGUMENT,
                format!(
                    "kv get {k}: value of {} bytes exceeds {MAX_VALUE_BYTES}",
                    v.len()
                ),
            )),
            Ok(v) => Ok(v),
            Err(e @ Error::Timeout { .. }) => {
                Err((sys::code::DEADLINE_EXCEEDED, format!("kv get {k}: {e}")))
            }
            Err(e) => Err((sys::code::UNAVAILABLE, format!("kv get {k}: {e}"))),
        }
    }

    fn put(&self, key: &str, value: &[u8]) -> Result<(), (i32, String)> {
        let k = format!("{KEY_PREFIX}{key}");
        self.store
            .set(&k, value)
            .map_err(|e| (sys::code::UNAVAILABLE, format!("kv put {k}: {e}")))
    }
}

/// Makes the plugin's error through its `callback_error` function.
///
/// # Safety
/// `cb` is null or points to the plugin's `PJRT_CallbackError`.
unsafe fn make_error(
    cb: *mut sys::PJRT_CallbackError,
    code: i32,
    msg: &str,
) -> *mut sys::PJRT_Error {
    if cb.is_null() {
        tracing::error!("PJRT kv callback failed without a callback_error to report it: {msg}");
        return std::ptr::null_mut();
    }
    // SAFETY: cb points to a function pointer the plugin provided; the message is copied by it.
    unsafe { (*cb)(code, msg.as_ptr() as *const c_char, msg.len()) }
}

unsafe extern "C" fn free_value(value: *mut c_char) {
    // SAFETY: `value` was allocated by libc::malloc in kv_get (or is null).
    unsafe { libc::free(value as *mut c_void) }
}

/// The `kv_get_callback`.
///
/// # Safety
/// Called by the plugin with valid args whose `user_arg` is a live `KvAdapter`.
pub unsafe extern "C" fn kv_get(
    args: *mut sys::PJRT_KeyValueGetCallback_Args,
) -> *mut sys::PJRT_Error {
    if args.is_null() {
        return std::ptr::null_mut();
    }
    let r = std::panic::catch_unwind(|| {
        // SAFETY: the plugin passes valid args; user_arg is the adapter (see callbacks()).
        let a = unsafe { &mut *args };
        // SAFETY: the key has key_size bytes.
        let key = unsafe { crate::result::str_from(a.key, a.key_size) };
        // SAFETY: user_arg is a &'static KvAdapter.
        let ad = unsafe { &*(a.user_arg as *const KvAdapter) };
        match ad.get(&key, a.timeout_in_ms) {
            Ok(v) => {
                // SAFETY: malloc of at least 1 byte; freed by free_value.
                let p = unsafe { libc::malloc(v.len().max(1)) } as *mut u8;
                if p.is_null() {
                    return Err((sys::code::INTERNAL, format!("kv get {key}: out of memory")));
                }
                // SAFETY: p has room for v.len() bytes.
                unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), p, v.len()) };
                a.value = p as *mut c_char;
                a.value_size = v.len();
                a.value_deleter_callback = Some(free_value);
                Ok(())
            }
            Err(e) => Err(e),
        }
    });
    let (code, msg) = match r {
        Ok(Ok(())) => return std::ptr::null_mut(),
        Ok(Err(e)) => e,
        Err(_) => (sys::code::INTERNAL, "kv get callback panicked".to_string()),
    };
    // SAFETY: args is valid; callback_error is the plugin's.
    unsafe { make_error((*args).callback_error, code, &msg) }
}

/// The `kv_put_callback`.
///
/// # Safety
/// Called by the plugin with valid args whose `user_arg` is a live `KvAdapter`.
pub unsafe extern "C" fn kv_put(
    args: *mut sys::PJRT_KeyValuePutCallback_Args,
) -> *mut sys::PJRT_Error {
    if args.is_null() {
        return std::ptr::null_mut();
    }
    let r = std::panic::catch_unwind(|| {
        // SAFETY: the plugin passes valid args.
        let a = unsafe { &*args };
        // SAFETY: key_size bytes at key.
        let key = unsafe { crate::result::str_from(a.key, a.key_size) };
        let value: &[u8] = if a.value.is_null() || a.value_size == 0 {
            &[]
        } else {
            // SAFETY: value_size bytes at value, alive for the call.
            unsafe { std::slice::from_raw_parts(a.value as *const u8, a.value_size) }
        };
        // SAFETY: user_arg is a &'static KvAdapter.
        let ad = unsafe { &*(a.user_arg as *const KvAdapter) };
        ad.put(&key, value)
    });
    let (code, msg) = match r {
        Ok(Ok(())) => return std::ptr::null_mut(),
        Ok(Err(e)) => e,
        Err(_) => (sys::code::INTERNAL, "kv put callback panicked".to_string()),
    };
    // SAFETY: args is valid; callback_error is the plugin's.
    unsafe { make_error((*args).callback_error, code, &msg) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dist_core::local::MemStore;
    use std::sync::Mutex;

    // A stand-in for the plugin's PJRT_CallbackError: records (code, message) and returns a
    // distinct non-null pointer.
    static LAST: Mutex<Option<(i32, String)>> = Mutex::new(None);
    unsafe extern "C" fn fake_error(
        code: i32,
        msg: *const c_char,
        n: usize,
    ) -> *mut sys::PJRT_Error {
        // SAFETY: n bytes at msg (the adapter passes a &str).
        let m = unsafe { crate::result::str_from(msg, n) };
        *LAST.lock().unwrap() = Some((code, m));
        std::ptr::NonNull::<sys::PJRT_Error>::dangling().as_ptr()
    }

    fn adapter() -> (&'static KvAdapter, Arc<MemStore>) {
        let store = Arc::new(MemStore::new());
        let ad: &'static KvAdapter = Box::leak(Box::new(KvAdapter::new(
            store.clone(),
            Duration::from_millis(200),
        )));
        (ad, store)
    }

    fn put(cb: &RawCallbacks, key: &str, value: &[u8]) -> *mut sys::PJRT_Error {
        let mut errfn: sys::PJRT_CallbackError = fake_error;
        let mut a = sys::Args::<sys::PJRT_KeyValuePutCallback_Args>::new();
        a.a.key = key.as_ptr() as *const c_char;
        a.a.key_size = key.len();
        a.a.value = value.as_ptr() as *const c_char;
        a.a.value_size = value.len();
        a.a.callback_error = &mut errfn;
        a.a.user_arg = cb.user_arg;
        // SAFETY: valid args, as the plugin would pass.
        unsafe { (cb.put)(a.ptr()) }
    }

    fn get(cb: &RawCallbacks, key: &str, timeout_ms: i32) -> Result<Vec<u8>, (i32, String)> {
        let mut errfn: sys::PJRT_CallbackError = fake_error;
        let mut a = sys::Args::<sys::PJRT_KeyValueGetCallback_Args>::new();
        a.a.key = key.as_ptr() as *const c_char;
        a.a.key_size = key.len();
        a.a.timeout_in_ms = timeout_ms;
        a.a.callback_error = &mut errfn;
        a.a.user_arg = cb.user_arg;
        // SAFETY: valid args, as the plugin would pass.
        let e = unsafe { (cb.get)(a.ptr()) };
        if !e.is_null() {
            return Err(LAST.lock().unwrap().take().unwrap());
        }
        // SAFETY: the callback set value/value_size; we copy, then call its deleter as PJRT does.
        let v =
            unsafe { std::slice::from_raw_parts(a.a.value as *const u8, a.a.value_size) }.to_vec();
        // SAFETY: the deleter frees the value once.
        unsafe { (a.a.value_deleter_callback.unwrap())(a.a.value) };
        Ok(v)
    }

    #[test]
    fn put_then_get_roundtrips_through_the_store_with_a_prefix() {
        let (ad, store) = adapter();
        let cb = ad.callbacks();
        // random bytes, including NULs and an empty value
        let mut x = 0x1234_5678_9abc_def0u64;
        let val: Vec<u8> = (0..4097)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(put(&cb, "gpu:local_topology/1", &val).is_null());
        assert!(put(&cb, "empty", b"").is_null());
        assert_eq!(get(&cb, "gpu:local_topology/1", 1000).unwrap(), val);
        assert_eq!(get(&cb, "empty", 1000).unwrap(), Vec::<u8>::new());
        // stored under the prefix, so other users of the store do not collide
        assert_eq!(
            store
                .get(
                    "dist-tpu/pjrt/gpu:local_topology/1",
                    Duration::from_millis(10)
                )
                .unwrap(),
            val
        );
        assert!(store
            .get("gpu:local_topology/1", Duration::from_millis(10))
            .is_err());
    }

    #[test]
    fn a_missing_key_is_deadline_exceeded_naming_the_key_within_the_timeout() {
        let (ad, _store) = adapter();
        let cb = ad.callbacks();
        let t = std::time::Instant::now();
        let (code, msg) = get(&cb, "never/set", 50).unwrap_err();
        assert_eq!(code, sys::code::DEADLINE_EXCEEDED);
        assert!(msg.contains("dist-tpu/pjrt/never/set"), "{msg}");
        assert!(t.elapsed() < Duration::from_secs(5));
        // a zero timeout from the plugin means the adapter's default (200 ms here)
        let t = std::time::Instant::now();
        assert!(get(&cb, "never/set", 0).is_err());
        assert!(
            t.elapsed() >= Duration::from_millis(150),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn a_get_waits_for_a_later_put_from_another_thread() {
        let (ad, _store) = adapter();
        let cb = ad.callbacks();
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            let cb = ad.callbacks();
            assert!(put(&cb, "late", b"v").is_null());
        });
        assert_eq!(get(&cb, "late", 5000).unwrap(), b"v");
        h.join().unwrap();
    }
}
