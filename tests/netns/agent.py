#!/usr/bin/env python3
"""Pods and clients for the network-namespace tests, run inside a namespace with
`ip netns exec`. Standard library only.

  agent.py serve NAME PORT            answer every connection with NAME, forever
  agent.py peer NAME PORT             answer every connection with NAME and the address
                                      it came from, forever
  agent.py ask HOST PORT COUNT [SRC...]  COUNT connections (round-robin over the source
                                      addresses), print JSON {"seen": {source: {pod: n}},
                                      "errors": n, "kinds": {kind: n}}, kind one of refused,
                                      reset, timeout, other; $AGENT_TIMEOUT seconds each (5)
  agent.py dns HOST PORT COUNT [SRC...]  COUNT DNS queries (type A, who.test) over UDP,
                                      each from a port of its own (round-robin over the
                                      source addresses); print JSON {"seen": {source:
                                      {address answered: n}}, "errors": n}; type AAAA
                                      with AGENT_QTYPE=AAAA
  agent.py http HOST PORT COUNT [SRC...]  as ask, each connection an HTTP/1.0 GET /; the
                                      body of a 200 answer counts as the pod's name
  agent.py get URL                    print the HTTP status and body of one GET
  agent.py echo PORT                  echo every connection back until it half-closes
  agent.py churn HOST PORT SECONDS RATE  new connections at RATE a second for SECONDS,
                                      each asks once; print JSON {"ok": n, "errors": n}
  agent.py stream HOST PORT BYTES SECONDS  one connection that sends BYTES over SECONDS
                                      and checks that the echo is the same bytes; print
                                      JSON {"sent": n, "received": n, "same": bool}
"""
import hashlib
import json
import os
import time
import socket
import sys
import threading
import urllib.request


def listen_forever(port, handle):
    """Serve every connection on PORT (IPv4 and IPv6) with HANDLE, on a thread each."""
    srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    srv.bind(("::", int(port)))
    srv.listen(512)
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def serve(name, port):
    reply = (name + "\n").encode()

    def handle(conn):
        with conn:
            conn.settimeout(5)
            try:
                conn.recv(4096)
                conn.sendall(reply)
            except OSError:
                pass

    listen_forever(port, handle)


def peer(name, port):
    def handle(conn):
        with conn:
            conn.settimeout(5)
            try:
                conn.recv(4096)
                addr = conn.getpeername()[0].removeprefix("::ffff:")
                conn.sendall(f"{name} {addr}\n".encode())
            except OSError:
                pass

    listen_forever(port, handle)


HELLO = b"hello\n"
HTTP_GET = b"GET / HTTP/1.0\r\nHost: carousel.test\r\n\r\n"


def exchange(family, host, port, src=None, request=HELLO):
    """One connection: send REQUEST, read the answer to its end; the answer, stripped
    (of an HTTP request: the body of a 200 answer)."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(float(os.environ.get("AGENT_TIMEOUT", "5")))
        if src:
            s.bind((src, 0))
        s.connect((host, int(port)))
        s.sendall(request)
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    answer = data.decode()
    if request == HTTP_GET:
        head, _, answer = answer.partition("\r\n\r\n")
        if not head.startswith("HTTP/1.1 200"):
            raise OSError(f"HTTP answer {head.splitlines()[:1]}")
    answer = answer.strip()
    if not answer:
        raise OSError("empty answer")
    return answer


def ask(host, port, count, sources, request=HELLO):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    seen = {}
    errors = 0
    kinds = {}
    last_error = ""
    for i in range(int(count)):
        src = sources[i % len(sources)] if sources else None
        try:
            pod = exchange(family, host, port, src, request)
            by_pod = seen.setdefault(src or "-", {})
            by_pod[pod] = by_pod.get(pod, 0) + 1
        except OSError as e:
            errors += 1
            last_error = str(e)
            kind = error_kind(e)
            kinds[kind] = kinds.get(kind, 0) + 1
    print(json.dumps({"seen": seen, "errors": errors, "kinds": kinds, "last_error": last_error}))


# The query type of `dns`: A, or AAAA with AGENT_QTYPE=AAAA.
QTYPE = os.environ.get("AGENT_QTYPE", "A")


def dns_query(qid):
    """A DNS query for who.test, of type QTYPE, class IN, recursion desired."""
    labels = b"".join(bytes([len(l)]) + l for l in (b"who", b"test"))
    qtype = b"\x00\x1c" if QTYPE == "AAAA" else b"\x00\x01"
    return qid.to_bytes(2, "big") + b"\x01\x00\x00\x01" + b"\x00" * 6 + labels + b"\x00" + qtype + b"\x00\x01"


def dns(host, port, count, sources):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    timeout = float(os.environ.get("AGENT_TIMEOUT", "5"))
    seen, errors, last_error = {}, 0, ""
    # Every socket stays open until the end: no port is used twice.
    sockets = []
    for i in range(int(count)):
        src = sources[i % len(sources)] if sources else None
        s = socket.socket(family, socket.SOCK_DGRAM)
        sockets.append(s)
        s.settimeout(timeout)
        try:
            if src:
                s.bind((src, 0))
            s.connect((host, int(port)))
            qid = i % 65536
            s.send(dns_query(qid))
            try:
                answer = s.recv(512)
            except TimeoutError:
                # One resend on the same socket (the same flow), as resolvers do: a
                # first datagram can be lost while a fresh namespace resolves neighbours.
                s.send(dns_query(qid))
                answer = s.recv(512)
            if answer[:2] != qid.to_bytes(2, "big") or int.from_bytes(answer[6:8], "big") != 1:
                raise OSError("not one answer to this query")
            if QTYPE == "AAAA":
                addr = socket.inet_ntop(socket.AF_INET6, answer[-16:])
            else:
                addr = socket.inet_ntoa(answer[-4:])
            by_addr = seen.setdefault(src or "-", {})
            by_addr[addr] = by_addr.get(addr, 0) + 1
        except OSError as e:
            errors += 1
            last_error = str(e)
            # A path that drops everything fails in seconds, not in count x timeout.
            if errors >= 10:
                break
    for s in sockets:
        s.close()
    print(json.dumps({"seen": seen, "errors": errors, "last_error": last_error}))


def error_kind(e):
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, ConnectionResetError):
        return "reset"
    if isinstance(e, TimeoutError):
        return "timeout"
    return "other"


def echo(port):
    def handle(conn):
        with conn:
            try:
                while True:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    conn.sendall(chunk)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    listen_forever(port, handle)


def churn(host, port, seconds, rate):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    ok = errors = 0
    last_error = ""
    interval = 1.0 / float(rate)
    start = time.monotonic()
    n = 0
    while time.monotonic() - start < float(seconds):
        due = start + n * interval
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        n += 1
        try:
            exchange(family, host, port)
            ok += 1
        except OSError as e:
            errors += 1
            last_error = str(e)
    print(json.dumps({"ok": ok, "errors": errors, "last_error": last_error}))


def stream(host, port, total, seconds):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    total, seconds = int(total), float(seconds)
    sent_hash, got_hash = hashlib.sha256(), hashlib.sha256()
    received = [0]
    error = [""]
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect((host, int(port)))

    def read():
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got_hash.update(chunk)
                received[0] += len(chunk)
        except OSError as e:
            error[0] = str(e)

    reader = threading.Thread(target=read)
    reader.start()
    sent, chunk_no, start = 0, 0, time.monotonic()
    try:
        while sent < total:
            size = min(16384, total - sent)
            chunk = hashlib.sha256(str(chunk_no).encode()).digest() * (size // 32 + 1)
            chunk = chunk[:size]
            s.sendall(chunk)
            sent_hash.update(chunk)
            sent += size
            chunk_no += 1
            due = start + seconds * sent / total
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        s.shutdown(socket.SHUT_WR)
    except OSError as e:
        error[0] = str(e)
    reader.join()
    s.close()
    same = received[0] == sent and sent_hash.digest() == got_hash.digest()
    print(json.dumps({"sent": sent, "received": received[0], "same": same, "error": error[0]}))


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            print(r.status)
            print(r.read().decode())
    except urllib.error.HTTPError as e:
        print(e.code)
        print(e.read().decode())
    except OSError as e:
        print(0)
        print(e)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "serve":
        serve(*args)
    elif cmd == "peer":
        peer(*args)
    elif cmd == "ask":
        ask(args[0], args[1], args[2], args[3:])
    elif cmd == "http":
        ask(args[0], args[1], args[2], args[3:], HTTP_GET)
    elif cmd == "dns":
        dns(args[0], args[1], args[2], args[3:])
    elif cmd == "get":
        get(args[0])
    elif cmd == "echo":
        echo(args[0])
    elif cmd == "churn":
        churn(*args)
    elif cmd == "stream":
        stream(*args)
    else:
        sys.exit(f"unknown command {cmd}")
