//! dist-store (being built).
