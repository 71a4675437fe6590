"""A JSON HTTP server on loopback for the tests of clients of OpenAI-compatible servers: each POST's
body and headers go to `respond`, which gives (status, JSON reply) or DROP (the connection closed
without a reply, as a server killed mid-request)."""

from __future__ import annotations

import http.server
import json
import socket
import threading
from collections.abc import Callable

DROP = object()


class JSONServer:
    def __init__(self, respond: Callable[[dict, dict], tuple[int, dict] | object]):
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a pooled client uses it

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                got = respond(body, dict(self.headers))
                if got is DROP:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                status, reply = got
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
