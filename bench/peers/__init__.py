"""Peer VPNs from Debian's packages, measured by ``bench/pipeline_bench.py`` as baselines."""
