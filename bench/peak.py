"""Measured dense matmul throughput: the denominator of every utilisation figure.

  .venv/bin/python -m bench.peak [--size 2048] [--repeats 5] [--dtypes float32,bfloat16]

Times `a @ b` for two [size, size] matrices under `jax.jit` (2 * size^3 FLOPs each), warm-up
excluded, and prints one JSON line per dtype with the median and best GFLOP/s.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp


def matmul_gflops(size: int = 2048, dtype: str = "float32", repeats: int = 5,
                  inner: int = 4) -> dict:
  """{'dtype', 'size', 'median_gflops', 'best_gflops', 'spread'} of a jitted [size, size] matmul.

  Each repetition runs `inner` chained matmuls (so a dispatch does not dominate small sizes).
  """
  dt = jnp.dtype(dtype)
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (size, size), jnp.float32).astype(dt) / size ** 0.5
  b = jax.random.normal(kb, (size, size), jnp.float32).astype(dt) / size ** 0.5

  @jax.jit
  def chain(a, b):
    def body(_, x):
      return jnp.dot(x, b, preferred_element_type=dt)
    return jax.lax.fori_loop(0, inner, body, a)

  chain(a, b).block_until_ready()
  rates = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    chain(a, b).block_until_ready()
    rates.append(2 * size ** 3 * inner / (time.perf_counter() - t0) / 1e9)
  return dict(dtype=dtype, size=size, median_gflops=statistics.median(rates),
              best_gflops=max(rates), spread=[min(rates), max(rates)])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=2048)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dtypes", default="float32,bfloat16")
  args = parser.parse_args(argv)
  if args.size < 1 or args.repeats < 1:
    parser.exit(2, f"error: --size and --repeats must be >= 1, got {args.size}, {args.repeats}\n")
  for dtype in args.dtypes.split(","):
    if dtype not in ("float32", "bfloat16"):
      parser.exit(2, f"error: unknown dtype {dtype!r}: allowed float32, bfloat16\n")
    result = matmul_gflops(args.size, dtype, args.repeats)
    print(json.dumps(dict(result, backend=jax.default_backend(), device=str(jax.devices()[0]))))


if __name__ == "__main__":
  main()
