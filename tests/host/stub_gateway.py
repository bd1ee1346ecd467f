"""A stand-in for the OKOME gateway on loopback, for the frontend's host and boot tests.

Routes (any method unless said):
  /health              200 {"status": "ok"}; 503 while `health_up` is False
  /static/<name>       GET: a file from `static_dir` if given, else a generated asset; no cache
                       headers, so only the frontend's static-asset rule caches it
  /api/cacheable       JSON marked `Cache-Control: public, max-age=<cacheable_max_age>`;
                       with ?public=0, `max-age` alone (cacheable, but not for authenticated
                       requests)
  .../echo             JSON echo of the method, path, HTTP version, headers and body length
                       that nginx passed on
  .../stream           Server-Sent Events: `events` events `interval` s apart (query parameters
                       ?events=N&interval=S override), each `data: {"seq": n, "sent": <time>}`
  anything else        JSON {"method", "path"}, not cacheable

Outages: `stop()` closes the port and every open connection (connection refused);
`blackhole()` holds the port with a listener whose accept queue is full, so the kernel drops new
SYNs and a client waits for its connect timeout, like a gateway that vanished from the network;
`start()` serves again on the same port.

Run alone: python -m tests.host.stub_gateway --port 8000
"""

import argparse
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

LOOPBACK = "127.0.0.1"


def generated_asset(name: str, size: int = 16 * 1024) -> bytes:
    """A deterministic body for /static/<name>: the same bytes on every call."""
    line = f"/* {name} */ " + "x" * 60 + "\n"
    return (line * (size // len(line) + 1)).encode()[:size]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def setup(self) -> None:
        super().setup()
        # As a real server does: an event must not wait for the ACK of the one before (Nagle).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        """Quiet: the gateway's `requests` list is the record tests read."""

    def do_GET(self) -> None:
        self._route()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def _route(self) -> None:
        gateway = self.server.gateway
        url = urlsplit(self.path)
        body = self._read_body()
        gateway.record(self.command, self.path, dict(self.headers.items()), len(body))

        if url.path == gateway.health_path:
            if gateway.health_up:
                self._send_json(200, {"status": "ok"})
            else:
                self._send_json(503, {"status": "down"})
        elif url.path.startswith("/static/") and self.command in ("GET", "HEAD"):
            self._send_static(url.path.removeprefix("/static/"))
        elif url.path == "/api/cacheable":
            public = "" if parse_qs(url.query).get("public") == ["0"] else "public, "
            self._send_json(200, {"cacheable": True, "served_at": time.time()},
                            {"Cache-Control": f"{public}max-age={gateway.cacheable_max_age}"})
        elif url.path.endswith("/echo"):
            self._send_json(200, {"method": self.command, "path": self.path,
                                  "version": self.request_version,
                                  "headers": dict(self.headers.items()), "body_length": len(body)})
        elif url.path.endswith("/stream"):
            query = parse_qs(url.query)
            events = int(query.get("events", [gateway.events])[0])
            interval = float(query.get("interval", [gateway.interval])[0])
            self._send_events(events, interval)
        else:
            self._send_json(200, {"method": self.command, "path": self.path})

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                chunk = self.rfile.read(size + 2)[:size]
                if size == 0:
                    return b"".join(chunks)
                chunks.append(chunk)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send_json(self, status: int, document: dict, headers: dict | None = None) -> None:
        body = (json.dumps(document) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_static(self, name: str) -> None:
        static_dir = self.server.gateway.static_dir
        if static_dir is not None:
            path = Path(static_dir, name).resolve()
            if not path.is_relative_to(Path(static_dir).resolve()) or not path.is_file():
                self._send_json(404, {"error": "not found"})
                return
            body = path.read_bytes()
        else:
            body = generated_asset(name)
        content_type = "text/css" if name.endswith(".css") else "application/javascript"
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_events(self, events: int, interval: float) -> None:
        """Chunked, as a real gateway streams: each event is one chunk, written when it is due."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        for seq in range(events):
            time.sleep(interval)
            event = f'data: {{"seq": {seq}, "sent": {time.time():.6f}}}\n\n'.encode()
            self.wfile.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, gateway: "StubGateway"):
        self.gateway = gateway
        self.open_connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__((gateway.host, gateway.port), _Handler)

    def process_request_thread(self, request, client_address) -> None:
        with self.connections_lock:
            self.open_connections.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.connections_lock:
                self.open_connections.discard(request)

    def drop_connections(self) -> None:
        """Cut every open connection: nginx's idle keep-alive ones too, as a dead gateway would."""
        with self.connections_lock:
            for connection in self.open_connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class StubGateway:
    """The gateway's stand-in; `start()` returns it, serving on `host:port`."""

    def __init__(self, port: int = 0, host: str = LOOPBACK, health_path: str = "/health",
                 static_dir: Path | None = None, cacheable_max_age: int = 60,
                 events: int = 5, interval: float = 0.3):
        self.host = host
        self.port = port
        self.health_path = health_path
        self.static_dir = static_dir
        self.cacheable_max_age = cacheable_max_age
        self.events = events
        self.interval = interval
        self.health_up = True
        self.requests: list[dict] = []
        self._requests_lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._blackhole: list[socket.socket] = []

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def record(self, method: str, path: str, headers: dict, body_length: int) -> None:
        with self._requests_lock:
            self.requests.append({"method": method, "path": path, "headers": headers,
                                  "body_length": body_length, "time": time.time()})

    def requests_for(self, path: str) -> list[dict]:
        """The requests that reached the gateway for `path` (query string included)."""
        with self._requests_lock:
            return [request for request in self.requests if request["path"] == path]

    def start(self) -> "StubGateway":
        """Serve (again) on the same port; ends a blackhole."""
        self._end_blackhole()
        if self._server is None:
            self._server = _Server(self)
            self.port = self._server.server_address[1]
            self._thread = threading.Thread(target=self._server.serve_forever,
                                            name=f"stub-gateway-{self.port}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Close the port and every connection: connecting is refused at once."""
        self._end_blackhole()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server.drop_connections()
            self._thread.join(timeout=5)
            self._server = None

    def blackhole(self) -> None:
        """Accept no connection and answer no SYN: connecting hangs until the client gives up.

        A listener with a backlog of 0 that never accepts takes one connection into its queue;
        with that queue full, Linux drops every further SYN (net.ipv4.tcp_abort_on_overflow is 0
        by default), exactly what a client sees of a host that is gone. No root, no namespace.
        """
        self.stop()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(0)
        self._blackhole.append(listener)
        for _ in range(2):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            filler.connect_ex((self.host, self.port))
            self._blackhole.append(filler)
        time.sleep(0.05)

        try:
            socket.create_connection((self.host, self.port), timeout=0.3).close()
        except TimeoutError:
            return
        raise RuntimeError(f"blackhole on port {self.port} still accepts connections")

    def _end_blackhole(self) -> None:
        for sock in self._blackhole:
            sock.close()
        self._blackhole = []

    def __enter__(self) -> "StubGateway":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the stub gateway until interrupted.")
    parser.add_argument("--host", default=LOOPBACK, help="address to listen on (loopback)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--static-dir", type=Path, help="serve /static/ from this directory")
    parser.add_argument("--interval", type=float, default=0.3, help="seconds between events")
    parser.add_argument("--events", type=int, default=5, help="events per stream")
    parser.add_argument("--cacheable-max-age", type=int, default=60,
                        help="max-age of /api/cacheable, in seconds")
    args = parser.parse_args()
    gateway = StubGateway(port=args.port, host=args.host, static_dir=args.static_dir,
                          events=args.events, interval=args.interval,
                          cacheable_max_age=args.cacheable_max_age).start()
    print(f"stub gateway on {gateway.url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        gateway.stop()


if __name__ == "__main__":
    main()
