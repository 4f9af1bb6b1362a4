"""A local OTLP/HTTP receiver that keeps nothing: where the benchmark's "tracing on" row sends its spans.

It answers every export (`POST /v1/traces`) with 200 and an empty ExportTraceServiceResponse (zero bytes of
protobuf), in a process of its own on 127.0.0.1, as a collector on the same machine would take them: the served
replica pays for making, batching, encoding and sending its spans, and the sink's own CPU is on the same cores.

    python -m loadtest.otlp_sink PORT     # run by `endpoint()`, stopped when the benchmark exits
"""

from __future__ import annotations

import atexit
import http.server
import subprocess
import sys
import time
import urllib.error
import urllib.request

_endpoint: str | None = None


class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a collector answers

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def endpoint() -> str:
    """The base URL (OTEL_EXPORTER_OTLP_ENDPOINT) of this run's sink, started on first use."""
    global _endpoint
    if _endpoint is None:
        from deploy import launch

        port = launch.free_port()
        proc = subprocess.Popen([sys.executable, "-m", "loadtest.otlp_sink", str(port)], start_new_session=True)
        atexit.register(proc.terminate)
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(urllib.request.Request(url + "/v1/traces", b"", method="POST"), timeout=1)
                break
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        _endpoint = url
    return _endpoint


if __name__ == "__main__":
    http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
