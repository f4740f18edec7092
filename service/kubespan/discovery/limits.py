"""Every limit the discovery service enforces, in one place.

Sizes are chosen so that a stranger with nothing but the address can hold at most a few
megabytes and a few hundred connections, and a cluster key (free to mint) buys a bounded
share of the service: see docs/discovery.md for the arithmetic.
"""

from __future__ import annotations

# --- requests ----------------------------------------------------------------------------------
MAX_ID_LENGTH = 256
# Sealed data blobs are padded by the agent to 1,024, 2,048 or 4,096 bytes.
MAX_DATA_BYTES = 4096
MAX_ENDPOINT_BYTES = 128
MAX_ENDPOINTS_PER_AFFILIATE = 64
MAX_AFFILIATES_PER_CLUSTER = 1024
MIN_TTL_SECONDS = 1
MAX_TTL_SECONDS = 24 * 3600
MAX_WAIT_SECONDS = 60.0
# The largest valid body (a 4 KiB blob and 64 endpoints of 128 bytes, base64) is ~17 KiB.
MAX_BODY_BYTES = 32 * 1024
MAX_BODY_DEPTH = 4  # {"endpoints": [...]} is 2 deep; nothing valid goes deeper
MAX_QUERY_PARAMETERS = 4
MAX_CLOCK_SKEW_SECONDS = 120.0

# --- harvested endpoints -----------------------------------------------------------------------
# One reporting source (an IPv4 address or an IPv6 /64) holds at most this many of an
# affiliate's harvested endpoints; its oldest is evicted first.
MAX_HARVESTED_PER_REPORTER = 8

# --- per source (IPv4 address or IPv6 /64) -----------------------------------------------------
RATE_PER_SOURCE = 15.0
BURST_PER_SOURCE = 60.0
NEW_CLUSTERS_PER_SOURCE_PER_HOUR = 10.0
MAX_SOURCES_TRACKED = 100_000

# --- STUN reflector (UDP) ---------------------------------------------------------------------
STUN_DEFAULT_PORT = 3478
# A node asks each reflector up to 4 times per probe, once a minute and on network changes;
# a few hundred nodes behind one NAT stay well within these.
STUN_RATE_PER_SOURCE = 20.0
STUN_BURST_PER_SOURCE = 100.0
# Answers per second from all sources together (a node asks once a minute).
STUN_RATE_OVERALL = 5000.0
MAX_STUN_ADVERTS = 8

# --- global quotas -----------------------------------------------------------------------------
MAX_AFFILIATES_TOTAL = 20_000
# Blob bytes stored (data, endpoints, harvested endpoints): bounds memory and snapshot size.
MAX_STORED_BYTES = 128 * 1024 * 1024
QUOTA_RETRY_SECONDS = 300

# --- HTTP transport ----------------------------------------------------------------------------
MAX_CONNECTIONS = 4096
MAX_CONNECTIONS_PER_SOURCE = 256
MAX_METRICS_CONNECTIONS = 32
# The request line and headers together; a signed request needs well under 1 KiB.
MAX_HEAD_BYTES = 8 * 1024
MAX_HEADERS = 32
MAX_PIPELINED = 4
HEAD_TIMEOUT_SECONDS = 10.0  # from connection (or first byte of a request) to its last header
BODY_TIMEOUT_SECONDS = 10.0
IDLE_TIMEOUT_SECONDS = 60.0  # keep-alive between requests
WRITE_TIMEOUT_SECONDS = 30.0  # a client that does not read its answer is dropped
TLS_HANDSHAKE_TIMEOUT_SECONDS = 10.0
SHUTDOWN_GRACE_SECONDS = 5.0
FD_RESERVE = 64  # descriptors kept free for snapshots, logs and the metrics listener

# --- state -------------------------------------------------------------------------------------
GC_INTERVAL_SECONDS = 60.0
SNAPSHOT_INTERVAL_SECONDS = 60.0
CHANGE_LOG_LENGTH = 4 * MAX_AFFILIATES_PER_CLUSTER
# Revisions are EPOCH << EPOCH_SHIFT | counter; a new epoch is made durable at every start.
EPOCH_SHIFT = 24
MAX_COUNTER = 1 << (EPOCH_SHIFT - 1)  # past this a cluster moves the service to a new epoch
MAX_TOMBSTONES = 100_000  # last revisions of clusters emptied in this epoch
MAX_SNAPSHOT_BYTES = 2 * MAX_STORED_BYTES + 64 * 1024 * 1024
MAX_SNAPSHOT_DEPTH = 8
MAX_PUBLIC_NAMES = 8
