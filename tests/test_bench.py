"""Smoke tests of the benchmarks (bench/): one tiny step each, well-formed output, no timing asserted.

Also the model's speed/memory switches that the benchmarks measure: `remat` and bfloat16 compute.
The PyTorch baseline's test is skipped when `.venv-torch` (make bench-torch-venv) has no torch.
"""
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import flops, peak, train_step

TINY = ["--width=32", "--depth=1", "--heads=2", "--mlp=64", "--image_size=8", "--patch=4",
        "--batch=8", "--repeats=1", "--steps=1", "--peak_gflops=100"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = dict(image_size=8, patch_size=4, channels=3, width=32, depth=1, mlp_dim=64, num_classes=10)


def _torch_available() -> bool:
  python = train_step.DEFAULT_TORCH_PYTHON
  return os.path.exists(python) and subprocess.run(
      [python, "-c", "import torch"], capture_output=True).returncode == 0


def _tiny_model(**overrides):
  from adv_soups.models import create_model
  return create_model(dict(dict(variant="tiny/4", width=32, depth=2, num_heads=2, mlp_dim=64,
                                image_size=8, num_classes=10, adapter="token", num_domains=2),
                           **overrides))


def test_forward_flops_match_xla_cost_analysis():
  """The analytic count vs XLA's count of the real model's forward pass (matmuls dominate)."""
  # Wide enough for the matmuls to dominate XLA's count (which also counts elementwise work).
  sizes = dict(width=128, mlp_dim=512, image_size=16, depth=1)
  model = _tiny_model(num_heads=2, **sizes)
  x, d = jnp.zeros((2, 16, 16, 3)), jnp.zeros((2,), jnp.int32)
  params = model.init(jax.random.key(0), x, d)["params"]
  cost = jax.jit(lambda p: model.apply({"params": p}, x, d)).lower(params).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  analytic = flops.forward_flops(patch_size=4, channels=3, num_classes=10, **sizes)
  assert analytic == pytest.approx(cost["flops"] / 2, rel=0.1)


def test_forward_equivalents_follow_the_cost_model():
  for k in (1, 2, 10):
    adv, co = (flops.forward_equivalents(m, k) for m in ("adversarial", "cotrain"))
    assert (adv, co) == (2 * k + 3, 2 * k + 6)
  assert flops.step_flops_per_image("clean", 5, **MODEL) == 3 * flops.forward_flops(**MODEL)
  with pytest.raises(ValueError, match="bogus"):
    flops.forward_equivalents("bogus", 2)


def test_peak_reports_a_positive_rate():
  result = peak.matmul_gflops(size=64, repeats=3, inner=1)
  assert result["dtype"] == "float32" and result["size"] == 64
  assert 0 < result["spread"][0] <= result["median_gflops"] <= result["best_gflops"]
  assert result["best_gflops"] == result["spread"][1]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
  """One tiny interleaved run of all three modes (beside PyTorch when .venv-torch has it):
  (returned lines, printed JSON lines, the results file's lines)."""
  import contextlib
  import io
  results = tmp_path_factory.mktemp("bench") / "r.jsonl"
  out = io.StringIO()
  extra = ["--baseline=torch"] if _torch_available() else []
  with contextlib.redirect_stdout(out):
    lines = train_step.main(TINY + extra + ["--modes=clean,adversarial,cotrain",
                                            f"--results={results}"])
  printed = [json.loads(l) for l in out.getvalue().splitlines() if l.startswith("{")]
  return lines, printed, [json.loads(l) for l in results.read_text().splitlines()], out.getvalue()


def test_train_step_prints_one_json_line_per_mode_and_appends_results(bench_run):
  lines, printed, stored, _ = bench_run
  assert [l["mode"] for l in printed[:3]] == ["clean", "adversarial", "cotrain"]
  assert printed[3]["model"] == pytest.approx(10 / 7)  # (2k + 6) / (2k + 3) at k = 2
  for line in printed[:3]:
    assert {"images_per_sec", "ms_per_step", "utilisation", "compile_s", "memory"} <= set(line)
    assert line["images_per_sec"] == pytest.approx(8 / line["ms_per_step"] * 1000)
    assert line["utilisation"] == pytest.approx(line["achieved_gflops"] / 100)
  assert [s["mode"] for s in stored] == ["clean", "adversarial", "cotrain"]
  assert stored[0]["machine"]["device_count"] == jax.device_count()
  assert stored[0]["config"]["batch"] == 8 and lines[2]["flops_per_image"] == stored[2]["flops_per_image"]


@pytest.mark.skipif(not _torch_available(), reason="no torch in .venv-torch (make bench-torch-venv)")
def test_torch_baseline_interleaved(bench_run):
  lines, _, _, text = bench_run
  for line in lines:
    torch_figures = line["torch"]
    assert torch_figures["images_per_sec"] > 0 and torch_figures["repeats"] == 1
    assert line["speedup"] == pytest.approx(torch_figures["ms_per_step"] / line["ms_per_step"])
  assert "median speedup over PyTorch eager" in text


def test_train_step_bad_flag_exits_2_and_writes_nothing(tmp_path):
  results = tmp_path / "r.jsonl"
  with pytest.raises(SystemExit) as e:
    train_step.main(TINY + ["--modes=cotrain,bogus", f"--results={results}"])
  assert e.value.code == 2 and not results.exists()


def _fresh_bench(tmp_path, *flags, cpu_devices=None):
  """bench.train_step --compile_only in a fresh process whose XLA_FLAGS names no device count,
  as on a user's CPU host: (return code, stderr, the results file's lines)."""
  results = tmp_path / "r.jsonl"
  env = dict(os.environ, XLA_FLAGS=re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                                          os.environ.get("XLA_FLAGS", "")))
  env.pop("ADV_SOUPS_CPU_DEVICES", None)
  if cpu_devices is not None:
    env["ADV_SOUPS_CPU_DEVICES"] = cpu_devices
  proc = subprocess.run([sys.executable, "-m", "bench.train_step", *TINY, "--modes=cotrain",
                         "--compile_only", f"--results={results}", *flags], env=env,
                        capture_output=True, text=True, timeout=300, cwd=REPO)
  stored = [json.loads(l) for l in results.read_text().splitlines()] if results.exists() else []
  return proc.returncode, proc.stderr, stored


def test_train_step_splits_the_cpu_as_the_training_programs_do(tmp_path):
  """Batch 8 -> 4 CPU devices, recorded with the line; a bad setting is one line, exit 2, nothing
  written. (Mutation: drop the split in main -> device_count 1.)"""
  code, err, stored = _fresh_bench(tmp_path)
  assert code == 0, err[-2000:]
  assert stored[0]["machine"]["device_count"] == 4
  (tmp_path / "bad").mkdir()
  code, err, stored = _fresh_bench(tmp_path / "bad", cpu_devices="x")
  assert code == 2 and stored == []
  assert err.strip().splitlines() == ["error: ADV_SOUPS_CPU_DEVICES='x': allowed values are "
                                      "integers >= 1 (1: one device)"]


def test_compile_only_ab_reports_both_memories(tmp_path, capsys):
  # 32 px, batch 64: activations large enough for the saving to show (nothing is run).
  lines = train_step.main(TINY + ["--modes=cotrain", "--compile_only", "--ab=--remat",
                                  "--results=", "--image_size=32", "--batch=64", "--depth=2"])
  line = lines[0]
  assert line["compile_only"] and "images_per_sec" not in line
  assert line["ab"]["flags"] == "--remat"
  assert 0 < line["ab"]["memory"]["temp_mib"] < line["memory"]["temp_mib"]  # remat saves memory


def test_remat_keeps_parameter_tree_and_gradients():
  x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 3))
  d = jnp.asarray([0, 1, 0, 1])
  plain, remat = _tiny_model(), _tiny_model(remat=True)
  params = plain.init(jax.random.key(0), x, d)["params"]
  assert (jax.tree.structure(remat.init(jax.random.key(0), x, d)["params"])
          == jax.tree.structure(params))
  grad = lambda m: jax.grad(lambda p: jnp.sum(m.apply({"params": p}, x, d, train=True) ** 2))(
      jax.tree.map(lambda a: a + 0.01, params))
  for a, b in zip(jax.tree.leaves(grad(plain)), jax.tree.leaves(grad(remat))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bfloat16_computes_in_bfloat16_with_float32_parameters():
  x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 3))
  d = jnp.asarray([0, 1, 0, 1])
  f32, bf16 = _tiny_model(), _tiny_model(dtype="bfloat16")
  params = jax.tree.map(lambda a: a + 0.05, f32.init(jax.random.key(0), x, d)["params"])
  assert {a.dtype for a in jax.tree.leaves(bf16.init(jax.random.key(0), x, d)["params"])} == {
      jnp.dtype(jnp.float32)}
  hlo = jax.jit(lambda p: bf16.apply({"params": p}, x, d)).lower(params).as_text()
  assert "bf16" in hlo
  out32, out16 = f32.apply({"params": params}, x, d), bf16.apply({"params": params}, x, d)
  assert out16.dtype == jnp.float32
  np.testing.assert_allclose(out16, out32, atol=0.1)
