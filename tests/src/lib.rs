//! Gaia multi-node and multi-process scenarios. The scenarios live in `tests/it/`; this library
//! holds the helpers they share.
