"""The command line's exit codes, and which gRPC codes count as the server refusing a request
(fix the request) rather than failing it (try again later)."""

from __future__ import annotations

import grpc

OK = 0
REFUSED = 1  # the server said no: retrying the same request will not help
USAGE = 2  # bad command line (click's own code)
FAILED = 3  # unreachable, too slow or broken: the same request may succeed later

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
