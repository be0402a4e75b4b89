//! Integration tests of gaia-protocol: property round trips of every wire type, fuzzing of every
//! decoder with an allocation meter, and signature properties.

mod alloc_meter;
mod fuzz;
mod roundtrip;
mod signing;

#[global_allocator]
static ALLOCATOR: alloc_meter::Meter = alloc_meter::Meter;
