"""The cloud platform a node runs on, and the user data it was started with.

Which platform: DMI/SMBIOS (`/sys/class/dmi/id`), which costs no network traffic:

- EC2: `sys_vendor` or `board_vendor` "Amazon EC2", or "amazon" in `bios_vendor`,
  `bios_version` or `product_name` (older Xen instances say "Xen" but `bios_version`
  "4.11.amazon");
- GCE: `product_name` "Google Compute Engine" or `sys_vendor` "Google";
- Azure: `sys_vendor` "Microsoft Corporation" and `chassis_asset_tag`
  7783-7084-3265-9085-8269-3286-77 (Hyper-V elsewhere has the vendor but not that tag);
- OpenStack: `product_name` or `chassis_asset_tag` "OpenStack Nova"/"OpenStack Compute",
  `sys_vendor` "OpenStack Foundation", or a public OpenStack cloud's asset tag (the list
  cloud-init's ds-identify uses).

When DMI names none of these, no metadata service is asked at all. 169.254.169.254 belongs
to nobody on QEMU, bare metal or another cloud, so a probe there waits out its whole deadline
on every boot for nothing, and a short probe would make a slow but real metadata service look
absent. Those machines have the kernel command line URL, fw_cfg, the config drives and a baked
file. Labelled drives (`cidata`, `config-2`) are looked for regardless: that costs a stat.

User data is the kubespan machine config YAML itself, as with the other sources (a
`#cloud-config` first line is a YAML comment, so such a file works too). Before it is parsed:

- gzip (magic 1f 8b, as EC2 and cloud-init users compress it) is decompressed, to at most
  MAX_CONFIG_BYTES;
- empty user data is no config: the next source is asked;
- user data that is not UTF-8 fails the source with one line (it is not a config at all).

Metadata services are asked over plain HTTP with the stdlib's http.client, at an IP literal:
no proxy from the environment (http.client never uses one), no DNS. Each platform has one
deadline for its whole exchange (EC2: token, then user data). Refused connections, timeouts
and 5xx/429 answers are tried again within it, since a metadata service can lag the network at
boot; every blocking socket call waits only for what is left of the attempt, so a server that
trickles bytes cannot stretch it. Bodies are read up to a bound. What each service answers:

- EC2 IMDSv2: `PUT /latest/api/token` (TTL 21600 s), then `GET /latest/user-data` with the
  token; 404 is no user data, 401 a refused token;
- GCE: `GET /computeMetadata/v1/instance/attributes/user-data` with `Metadata-Flavor: Google`;
  the answer must carry that header too (else it is not GCE's server); 404 is none;
- Azure: `GET /metadata/instance/compute/userData?api-version=2021-01-01&format=text` with
  `Metadata: true`; the body is the user data in base64 (decoded strictly), empty is none;
- OpenStack: `GET /openstack/latest/user_data`; 404 is none.
"""

from __future__ import annotations

import base64
import binascii
import enum
import http.client
import ipaddress
import logging
import re
import socket
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from kubespan.config.yamlsource import MAX_CONFIG_BYTES
from kubespan.errors import SourceUnavailable

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

log = logging.getLogger(__name__)

DMI_DIR = Path("/sys/class/dmi/id")
METADATA_URL = "http://169.254.169.254"
METADATA_WAIT_SECONDS = 20.0
ATTEMPT_SECONDS = 5.0
USER_DATA_LIMIT = MAX_CONFIG_BYTES
# Azure sends base64: four characters for every three bytes, and maybe a newline.
AZURE_BODY_LIMIT = (USER_DATA_LIMIT + 2) // 3 * 4 + 2
TOKEN_LIMIT = 4096
DMI_FIELD_LIMIT = 256

AZURE_ASSET_TAG = "7783-7084-3265-9085-8269-3286-77"
OPENSTACK_PRODUCTS = frozenset({"openstack nova", "openstack compute"})
OPENSTACK_ASSET_TAGS = OPENSTACK_PRODUCTS | {"opentelekomcloud", "sap ccloud vm", "huaweicloud"}

EC2_SESSION_PATH = "/latest/api/token"
EC2_USER_DATA_PATH = "/latest/user-data"
EC2_SESSION_TTL_SECONDS = "21600"
GCE_USER_DATA_PATH = "/computeMetadata/v1/instance/attributes/user-data"
AZURE_USER_DATA_PATH = "/metadata/instance/compute/userData?api-version=2021-01-01&format=text"
OPENSTACK_USER_DATA_PATH = "/openstack/latest/user_data"

_GZIP_MAGIC = b"\x1f\x8b"
_TOKEN = re.compile(rb"[\x21-\x7e]+")


class Platform(enum.Enum):
    EC2 = "EC2"
    GCE = "GCE"
    AZURE = "Azure"
    OPENSTACK = "OpenStack"


@dataclass(frozen=True)
class Dmi:
    """The DMI fields detection looks at; a field the machine lacks is empty."""

    sys_vendor: str = ""
    product_name: str = ""
    bios_vendor: str = ""
    bios_version: str = ""
    chassis_asset_tag: str = ""
    board_vendor: str = ""


def read_dmi(directory: Path = DMI_DIR) -> Dmi:
    values: dict[str, str] = {}
    for field in fields(Dmi):
        try:
            with (directory / field.name).open("rb") as handle:
                raw = handle.read(DMI_FIELD_LIMIT)
        except OSError:  # no SMBIOS (some ARM boards), or a field the kernel hides
            raw = b""
        values[field.name] = raw.decode("utf-8", "replace").strip()
    return Dmi(**values)


def detect_platform(dmi: Dmi) -> Platform | None:
    """The cloud DMI names, or None for any other machine (QEMU, bare metal, other clouds)."""
    sys_vendor = dmi.sys_vendor.casefold()
    product = dmi.product_name.casefold()
    asset_tag = dmi.chassis_asset_tag.casefold()
    if (
        "amazon ec2" in (sys_vendor, dmi.board_vendor.casefold())
        or "amazon" in dmi.bios_vendor.casefold()
        or "amazon" in dmi.bios_version.casefold()
        or "amazon" in product
    ):
        return Platform.EC2
    # product_name only: coreboot Chromebooks and Chromeboxes also say sys_vendor "Google",
    # and would then ask whatever answers at 169.254.169.254 on their LAN for a config.
    if product == "google compute engine":
        return Platform.GCE
    if sys_vendor == "microsoft corporation" and dmi.chassis_asset_tag == AZURE_ASSET_TAG:
        return Platform.AZURE
    if (
        product in OPENSTACK_PRODUCTS
        or asset_tag in OPENSTACK_ASSET_TAGS
        or sys_vendor == "openstack foundation"
    ):
        return Platform.OPENSTACK
    return None


def user_data_path(platform: Platform) -> str:
    """Where the platform's metadata service keeps the user data (for naming the source)."""
    return {
        Platform.EC2: EC2_USER_DATA_PATH,
        Platform.GCE: GCE_USER_DATA_PATH,
        Platform.AZURE: AZURE_USER_DATA_PATH,
        Platform.OPENSTACK: OPENSTACK_USER_DATA_PATH,
    }[platform]


# --- What the answers mean (no I/O) ---------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """One HTTP answer: status, headers as sent, body (read up to the request's bound)."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        wanted = name.casefold()
        return next((value for key, value in self.headers if key.casefold() == wanted), None)


class TryAgain(Exception):
    """The service did not answer usefully yet (refused, timed out, 5xx): worth another try
    within the deadline."""


def _retry_when_busy(answer: Answer) -> None:
    if answer.status == 429 or answer.status >= 500:
        raise TryAgain(f"HTTP {answer.status}")


def ec2_token(answer: Answer) -> str:
    _retry_when_busy(answer)
    if answer.status != 200:
        raise SourceUnavailable(f"the IMDSv2 token request was answered HTTP {answer.status}")
    token = answer.body.strip()
    if not _TOKEN.fullmatch(token):
        raise SourceUnavailable("the IMDSv2 token request was answered without a usable token")
    return token.decode("ascii")


def _user_data_body(answer: Answer, what: str = "user data") -> bytes | None:
    """The body of a user data answer: None for 404 (the instance has none), TryAgain when
    the service is busy, SourceUnavailable for any other answer than 200."""
    _retry_when_busy(answer)
    if answer.status == 404:
        return None
    if answer.status != 200:
        raise SourceUnavailable(f"the {what} request was answered HTTP {answer.status}")
    return answer.body


def ec2_user_data(answer: Answer) -> bytes | None:
    if answer.status == 401:
        raise SourceUnavailable("IMDSv2 refused the session token (HTTP 401)")
    return _user_data_body(answer)


def gce_user_data(answer: Answer) -> bytes | None:
    # GCE's metadata server marks every answer, error or not; whatever else answers at the
    # address (a proxy, another cloud's service) is not to be trusted with our config.
    if answer.header("Metadata-Flavor") != "Google":
        raise SourceUnavailable(
            f"the answer (HTTP {answer.status}) has no 'Metadata-Flavor: Google' header: "
            "not GCE's metadata server"
        )
    return _user_data_body(answer)


def azure_user_data(answer: Answer) -> bytes | None:
    body = _user_data_body(answer, "userData")
    text = (body or b"").strip()
    if not text:
        return None
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as error:
        raise SourceUnavailable(f"userData is not valid base64: {error}") from None


def openstack_user_data(answer: Answer) -> bytes | None:
    return _user_data_body(answer)


def decode_user_data(raw: bytes, limit: int = USER_DATA_LIMIT) -> bytes | None:
    """The machine config in user data: gunzipped if gzip, None if empty; SourceUnavailable
    when it cannot be a machine config (not UTF-8, too large)."""
    if raw.startswith(_GZIP_MAGIC):
        raw = _gunzip(raw, limit)
    if not raw.strip():
        return None
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SourceUnavailable(
            f"user data is not UTF-8 text (byte 0x{raw[error.start]:02x} at offset "
            f"{error.start}); it must be the kubespan machine config YAML"
        ) from None
    return raw


def _gunzip(compressed: bytes, limit: int) -> bytes:
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip header and trailer
    try:
        # max_length bounds what is produced, so a small bomb cannot fill memory.
        data = inflater.decompress(compressed, limit + 1)
    except zlib.error as error:
        raise SourceUnavailable(f"user data is not valid gzip: {error}") from None
    if len(data) > limit:
        raise SourceUnavailable(f"gzipped user data is larger than {limit} bytes uncompressed")
    if not inflater.eof:
        raise SourceUnavailable("gzipped user data is truncated")
    return data


# --- Asking a metadata service ---------------------------------------------------------------

Request = Callable[[str, str, Mapping[str, str], int], Answer]
"""(method, path, headers, body bound) -> Answer, within the current attempt's deadline."""


def _ec2(request: Request) -> bytes | None:
    token = ec2_token(
        request(
            "PUT",
            EC2_SESSION_PATH,
            {"X-aws-ec2-metadata-token-ttl-seconds": EC2_SESSION_TTL_SECONDS},
            TOKEN_LIMIT,
        )
    )
    answer = request(
        "GET", EC2_USER_DATA_PATH, {"X-aws-ec2-metadata-token": token}, USER_DATA_LIMIT
    )
    return ec2_user_data(answer)


def _gce(request: Request) -> bytes | None:
    answer = request("GET", GCE_USER_DATA_PATH, {"Metadata-Flavor": "Google"}, USER_DATA_LIMIT)
    return gce_user_data(answer)


def _azure(request: Request) -> bytes | None:
    return azure_user_data(
        request("GET", AZURE_USER_DATA_PATH, {"Metadata": "true"}, AZURE_BODY_LIMIT)
    )


def _openstack(request: Request) -> bytes | None:
    return openstack_user_data(request("GET", OPENSTACK_USER_DATA_PATH, {}, USER_DATA_LIMIT))


_EXCHANGES: dict[Platform, Callable[[Request], bytes | None]] = {
    Platform.EC2: _ec2,
    Platform.GCE: _gce,
    Platform.AZURE: _azure,
    Platform.OPENSTACK: _openstack,
}


@dataclass(frozen=True)
class MetadataService:
    """Where the metadata service answers (`http://IP[:PORT]`) and how long it may take:
    `wait_seconds` for everything, `attempt_seconds` for one try."""

    base_url: str = METADATA_URL
    wait_seconds: float = METADATA_WAIT_SECONDS
    attempt_seconds: float = ATTEMPT_SECONDS


def fetch_user_data(
    platform: Platform,
    service: MetadataService,
    monotonic: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> bytes | None:
    """The platform's user data, decoded (`decode_user_data`); None when it has none.

    SourceUnavailable when the service gives no answer within `service.wait_seconds`, or an
    answer that is wrong (refused token, not the platform's server, bad base64, too large).
    """
    host, port = metadata_address(service.base_url)
    exchange = _EXCHANGES[platform]
    deadline = monotonic() + service.wait_seconds
    delay = 0.25
    while True:
        attempt_deadline = min(deadline, monotonic() + service.attempt_seconds)
        try:
            raw = exchange(_requester(host, port, attempt_deadline, monotonic))
        except TryAgain as error:
            if deadline - monotonic() <= delay:
                raise SourceUnavailable(
                    f"no usable answer within {service.wait_seconds:g}s (last: {error})"
                ) from None
            log.debug(
                "metadata service not answering yet platform=%s error=%s", platform.value, error
            )
            sleep(delay)
            delay = min(delay * 2, 4.0)
            continue
        return None if raw is None else decode_user_data(raw)


def _requester(host: str, port: int, deadline: float, monotonic: Callable[[], float]) -> Request:
    def request(method: str, path: str, headers: Mapping[str, str], limit: int) -> Answer:
        return http_request(host, port, method, path, headers, limit, deadline, monotonic)

    return request


def metadata_address(base_url: str) -> tuple[str, int]:
    """Host and port of `http://IP[:PORT]`. An IP literal only: no DNS lookup can hold up a
    boot before the network is known."""
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    try:
        ipaddress.ip_address(host)
        port = parts.port or 80
    except ValueError:
        raise ValueError(f"metadata URL must be http://IP[:PORT], not {base_url!r}") from None
    if parts.scheme != "http" or parts.path not in ("", "/"):
        raise ValueError(f"metadata URL must be http://IP[:PORT], not {base_url!r}")
    return host, port


def http_request(
    host: str,
    port: int,
    method: str,
    path: str,
    headers: Mapping[str, str],
    limit: int,
    deadline: float,
    monotonic: Callable[[], float] = time.monotonic,
) -> Answer:
    """One HTTP exchange that ends by `deadline` (monotonic clock) whatever the server does.

    TryAgain when the server cannot be reached or does not answer in time; SourceUnavailable
    when the body is larger than `limit` bytes.
    """
    connection = _DeadlineConnection(host, port, deadline, monotonic)
    response: http.client.HTTPResponse | None = None
    try:
        connection.request(method, path, headers={**headers, "Connection": "close"})
        response = connection.getresponse()
        body = _read_bounded(response, limit)
        return Answer(response.status, tuple(response.getheaders()), body)
    except TimeoutError:
        raise TryAgain("timed out") from None
    except (OSError, http.client.HTTPException) as error:
        raise TryAgain(f"{type(error).__name__}: {error}") from None
    finally:
        # The response holds the socket open until it is closed too, read to the end or not.
        if response is not None:
            response.close()
        connection.close()


def _read_bounded(response: http.client.HTTPResponse, limit: int) -> bytes:
    too_large = SourceUnavailable(f"the answer is larger than {limit} bytes")
    if response.length is not None and response.length > limit:
        raise too_large  # said so up front: not worth reading
    chunks: list[bytes] = []
    size = 0
    while chunk := response.read(min(65536, limit + 1 - size)):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise too_large
    return b"".join(chunks)


class _DeadlineSocket(socket.socket):
    """A TCP socket whose every blocking call waits only for what is left until `deadline`,
    so the deadline holds for the whole exchange, not for each read."""

    def __init__(self, family: int, deadline: float, monotonic: Callable[[], float]) -> None:
        super().__init__(family, socket.SOCK_STREAM)
        self._deadline = deadline
        self._monotonic = monotonic

    def arm(self) -> None:
        remaining = self._deadline - self._monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline passed")
        self.settimeout(remaining)

    def recv(self, bufsize: int, flags: int = 0, /) -> bytes:
        self.arm()
        return super().recv(bufsize, flags)

    def recv_into(self, buffer: WriteableBuffer, nbytes: int = 0, flags: int = 0) -> int:
        self.arm()
        return super().recv_into(buffer, nbytes, flags)

    def sendall(self, data: ReadableBuffer, flags: int = 0, /) -> None:
        self.arm()
        super().sendall(data, flags)


class _DeadlineConnection(http.client.HTTPConnection):
    """http.client's HTTP/1.1, on a `_DeadlineSocket` (its own timeout is per call)."""

    def __init__(
        self, host: str, port: int, deadline: float, monotonic: Callable[[], float]
    ) -> None:
        super().__init__(host, port)
        self._deadline = deadline
        self._monotonic = monotonic

    def connect(self) -> None:
        family, _, _, _, address = socket.getaddrinfo(
            self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
        )[0]
        sock = _DeadlineSocket(family, self._deadline, self._monotonic)
        try:
            sock.arm()
            sock.connect(address)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
