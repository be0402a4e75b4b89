//! Multi-node and multi-process scenarios: real `gaia` processes (the binary that
//! [`gaia_tests::gaia_bin`] finds) and real libp2p swarms.

mod cluster;
mod nat;
mod swarm;
mod swarm_hardening;
