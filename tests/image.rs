//! The container image: the repository's Dockerfile, unchanged, built with podman and
//! run the way a user runs it. Needs root, podman with runc, and debootstrap (CI
//! installs them).
//!
//! There is no container registry here, so the base images the Dockerfile names are
//! made locally first: `debian:bookworm-slim` from `debootstrap --variant=minbase
//! bookworm`, and `rust:1-slim-bookworm` on top of it with gcc and this machine's Rust
//! toolchain. Both carry this machine's CA certificates, so that cargo in the build stage
//! reaches the crate registry. Everything lives in a podman storage of this test's own
//! (`--root`), removed at the end, pass or fail: no image or container outlives it, and
//! no layer is reused from an earlier run.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{echo_server, Ep, Svc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const IMAGE: &str = "localhost/carousel:image-test";
/// The Debian release of the Dockerfile's base images.
const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";

fn check(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A podman with a storage of its own under `dir`, runc, and a containers.conf that
/// sets no default ulimits (this sandbox refuses to raise them).
struct Podman {
    dir: tempfile::TempDir,
}

impl Podman {
    fn new() -> Podman {
        for tool in ["podman", "runc", "debootstrap"] {
            assert!(
                Command::new("sh")
                    .args(["-c", &format!("command -v {tool}")])
                    .stdout(Stdio::null())
                    .status()
                    .unwrap()
                    .success(),
                "{tool} is missing (CI installs it: apt-get install podman runc debootstrap)"
            );
        }
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
        std::fs::write(
            dir.path().join("containers.conf"),
            "[containers]\ndefault_ulimits = []\n",
        )
        .unwrap();
        Podman { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn cmd(&self) -> Command {
        let mut cmd = Command::new("podman");
        cmd.env("CONTAINERS_CONF", self.path("containers.conf"))
            .arg("--root")
            .arg(self.path("storage"))
            .arg("--runroot")
            .arg(self.path("run"))
            .args(["--runtime", "runc"]);
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        check(self.cmd().args(args))
    }

    /// `podman build` of `containerfile` in `context`, tagged `tag`: base images only
    /// from this storage, RUN steps on the host's network (the package and crate
    /// registries).
    fn build(&self, tag: &str, containerfile: &Path, context: &Path) {
        self.run(&[
            "build",
            "--pull=never",
            "--network",
            "host",
            "--quiet",
            "-t",
            tag,
            "-f",
            containerfile.to_str().unwrap(),
            context.to_str().unwrap(),
        ]);
    }

    /// An image's size in bytes.
    fn size(&self, image: &str) -> f64 {
        stdout(&self.run(&["image", "inspect", "--format", "{{.Size}}", image]))
            .parse()
            .expect("image size")
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Containers, images, layers and their mounts; the directory goes with `dir`.
        let _ = self
            .cmd()
            .args(["system", "reset", "--force"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// `debian:bookworm-slim`: a minbase debootstrap, trimmed as the slim image is (no
/// package cache, lists or documentation).
fn make_debian(podman: &Podman) {
    let rootfs = podman.path("rootfs");
    check(
        Command::new("debootstrap")
            .args(["--variant=minbase", SUITE])
            .arg(&rootfs)
            .arg(MIRROR)
            .stdout(Stdio::null()),
    );
    for dir in [
        "var/cache/apt/archives",
        "var/lib/apt/lists",
        "usr/share/doc",
        "usr/share/man",
        "usr/share/locale",
    ] {
        let dir = rootfs.join(dir);
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path).unwrap();
            } else {
                std::fs::remove_file(&path).unwrap();
            }
        }
    }
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .expect("tar");
    check(
        podman
            .cmd()
            .args(["import", "-", "docker.io/library/debian:bookworm-slim"])
            .stdin(tar.stdout.take().expect("tar's output"))
            .stdout(Stdio::null()),
    );
    assert!(tar.wait().unwrap().success(), "tar of the rootfs");
    std::fs::remove_dir_all(&rootfs).unwrap();
}

/// `rust:1-slim-bookworm`: the Debian image with gcc, CA certificates and the toolchain
/// that runs this test, laid out as the official image has it (cargo on PATH,
/// CARGO_HOME=/usr/local/cargo).
fn make_rust(podman: &Podman) {
    let context = podman.path("rust");
    std::fs::create_dir(&context).unwrap();
    let sysroot = stdout(&check(Command::new("rustc").args(["--print", "sysroot"])));
    for part in ["bin", "lib", "libexec"] {
        check(
            Command::new("cp")
                .arg("-a")
                .arg(Path::new(&sysroot).join(part))
                .arg(context.join(part)),
        );
    }
    std::fs::copy(
        "/etc/ssl/certs/ca-certificates.crt",
        context.join("ca-certificates.crt"),
    )
    .expect("this machine's CA certificates");
    std::fs::write(
        context.join("Containerfile"),
        "FROM docker.io/library/debian:bookworm-slim\n\
         RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev ca-certificates \\\n\
             && apt-get clean && rm -rf /var/lib/apt/lists/*\n\
         COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt\n\
         COPY bin /usr/local/rust/bin\n\
         COPY lib /usr/local/rust/lib\n\
         COPY libexec /usr/local/rust/libexec\n\
         ENV CARGO_HOME=/usr/local/cargo \
             PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n",
    )
    .unwrap();
    podman.build(
        "docker.io/library/rust:1-slim-bookworm",
        &context.join("Containerfile"),
        &context,
    );
    std::fs::remove_dir_all(&context).unwrap();
}

/// Builds the Dockerfile, then runs the image as a user would: its version, the demo
/// with no flags at all, and `run --from-file` in the host's network forwarding a real
/// connection; it runs as the non-root user it declares.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dockerfile_builds_an_image_that_runs() {
    let podman = Podman::new();
    make_debian(&podman);
    make_rust(&podman);

    let started = Instant::now();
    podman.build(IMAGE, &Path::new(ROOT).join("Dockerfile"), Path::new(ROOT));
    let (size, base) = (
        podman.size(IMAGE),
        podman.size("docker.io/library/debian:bookworm-slim"),
    );
    println!(
        "image built in {:.0} s: {:.1} MB, {:.1} MB of them the Debian base",
        started.elapsed().as_secs_f64(),
        size / 1e6,
        base / 1e6
    );

    // The user it declares, and that it really runs as.
    let user = stdout(&podman.run(&["image", "inspect", "--format", "{{.Config.User}}", IMAGE]));
    assert_eq!(user, "65532:65532");
    let id = stdout(&podman.run(&["run", "--rm", "--entrypoint", "id", IMAGE, "-u"]));
    assert_eq!(id, "65532");

    // No extra flags: no capability is needed to start the binary.
    let version = stdout(&podman.run(&["run", "--rm", IMAGE, "--version"]));
    assert_eq!(version, format!("carousel {}", env!("CARGO_PKG_VERSION")));
    let demo = stdout(&podman.run(&["run", "--rm", IMAGE, "demo", "--connections", "200"]));
    assert!(
        demo.contains("carousel_connections_total") && demo.contains("kubechaos"),
        "the demo's report:\n{demo}"
    );

    // A Service on the host's loopback, served from the container.
    let (backend, _echo) = echo_server("127.0.0.1").await;
    let service_port = common::refusing_addr("127.94.0.1").await.port();
    let svc = Svc::new(
        "image-test",
        "127.94.0.1",
        service_port,
        vec![Ep::ready(backend, "echo-0")],
    );
    let state = podman.path("state.yaml");
    std::fs::write(&state, svc.state()).unwrap();
    let name = format!("carousel-image-test-{}", std::process::id());
    let mut container = podman
        .cmd()
        .args(["run", "--rm", "--name", &name, "--network", "host", "-v"])
        .arg(format!("{}:/state.yaml:ro", state.display()))
        .args([
            IMAGE,
            "run",
            "--from-file",
            "/state.yaml",
            "--metrics-bind-address",
            "127.0.0.1:0",
            "--healthz-bind-address",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("podman run");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut stream = loop {
        match tokio::net::TcpStream::connect(svc.addr()).await {
            Ok(stream) => break stream,
            Err(e) => {
                if let Some(status) = container.try_wait().unwrap() {
                    let mut err = String::new();
                    std::io::Read::read_to_string(&mut container.stderr.take().unwrap(), &mut err)
                        .unwrap();
                    panic!(
                        "the container ended ({status}) before serving {}:\n{err}",
                        svc.addr()
                    );
                }
                assert!(
                    Instant::now() < deadline,
                    "{} never accepted: {e}",
                    svc.addr()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    stream.write_all(b"through the image").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    stream.read_to_end(&mut echoed).await.unwrap();
    assert_eq!(echoed, b"through the image");

    podman.run(&["stop", "--time", "10", &name]);
    let status = container.wait().unwrap();
    assert!(
        status.success(),
        "carousel in the container exited {status}"
    );
}
