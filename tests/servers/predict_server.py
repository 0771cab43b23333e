#!/usr/bin/env python3
"""A small HTTP/1.1 test server for servescope's integration tests (standard library only).

Answers every path; the status and the delay come from the request:
  query  ?status=NNN&delay_ms=D     (or headers x-status / x-delay-ms)
Replies with Content-Length, keeps the connection alive unless the client asks for close or speaks
HTTP/1.0. Python's socket layer reads with recvfrom and writes with sendto, so this server exercises
different syscalls from TorchServe's Netty (read/write/writev).

Usage: predict_server.py PORT        prints "ready PORT" on stdout once listening.
"""
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet: the test reads the agent, not this log
        pass

    def _answer(self):
        q = parse_qs(urlsplit(self.path).query)
        status = int(q.get("status", [self.headers.get("x-status", "200")])[0])
        delay_ms = float(q.get("delay_ms", [self.headers.get("x-delay-ms", "0")])[0])
        n = int(self.headers.get("content-length") or 0)
        body_in = self.rfile.read(n) if n else b""
        if delay_ms:
            time.sleep(delay_ms / 1000.0)
        body = b"ok:" + body_in[:16]
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _answer


def main():
    port = int(sys.argv[1])
    srv = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    srv.daemon_threads = True
    print("ready", port, flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
