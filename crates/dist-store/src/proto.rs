//! The sans-IO codec of PyTorch's `TCPStore` wire protocol (libuv era, PyTorch ≥ 2.4).
//!
//! Nothing here touches a socket: [`decode_request`] looks at a byte buffer that may hold a
//! partial frame and answers [`Decoded::NeedMore`] (with the least total length worth waiting
//! for), a complete [`Request`] and its length, or a [`ProtoError`]. [`decode_reply`] does the
//! same for the client side, given the [`ReplyKind`] the request expects. Every length read
//! from the wire is checked against [`Limits`] *before* anything is allocated, and nothing is
//! allocated until the whole frame has arrived, so a hostile peer can make us hold at most the
//! bytes it actually sent (itself capped by [`Limits::max_request_bytes`]).
//!
//! Frame layout (all integers little-endian, as PyTorch writes them on x86-64 and aarch64):
//! one query byte, then the fields of that query; a *key* or *value* is a `u64` length followed
//! by that many bytes; a *key list* is a `u64` count followed by that many keys. The full
//! description, with every reply, is in `docs/STORE_PROTOCOL.md` at the workspace root.

use std::fmt;

/// The magic number a client sends in its first request (`VALIDATE`).
pub const VALIDATION_MAGIC: u32 = 0x3C85_F7CE;

/// PyTorch's limits (libuv backend): the floor of ours.
pub const TORCH_MAX_KEY_LEN: usize = 8 * 1024;
/// PyTorch's value limit (`MAX_PAYLOAD_LEN`).
pub const TORCH_MAX_VALUE_LEN: usize = 8 * 1024 * 1024;
/// PyTorch's limit on keys per request (`MAX_KEY_COUNT`).
pub const TORCH_MAX_KEYS: usize = 128 * 1024;

/// The query byte that opens every request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum QueryType {
    /// `u32` magic; no reply.
    Validate = 0,
    /// key, value; no reply.
    Set = 1,
    /// key, expected, desired; reply: value.
    CompareSet = 2,
    /// key; reply: value (empty when missing).
    Get = 3,
    /// key, `i64`; reply: `i64`.
    Add = 4,
    /// key list; reply: one [`CheckResponse`] byte.
    Check = 5,
    /// key list; reply: one [`WaitResponse`] byte once every key exists.
    Wait = 6,
    /// nothing; reply: `i64`.
    GetNumKeys = 7,
    /// key; reply: `i64` (keys deleted, 0 or 1).
    DeleteKey = 8,
    /// key, value; no reply.
    Append = 9,
    /// key list; reply: one value per key.
    MultiGet = 10,
    /// `u64` count, then (key, value) pairs; no reply.
    MultiSet = 11,
    /// nothing; reply: `WAIT_CANCELED`.
    CancelWait = 12,
    /// `u32` nonce; reply: the same `u32`.
    Ping = 13,
    /// key, value; no reply.
    QueuePush = 14,
    /// key; reply: `i64` length before the pop, then a value when it was > 0.
    QueuePop = 15,
    /// key; reply: `i64`.
    QueueLen = 16,
    /// Our extension (not PyTorch's): token bytes; reply: one byte, 0 = accepted.
    Auth = 0xA0,
    /// Our extension: key list; reply: `STOP_WAITING` then one value per key, once every
    /// key exists (a `WAIT` and a `MULTI_GET` in one round trip). Cancelled by `CANCEL_WAIT`.
    WaitGet = 0xA1,
    /// Our extension: `u32` client features; reply: `u64` server features
    /// ([`FEATURE_WAIT_GET`]). PyTorch's servers close the connection instead.
    Hello = 0xA2,
}

/// Server feature bit: `WAIT_GET` is supported.
pub const FEATURE_WAIT_GET: u64 = 1;

impl QueryType {
    /// The query type of a byte, if it is one.
    pub fn from_u8(b: u8) -> Option<Self> {
        use QueryType::*;
        Some(match b {
            0 => Validate,
            1 => Set,
            2 => CompareSet,
            3 => Get,
            4 => Add,
            5 => Check,
            6 => Wait,
            7 => GetNumKeys,
            8 => DeleteKey,
            9 => Append,
            10 => MultiGet,
            11 => MultiSet,
            12 => CancelWait,
            13 => Ping,
            14 => QueuePush,
            15 => QueuePop,
            16 => QueueLen,
            0xA0 => Auth,
            0xA1 => WaitGet,
            0xA2 => Hello,
            _ => return None,
        })
    }
}

/// The byte `CHECK` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CheckResponse {
    /// Every key exists.
    Ready = 0,
    /// At least one key is missing.
    NotReady = 1,
}

/// The bytes `WAIT` and `CANCEL_WAIT` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum WaitResponse {
    /// Every awaited key now exists.
    StopWaiting = 0,
    /// The wait was cancelled (answer to `CANCEL_WAIT`).
    WaitCanceled = 1,
}

/// Caps checked before allocation. Defaults are at least PyTorch's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest key (and auth token) in bytes.
    pub max_key_len: usize,
    /// Longest value in bytes.
    pub max_value_len: usize,
    /// Most keys in one `CHECK`/`WAIT`/`MULTI_GET`/`MULTI_SET`.
    pub max_keys: usize,
    /// Longest whole request (or multi-value reply) in bytes.
    pub max_request_bytes: usize,
}

impl Default for Limits {
    /// Key 8 KiB and 128 Ki keys per request (PyTorch's), values 64 MiB (PyTorch: 8 MiB;
    /// ours matches the host group's object cap), whole requests 256 MiB.
    fn default() -> Self {
        Limits {
            max_key_len: TORCH_MAX_KEY_LEN,
            max_value_len: 64 << 20,
            max_keys: TORCH_MAX_KEYS,
            max_request_bytes: 256 << 20,
        }
    }
}

impl Limits {
    /// PyTorch's own limits exactly.
    pub fn torch() -> Self {
        Limits {
            max_key_len: TORCH_MAX_KEY_LEN,
            max_value_len: TORCH_MAX_VALUE_LEN,
            max_keys: TORCH_MAX_KEYS,
            max_request_bytes: 256 << 20,
        }
    }

    /// Raises every limit below PyTorch's to PyTorch's (so a client written for PyTorch's store never meets a lower one).
    pub fn at_least_torch(mut self) -> Self {
        self.max_key_len = self.max_key_len.max(TORCH_MAX_KEY_LEN);
        self.max_value_len = self.max_value_len.max(TORCH_MAX_VALUE_LEN);
        self.max_keys = self.max_keys.max(TORCH_MAX_KEYS);
        self.max_request_bytes = self.max_request_bytes.max(TORCH_MAX_VALUE_LEN + (1 << 20));
        self
    }
}

/// A request, decoded (keys and values owned).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `VALIDATE magic`.
    Validate {
        /// Should be [`VALIDATION_MAGIC`].
        magic: u32,
    },
    /// `SET key value`.
    Set {
        /// Key.
        key: Vec<u8>,
        /// Value.
        value: Vec<u8>,
    },
    /// `COMPARE_SET key expected desired`.
    CompareSet {
        /// Key.
        key: Vec<u8>,
        /// Value expected (empty: expect the key missing).
        expected: Vec<u8>,
        /// Value to store.
        desired: Vec<u8>,
    },
    /// `GET key`.
    Get {
        /// Key.
        key: Vec<u8>,
    },
    /// `ADD key delta`.
    Add {
        /// Key.
        key: Vec<u8>,
        /// Amount added.
        delta: i64,
    },
    /// `CHECK keys`.
    Check {
        /// Keys.
        keys: Vec<Vec<u8>>,
    },
    /// `WAIT keys`.
    Wait {
        /// Keys.
        keys: Vec<Vec<u8>>,
    },
    /// `GETNUMKEYS`.
    GetNumKeys,
    /// `DELETE_KEY key`.
    DeleteKey {
        /// Key.
        key: Vec<u8>,
    },
    /// `APPEND key value`.
    Append {
        /// Key.
        key: Vec<u8>,
        /// Bytes appended.
        value: Vec<u8>,
    },
    /// `MULTI_GET keys`.
    MultiGet {
        /// Keys.
        keys: Vec<Vec<u8>>,
    },
    /// `MULTI_SET pairs`.
    MultiSet {
        /// (key, value) pairs.
        pairs: Vec<(Vec<u8>, Vec<u8>)>,
    },
    /// `CANCEL_WAIT`.
    CancelWait,
    /// `PING nonce`.
    Ping {
        /// Echoed back.
        nonce: u32,
    },
    /// `QUEUE_PUSH key value`.
    QueuePush {
        /// Queue name.
        key: Vec<u8>,
        /// Item.
        value: Vec<u8>,
    },
    /// `QUEUE_POP key`.
    QueuePop {
        /// Queue name.
        key: Vec<u8>,
    },
    /// `QUEUE_LEN key`.
    QueueLen {
        /// Queue name.
        key: Vec<u8>,
    },
    /// `AUTH token` (our extension).
    Auth {
        /// The shared secret.
        token: Vec<u8>,
    },
    /// `WAIT_GET keys` (our extension).
    WaitGet {
        /// Keys.
        keys: Vec<Vec<u8>>,
    },
    /// `HELLO features` (our extension).
    Hello {
        /// Client feature bits (none defined yet).
        features: u32,
    },
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtoError {
    /// The query byte is not one we know.
    UnknownQuery(u8),
    /// A length field exceeds its limit.
    TooLong {
        /// Which field (`"key"`, `"value"`, `"key count"`, `"request"`).
        what: &'static str,
        /// The length claimed on the wire.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// A reply byte that is not one of the allowed answers.
    BadReply {
        /// What was expected.
        expected: &'static str,
        /// The byte received.
        got: u8,
    },
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtoError::UnknownQuery(b) => write!(f, "unknown query type {b}"),
            ProtoError::TooLong { what, len, max } => {
                write!(f, "{what} length {len} exceeds the limit of {max}")
            }
            ProtoError::BadReply { expected, got } => {
                write!(f, "expected {expected}, got byte {got}")
            }
        }
    }
}

impl std::error::Error for ProtoError {}

/// Outcome of decoding a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<T> {
    /// The frame is incomplete: do not try again before the buffer holds `min_len` bytes.
    NeedMore {
        /// Least total buffer length at which decoding can make progress.
        min_len: usize,
    },
    /// A complete item and the number of bytes it took.
    Complete(T, usize),
}

#[derive(Clone, Copy)]
enum Field {
    Key,
    Value,
    U32,
    I64,
}

enum Shape {
    Fields(&'static [Field]),
    KeyList,
    PairList,
}

fn shape(q: QueryType) -> Shape {
    use Field::*;
    use QueryType as Q;
    match q {
        Q::Validate | Q::Ping | Q::Hello => Shape::Fields(&[U32]),
        Q::Set | Q::Append | Q::QueuePush => Shape::Fields(&[Key, Value]),
        Q::CompareSet => Shape::Fields(&[Key, Value, Value]),
        Q::Get | Q::DeleteKey | Q::QueuePop | Q::QueueLen | Q::Auth => Shape::Fields(&[Key]),
        Q::Add => Shape::Fields(&[Key, I64]),
        Q::Check | Q::Wait | Q::MultiGet | Q::WaitGet => Shape::KeyList,
        Q::MultiSet => Shape::PairList,
        Q::GetNumKeys | Q::CancelWait => Shape::Fields(&[]),
    }
}

/// Walks a frame without allocating: `Ok(Ok(len))` complete, `Ok(Err(min))` need more.
struct Scan<'a> {
    buf: &'a [u8],
    pos: usize,
    limits: &'a Limits,
}

type Step = Result<Result<(), usize>, ProtoError>;

impl Scan<'_> {
    fn fixed(&mut self, n: usize) -> Result<(), usize> {
        if self.buf.len() < self.pos + n {
            Err(self.pos + n)
        } else {
            self.pos += n;
            Ok(())
        }
    }
    fn u64(&mut self) -> Result<u64, usize> {
        let end = self.pos + 8;
        let b = self.buf.get(self.pos..end).ok_or(end)?;
        self.pos = end;
        Ok(u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    }
    fn check_total(&self, end: u64) -> Result<(), ProtoError> {
        if end > self.limits.max_request_bytes as u64 {
            return Err(ProtoError::TooLong {
                what: "request",
                len: end,
                max: self.limits.max_request_bytes,
            });
        }
        Ok(())
    }
    fn blob(&mut self, what: &'static str, max: usize) -> Step {
        let len = match self.u64() {
            Ok(l) => l,
            Err(n) => return Ok(Err(n)),
        };
        if len > max as u64 {
            return Err(ProtoError::TooLong { what, len, max });
        }
        self.check_total(self.pos as u64 + len)?;
        Ok(self.fixed(len as usize))
    }
    fn field(&mut self, f: Field) -> Step {
        match f {
            Field::Key => self.blob("key", self.limits.max_key_len),
            Field::Value => self.blob("value", self.limits.max_value_len),
            Field::U32 => Ok(self.fixed(4)),
            Field::I64 => Ok(self.fixed(8)),
        }
    }
    fn count(&mut self) -> Result<Result<usize, usize>, ProtoError> {
        let n = match self.u64() {
            Ok(n) => n,
            Err(m) => return Ok(Err(m)),
        };
        if n > self.limits.max_keys as u64 {
            return Err(ProtoError::TooLong {
                what: "key count",
                len: n,
                max: self.limits.max_keys,
            });
        }
        Ok(Ok(n as usize))
    }
}

macro_rules! step {
    ($e:expr) => {
        match $e? {
            Ok(v) => v,
            Err(min) => return Ok(Decoded::NeedMore { min_len: min }),
        }
    };
}

/// Finds the length of the request at the start of `buf` without allocating.
pub fn request_len(buf: &[u8], limits: &Limits) -> Result<Decoded<()>, ProtoError> {
    let Some(&q) = buf.first() else {
        return Ok(Decoded::NeedMore { min_len: 1 });
    };
    let q = QueryType::from_u8(q).ok_or(ProtoError::UnknownQuery(q))?;
    let mut s = Scan {
        buf,
        pos: 1,
        limits,
    };
    match shape(q) {
        Shape::Fields(fs) => {
            for f in fs {
                step!(s.field(*f));
            }
        }
        Shape::KeyList => {
            let n = step!(s.count());
            for _ in 0..n {
                step!(s.field(Field::Key));
            }
        }
        Shape::PairList => {
            let n = step!(s.count());
            for _ in 0..n {
                step!(s.field(Field::Key));
                step!(s.field(Field::Value));
            }
        }
    }
    Ok(Decoded::Complete((), s.pos))
}

/// Reads fields of a frame already known to be complete.
struct Take<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Take<'_> {
    fn bytes(&mut self, n: usize) -> &[u8] {
        let end = (self.pos + n).min(self.buf.len());
        let s = &self.buf[self.pos.min(end)..end];
        self.pos = end;
        s
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes(8).try_into().unwrap_or([0; 8]))
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes(4).try_into().unwrap_or([0; 4]))
    }
    fn blob(&mut self) -> Vec<u8> {
        let n = self.u64() as usize;
        self.bytes(n).to_vec()
    }
    fn keys(&mut self) -> Vec<Vec<u8>> {
        let n = self.u64() as usize;
        (0..n).map(|_| self.blob()).collect()
    }
}

/// Decodes the request at the start of `buf`.
pub fn decode_request(buf: &[u8], limits: &Limits) -> Result<Decoded<Request>, ProtoError> {
    let len = match request_len(buf, limits)? {
        Decoded::NeedMore { min_len } => return Ok(Decoded::NeedMore { min_len }),
        Decoded::Complete((), len) => len,
    };
    let frame = &buf[..len];
    let q = QueryType::from_u8(frame[0]).ok_or(ProtoError::UnknownQuery(frame[0]))?;
    let mut t = Take { buf: frame, pos: 1 };
    use QueryType as Q;
    let r = match q {
        Q::Validate => Request::Validate { magic: t.u32() },
        Q::Ping => Request::Ping { nonce: t.u32() },
        Q::Hello => Request::Hello { features: t.u32() },
        Q::WaitGet => Request::WaitGet { keys: t.keys() },
        Q::Set => Request::Set {
            key: t.blob(),
            value: t.blob(),
        },
        Q::Append => Request::Append {
            key: t.blob(),
            value: t.blob(),
        },
        Q::QueuePush => Request::QueuePush {
            key: t.blob(),
            value: t.blob(),
        },
        Q::CompareSet => Request::CompareSet {
            key: t.blob(),
            expected: t.blob(),
            desired: t.blob(),
        },
        Q::Get => Request::Get { key: t.blob() },
        Q::DeleteKey => Request::DeleteKey { key: t.blob() },
        Q::QueuePop => Request::QueuePop { key: t.blob() },
        Q::QueueLen => Request::QueueLen { key: t.blob() },
        Q::Auth => Request::Auth { token: t.blob() },
        Q::Add => Request::Add {
            key: t.blob(),
            delta: t.u64() as i64,
        },
        Q::Check => Request::Check { keys: t.keys() },
        Q::Wait => Request::Wait { keys: t.keys() },
        Q::MultiGet => Request::MultiGet { keys: t.keys() },
        Q::MultiSet => {
            let n = t.u64() as usize;
            Request::MultiSet {
                pairs: (0..n).map(|_| (t.blob(), t.blob())).collect(),
            }
        }
        Q::GetNumKeys => Request::GetNumKeys,
        Q::CancelWait => Request::CancelWait,
    };
    Ok(Decoded::Complete(r, len))
}

/// Appends a `u64` length and the bytes (PyTorch's string/vector encoding).
pub fn put_blob(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u64).to_le_bytes());
    out.extend_from_slice(b);
}

/// Appends a little-endian `i64`.
pub fn put_i64(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_keys<K: AsRef<[u8]>>(out: &mut Vec<u8>, keys: &[K]) {
    out.extend_from_slice(&(keys.len() as u64).to_le_bytes());
    for k in keys {
        put_blob(out, k.as_ref());
    }
}

impl Request {
    /// The query type of this request.
    pub fn query_type(&self) -> QueryType {
        use QueryType as Q;
        match self {
            Request::Validate { .. } => Q::Validate,
            Request::Set { .. } => Q::Set,
            Request::CompareSet { .. } => Q::CompareSet,
            Request::Get { .. } => Q::Get,
            Request::Add { .. } => Q::Add,
            Request::Check { .. } => Q::Check,
            Request::Wait { .. } => Q::Wait,
            Request::GetNumKeys => Q::GetNumKeys,
            Request::DeleteKey { .. } => Q::DeleteKey,
            Request::Append { .. } => Q::Append,
            Request::MultiGet { .. } => Q::MultiGet,
            Request::MultiSet { .. } => Q::MultiSet,
            Request::CancelWait => Q::CancelWait,
            Request::Ping { .. } => Q::Ping,
            Request::QueuePush { .. } => Q::QueuePush,
            Request::QueuePop { .. } => Q::QueuePop,
            Request::QueueLen { .. } => Q::QueueLen,
            Request::Auth { .. } => Q::Auth,
            Request::WaitGet { .. } => Q::WaitGet,
            Request::Hello { .. } => Q::Hello,
        }
    }

    /// What the server answers to this request.
    pub fn reply_kind(&self) -> ReplyKind {
        match self {
            Request::Validate { .. }
            | Request::Set { .. }
            | Request::Append { .. }
            | Request::MultiSet { .. }
            | Request::QueuePush { .. } => ReplyKind::None,
            Request::CompareSet { .. } | Request::Get { .. } => ReplyKind::Value,
            Request::Add { .. }
            | Request::GetNumKeys
            | Request::DeleteKey { .. }
            | Request::QueueLen { .. } => ReplyKind::I64,
            Request::Check { .. } => ReplyKind::Check,
            // WAIT_GET: this byte, then `Values(n)` when it is STOP_WAITING.
            Request::Wait { .. } | Request::CancelWait | Request::WaitGet { .. } => ReplyKind::Wait,
            Request::Hello { .. } => ReplyKind::I64,
            Request::MultiGet { keys } => ReplyKind::Values(keys.len()),
            Request::Ping { .. } => ReplyKind::U32,
            Request::QueuePop { .. } => ReplyKind::QueuePop,
            Request::Auth { .. } => ReplyKind::Auth,
        }
    }

    /// Appends this request's bytes to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.query_type() as u8);
        match self {
            Request::Validate { magic } => out.extend_from_slice(&magic.to_le_bytes()),
            Request::Ping { nonce } => out.extend_from_slice(&nonce.to_le_bytes()),
            Request::Hello { features } => out.extend_from_slice(&features.to_le_bytes()),
            Request::Set { key, value }
            | Request::Append { key, value }
            | Request::QueuePush { key, value } => {
                put_blob(out, key);
                put_blob(out, value);
            }
            Request::CompareSet {
                key,
                expected,
                desired,
            } => {
                put_blob(out, key);
                put_blob(out, expected);
                put_blob(out, desired);
            }
            Request::Get { key }
            | Request::DeleteKey { key }
            | Request::QueuePop { key }
            | Request::QueueLen { key } => put_blob(out, key),
            Request::Auth { token } => put_blob(out, token),
            Request::Add { key, delta } => {
                put_blob(out, key);
                put_i64(out, *delta);
            }
            Request::Check { keys }
            | Request::Wait { keys }
            | Request::MultiGet { keys }
            | Request::WaitGet { keys } => put_keys(out, keys),
            Request::MultiSet { pairs } => {
                out.extend_from_slice(&(pairs.len() as u64).to_le_bytes());
                for (k, v) in pairs {
                    put_blob(out, k);
                    put_blob(out, v);
                }
            }
            Request::GetNumKeys | Request::CancelWait => {}
        }
    }

    /// This request's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }
}

/// The shape of the reply a request gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    /// No reply.
    None,
    /// One value (`u64` length + bytes).
    Value,
    /// `n` values.
    Values(usize),
    /// One `i64`.
    I64,
    /// One `u32`.
    U32,
    /// One [`CheckResponse`] byte.
    Check,
    /// One [`WaitResponse`] byte.
    Wait,
    /// `i64` length, then a value when it is > 0.
    QueuePop,
    /// One byte, 0 = accepted.
    Auth,
}

/// A decoded reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Nothing (for [`ReplyKind::None`]).
    None,
    /// One value.
    Value(Vec<u8>),
    /// Several values.
    Values(Vec<Vec<u8>>),
    /// An `i64`.
    I64(i64),
    /// A `u32`.
    U32(u32),
    /// A `CHECK` answer.
    Check(CheckResponse),
    /// A `WAIT`/`CANCEL_WAIT` answer.
    Wait(WaitResponse),
    /// A `QUEUE_POP` answer: the item, or `None` when the queue was empty.
    QueuePop(Option<Vec<u8>>),
    /// An `AUTH` answer: accepted or not.
    Auth(bool),
}

/// Decodes a reply of `kind` at the start of `buf`; lengths are checked against `limits`.
pub fn decode_reply(
    kind: ReplyKind,
    buf: &[u8],
    limits: &Limits,
) -> Result<Decoded<Reply>, ProtoError> {
    let mut s = Scan {
        buf,
        pos: 0,
        limits,
    };
    let byte = |buf: &[u8]| buf.first().copied();
    match kind {
        ReplyKind::None => return Ok(Decoded::Complete(Reply::None, 0)),
        ReplyKind::Value => step!(s.field(Field::Value)),
        ReplyKind::Values(n) => {
            for _ in 0..n {
                step!(s.field(Field::Value));
            }
        }
        ReplyKind::I64 => step!(s.field(Field::I64)),
        ReplyKind::U32 => step!(s.field(Field::U32)),
        ReplyKind::QueuePop => {
            let n = match s.u64() {
                Ok(n) => n as i64,
                Err(m) => return Ok(Decoded::NeedMore { min_len: m }),
            };
            if n > 0 {
                step!(s.field(Field::Value));
            }
        }
        ReplyKind::Check | ReplyKind::Wait | ReplyKind::Auth => {
            let Some(b) = byte(buf) else {
                return Ok(Decoded::NeedMore { min_len: 1 });
            };
            let r = match (kind, b) {
                (ReplyKind::Check, 0) => Reply::Check(CheckResponse::Ready),
                (ReplyKind::Check, 1) => Reply::Check(CheckResponse::NotReady),
                (ReplyKind::Wait, 0) => Reply::Wait(WaitResponse::StopWaiting),
                (ReplyKind::Wait, 1) => Reply::Wait(WaitResponse::WaitCanceled),
                (ReplyKind::Auth, b) => Reply::Auth(b == 0),
                (ReplyKind::Check, got) => {
                    return Err(ProtoError::BadReply {
                        expected: "READY (0) or NOT_READY (1)",
                        got,
                    })
                }
                (_, got) => {
                    return Err(ProtoError::BadReply {
                        expected: "STOP_WAITING (0) or WAIT_CANCELED (1)",
                        got,
                    })
                }
            };
            return Ok(Decoded::Complete(r, 1));
        }
    }
    let len = s.pos;
    let mut t = Take {
        buf: &buf[..len],
        pos: 0,
    };
    let r = match kind {
        ReplyKind::Value => Reply::Value(t.blob()),
        ReplyKind::Values(n) => Reply::Values((0..n).map(|_| t.blob()).collect()),
        ReplyKind::I64 => Reply::I64(t.u64() as i64),
        ReplyKind::U32 => Reply::U32(t.u32()),
        ReplyKind::QueuePop => {
            let n = t.u64() as i64;
            Reply::QueuePop((n > 0).then(|| t.blob()))
        }
        _ => Reply::None,
    };
    Ok(Decoded::Complete(r, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn all_requests() -> Vec<Request> {
        let k = |s: &str| s.as_bytes().to_vec();
        vec![
            Request::Validate {
                magic: VALIDATION_MAGIC,
            },
            Request::Set {
                key: k("a"),
                value: k("xyz"),
            },
            Request::CompareSet {
                key: k("a"),
                expected: vec![],
                desired: k("1"),
            },
            Request::Get { key: k("a") },
            Request::Add {
                key: k("n"),
                delta: -5,
            },
            Request::Check {
                keys: vec![k("a"), k("b")],
            },
            Request::Wait { keys: vec![k("a")] },
            Request::GetNumKeys,
            Request::DeleteKey { key: k("a") },
            Request::Append {
                key: k("a"),
                value: k("!"),
            },
            Request::MultiGet {
                keys: vec![k("a"), k(""), k("c")],
            },
            Request::MultiSet {
                pairs: vec![(k("a"), k("1")), (k("b"), vec![])],
            },
            Request::CancelWait,
            Request::Ping { nonce: 77 },
            Request::QueuePush {
                key: k("q"),
                value: k("item"),
            },
            Request::QueuePop { key: k("q") },
            Request::QueueLen { key: k("q") },
            Request::Auth { token: k("secret") },
            Request::WaitGet {
                keys: vec![k("a"), k("b")],
            },
            Request::Hello { features: 0 },
        ]
    }

    #[test]
    fn every_request_roundtrips_and_every_prefix_needs_more() {
        let lim = Limits::default();
        for r in all_requests() {
            let bytes = r.to_bytes();
            assert_eq!(
                decode_request(&bytes, &lim).unwrap(),
                Decoded::Complete(r.clone(), bytes.len())
            );
            for cut in 0..bytes.len() {
                match decode_request(&bytes[..cut], &lim).unwrap() {
                    Decoded::NeedMore { min_len } => {
                        assert!(min_len > cut && min_len <= bytes.len(), "{r:?} cut {cut}")
                    }
                    d => panic!("{r:?} cut at {cut} decoded as {d:?}"),
                }
            }
            // Followed by another frame: only the first is consumed.
            let mut two = bytes.clone();
            two.extend_from_slice(&bytes);
            assert_eq!(
                decode_request(&two, &lim).unwrap(),
                Decoded::Complete(r.clone(), bytes.len())
            );
        }
    }

    #[test]
    fn lengths_over_limits_are_errors_before_data_arrives() {
        let lim = Limits::torch();
        // SET with a key length of 8 KiB + 1 and no key bytes: refused at once.
        let mut b = vec![QueryType::Set as u8];
        b.extend_from_slice(&((8 * 1024 + 1) as u64).to_le_bytes());
        assert!(matches!(
            decode_request(&b, &lim),
            Err(ProtoError::TooLong { what: "key", .. })
        ));
        // Value of u64::MAX.
        let mut b = vec![QueryType::Set as u8];
        put_blob(&mut b, b"k");
        b.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode_request(&b, &lim),
            Err(ProtoError::TooLong { what: "value", .. })
        ));
        // Key count over 128 Ki.
        let mut b = vec![QueryType::Wait as u8];
        b.extend_from_slice(&((128 * 1024 + 1) as u64).to_le_bytes());
        assert!(matches!(
            decode_request(&b, &lim),
            Err(ProtoError::TooLong {
                what: "key count",
                ..
            })
        ));
        // A whole request over the request cap.
        let small = Limits {
            max_request_bytes: 100,
            ..lim
        };
        let r = Request::Set {
            key: b"k".to_vec(),
            value: vec![0; 200],
        };
        assert!(matches!(
            decode_request(&r.to_bytes()[..20], &small),
            Err(ProtoError::TooLong {
                what: "request",
                ..
            })
        ));
        assert_eq!(
            decode_request(&[0x55], &lim),
            Err(ProtoError::UnknownQuery(0x55))
        );
        // Exactly at the limits is fine.
        let r = Request::Get {
            key: vec![b'x'; 8 * 1024],
        };
        assert!(matches!(
            decode_request(&r.to_bytes(), &lim),
            Ok(Decoded::Complete(..))
        ));
    }

    #[test]
    fn replies_decode_and_need_more() {
        let lim = Limits::default();
        let mut v = Vec::new();
        put_blob(&mut v, b"hello");
        assert_eq!(
            decode_reply(ReplyKind::Value, &v, &lim).unwrap(),
            Decoded::Complete(Reply::Value(b"hello".to_vec()), 13)
        );
        assert_eq!(
            decode_reply(ReplyKind::Value, &v[..9], &lim).unwrap(),
            Decoded::NeedMore { min_len: 13 }
        );
        let mut q = Vec::new();
        put_i64(&mut q, 0);
        assert_eq!(
            decode_reply(ReplyKind::QueuePop, &q, &lim).unwrap(),
            Decoded::Complete(Reply::QueuePop(None), 8)
        );
        let mut q = Vec::new();
        put_i64(&mut q, 3);
        put_blob(&mut q, b"x");
        assert_eq!(
            decode_reply(ReplyKind::QueuePop, &q, &lim).unwrap(),
            Decoded::Complete(Reply::QueuePop(Some(b"x".to_vec())), 17)
        );
        assert_eq!(
            decode_reply(ReplyKind::Wait, &[1], &lim).unwrap(),
            Decoded::Complete(Reply::Wait(WaitResponse::WaitCanceled), 1)
        );
        assert!(decode_reply(ReplyKind::Check, &[7], &lim).is_err());
        let mut huge = Vec::new();
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode_reply(ReplyKind::Value, &huge, &lim).is_err());
    }

    #[test]
    fn random_bytes_never_panic_and_need_more_is_monotone() {
        let lim = Limits::torch();
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        for _ in 0..20_000 {
            let n = rng.gen_range(0..64);
            let mut b: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
            if !b.is_empty() {
                b[0] = rng.gen_range(0..18);
            }
            match decode_request(&b, &lim) {
                Ok(Decoded::NeedMore { min_len }) => assert!(min_len > b.len()),
                Ok(Decoded::Complete(r, used)) => {
                    assert!(used <= b.len());
                    assert_eq!(r.to_bytes(), b[..used].to_vec());
                }
                Err(_) => {}
            }
        }
    }
}
