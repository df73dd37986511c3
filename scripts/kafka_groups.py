#!/usr/bin/env python3
"""Lists the consumer groups a Kafka broker knows (ListGroups v1), one per line.

Usage: kafka_groups.py HOST:PORT

Test tooling for the end-to-end tests (DeleteConsumerGroup): speaks the wire protocol directly, so
that it needs nothing but Python. On a single-broker cluster this is every group.
"""
import socket
import struct
import sys


def read_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by the broker")
        buf += chunk
    return buf


def list_groups(host: str, port: int) -> list:
    client_id = b"streamops-e2e"
    # Request header v1: api_key=16 (ListGroups), api_version=1, correlation_id, client_id; no body.
    payload = struct.pack(">hhih", 16, 1, 7, len(client_id)) + client_id
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.settimeout(5)
        sock.sendall(struct.pack(">i", len(payload)) + payload)
        (size,) = struct.unpack(">i", read_exact(sock, 4))
        data = read_exact(sock, size)
    correlation_id, _throttle, error, count = struct.unpack(">iihi", data[:14])
    if correlation_id != 7:
        raise ValueError(f"unexpected correlation id {correlation_id}")
    if error != 0:
        raise ValueError(f"ListGroups error code {error}")
    pos, groups = 14, []
    for _ in range(count):
        (n,) = struct.unpack(">h", data[pos : pos + 2])
        groups.append(data[pos + 2 : pos + 2 + n].decode())
        pos += 2 + n
        (n,) = struct.unpack(">h", data[pos : pos + 2])
        pos += 2 + max(n, 0)
    return groups


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    h, _, p = sys.argv[1].rpartition(":")
    for g in list_groups(h or "127.0.0.1", int(p)):
        print(g)
