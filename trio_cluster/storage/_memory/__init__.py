"""Memory storage: every table in process memory (private; public as
`trio_cluster.storage.MemoryStorage`)."""
