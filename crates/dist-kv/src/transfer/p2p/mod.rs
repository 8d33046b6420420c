//! P2P (placeholder while writing)
