//! Peer authentication on the P2P control channel: a challenge-response over a shared secret.
//!
//! When the engine has a [`Secret`], every connection proves both ways that its ends hold it,
//! and the secret itself never crosses the wire:
//!
//! 1. the initiator sends `Hello` with a fresh 32-byte nonce;
//! 2. the acceptor answers `HelloAck` with its own fresh nonce and
//!    `HMAC-SHA256(secret, "acceptor" ‖ Hello ‖ acceptor nonce)`, which the initiator checks
//!    before it sends anything else (so it never talks to an impostor listening at a peer's
//!    address);
//! 3. the initiator sends `Auth` with `HMAC-SHA256(secret, "initiator" ‖ Hello ‖ acceptor
//!    nonce)`, which the acceptor checks before it opens the data link or reads any request.
//!
//! Both proofs cover the initiator's whole `Hello` (its nonce, address, data path and link
//! set-up bytes) and the acceptor's nonce, so neither can be replayed on another connection or
//! reflected back. This authenticates the peer at connect time; it does not encrypt or
//! integrity-protect the stream afterwards (see docs/SECURITY.md).
//!
//! The secret comes from [`EngineConfig::secret`](super::EngineConfig::secret) or, when that
//! is `None`, from the file named by `DIST_KV_P2P_TOKEN_FILE`, else `DIST_STORE_TOKEN_FILE` (the
//! job's store token, which `dist run --token-file` passes to its ranks).

use std::path::Path;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::transfer::error::{Error, Result};

/// Bytes of each side's nonce.
pub const NONCE_BYTES: usize = 32;
/// Bytes of a proof (HMAC-SHA256).
pub const PROOF_BYTES: usize = 32;
/// Longest secret accepted.
pub const MAX_SECRET_BYTES: usize = 4096;
/// The P2P connector's own secret file.
pub const SECRET_FILE_ENV: &str = "DIST_KV_P2P_TOKEN_FILE";
/// The job's store token file, used when [`SECRET_FILE_ENV`] is not set.
pub const STORE_TOKEN_FILE_ENV: &str = "DIST_STORE_TOKEN_FILE";

/// A shared secret. Its `Debug` does not show it; equality runs in time that depends only on
/// the lengths.
#[derive(Clone)]
pub struct Secret(Arc<[u8]>);

impl Secret {
    /// A secret of these bytes (not empty, at most [`MAX_SECRET_BYTES`]).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self> {
        let b: Vec<u8> = bytes.into();
        if b.is_empty() || b.len() > MAX_SECRET_BYTES {
            return Err(Error::invalid(format!(
                "a shared secret of {} bytes: it must have 1 to {MAX_SECRET_BYTES}",
                b.len()
            )));
        }
        Ok(Secret(b.into()))
    }

    /// Reads a secret file as `dist-store` reads its token file: the content without its
    /// trailing newline, not empty; a file that group or others can read is accepted with a
    /// warning.
    pub fn from_file(path: &Path) -> Result<Self> {
        let mut t = std::fs::read(path)
            .map_err(|e| Error::io(format!("read secret file {}", path.display()), e))?;
        while t.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            t.pop();
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(m) = std::fs::metadata(path) {
                if m.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(path = %path.display(),
                        "secret file is readable by group or others; chmod 600 it");
                }
            }
        }
        Secret::new(t).map_err(|e| Error::invalid(format!("secret file {}: {e}", path.display())))
    }

    /// The secret of the file `DIST_KV_P2P_TOKEN_FILE` names, else of `DIST_STORE_TOKEN_FILE`,
    /// else `None`.
    pub fn from_env() -> Result<Option<Self>> {
        for var in [SECRET_FILE_ENV, STORE_TOKEN_FILE_ENV] {
            if let Some(p) = std::env::var_os(var).filter(|p| !p.is_empty()) {
                return Secret::from_file(Path::new(&p))
                    .map(Some)
                    .map_err(|e| Error::invalid(format!("{var}: {e}")));
            }
        }
        Ok(None)
    }

    fn mac(&self, label: &[u8], hello: &[u8], acceptor_nonce: &[u8]) -> Hmac<Sha256> {
        // Any key length is valid for HMAC.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        m.update(label);
        m.update(&(hello.len() as u64).to_le_bytes());
        m.update(hello);
        m.update(acceptor_nonce);
        m
    }

    /// The acceptor's proof for the initiator's `Hello` frame body and the acceptor's nonce.
    pub(crate) fn acceptor_proof(&self, hello: &[u8], acceptor_nonce: &[u8]) -> Vec<u8> {
        self.mac(b"dist-kv p2p v3 acceptor", hello, acceptor_nonce)
            .finalize()
            .into_bytes()
            .to_vec()
    }

    /// The initiator's proof.
    pub(crate) fn initiator_proof(&self, hello: &[u8], acceptor_nonce: &[u8]) -> Vec<u8> {
        self.mac(b"dist-kv p2p v3 initiator", hello, acceptor_nonce)
            .finalize()
            .into_bytes()
            .to_vec()
    }

    /// Checks the acceptor's proof (in constant time).
    pub(crate) fn check_acceptor(&self, hello: &[u8], acceptor_nonce: &[u8], proof: &[u8]) -> bool {
        self.mac(b"dist-kv p2p v3 acceptor", hello, acceptor_nonce)
            .verify_slice(proof)
            .is_ok()
    }

    /// Checks the initiator's proof (in constant time).
    pub(crate) fn check_initiator(
        &self,
        hello: &[u8],
        acceptor_nonce: &[u8],
        proof: &[u8],
    ) -> bool {
        self.mac(b"dist-kv p2p v3 initiator", hello, acceptor_nonce)
            .verify_slice(proof)
            .is_ok()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len()
            && self
                .0
                .iter()
                .zip(other.0.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}
impl Eq for Secret {}

/// A fresh nonce from the operating system's random source.
pub(crate) fn nonce() -> Result<Vec<u8>> {
    let mut n = vec![0u8; NONCE_BYTES];
    getrandom::getrandom(&mut n)
        .map_err(|e| Error::Backend(format!("the OS random source failed: {e}")))?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_the_hello_the_nonce_and_the_role() {
        let s = Secret::new(b"job secret".to_vec()).unwrap();
        let other = Secret::new(b"another secret".to_vec()).unwrap();
        let (hello, n) = (b"hello bytes".as_slice(), nonce().unwrap());
        let a = s.acceptor_proof(hello, &n);
        let i = s.initiator_proof(hello, &n);
        assert_eq!((a.len(), n.len()), (PROOF_BYTES, NONCE_BYTES));
        assert!(s.check_acceptor(hello, &n, &a));
        assert!(s.check_initiator(hello, &n, &i));
        // A reflected proof, another Hello, another nonce, another secret: all refused.
        assert!(!s.check_initiator(hello, &n, &a));
        assert!(!s.check_acceptor(b"hello bytez", &n, &a));
        assert!(!s.check_acceptor(hello, &nonce().unwrap(), &a));
        assert!(!other.check_acceptor(hello, &n, &a));
        assert!(!s.check_acceptor(hello, &n, &a[..31]));
        assert_ne!(nonce().unwrap(), n, "nonces are fresh");
    }

    #[test]
    fn secrets_are_checked_and_never_printed() {
        assert!(Secret::new(Vec::new()).is_err());
        assert!(Secret::new(vec![1; MAX_SECRET_BYTES + 1]).is_err());
        let s = Secret::new(b"hunter2".to_vec()).unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_eq!(s, Secret::new(b"hunter2".to_vec()).unwrap());
        assert_ne!(s, Secret::new(b"hunter3".to_vec()).unwrap());
        let p = std::env::temp_dir().join(format!("dist-kv-secret-{}", std::process::id()));
        std::fs::write(&p, b"hunter2\n").unwrap();
        assert_eq!(Secret::from_file(&p).unwrap(), s);
        std::fs::write(&p, b"\n").unwrap();
        assert!(Secret::from_file(&p).is_err());
        std::fs::remove_file(&p).ok();
    }
}
