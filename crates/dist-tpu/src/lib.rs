//! dist-tpu (being built).
