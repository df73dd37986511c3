#!/usr/bin/env python3
"""Readiness probe for a Kafka broker: send one Metadata request and check that it answers.

Usage: kafka_ready.py HOST:PORT [--timeout SECONDS]

Exits 0 once the broker answers a Metadata (v1) request with at least one broker and a controller,
non-zero with the last error once the timeout has passed. It speaks the wire protocol directly so
that the dev stack needs nothing but Python to know when Kafka is really up (an open port is not
enough: the socket server accepts before the broker has registered with the KRaft controller).
"""
import struct
import sys
import time

from kafka_wire import call


def probe(host: str, port: int) -> str:
    # Metadata v1 (api key 3) with topics = null (-1): brokers and controller only.
    data = call(host, port, 3, 1, struct.pack(">i", -1), b"streamops-dev-up", timeout=3)
    (broker_count,) = struct.unpack(">i", data[:4])
    pos = 4
    brokers = []
    for _ in range(broker_count):
        node_id, host_len = struct.unpack(">ih", data[pos : pos + 6])
        pos += 6
        bhost = data[pos : pos + host_len].decode()
        pos += host_len
        (bport,) = struct.unpack(">i", data[pos : pos + 4])
        pos += 4
        (rack_len,) = struct.unpack(">h", data[pos : pos + 2])
        pos += 2 + max(rack_len, 0)
        brokers.append(f"{node_id}@{bhost}:{bport}")
    (controller_id,) = struct.unpack(">i", data[pos : pos + 4])
    if not brokers:
        raise ValueError("metadata lists no broker yet")
    if controller_id < 0:
        raise ValueError("metadata names no controller yet")
    return f"brokers {', '.join(brokers)}; controller {controller_id}"


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    host, _, port = sys.argv[1].rpartition(":")
    timeout = float(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[2] == "--timeout" else 0.0
    deadline = time.monotonic() + timeout
    while True:
        try:
            print(probe(host or "127.0.0.1", int(port)))
            return 0
        except (OSError, ValueError, ConnectionError, struct.error) as err:
            if time.monotonic() >= deadline:
                print(f"kafka_ready: {sys.argv[1]}: {err}", file=sys.stderr)
                return 1
            time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
