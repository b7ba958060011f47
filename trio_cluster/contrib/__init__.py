"""Adapters to other libraries, each an optional extra (public).

* `trio_cluster.contrib.opentelemetry`: `OpenTelemetryTracer`, spans of
  calls with OpenTelemetry (``pip install 'trio-cluster[opentelemetry]'``).

Importing ``trio_cluster.contrib`` imports none of them.
"""
