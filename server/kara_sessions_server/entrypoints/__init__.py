"""How the outside world reaches the service: the gRPC server (grpc/) and the server's
commands for the `kara-sessions` CLI (serve, migrate, token), with their logging set-up."""
