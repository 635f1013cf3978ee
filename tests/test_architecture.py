"""The package's shape: no import cycle, the library never imports a command line, the config
schema imports no TensorFlow, and training modes / evaluators plug in from outside the package."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "adv_soups")
# The programs: modules with a command line (`python -m adv_soups.X`) and the flag helpers they
# share. Nothing else may import them.
COMMAND_LINES = {"adv_soups.train", "adv_soups.evaluate", "adv_soups.sweep", "adv_soups.demo",
                 "adv_soups.cli", "adv_soups.training_cli", "adv_soups.export",
                 "adv_soups.models.summary", "adv_soups.experiments.adapters",
                 "adv_soups.experiments.threats"}


def package_modules(root: str = ROOT) -> dict[str, str]:
  """{dotted module name: file path} of every module of the package under `root`."""
  out = {}
  for directory, _, files in os.walk(os.path.join(root, "adv_soups")):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(directory, f)
        name = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
        out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
  return out


def imports_of(name: str, path: str, modules: dict[str, str]) -> set[str]:
  """The package modules that `name` imports anywhere in its file (top level or inside a
  function): `from adv_soups.a import b` is adv_soups.a.b when that is a module, else
  adv_soups.a."""
  out = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative import
        parts = name.split(".")[:len(name.split(".")) - node.level + path.endswith("__init__.py")]
        base = ".".join(parts + ([base] if base else []))
      for a in node.names:
        full = f"{base}.{a.name}"
        out.add(full if full in modules else base)
  return {m for m in out if m in modules and m != name}


def import_graph(root: str = ROOT) -> dict[str, set[str]]:
  modules = package_modules(root)
  return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle [a, b, ..., a] of `graph`, or None."""
  state: dict[str, int] = {}  # 1 = on the current path, 2 = done
  path: list[str] = []

  def visit(node):
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    state[node] = 2
    path.pop()
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_the_walker_sees_imports_and_finds_a_cycle(tmp_path):
  """The checks below could fail: on a tiny package with a cycle (one import inside a function)
  and a library module importing a command line, the walker reports both."""
  pkg = tmp_path / "adv_soups"
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "sub" / "__init__.py").write_text("")
  (pkg / "a.py").write_text("from adv_soups.sub import b\n")
  (pkg / "sub" / "b.py").write_text("def f():\n  from adv_soups import a\n  from . import c\n")
  (pkg / "sub" / "c.py").write_text("import adv_soups.train\n")
  (pkg / "train.py").write_text("")
  graph = import_graph(str(tmp_path))
  assert graph["adv_soups.sub.b"] == {"adv_soups.a", "adv_soups.sub.c"}
  assert find_cycle(graph) == ["adv_soups.a", "adv_soups.sub.b", "adv_soups.a"]
  assert graph["adv_soups.sub.c"] == {"adv_soups.train"}


def test_no_import_cycle_in_the_package():
  """Imports inside functions count: a late import that dodges a cycle is still one."""
  assert find_cycle(import_graph()) is None


def test_no_library_module_imports_a_command_line():
  graph = import_graph()
  assert COMMAND_LINES <= set(graph)  # the list names real modules
  bad = {m: sorted(graph[m] & COMMAND_LINES) for m in graph
         if m not in COMMAND_LINES and graph[m] & COMMAND_LINES}
  assert not bad


LIGHT_MODULES = ("adv_soups.training.config", "adv_soups.training", "adv_soups.training.modes",
                 "adv_soups.evaluators", "adv_soups.evaluators.robust", "adv_soups.numbers")


def test_the_config_schema_imports_no_tensorflow():
  """Reading the schema (with the default evaluator's fields, the modes table and number parsing)
  loads no TensorFlow, in a fresh interpreter (one, for speed: it reports after each import)."""
  code = ("import sys, importlib\n"
          f"for name in {LIGHT_MODULES!r}:\n"
          "  importlib.import_module(name)\n"
          "  if name.endswith('config'):\n"
          "    sys.modules[name].base_config()\n"
          "  print(name, sorted(k for k in sys.modules if k.split('.')[0] in "
          "('tensorflow', 'tensorflow_datasets')))\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
  assert out.returncode == 0, out.stderr
  assert out.stdout.splitlines() == [f"{name} []" for name in LIGHT_MODULES]


# ------------------------------------------------------------------------------------------------
# One source for each default.

def test_the_model_constructor_defaults_are_the_schemas():
  """create_model needs variant and image_size (the schema holds their defaults) and fills every
  other absent field with the schema's value."""
  import jax.numpy as jnp
  from adv_soups.models import create_model
  from adv_soups.training.config import base_config
  schema = base_config().model
  model = create_model(dict(variant=schema.variant, image_size=schema.image_size,
                            num_classes=schema.num_classes))
  full = create_model(schema)
  for field in ("adapter", "num_domains", "mean", "std", "dropout_rate", "drop_path_rate",
                "remat", "patch_size", "width", "depth", "num_heads", "mlp_dim"):
    assert getattr(model, field) == getattr(full, field), field
  assert model.dtype == jnp.float32 and schema.dtype == "float32"
  for missing in ("variant", "image_size"):
    fields = dict(variant="tiny/4", image_size=32, num_classes=10)
    del fields[missing]
    with pytest.raises(ValueError, match=f"model {missing} is required"):
      create_model(fields)


def test_the_data_pipeline_defaults_are_the_schemas():
  """A data config without a field reads the schema's value (no second copy in the pipeline)."""
  from adv_soups.data import pipeline
  from adv_soups.training.config import base_config
  schema = base_config().data
  for field in ("shuffle_buffer", "crop_min_scale", "prefetch", "data_dir", "image_size"):
    assert pipeline._field({"name": "digits"}, field) == schema[field], field
  settings = pipeline._randaugment_settings({"randaugment": {"num_ops": 2}})
  assert {k: settings[k] for k in ("magnitude", "magnitude_std", "prob")} == {
      k: schema.randaugment[k] for k in ("magnitude", "magnitude_std", "prob")}
  assert settings["fill"] == tuple(schema.randaugment.fill)
  assert pipeline._randaugment_settings({"name": "digits"}) is None  # the schema's: off
