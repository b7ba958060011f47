"""The ``trio-cluster`` command line and the demo (private)."""
