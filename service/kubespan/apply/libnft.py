"""A minimal binding to libnftables (the nftables project's library), through ctypes.

One `run()` is one batch: libnftables sends it to the kernel as a single transaction, so a
batch that fails leaves the previous ruleset exactly as it was. Commands are nft scripts, as
`nft -f` reads them; output is what `nft -s list ...` prints: stateless (no counter values)
and without handles, so two listings of an unchanged table are the same text. No name is
looked up (reverse DNS, services) while printing. We bind the C library directly instead of
Debian's python3-nftables module so the same code runs in the project's virtualenv and in
the image.
"""

from __future__ import annotations

import ctypes
import ctypes.util

from kubespan.errors import ApplyError

NFT_CTX_DEFAULT = 0
NFT_CTX_OUTPUT_STATELESS = 1 << 2
NFT_CTX_OUTPUT_JSON = 1 << 4


def _load() -> ctypes.CDLL:
    name = ctypes.util.find_library("nftables") or "libnftables.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError as error:
        raise ApplyError(f"libnftables is not available ({name}): install nftables") from error
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
    return lib


class Nft:
    """A libnftables context. It stays in the network namespace it is first used in."""

    def __init__(self, counters_json: bool = False) -> None:
        """`counters_json`: listings in JSON with counter values (to read counters); by
        default stateless text."""
        self._lib = _load()
        self._ctx = self._lib.nft_ctx_new(NFT_CTX_DEFAULT)
        flags = NFT_CTX_OUTPUT_JSON if counters_json else NFT_CTX_OUTPUT_STATELESS
        self._lib.nft_ctx_output_set_flags(self._ctx, flags)
        self._lib.nft_ctx_buffer_output(self._ctx)
        self._lib.nft_ctx_buffer_error(self._ctx)

    def close(self) -> None:
        if self._ctx:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None

    def run(self, script: str) -> str:
        """Run an nft script as one transaction; what it printed (listings)."""
        rc = self._lib.nft_run_cmd_from_buffer(self._ctx, script.encode())
        output = self._lib.nft_ctx_get_output_buffer(self._ctx) or b""
        error = self._lib.nft_ctx_get_error_buffer(self._ctx) or b""
        if rc != 0:
            raise ApplyError(f"nftables refused the change: {error.decode().strip()}")
        return output.decode(errors="replace")
