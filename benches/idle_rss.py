#!/usr/bin/env python3
"""Memory for idle connections, carousel beside HAProxy: each proxy in turn holds N
connections (default 8 000) to one backend, every one of which has carried one short
exchange and then stays idle; the proxy's resident memory is read before and after.

    cargo build --release
    python3 benches/idle_rss.py target/release/carousel [--connections 8000]

Needs haproxy (apt-get install -y haproxy) and a descriptor limit of at least N + 100
for this process (the backend holds its side in a process of its own). Loopback only;
every process it starts is stopped at the end, and so are the connections.
"""

import argparse
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ECHO = os.path.join(HERE, "..", "tests", "load", "echo_server.py")
ADDR = "127.0.0.1"


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def free_port():
    with socket.socket() as s:
        s.bind((ADDR, 0))
        return s.getsockname()[1]


def wait_listening(port, deadline=10.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            socket.create_connection((ADDR, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {ADDR}:{port}")


def carousel(binary, port, backend, workdir):
    state = os.path.join(workdir, "state.yaml")
    host, bport = backend.rsplit(":", 1)
    with open(state, "w") as f:
        f.write(f"""apiVersion: v1
kind: Service
metadata: {{name: idle, namespace: default}}
spec:
  clusterIP: {ADDR}
  ports: [{{name: tcp, protocol: TCP, port: {port}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: idle-1
  namespace: default
  labels: {{kubernetes.io/service-name: idle}}
addressType: IPv4
ports: [{{name: tcp, port: {bport}, protocol: TCP}}]
endpoints:
- addresses: ["{host}"]
  conditions: {{ready: true}}
""")
    return [binary, "run", "--from-file", state,
            "--metrics-bind-address", f"{ADDR}:{free_port()}",
            "--healthz-bind-address", f"{ADDR}:{free_port()}"]


def haproxy(port, backend, workdir, n):
    # As peerbench runs it: mode tcp, one thread.
    cfg = os.path.join(workdir, "haproxy.cfg")
    with open(cfg, "w") as f:
        f.write(f"""global
    nbthread 1
    maxconn {n + 1000}
defaults
    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    maxconn {n + 1000}
frontend fe
    bind {ADDR}:{port}
    default_backend be
backend be
    server b1 {backend}
""")
    return ["haproxy", "-db", "-f", cfg]


def measure(name, argv, port, n):
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=raise_nofile)
    conns = []
    try:
        wait_listening(port)
        time.sleep(0.5)
        before = rss_kib(proc.pid)
        for i in range(n):
            c = socket.create_connection((ADDR, port), timeout=10)
            c.sendall(b"ping\n")
            if c.recv(16) != b"ping\n":
                raise RuntimeError(f"{name}: connection {i} did not echo")
            conns.append(c)
        time.sleep(1.0)
        after = rss_kib(proc.pid)
        return before, after
    finally:
        for c in conns:
            c.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def raise_nofile():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("carousel", help="path to the carousel binary")
    ap.add_argument("--connections", type=int, default=8000)
    args = ap.parse_args()
    raise_nofile()
    n = args.connections
    with tempfile.TemporaryDirectory() as workdir:
        echo = subprocess.Popen([sys.executable, ECHO, f"{ADDR}:0"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        try:
            ready = echo.stdout.readline().split()
            if not ready or ready[0] != "ready":
                sys.exit("the echo backend did not start")
            backend = ready[1]
            results = {}
            for name in ("haproxy", "carousel"):
                port = free_port()
                argv = (haproxy(port, backend, workdir, n) if name == "haproxy"
                        else carousel(args.carousel, port, backend, workdir))
                results[name] = measure(name, argv, port, n)
        finally:
            echo.stdin.close()
            echo.wait(timeout=10)
    print(f"{n} idle connections (each carried one 5-byte echo), resident memory:")
    print(f"{'proxy':<10} {'before MiB':>10} {'after MiB':>10} {'per conn KiB':>13}")
    for name, (before, after) in results.items():
        print(f"{name:<10} {before / 1024:>10.1f} {after / 1024:>10.1f} "
              f"{(after - before) / n:>13.2f}")
    h, c = results["haproxy"][1], results["carousel"][1]
    print(f"carousel / haproxy (after): {c / h:.2f}")


if __name__ == "__main__":
    main()
