"""bench/device_check.py: its smoke run on the CPU, the peak table and the noise rule."""
import json
import math

import pytest

from bench import device_check


def test_published_peaks_match_device_kinds():
  assert device_check.published_peak("NVIDIA H100 80GB HBM3")[0] == "H100 SXM"
  assert device_check.published_peak("NVIDIA H100 PCIe")[0] == "H100 PCIe"
  assert device_check.published_peak("NVIDIA H200")[1]["bfloat16"] == pytest.approx(989.4)
  assert device_check.published_peak("NVIDIA A100-SXM4-80GB")[0] == "A100"
  assert device_check.published_peak("TPU v4")[1]["bfloat16"] == 275.0
  assert device_check.published_peak("TPU v5")[0] == "TPU v5p"
  assert device_check.published_peak("cpu") == (None, None)


def test_binomial_agreement_is_three_sigma_of_the_difference():
  n, p = 360, 0.8
  sigma = math.sqrt(2 * p * (1 - p) / n)
  assert device_check.binomial_agreement(p + 1.4 * sigma, p - 1.4 * sigma, n)["within_noise"]
  assert not device_check.binomial_agreement(p + 1.6 * sigma, p - 1.6 * sigma, n)["within_noise"]


@pytest.mark.slow
def test_smoke_run_writes_every_section(tmp_path):
  out = tmp_path / "check.json"
  device_check.main(["--smoke", f"--out={out}"])
  result = json.loads(out.read_text())
  sections = result["sections"]
  for name in ("machine", "peaks", "vit_b16", "standard", "digits", "autoattack", "peak_memory"):
    assert name in sections and "error" not in sections[name], (name, sections.get(name))
  assert sections["vit_b16"]["images_per_sec"] > 0
  assert sections["peaks"]["measured"]["float32"]["median_gflops"] > 0
  digits = sections["digits"]
  assert set(digits["metrics"]) >= {"val/clean/robust_accuracy", "val/adversarial/robust_accuracy"}
  if digits.get("reference"):  # the smoke reference in bench/results was made on a CPU too
    assert set(digits["agreement"]) == set(digits["metrics"])
  aa = sections["autoattack"]
  assert aa["full_budgets"] is False and 0 <= aa["robust_accuracy"] <= aa["clean_accuracy"]
  assert sections["peak_memory"]["bytes"] > 0
