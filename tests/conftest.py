"""Test-session setup: patch Megatron for this machine before any test imports its model modules."""

from megatron_tsp.megatron_compat import prepare_megatron

prepare_megatron()
