//! The layout of one rank's shared segment and the raw accesses to it.
//!
//! ```text
//! [0, 4096)                 Header: identity, state, doorbell, round counters, p2p counters
//! [4096, 4096 + 2H)         two collective halves of H bytes (double buffering by round parity)
//! then per peer d, 2 slots  point-to-point slots to d: a 64-byte slot header + P bytes each
//! ```
//!
//! Every counter is an atomic in the header. The protocol (in `super`) guarantees that a byte
//! range of a half or slot is written only by its owner and only while no peer reads it: a
//! writer publishes with a `Release` store after writing, readers load with `Acquire` before
//! reading, and a writer waits for the readers' `consumed`/`acked` counters before reusing a buffer.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use dist_core::Result;

use crate::shm::{Doorbell, Segment};

/// Largest group the shared-memory communicator serves.
pub const MAX_WORLD: usize = 64;
/// Bytes reserved for the header.
pub(crate) const HEADER_BYTES: usize = 4096;
/// Bytes of a point-to-point slot header.
pub(crate) const SLOT_HEADER: usize = 64;
/// `magic` once a header is initialised ("distcpu1").
const MAGIC: u64 = 0x6469_7374_6370_7531;

/// Peer states in [`Header::state`] (0, the zero fill, is "live").
/// The peer destroyed its communicator.
pub(crate) const STATE_CLOSED: u32 = 1;
/// The peer failed an operation (timeout or lost peer); `cause` holds the rank it blamed, plus one.
pub(crate) const STATE_FAILED: u32 = 2;

/// A value alone on its cache line, so peers polling one counter do not slow the owner's others.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub(crate) struct Line<T>(pub T);

/// The header at the start of each rank's segment. All fields are atomics, valid when zero.
#[repr(C)]
#[derive(Debug)]
pub(crate) struct Header {
    magic: Line<AtomicU64>,
    pub pid: AtomicU32,
    pub rank: AtomicU32,
    pub world: AtomicU32,
    pub half: AtomicU64,
    pub slot: AtomicU64,
    /// 0 (live), [`STATE_CLOSED`] or [`STATE_FAILED`].
    pub state: Line<AtomicU32>,
    /// With [`STATE_FAILED`]: the rank that was blamed, plus one.
    pub cause: AtomicU32,
    /// Rung after every publication below.
    pub bell: Doorbell,
    /// Collective rounds whose data this rank has written into its half (round g publishes g+1).
    pub written: Line<AtomicU64>,
    /// Rounds whose reduced slice this rank has written back (all-reduce only).
    pub reduced: Line<AtomicU64>,
    /// Rounds this rank has finished reading from every peer.
    pub consumed: Line<AtomicU64>,
    /// Chunks this rank has published to each destination.
    pub sent: [AtomicU64; MAX_WORLD],
    /// Chunks this rank has consumed from each source.
    pub acked: [AtomicU64; MAX_WORLD],
}

const _: () = assert!(std::mem::size_of::<Header>() <= HEADER_BYTES);

/// The header of a point-to-point slot, written by the sender before it publishes the chunk.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SlotHeader {
    /// Bytes of the whole message.
    pub total: u64,
    /// Bytes in this chunk.
    pub len: u64,
    /// The message's dtype (`DType` as its NCCL code), for checking on receipt.
    pub dtype: u64,
    /// Index of this chunk within its message.
    pub index: u64,
}

/// One rank's mapped segment (ours or a peer's).
#[derive(Debug)]
pub(crate) struct RankSeg {
    seg: Segment,
    half: usize,
    slot: usize,
    world: usize,
}

/// Bytes of a segment for `world` ranks with halves of `half` and slots of `slot` bytes.
pub(crate) fn segment_bytes(world: usize, half: usize, slot: usize) -> usize {
    HEADER_BYTES + 2 * half + world * 2 * (SLOT_HEADER + slot)
}

impl RankSeg {
    /// Creates and initialises this rank's segment.
    pub(crate) fn create(
        tag: &str,
        rank: usize,
        world: usize,
        half: usize,
        slot: usize,
    ) -> Result<Self> {
        debug_assert!(half % 64 == 0 && slot % 64 == 0 && world <= MAX_WORLD);
        let seg = Segment::create(tag, segment_bytes(world, half, slot))?;
        let me = RankSeg {
            seg,
            half,
            slot,
            world,
        };
        let h = me.hdr();
        h.pid.store(std::process::id(), Ordering::Relaxed);
        h.rank.store(rank as u32, Ordering::Relaxed);
        h.world.store(world as u32, Ordering::Relaxed);
        h.half.store(half as u64, Ordering::Relaxed);
        h.slot.store(slot as u64, Ordering::Relaxed);
        h.magic.0.store(MAGIC, Ordering::Release);
        Ok(me)
    }

    /// Opens a peer's segment by name and checks its header.
    pub(crate) fn open(
        name: &str,
        rank: usize,
        world: usize,
        half: usize,
        slot: usize,
        timeout: Duration,
    ) -> Result<Self> {
        let seg = Segment::open(name, segment_bytes(world, half, slot), timeout)?;
        let me = RankSeg {
            seg,
            half,
            slot,
            world,
        };
        let h = me.hdr();
        let ok = h.magic.0.load(Ordering::Acquire) == MAGIC
            && h.rank.load(Ordering::Relaxed) as usize == rank
            && h.world.load(Ordering::Relaxed) as usize == world
            && h.half.load(Ordering::Relaxed) as usize == half
            && h.slot.load(Ordering::Relaxed) as usize == slot;
        if !ok {
            return Err(dist_core::Error::protocol(format!(
                "shared segment /{name} does not hold rank {rank} of a {world}-rank group with {half}-byte halves"
            )));
        }
        Ok(me)
    }

    /// Removes the segment's name (the creator's mapping and every peer's stay valid).
    pub(crate) fn unlink(&mut self) {
        self.seg.unlink();
    }

    /// The segment's name.
    pub(crate) fn name(&self) -> &str {
        self.seg.name()
    }

    /// The header.
    pub(crate) fn hdr(&self) -> &Header {
        // SAFETY: the mapping is page aligned, at least HEADER_BYTES long (segment_bytes) and
        // lives as long as `self`; Header is repr(C), made only of atomics (valid for any bits,
        // including the zero fill of a new segment) and needs no more than page alignment.
        unsafe { &*(self.seg.as_ptr() as *const Header) }
    }

    fn half_ptr(&self, h: usize) -> *mut u8 {
        debug_assert!(h < 2);
        // SAFETY: HEADER_BYTES + h*half + half <= segment length (segment_bytes).
        unsafe { self.seg.as_ptr().add(HEADER_BYTES + h * self.half) }
    }

    fn slot_ptr(&self, peer: usize, h: usize) -> *mut u8 {
        debug_assert!(peer < self.world && h < 2);
        let off = HEADER_BYTES + 2 * self.half + (peer * 2 + h) * (SLOT_HEADER + self.slot);
        // SAFETY: off + SLOT_HEADER + slot <= segment length (segment_bytes).
        unsafe { self.seg.as_ptr().add(off) }
    }

    /// Copies `data` into collective half `h` at `off`. Only the owner calls it.
    ///
    /// # Safety
    /// No peer may be reading `[off, off + data.len())` of half `h` (the round protocol ensures it).
    pub(crate) unsafe fn write_half(&self, h: usize, off: usize, data: &[u8]) {
        assert!(off + data.len() <= self.half, "write past a shared half");
        // SAFETY: in bounds (checked above); the caller guarantees no concurrent reader; the
        // source is private memory so the ranges do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.half_ptr(h).add(off), data.len())
        };
    }

    /// Bytes `[off, off + len)` of this rank's own collective half `h`, for writing in place.
    ///
    /// # Safety
    /// Only the owner calls it, and no peer may be reading these bytes while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn half_mut(&self, h: usize, off: usize, len: usize) -> &mut [u8] {
        assert!(off + len <= self.half, "write past a shared half");
        // SAFETY: in bounds; the caller guarantees exclusive access for the slice's life.
        unsafe { std::slice::from_raw_parts_mut(self.half_ptr(h).add(off), len) }
    }

    /// Bytes `[off, off + len)` of collective half `h`.
    ///
    /// # Safety
    /// The owner must have published these bytes (a counter read with `Acquire` after its
    /// `Release` store) and must not write them while the slice lives (the round protocol).
    pub(crate) unsafe fn read_half(&self, h: usize, off: usize, len: usize) -> &[u8] {
        assert!(off + len <= self.half, "read past a shared half");
        // SAFETY: in bounds; the caller guarantees no concurrent writer for the slice's life.
        unsafe { std::slice::from_raw_parts(self.half_ptr(h).add(off), len) }
    }

    /// Writes a point-to-point chunk for `peer` into slot half `h`.
    ///
    /// # Safety
    /// The receiver must have acknowledged the chunk that last used this slot half.
    pub(crate) unsafe fn write_slot(&self, peer: usize, h: usize, hdr: SlotHeader, data: &[u8]) {
        assert!(data.len() <= self.slot, "chunk larger than a slot");
        let p = self.slot_ptr(peer, h);
        // SAFETY: p is 64-byte aligned (all offsets are multiples of 64) and the slot header fits
        // in SLOT_HEADER bytes; data fits in the slot; no reader (caller's guarantee).
        unsafe {
            std::ptr::write_volatile(p as *mut SlotHeader, hdr);
            std::ptr::copy_nonoverlapping(data.as_ptr(), p.add(SLOT_HEADER), data.len());
        }
    }

    /// Reads a point-to-point chunk header from the slot for `peer`, half `h`.
    ///
    /// # Safety
    /// The owner must have published the chunk (`sent` read with `Acquire`).
    pub(crate) unsafe fn read_slot_header(&self, peer: usize, h: usize) -> SlotHeader {
        // SAFETY: aligned and in bounds (see write_slot); published by the owner.
        unsafe { std::ptr::read_volatile(self.slot_ptr(peer, h) as *const SlotHeader) }
    }

    /// The data bytes of a published chunk in the slot for `peer`, half `h`.
    ///
    /// # Safety
    /// As [`RankSeg::read_slot_header`]; the slice must be dropped before acknowledging.
    pub(crate) unsafe fn read_slot(&self, peer: usize, h: usize, len: usize) -> &[u8] {
        assert!(len <= self.slot, "chunk larger than a slot");
        // SAFETY: in bounds; published and not rewritten until acknowledged.
        unsafe { std::slice::from_raw_parts(self.slot_ptr(peer, h).add(SLOT_HEADER), len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_round_trips() {
        let (world, half, slot) = (3, 8192, 256);
        assert_eq!(
            segment_bytes(world, half, slot),
            4096 + 2 * 8192 + 3 * 2 * (64 + 256)
        );
        let tag = format!("region-test-{}", line!());
        let mut me = RankSeg::create(&tag, 1, world, half, slot).unwrap();
        let peer = RankSeg::open(me.name(), 1, world, half, slot, Duration::from_secs(1)).unwrap();
        // A wrong identity is refused.
        assert!(RankSeg::open(me.name(), 2, world, half, slot, Duration::from_secs(1)).is_err());
        assert!(RankSeg::open(me.name(), 1, world, 4096, slot, Duration::from_secs(1)).is_err());
        let data: Vec<u8> = (0..100u8).collect();
        // SAFETY: single-threaded test; nobody else maps the segment.
        unsafe {
            me.write_half(1, 64, &data);
            assert_eq!(peer.read_half(1, 64, 100), &data[..]);
            assert!(peer.read_half(0, 64, 100).iter().all(|b| *b == 0));
            let h = SlotHeader {
                total: 1000,
                len: 100,
                dtype: 7,
                index: 3,
            };
            me.write_slot(2, 1, h, &data);
            assert_eq!(peer.read_slot_header(2, 1), h);
            assert_eq!(peer.read_slot(2, 1, 100), &data[..]);
            assert_eq!(peer.read_slot_header(2, 0).total, 0);
        }
        me.hdr().written.0.store(5, Ordering::Release);
        assert_eq!(peer.hdr().written.0.load(Ordering::Acquire), 5);
        assert_eq!(peer.hdr().pid.load(Ordering::Relaxed), std::process::id());
        me.unlink();
        assert!(!std::path::Path::new(&format!("/dev/shm/{}", me.name())).exists());
    }

    #[test]
    #[should_panic(expected = "past a shared half")]
    fn out_of_bounds_half_access_panics() {
        let me = RankSeg::create(&format!("region-test-{}", line!()), 0, 1, 4096, 64).unwrap();
        // SAFETY: single-threaded; the bounds check fires before any access.
        unsafe { me.write_half(0, 4000, &[0u8; 100]) };
    }
}
