//! The store's semantics as state machines with no I/O: requests in, replies and wake-ups out.
//!
//! - [`StoreState`] holds the keys, queues and pending waits of one server and executes the
//!   requests that touch them ([`StoreState::execute`]). A request's own reply is appended to a
//!   byte buffer the caller gives; a write that completes *other* connections' waits produces
//!   [`Wake`]s, which the caller delivers to those connections' [`Session`]s.
//! - [`Session`] is one connection's side of the protocol: the bytes received and not yet
//!   decoded, the replies not yet sent, the handshake (`VALIDATE`, then `AUTH` when a token is
//!   configured), the connection's pending wait and its cancellation, and the two deadlines a
//!   connection has — the handshake's and the whole-message one (a message must arrive complete
//!   within [`SessionConfig::message_timeout`] of its first byte). A peer that breaks the
//!   protocol gets a [`Refusal`], which names what it did.
//!
//! Time is a parameter (`now: Instant`), so tests drive both with a virtual clock; the socket
//! shell ([`crate::server`]) only moves bytes, keeps the sessions' timers, and locks the
//! [`StoreState`] (shared by its event loops) through [`StoreAccess`].
//!
//! **Waits.** A `WAIT` registers under each of its missing keys only (a key index, so a `SET`
//! touches the waits on that key and no others) and keeps a count of the keys still missing;
//! nothing else of the request is kept (a `WAIT_GET` keeps its keys, whose values it answers).
//! A cancelled or abandoned wait leaves its registrations behind as stale entries, skipped when
//! their key is written and swept once they outnumber the live ones: cancelling costs O(1), not
//! a scan of every list the wait was on. As in PyTorch's server, a key counts once it has
//! existed since the wait began (a later delete does not un-count it).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::proto::{
    decode_request, put_blob, put_i64, CheckResponse, Decoded, Limits, ProtoError, QueryType,
    Request, WaitResponse, FEATURE_WAIT_GET, VALIDATION_MAGIC,
};

/// Which connection a [`Session`] is; chosen by the shell (unique among live connections, and
/// not reused while a [`Wake`] for the old one may be in flight).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId(pub u64);

/// A pending wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WaitId(u64);

/// The reply of a wait that another connection's write completed, for connection `conn`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wake {
    /// The waiting connection.
    pub conn: ConnId,
    /// Its wait.
    pub wait: WaitId,
    /// `STOP_WAITING`, then the values for a `WAIT_GET`.
    pub reply: Vec<u8>,
}

/// Why a connection is dropped: what the peer did (or failed to do).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// Bytes that are not a valid frame, or a length over the limits.
    #[error("malformed request: {0}")]
    Malformed(ProtoError),
    /// The first request was not `VALIDATE`.
    #[error("first request must be VALIDATE, got query byte {0}")]
    NotValidateFirst(u8),
    /// `VALIDATE` with the wrong magic number.
    #[error("bad validation magic {0:#x}")]
    BadMagic(u32),
    /// A token is configured and the request after `VALIDATE` was not `AUTH`.
    #[error("authentication required: got query byte {0} before AUTH")]
    AuthRequired(u8),
    /// `AUTH` with the wrong token.
    #[error("wrong token")]
    BadToken,
    /// One of our extensions while they are switched off (PyTorch's server closes too).
    #[error("unknown query type {0:?} (extensions are off)")]
    ExtensionOff(QueryType),
    /// A second `WAIT` while one is pending on the connection.
    #[error("WAIT while another WAIT is pending")]
    SecondWait,
    /// `ADD` on a key whose value is not a decimal integer.
    #[error("ADD on key {0:?} whose value is not a decimal integer")]
    AddNotInteger(String),
    /// `ADD` past `i64`.
    #[error("ADD overflows i64 on key {0:?}")]
    AddOverflow(String),
    /// The handshake was not completed in time.
    #[error("handshake not completed within {0:?}")]
    HandshakeTimeout(Duration),
    /// A message did not arrive complete within the whole-message deadline.
    #[error(
        "message not complete {waited:?} after its first byte ({have} bytes received, at least \
         {need} expected; the whole-message deadline is {limit:?})"
    )]
    MessageTimeout {
        /// Since the first byte.
        waited: Duration,
        /// Bytes received.
        have: usize,
        /// Bytes the frame needs at least.
        need: usize,
        /// The deadline.
        limit: Duration,
    },
}

/// What a session needs to know about the server.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Shared secret `AUTH` must present; `None`: no authentication.
    pub token: Option<Vec<u8>>,
    /// Caps on keys, values, key counts and whole requests.
    pub limits: Limits,
    /// Serve our extensions (`HELLO`, `WAIT_GET`).
    pub extensions: bool,
    /// `VALIDATE` (and `AUTH`) must be complete within this of the connection's start.
    pub handshake_timeout: Duration,
    /// A message must be complete within this of its first byte.
    pub message_timeout: Duration,
    /// Unsent reply bytes at which the session stops decoding requests.
    pub max_pending_output: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            token: None,
            limits: Limits::default(),
            extensions: true,
            handshake_timeout: Duration::from_secs(30),
            message_timeout: Duration::from_secs(60),
            max_pending_output: 64 << 20,
        }
    }
}

impl SessionConfig {
    /// Limits before the handshake is done: `VALIDATE` and `AUTH` only, so an unauthenticated
    /// peer can make us hold at most one key's worth of bytes.
    fn handshake_limits(&self) -> Limits {
        Limits {
            max_key_len: self.limits.max_key_len,
            max_value_len: 0,
            max_keys: 0,
            max_request_bytes: self.limits.max_key_len + 16,
        }
    }
}

/// Locks the shared [`StoreState`] for one request: the shell's mutex, or a test's plain value.
pub trait StoreAccess {
    /// Runs `f` on the state; the [`Wake`]s it pushes must reach their sessions, and a wake
    /// for a connection must be on its way (in its loop's inbox) before the lock is released,
    /// so that a `CANCEL_WAIT` which finds its wait gone can rely on the wake arriving.
    fn with<R>(&mut self, f: impl FnOnce(&mut StoreState, &mut Vec<Wake>) -> R) -> R;
}

struct WaitEntry {
    conn: ConnId,
    /// Distinct keys still missing (= live registrations of this wait).
    remaining: usize,
    /// For `WAIT_GET`: the keys whose values follow `STOP_WAITING`, in request order.
    then_get: Option<Vec<Vec<u8>>>,
}

/// Keys, queues and pending waits (see the module docs).
#[derive(Default)]
pub struct StoreState {
    kv: HashMap<Vec<u8>, Vec<u8>>,
    queues: HashMap<Vec<u8>, VecDeque<Vec<u8>>>,
    /// Key -> waits registered under it (some may be stale: cancelled or completed).
    waiters: HashMap<Vec<u8>, Vec<WaitId>>,
    waits: HashMap<WaitId, WaitEntry>,
    next_wait: u64,
    /// Entries in `waiters`, live and stale.
    registered: usize,
    /// Entries in `waiters` whose wait is gone.
    stale: usize,
}

impl std::fmt::Debug for StoreState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreState")
            .field("keys", &self.kv.len())
            .field("queues", &self.queues.len())
            .field("waits", &self.waits.len())
            .field("registered", &self.registered)
            .field("stale", &self.stale)
            .finish()
    }
}

/// Sweep stale registrations once there are at least this many and they are half of all.
const SWEEP_MIN: usize = 1024;

impl StoreState {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Keys (not queues) held.
    pub fn num_keys(&self) -> usize {
        self.kv.len()
    }

    /// Pending waits.
    pub fn pending_waits(&self) -> usize {
        self.waits.len()
    }

    /// Entries of the key index (live and stale); each costs one `WaitId`.
    pub fn registrations(&self) -> usize {
        self.registered
    }

    fn present(&self, k: &[u8]) -> bool {
        self.kv.contains_key(k) || self.queues.get(k).is_some_and(|q| !q.is_empty())
    }

    /// Cancels wait `id`: `true` when it was pending, `false` when it had already completed
    /// (its [`Wake`] is then on its way to the connection).
    pub fn cancel(&mut self, id: WaitId) -> bool {
        let Some(w) = self.waits.remove(&id) else {
            return false;
        };
        self.stale += w.remaining;
        self.maybe_sweep();
        true
    }

    fn maybe_sweep(&mut self) {
        if self.stale < SWEEP_MIN || self.stale * 2 < self.registered {
            return;
        }
        let waits = &self.waits;
        let mut kept = 0;
        self.waiters.retain(|_, ids| {
            ids.retain(|id| waits.contains_key(id));
            kept += ids.len();
            !ids.is_empty()
        });
        self.registered = kept;
        self.stale = 0;
    }

    /// Counts `key` as arrived for the waits registered under it (the first live one only
    /// with `only_one`, for a queue push); completed waits become [`Wake`]s.
    fn wake_key(&mut self, key: &[u8], only_one: bool, wakes: &mut Vec<Wake>) {
        let Some(mut ids) = self.waiters.remove(key) else {
            return;
        };
        let mut taken = 0;
        for &id in &ids {
            taken += 1;
            let Some(w) = self.waits.get_mut(&id) else {
                self.stale -= 1;
                continue;
            };
            w.remaining -= 1;
            if w.remaining == 0 {
                let w = self.waits.remove(&id).expect("present");
                let mut reply = vec![WaitResponse::StopWaiting as u8];
                if let Some(keys) = &w.then_get {
                    put_values(&mut reply, &self.kv, keys);
                }
                wakes.push(Wake {
                    conn: w.conn,
                    wait: id,
                    reply,
                });
            }
            if only_one {
                break;
            }
        }
        self.registered -= taken;
        if taken < ids.len() {
            ids.drain(..taken);
            self.waiters.insert(key.to_vec(), ids);
        }
    }

    fn set_and_wake(&mut self, key: Vec<u8>, value: Vec<u8>, wakes: &mut Vec<Wake>) {
        if self.waiters.contains_key(&key) {
            self.kv.insert(key.clone(), value);
            self.wake_key(&key, false, wakes);
        } else {
            self.kv.insert(key, value);
        }
    }

    /// Executes `req` for connection `conn`, whose pending wait is `*wait` (set when a `WAIT`
    /// registers, cleared when it answers at once). Appends the reply to `reply`, pushes the
    /// replies of waits the request completed to `wakes`. `VALIDATE`, `AUTH`, `PING`, `HELLO`
    /// and `CANCEL_WAIT` are the session's, not the store's: they answer nothing here.
    pub fn execute(
        &mut self,
        conn: ConnId,
        wait: &mut Option<WaitId>,
        req: Request,
        reply: &mut Vec<u8>,
        wakes: &mut Vec<Wake>,
    ) -> Result<(), Refusal> {
        match req {
            Request::Set { key, value } => self.set_and_wake(key, value, wakes),
            Request::CompareSet {
                key,
                expected,
                desired,
            } => {
                let out = match self.kv.get_mut(&key) {
                    None if expected.is_empty() => {
                        self.set_and_wake(key, desired.clone(), wakes);
                        desired
                    }
                    // PyTorch's documented oddity: a missing key with a non-empty `expected`
                    // answers `expected` and stores nothing.
                    None => expected,
                    Some(cur) => {
                        if *cur == expected {
                            *cur = desired;
                        }
                        cur.clone()
                    }
                };
                put_blob(reply, &out);
            }
            Request::Get { key } => put_blob(reply, self.kv.get(&key).map_or(&[][..], |v| v)),
            Request::Add { key, delta } => {
                let name = || String::from_utf8_lossy(&key).into_owned();
                let cur = match self.kv.get(&key) {
                    None => 0,
                    Some(v) => parse_i64(v).ok_or_else(|| Refusal::AddNotInteger(name()))?,
                };
                let n = cur
                    .checked_add(delta)
                    .ok_or_else(|| Refusal::AddOverflow(name()))?;
                put_i64(reply, n);
                self.set_and_wake(key, n.to_string().into_bytes(), wakes);
            }
            Request::Check { keys } => {
                let ready = keys.iter().all(|k| self.present(k));
                reply.push(if ready {
                    CheckResponse::Ready
                } else {
                    CheckResponse::NotReady
                } as u8);
            }
            Request::Wait { keys } => self.start_wait(conn, wait, keys, false, reply)?,
            Request::WaitGet { keys } => self.start_wait(conn, wait, keys, true, reply)?,
            Request::GetNumKeys => put_i64(reply, self.kv.len() as i64),
            Request::DeleteKey { key } => put_i64(reply, self.kv.remove(&key).is_some() as i64),
            Request::Append { key, value } => match self.kv.get_mut(&key) {
                // Waits register only under missing keys: appending to one that exists wakes
                // nobody.
                Some(v) => v.extend_from_slice(&value),
                None => self.set_and_wake(key, value, wakes),
            },
            Request::MultiGet { keys } => put_values(reply, &self.kv, &keys),
            Request::MultiSet { pairs } => {
                for (k, v) in pairs {
                    self.set_and_wake(k, v, wakes);
                }
            }
            Request::QueuePush { key, value } => {
                match self.queues.get_mut(&key) {
                    Some(q) => q.push_back(value),
                    None => {
                        self.queues.insert(key.clone(), VecDeque::from([value]));
                    }
                }
                self.wake_key(&key, true, wakes);
            }
            Request::QueuePop { key } => {
                let (len, item) = match self.queues.get_mut(&key) {
                    None => (0, None),
                    Some(q) => {
                        let len = q.len();
                        let item = q.pop_front();
                        if q.is_empty() {
                            self.queues.remove(&key);
                        }
                        (len, item)
                    }
                };
                put_i64(reply, len as i64);
                if let Some(it) = item {
                    put_blob(reply, &it);
                }
            }
            Request::QueueLen { key } => {
                put_i64(reply, self.queues.get(&key).map_or(0, |q| q.len()) as i64)
            }
            Request::Validate { .. }
            | Request::Auth { .. }
            | Request::Ping { .. }
            | Request::Hello { .. }
            | Request::CancelWait => {}
        }
        Ok(())
    }

    /// `WAIT` (and `WAIT_GET` with `get`): answers at once when every key exists, otherwise
    /// registers under each missing key.
    fn start_wait(
        &mut self,
        conn: ConnId,
        wait: &mut Option<WaitId>,
        keys: Vec<Vec<u8>>,
        get: bool,
        reply: &mut Vec<u8>,
    ) -> Result<(), Refusal> {
        if wait.is_some() {
            return Err(Refusal::SecondWait);
        }
        let mut missing: Vec<&[u8]> = keys
            .iter()
            .map(|k| k.as_slice())
            .filter(|k| !self.present(k))
            .collect();
        if missing.is_empty() {
            reply.push(WaitResponse::StopWaiting as u8);
            if get {
                put_values(reply, &self.kv, &keys);
            }
            return Ok(());
        }
        missing.sort_unstable();
        missing.dedup();
        self.next_wait += 1;
        let id = WaitId(self.next_wait);
        for k in &missing {
            match self.waiters.get_mut(*k) {
                Some(v) => v.push(id),
                None => {
                    self.waiters.insert(k.to_vec(), vec![id]);
                }
            }
        }
        self.registered += missing.len();
        let remaining = missing.len();
        drop(missing);
        self.waits.insert(
            id,
            WaitEntry {
                conn,
                remaining,
                then_get: get.then_some(keys),
            },
        );
        *wait = Some(id);
        Ok(())
    }
}

/// Appends one value per key (empty for a missing key), as `MULTI_GET` answers.
fn put_values(out: &mut Vec<u8>, kv: &HashMap<Vec<u8>, Vec<u8>>, keys: &[Vec<u8>]) {
    for k in keys {
        put_blob(out, kv.get(k).map_or(&[][..], |v| v.as_slice()));
    }
}

/// Parses the decimal text `ADD` keeps (leading whitespace and a sign allowed, as `stoll`).
fn parse_i64(v: &[u8]) -> Option<i64> {
    std::str::from_utf8(v).ok()?.trim_start().parse().ok()
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Phase {
    /// Nothing received: the first request must be `VALIDATE`.
    New,
    /// Validated; a token is configured and `AUTH` must come next.
    NeedAuth,
    /// Serving.
    Ready,
}

/// One connection's side of the protocol (see the module docs).
#[derive(Debug)]
pub struct Session {
    id: ConnId,
    phase: Phase,
    opened: Instant,
    /// Received, not yet decoded (at most one incomplete frame after [`Session::process`]).
    rbuf: Vec<u8>,
    /// Do not decode before `rbuf` holds this many bytes.
    need: usize,
    /// When the first byte of the incomplete frame in `rbuf` arrived.
    message_since: Option<Instant>,
    out: Vec<u8>,
    out_pos: usize,
    wait: Option<WaitId>,
    /// `CANCEL_WAIT` found the wait completed: its wake is on the way; answer `WAIT_CANCELED`
    /// right after it, and decode nothing before.
    cancel_after_wake: bool,
    /// Close once the output is sent (a refused token).
    closing: Option<Refusal>,
}

/// Bytes of buffer a session keeps between messages.
const KEEP: usize = 256 * 1024;
/// Bytes of buffer a session with nothing buffered keeps.
const IDLE_KEEP: usize = 16 * 1024;

impl Session {
    /// A new connection `id`, opened at `now`.
    pub fn new(id: ConnId, now: Instant) -> Self {
        Session {
            id,
            phase: Phase::New,
            opened: now,
            rbuf: Vec::new(),
            need: 1,
            message_since: None,
            out: Vec::new(),
            out_pos: 0,
            wait: None,
            cancel_after_wake: false,
            closing: None,
        }
    }

    /// This session's connection.
    pub fn id(&self) -> ConnId {
        self.id
    }

    /// True once `VALIDATE` (and `AUTH` when required) went through.
    pub fn is_ready(&self) -> bool {
        self.phase == Phase::Ready
    }

    /// Takes bytes read from the peer.
    pub fn receive(&mut self, data: &[u8], now: Instant) {
        if self.rbuf.is_empty() && !data.is_empty() {
            self.message_since = Some(now);
        }
        self.rbuf.extend_from_slice(data);
    }

    /// Bytes received and not yet decoded (the incomplete message, after [`Self::process`]).
    pub fn buffered(&self) -> usize {
        self.rbuf.len()
    }

    /// Decodes and executes the complete requests received, in order, until none is left,
    /// the unsent output reaches [`SessionConfig::max_pending_output`], or the session waits
    /// for a wake (a `CANCEL_WAIT` that raced its wait's completion). An error means the
    /// connection must be dropped (its pending wait cancelled with [`Self::abandon`]).
    pub fn process<S: StoreAccess>(
        &mut self,
        cfg: &SessionConfig,
        now: Instant,
        store: &mut S,
    ) -> Result<(), Refusal> {
        let mut consumed = 0;
        let r = loop {
            if self.closing.is_some()
                || self.cancel_after_wake
                || self.pending_output() >= cfg.max_pending_output
            {
                break Ok(());
            }
            let buf = &self.rbuf[consumed..];
            if buf.is_empty() || buf.len() < self.need {
                break Ok(());
            }
            // Before the handshake is done only VALIDATE, then AUTH, may come: refuse anything
            // else at its first byte, and cap what it may claim.
            match (self.phase, buf[0]) {
                (Phase::New, b) if b != QueryType::Validate as u8 => {
                    break Err(Refusal::NotValidateFirst(b))
                }
                (Phase::NeedAuth, b) if b != QueryType::Auth as u8 => {
                    break Err(Refusal::AuthRequired(b))
                }
                _ => {}
            }
            let decoded = if self.phase == Phase::Ready {
                decode_request(buf, &cfg.limits)
            } else {
                decode_request(buf, &cfg.handshake_limits())
            };
            match decoded {
                Ok(Decoded::NeedMore { min_len }) => {
                    self.need = min_len;
                    break Ok(());
                }
                Ok(Decoded::Complete(req, used)) => {
                    consumed += used;
                    self.need = 1;
                    if let Err(e) = self.execute(cfg, req, store) {
                        break Err(e);
                    }
                }
                Err(e) => break Err(Refusal::Malformed(e)),
            }
        };
        if consumed > 0 {
            self.rbuf.drain(..consumed);
            // An idle connection keeps no large buffer (thousands of them wait in a
            // rendezvous); a busy one keeps up to KEEP between messages.
            if self.rbuf.is_empty() && self.rbuf.capacity() > IDLE_KEEP {
                self.rbuf = Vec::new();
            } else if self.rbuf.capacity() > 4 * KEEP && self.rbuf.len() < KEEP {
                self.rbuf.shrink_to(KEEP);
            }
            // What is left started arriving with the latest bytes.
            self.message_since = (!self.rbuf.is_empty()).then_some(now);
        }
        r
    }

    fn execute<S: StoreAccess>(
        &mut self,
        cfg: &SessionConfig,
        req: Request,
        store: &mut S,
    ) -> Result<(), Refusal> {
        match (self.phase, &req) {
            (Phase::New, Request::Validate { magic }) => {
                if *magic != VALIDATION_MAGIC {
                    return Err(Refusal::BadMagic(*magic));
                }
                self.phase = if cfg.token.is_some() {
                    Phase::NeedAuth
                } else {
                    Phase::Ready
                };
                return Ok(());
            }
            (Phase::New, r) => return Err(Refusal::NotValidateFirst(r.query_type() as u8)),
            (Phase::NeedAuth, Request::Auth { token }) => {
                let ok = cfg
                    .token
                    .as_deref()
                    .is_some_and(|t| crate::auth::ct_eq(t, token));
                if ok {
                    self.phase = Phase::Ready;
                    self.out.push(0);
                } else {
                    self.out.push(1);
                    self.closing = Some(Refusal::BadToken);
                }
                return Ok(());
            }
            (Phase::NeedAuth, r) => return Err(Refusal::AuthRequired(r.query_type() as u8)),
            (Phase::Ready, Request::Hello { .. } | Request::WaitGet { .. }) if !cfg.extensions => {
                return Err(Refusal::ExtensionOff(req.query_type()))
            }
            (Phase::Ready, _) => {}
        }
        match req {
            Request::Validate { .. } => {}
            Request::Auth { token } => {
                // Already in: a second AUTH (or one to an open server) is answered, never fatal.
                let ok = cfg
                    .token
                    .as_deref()
                    .map_or(true, |t| crate::auth::ct_eq(t, &token));
                self.out.push(if ok { 0 } else { 1 });
            }
            Request::Ping { nonce } => self.out.extend_from_slice(&nonce.to_le_bytes()),
            Request::Hello { .. } => self.out.extend_from_slice(&FEATURE_WAIT_GET.to_le_bytes()),
            Request::CancelWait => match self.wait {
                None => self.out.push(WaitResponse::WaitCanceled as u8),
                Some(id) => {
                    if store.with(|st, _| st.cancel(id)) {
                        self.wait = None;
                        self.out.push(WaitResponse::WaitCanceled as u8);
                    } else {
                        self.cancel_after_wake = true;
                    }
                }
            },
            req => {
                let (id, wait, out) = (self.id, &mut self.wait, &mut self.out);
                store.with(|st, wakes| st.execute(id, wait, req, out, wakes))?;
            }
        }
        Ok(())
    }

    /// Delivers a completed wait's reply; `false` (and nothing appended) when it is not this
    /// session's pending wait.
    pub fn on_wake(&mut self, wait: WaitId, reply: &[u8]) -> bool {
        if self.wait != Some(wait) {
            return false;
        }
        self.wait = None;
        self.out.extend_from_slice(reply);
        if self.cancel_after_wake {
            self.cancel_after_wake = false;
            self.out.push(WaitResponse::WaitCanceled as u8);
        }
        true
    }

    /// True while a `CANCEL_WAIT` waits for its wait's wake (nothing else is decoded meanwhile).
    pub fn awaits_wake(&self) -> bool {
        self.cancel_after_wake
    }

    /// The pending wait, if any.
    pub fn pending_wait(&self) -> Option<WaitId> {
        self.wait
    }

    /// Reply bytes not yet sent.
    pub fn output(&self) -> &[u8] {
        &self.out[self.out_pos..]
    }

    /// How many reply bytes are not yet sent.
    pub fn pending_output(&self) -> usize {
        self.out.len() - self.out_pos
    }

    /// Marks `n` bytes of [`Self::output`] as sent.
    pub fn sent(&mut self, n: usize) {
        self.out_pos = (self.out_pos + n).min(self.out.len());
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
            if self.out.capacity() > IDLE_KEEP {
                self.out = Vec::new();
            }
        }
    }

    /// Set when the connection must close once its output is sent (with why).
    pub fn closing(&self) -> Option<&Refusal> {
        self.closing.as_ref()
    }

    /// True when the shell should read more: not closing, not blocked on a wake, and the
    /// output below its cap.
    pub fn wants_input(&self, cfg: &SessionConfig) -> bool {
        self.closing.is_none()
            && !self.cancel_after_wake
            && self.pending_output() < cfg.max_pending_output
    }

    /// The next instant at which [`Self::check_deadlines`] may fail.
    pub fn deadline(&self, cfg: &SessionConfig) -> Option<Instant> {
        let hs = (self.phase != Phase::Ready).then(|| self.opened + cfg.handshake_timeout);
        let msg = self.message_since.map(|t| t + cfg.message_timeout);
        match (hs, msg) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The handshake's and the whole-message deadline at `now`.
    pub fn check_deadlines(&self, cfg: &SessionConfig, now: Instant) -> Result<(), Refusal> {
        if self.phase != Phase::Ready && now >= self.opened + cfg.handshake_timeout {
            return Err(Refusal::HandshakeTimeout(cfg.handshake_timeout));
        }
        if let Some(t) = self.message_since {
            if now >= t + cfg.message_timeout {
                return Err(Refusal::MessageTimeout {
                    waited: now - t,
                    have: self.rbuf.len(),
                    need: self.need.max(self.rbuf.len() + 1),
                    limit: cfg.message_timeout,
                });
            }
        }
        Ok(())
    }

    /// The connection is going away: cancels its pending wait.
    pub fn abandon<S: StoreAccess>(&mut self, store: &mut S) {
        if let Some(id) = self.wait.take() {
            store.with(|st, _| st.cancel(id));
        }
    }
}

/// A [`StoreAccess`] over a plain value: one thread, wakes collected for the caller.
#[derive(Debug, Default)]
pub struct LocalStore {
    /// The state.
    pub state: StoreState,
    /// Wakes produced and not yet delivered.
    pub wakes: Vec<Wake>,
}

impl StoreAccess for LocalStore {
    fn with<R>(&mut self, f: impl FnOnce(&mut StoreState, &mut Vec<Wake>) -> R) -> R {
        f(&mut self.state, &mut self.wakes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{decode_reply, Reply, ReplyKind};

    /// Sessions over one store with a virtual clock; wakes are delivered by [`Sim::deliver`].
    struct Sim {
        cfg: SessionConfig,
        store: LocalStore,
        sessions: Vec<Session>,
        now: Instant,
    }

    impl Sim {
        fn new(cfg: SessionConfig) -> Self {
            Sim {
                cfg,
                store: LocalStore::default(),
                sessions: Vec::new(),
                now: Instant::now(),
            }
        }

        fn open(&mut self) -> usize {
            let i = self.sessions.len();
            self.sessions.push(Session::new(ConnId(i as u64), self.now));
            self.send(
                i,
                &[Request::Validate {
                    magic: VALIDATION_MAGIC,
                }],
            )
            .unwrap();
            i
        }

        fn send_bytes(&mut self, i: usize, b: &[u8]) -> Result<(), Refusal> {
            let s = &mut self.sessions[i];
            s.receive(b, self.now);
            s.process(&self.cfg, self.now, &mut self.store)
        }

        fn send(&mut self, i: usize, reqs: &[Request]) -> Result<(), Refusal> {
            let mut b = Vec::new();
            for r in reqs {
                r.encode(&mut b);
            }
            self.send_bytes(i, &b)
        }

        /// Delivers every pending wake; returns how many.
        fn deliver(&mut self) -> usize {
            let wakes = std::mem::take(&mut self.store.wakes);
            let n = wakes.len();
            for w in wakes {
                let s = &mut self.sessions[w.conn.0 as usize];
                assert!(s.on_wake(w.wait, &w.reply), "wake for a wait not pending");
                s.process(&self.cfg, self.now, &mut self.store).unwrap();
            }
            n
        }

        /// Takes session `i`'s output.
        fn out(&mut self, i: usize) -> Vec<u8> {
            let s = &mut self.sessions[i];
            let o = s.output().to_vec();
            s.sent(o.len());
            o
        }

        fn reply(&mut self, i: usize, kind: ReplyKind) -> Reply {
            let o = self.out(i);
            match decode_reply(kind, &o, &Limits::default()).unwrap() {
                Decoded::Complete(r, n) => {
                    assert_eq!(n, o.len(), "extra output {o:?}");
                    r
                }
                Decoded::NeedMore { .. } => panic!("incomplete reply {o:?}"),
            }
        }
    }

    fn k(s: &str) -> Vec<u8> {
        s.as_bytes().to_vec()
    }
    fn set(key: &str, v: &str) -> Request {
        Request::Set {
            key: k(key),
            value: k(v),
        }
    }
    fn wait(keys: &[&str]) -> Request {
        Request::Wait {
            keys: keys.iter().map(|s| k(s)).collect(),
        }
    }
    const STOP: Reply = Reply::Wait(WaitResponse::StopWaiting);
    const CANCELED: Reply = Reply::Wait(WaitResponse::WaitCanceled);

    #[test]
    fn every_command_answers_as_pytorch_does() {
        let mut s = Sim::new(SessionConfig::default());
        let a = s.open();
        s.send(a, &[set("k", "v1"), Request::Get { key: k("k") }])
            .unwrap();
        assert_eq!(s.reply(a, ReplyKind::Value), Reply::Value(k("v1")));
        s.send(a, &[Request::Get { key: k("none") }]).unwrap();
        assert_eq!(s.reply(a, ReplyKind::Value), Reply::Value(vec![]));
        for (d, want) in [(5, 5), (-7, -2)] {
            s.send(
                a,
                &[Request::Add {
                    key: k("n"),
                    delta: d,
                }],
            )
            .unwrap();
            assert_eq!(s.reply(a, ReplyKind::I64), Reply::I64(want));
        }
        s.send(a, &[Request::Get { key: k("n") }]).unwrap();
        assert_eq!(s.reply(a, ReplyKind::Value), Reply::Value(k("-2")));
        let cs = |e: &str, d: &str| Request::CompareSet {
            key: k("cs"),
            expected: k(e),
            desired: k(d),
        };
        for (req, want) in [
            (cs("", "x"), "x"),
            (cs("no", "y"), "x"),
            (cs("x", "y"), "y"),
        ] {
            s.send(a, &[req]).unwrap();
            assert_eq!(s.reply(a, ReplyKind::Value), Reply::Value(k(want)));
        }
        s.send(
            a,
            &[Request::CompareSet {
                key: k("none"),
                expected: k("e"),
                desired: k("d"),
            }],
        )
        .unwrap();
        assert_eq!(s.reply(a, ReplyKind::Value), Reply::Value(k("e")));
        s.send(
            a,
            &[Request::Check {
                keys: vec![k("k"), k("none")],
            }],
        )
        .unwrap();
        assert_eq!(
            s.reply(a, ReplyKind::Check),
            Reply::Check(CheckResponse::NotReady)
        );
        s.send(
            a,
            &[
                Request::Append {
                    key: k("ap"),
                    value: k("12"),
                },
                Request::Append {
                    key: k("ap"),
                    value: k("34"),
                },
                Request::MultiSet {
                    pairs: vec![(k("m1"), k("1")), (k("m2"), k(""))],
                },
                Request::MultiGet {
                    keys: vec![k("ap"), k("m1"), k("m2"), k("none")],
                },
            ],
        )
        .unwrap();
        assert_eq!(
            s.reply(a, ReplyKind::Values(4)),
            Reply::Values(vec![k("1234"), k("1"), vec![], vec![]])
        );
        s.send(
            a,
            &[
                Request::DeleteKey { key: k("m1") },
                Request::DeleteKey { key: k("m1") },
                Request::GetNumKeys,
            ],
        )
        .unwrap();
        let o = s.out(a);
        assert_eq!(o[..8], 1i64.to_le_bytes());
        assert_eq!(o[8..16], 0i64.to_le_bytes());
        assert_eq!(o[16..], 5i64.to_le_bytes()); // k n cs ap m2
        s.send(
            a,
            &[
                Request::QueuePush {
                    key: k("q"),
                    value: k("i1"),
                },
                Request::QueueLen { key: k("q") },
            ],
        )
        .unwrap();
        assert_eq!(s.reply(a, ReplyKind::I64), Reply::I64(1));
        for want in [Some(k("i1")), None] {
            s.send(a, &[Request::QueuePop { key: k("q") }]).unwrap();
            assert_eq!(s.reply(a, ReplyKind::QueuePop), Reply::QueuePop(want));
        }
        s.send(a, &[Request::Ping { nonce: 77 }]).unwrap();
        assert_eq!(s.reply(a, ReplyKind::U32), Reply::U32(77));
        s.send(a, &[Request::Hello { features: 0 }]).unwrap();
        assert_eq!(
            s.reply(a, ReplyKind::I64),
            Reply::I64(FEATURE_WAIT_GET as i64)
        );
        // ADD on text that is not a number, and past i64, drop the connection.
        let b = s.open();
        s.send(b, &[set("t", "abc")]).unwrap();
        let e = s
            .send(
                b,
                &[Request::Add {
                    key: k("t"),
                    delta: 1,
                }],
            )
            .unwrap_err();
        assert_eq!(e, Refusal::AddNotInteger("t".into()));
        let c = s.open();
        s.send(c, &[set("big", &i64::MAX.to_string())]).unwrap();
        let e = s
            .send(
                c,
                &[Request::Add {
                    key: k("big"),
                    delta: 1,
                }],
            )
            .unwrap_err();
        assert!(matches!(e, Refusal::AddOverflow(_)), "{e}");
    }

    #[test]
    fn a_wait_is_woken_by_the_last_of_its_keys_from_another_connection() {
        let mut s = Sim::new(SessionConfig::default());
        let (w, a) = (s.open(), s.open());
        s.send(a, &[set("x", "1")]).unwrap();
        s.send(w, &[wait(&["x", "y", "z", "y"])]).unwrap();
        assert!(s.out(w).is_empty());
        // Only the missing keys are registered (y and z, once each).
        assert_eq!(s.store.state.registrations(), 2);
        s.send(a, &[set("y", "1")]).unwrap();
        assert_eq!(s.deliver(), 0);
        assert!(s.out(w).is_empty());
        s.send(
            a,
            &[Request::Add {
                key: k("z"),
                delta: 1,
            }],
        )
        .unwrap();
        assert_eq!(s.reply(a, ReplyKind::I64), Reply::I64(1));
        assert_eq!(s.deliver(), 1);
        assert_eq!(s.reply(w, ReplyKind::Wait), STOP);
        assert_eq!(s.store.state.pending_waits(), 0);
        assert_eq!(s.store.state.registrations(), 0);
        // Keys that exist answer at once; so does a WAIT_GET, with the values.
        s.send(w, &[wait(&["x", "y"])]).unwrap();
        assert_eq!(s.reply(w, ReplyKind::Wait), STOP);
        s.send(
            w,
            &[Request::WaitGet {
                keys: vec![k("x"), k("q1")],
            }],
        )
        .unwrap();
        s.send(
            a,
            &[Request::QueuePush {
                key: k("q1"),
                value: k("item"),
            }],
        )
        .unwrap();
        s.deliver();
        let o = s.out(w);
        assert_eq!(o[0], WaitResponse::StopWaiting as u8);
        // A queue counts as present while it holds items; its value (as a key) is empty.
        assert_eq!(
            decode_reply(ReplyKind::Values(2), &o[1..], &Limits::default()).unwrap(),
            Decoded::Complete(Reply::Values(vec![k("1"), vec![]]), o.len() - 1)
        );
    }

    #[test]
    fn a_queue_push_wakes_one_waiter_at_a_time() {
        let mut s = Sim::new(SessionConfig::default());
        let (w1, w2, p) = (s.open(), s.open(), s.open());
        s.send(w1, &[wait(&["q"])]).unwrap();
        s.send(w2, &[wait(&["q"])]).unwrap();
        let push = Request::QueuePush {
            key: k("q"),
            value: k("i"),
        };
        s.send(p, std::slice::from_ref(&push)).unwrap();
        assert_eq!(s.deliver(), 1);
        assert_eq!(s.reply(w1, ReplyKind::Wait), STOP);
        assert!(s.out(w2).is_empty());
        s.send(p, &[push]).unwrap();
        assert_eq!(s.deliver(), 1);
        assert_eq!(s.reply(w2, ReplyKind::Wait), STOP);
    }

    #[test]
    fn cancel_answers_wait_canceled_and_unregisters() {
        let mut s = Sim::new(SessionConfig::default());
        let (w, a) = (s.open(), s.open());
        s.send(w, &[wait(&["never"]), Request::CancelWait]).unwrap();
        assert_eq!(s.reply(w, ReplyKind::Wait), CANCELED);
        assert_eq!(s.store.state.pending_waits(), 0);
        // The stale registration is skipped when the key arrives: nobody is woken.
        s.send(a, &[set("never", "1")]).unwrap();
        assert_eq!(s.deliver(), 0);
        assert_eq!(s.store.state.registrations(), 0);
        // CANCEL_WAIT with no wait pending still answers.
        s.send(w, &[Request::CancelWait]).unwrap();
        assert_eq!(s.reply(w, ReplyKind::Wait), CANCELED);
        // A second WAIT while one is pending is a protocol error.
        s.send(w, &[wait(&["n1"])]).unwrap();
        assert_eq!(
            s.send(w, &[wait(&["n2"])]).unwrap_err(),
            Refusal::SecondWait
        );
    }

    #[test]
    fn a_cancel_that_races_the_wake_answers_stop_waiting_then_wait_canceled() {
        let mut s = Sim::new(SessionConfig::default());
        let (w, a) = (s.open(), s.open());
        s.send(w, &[wait(&["k"])]).unwrap();
        // The key arrives; its wake is "in flight" (not yet delivered) when the cancel comes.
        s.send(a, &[set("k", "1")]).unwrap();
        s.send(w, &[Request::CancelWait, Request::Ping { nonce: 5 }])
            .unwrap();
        assert!(s.sessions[w].awaits_wake());
        assert!(
            s.out(w).is_empty(),
            "nothing may be answered before the wake"
        );
        s.deliver();
        let o = s.out(w);
        assert_eq!(
            o,
            [
                &[
                    WaitResponse::StopWaiting as u8,
                    WaitResponse::WaitCanceled as u8
                ][..],
                &5u32.to_le_bytes()[..]
            ]
            .concat()
        );
    }

    #[test]
    fn abandoned_waits_cost_o1_each_and_are_swept() {
        let mut s = Sim::new(SessionConfig::default());
        let a = s.open();
        // 5,000 connections wait on one key and go away.
        for _ in 0..5000 {
            let w = s.open();
            s.send(w, &[wait(&["shared", "other"])]).unwrap();
            let st = &mut s.store;
            s.sessions[w].abandon(st);
        }
        assert_eq!(s.store.state.pending_waits(), 0);
        // Swept once stale entries passed half of all: far fewer than 10,000 are left.
        assert!(
            s.store.state.registrations() < 2 * SWEEP_MIN + 4,
            "{}",
            s.store.state.registrations()
        );
        s.send(a, &[set("shared", "1")]).unwrap();
        assert_eq!(s.deliver(), 0);
    }

    #[test]
    fn the_handshake_comes_first_and_the_token_is_checked() {
        let cfg = SessionConfig {
            token: Some(k("secret")),
            ..Default::default()
        };
        let mut s = Sim::new(cfg);
        // Anything but VALIDATE first is refused at its first byte, before its body arrives.
        s.sessions.push(Session::new(ConnId(0), s.now));
        let mut b = vec![QueryType::Set as u8];
        b.extend_from_slice(&(1u64 << 20).to_le_bytes());
        assert_eq!(
            s.send_bytes(0, &b).unwrap_err(),
            Refusal::NotValidateFirst(1)
        );
        let a = s.open();
        // Before AUTH, nothing is served.
        assert_eq!(
            s.send(a, &[Request::Ping { nonce: 1 }]).unwrap_err(),
            Refusal::AuthRequired(QueryType::Ping as u8)
        );
        // A wrong token: answered 1, then the session closes.
        let b = s.open();
        s.send(
            b,
            &[
                Request::Auth { token: k("wrong") },
                Request::Ping { nonce: 1 },
            ],
        )
        .unwrap();
        assert_eq!(s.out(b), [1]);
        assert_eq!(s.sessions[b].closing(), Some(&Refusal::BadToken));
        // The right one: answered 0, then served.
        let c = s.open();
        s.send(
            c,
            &[
                Request::Auth { token: k("secret") },
                Request::Ping { nonce: 9 },
            ],
        )
        .unwrap();
        assert_eq!(s.out(c), [&[0u8][..], &9u32.to_le_bytes()].concat());
        // An AUTH claiming a value-sized token is refused by the handshake's limits.
        let d = s.open();
        let mut b = vec![QueryType::Auth as u8];
        b.extend_from_slice(&(1u64 << 20).to_le_bytes());
        assert!(matches!(
            s.send_bytes(d, &b).unwrap_err(),
            Refusal::Malformed(ProtoError::TooLong { .. })
        ));
        // Bad magic.
        s.sessions.push(Session::new(ConnId(9), s.now));
        let e = s
            .send(s.sessions.len() - 1, &[Request::Validate { magic: 0x1234 }])
            .unwrap_err();
        assert_eq!(e, Refusal::BadMagic(0x1234));
    }

    #[test]
    fn extensions_off_close_like_pytorch() {
        let mut s = Sim::new(SessionConfig {
            extensions: false,
            ..Default::default()
        });
        let a = s.open();
        assert_eq!(
            s.send(a, &[Request::Hello { features: 0 }]).unwrap_err(),
            Refusal::ExtensionOff(QueryType::Hello)
        );
    }

    #[test]
    fn deadlines_of_the_handshake_and_of_a_whole_message() {
        let cfg = SessionConfig {
            handshake_timeout: Duration::from_secs(2),
            message_timeout: Duration::from_secs(5),
            ..Default::default()
        };
        let t0 = Instant::now();
        let mut hs = Session::new(ConnId(0), t0);
        assert_eq!(hs.deadline(&cfg), Some(t0 + Duration::from_secs(2)));
        assert!(hs
            .check_deadlines(&cfg, t0 + Duration::from_secs(1))
            .is_ok());
        assert_eq!(
            hs.check_deadlines(&cfg, t0 + Duration::from_secs(2)),
            Err(Refusal::HandshakeTimeout(Duration::from_secs(2)))
        );
        let mut store = LocalStore::default();
        hs.receive(
            &Request::Validate {
                magic: VALIDATION_MAGIC,
            }
            .to_bytes(),
            t0,
        );
        hs.process(&cfg, t0, &mut store).unwrap();
        // Ready and idle: no deadline at all (idle connections and waiters are fine).
        assert_eq!(hs.deadline(&cfg), None);
        // A SET trickled byte by byte: the deadline runs from its first byte and does not move.
        let frame = set("k", &"v".repeat(100)).to_bytes();
        let mut now = t0 + Duration::from_secs(10);
        let first = now;
        for b in &frame[..frame.len() - 1] {
            hs.receive(&[*b], now);
            hs.process(&cfg, now, &mut store).unwrap();
            now += Duration::from_millis(50);
        }
        assert_eq!(hs.deadline(&cfg), Some(first + Duration::from_secs(5)));
        let e = hs.check_deadlines(&cfg, now).unwrap_err();
        assert!(
            matches!(e, Refusal::MessageTimeout { have, need, .. } if have == frame.len() - 1 && need == frame.len()),
            "{e}"
        );
        // Completing it clears the deadline; a new message starts its own.
        hs.receive(&frame[frame.len() - 1..], first + Duration::from_secs(4));
        hs.process(&cfg, first + Duration::from_secs(4), &mut store)
            .unwrap();
        assert_eq!(hs.deadline(&cfg), None);
        assert_eq!(store.state.num_keys(), 1);
        let later = first + Duration::from_secs(20);
        let two = [set("a", "1").to_bytes(), vec![QueryType::Get as u8]].concat();
        hs.receive(&two, later);
        hs.process(&cfg, later, &mut store).unwrap();
        assert_eq!(hs.deadline(&cfg), Some(later + Duration::from_secs(5)));
    }

    #[test]
    fn output_over_the_cap_stops_decoding_until_sent() {
        let cfg = SessionConfig {
            max_pending_output: 100,
            ..Default::default()
        };
        let mut s = Sim::new(cfg);
        let a = s.open();
        s.send(a, &[set("v", &"x".repeat(60))]).unwrap();
        let gets: Vec<Request> = (0..5).map(|_| Request::Get { key: k("v") }).collect();
        s.send(a, &gets).unwrap();
        // Two replies of 68 bytes pass the cap of 100; the other three wait in the buffer.
        assert_eq!(s.sessions[a].pending_output(), 136);
        assert!(!s.sessions[a].wants_input(&s.cfg));
        let o = s.out(a);
        assert_eq!(o.len(), 136);
        s.sessions[a].process(&s.cfg, s.now, &mut s.store).unwrap();
        assert_eq!(s.out(a).len(), 136);
        s.sessions[a].process(&s.cfg, s.now, &mut s.store).unwrap();
        assert_eq!(s.out(a).len(), 68);
        assert_eq!(s.sessions[a].buffered(), 0);
    }

    /// Random request streams (valid requests on a few keys, cut at random points, now and then
    /// noise) over five sessions: no panic, the store's pending waits are exactly the sessions'
    /// pending waits after every step, every wake is for a pending wait, and nothing is left
    /// once every session is abandoned. The fuzz target `sessions` does the same on raw bytes.
    #[test]
    fn random_streams_keep_the_wait_books_balanced() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let key = |rng: &mut rand::rngs::SmallRng| k(["a", "b", "c", "d"][rng.gen_range(0..4)]);
        for round in 0..200 {
            let mut s = Sim::new(SessionConfig {
                max_pending_output: 256,
                ..Default::default()
            });
            let n = 5;
            for _ in 0..n {
                s.open();
            }
            let mut alive = vec![true; n];
            for _ in 0..60 {
                let i = rng.gen_range(0..n);
                if !alive[i] {
                    continue;
                }
                let req = match rng.gen_range(0..9) {
                    0 | 1 => Request::Set {
                        key: key(&mut rng),
                        value: vec![1; rng.gen_range(0..40)],
                    },
                    2 => Request::Wait {
                        keys: (0..rng.gen_range(1..4)).map(|_| key(&mut rng)).collect(),
                    },
                    3 => Request::WaitGet {
                        keys: (0..rng.gen_range(1..3)).map(|_| key(&mut rng)).collect(),
                    },
                    4 => Request::CancelWait,
                    5 => Request::DeleteKey { key: key(&mut rng) },
                    6 => Request::QueuePush {
                        key: key(&mut rng),
                        value: vec![2],
                    },
                    7 => Request::Add {
                        key: k("counter"),
                        delta: 1,
                    },
                    _ => Request::Get { key: key(&mut rng) },
                };
                let mut b = req.to_bytes();
                if rng.gen_bool(0.02) {
                    b = (0..rng.gen_range(1..20)).map(|_| rng.gen()).collect();
                }
                // Cut the frame in two deliveries.
                let cut = rng.gen_range(0..=b.len());
                let r = s
                    .send_bytes(i, &b[..cut])
                    .and_then(|()| s.send_bytes(i, &b[cut..]));
                // The peer reads what it is sent (so the output cap does not stop it for good).
                s.out(i);
                if r.is_err() || rng.gen_bool(0.03) {
                    let st = &mut s.store;
                    s.sessions[i].abandon(st);
                    alive[i] = false;
                }
                let wakes = std::mem::take(&mut s.store.wakes);
                for w in wakes {
                    let j = w.conn.0 as usize;
                    if alive[j] {
                        assert!(s.sessions[j].on_wake(w.wait, &w.reply), "round {round}");
                        let _ = s.sessions[j].process(&s.cfg, s.now, &mut s.store);
                    }
                }
                let waiting = (0..n)
                    .filter(|j| alive[*j] && s.sessions[*j].pending_wait().is_some())
                    .count();
                assert_eq!(s.store.state.pending_waits(), waiting, "round {round}");
            }
            for i in 0..n {
                let st = &mut s.store;
                s.sessions[i].abandon(st);
            }
            assert_eq!(s.store.state.pending_waits(), 0);
        }
    }

    #[test]
    fn parse_i64_accepts_what_add_writes() {
        assert_eq!(parse_i64(b"42"), Some(42));
        assert_eq!(parse_i64(b" -7"), Some(-7));
        assert_eq!(parse_i64(b""), None);
        assert_eq!(parse_i64(b"x1"), None);
    }
}
