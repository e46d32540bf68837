//! The node data plane: nftables rules that redirect Service traffic to carousel's
//! redirect listener (`--proxy-mode nftables`), and their removal.

pub mod netlink;
pub mod nftables;
