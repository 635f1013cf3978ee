"""`make demo` end to end, shrunk: train from scratch, then the soup sweep, in one process."""
import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_trains_then_sweeps(tmp_path):
  workdir = tmp_path / "demo"
  command = [sys.executable, "-m", "adv_soups.demo", f"--workdir={workdir}", "--attack=pgd",
             "--num_examples=24", f"--config.data.data_dir={tmp_path / 'tfds'}",
             "--config.train.steps=8", "--config.evals.val.every=0",
             "--config.train.checkpoint_every=0", "--config.model.depth=1",
             "--config.eval.num_examples=24", "--config.eval.attack_steps=1"]
  # As on a user's CPU-only machine: no device count in XLA_FLAGS (conftest's 8 taken out), so the
  # program splits the CPU for its batch of 128 (adv_soups.host_devices).
  env = dict(os.environ, XLA_FLAGS=re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                                          os.environ.get("XLA_FLAGS", "")))
  env.pop("ADV_SOUPS_CPU_DEVICES", None)
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Devices: 4 x cpu (4 per process)" in (workdir / "train.log").read_text()
  assert "[demo] 2/2" in result.stdout and "alpha  clean %  robust %" in result.stdout
  table = [line for line in result.stdout.splitlines() if line.strip().startswith(("0 ", "1 "))]
  assert len(table) == 2  # the alpha = 0 and alpha = 1 rows (11 rows in all)
  (report,) = (workdir / "sweep").glob("sweep_*.json")  # named by its settings
  summary = json.loads(report.read_text())
  assert len(summary["results"]) == 11 and summary["num_examples"] == 24
  assert "pgd1" in report.name and "alphas0-1x11" in report.name
  assert report.with_suffix(".png").stat().st_size > 1000
  assert f"[demo] wrote {report.with_suffix('')}" in result.stdout
  # Re-running resumes the finished run (no retraining) and sweeps again.
  again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "already trained to step 8" in again.stdout  # one plain line; absl's is in train.log


def test_demo_rejects_a_bad_attack_before_training(tmp_path):
  workdir = tmp_path / "demo"
  result = subprocess.run([sys.executable, "-m", "adv_soups.demo", f"--workdir={workdir}",
                           "--attack=fgsm"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith("error: --attack='fgsm': unknown attack")
  assert not workdir.exists()
