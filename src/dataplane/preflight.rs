//! What nftables mode needs from the host, checked before anything is bound or
//! programmed, so that a missing capability or tool is one clear line at start rather
//! than a netlink `Operation not permitted` and an unready proxy.

use std::path::Path;

/// CAP_NET_ADMIN's bit in the capability sets (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;

/// The tools nftables mode runs, with the Debian package that has each.
const TOOLS: [(&str, &str); 2] = [("nft", "nftables"), ("ip", "iproute2")];

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "nftables mode needs CAP_NET_ADMIN to program nftables rules and policy routes, \
         and this process lacks it: run carousel as root, or grant it, in Kubernetes with \
         securityContext.capabilities.add: [NET_ADMIN] as deploy/ does"
    )]
    NoNetAdmin,
    #[error(
        "nftables mode runs `{tool}`, which is not on PATH: install it (Debian: \
         apt-get install {package})"
    )]
    Missing {
        tool: &'static str,
        package: &'static str,
    },
}

/// The effective capability set of a `/proc/<pid>/status` text (`CapEff:`, in hex).
pub fn effective_capabilities(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// Whether nftables mode can work with these capabilities and tools: pure, for tests.
pub fn check(
    capabilities: Option<u64>,
    on_path: impl Fn(&str) -> bool,
) -> Result<(), PreflightError> {
    // Unknown (no /proc): the first programming says what is wrong.
    if capabilities.is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) == 0) {
        return Err(PreflightError::NoNetAdmin);
    }
    match TOOLS.iter().find(|(tool, _)| !on_path(tool)) {
        Some(&(tool, package)) => Err(PreflightError::Missing { tool, package }),
        None => Ok(()),
    }
}

/// Checks this process and its PATH.
pub fn nftables_mode() -> Result<(), PreflightError> {
    let status = std::fs::read_to_string("/proc/self/status").ok();
    let path = std::env::var_os("PATH").unwrap_or_default();
    check(status.as_deref().and_then(effective_capabilities), |tool| {
        std::env::split_paths(&path).any(|dir| is_executable(&dir.join(tool)))
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_effective_set_is_read_from_proc_status() {
        let status = "Name:\tcarousel\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective_capabilities(status), Some(0x1ff_ffff_ffff));
        assert_eq!(effective_capabilities("Name:\tx\n"), None);
    }

    #[test]
    fn without_net_admin_or_a_tool_it_says_what_to_grant_or_install() {
        let all = |_: &str| true;
        assert_eq!(check(Some(1 << CAP_NET_ADMIN), all), Ok(()));
        assert_eq!(check(None, all), Ok(()));
        let err = check(Some(0x1ff_ffff_ffff & !(1 << CAP_NET_ADMIN)), all).unwrap_err();
        assert_eq!(err, PreflightError::NoNetAdmin);
        assert!(
            err.to_string().contains("capabilities.add: [NET_ADMIN]"),
            "{err}"
        );
        let err = check(Some(u64::MAX), |tool| tool != "nft").unwrap_err();
        assert_eq!(
            err.to_string(),
            "nftables mode runs `nft`, which is not on PATH: install it (Debian: apt-get install nftables)"
        );
    }
}
