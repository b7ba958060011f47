"""The engine: the Trio drivers that run entities (private).

* the assembly that builds a runner's parts whole and runs them (`_assembly`)
  and the listeners it tells of lifecycle events (`_listeners`);
* shards: the served-shard table (`_shard_table`), membership, locks and
  leases (`_sharding`);
* entities: admission and execution (`_manager`), crash, restart, passivation
  and shard stop (`_entity_lifecycle`, `_passivation`), the runtime records
  (`_slots`), outcomes (`_outcomes`), streams (`_streams`), singletons
  (`_singletons`);
* persisted delivery: the façade and sending (`_persisted`), the shared parts
  (`_delivery`), the read loop (`_claims`), replies (`_replies`), notices
  (`_notices`), waiting callers (`_waiters`), group commit (`_batching`) and
  retention (`_janitor`);
* between runners: routing (`_routing`), the caller's side (`_remote`), the
  owner's side and the endpoint handler (`_inbound`), envelope shapes
  (`_wire`), broadcasts (`_broadcasts`).

Nothing here imports `trio_cluster.testing`; the public façade is
`trio_cluster._runner.Runner`. See docs/architecture.md.
"""
