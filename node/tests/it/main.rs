//! Integration tests of the `gaia` binary, run as a real process: one node at a time. The
//! scenarios with several nodes or processes are in the `gaia-tests` crate (`tests/it/`),
//! whose library starts the node for these tests too.

mod api;
mod bad_input;
mod browser;
mod conformance;
mod kb;
mod mcp;
mod models;
