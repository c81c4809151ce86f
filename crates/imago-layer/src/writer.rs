//! The reproducible layer writer (owned by the builder work; see lib.rs).
