"""The gRPC API: server assembly, thin servicers, protobuf conversion, the one mapping of
errors to statuses, the interceptor every RPC goes through, bearer tokens and metrics. The only
part of the server that imports grpc or the generated kara.sessions.v1 code."""
