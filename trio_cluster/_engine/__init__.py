"""The engine: the Trio drivers that run entities (private).

Sharding and leases (`_sharding`), the entity manager with its slots, passivation
and streams (`_manager`, `_slots`, `_passivation`, `_streams`), persisted delivery
(`_persisted`), retention (`_janitor`), routing between runners (`_routing`,
`_remote`, `_inbound`, `_wire`, `_batching`), and the assembly that builds them
whole for a runner (`_assembly`). Nothing here imports `trio_cluster.testing`;
the public façade is `trio_cluster._runner.Runner`.
"""
