//! dist-cuda (being built).
