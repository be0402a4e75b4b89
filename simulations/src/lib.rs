//! Gaia simulations: deterministic, event-driven runs of the node's own sans-IO decision logic
//! (membership, routing, failover) at scales that real swarms in one process cannot reach.
