"""Generated protobuf and gRPC stubs for ``offload.v1``: run ``make proto``; never edit by hand."""
