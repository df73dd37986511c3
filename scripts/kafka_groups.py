#!/usr/bin/env python3
"""Lists the consumer groups a Kafka broker knows (ListGroups v1), one per line.

Usage: kafka_groups.py HOST:PORT

Test tooling for the end-to-end tests (DeleteConsumerGroup): speaks the wire protocol directly, so
that it needs nothing but Python. On a single-broker cluster this is every group.
"""
import struct
import sys

from kafka_wire import call


def list_groups(host: str, port: int) -> list:
    # ListGroups v1 (api key 16), no body.
    data = call(host, port, 16, 1, b"", b"streamops-e2e", timeout=5, correlation_id=7)
    _throttle, error, count = struct.unpack(">ihi", data[:10])
    if error != 0:
        raise ValueError(f"ListGroups error code {error}")
    pos, groups = 10, []
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
