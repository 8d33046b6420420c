//! The shared-memory ring: layout of the segment and the raw accesses to it.
//!
//! ```text
//! offset 0     header (read-mostly): magic, token, reader slots, chunk count and size
//! offset 128   write_seq (u64: chunks published so far), ready word, shutdown word
//! offset 192   data doorbell: readers sleep on it, the writer rings it after publishing
//! offset 256   space doorbell: the writer sleeps on it, readers ring it after consuming
//! offset 512   reader slots, 128 bytes each: read_seq (u64), pid, start ticks, pid namespace, attached
//! then         chunk headers, 64 bytes each: seq, len, msg_len, flags
//! then         chunk data, `max_chunk_bytes` each (rounded up to 64)
//! ```
//!
//! Every field two parties write sits on its own cache line (the writer's `write_seq`, each
//! reader's `read_seq`), so a reader advancing never invalidates another reader's line, and the
//! line readers poll holds nothing but what they poll for. The writer's identity is the creator
//! recorded in the segment's name. Words are reached through [`Segment::word`] (bounds and
//! alignment checked); the two bulk copies are the only `unsafe` here.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use dist_core::{Error, Result};

use crate::shm::{Doorbell, ProcessId, Segment};

pub(crate) const MAGIC: u64 = u64::from_le_bytes(*b"distmq02");

const H_MAGIC: usize = 0;
const H_TOKEN: usize = 8; // 16 bytes
const H_SLOTS: usize = 24;
const H_CHUNKS: usize = 32;
const H_CHUNK_BYTES: usize = 40;

const H_WRITE_SEQ: usize = 128;
const H_READY: usize = 136;
const H_SHUTDOWN: usize = 140;
const H_DATA_BELL: usize = 192;
const H_SPACE_BELL: usize = 256;

const READER_BASE: usize = 512;
const READER_STRIDE: usize = 128;
const R_READ_SEQ: usize = 0;
const R_PID: usize = 8;
const R_START: usize = 16;
const R_NS: usize = 24;
const R_ATTACHED: usize = 32;

const CHUNK_HDR_STRIDE: usize = 64;
const C_SEQ: usize = 0;
const C_LEN: usize = 8;
const C_MSG_LEN: usize = 16;
const C_FLAGS: usize = 24;

/// The chunk starts a message.
pub(crate) const FLAG_FIRST: u64 = 1;
/// The chunk ends a message.
pub(crate) const FLAG_LAST: u64 = 2;

// The line readers poll holds nothing they write; each doorbell has a line of its own.
const _: () = assert!(H_WRITE_SEQ % 64 == 0 && H_SHUTDOWN + 4 <= H_DATA_BELL);
const _: () = assert!(H_DATA_BELL % 64 == 0 && H_SPACE_BELL - H_DATA_BELL >= 64);
const _: () = assert!(H_SPACE_BELL + 64 <= READER_BASE);

/// `attached` values of a reader slot.
pub(crate) const SLOT_EMPTY: u32 = 0;
pub(crate) const SLOT_ATTACHED: u32 = 1;
pub(crate) const SLOT_LEFT: u32 = 2;

/// `shutdown` values.
pub(crate) const SHUTDOWN_NONE: u32 = 0;
pub(crate) const SHUTDOWN_CLOSED: u32 = 1;
pub(crate) const SHUTDOWN_ABORTED: u32 = 2;

/// Largest segment the queue makes (64 GiB): a guard against arithmetic on absurd arguments.
const MAX_SEGMENT_BYTES: usize = 64 << 30;

/// Sizes of a ring, from which every offset follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub slots: usize,
    pub chunks: usize,
    pub chunk_bytes: usize,
}

impl Geometry {
    pub fn new(slots: usize, chunks: usize, chunk_bytes: usize) -> Result<Geometry> {
        crate::ensure_arg!(
            (1..=1 << 20).contains(&chunks),
            "max_chunks must be in 1..=1048576, got {chunks}"
        );
        crate::ensure_arg!(
            (64..=1 << 34).contains(&chunk_bytes),
            "max_chunk_bytes must be in 64..=16 GiB, got {chunk_bytes}"
        );
        crate::ensure_arg!(slots <= 1 << 16, "too many readers: {slots}");
        let g = Geometry {
            slots,
            chunks,
            chunk_bytes,
        };
        let len = g.len_checked().ok_or_else(|| {
            Error::invalid(format!(
                "a ring of {chunks} chunks of {chunk_bytes} bytes is too large"
            ))
        })?;
        crate::ensure_arg!(
            len <= MAX_SEGMENT_BYTES,
            "a ring of {chunks} chunks of {chunk_bytes} bytes needs {len} bytes of shared memory, over the cap of {MAX_SEGMENT_BYTES}"
        );
        Ok(g)
    }
    fn chunk_hdr_base(&self) -> usize {
        READER_BASE + self.slots * READER_STRIDE
    }
    fn data_base(&self) -> usize {
        align(self.chunk_hdr_base() + self.chunks * CHUNK_HDR_STRIDE, 4096)
    }
    fn chunk_stride(&self) -> usize {
        align(self.chunk_bytes, 64)
    }
    fn len_checked(&self) -> Option<usize> {
        self.chunk_stride()
            .checked_mul(self.chunks)?
            .checked_add(self.data_base())
    }
    /// Bytes of shared memory the ring needs.
    pub fn len(&self) -> usize {
        self.data_base() + self.chunk_stride() * self.chunks
    }
}

fn align(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

/// A chunk's header as the writer wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChunkHeader {
    /// Bytes in this chunk.
    pub len: usize,
    /// Bytes of the whole message.
    pub msg_len: u64,
    /// [`FLAG_FIRST`] and/or [`FLAG_LAST`].
    pub flags: u64,
}

/// A mapped ring. Only atomics in place and bounded copies touch the memory.
#[derive(Debug)]
pub(crate) struct Ring {
    seg: Segment,
    pub geo: Geometry,
}

impl Ring {
    /// Creates and initialises a ring (the writer's side).
    pub fn create(tag: &str, geo: Geometry, token: &[u8; 16]) -> Result<Ring> {
        let seg = Segment::create(tag, geo.len())?;
        let r = Ring { seg, geo };
        // The segment is zero-filled; write the read-mostly header, magic last.
        for (i, b) in token.chunks(8).enumerate() {
            r.u64_at(H_TOKEN + 8 * i).store(
                u64::from_le_bytes(b.try_into().expect("8-byte chunk")),
                Ordering::Relaxed,
            );
        }
        r.u64_at(H_SLOTS).store(geo.slots as u64, Ordering::Relaxed);
        r.u64_at(H_CHUNKS)
            .store(geo.chunks as u64, Ordering::Relaxed);
        r.u64_at(H_CHUNK_BYTES)
            .store(geo.chunk_bytes as u64, Ordering::Relaxed);
        r.u64_at(H_MAGIC).store(MAGIC, Ordering::Release);
        Ok(r)
    }

    /// Opens a ring made by another process and checks that it is the one the handle names.
    /// `wait` is how long to wait for the segment to appear (zero: probe once).
    pub fn open(
        name: &str,
        geo: Geometry,
        token: &[u8; 16],
        wait: std::time::Duration,
    ) -> Result<Ring> {
        let seg = Segment::open(name, geo.len(), wait)?;
        let r = Ring { seg, geo };
        let magic = r.u64_at(H_MAGIC).load(Ordering::Acquire);
        let mut tok = [0u8; 16];
        for i in 0..2 {
            tok[8 * i..8 * i + 8].copy_from_slice(
                &r.u64_at(H_TOKEN + 8 * i)
                    .load(Ordering::Relaxed)
                    .to_le_bytes(),
            );
        }
        let same = magic == MAGIC
            && super::secret::ct_eq(&tok, token)
            && r.u64_at(H_SLOTS).load(Ordering::Relaxed) == geo.slots as u64
            && r.u64_at(H_CHUNKS).load(Ordering::Relaxed) == geo.chunks as u64
            && r.u64_at(H_CHUNK_BYTES).load(Ordering::Relaxed) == geo.chunk_bytes as u64;
        if !same {
            return Err(Error::protocol(format!(
                "shared segment /{name} is not the message queue the handle describes (bad magic, token or sizes)"
            )));
        }
        Ok(r)
    }

    pub fn name(&self) -> &str {
        self.seg.name()
    }

    /// The segment (to unlink its name).
    pub fn segment(&self) -> &Segment {
        &self.seg
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        self.seg.word(off)
    }
    fn u32_at(&self, off: usize) -> &AtomicU32 {
        self.seg.word(off)
    }

    // --- header words ---
    pub fn write_seq(&self) -> &AtomicU64 {
        self.u64_at(H_WRITE_SEQ)
    }
    pub fn ready(&self) -> &AtomicU32 {
        self.u32_at(H_READY)
    }
    pub fn shutdown(&self) -> &AtomicU32 {
        self.u32_at(H_SHUTDOWN)
    }
    /// Readers sleep here; the writer rings it after publishing, shutting down or releasing.
    pub fn data_bell(&self) -> &Doorbell {
        self.seg.word(H_DATA_BELL)
    }
    /// The writer sleeps here; readers ring it after consuming, attaching or leaving.
    pub fn space_bell(&self) -> &Doorbell {
        self.seg.word(H_SPACE_BELL)
    }
    /// The writer: the segment's creator.
    pub fn writer_id(&self) -> ProcessId {
        self.seg.creator().unwrap_or_default()
    }

    // --- reader slots ---
    fn slot(&self, i: usize) -> usize {
        assert!(i < self.geo.slots, "reader slot {i} of {}", self.geo.slots);
        READER_BASE + i * READER_STRIDE
    }
    pub fn read_seq(&self, i: usize) -> &AtomicU64 {
        self.u64_at(self.slot(i) + R_READ_SEQ)
    }
    pub fn attached(&self, i: usize) -> &AtomicU32 {
        self.u32_at(self.slot(i) + R_ATTACHED)
    }
    pub fn set_reader_id(&self, i: usize, id: &ProcessId) {
        let s = self.slot(i);
        self.u64_at(s + R_PID)
            .store(u64::from(id.pid), Ordering::Relaxed);
        self.u64_at(s + R_START)
            .store(id.start_ticks, Ordering::Relaxed);
        self.u64_at(s + R_NS).store(id.pid_ns, Ordering::Relaxed);
    }
    pub fn reader_id(&self, i: usize) -> ProcessId {
        let s = self.slot(i);
        ProcessId {
            pid: u32::try_from(self.u64_at(s + R_PID).load(Ordering::Relaxed)).unwrap_or(0),
            start_ticks: self.u64_at(s + R_START).load(Ordering::Relaxed),
            pid_ns: self.u64_at(s + R_NS).load(Ordering::Relaxed),
        }
    }

    // --- chunks ---
    fn chunk_hdr(&self, seq: u64) -> usize {
        self.geo.chunk_hdr_base() + (seq % self.geo.chunks as u64) as usize * CHUNK_HDR_STRIDE
    }
    fn chunk_data(&self, seq: u64) -> *mut u8 {
        let off = self.geo.data_base()
            + (seq % self.geo.chunks as u64) as usize * self.geo.chunk_stride();
        assert!(off + self.geo.chunk_bytes <= self.seg.len());
        // SAFETY: in bounds of the mapping (asserted just above).
        unsafe { self.seg.as_ptr().add(off) }
    }

    /// Writes chunk `seq` (header and bytes). The caller has checked that every reader is done
    /// with the chunk that occupied this slot before, and publishes it afterwards by storing
    /// `write_seq` with release ordering.
    pub fn write_chunk(&self, seq: u64, bytes: &[u8], msg_len: u64, flags: u64) {
        assert!(bytes.len() <= self.geo.chunk_bytes);
        let h = self.chunk_hdr(seq);
        self.u64_at(h + C_SEQ).store(seq, Ordering::Relaxed);
        self.u64_at(h + C_LEN)
            .store(bytes.len() as u64, Ordering::Relaxed);
        self.u64_at(h + C_MSG_LEN).store(msg_len, Ordering::Relaxed);
        self.u64_at(h + C_FLAGS).store(flags, Ordering::Relaxed);
        // SAFETY: the destination is `chunk_bytes` long and in bounds (`chunk_data`), the source
        // is a live slice of at most that length, and no reader touches this slot until
        // `write_seq` passes `seq` (the ring protocol), so nothing reads it concurrently.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.chunk_data(seq), bytes.len()) };
    }

    /// Reads chunk `seq`'s header, validated against the geometry. The caller has seen
    /// `write_seq > seq` with acquire ordering.
    pub fn chunk_header(&self, seq: u64) -> Result<ChunkHeader> {
        let h = self.chunk_hdr(seq);
        let got = self.u64_at(h + C_SEQ).load(Ordering::Relaxed);
        let len = self.u64_at(h + C_LEN).load(Ordering::Relaxed);
        let msg_len = self.u64_at(h + C_MSG_LEN).load(Ordering::Relaxed);
        let flags = self.u64_at(h + C_FLAGS).load(Ordering::Relaxed);
        if got != seq || len > self.geo.chunk_bytes as u64 || flags & !(FLAG_FIRST | FLAG_LAST) != 0
        {
            return Err(Error::protocol(format!(
                "corrupt chunk header in /{}: expected chunk {seq}, found chunk {got}, length {len} (max {}), flags {flags:#x}",
                self.name(),
                self.geo.chunk_bytes
            )));
        }
        Ok(ChunkHeader {
            len: len as usize,
            msg_len,
            flags,
        })
    }

    /// Appends chunk `seq`'s `len` bytes (validated by [`Ring::chunk_header`]) to `out`, which
    /// has the capacity for them.
    pub fn read_chunk_into(&self, seq: u64, len: usize, out: &mut Vec<u8>) {
        assert!(len <= self.geo.chunk_bytes && out.capacity() - out.len() >= len);
        // SAFETY: source in bounds (`chunk_data`, len <= chunk_bytes); destination is the
        // vector's spare capacity, checked above; the writer does not touch this slot until this
        // reader advances its `read_seq` past `seq` (the ring protocol).
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.chunk_data(seq),
                out.as_mut_ptr().add(out.len()),
                len,
            );
            out.set_len(out.len() + len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_bounds_and_layout() {
        assert!(Geometry::new(3, 0, 1024).is_err());
        assert!(Geometry::new(3, 2, 8).is_err());
        assert!(Geometry::new(3, 1 << 20, 1 << 34).is_err());
        let g = Geometry::new(3, 2, 40 * 1024).unwrap();
        assert_eq!(g.data_base() % 4096, 0);
        assert!(g.chunk_hdr_base() >= READER_BASE + 3 * READER_STRIDE);
        assert_eq!(g.len(), g.data_base() + 2 * 40 * 1024);
    }

    #[test]
    fn chunks_roundtrip_and_corruption_is_an_error() {
        let g = Geometry::new(2, 3, 128).unwrap();
        let tok = [7u8; 16];
        let w = Ring::create(&format!("mq-ring-test-{}", line!()), g, &tok).unwrap();
        let r = Ring::open(w.name(), g, &tok, std::time::Duration::ZERO).unwrap();
        assert_eq!(r.writer_id(), ProcessId::me());
        assert!(Ring::open(w.name(), g, &[8u8; 16], std::time::Duration::ZERO).is_err());
        w.write_chunk(4, b"hello", 5, FLAG_FIRST | FLAG_LAST);
        w.write_seq().store(5, Ordering::Release);
        let h = r.chunk_header(4).unwrap();
        assert_eq!((h.len, h.msg_len, h.flags), (5, 5, FLAG_FIRST | FLAG_LAST));
        let mut out = Vec::with_capacity(5);
        r.read_chunk_into(4, h.len, &mut out);
        assert_eq!(out, b"hello");
        // Slot 1 holds chunk 4, so asking for chunk 1 (same slot) is detected.
        assert!(r.chunk_header(1).is_err());
        // A hostile length is refused before any copy.
        w.u64_at(w.chunk_hdr(4) + C_LEN)
            .store(1 << 40, Ordering::Relaxed);
        assert!(r.chunk_header(4).is_err());
        r.set_reader_id(1, &ProcessId::me());
        assert_eq!(w.reader_id(1), ProcessId::me());
    }
}
