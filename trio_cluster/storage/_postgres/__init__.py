"""PostgreSQL for trio_cluster (private).

Two layers: `_driver` is a Trio-native libpq driver (connections, pipelined
protocol, pool, error translation) that knows nothing of the cluster; the
modules beside it are the cluster storage on top of it (schema and migrations,
messages, runners and advisory-lock leases, notifications, status). The public
names are re-exported by `trio_cluster.storage`.
"""
