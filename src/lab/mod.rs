//! The lab: in-process pods and clients that drive carousel's real data path, for
//! `carousel demo` and `carousel bench`.

pub mod backend;
pub mod bench;
pub mod demo;
