//! The blocking client: [`TcpStoreClient`] implements [`dist_core::Store`] over one TCP
//! connection, speaking PyTorch's protocol, so it works against our server and PyTorch's.
//!
//! Every call has a deadline: waits take theirs from the caller, the rest from
//! [`ClientOptions::timeout`]. A call that fails half-way (timeout, I/O error, bad reply)
//! drops the connection, and the next call reconnects, so a stray reply can never be read as
//! the answer to a later request. Connecting retries with exponential backoff (10 ms doubling
//! to 1 s, with jitter) until the connect deadline, and each connection sends `VALIDATE`,
//! `AUTH` when a token is configured, then `PING`, as PyTorch's client does.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::Rng;
use tracing::debug;

use crate::proto::{
    decode_reply, CheckResponse, Decoded, Limits, Reply, ReplyKind, Request, WaitResponse,
    FEATURE_WAIT_GET, VALIDATION_MAGIC,
};
use crate::{Error, Result};

/// How a client connects and how long its calls may take.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Deadline of each call that is not a wait (and of the answer to `CANCEL_WAIT`).
    pub timeout: Duration,
    /// How long to keep retrying the first connection.
    pub connect_timeout: Duration,
    /// Shared secret sent with `AUTH` after `VALIDATE`.
    pub token: Option<Vec<u8>>,
    /// Caps on reply sizes.
    pub limits: Limits,
    /// Probe for our server's extensions (`HELLO`) and use `WAIT_GET`, which makes `get` one
    /// round trip instead of two. A PyTorch server closes the connection on `HELLO`; the
    /// client then reconnects once without extensions and remembers. `false`: speak exactly
    /// PyTorch's protocol.
    pub extensions: bool,
    /// Prepended to every key on the wire. PyTorch's `TCPStore` prepends `/` to every key
    /// (its `keyPrefix_`), so the default `/` makes our keys the keys PyTorch processes see:
    /// `set("a")` here and `store.get("a")` in PyTorch meet at `/a`.
    pub key_prefix: String,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(300),
            token: None,
            limits: Limits {
                max_value_len: 1 << 30,
                max_request_bytes: 1 << 30,
                ..Limits::default()
            },
            extensions: true,
            key_prefix: "/".into(),
        }
    }
}

struct Conn {
    stream: TcpStream,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
}

/// A blocking TCP store client; calls from several threads are serialised.
#[derive(Debug)]
pub struct TcpStoreClient {
    host: String,
    port: u16,
    opts: ClientOptions,
    conn: Mutex<Option<Conn>>,
    /// What `HELLO` taught us: 0 not asked yet, 1 our server (`WAIT_GET`), 2 no extensions.
    ext: AtomicU8,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("peer", &self.stream.peer_addr().ok())
            .finish()
    }
}

impl TcpStoreClient {
    /// Connects to `host:port`, retrying until `opts.connect_timeout` passes.
    pub fn connect(host: &str, port: u16, opts: ClientOptions) -> Result<Self> {
        let c = TcpStoreClient {
            host: host.to_string(),
            port,
            ext: AtomicU8::new(if opts.extensions { 0 } else { 2 }),
            opts,
            conn: Mutex::new(None),
        };
        let deadline = Instant::now() + c.opts.connect_timeout;
        let conn = c.open(deadline)?;
        *c.lock() = Some(conn);
        Ok(c)
    }

    /// A second, independent connection to the same server.
    pub fn try_clone(&self) -> Result<Self> {
        Self::connect(&self.host, self.port, self.opts.clone())
    }

    /// The server's address as given.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// The options in use.
    pub fn options(&self) -> &ClientOptions {
        &self.opts
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Conn>> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn open(&self, deadline: Instant) -> Result<Conn> {
        let start = Instant::now();
        let mut backoff = Duration::from_millis(10);
        let mut tries = 0u32;
        loop {
            tries += 1;
            let err = match self.try_open(deadline) {
                Ok(c) => return Ok(c),
                Err(e) => e,
            };
            // A refused token is final; so is an address that does not resolve.
            if matches!(err, Error::Protocol(_) | Error::InvalidArgument(_)) {
                return Err(err);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    op: format!("store connect to {}", self.addr()),
                    waited: now - start,
                    missing_ranks: vec![],
                    detail: format!("{tries} attempts; last error: {err}"),
                });
            }
            let jitter = rand::thread_rng().gen_range(0.5..1.5);
            let sleep = backoff.mul_f64(jitter).min(deadline - now);
            debug!(addr = %self.addr(), error = %err, ?sleep, "store connect failed; retrying");
            std::thread::sleep(sleep);
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    fn try_open(&self, deadline: Instant) -> Result<Conn> {
        let addrs: Vec<SocketAddr> = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| Error::io(format!("resolve {}", self.addr()), e))?
            .collect();
        let mut last = None;
        for a in addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match TcpStream::connect_timeout(&a, left.min(Duration::from_secs(10))) {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    let mut c = Conn {
                        stream,
                        rbuf: Vec::new(),
                        wbuf: Vec::new(),
                    };
                    return self.handshake(&mut c, deadline).map(|_| c);
                }
                Err(e) => last = Some(Error::io(format!("connect to {a}"), e)),
            }
        }
        Err(last.unwrap_or_else(|| {
            Error::io(
                format!("connect to {}", self.addr()),
                io::ErrorKind::TimedOut.into(),
            )
        }))
    }

    fn handshake(&self, c: &mut Conn, deadline: Instant) -> Result<()> {
        let mut reqs = vec![Request::Validate {
            magic: VALIDATION_MAGIC,
        }];
        if let Some(t) = &self.opts.token {
            reqs.push(Request::Auth { token: t.clone() });
        }
        let hello = self.ext.load(Ordering::Relaxed) != 2;
        if hello {
            reqs.push(Request::Hello { features: 0 });
        }
        let nonce: u32 = std::process::id() ^ rand::thread_rng().gen::<u32>();
        reqs.push(Request::Ping { nonce });
        for r in &reqs {
            r.encode(&mut c.wbuf);
        }
        self.send(c, "store handshake", deadline)?;
        if self.opts.token.is_some() {
            match self.recv(c, ReplyKind::Auth, "store auth", deadline)? {
                Reply::Auth(true) => {}
                _ => {
                    return Err(Error::protocol(format!(
                        "store at {} refused our token",
                        self.addr()
                    )))
                }
            }
        }
        if hello {
            match self.recv(c, ReplyKind::I64, "store hello", deadline) {
                Ok(Reply::I64(f)) => {
                    let v = if f as u64 & FEATURE_WAIT_GET != 0 {
                        1
                    } else {
                        2
                    };
                    self.ext.store(v, Ordering::Relaxed);
                }
                Ok(r) => return Err(Error::protocol(format!("HELLO answered {r:?}"))),
                Err(e) if e.is_timeout() => return Err(e),
                Err(e) => {
                    // Not our server (PyTorch's closes on unknown queries): reconnect plainly.
                    debug!(addr = %self.addr(), error = %e, "no store extensions; reconnecting without them");
                    self.ext.store(2, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
        match self.recv(c, ReplyKind::U32, "store ping", deadline) {
            Ok(Reply::U32(n)) if n == nonce => Ok(()),
            Ok(r) => Err(Error::protocol(format!(
                "ping answered {r:?}, expected nonce {nonce}"
            ))),
            // A server that wants a token closes the connection on our PING.
            Err(e) => Err(e),
        }
    }

    fn send(&self, c: &mut Conn, op: &str, deadline: Instant) -> Result<()> {
        let start = Instant::now();
        let mut off = 0;
        while off < c.wbuf.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::timeout(
                    op,
                    start.elapsed(),
                    format!("sending to store at {}", self.addr()),
                ));
            }
            let _ = c.stream.set_write_timeout(Some(left));
            match c.stream.write(&c.wbuf[off..]) {
                Ok(0) => return Err(self.lost(op, "connection closed while sending")),
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(Error::io(format!("{op}: send to {}", self.addr()), e)),
            }
        }
        c.wbuf.clear();
        Ok(())
    }

    fn lost(&self, op: &str, what: &str) -> Error {
        Error::Io {
            context: format!("{op}: store at {}", self.addr()),
            source: io::Error::new(io::ErrorKind::ConnectionAborted, what.to_string()),
        }
    }

    fn recv(&self, c: &mut Conn, kind: ReplyKind, op: &str, deadline: Instant) -> Result<Reply> {
        let start = Instant::now();
        let mut need = 0;
        loop {
            if c.rbuf.len() >= need {
                match decode_reply(kind, &c.rbuf, &self.opts.limits) {
                    Ok(Decoded::Complete(r, used)) => {
                        c.rbuf.drain(..used);
                        return Ok(r);
                    }
                    Ok(Decoded::NeedMore { min_len }) => need = min_len,
                    Err(e) => {
                        return Err(Error::protocol(format!(
                            "{op}: bad reply from store at {}: {e}",
                            self.addr()
                        )))
                    }
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::timeout(
                    op,
                    start.elapsed(),
                    format!("no reply from store at {}", self.addr()),
                ));
            }
            let _ = c
                .stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))));
            let old = c.rbuf.len();
            let want = (need.saturating_sub(old)).clamp(4096, 1 << 20);
            c.rbuf.resize(old + want, 0);
            match c.stream.read(&mut c.rbuf[old..]) {
                Ok(0) => {
                    c.rbuf.truncate(old);
                    return Err(self.lost(
                        op,
                        "connection closed by the store (a store drops a connection on a wrong \
                         token, a malformed or oversized request, or one not complete within its \
                         deadline; its log says which)",
                    ));
                }
                Ok(n) => c.rbuf.truncate(old + n),
                Err(e) => {
                    c.rbuf.truncate(old);
                    match e.kind() {
                        io::ErrorKind::Interrupted
                        | io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut => {}
                        _ => return Err(Error::io(format!("{op}: read from {}", self.addr()), e)),
                    }
                }
            }
        }
    }

    /// Runs `f` on a live connection (reconnecting first if needed); any error drops it.
    fn with_conn<T>(
        &self,
        deadline: Instant,
        f: impl FnOnce(&Self, &mut Conn) -> Result<T>,
    ) -> Result<T> {
        let mut g = self.lock();
        if g.is_none() {
            *g = Some(self.open(deadline)?);
        }
        let c = g.as_mut().expect("connected");
        let r = f(self, c);
        if r.is_err() {
            *g = None;
        }
        r
    }

    fn call(&self, op: &str, req: &Request, deadline: Instant) -> Result<Reply> {
        self.with_conn(deadline, |s, c| {
            req.encode(&mut c.wbuf);
            s.send(c, op, deadline)?;
            s.recv(c, req.reply_kind(), op, deadline)
        })
    }

    fn op_deadline(&self) -> Instant {
        Instant::now() + self.opts.timeout
    }

    /// Sends `PING` and checks the echoed nonce.
    pub fn ping(&self) -> Result<()> {
        let nonce = rand::thread_rng().gen();
        match self.call("store ping", &Request::Ping { nonce }, self.op_deadline())? {
            Reply::U32(n) if n == nonce => Ok(()),
            r => Err(Error::protocol(format!("ping answered {r:?}"))),
        }
    }

    /// Pushes `value` onto the queue `key`.
    pub fn queue_push(&self, key: &str, value: &[u8]) -> Result<()> {
        let req = Request::QueuePush {
            key: self.k(key),
            value: value.to_vec(),
        };
        self.call("store queue_push", &req, self.op_deadline())
            .map(|_| ())
    }

    /// Pops the head of queue `key`; with `wait = Some(t)` waits up to `t` for an item,
    /// otherwise answers `None` at once when the queue is empty.
    pub fn queue_pop(&self, key: &str, wait: Option<Duration>) -> Result<Option<Vec<u8>>> {
        if let Some(t) = wait {
            self.wait_inner("store queue_pop", &[key], t)?;
        }
        let req = Request::QueuePop { key: self.k(key) };
        match self.call("store queue_pop", &req, self.op_deadline())? {
            Reply::QueuePop(v) => Ok(v),
            r => Err(Error::protocol(format!("queue_pop answered {r:?}"))),
        }
    }

    /// `MULTI_GET` without waiting: one round trip, a missing key reads as an empty value.
    pub fn multi_get_now(&self, keys: &[&str]) -> Result<Vec<Vec<u8>>> {
        let req = Request::MultiGet {
            keys: keys.iter().map(|k| self.k(k)).collect(),
        };
        match self.call("store multi_get", &req, self.op_deadline())? {
            Reply::Values(v) => Ok(v),
            r => Err(Error::protocol(format!("MULTI_GET answered {r:?}"))),
        }
    }

    /// Length of queue `key`.
    pub fn queue_len(&self, key: &str) -> Result<i64> {
        match self.call(
            "store queue_len",
            &Request::QueueLen { key: self.k(key) },
            self.op_deadline(),
        )? {
            Reply::I64(n) => Ok(n),
            r => Err(Error::protocol(format!("queue_len answered {r:?}"))),
        }
    }

    /// The wire form of `key`: [`ClientOptions::key_prefix`] + `key`.
    fn k(&self, key: &str) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.opts.key_prefix.len() + key.len());
        v.extend_from_slice(self.opts.key_prefix.as_bytes());
        v.extend_from_slice(key.as_bytes());
        v
    }

    /// True once `HELLO` said the server supports `WAIT_GET`.
    pub fn has_wait_get(&self) -> bool {
        self.ext.load(Ordering::Relaxed) == 1
    }

    fn wait_inner(&self, op: &str, keys: &[&str], timeout: Duration) -> Result<()> {
        self.wait_maybe_get(op, keys, timeout, false).map(|_| ())
    }

    /// `WAIT keys`, or with `get` and a server that has it, `WAIT_GET keys`, whose values
    /// are returned. `Ok(None)` when the values were not fetched.
    fn wait_maybe_get(
        &self,
        op: &str,
        keys: &[&str],
        timeout: Duration,
        get: bool,
    ) -> Result<Option<Vec<Vec<u8>>>> {
        let start = Instant::now();
        let deadline = start + timeout;
        let keys_b: Vec<Vec<u8>> = keys.iter().map(|k| self.k(k)).collect();
        self.with_conn(deadline, |s, c| {
            let get = get && s.has_wait_get();
            let req = if get {
                Request::WaitGet { keys: keys_b }
            } else {
                Request::Wait { keys: keys_b }
            };
            let n = keys.len();
            let values = |c: &mut Conn, deadline: Instant| -> Result<Option<Vec<Vec<u8>>>> {
                if !get {
                    return Ok(None);
                }
                match s.recv(c, ReplyKind::Values(n), op, deadline)? {
                    Reply::Values(v) => Ok(Some(v)),
                    r => Err(Error::protocol(format!("{op}: WAIT_GET answered {r:?}"))),
                }
            };
            req.encode(&mut c.wbuf);
            s.send(c, op, deadline)?;
            match s.recv(c, ReplyKind::Wait, op, deadline) {
                Ok(Reply::Wait(WaitResponse::StopWaiting)) => return values(c, deadline),
                Ok(r) => return Err(Error::protocol(format!("{op}: WAIT answered {r:?}"))),
                Err(e) if e.is_timeout() => {}
                Err(e) => return Err(e),
            }
            // Timed out: cancel, then find which keys are missing.
            let grace = Instant::now() + s.opts.timeout.min(Duration::from_secs(30));
            Request::CancelWait.encode(&mut c.wbuf);
            s.send(c, op, grace)?;
            match s.recv(c, ReplyKind::Wait, op, grace)? {
                Reply::Wait(WaitResponse::WaitCanceled) => {}
                Reply::Wait(WaitResponse::StopWaiting) => {
                    // The keys arrived just before the cancel: the wait succeeded.
                    let v = values(c, grace)?;
                    match s.recv(c, ReplyKind::Wait, op, grace)? {
                        Reply::Wait(WaitResponse::WaitCanceled) => return Ok(v),
                        r => {
                            return Err(Error::protocol(format!(
                                "{op}: CANCEL_WAIT answered {r:?}"
                            )))
                        }
                    }
                }
                r => return Err(Error::protocol(format!("{op}: CANCEL_WAIT answered {r:?}"))),
            }
            let missing = s.missing_keys(c, keys, grace)?;
            Err(Error::Timeout {
                op: op.to_string(),
                waited: start.elapsed(),
                missing_ranks: vec![],
                detail: format_missing(&missing, keys.len()),
            })
        })
    }

    /// Which of `keys` are missing: one pipelined `CHECK` per key (the first 4,096 keys).
    fn missing_keys<'k>(
        &self,
        c: &mut Conn,
        keys: &[&'k str],
        deadline: Instant,
    ) -> Result<Vec<&'k str>> {
        let probe = &keys[..keys.len().min(4096)];
        for k in probe {
            Request::Check {
                keys: vec![self.k(k)],
            }
            .encode(&mut c.wbuf);
        }
        self.send(c, "store wait: check missing keys", deadline)?;
        let mut missing = Vec::new();
        for k in probe {
            if let Reply::Check(CheckResponse::NotReady) = self.recv(
                c,
                ReplyKind::Check,
                "store wait: check missing keys",
                deadline,
            )? {
                missing.push(*k);
            }
        }
        Ok(missing)
    }
}

fn format_missing(missing: &[&str], total: usize) -> String {
    const SHOW: usize = 16;
    let shown: Vec<&str> = missing.iter().take(SHOW).copied().collect();
    let more = if missing.len() > SHOW {
        format!(" and {} more", missing.len() - SHOW)
    } else {
        String::new()
    };
    format!(
        "missing keys ({} of {total}): {}{more}",
        missing.len(),
        shown.join(", ")
    )
}

impl dist_core::Store for TcpStoreClient {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        let req = Request::Set {
            key: self.k(key),
            value: value.to_vec(),
        };
        self.call("store set", &req, self.op_deadline()).map(|_| ())
    }

    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        if let Some(mut v) = self.wait_maybe_get("store get", &[key], timeout, true)? {
            return v
                .pop()
                .ok_or_else(|| Error::protocol("WAIT_GET answered no value"));
        }
        match self.call(
            "store get",
            &Request::Get { key: self.k(key) },
            self.op_deadline(),
        )? {
            Reply::Value(v) => Ok(v),
            r => Err(Error::protocol(format!("GET answered {r:?}"))),
        }
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let req = Request::Add {
            key: self.k(key),
            delta,
        };
        match self.call("store add", &req, self.op_deadline())? {
            Reply::I64(n) => Ok(n),
            r => Err(Error::protocol(format!("ADD answered {r:?}"))),
        }
    }

    fn compare_set(&self, key: &str, expected: &[u8], desired: &[u8]) -> Result<Vec<u8>> {
        let req = Request::CompareSet {
            key: self.k(key),
            expected: expected.to_vec(),
            desired: desired.to_vec(),
        };
        match self.call("store compare_set", &req, self.op_deadline())? {
            Reply::Value(v) => Ok(v),
            r => Err(Error::protocol(format!("COMPARE_SET answered {r:?}"))),
        }
    }

    fn check(&self, keys: &[&str]) -> Result<bool> {
        let req = Request::Check {
            keys: keys.iter().map(|k| self.k(k)).collect(),
        };
        match self.call("store check", &req, self.op_deadline())? {
            Reply::Check(r) => Ok(r == CheckResponse::Ready),
            r => Err(Error::protocol(format!("CHECK answered {r:?}"))),
        }
    }

    fn wait(&self, keys: &[&str], timeout: Duration) -> Result<()> {
        self.wait_inner("store wait", keys, timeout)
    }

    fn delete(&self, key: &str) -> Result<bool> {
        match self.call(
            "store delete",
            &Request::DeleteKey { key: self.k(key) },
            self.op_deadline(),
        )? {
            Reply::I64(n) => Ok(n == 1),
            r => Err(Error::protocol(format!("DELETE_KEY answered {r:?}"))),
        }
    }

    fn num_keys(&self) -> Result<u64> {
        match self.call("store num_keys", &Request::GetNumKeys, self.op_deadline())? {
            Reply::I64(n) => Ok(n.max(0) as u64),
            r => Err(Error::protocol(format!("GETNUMKEYS answered {r:?}"))),
        }
    }

    fn multi_get(&self, keys: &[&str], timeout: Duration) -> Result<Vec<Vec<u8>>> {
        if let Some(v) = self.wait_maybe_get("store multi_get", keys, timeout, true)? {
            return Ok(v);
        }
        let req = Request::MultiGet {
            keys: keys.iter().map(|k| self.k(k)).collect(),
        };
        match self.call("store multi_get", &req, self.op_deadline())? {
            Reply::Values(v) => Ok(v),
            r => Err(Error::protocol(format!("MULTI_GET answered {r:?}"))),
        }
    }

    fn multi_set(&self, keys: &[&str], values: &[&[u8]]) -> Result<()> {
        dist_core::ensure_arg!(
            keys.len() == values.len(),
            "multi_set: {} keys but {} values",
            keys.len(),
            values.len()
        );
        let req = Request::MultiSet {
            pairs: keys
                .iter()
                .zip(values)
                .map(|(k, v)| (self.k(k), v.to_vec()))
                .collect(),
        };
        self.call("store multi_set", &req, self.op_deadline())
            .map(|_| ())
    }

    fn append(&self, key: &str, value: &[u8]) -> Result<()> {
        let req = Request::Append {
            key: self.k(key),
            value: value.to_vec(),
        };
        self.call("store append", &req, self.op_deadline())
            .map(|_| ())
    }
}
