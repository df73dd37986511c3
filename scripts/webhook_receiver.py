#!/usr/bin/env python3
"""A tiny webhook receiver for the local demo: records every POST body as one JSON line."""
import http.server
import json
import sys

addr, out = sys.argv[1], sys.argv[2]
host, port = addr.rsplit(":", 1)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        try:
            doc = json.loads(body)
        except ValueError:
            doc = {"invalid_body": body.decode("utf-8", "replace")}
        doc["_idempotency_key"] = self.headers.get("Idempotency-Key")
        with open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps(doc) + "\n")
        self.send_response(202)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, fmt, *args):
        sys.stderr.write("webhook: " + (fmt % args) + "\n")


http.server.ThreadingHTTPServer((host, int(port)), Handler).serve_forever()
