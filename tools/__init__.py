"""Data and plotting tools, installed as ``megatron_mile.tools`` (run as ``python -m megatron_mile.tools.NAME``)."""
