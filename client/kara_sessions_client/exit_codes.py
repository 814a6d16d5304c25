"""The command line's exit codes, and which gRPC codes count as the server refusing a request
(fix the request) rather than failing it (try again later)."""

from __future__ import annotations

import grpc

OK = 0
REFUSED = 1  # the server said no: retrying the same request will not help
USAGE = 2  # bad command line (click's own code)
FAILED = 3  # unreachable, too slow or broken: the same request may succeed later
# Stopped by a signal (as shells report it: 128 + its number): 130 for SIGINT (Ctrl-C), 143 for
# SIGTERM. `bulk-cancel` wrote its results first; run the same file again to finish.
STOPPED_BASE = 128
# The reader of our output went away (`| head -1`) after the command had done its work: as
# Unix tools do, 128 + SIGPIPE. Never 1, which says the server refused.
BROKEN_PIPE = 141

REFUSALS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)


def for_code(code: grpc.StatusCode) -> int:
    return REFUSED if code in REFUSALS else FAILED


def stopped_by(signum: int) -> int:
    return STOPPED_BASE + signum
