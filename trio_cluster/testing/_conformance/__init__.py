"""Conformance suites for storage and transport backends (private; public
names in `trio_cluster.testing`)."""
