//! dist-cpu (being built).
