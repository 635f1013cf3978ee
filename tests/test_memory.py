"""The memory check before the first step (`adv_soups.memory`): programs compiled ahead of time,
their need against the device's (injected) memory, refusal before anything is written."""
import logging as py_logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adv_soups import memory, parallel, training, training_cli
from adv_soups.attacks import runner
from adv_soups.models import create_model
from configs import digits as digits_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def tiny_config(data_dir, eval_batch=64):
  """A 1-block ViT on digits, 4 steps, a PGD-2 evaluation every 2 steps."""
  config = digits_config.get_config()
  config.data.data_dir = data_dir
  config.model.update(depth=1, width=32, num_heads=2, mlp_dim=64)
  config.train.update(steps=4, batch_size=8, log_every=2, checkpoint_every=0)
  config.attack.num_steps = 2
  config.eval.update(num_examples=eval_batch, batch_size=eval_batch, attack_steps=2)
  for name in list(config.evals):
    config.evals[name].every = 2
  return config


def needs(data_dir, eval_batch):
  """[train step need, largest evaluation need] in bytes, measured by the module itself."""
  config = training.resolve_config(tiny_config(data_dir, eval_batch))
  mesh = parallel.make_mesh()
  model = create_model(config.model)
  optimizer = training.make_optimizer(config.optimizer, config.train.steps)
  state = jax.device_put(training.init_state(config, model, optimizer), parallel.replicated(mesh))
  programs = training.loop.training_programs(config, model, training.make_train_step(
      config, model, optimizer, mesh), state, mesh)
  return programs[0].needed, max(p.needed for p in programs[1:])


def test_need_is_arguments_outputs_temporaries_minus_aliased():
  f = jax.jit(lambda x, y: (x @ y, jnp.sin(x)), donate_argnums=0)
  compiled = f.lower(jnp.ones((64, 64)), jnp.ones((64, 64))).compile()
  stats = compiled.memory_analysis()
  expected = (stats.argument_size_in_bytes + stats.output_size_in_bytes
              + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
  assert memory.compiled_bytes(compiled) == expected
  assert expected >= 3 * 64 * 64 * 4  # two arguments and at least one new output
  p = memory.Program("p", compiled, field="x", value=64, resident=1000)
  assert p.needed == expected + 1000


def test_refusal_is_one_line_naming_field_need_available_and_a_value_to_try():
  f = jax.jit(lambda x: jnp.tanh(x) * 2)
  compiled = f.lower(jnp.ones((512, 1024))).compile()
  need = memory.compiled_bytes(compiled)
  p = memory.Program("PGD-20 at 224 px", compiled, field="config.eval.batch_size", value=512,
                     multiple=1)
  with pytest.raises(memory.DoesNotFit) as e:
    memory.check([p], available=need // 5)
  line = str(e.value)
  assert "\n" not in line
  assert line.startswith("config.eval.batch_size=512 needs ~")
  assert "for PGD-20 at 224 px" in line and "available: try " in line
  tried = int(line.rsplit("try ", 1)[1])
  # Scaled linearly, the suggestion fits under 90% of what is available and its double does not.
  assert tried * need / 512 <= 0.9 * need // 5 < 2 * tried * need / 512
  assert memory.check([p], available=need * 2) == []
  warned = memory.check([p], available=int(need * 1.05))
  assert len(warned) == 1 and "within 10%" in warned[0]


def test_available_bytes_reads_the_override_then_the_device(monkeypatch):
  monkeypatch.setenv(memory.ENV_OVERRIDE, "12345")
  assert memory.available_bytes() == 12345
  monkeypatch.delenv(memory.ENV_OVERRIDE)
  assert jax.local_devices()[0].memory_stats() is None  # CPU: MemAvailable
  assert memory._mem_available() > 0
  # Shared by the CPU devices (conftest's 8), each holding its own arguments and temporaries.
  # (Mutation: return MemAvailable whole -> 8x what a device may use, a late OOM on CPU.)
  monkeypatch.setattr(memory, "_mem_available", lambda: 8_000_000_007)
  assert jax.local_device_count() == 8
  assert memory.available_bytes() == 1_000_000_000


def compiles(caplog, name: str, shape: str = "") -> int:
  """How many times jax lowered-and-compiled `name` (e.g. 'jit(step_fn)') for arguments that
  include `shape` (e.g. 'float32[64,8,8,1]'), from the jax_log_compiles records."""
  return sum(1 for r in caplog.records
             if r.getMessage().startswith(f"Compiling {name} with global shapes")
             and shape in r.getMessage())


@pytest.mark.slow
def test_evaluation_that_cannot_fit_is_refused_before_the_first_step(data_dir, tmp_path,
                                                                     monkeypatch, capsys):
  train_need, eval_need = needs(data_dir, 512)
  assert eval_need > 2 * train_need  # PGD on 512 rows against a train batch of 8
  monkeypatch.setenv(memory.ENV_OVERRIDE, str((train_need + eval_need) // 2))
  capsys.readouterr()  # the data set preparation's progress bars
  workdir = str(tmp_path / "run")
  with pytest.raises(SystemExit) as e:
    training_cli.train_parsed(training.resolve_config(tiny_config(data_dir, 512)), workdir)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: config.eval.batch_size=512 needs ~"), err
  assert "periodic evaluation" in err[0] and "try " in err[0]
  assert not os.path.exists(workdir) or os.listdir(workdir) == []  # nothing written


@pytest.mark.slow
def test_a_config_that_fits_trains_and_runs_each_program_compiled_once(data_dir, tmp_path,
                                                                       monkeypatch, caplog):
  train_need, eval_need = needs(data_dir, 64)
  monkeypatch.setenv(memory.ENV_OVERRIDE, str(2 * (train_need + eval_need)))
  runner._cache.clear()  # needs() compiled the evaluation: the run must compile it once itself
  caplog.set_level(py_logging.WARNING)
  with jax.log_compiles(True):
    result = training.train_and_evaluate(tiny_config(data_dir, 64), str(tmp_path / "run"))
  assert int(result.state.step) == 4 and result.eval_metrics
  # One compilation of the step and of each full-batch evaluation stage (clean, PGD), though
  # the loop ran the step 4 times and the evaluation twice (the runner compiles the smaller
  # shapes of a stage's last, partial call as it meets them: they need less memory).
  assert compiles(caplog, "jit(step_fn)") == 1
  assert compiles(caplog, "jit(inner)", "float32[64,8,8,1]") == 2


@pytest.mark.slow
def test_evaluate_and_sweep_check_their_batch(trained_run, monkeypatch, capsys):
  from adv_soups import evaluate, sweep
  from adv_soups.evaluation import run
  workdir, data_dir = trained_run
  request = sweep.plan_sweep(workdir, "0:1:3", attack="pgd", steps=2, batch_size=96,
                             num_examples=64, data_dir=data_dir)
  run.check_memory(request, available=2 ** 50)  # fits: compiles, says nothing
  del request.memory_checked
  with pytest.raises(memory.DoesNotFit, match=r"^--batch_size=96 needs ~[\d.]+ [MG]B for PGD-2 "):
    run.check_memory(request, available=1)
  # The command line: one line, exit 2, nothing written.
  monkeypatch.setenv(memory.ENV_OVERRIDE, "1000")
  before = sorted(os.walk(workdir))
  for main, extra in ((evaluate.main, ["--domain=1"]), (sweep.main, ["--alphas=0,1"])):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
      main(["prog", f"--workdir={workdir}", "--attack=pgd", "--steps=2", "--num_examples=64",
            f"--data_dir={data_dir}"] + extra)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --batch_size="), err
  assert sorted(os.walk(workdir)) == before  # nothing written
