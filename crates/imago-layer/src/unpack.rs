//! Applying layer tar streams to a directory (owned by the unpacker work; see lib.rs).
