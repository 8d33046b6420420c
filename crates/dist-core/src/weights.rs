//! Weight transfer: a trainer pushes new weights into running inference ranks (vLLM's
//! `vllm/distributed/weight_transfer`, its packed broadcast).
//!
//! A transfer over a group whose rank `src` is the trainer and whose other ranks receive:
//! 1. **Manifest.** The sender broadcasts a typed [`Manifest`]: every tensor's name, dtype,
//!    shape and [`checksum64`], and how the tensors are packed into *buckets* — runs of whole
//!    tensors of at most [`TransferOptions::bucket_bytes`] (a larger tensor is a bucket of its
//!    own), as vLLM's `pack_tensors` does.
//! 2. **Check.** Every receiver checks the manifest against its model ([`WeightSpec`]s): a name
//!    it does not have, another dtype or shape, a bucket larger than it accepts. Then one
//!    all-gather of every rank's verdict: if any rank refused, **every** rank (the sender too)
//!    returns the same error naming that rank and its reason, and no weight has moved.
//! 3. **Buckets.** Each bucket is packed into one `u8` tensor and broadcast (over the group's
//!    device communicator, or its host group when it has none); each receiver
//!    checks the checksums of its tensors and hands them to its sink (the model's loader) in
//!    manifest order.
//! 4. **Verdict.** A last all-gather of every rank's outcome, so a receiver's checksum failure is
//!    an error on every rank, not only on the one that saw it.
//!
//! Every collective of the transfer is bounded by the remaining part of
//! [`TransferOptions::deadline`] (the communicator's deadline is lowered to it while the transfer
//! runs), so a dead or stopped peer fails the transfer in time with a [`Error::Timeout`] that
//! names it.
//!
//! Unlike vLLM: the receiver learns the bucket boundaries from the manifest instead of
//! recomputing them from its own view of the metadata (a disagreement there hangs vLLM's NCCL
//! broadcast or loads shifted bytes); a name or shape the model lacks is refused before any data
//! moves, on every rank; bytes are checksummed; and every wait has a deadline.
//!
//! **Where the bytes go.** Nothing is staged through the host. The sender packs each bucket of
//! several tensors into one buffer from the communicator's pool with byte-range copies
//! ([`ByteRanges`] on the backend's views: host slices for host backends, device copies for
//! device ones) and broadcasts it; a tensor alone in its bucket is copied into a pooled buffer
//! of its own dtype and shape. A receiver broadcasts into a pooled bucket buffer and copies each
//! tensor, checked ([`Checksum`]), straight into the model's memory
//! ([`receive_weights_into`]: the model lends a view of each tensor), or receives a tensor alone
//! in its bucket directly into the model's view. [`receive_weights`] hands fresh tensors to a
//! sink instead. A device path with CUDA IPC on one host is described in
//! `docs/ARCHITECTURE.md`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::communicator::{Comm, View, ViewMut};
use crate::tensor::checked_nbytes;
use crate::{
    Backend, DType, DeviceCommunicator, Error, GroupCoordinator, HostGroupExt, HostTensor,
    HostView, HostViewMut, Result, Tensor,
};

/// Default bucket size: 256 MiB (vLLM's default is 1 GiB, which it allocates per bucket twice).
pub const DEFAULT_BUCKET_BYTES: usize = 256 << 20;
/// Default size from which a tensor travels alone, straight between the two models' memory:
/// 64 KiB. Packing saves a call per tensor and costs a copy on each side; on the CPU backend a
/// broadcast per 64 KiB tensor is already faster than packing them (`mp_weights --bench`), so only
/// smaller tensors (norms, biases, scales) are packed.
pub const DEFAULT_ALONE_FROM: usize = 64 << 10;
/// Most tensors one manifest may list.
pub const MAX_TENSORS: usize = 1 << 20;
/// Longest tensor name.
pub const MAX_NAME_BYTES: usize = 1024;

/// One tensor of a [`Manifest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// The parameter's name (`model.layers.0.mlp.experts.w13`).
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// [`checksum64`] of its bytes.
    pub checksum: u64,
}

impl ManifestEntry {
    fn nbytes(&self) -> Result<usize> {
        checked_nbytes(self.dtype, &self.shape)
    }
}

/// A run of whole tensors sent as one packed `u8` tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    /// Index of its first tensor in [`Manifest::entries`].
    pub first: usize,
    /// Number of tensors.
    pub count: usize,
    /// Bytes: the sum of its tensors' bytes.
    pub bytes: usize,
}

/// What a transfer carries; see the module docs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The sender's label of this version of the weights (a training step).
    pub version: u64,
    /// Every tensor, in sending order.
    pub entries: Vec<ManifestEntry>,
    /// The packing: consecutive runs covering `entries` in order.
    pub buckets: Vec<Bucket>,
}

impl Manifest {
    /// The manifest of `tensors` (name, dtype, shape, bytes) packed into buckets of at most
    /// `bucket_bytes` (a larger tensor, or one of at least `alone_from` bytes, gets a bucket of
    /// its own; see [`pack`]).
    pub fn build(
        version: u64,
        tensors: &[(&str, DType, &[usize], &[u8])],
        bucket_bytes: usize,
        alone_from: usize,
    ) -> Result<Manifest> {
        for (name, dtype, shape, bytes) in tensors {
            crate::ensure_arg!(
                checked_nbytes(*dtype, shape)? == bytes.len(),
                "weights: '{name}' is {dtype} {shape:?} but has {} bytes",
                bytes.len()
            );
        }
        let listed: Vec<(&str, DType, &[usize], u64)> = tensors
            .iter()
            .map(|(n, d, s, b)| (*n, *d, *s, checksum64(b)))
            .collect();
        Self::from_checksums(version, &listed, bucket_bytes, alone_from)
    }

    /// [`Self::build`] from each tensor's [`checksum64`], computed where the tensor lives.
    pub fn from_checksums(
        version: u64,
        tensors: &[(&str, DType, &[usize], u64)],
        bucket_bytes: usize,
        alone_from: usize,
    ) -> Result<Manifest> {
        crate::ensure_arg!(bucket_bytes > 0, "weights: bucket size must be positive");
        let mut entries = Vec::with_capacity(tensors.len());
        for (name, dtype, shape, checksum) in tensors {
            let e = ManifestEntry {
                name: name.to_string(),
                dtype: *dtype,
                shape: shape.to_vec(),
                checksum: *checksum,
            };
            e.nbytes()?;
            entries.push(e);
        }
        let sizes: Vec<usize> = entries
            .iter()
            .map(ManifestEntry::nbytes)
            .collect::<Result<_>>()?;
        let m = Manifest {
            version,
            buckets: pack(&sizes, bucket_bytes, alone_from),
            entries,
        };
        m.check(usize::MAX)?;
        Ok(m)
    }

    /// Checks the manifest's own consistency (as a receiver must: it came from a peer): caps on
    /// counts and names, unique names, buckets covering the entries in order with the right byte
    /// counts, none of several tensors larger than `max_bucket_bytes` (a tensor larger than
    /// that travels alone, as the sender packs it).
    pub fn check(&self, max_bucket_bytes: usize) -> Result<()> {
        crate::ensure_arg!(
            self.entries.len() <= MAX_TENSORS,
            "weights manifest: {} tensors, at most {MAX_TENSORS}",
            self.entries.len()
        );
        let mut names = std::collections::BTreeSet::new();
        for e in &self.entries {
            crate::ensure_arg!(
                e.name.len() <= MAX_NAME_BYTES && !e.name.is_empty(),
                "weights manifest: a name of {} bytes (1..={MAX_NAME_BYTES})",
                e.name.len()
            );
            crate::ensure_arg!(
                names.insert(e.name.as_str()),
                "weights manifest: '{}' listed twice",
                e.name
            );
        }
        let mut next = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            crate::ensure_arg!(
                b.first == next && b.count > 0 && b.first + b.count <= self.entries.len(),
                "weights manifest: bucket {i} covers [{}, +{}), expected to start at {next}",
                b.first,
                b.count
            );
            let mut bytes = 0usize;
            for e in &self.entries[b.first..b.first + b.count] {
                bytes = bytes
                    .checked_add(e.nbytes()?)
                    .ok_or_else(|| Error::invalid("weights manifest: bucket size overflows"))?;
            }
            crate::ensure_arg!(
                bytes == b.bytes,
                "weights manifest: bucket {i} says {} bytes, its tensors have {bytes}",
                b.bytes
            );
            crate::ensure_arg!(
                b.bytes <= max_bucket_bytes || b.count == 1,
                "weights manifest: bucket {i} of {} bytes, this receiver takes at most {max_bucket_bytes}",
                b.bytes
            );
            next += b.count;
        }
        crate::ensure_arg!(
            next == self.entries.len(),
            "weights manifest: buckets cover {next} of {} tensors",
            self.entries.len()
        );
        Ok(())
    }

    /// Total bytes of the tensors.
    pub fn total_bytes(&self) -> usize {
        self.buckets.iter().map(|b| b.bytes).sum()
    }
}

/// Runs of consecutive sizes of at most `limit` bytes each; a size above `limit`, or of at
/// least `alone_from`, alone (such a tensor travels straight from the sender's memory into the
/// receiver's, with no packing).
pub fn pack(sizes: &[usize], limit: usize, alone_from: usize) -> Vec<Bucket> {
    let mut out: Vec<Bucket> = Vec::new();
    for (i, &s) in sizes.iter().enumerate() {
        let alone = |b: &Bucket| b.count == 1 && b.bytes >= alone_from;
        match out.last_mut() {
            Some(b)
                if s < alone_from
                    && !alone(b)
                    && b.bytes.checked_add(s).is_some_and(|t| t <= limit) =>
            {
                b.count += 1;
                b.bytes += s;
            }
            _ => out.push(Bucket {
                first: i,
                count: 1,
                bytes: s,
            }),
        }
    }
    out
}

/// The 64-bit checksum of a tensor's bytes: XXH3-64 (memory speed on one core; not
/// cryptographic: it catches corruption and misaligned layouts, not an adversary).
pub fn checksum64(b: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(b)
}

/// One tensor of the receiving model: what the transfer may write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightSpec {
    /// Name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
}

/// Checks a manifest against a receiver's model; the error says the first name the model does
/// not have or whose dtype or shape differ. With `require_all`, every model tensor must come.
pub fn check_against_model(m: &Manifest, model: &[WeightSpec], require_all: bool) -> Result<()> {
    let by_name: BTreeMap<&str, &WeightSpec> = model.iter().map(|s| (s.name.as_str(), s)).collect();
    for e in &m.entries {
        let Some(s) = by_name.get(e.name.as_str()) else {
            return Err(Error::invalid(format!(
                "weights: the model has no tensor '{}' ({} {:?})",
                e.name, e.dtype, e.shape
            )));
        };
        crate::ensure_arg!(
            s.dtype == e.dtype && s.shape == e.shape,
            "weights: '{}' is {} {:?} in the model, {} {:?} in the update",
            e.name,
            s.dtype,
            s.shape,
            e.dtype,
            e.shape
        );
    }
    if require_all && m.entries.len() != model.len() {
        let sent: std::collections::BTreeSet<&str> =
            m.entries.iter().map(|e| e.name.as_str()).collect();
        let missing: Vec<&str> = model
            .iter()
            .map(|s| s.name.as_str())
            .filter(|n| !sent.contains(n))
            .take(5)
            .collect();
        return Err(Error::invalid(format!(
            "weights: the update lacks model tensors {missing:?}{}",
            if model.len() - sent.len() > 5 {
                " …"
            } else {
                ""
            }
        )));
    }
    Ok(())
}

/// Byte-range copies on a backend's views, what packing and unpacking buckets needs: `Self` is
/// the written view, `Src` the read one. Implemented here for the host views; a device backend
/// implements it for its views with device-to-device copies of byte ranges.
pub trait ByteRanges<Src> {
    /// Copies all of `src`'s bytes into bytes `[at, at + src.nbytes())` of `self`.
    fn write_at(&mut self, at: usize, src: &Src) -> Result<()>;
    /// Fills `self` with bytes `[at, at + self.nbytes())` of `src`.
    fn read_at(&mut self, src: &Src, at: usize) -> Result<()>;
}

/// [`checksum64`] of a view's bytes `[at, at + len)`: on the host for host views; a device
/// backend computes it on the device or reads the range back.
pub trait Checksum {
    /// The checksum of bytes `[at, at + len)`.
    fn checksum_range(&self, at: usize, len: usize) -> Result<u64>;
}

fn byte_range(what: &str, total: usize, at: usize, len: usize) -> Result<std::ops::Range<usize>> {
    match at.checked_add(len) {
        Some(end) if end <= total => Ok(at..end),
        _ => Err(Error::invalid(format!(
            "weights: {what} bytes [{at}, {at}+{len}) of a {total}-byte tensor"
        ))),
    }
}

impl<'b> ByteRanges<HostView<'b>> for HostViewMut<'_> {
    fn write_at(&mut self, at: usize, src: &HostView<'b>) -> Result<()> {
        let r = byte_range("write_at", self.nbytes(), at, src.nbytes())?;
        self.as_bytes_mut()[r].copy_from_slice(src.as_bytes());
        Ok(())
    }
    fn read_at(&mut self, src: &HostView<'b>, at: usize) -> Result<()> {
        let r = byte_range("read_at", src.nbytes(), at, self.nbytes())?;
        self.as_bytes_mut().copy_from_slice(&src.as_bytes()[r]);
        Ok(())
    }
}

impl Checksum for HostView<'_> {
    fn checksum_range(&self, at: usize, len: usize) -> Result<u64> {
        let r = byte_range("checksum", self.nbytes(), at, len)?;
        Ok(checksum64(&self.as_bytes()[r]))
    }
}

impl Checksum for HostViewMut<'_> {
    fn checksum_range(&self, at: usize, len: usize) -> Result<u64> {
        let r = byte_range("checksum", self.nbytes(), at, len)?;
        Ok(checksum64(&self.as_bytes()[r]))
    }
}

/// How a transfer runs.
#[derive(Clone, Debug)]
pub struct TransferOptions {
    /// Largest bucket the sender packs (and a receiver accepts).
    pub bucket_bytes: usize,
    /// Tensors of at least this many bytes travel alone, unpacked.
    pub alone_from: usize,
    /// The whole transfer's deadline, from its start.
    pub deadline: Duration,
    /// Receivers refuse an update that does not bring every model tensor.
    pub require_all: bool,
}

impl Default for TransferOptions {
    fn default() -> Self {
        TransferOptions {
            bucket_bytes: DEFAULT_BUCKET_BYTES,
            alone_from: DEFAULT_ALONE_FROM,
            deadline: crate::DEFAULT_TIMEOUT,
            require_all: false,
        }
    }
}

/// What a transfer moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransferStats {
    /// Tensors.
    pub tensors: usize,
    /// Buckets.
    pub buckets: usize,
    /// Bytes of the tensors.
    pub bytes: usize,
    /// Time from the manifest to the verdict.
    pub elapsed: Duration,
}

/// The communicator's deadline lowered to the transfer's for as long as it lives.
struct DeadlineGuard<'a, C: DeviceCommunicator> {
    comm: Option<&'a C>,
    saved: Duration,
    end: Instant,
}

impl<'a, C: DeviceCommunicator> DeadlineGuard<'a, C> {
    fn new(comm: Option<&'a C>, deadline: Duration) -> Self {
        DeadlineGuard {
            saved: comm.map_or(deadline, |c| c.timeout()),
            comm,
            end: Instant::now() + deadline,
        }
    }
    /// Lowers the communicator's deadline to what is left; an error once nothing is.
    fn arm(&self, op: &str, waited_since: Instant) -> Result<()> {
        let left = self.end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::timeout(
                format!("weight transfer {op}"),
                waited_since.elapsed(),
                "the transfer's deadline passed",
            ));
        }
        if let Some(c) = self.comm {
            c.set_timeout(left.min(self.saved));
        }
        Ok(())
    }
}

impl<C: DeviceCommunicator> Drop for DeadlineGuard<'_, C> {
    fn drop(&mut self) {
        if let Some(c) = self.comm {
            c.set_timeout(self.saved);
        }
    }
}

/// Every rank's verdict in one all-gather: `Ok` when all are `Ok`, else the first refusal,
/// with the rank that gave it, on every rank.
fn agree<B: Backend>(group: &GroupCoordinator<B>, stage: &str, mine: &Result<()>) -> Result<()> {
    let v: Option<String> = mine.as_ref().err().map(|e| e.to_string());
    let all: Vec<Option<String>> = group.host_group().all_gather_obj(&v)?;
    for (r, v) in all.iter().enumerate() {
        if let Some(why) = v {
            return Err(Error::invalid(format!(
                "weight transfer on {}: rank {r} refused the {stage}: {why}",
                group.unique_name()
            )));
        }
    }
    Ok(())
}

fn alloc<B: Backend>(
    group: &GroupCoordinator<B>,
    dtype: DType,
    shape: &[usize],
) -> Result<B::Tensor> {
    match group.device_communicator() {
        Some(c) => c.alloc(dtype, shape),
        None => B::from_host(&HostTensor::zeros(dtype, shape), group.device()),
    }
}

/// Broadcasts `t` from group rank `src`: over the device communicator, or as bytes over the host
/// group when the group has none (the receivers' `t` is then replaced).
fn broadcast_tensor<B: Backend>(
    group: &GroupCoordinator<B>,
    t: &mut B::Tensor,
    src: usize,
) -> Result<()> {
    if group.device_communicator().is_some() {
        return group.broadcast(t, src);
    }
    if group.rank_in_group() == src {
        group
            .host_group()
            .broadcast_bytes(Some(B::to_host(t)?.as_bytes()), src)?;
    } else {
        let got = group.host_group().broadcast_bytes(None, src)?;
        *t = B::from_host(
            &HostTensor::from_bytes(t.dtype(), t.shape(), &got)?,
            group.device(),
        )?;
    }
    Ok(())
}

/// The trainer's side: sends `weights` (name, tensor) as version `version` to every other rank
/// of `group`, from this rank. Collective with [`receive_weights_into`] or [`receive_weights`]
/// on the others.
///
/// Each bucket of several tensors is packed into one buffer from the communicator's pool
/// (byte-range copies on the device for device views) and broadcast; a tensor alone in its
/// bucket is broadcast straight from its own memory into the receivers' model tensors. The
/// tensors are lent mutably because a broadcast takes a writable view on every rank, the source
/// too; the source's bytes are only read.
pub fn send_weights<B: Backend>(
    group: &GroupCoordinator<B>,
    version: u64,
    weights: &mut [(&str, &mut B::Tensor)],
    opts: &TransferOptions,
) -> Result<TransferStats>
where
    for<'a, 'b> ViewMut<'a, B>: ByteRanges<View<'b, B>>,
    for<'a> View<'a, B>: Checksum,
{
    let start = Instant::now();
    let src = group.rank_in_group();
    let guard = DeadlineGuard::new(group.device_communicator(), opts.deadline);
    // A manifest this rank cannot build is its refusal at the check: every rank stops there.
    let built = (|| {
        let listed = weights
            .iter()
            .map(|(n, t)| {
                let sum = Comm::<B>::view(t).checksum_range(0, t.nbytes())?;
                Ok((*n, t.dtype(), t.shape(), sum))
            })
            .collect::<Result<Vec<_>>>()?;
        Manifest::from_checksums(version, &listed, opts.bucket_bytes, opts.alone_from)
    })();
    let (m, mine) = match built {
        Ok(m) => (Some(m), Ok(())),
        Err(e) => (None, Err(e)),
    };
    guard.arm("manifest", start)?;
    group.broadcast_object(Some(&m), src)?;
    guard.arm("check", start)?;
    agree(group, "manifest", &mine)?;
    let m = m.expect("the check passed, so the manifest was built");
    for (i, b) in m.buckets.iter().enumerate() {
        if b.bytes == 0 {
            continue; // nothing to send; the receivers skip it too
        }
        let tensors = &mut weights[b.first..b.first + b.count];
        if let [(_, t)] = tensors {
            guard.arm(&format!("bucket {i}"), start)?;
            broadcast_tensor(group, t, src)?;
            continue;
        }
        let mut buf = alloc(group, DType::U8, &[b.bytes])?;
        {
            let mut v = Comm::<B>::view_mut(&mut buf);
            let mut at = 0;
            for (_, t) in tensors.iter() {
                v.write_at(at, &Comm::<B>::view(t))?;
                at += t.nbytes();
            }
        }
        guard.arm(&format!("bucket {i}"), start)?;
        broadcast_tensor(group, &mut buf, src)?;
    }
    guard.arm("verdict", start)?;
    agree(group, "update", &Ok(()))?;
    Ok(TransferStats {
        tensors: m.entries.len(),
        buckets: m.buckets.len(),
        bytes: m.total_bytes(),
        elapsed: start.elapsed(),
    })
}

/// Where a receiver puts what arrives: the model's own tensors, or a sink.
trait Target<B: Backend> {
    /// Entry `i` (alone in its bucket) received straight into its home by `recv`, then checked.
    fn direct(
        &mut self,
        i: usize,
        e: &ManifestEntry,
        recv: &mut dyn FnMut(&mut ViewMut<'_, B>) -> Result<()>,
    ) -> Result<()>;
    /// Entry `i` from bytes `[at, at + its size)` of a bucket: checked, then copied home.
    fn unpack(
        &mut self,
        i: usize,
        e: &ManifestEntry,
        bucket: &View<'_, B>,
        at: usize,
    ) -> Result<()>;
}

fn checksum_error(e: &ManifestEntry, got: u64) -> Error {
    Error::protocol(format!(
        "weights: '{}' failed its checksum ({got:#018x}, the manifest says {:#018x})",
        e.name, e.checksum
    ))
}

/// Checks the checksum of entry `e`'s bytes at `at` in `bucket` before they are unpacked.
fn check_in_bucket(e: &ManifestEntry, bucket: &impl Checksum, at: usize) -> Result<()> {
    match bucket.checksum_range(at, e.nbytes()?)? {
        got if got == e.checksum => Ok(()),
        got => Err(checksum_error(e, got)),
    }
}

/// The model's tensors, lent as views, by name.
struct Views<'m, 'n, 'v, B: Backend> {
    views: &'m mut [(&'n str, ViewMut<'v, B>)],
    by_name: BTreeMap<String, usize>,
}

impl<B: Backend> Views<'_, '_, '_, B> {
    fn home(&mut self, e: &ManifestEntry) -> Result<usize> {
        self.by_name
            .get(&e.name)
            .copied()
            .ok_or_else(|| Error::invalid(format!("weights: no tensor '{}' to load", e.name)))
    }
}

impl<B: Backend> Target<B> for Views<'_, '_, '_, B>
where
    for<'a, 'b> ViewMut<'a, B>: ByteRanges<View<'b, B>>,
    for<'a> ViewMut<'a, B>: Checksum,
    for<'a> View<'a, B>: Checksum,
{
    fn direct(
        &mut self,
        _: usize,
        e: &ManifestEntry,
        recv: &mut dyn FnMut(&mut ViewMut<'_, B>) -> Result<()>,
    ) -> Result<()> {
        let j = self.home(e)?;
        let v = &mut self.views[j].1;
        recv(v)?;
        match v.checksum_range(0, v.nbytes())? {
            got if got == e.checksum => Ok(()),
            got => Err(checksum_error(e, got)),
        }
    }
    fn unpack(
        &mut self,
        _: usize,
        e: &ManifestEntry,
        bucket: &View<'_, B>,
        at: usize,
    ) -> Result<()> {
        check_in_bucket(e, bucket, at)?;
        let j = self.home(e)?;
        self.views[j].1.read_at(bucket, at)
    }
}

/// Fresh tensors from the pool, each handed to a sink.
struct Sink<'g, B: Backend, F> {
    group: &'g GroupCoordinator<B>,
    sink: F,
}

impl<B: Backend, F: FnMut(&str, B::Tensor) -> Result<()>> Target<B> for Sink<'_, B, F>
where
    for<'a, 'b> ViewMut<'a, B>: ByteRanges<View<'b, B>>,
    for<'a> View<'a, B>: Checksum,
{
    fn direct(
        &mut self,
        _: usize,
        e: &ManifestEntry,
        recv: &mut dyn FnMut(&mut ViewMut<'_, B>) -> Result<()>,
    ) -> Result<()> {
        let mut t = alloc(self.group, e.dtype, &e.shape)?;
        recv(&mut Comm::<B>::view_mut(&mut t))?;
        let got = {
            let v = Comm::<B>::view(&t);
            v.checksum_range(0, t.nbytes())?
        };
        match got == e.checksum {
            true => (self.sink)(&e.name, t),
            false => Err(checksum_error(e, got)),
        }
    }
    fn unpack(
        &mut self,
        _: usize,
        e: &ManifestEntry,
        bucket: &View<'_, B>,
        at: usize,
    ) -> Result<()> {
        check_in_bucket(e, bucket, at)?;
        let mut t = alloc(self.group, e.dtype, &e.shape)?;
        Comm::<B>::view_mut(&mut t).read_at(bucket, at)?;
        (self.sink)(&e.name, t)
    }
}

/// An inference rank's side, into the model's own memory: receives the weights group rank `src`
/// sends, checks the manifest against `model` (each tensor lent as a view, with its name), and
/// writes each tensor into its view, checked against its checksum. Returns the manifest's
/// version and what moved.
///
/// A bucket of several tensors is received into one pooled buffer and unpacked into the views;
/// a tensor alone in its bucket is received straight into its view. A checksum failure is an
/// error on every rank, after the transfer: the views it covers then hold what arrived.
pub fn receive_weights_into<B: Backend>(
    group: &GroupCoordinator<B>,
    src: usize,
    model: &mut [(&str, ViewMut<'_, B>)],
    opts: &TransferOptions,
) -> Result<(u64, TransferStats)>
where
    for<'a, 'b> ViewMut<'a, B>: ByteRanges<View<'b, B>>,
    for<'a> ViewMut<'a, B>: Checksum,
    for<'a> View<'a, B>: Checksum,
{
    let specs: Vec<WeightSpec> = model
        .iter()
        .map(|(n, v)| WeightSpec {
            name: n.to_string(),
            dtype: v.dtype(),
            shape: v.shape().to_vec(),
        })
        .collect();
    let by_name: BTreeMap<String, usize> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.clone(), i))
        .collect();
    // Refused at the check, with every rank, rather than alone before it.
    let model_ok = match by_name.len() == specs.len() {
        true => Ok(()),
        false => Err(Error::invalid(
            "weights: the model lends two tensors of one name",
        )),
    };
    let mut target = Views::<B> {
        views: model,
        by_name,
    };
    receive_impl(group, src, &specs, model_ok, opts, &mut target)
}

/// An inference rank's side, to a sink: as [`receive_weights_into`], but each tensor arrives in
/// a fresh tensor handed to `sink(name, tensor)` in manifest order.
pub fn receive_weights<B: Backend>(
    group: &GroupCoordinator<B>,
    src: usize,
    model: &[WeightSpec],
    opts: &TransferOptions,
    sink: impl FnMut(&str, B::Tensor) -> Result<()>,
) -> Result<(u64, TransferStats)>
where
    for<'a, 'b> ViewMut<'a, B>: ByteRanges<View<'b, B>>,
    for<'a> View<'a, B>: Checksum,
{
    receive_impl(group, src, model, Ok(()), opts, &mut Sink { group, sink })
}

fn receive_impl<B: Backend>(
    group: &GroupCoordinator<B>,
    src: usize,
    model: &[WeightSpec],
    model_ok: Result<()>,
    opts: &TransferOptions,
    target: &mut dyn Target<B>,
) -> Result<(u64, TransferStats)> {
    let start = Instant::now();
    crate::ensure_arg!(
        src != group.rank_in_group() && src < group.world_size(),
        "receive_weights: src {src} must be another rank of the group"
    );
    let guard = DeadlineGuard::new(group.device_communicator(), opts.deadline);
    guard.arm("manifest", start)?;
    let m: Option<Manifest> = group.broadcast_object(None, src)?;
    let checked = match &m {
        None => Err(Error::invalid("the sender could not build a manifest")),
        Some(m) => model_ok.and_then(|()| {
            m.check(opts.bucket_bytes)
                .and_then(|()| check_against_model(m, model, opts.require_all))
        }),
    };
    guard.arm("check", start)?;
    agree(group, "manifest", &checked)?;
    let m = m.expect("every rank accepted a manifest");
    let mut outcome = Ok(());
    for (i, b) in m.buckets.iter().enumerate() {
        let entries = &m.entries[b.first..b.first + b.count];
        if b.bytes == 0 {
            // Nothing travels; empty tensors are still delivered (and checked).
            let empty = alloc(group, DType::U8, &[0])?;
            for (j, e) in entries.iter().enumerate() {
                if outcome.is_ok() {
                    outcome = target.unpack(b.first + j, e, &Comm::<B>::view(&empty), 0);
                }
            }
            continue;
        }
        guard.arm(&format!("bucket {i}"), start)?;
        if b.count == 1 && outcome.is_ok() {
            let e = &entries[0];
            // A failed broadcast ends the transfer here; a failed check waits for the verdict.
            let mut lost: Option<Error> = None;
            let mut recv = |v: &mut ViewMut<'_, B>| -> Result<()> {
                let r = match group.device_communicator() {
                    Some(_) => group.broadcast_in_place(v, src),
                    None => (|| {
                        let mut t = alloc(group, e.dtype, &e.shape)?;
                        broadcast_tensor(group, &mut t, src)?;
                        let tv = Comm::<B>::view(&t);
                        Comm::<B>::copy(&tv, v)
                    })(),
                };
                r.map_err(|err| {
                    let why = err.to_string();
                    lost = Some(err);
                    Error::invalid(why)
                })
            };
            outcome = target.direct(b.first, e, &mut recv);
            if let Some(err) = lost {
                return Err(err);
            }
            continue;
        }
        // Several tensors (or a failed transfer keeping the group in step): one packed buffer.
        let shape: Vec<usize> = match b.count {
            1 => entries[0].shape.clone(),
            _ => vec![b.bytes],
        };
        let dtype = match b.count {
            1 => entries[0].dtype,
            _ => DType::U8,
        };
        let mut buf = alloc(group, dtype, &shape)?;
        broadcast_tensor(group, &mut buf, src)?;
        if outcome.is_err() {
            continue; // the verdict reports the first failure
        }
        let view = Comm::<B>::view(&buf);
        let mut at = 0;
        for (j, e) in entries.iter().enumerate() {
            outcome = target.unpack(b.first + j, e, &view, at);
            if outcome.is_err() {
                break;
            }
            at += e.nbytes()?;
        }
    }
    guard.arm("verdict", start)?;
    agree(group, "update", &outcome)?;
    Ok((
        m.version,
        TransferStats {
            tensors: m.entries.len(),
            buckets: m.buckets.len(),
            bytes: m.total_bytes(),
            elapsed: start.elapsed(),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(sizes: &[usize], limit: usize) -> (Manifest, Vec<HostTensor>) {
        let ts: Vec<HostTensor> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| HostTensor::random(DType::U8, &[n], i as u64))
            .collect();
        let names: Vec<String> = (0..sizes.len()).map(|i| format!("w{i}")).collect();
        let listed: Vec<(&str, DType, &[usize], &[u8])> = names
            .iter()
            .zip(&ts)
            .map(|(n, t)| (n.as_str(), t.dtype(), t.shape(), t.as_bytes()))
            .collect();
        (Manifest::build(7, &listed, limit, usize::MAX).unwrap(), ts)
    }

    #[test]
    fn packing_keeps_whole_tensors_under_the_limit() {
        let runs = |b: Vec<Bucket>| -> Vec<(usize, usize, usize)> {
            b.iter().map(|b| (b.first, b.count, b.bytes)).collect()
        };
        let b = pack(&[3, 3, 3, 10, 1, 0, 2], 6, usize::MAX);
        assert_eq!(runs(b), vec![(0, 2, 6), (2, 1, 3), (3, 1, 10), (4, 3, 3)]);
        assert!(pack(&[], 6, usize::MAX).is_empty());
        // From 3 bytes a tensor travels alone, and nothing joins it.
        let b = pack(&[1, 3, 1, 1, 4, 2], 6, 3);
        assert_eq!(
            runs(b),
            vec![(0, 1, 1), (1, 1, 3), (2, 2, 2), (4, 1, 4), (5, 1, 2)]
        );
    }

    #[test]
    fn buckets_round_trip_and_checksums_catch_flips() {
        use crate::host_comm::HostBackend;
        let (m, ts) = manifest(&[100, 7, 300, 0, 64], 128);
        assert_eq!(m.total_bytes(), 471);
        m.check(128).unwrap(); // the 300-byte tensor travels alone
        assert!(m.check(106).is_err()); // the first bucket holds 100 + 7 bytes
        for b in &m.buckets {
            // Pack as the sender does, unpack into a model's views as a receiver does.
            let mut bucket = HostTensor::zeros(DType::U8, &[b.bytes]);
            let mut at = 0;
            for t in &ts[b.first..b.first + b.count] {
                bucket.view_mut().write_at(at, &t.view()).unwrap();
                at += t.nbytes();
            }
            let entries = &m.entries[b.first..b.first + b.count];
            let mut homes: Vec<HostTensor> = entries
                .iter()
                .map(|e| HostTensor::zeros(e.dtype, &e.shape))
                .collect();
            let mut views: Vec<(&str, HostViewMut<'_>)> = entries
                .iter()
                .zip(homes.iter_mut())
                .map(|(e, h)| (e.name.as_str(), h.view_mut()))
                .collect();
            let by_name = entries
                .iter()
                .enumerate()
                .map(|(i, e)| (e.name.clone(), i))
                .collect();
            let mut target = Views::<HostBackend> {
                views: &mut views,
                by_name,
            };
            let mut at = 0;
            for (j, e) in entries.iter().enumerate() {
                target.unpack(j, e, &bucket.view(), at).unwrap();
                at += e.nbytes().unwrap();
            }
            if b.bytes > 0 {
                let last = b.bytes - 1;
                bucket.as_bytes_mut()[last] ^= 1;
                let e = entries.last().unwrap();
                let at = b.bytes - e.nbytes().unwrap();
                let err = target
                    .unpack(b.count - 1, e, &bucket.view(), at)
                    .unwrap_err()
                    .to_string();
                assert!(err.contains("checksum"), "{err}");
                assert!(target.unpack(0, e, &bucket.view(), b.bytes + 1).is_err());
            }
            drop(views);
            assert_eq!(homes, ts[b.first..b.first + b.count].to_vec());
        }
    }

    #[test]
    fn hostile_manifests_are_refused() {
        let (m, _) = manifest(&[10, 20, 30], 25);
        let mut bad = m.clone();
        bad.buckets[1].bytes += 1;
        assert!(bad.check(usize::MAX).is_err());
        let mut bad = m.clone();
        bad.buckets.pop();
        assert!(bad.check(usize::MAX).is_err());
        let mut bad = m.clone();
        bad.entries[1].name = "w0".into();
        assert!(bad
            .check(usize::MAX)
            .unwrap_err()
            .to_string()
            .contains("twice"));
        let mut bad = m.clone();
        bad.entries[2].shape = vec![usize::MAX, 4];
        assert!(bad.check(usize::MAX).is_err());
    }

    #[test]
    fn the_model_decides_what_may_come() {
        let (m, _) = manifest(&[10, 20], 100);
        let spec = |n: &str, len: usize| WeightSpec {
            name: n.into(),
            dtype: DType::U8,
            shape: vec![len],
        };
        check_against_model(&m, &[spec("w0", 10), spec("w1", 20), spec("w2", 5)], false).unwrap();
        let e = check_against_model(&m, &[spec("w0", 10), spec("w1", 20), spec("w2", 5)], true)
            .unwrap_err();
        assert!(e.to_string().contains("w2"), "{e}");
        let e = check_against_model(&m, &[spec("w0", 10)], false).unwrap_err();
        assert!(e.to_string().contains("no tensor 'w1'"), "{e}");
        let e = check_against_model(&m, &[spec("w0", 10), spec("w1", 21)], false).unwrap_err();
        assert!(e.to_string().contains("[21]"), "{e}");
    }

    #[test]
    fn checksum_sees_every_byte_and_the_length() {
        let a: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let base = checksum64(&a);
        for i in [0, 1, 31, 32, 500, 995, 999] {
            let mut b = a.clone();
            b[i] ^= 0x80;
            assert_ne!(checksum64(&b), base, "byte {i}");
        }
        assert_ne!(checksum64(&a[..999]), base);
        assert_ne!(checksum64(&[0u8; 8]), checksum64(&[0u8; 9]));
    }
}
