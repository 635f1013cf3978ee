"""Benchmarks (see README.md). `adv_soups` is imported first: its host allocator settings
(`adv_soups.host_memory`) must be made before jax starts XLA's threads, as in the programs timed."""
import adv_soups  # noqa: F401
