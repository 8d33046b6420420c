//! dist-kv (being built).
