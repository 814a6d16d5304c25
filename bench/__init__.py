"""`make bench`: how fast a cancellation is, next to the fastest RPC the same server can serve."""
