//! dist-rocm (being built).
