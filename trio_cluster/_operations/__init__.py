"""Operations: statistics snapshots and the Prometheus/health HTTP endpoint (private)."""
