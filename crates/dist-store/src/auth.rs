//! The optional shared-secret handshake (our extension of the protocol).
//!
//! With a token configured, the server answers nothing but `VALIDATE` and then `AUTH <token>`
//! on a new connection; a wrong token gets the byte 1 and the connection is closed, any other
//! request first is a dropped connection. Without a token the server accepts `AUTH` from any
//! client (answer 0), so a client configured with a token also works against an open server,
//! and PyTorch clients, which never send `AUTH`, work as before.

use std::path::Path;

use crate::{Error, Result};

/// Compares two secrets in time that depends only on their lengths.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads a token file: its content without the trailing newline; it must not be empty.
/// A file readable by group or others is accepted with a warning.
pub fn read_token_file(path: &Path) -> Result<Vec<u8>> {
    let mut t = std::fs::read(path)
        .map_err(|e| Error::io(format!("read token file {}", path.display()), e))?;
    while t.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        t.pop();
    }
    if t.is_empty() {
        return Err(Error::invalid(format!(
            "token file {} is empty",
            path.display()
        )));
    }
    if t.len() > crate::proto::TORCH_MAX_KEY_LEN {
        return Err(Error::invalid(format!(
            "token in {} is longer than {} bytes",
            path.display(),
            crate::proto::TORCH_MAX_KEY_LEN
        )));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(path) {
            if m.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    "token file is readable by group or others; chmod 600 it"
                );
            }
        }
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ct_eq_compares() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }
}
