//! Device-side gather and scatter of token rows of a paged KV cache (NHD or HND).
