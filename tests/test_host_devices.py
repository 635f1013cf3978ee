"""The training programs split a CPU-only host into several jax devices (adv_soups.host_devices)."""
import os
import subprocess
import sys

import pytest

from adv_soups import host_devices, training_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("batch, multiple, expected", [
    (128, 1, 4), (6, 1, 2), (7, 1, 1), (8, 2, 4), (12, 2, 2), (6, 2, 1), (None, 1, 1),
    ("128", 1, 1), (True, 1, 1), (0, 1, 1)])
def test_auto_count_is_the_largest_of_4_and_2_that_divides_the_batch(monkeypatch, batch, multiple,
                                                                     expected):
  monkeypatch.delenv(host_devices.ENV, raising=False)
  assert host_devices.requested_count(batch, multiple) == expected


def test_the_environment_setting_wins_and_a_bad_one_is_one_line(monkeypatch):
  monkeypatch.setenv(host_devices.ENV, "3")
  assert host_devices.requested_count(128) == 3
  for bad in ("0", "four", "-2", "2.5"):
    monkeypatch.setenv(host_devices.ENV, bad)
    with pytest.raises(ValueError, match=rf"ADV_SOUPS_CPU_DEVICES='{bad}': allowed values are "
                                         r"integers >= 1"):
      host_devices.requested_count(128)


@pytest.fixture
def cpu_host(monkeypatch):
  """A CPU-only single-process host whose jax backend has not started, XLA_FLAGS unset."""
  monkeypatch.delenv(host_devices.ENV, raising=False)
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
  monkeypatch.setattr(host_devices.host_memory, "accelerator_installed", lambda: False)
  monkeypatch.setattr(host_devices, "_backend_started", lambda: False)
  monkeypatch.setattr(host_devices, "_multi_process", lambda: False)
  return monkeypatch


def test_split_appends_the_device_count_to_xla_flags(cpu_host):
  cpu_host.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
  assert host_devices.split_for_training(64) == 4
  assert os.environ["XLA_FLAGS"] == ("--xla_cpu_enable_fast_math=false "
                                     "--xla_force_host_platform_device_count=4")


@pytest.mark.parametrize("why", ["flag", "jax_setting", "accelerator", "started", "multi_process",
                                 "one"])
def test_split_leaves_jax_alone(cpu_host, why):
  flags = "--xla_force_host_platform_device_count=8" if why == "flag" else ""
  cpu_host.setenv("XLA_FLAGS", flags)
  if why == "jax_setting":  # JAX_NUM_CPU_DEVICES overrides the XLA flag
    cpu_host.setenv("JAX_NUM_CPU_DEVICES", "2")
  elif why == "accelerator":
    cpu_host.setattr(host_devices.host_memory, "accelerator_installed", lambda: True)
  elif why == "started":
    cpu_host.setattr(host_devices, "_backend_started", lambda: True)
  elif why == "multi_process":
    cpu_host.setattr(host_devices, "_multi_process", lambda: True)
  elif why == "one":
    cpu_host.setenv(host_devices.ENV, "1")
  assert host_devices.split_for_training(128) == 1
  assert os.environ["XLA_FLAGS"] == flags


def test_the_backend_of_this_test_process_counts_as_started():
  import jax
  jax.devices()
  assert host_devices._backend_started()


def test_a_fresh_cpu_process_gets_the_devices_asked_for():
  """No stubs: in a fresh process whose jax has not started, the split takes effect. (Mutation:
  `_backend_started` always True, as when jax's private API moves -> 1 device.)"""
  probe = ("import adv_soups, jax\nfrom adv_soups import host_devices\n"
           "started = host_devices._backend_started()\n"
           "print(started, host_devices.split_for_training(128), jax.device_count())")
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", host_devices.ENV)}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                       timeout=120, check=True).stdout.split()
  assert out == ["False", "4", "4"]


def test_training_program_splits_for_its_batch_with_mixup_pairs(cpu_host, tmp_path):
  """The CLI asks for devices from the raw config's batch before anything starts JAX; mixup pairs
  examples on a device. (Mutation: drop the call in parse_command_line -> XLA_FLAGS unset.)"""
  seen = []
  cpu_host.setattr(training_cli.training, "resolve_config", lambda raw: seen.append(
      os.environ.get("XLA_FLAGS")) or (_ for _ in ()).throw(ValueError("stop here")))
  argv = ["train", "--config=configs/digits.py", f"--workdir={tmp_path}",
          "--config.train.batch_size=20", "--config.data.mixup.mixup_alpha=0.2"]
  cwd = os.getcwd()
  try:
    os.chdir(REPO)
    with pytest.raises(SystemExit) as exit_info:
      training_cli.parse_command_line(argv, training_cli.define_flags())
  finally:
    os.chdir(cwd)
  assert exit_info.value.code == 2
  assert seen == ["--xla_force_host_platform_device_count=2"]  # 20 / (4 * 2) is not whole


def test_a_bad_setting_exits_2_with_one_line(cpu_host, tmp_path, capsys):
  cpu_host.setenv(host_devices.ENV, "many")
  argv = ["train", f"--config={REPO}/configs/digits.py", f"--workdir={tmp_path}"]
  with pytest.raises(SystemExit) as exit_info:
    training_cli.parse_command_line(argv, training_cli.define_flags())
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["error: ADV_SOUPS_CPU_DEVICES='many': allowed values are integers >= 1 "
                 "(1: one device)"]
  assert not list(tmp_path.iterdir())


def test_a_bad_setting_is_not_read_where_jax_is_left_alone(cpu_host):
  cpu_host.setenv(host_devices.ENV, "many")
  cpu_host.setattr(host_devices.host_memory, "accelerator_installed", lambda: True)
  assert host_devices.split_for_training(128) == 1


def test_a_batch_the_cpu_devices_cannot_divide_names_the_setting(tmp_path):
  from adv_soups import training
  from conftest import tiny_digits_config
  config = tiny_digits_config(str(tmp_path / "tfds"), batch_size=12)  # conftest's 8 devices
  with pytest.raises(ValueError, match=r"config.train.batch_size=12 must be a multiple of the 8 "
                                       r"devices \(on CPU, \$ADV_SOUPS_CPU_DEVICES or XLA_FLAGS"):
    training.resolve_config(config)
