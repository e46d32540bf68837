//! The lab: in-process pods and clients that drive carousel's real data path, for
//! `carousel demo` (and the balancer bench).

pub mod backend;
pub mod demo;
