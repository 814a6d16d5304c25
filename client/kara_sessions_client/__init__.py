"""kara-sessions client library and the `kara-sessions` command line."""
