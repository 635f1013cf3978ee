"""The programs' persistent compilation cache (`adv_soups.compile_cache`)."""
import os
import subprocess
import sys

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from adv_soups import compile_cache


@pytest.fixture
def jax_cache_dir():
  """Restores JAX's cache directory (and its once-per-process cache state) after the test."""
  before = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", None)
  yield
  jax.config.update("jax_compilation_cache_dir", before)
  jax_cache.reset_cache()


def test_settings_choose_the_directory(jax_cache_dir, monkeypatch, tmp_path):
  """'off' leaves JAX alone; 'auto' is $XDG_CACHE_HOME/adv_soups/xla; a path is that path; a
  directory the user gave JAX wins."""
  assert compile_cache.enable("off") is None
  assert jax.config.jax_compilation_cache_dir is None
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert compile_cache.enable("auto") == str(tmp_path / "xdg" / "adv_soups" / "xla")
  jax.config.update("jax_compilation_cache_dir", None)
  monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "mine"))
  assert compile_cache.enable() == str(tmp_path / "mine")
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")
  assert compile_cache.enable(str(tmp_path / "other")) == str(tmp_path / "mine")  # set: kept


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
  """A program's compiled executable lands in the cache directory, and a second process gets the
  same results from it without compiling (JAX's cache-hit log line)."""
  script = (
      "import sys, logging, jax, jax.numpy as jnp\n"
      "from adv_soups import compile_cache\n"
      "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
      "compile_cache.enable(sys.argv[1])\n"
      "logging.basicConfig(level=logging.DEBUG)\n"
      "f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(0))\n"
      "print(list(f(jnp.arange(12.0).reshape(3, 4) / 10)))\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  runs = [subprocess.run([sys.executable, "-c", script, str(tmp_path / "cache")], env=env,
                         capture_output=True, text=True, check=True) for _ in range(2)]
  assert os.listdir(tmp_path / "cache")
  assert runs[0].stdout == runs[1].stdout
  assert "cache hit" not in runs[0].stderr.lower()
  assert "persistent compilation cache hit" in runs[1].stderr.lower()


@pytest.mark.parametrize("program", ["evaluate", "train"])
def test_programs_turn_it_on_after_their_flags_parse(program, jax_cache_dir, monkeypatch,
                                                     tmp_path, capsys):
  """Both flag parsers (cli.parse_flags: evaluate, sweep, export; training_cli: train, demo, the
  experiments) turn the cache on once the flags parse; a bad flag exits 2 before it."""
  from adv_soups import evaluate, train
  main = {"evaluate": evaluate.main, "train": train.main}[program]
  monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "cache"))
  with pytest.raises(SystemExit) as exit_info:
    main([program, "--no_such_flag=1"])
  assert exit_info.value.code == 2
  assert jax.config.jax_compilation_cache_dir is None
  with pytest.raises(SystemExit) as exit_info:  # parses, then refuses: --workdir / --config missing
    main([program])
  assert exit_info.value.code == 2
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache")
  assert not (tmp_path / "cache").exists()  # nothing written: nothing was compiled
