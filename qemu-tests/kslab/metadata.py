"""Cloud metadata services as a lab emulates them at 169.254.169.254:80, each answering only
in its documented format and only to the guests assigned to it:

- EC2 (IMDSv2): `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds` gives a
  session token; `GET /latest/user-data` needs it in `X-aws-ec2-metadata-token` (401 without
  or with a wrong one). Requests carrying `X-Forwarded-For` are refused, as EC2 does.
- GCE: `GET /computeMetadata/v1/instance/attributes/user-data` needs `Metadata-Flavor:
  Google` (403 without) and answers with the same header.
- Azure: `GET /metadata/instance/compute/userData?api-version=...&format=text` needs
  `Metadata: true` (400 without) and answers with the user data in base64.

Run as a script in the lab namespace: `metadata.py LISTEN_ADDRESS USER_DATA_FILE LOG_FILE
CLIENT=PLATFORM...`. Every request is logged as one JSON line (client, platform, method,
path, status) so that a test can tell which guest asked how.
"""

from __future__ import annotations

import base64
import json
import secrets
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

PLATFORMS = ("ec2", "gce", "azure")
METADATA_ADDRESS = "169.254.169.254"

# SMBIOS values a guest needs for its platform to be recognised from DMI, as QEMU -smbios
# arguments (kslab.VmSpec.smbios).
SMBIOS = {
    "ec2": ("type=1,manufacturer=Amazon EC2,product=t3.small",),
    "gce": ("type=1,manufacturer=Google,product=Google Compute Engine",),
    "azure": (
        "type=1,manufacturer=Microsoft Corporation,product=Virtual Machine",
        "type=3,manufacturer=Microsoft Corporation,asset=7783-7084-3265-9085-8269-3286-77",
    ),
}


class MetadataServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, listen: tuple[str, int], user_data: bytes, log: Path, clients: dict[str, str]
    ) -> None:
        super().__init__(listen, MetadataHandler)
        self.user_data = user_data
        self.log_path = log
        self.clients = clients  # client address -> platform it is served as
        self.tokens: set[str] = set()
        self.lock = threading.Lock()

    def record(self, entry: dict[str, object]) -> None:
        with self.lock, self.log_path.open("a") as log:
            log.write(json.dumps(entry) + "\n")


class MetadataHandler(BaseHTTPRequestHandler):
    server: MetadataServer

    def log_message(self, format: str, *args: object) -> None:  # the JSON log says it all
        pass

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_GET(self) -> None:
        self._serve("GET")

    def _serve(self, method: str) -> None:
        platform = self.server.clients.get(self.client_address[0], "")
        status, body, headers = self._answer(platform, method)
        self.server.record(
            {
                "client": self.client_address[0],
                "platform": platform,
                "method": method,
                "path": self.path,
                "status": status,
            }
        )
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _answer(self, platform: str, method: str) -> tuple[int, bytes, dict[str, str]]:
        url = urlsplit(self.path)
        if platform == "ec2":
            return self._ec2(method, url.path)
        if platform == "gce" and method == "GET":
            if url.path != "/computeMetadata/v1/instance/attributes/user-data":
                return 404, b"not found", {}
            if self.headers.get("Metadata-Flavor") != "Google":
                return 403, b"Missing Metadata-Flavor:Google header.", {}
            return 200, self.server.user_data, {"Metadata-Flavor": "Google"}
        if platform == "azure" and method == "GET":
            if url.path != "/metadata/instance/compute/userData":
                return 404, b"not found", {}
            query = parse_qs(url.query)
            if self.headers.get("Metadata") != "true" or "api-version" not in query:
                return 400, b'{"error": "Bad request. Required metadata header not specified"}', {}
            return 200, base64.b64encode(self.server.user_data), {}
        return 404, b"not found", {}

    def _ec2(self, method: str, path: str) -> tuple[int, bytes, dict[str, str]]:
        if self.headers.get("X-Forwarded-For") is not None:
            return 403, b"Forbidden", {}
        if method == "PUT" and path == "/latest/api/token":
            ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
            if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                return 400, b"Bad Request", {}
            token = secrets.token_urlsafe(32)
            with self.server.lock:
                self.server.tokens.add(token)
            return 200, token.encode(), {"X-aws-ec2-metadata-token-ttl-seconds": ttl}
        if method == "GET" and path == "/latest/user-data":
            with self.server.lock:
                valid = self.headers.get("X-aws-ec2-metadata-token") in self.server.tokens
            if not valid:
                return 401, b"Unauthorized", {}
            return 200, self.server.user_data, {}
        return 404, b"Not Found", {}


def read_log(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str]) -> None:
    listen, user_data_file, log_file, *assignments = argv
    clients = dict(a.split("=", 1) for a in assignments)
    unknown = set(clients.values()) - set(PLATFORMS)
    if unknown:
        raise SystemExit(f"unknown platforms {sorted(unknown)}; use {PLATFORMS}")
    server = MetadataServer(
        (listen, 80), Path(user_data_file).read_bytes(), Path(log_file), clients
    )
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
