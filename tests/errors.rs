//! The common mistakes, as a user makes them: each ends carousel with one line that says
//! what is wrong and what to do. nftables mode runs in a network namespace of its own
//! (`unshare -n`), which goes away with the process, so nothing is left on the host.

use std::process::Output;

use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_carousel");

/// A state file with one Service and no endpoints, in `dir`.
fn state(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let path = dir.path().join("state.yaml");
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
         spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n",
    )
    .unwrap();
    path
}

/// `carousel run --proxy-mode nftables` in a fresh network namespace, through `prefix`
/// (a command and its arguments that run what follows, such as setpriv).
async fn nftables_run(prefix: &[&str], env_path: Option<&str>) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let state = state(&dir);
    let mut cmd = Command::new(which("unshare"));
    cmd.arg("-n").args(prefix).arg(BIN).args([
        "run",
        "--proxy-mode",
        "nftables",
        "--node-name",
        "n1",
        "--metrics-bind-address",
        "127.0.0.1:0",
        "--healthz-bind-address",
        "127.0.0.1:0",
        "--from-file",
    ]);
    cmd.arg(&state);
    if let Some(path) = env_path {
        cmd.env("PATH", path);
    }
    tokio::time::timeout(std::time::Duration::from_secs(30), cmd.output())
        .await
        .expect("carousel stops by itself")
        .unwrap()
}

/// The one `Error:` line of a failed run, with its exit code.
fn error_line(out: &Output) -> (Option<i32>, String) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("Error:")).collect();
    assert_eq!(errors.len(), 1, "one error line in:\n{stderr}");
    (out.status.code(), errors[0].to_string())
}

#[tokio::test]
async fn nftables_mode_without_cap_net_admin_says_what_to_grant() {
    let out = nftables_run(
        &[
            "setpriv",
            "--inh-caps=-net_admin",
            "--bounding-set=-net_admin",
        ],
        None,
    )
    .await;
    let (code, line) = error_line(&out);
    assert_eq!(code, Some(1), "{line}");
    assert_eq!(
        line,
        "Error: nftables mode needs CAP_NET_ADMIN to program nftables rules and policy \
         routes, and this process lacks it: run carousel as root, or grant it, in \
         Kubernetes with securityContext.capabilities.add: [NET_ADMIN] as deploy/ does"
    );
}

#[tokio::test]
async fn nftables_mode_without_nft_says_what_to_install() {
    // `ip` (iproute2) is there, `nft` is not.
    let bin = tempfile::tempdir().unwrap();
    let ip = which("ip");
    std::os::unix::fs::symlink(ip, bin.path().join("ip")).unwrap();
    let path = bin.path().display().to_string();
    let out = nftables_run(&[], Some(&path)).await;
    let (code, line) = error_line(&out);
    assert_eq!(code, Some(1), "{line}");
    assert_eq!(
        line,
        "Error: nftables mode runs `nft`, which is not on PATH: install it (Debian: apt-get install nftables)"
    );
}

#[tokio::test]
async fn nftables_rules_that_cannot_be_programmed_at_start_end_carousel_with_nfts_reason() {
    // An nft(8) that refuses every script, as a kernel without nf_tables would.
    let bin = tempfile::tempdir().unwrap();
    let nft = bin.path().join("nft");
    std::fs::write(
        &nft,
        "#!/bin/sh\ncat >/dev/null\necho 'Error: Could not process rule: No such file or directory' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&nft, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap()
    );
    let out = nftables_run(
        &["sh", "-c", "ip link set lo up && exec \"$0\" \"$@\""],
        Some(&path),
    )
    .await;
    let (code, line) = error_line(&out);
    assert_eq!(code, Some(1), "{line}");
    assert_eq!(
        line,
        "Error: cannot program this node's first nftables rules: nft refused the \
         transaction: Error: Could not process rule: No such file or directory"
    );
}

#[tokio::test]
async fn a_telemetry_port_in_use_names_the_flag_that_moves_it() {
    let held = std::net::TcpListener::bind("127.99.30.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let state = state(&dir);
    for (flag, other, what) in [
        (
            "--metrics-bind-address",
            "--healthz-bind-address",
            "metrics",
        ),
        ("--healthz-bind-address", "--metrics-bind-address", "health"),
    ] {
        let out = Command::new(BIN)
            .args(["run", "--from-file"])
            .arg(&state)
            .args([flag, &addr, other, "127.99.30.2:0"])
            .output()
            .await
            .unwrap();
        let (code, line) = error_line(&out);
        assert_eq!(code, Some(1), "{line}");
        assert!(
            line.starts_with(&format!(
                "Error: cannot serve {what} on {addr}: Address already in use"
            )),
            "{line}"
        );
        assert!(
            line.ends_with(&format!(
                "another process listens there: choose another address with {flag}"
            )),
            "{line}"
        );
    }
}

#[tokio::test]
async fn a_usage_error_exits_2_naming_the_value_and_the_choices() {
    let out = Command::new(BIN)
        .args(["bench", "--scenario", "uniformm"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with(
            "error: invalid value 'uniformm' for '--scenario <NAME|all>': unknown scenario \
             (known: uniform, slow-pod"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("the bench failed"), "{stderr}");
}

fn which(tool: &str) -> std::path::PathBuf {
    let path = std::env::var_os("PATH").unwrap();
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{tool} on PATH"))
}
