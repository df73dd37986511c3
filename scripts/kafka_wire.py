"""The little of Kafka's wire protocol that the dev scripts speak (kafka_ready.py, kafka_groups.py):
one request with a v1 header, one response, over a fresh connection. Nothing but Python."""
import socket
import struct


def read_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by the broker")
        buf += chunk
    return buf


def call(host: str, port: int, api_key: int, api_version: int, body: bytes,
         client_id: bytes, timeout: float, correlation_id: int = 1) -> bytes:
    """Sends one request (header v1) and returns the response after its correlation id."""
    header = struct.pack(">hhih", api_key, api_version, correlation_id, len(client_id)) + client_id
    payload = header + body
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(struct.pack(">i", len(payload)) + payload)
        (size,) = struct.unpack(">i", read_exact(sock, 4))
        data = read_exact(sock, size)
    (got,) = struct.unpack(">i", data[:4])
    if got != correlation_id:
        raise ValueError(f"unexpected correlation id {got}")
    return data[4:]
