//! Who may become a remote reader, with no I/O: the hello a connection must send, how many
//! connections may be sending one at a time, and for how long.
//!
//! The hello (reader → writer, right after connecting): magic `DISTMQH1`, the reader's rank
//! (u64 LE), the queue's 16-byte random token (from the [`Handle`](super::Handle), which the job
//! hands out through its host group), a u16 LE length and the store's shared secret when the job
//! has one. [`HelloDecoder`] takes it in pieces, refusing bad magic after 8 bytes and an
//! oversized secret before reading it.
//!
//! [`Admission`] holds the connections that have not finished their hello:
//! - each has [`HELLO_DEADLINE`] for the *whole* hello, however it trickles in;
//! - at most [`MAX_PENDING`] at once: a new connection beyond that pushes out the oldest pending
//!   one. A real reader sends its hello as soon as it connects, so it is never the oldest for
//!   long; junk cannot hold the door shut by being slow (it only pushes out other junk), and
//!   memory stays bounded (each pending hello holds at most [`MAX_HELLO`] bytes);
//! - a hello with the right tokens for a reader that has not connected yet is admitted; anything
//!   else is dropped, with the reason.
//!
//! [`RateLimit`] keeps the log of refusals to about a line a second, however many come.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::secret::ct_eq;

pub(crate) const HELLO_MAGIC: [u8; 8] = *b"DISTMQH1";
/// Longest store token a hello may carry.
pub(crate) const MAX_STORE_TOKEN: usize = 4096;
/// Bytes of a hello before the store token.
const HELLO_FIXED: usize = 34;
/// Longest hello.
pub(crate) const MAX_HELLO: usize = HELLO_FIXED + MAX_STORE_TOKEN;
/// Connections that may be sending their hello at once.
pub(crate) const MAX_PENDING: usize = 64;
/// Time a connection has for its whole hello.
pub(crate) const HELLO_DEADLINE: Duration = Duration::from_secs(5);

/// Encodes the hello a reader sends after connecting.
pub(crate) fn encode_hello(rank: usize, token: &[u8; 16], store_token: Option<&[u8]>) -> Vec<u8> {
    let st = store_token.unwrap_or_default();
    let st = &st[..st.len().min(MAX_STORE_TOKEN)];
    let mut h = Vec::with_capacity(HELLO_FIXED + st.len());
    h.extend_from_slice(&HELLO_MAGIC);
    h.extend_from_slice(&(rank as u64).to_le_bytes());
    h.extend_from_slice(token);
    h.extend_from_slice(&(st.len() as u16).to_le_bytes());
    h.extend_from_slice(st);
    h
}

/// A complete hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hello {
    pub rank: u64,
    pub token: [u8; 16],
    pub store_token: Vec<u8>,
}

/// Takes a hello in pieces: ask [`HelloDecoder::want`] how many bytes it needs, give it at most
/// that many.
#[derive(Debug, Default)]
pub(crate) struct HelloDecoder {
    buf: Vec<u8>,
}

impl HelloDecoder {
    /// Bytes still needed (never more than the rest of this hello, so nothing after it is
    /// consumed).
    pub fn want(&self) -> usize {
        if self.buf.len() < HELLO_FIXED {
            HELLO_FIXED - self.buf.len()
        } else {
            HELLO_FIXED + self.store_len() - self.buf.len()
        }
    }

    fn store_len(&self) -> usize {
        u16::from_le_bytes([self.buf[32], self.buf[33]]) as usize
    }

    /// Takes `bytes` (at most [`HelloDecoder::want`]); the hello once it is complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<Hello>, String> {
        if bytes.len() > self.want() {
            return Err("bytes beyond the hello".into());
        }
        let before = self.buf.len();
        self.buf.extend_from_slice(bytes);
        let n = self.buf.len();
        if before < HELLO_MAGIC.len() {
            let upto = n.min(HELLO_MAGIC.len());
            if self.buf[..upto] != HELLO_MAGIC[..upto] {
                return Err("not a MessageQueue hello (bad magic)".into());
            }
        }
        if before < HELLO_FIXED && n >= HELLO_FIXED && self.store_len() > MAX_STORE_TOKEN {
            return Err(format!(
                "store token of {} bytes over the cap of {MAX_STORE_TOKEN}",
                self.store_len()
            ));
        }
        if n < HELLO_FIXED || self.want() > 0 {
            return Ok(None);
        }
        Ok(Some(Hello {
            rank: u64::from_le_bytes(self.buf[8..16].try_into().expect("8 bytes")),
            token: self.buf[16..32].try_into().expect("16 bytes"),
            store_token: self.buf[HELLO_FIXED..].to_vec(),
        }))
    }
}

/// What a hello must prove: the queue's token, and the store's secret when the job has one.
#[derive(Debug, Clone)]
pub(crate) struct Secrets {
    pub token: [u8; 16],
    pub store_token: Option<Vec<u8>>,
}

impl Secrets {
    /// Checks a hello: the reader's rank when both secrets match and `expected(rank)` (a reader
    /// of this queue, not connected yet).
    pub fn check(&self, h: &Hello, expected: impl Fn(usize) -> bool) -> Result<usize, String> {
        // Both secrets are compared before saying which one failed, so timing says nothing.
        let tok_ok = ct_eq(&h.token, &self.token);
        let st_ok = match &self.store_token {
            Some(want) => ct_eq(&h.store_token, want),
            None => true,
        };
        if !(tok_ok && st_ok) {
            return Err(format!(
                "hello from claimed rank {}: wrong queue token or store token",
                h.rank
            ));
        }
        let rank = usize::try_from(h.rank).map_err(|_| "rank overflows".to_string())?;
        if !expected(rank) {
            return Err(format!(
                "rank {rank} is not a remote reader of this queue, or is already connected"
            ));
        }
        Ok(rank)
    }
}

/// How a pending connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// A reader proved itself: its rank.
    Admitted(usize),
    /// Dropped: why.
    Dropped(String),
}

#[derive(Debug)]
struct Pending<K> {
    key: K,
    since: Instant,
    dec: HelloDecoder,
}

/// The connections that have not finished their hello, oldest first (see the module docs).
#[derive(Debug)]
pub(crate) struct Admission<K> {
    pending: VecDeque<Pending<K>>,
    cap: usize,
    deadline: Duration,
}

impl<K: Copy + Eq> Admission<K> {
    pub fn new() -> Self {
        Self::with_limits(MAX_PENDING, HELLO_DEADLINE)
    }

    pub fn with_limits(cap: usize, deadline: Duration) -> Self {
        Admission {
            pending: VecDeque::new(),
            cap: cap.max(1),
            deadline,
        }
    }

    /// Connections pending.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// The pending connections' keys, oldest first.
    pub fn keys(&self) -> impl Iterator<Item = K> + '_ {
        self.pending.iter().map(|p| p.key)
    }

    /// A new connection `key` at `now`. When the table is full, the oldest pending connection
    /// is pushed out: it is returned, to be closed.
    pub fn arrive(&mut self, key: K, now: Instant) -> Option<K> {
        let evicted = if self.pending.len() >= self.cap {
            self.pending.pop_front().map(|p| p.key)
        } else {
            None
        };
        self.pending.push_back(Pending {
            key,
            since: now,
            dec: HelloDecoder::default(),
        });
        evicted
    }

    fn find(&mut self, key: K) -> Option<usize> {
        self.pending.iter().position(|p| p.key == key)
    }

    /// Bytes connection `key` should be asked for next (0 when it is not pending).
    pub fn want(&self, key: K) -> usize {
        self.pending
            .iter()
            .find(|p| p.key == key)
            .map_or(0, |p| p.dec.want())
    }

    /// `bytes` arrived on `key` at `now`; `Some` once the connection is settled (then it is no
    /// longer pending). Past its deadline, a connection is dropped whatever it sent.
    pub fn data(
        &mut self,
        key: K,
        bytes: &[u8],
        now: Instant,
        secrets: &Secrets,
        expected: impl Fn(usize) -> bool,
    ) -> Option<Outcome> {
        let i = self.find(key)?;
        let p = &mut self.pending[i];
        let outcome = if now.saturating_duration_since(p.since) >= self.deadline {
            Some(Outcome::Dropped(self.late()))
        } else {
            match p.dec.feed(bytes) {
                Err(e) => Some(Outcome::Dropped(e)),
                Ok(None) => None,
                Ok(Some(h)) => Some(match secrets.check(&h, expected) {
                    Ok(rank) => Outcome::Admitted(rank),
                    Err(e) => Outcome::Dropped(e),
                }),
            }
        };
        if outcome.is_some() {
            self.pending.remove(i);
        }
        outcome
    }

    /// Connection `key` closed (or failed) before finishing its hello.
    pub fn gone(&mut self, key: K) -> bool {
        match self.find(key) {
            Some(i) => {
                self.pending.remove(i);
                true
            }
            None => false,
        }
    }

    fn late(&self) -> String {
        format!("no complete hello within {:?}", self.deadline)
    }

    /// Connections past their deadline at `now`, removed; each is to be closed.
    pub fn expire(&mut self, now: Instant) -> Vec<(K, String)> {
        let mut out = Vec::new();
        // Oldest first: the expired ones are at the front.
        while let Some(p) = self.pending.front() {
            if now.saturating_duration_since(p.since) < self.deadline {
                break;
            }
            out.push((p.key, self.late()));
            self.pending.pop_front();
        }
        out
    }

    /// When the oldest pending connection's deadline passes.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.front().map(|p| p.since + self.deadline)
    }
}

/// Lets a line through at most every `every`, counting what it held back.
#[derive(Debug)]
pub(crate) struct RateLimit {
    every: Duration,
    next: Option<Instant>,
    held: u64,
}

impl RateLimit {
    pub fn new(every: Duration) -> Self {
        RateLimit {
            every,
            next: None,
            held: 0,
        }
    }

    /// `Some(n)` when a line may be written at `now` (`n`: lines held back since the last one);
    /// `None` when this one is held back.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        if self.next.is_some_and(|t| now < t) {
            self.held += 1;
            return None;
        }
        self.next = Some(now + self.every);
        Some(std::mem::take(&mut self.held))
    }

    /// Lines held back since the last one let through.
    pub fn held(&self) -> u64 {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets() -> Secrets {
        Secrets {
            token: [3; 16],
            store_token: Some(b"secret".to_vec()),
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Feeds `bytes` into connection `key` in pieces of `step`, as the shell would.
    fn trickle(
        a: &mut Admission<u32>,
        key: u32,
        bytes: &[u8],
        step: usize,
        now: Instant,
    ) -> Option<Outcome> {
        let mut i = 0;
        while i < bytes.len() {
            let n = a.want(key).min(step).min(bytes.len() - i);
            assert!(
                n > 0,
                "asked for nothing with {} bytes left",
                bytes.len() - i
            );
            if let Some(o) = a.data(key, &bytes[i..i + n], now, &secrets(), |r| r == 5) {
                return Some(o);
            }
            i += n;
        }
        None
    }

    #[test]
    fn hellos_are_checked_in_any_split() {
        let good = encode_hello(5, &[3; 16], Some(b"secret"));
        for step in [1, 2, 7, 34, 4096] {
            let mut a = Admission::new();
            a.arrive(1u32, Instant::now());
            assert_eq!(
                trickle(&mut a, 1, &good, step, Instant::now()),
                Some(Outcome::Admitted(5))
            );
            assert_eq!(a.len(), 0);
        }
        let bad: Vec<(Vec<u8>, &str)> = vec![
            (
                encode_hello(5, &[4; 16], Some(b"secret")),
                "wrong queue token",
            ),
            (
                encode_hello(5, &[3; 16], Some(b"other!")),
                "wrong queue token",
            ),
            (encode_hello(5, &[3; 16], None), "wrong queue token"),
            (
                encode_hello(6, &[3; 16], Some(b"secret")),
                "not a remote reader",
            ),
            (b"GET / HTTP/1.1\r\n".to_vec(), "bad magic"),
            (
                {
                    let mut h = encode_hello(5, &[3; 16], None);
                    h[32..34].copy_from_slice(&u16::MAX.to_le_bytes());
                    h
                },
                "over the cap",
            ),
        ];
        for (bytes, why) in bad {
            let mut a = Admission::new();
            a.arrive(1u32, Instant::now());
            match trickle(&mut a, 1, &bytes, 3, Instant::now()) {
                Some(Outcome::Dropped(e)) => assert!(e.contains(why), "{e} vs {why}"),
                o => panic!("{o:?} for {why}"),
            }
        }
        // Bad magic is refused on its first wrong byte.
        let mut a = Admission::new();
        a.arrive(1u32, Instant::now());
        assert!(matches!(
            a.data(1, b"X", Instant::now(), &secrets(), |_| true),
            Some(Outcome::Dropped(_))
        ));
        // The decoder never asks for more than this hello.
        let mut d = HelloDecoder::default();
        assert_eq!(d.want(), 34);
        d.feed(&good[..34]).unwrap();
        assert_eq!(d.want(), 6);
        assert!(d.feed(&[0; 7]).is_err());
    }

    #[test]
    fn the_whole_hello_has_one_deadline() {
        let t0 = Instant::now();
        let mut a = Admission::with_limits(8, ms(5000));
        a.arrive(1u32, t0);
        let good = encode_hello(5, &[3; 16], Some(b"secret"));
        // A byte every 3 s: each piece is in time for a per-read deadline, the hello is not.
        let mut now = t0;
        let mut out = None;
        for b in &good {
            now += ms(3000);
            out = a.data(1, std::slice::from_ref(b), now, &secrets(), |_| true);
            if out.is_some() {
                break;
            }
        }
        assert!(matches!(out, Some(Outcome::Dropped(ref e)) if e.contains("no complete hello")));
        // And a silent one expires on its own.
        a.arrive(2, t0);
        a.arrive(3, t0 + ms(10));
        assert_eq!(a.next_deadline(), Some(t0 + ms(5000)));
        assert!(a.expire(t0 + ms(4999)).is_empty());
        let gone: Vec<u32> = a
            .expire(t0 + ms(5000))
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(gone, [2]);
        assert_eq!(a.keys().collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn a_full_table_pushes_out_the_oldest_so_a_real_reader_gets_in() {
        let t0 = Instant::now();
        let mut a = Admission::with_limits(4, ms(5000));
        for k in 0..4u32 {
            assert_eq!(a.arrive(k, t0), None);
        }
        // The real reader (key 100) arrives on a full table: junk 0 makes room.
        assert_eq!(a.arrive(100, t0 + ms(1)), Some(0));
        // Three more junk connections arrive before its hello is read: it is still there.
        for k in 4..7u32 {
            assert_ne!(a.arrive(k, t0 + ms(2)), Some(100));
        }
        let good = encode_hello(5, &[3; 16], Some(b"secret"));
        assert_eq!(
            trickle(&mut a, 100, &good, 4096, t0 + ms(3)),
            Some(Outcome::Admitted(5))
        );
        assert!(a.gone(6) && !a.gone(6));
        assert_eq!(a.want(6), 0);
    }

    #[test]
    fn the_refusal_log_is_rate_limited() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(ms(1000));
        assert_eq!(r.allow(t0), Some(0));
        for i in 1..=500 {
            assert_eq!(r.allow(t0 + ms(i)), None);
        }
        assert_eq!(r.held(), 500);
        assert_eq!(r.allow(t0 + ms(1000)), Some(500));
        assert_eq!(r.allow(t0 + ms(1500)), None);
        assert_eq!(r.allow(t0 + ms(2100)), Some(1));
    }
}
