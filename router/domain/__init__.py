"""The domain model: workers, pools, the registry that owns them, and the routing contract.

Nothing here imports the gateway (HTTP, upstream I/O, Redis, routing implementations); only the
config schema, which describes pools and workers, and the error tree. `make lint` checks it.
"""
