"""Test setup: 8 simulated CPU devices for every test, so multi-device code is tested in-process.

Tests that compare with a single device build a mesh over `jax.devices()[:1]`.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
