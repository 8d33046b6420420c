//! The host group ("cpu group" in vLLM): control-plane collectives of bytes and typed objects.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{Error, Result};

/// Default cap on a typed object's encoded size (64 MiB), checked before anything is allocated.
pub const DEFAULT_MAX_OBJECT_BYTES: usize = 64 << 20;

/// Encodes a typed object (postcard, a compact binary serde format).
pub fn encode_obj<T: Serialize + ?Sized>(obj: &T) -> Result<Vec<u8>> {
    postcard::to_allocvec(obj).map_err(|e| Error::protocol(format!("cannot encode object: {e}")))
}

/// Decodes a typed object, refusing buffers over `max_bytes` and trailing bytes.
pub fn decode_obj<T: DeserializeOwned>(bytes: &[u8], max_bytes: usize) -> Result<T> {
    if bytes.len() > max_bytes {
        return Err(Error::protocol(format!(
            "object of {} bytes exceeds the cap of {max_bytes} bytes",
            bytes.len()
        )));
    }
    let (v, rest) = postcard::take_from_bytes(bytes).map_err(|e| {
        Error::protocol(format!(
            "cannot decode object as {}: {e}",
            std::any::type_name::<T>()
        ))
    })?;
    if !rest.is_empty() {
        return Err(Error::protocol(format!(
            "{} trailing bytes after object of type {}",
            rest.len(),
            std::any::type_name::<T>()
        )));
    }
    Ok(v)
}

/// The host-side control group of a set of ranks: barrier, broadcast, all-gather, gather,
/// send and recv of byte messages. Ranks are ranks *within the group*.
///
/// Every call is bounded by [`HostGroup::timeout`]; a call that cannot complete in time returns
/// [`Error::Timeout`] naming the ranks that did not answer, and a peer that went away is
/// [`Error::PeerLost`]. Implementations: over the store (`dist-store`), shared memory and gloo
/// (`dist-cpu`). Typed objects go through [`HostGroupExt`].
pub trait HostGroup: Send + Sync + std::fmt::Debug {
    /// This process's rank in the group.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn world_size(&self) -> usize;
    /// The deadline each blocking call gets.
    fn timeout(&self) -> Duration;
    /// Returns once every rank has entered the barrier.
    fn barrier(&self) -> Result<()>;
    /// `src` passes `Some(data)`, the others `None`; everyone returns `src`'s bytes.
    fn broadcast_bytes(&self, data: Option<&[u8]>, src: usize) -> Result<Vec<u8>>;
    /// Every rank's bytes, in rank order.
    fn all_gather_bytes(&self, data: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// `dst` gets every rank's bytes in rank order; the others get `None`.
    fn gather_bytes(&self, data: &[u8], dst: usize) -> Result<Option<Vec<Vec<u8>>>> {
        let all = self.all_gather_bytes(data)?;
        Ok((self.rank() == dst).then_some(all))
    }
    /// Sends one message to `dst`; messages between a pair arrive in order.
    fn send_bytes(&self, data: &[u8], dst: usize) -> Result<()>;
    /// Receives the next message from `src`.
    fn recv_bytes(&self, src: usize) -> Result<Vec<u8>>;
    /// Largest typed object this group accepts.
    fn max_object_bytes(&self) -> usize {
        DEFAULT_MAX_OBJECT_BYTES
    }
}

/// Typed-object collectives on any [`HostGroup`]: objects are serde values, never pickles,
/// encoded with postcard and capped at [`HostGroup::max_object_bytes`].
pub trait HostGroupExt: HostGroup {
    /// Broadcasts `obj` from `src` (which passes `Some`).
    fn broadcast_obj<T: Serialize + DeserializeOwned>(
        &self,
        obj: Option<&T>,
        src: usize,
    ) -> Result<T> {
        let bytes = match obj {
            Some(o) if self.rank() == src => Some(encode_obj(o)?),
            None if self.rank() == src => {
                return Err(Error::invalid(
                    "broadcast_obj: the source rank must pass an object",
                ))
            }
            _ => None,
        };
        let got = self.broadcast_bytes(bytes.as_deref(), src)?;
        decode_obj(&got, self.max_object_bytes())
    }
    /// Every rank's object, in rank order.
    fn all_gather_obj<T: Serialize + DeserializeOwned>(&self, obj: &T) -> Result<Vec<T>> {
        let all = self.all_gather_bytes(&encode_obj(obj)?)?;
        all.iter()
            .map(|b| decode_obj(b, self.max_object_bytes()))
            .collect()
    }
    /// `dst` gets every rank's object in rank order.
    fn gather_obj<T: Serialize + DeserializeOwned>(
        &self,
        obj: &T,
        dst: usize,
    ) -> Result<Option<Vec<T>>> {
        match self.gather_bytes(&encode_obj(obj)?, dst)? {
            Some(all) => Ok(Some(
                all.iter()
                    .map(|b| decode_obj(b, self.max_object_bytes()))
                    .collect::<Result<_>>()?,
            )),
            None => Ok(None),
        }
    }
    /// Sends `obj` to `dst`.
    fn send_obj<T: Serialize + ?Sized>(&self, obj: &T, dst: usize) -> Result<()> {
        self.send_bytes(&encode_obj(obj)?, dst)
    }
    /// Receives an object from `src`.
    fn recv_obj<T: DeserializeOwned>(&self, src: usize) -> Result<T> {
        let b = self.recv_bytes(src)?;
        decode_obj(&b, self.max_object_bytes())
    }
}

impl<G: HostGroup + ?Sized> HostGroupExt for G {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_roundtrip_and_caps() {
        let v = (7u32, String::from("tp"), vec![1u8, 2, 3]);
        let b = encode_obj(&v).unwrap();
        let back: (u32, String, Vec<u8>) = decode_obj(&b, 1024).unwrap();
        assert_eq!(back, v);
        assert!(decode_obj::<(u32, String, Vec<u8>)>(&b, 2).is_err());
        let mut extra = b.clone();
        extra.push(0);
        assert!(decode_obj::<(u32, String, Vec<u8>)>(&extra, 1024).is_err());
        // A huge claimed length in a short buffer is an error, not an allocation.
        let hostile = [0xff, 0xff, 0xff, 0xff, 0x0f];
        assert!(decode_obj::<Vec<u8>>(&hostile, 1024).is_err());
    }
}
