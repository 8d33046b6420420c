//! dist facade
