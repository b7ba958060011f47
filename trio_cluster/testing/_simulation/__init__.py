"""The deterministic cluster simulator (private; public names in
`trio_cluster.testing`)."""
