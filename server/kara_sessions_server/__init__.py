"""kara-sessions server: the sponsored-credit cancellation policy behind a gRPC API."""
