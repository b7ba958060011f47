"""A Trio-native PostgreSQL driver over libpq (private).

Imports nothing of the cluster but `trio_cluster._errors` and `_core`: it is a
layer of its own, used by the cluster storage and by anything else of the
project that talks to PostgreSQL.
"""
