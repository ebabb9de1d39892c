"""The coserve.v1 protocol: ``coserve.proto`` and the stubs generated from it."""
