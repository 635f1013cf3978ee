"""adv_soups: clean/adversarial co-training of ViTs with domain adapters, and adapter soups.

`adv_soups.load(workdir)` returns a trained model (predict / soup / attack at any alpha); see
`adv_soups.loading`. Submodules are imported lazily, so `import adv_soups` stays cheap.
"""
import os

# Before TensorFlow loads (every `python -m adv_soups.X` runs this first): no C++ INFO lines and
# no oneDNN banner, so a program's screen starts with our own lines. A value the user set wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

# Before XLA's threads first allocate: keep XLA:CPU's buffers mapped between calls (see host_memory).
from adv_soups import host_memory as _host_memory  # noqa: E402

_host_memory.tune_on_import()

__version__ = "0.1.0"


def load(workdir: str, step: int | None = None):
  """The trained model of `workdir` at checkpoint `step` (default latest): see `loading.load`."""
  from adv_soups import loading
  return loading.load(workdir, step)


__all__ = ["__version__", "load"]
