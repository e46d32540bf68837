//! The node data plane: nftables rules that intercept Service traffic for carousel's
//! transparent listener (`--proxy-mode nftables`), the policy route that delivers it, and
//! their removal.

pub(crate) mod conntrack;
pub(crate) mod elements;
pub(crate) mod netlink;
pub mod nftables;
pub mod policy_route;
pub mod preflight;
