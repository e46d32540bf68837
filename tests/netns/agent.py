#!/usr/bin/env python3
"""Pods and clients for the network-namespace tests, run inside a namespace with
`ip netns exec`. Standard library only.

  agent.py serve NAME PORT            answer every connection with NAME, forever
  agent.py ask HOST PORT COUNT [SRC...]  COUNT connections (round-robin over the source
                                      addresses), print JSON {source: {pod: n}, "errors": n}
  agent.py get URL                    print the HTTP status and body of one GET
"""
import json
import socket
import sys
import threading
import urllib.request


def serve(name, port):
    srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    srv.bind(("::", int(port)))
    srv.listen(512)
    reply = (name + "\n").encode()

    def handle(conn):
        with conn:
            conn.settimeout(5)
            try:
                conn.recv(4096)
                conn.sendall(reply)
            except OSError:
                pass

    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def ask(host, port, count, sources):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    seen = {}
    errors = 0
    last_error = ""
    for i in range(int(count)):
        src = sources[i % len(sources)] if sources else None
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                if src:
                    s.bind((src, 0))
                s.connect((host, int(port)))
                s.sendall(b"hello\n")
                data = b""
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            pod = data.decode().strip()
            if not pod:
                raise OSError("empty answer")
            by_pod = seen.setdefault(src or "-", {})
            by_pod[pod] = by_pod.get(pod, 0) + 1
        except OSError as e:
            errors += 1
            last_error = str(e)
    print(json.dumps({"seen": seen, "errors": errors, "last_error": last_error}))


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            print(r.status)
            print(r.read().decode())
    except urllib.error.HTTPError as e:
        print(e.code)
    except OSError as e:
        print(0)
        print(e)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "serve":
        serve(*args)
    elif cmd == "ask":
        ask(args[0], args[1], args[2], args[3:])
    elif cmd == "get":
        get(args[0])
    else:
        sys.exit(f"unknown command {cmd}")
