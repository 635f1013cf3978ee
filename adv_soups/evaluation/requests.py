"""Evaluation requests: everything a command line or a training config asks for, validated
before any compilation, and the data it reads.

`make_request` checks a request against a workdir (attacks, eps, norm, budgets, datasets, splits,
shifts, the alpha grid or the domain) and restores the model; a bad value is one ValueError line
naming it and what is allowed. The `Request` then yields the data batches of each dataset it
names and a file name that states its settings, so a report of other settings never overwrites
it.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from adv_soups import numbers
from adv_soups import data as data_lib
from adv_soups import soups
from adv_soups import threats as threats_lib
from adv_soups import workdir as workdir_lib
from adv_soups.attacks import registry

SHIFT_FAMILIES = {"imagenet2012_corrupted": "imagenet2012", "cifar10_corrupted": "cifar10"}
DEFAULT_SELECTION_EXAMPLES = 1000
PRECISION_FLAG = ("string", "precision", "float32", "float32 (default): evaluate in float32 "
                  "whatever the model's config computes in; model: the config's compute dtype "
                  "(e.g. bfloat16). The attacks' matmuls run at full precision either way.")


def parse_shifts(shifts: str | Sequence[str] | None) -> list[tuple[str, list[str]]]:
  """Shift groups [(group name, [dataset names])] from 'imagenet_r,imagenet2012_corrupted/*,...'.

  A corrupted family ('imagenet2012_corrupted', 'imagenet2012_corrupted/*', same for cifar10)
  expands to its 75 standard corruption x severity sets (reported as their mean); a specific
  set ('imagenet2012_corrupted/fog_3') or any other registered name is one dataset. ValueError
  for an unknown name (the message lists the allowed ones).
  """
  if shifts is None:
    return []
  items = shifts.split(",") if isinstance(shifts, str) else list(shifts)
  groups, seen = [], set()
  for item in (i.strip() for i in items):
    if not item or item in seen:
      continue
    seen.add(item)
    family = item[:-2] if item.endswith("/*") else item
    if family in SHIFT_FAMILIES:
      groups.append((family, data_lib.corrupted_datasets(SHIFT_FAMILIES[family])))
    else:
      data_lib.get_spec(item)
      groups.append((item, [item]))
  return groups


def check_dataset(name: str, config: ml_collections.ConfigDict) -> data_lib.DatasetSpec:
  """The spec of dataset `name` after checking the workdir's model can read it (classes and
  channels); ValueError naming the mismatch otherwise."""
  spec = data_lib.get_spec(name)
  if spec.num_classes != config.model.num_classes:
    raise ValueError(f"dataset {name!r} has {spec.num_classes} classes but the model in the "
                     f"workdir has {config.model.num_classes}")
  channels = config.model.get("channels", None)
  if channels and spec.channels != channels:
    raise ValueError(f"dataset {name!r} has {spec.channels}-channel images but the model takes "
                     f"{channels}")
  return spec


def split_size(name: str, split: str, data_dir: str | None) -> int | None:
  """Examples in `split` of dataset `name` when known (else None)."""
  return data_lib.split_size(name, split, data_dir)


def probe(data_dir: str | None, name: str, split: str, image_size: int) -> None:
  """Opens dataset `name` / `split` (one example) so a missing dataset or a bad split fails now,
  before any compilation: ValueError with one line saying what is wrong and how to fix it."""
  try:  # one example per process: every process's slice must be non-empty
    data_lib.eval_batches(name, split=split, batch_size=1, num_examples=jax.process_count(),
                          data_dir=data_dir, image_size=image_size)
  except data_lib.DatasetNotFoundError as e:
    raise ValueError(str(e)) from None
  except Exception as e:  # pylint: disable=broad-except (TFDS split errors vary by version)
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ValueError(f"cannot read split {split!r} of dataset {name!r}: {first}") from None


def parse_selection(text: str) -> tuple[str, str, int]:
  """'NAME:SPLIT[:N]' -> (name, split, N); N defaults to 1000."""
  parts = str(text).split(":")
  if len(parts) not in (2, 3) or not all(parts[:2]):
    raise ValueError(f"malformed --select_alpha_on={text!r}: expected NAME:SPLIT[:N], e.g. "
                     "imagenet_r:test:1000")
  n = DEFAULT_SELECTION_EXAMPLES
  if len(parts) == 3:
    try:
      n = int(parts[2])
      if n < 1:
        raise ValueError
    except ValueError:
      raise ValueError(f"malformed --select_alpha_on={text!r}: N must be an integer >= 1") from None
  return parts[0], parts[1], n


@dataclasses.dataclass
class Selection:
  """Alpha selection on a shift: choose on `dataset` split[:n], score on split[n:] (or
  split[n:n + num_heldout]): the selection never sees the examples it is scored on."""
  dataset: str
  split: str
  n: int
  num_heldout: int | None = None

  @property
  def selection_split(self) -> str:
    return f"{self.split}[:{self.n}]"

  @property
  def heldout_split(self) -> str:
    end = "" if self.num_heldout is None else str(self.n + self.num_heldout)
    return f"{self.split}[{self.n}:{end}]"


@dataclasses.dataclass
class Request:
  """A validated evaluation (see `make_request`); `loaded` holds the restored model.

  columns: int [A] domain ids or mixing weights [A, D]; labels: a name per column ('alpha0.5',
  'domain1'); alphas: the soup coefficients of the columns (None when the columns are domains).
  attacks / budgets: the suite, in order, and each attack's iterations (Square: queries).
  precision: 'float32' (the model computes in float32 whatever its config says) or 'model'
  (the config's compute dtype); the attacks' matmuls run at full precision either way.
  """
  loaded: Any
  columns: np.ndarray
  labels: list[str]
  alphas: list[float] | None
  attacks: tuple[str, ...]
  budgets: dict[str, int]
  eps: float
  norm: str
  dataset: str
  split: str
  num_examples: int | None
  batch_size: int
  shifts: list[tuple[str, list[str]]]
  data_dir: str | None
  seed: int = 0
  selection: Selection | None = None
  notes: list[str] = dataclasses.field(default_factory=list)
  precision: str = "float32"
  version: str = registry.STANDARD  # 'rand' for --attack=autoattack-rand (EOT)
  eot_draws: int | None = None  # None: the version's (rand: 20)
  dropout: float | None = None  # > 0: a randomised model (dropout on at evaluation)

  @property
  def config(self) -> ml_collections.ConfigDict:
    return self.loaded.config

  @property
  def description(self) -> str:
    """What attacks ran, in words (never calls a partial suite AutoAttack)."""
    return registry.describe(self.attacks, self.budgets, self.version, self.norm,
                             self.eot_draws)

  def data_batch_size(self, columns: int | None = None) -> int:
    """Examples per data batch when each is expanded to `columns` rows: ceil(batch_size / A),
    so an expanded batch holds about `batch_size` rows (host memory does not grow with A)."""
    columns = len(self.columns) if columns is None else columns
    return max(1, -(-self.batch_size // max(columns, 1)))

  def size(self, name: str, split: str | None = None, num_examples: int | None = None
           ) -> int | None:
    """Examples that `batches` yields for dataset `name` (None when the split size is unknown)."""
    spec = data_lib.get_spec(name)
    split = split or (self.split if name == self.dataset else spec.eval_split)
    size = split_size(name, split, self.data_dir)
    if num_examples is not None:
      size = num_examples if size is None else min(size, num_examples)
    return size

  def batches(self, name: str, split: str | None = None, num_examples: int | None = None,
              columns: int | None = None):
    """eval_batches of dataset `name` at the model's image size (split None: the request's own
    split for the main dataset, the dataset's eval split for others), clamped to the split's
    size, in batches of `data_batch_size(columns)` examples."""
    spec = data_lib.get_spec(name)
    if split is None:
      split = self.split if name == self.dataset else spec.eval_split
    if num_examples is not None:
      size = split_size(name, split, self.data_dir)
      if size is not None and num_examples >= size:
        num_examples = None  # the whole split (TFDS rejects a slice past its end)
    return data_lib.eval_batches(name, split=split, batch_size=self.data_batch_size(columns),
                                 num_examples=num_examples, data_dir=self.data_dir,
                                 image_size=self.config.model.image_size)

  def offset(self, name: str, split: str | None = None, num_examples: int | None = None) -> int:
    """The global index of this process's first example of `batches(name, split,
    num_examples)` (each process reads an even, contiguous slice): keys its random starts so
    that N processes give exactly the 1-process result."""
    count, index = jax.process_count(), jax.process_index()
    if count == 1 or index == 0:
      return 0
    spec = data_lib.get_spec(name)
    split = split or (self.split if name == self.dataset else spec.eval_split)
    size = split_size(name, split, self.data_dir)
    if num_examples is not None and (size is None or num_examples < size):
      split = f"{split}[:{int(num_examples)}]"
    return data_lib.process_offset(name, split, self.data_dir)

  def num_batches(self, name: str, split: str | None = None, num_examples: int | None = None,
                  columns: int | None = None) -> int | None:
    """How many data batches `batches` yields (None when the split's size is unknown)."""
    size = self.size(name, split, num_examples)
    if size is None:
      return None
    return data_lib.num_eval_batches(size, self.data_batch_size(columns), jax.process_count())

  def total_batches(self) -> int | None:
    """Data batches of the whole request (main dataset, shifts, selection): the progress total."""
    counts = [self.num_batches(self.dataset, self.split, self.num_examples)]
    counts += [self.num_batches(n, None, self.num_examples) for _, names in self.shifts
               for n in names]
    if self.selection:
      sel = self.selection
      counts += [self.num_batches(sel.dataset, sel.selection_split),
                 self.num_batches(sel.dataset, sel.heldout_split, columns=3)]
    return None if any(c is None for c in counts) else sum(counts)

  def name(self, kind: str) -> str:
    """A file name stating the settings: dataset, split, examples, suite and budgets, norm, eps,
    the columns and the checkpoint step, e.g.
    'eval_digits-test_n360_apgd-ce100+apgd-t100_linf-eps0.1_alpha0.5_step1200'."""
    n = "all" if self.num_examples is None else str(self.num_examples)
    if self.attacks:
      attack = "+".join(f"{a}{self.budgets[a]}" for a in self.attacks)
      if registry.is_reference(self.attacks, self.budgets):
        attack = f"autoattack{self.budgets['apgd-ce']}-sq{self.budgets['square']}"
      if registry.is_rand_reference(self.attacks, self.budgets, self.version, self.eot_draws):
        attack = f"autoattack-rand{self.budgets['apgd-ce']}"
      elif self.version != registry.STANDARD:
        attack = f"{self.version}-{attack}"
      if self.eot_draws is not None:
        attack += f"-eot{self.eot_draws}"
      threat = (f"_{self.norm}-eps"
                f"{_eps_text(self.eps) if self.norm != 'l1' else f'{self.eps:g}'}")
    else:
      attack, threat = "clean", ""
    if self.alphas is not None and len(self.alphas) > 1:
      a = self.alphas
      grid = np.linspace(a[0], a[-1], len(a)).tolist()
      cols = (f"alphas{a[0]:g}-{a[-1]:g}x{len(a)}" if np.allclose(a, grid)
              else "alphas" + "_".join(f"{x:g}" for x in a))
    else:
      cols = "-".join(self.labels)
    shifts = ("_shifts-" + "-".join(g for g, _ in self.shifts)) if self.shifts else ""
    sel = (f"_select-{self.selection.dataset}-{self.selection.split}{self.selection.n}"
           if self.selection else "")
    prec = "" if self.precision == "float32" else f"_precision-{self.precision}"
    prec += f"_dropout{self.dropout:g}" if self.dropout else ""
    text = (f"{kind}_{self.dataset}-{self.split}_n{n}_{attack}{threat}_{cols}{shifts}{sel}"
            f"{prec}_step{self.loaded.step}")
    return re.sub(r"[^A-Za-z0-9_.+\-]", "-", text)


def _eps_text(eps: float) -> str:
  """0.01568... -> '4-255' (an integer number of 255ths), else '%g'."""
  k = eps * 255
  return f"{round(k)}-255" if abs(k - round(k)) < 1e-6 and round(k) else f"{eps:g}"


def make_request(workdir: str, *, attack: str | Sequence[str] = "pgd",
                 eps: float | str | None = None, norm: str | None = None,
                 steps: int | None = None, square_queries: int | None = None,
                 dataset: str | None = None, split: str | None = None,
                 num_examples: int | None = None, batch_size: int | None = None,
                 shifts: Any = (), step: int | None = None, data_dir: str | None = None,
                 alphas: Sequence[float] | None = None, domain: int | None = None,
                 select_alpha_on: str | None = None, loaded: Any = None,
                 precision: str = "float32", eot_draws: int | None = None,
                 dropout: float | None = None) -> Request:
  """Checks a request and restores the model (unless `loaded` is given), compiling nothing.

  Exactly one of `alphas` (soups; [0] for a single-domain model) or `domain` names the columns.
  Defaults come from the workdir's config: eps / norm from its first threat (config.threats, or
  config.attack in a run without them), PGD's steps from
  config.eval.attack_steps (APGD and FAB: 100, Square: 5,000 queries), dataset from config.data
  (split: config.eval.split or the dataset's evaluation split), num_examples / batch_size from
  config.eval, data_dir from config.data. Raises ValueError or FileNotFoundError with one line
  naming the bad value and what is allowed. `precision`: 'float32' (default) evaluates a model
  whose config computes in bfloat16 with float32 compute; 'model' keeps the config's dtype.
  `attack='autoattack-rand'` is AutoAttack's version for randomised defences (APGD-CE and
  APGD-DLR with EOT over `eot_draws` draws per gradient, default 20); `dropout` (a rate in
  (0, 1)) evaluates a randomised model: dropout on at evaluation (training-time dropout is
  otherwise off). norm 'l1' (every attack but PGD) needs its own eps.
  """
  from adv_soups import loading  # loading builds on the attacks table; import late
  names = registry.parse_suite(attack)
  version = registry.version_of(attack)
  eot_draws = registry.check_eot(names, eot_draws)
  if dropout is not None and not 0.0 <= float(dropout) < 1.0:
    raise ValueError(f"--eval_dropout={dropout} must be in [0, 1) (0: a deterministic model)")
  if precision not in loading.PRECISIONS:
    raise ValueError(f"--precision={precision!r}: allowed {', '.join(loading.PRECISIONS)}")
  config = loaded.config if loaded is not None else workdir_lib.load_config(workdir)
  if loaded is None:
    loading.checkpoint_step(workdir, step)
  default = next(iter(threats_lib.normalise(config).values()))  # the first threat
  norm = norm or default["norm"]
  if norm not in ("linf", "l2", "l1"):
    raise ValueError(f"unknown norm {norm!r}: allowed linf, l2, l1")
  registry.check_norm(names, norm)
  if eps is None and norm == "l1" and names:  # training is never l_1: its eps is another ball's
    raise ValueError("--norm=l1 needs its own --eps (an l_1 radius in pixel units, e.g. 1 = one "
                     "pixel moved all the way); the run's training eps is a "
                     f"{default['norm']} radius")
  eps = numbers.parse_eps(default["eps"] if eps is None else eps, norm)
  for flag, value in (("steps", steps), ("square_queries", square_queries),
                      ("num_examples", num_examples), ("batch_size", batch_size)):
    if value is not None and (int(value) != value or value < 1):
      raise ValueError(f"--{flag}={value} must be an integer >= 1")
  budgets = registry.resolve_steps(names, steps, int(config.eval.attack_steps), square_queries)
  for n in names:  # the l_1 eps schedule needs >= 3 iterations
    from adv_soups.attacks import apgd
    apgd.check_largereps(norm, budgets[n], registry.get(n).settings_for(norm, version).get(
        "largereps", False))
  dataset = dataset or config.data.name
  spec = check_dataset(dataset, config)
  for n in names:
    need = registry.get(n).min_classes
    if spec.num_classes < need:
      raise ValueError(f"attack {n!r} needs >= {need} classes; {dataset!r} has "
                       f"{spec.num_classes}")
  split = split or config.eval.get("split", None) or spec.eval_split
  if num_examples is None and dataset == config.data.name:
    num_examples = config.eval.get("num_examples", None)
  groups = parse_shifts(shifts)
  for _, group in groups:
    check_dataset(group[0], config)
  data_dir = data_dir if data_dir is not None else config.data.get("data_dir", None)
  size = config.model.image_size
  num_domains = int(config.model.num_domains)
  columns, labels, alphas, notes = _columns(config, num_domains, alphas, domain)
  selection = None
  if select_alpha_on:
    selection = _selection(select_alpha_on, config, num_domains, num_examples, data_dir, workdir)
  probe(data_dir, dataset, split, size)
  for _, group in groups:
    for name in group:
      probe(data_dir, name, data_lib.get_spec(name).eval_split, size)
  if loaded is None:
    loaded = loading.load(workdir, step)
  loaded = loaded.with_precision(precision)
  return Request(loaded=loaded, columns=columns, labels=labels, alphas=alphas, attacks=names,
                 budgets=budgets, eps=eps, norm=norm, dataset=dataset, split=split,
                 num_examples=num_examples,
                 batch_size=int(batch_size or config.eval.batch_size), shifts=groups,
                 data_dir=data_dir, seed=int(config.get("seed", 0)), selection=selection,
                 notes=notes, precision=precision, version=version, eot_draws=eot_draws,
                 dropout=float(dropout) if dropout else None)


def _columns(config, num_domains: int, alphas, domain):
  """(columns, labels, alphas, notes) for the alpha grid or the domain."""
  if (alphas is None) == (domain is None):
    raise ValueError("give exactly one of --alpha=A (a soup, 0 = clean mode, 1 = robust mode) "
                     "or --domain=D (a domain id)")
  if domain is not None:
    if int(domain) != domain or not 0 <= domain < num_domains:
      raise ValueError(f"--domain={domain} is out of range: the model has {num_domains} "
                       f"domain(s), allowed 0..{num_domains - 1}")
    return np.asarray([int(domain)], np.int32), [f"domain{int(domain)}"], None, []
  alphas = [float(a) for a in alphas]
  if num_domains == 1:
    if len(alphas) == 1 and alphas[0] != 0:
      raise ValueError(f"--alpha={alphas[0]:g}: the workdir holds a single-domain model (no "
                       "soups); allowed --alpha=0 or --domain=0")
    note = (f"single-domain model (train.mode={config.train.get('mode')!r}): no soups, "
            "evaluated alpha-free as one row" + (" (--alphas ignored)" if len(alphas) > 1 else ""))
    return np.zeros([1], np.int32), ["alpha0"], None, [note] if len(alphas) > 1 else []
  weights = np.asarray(soups.mix_weights(alphas), np.float32)
  if num_domains > 2:
    weights = np.pad(weights, ((0, 0), (0, num_domains - 2)))
  return weights, [f"alpha{a:g}" for a in alphas], alphas, []


def _selection(text, config, num_domains, num_examples, data_dir, workdir) -> Selection:
  if num_domains == 1:
    raise ValueError(f"--select_alpha_on: {workdir!r} holds a single-domain model "
                     f"(train.mode={config.train.get('mode')!r}): there is no alpha to select")
  name, split, n = parse_selection(text)
  check_dataset(name, config)
  probe(data_dir, name, split, config.model.image_size)
  size = split_size(name, split, data_dir)
  if size is not None and size <= n:
    raise ValueError(f"--select_alpha_on={text}: split {split!r} of {name!r} has {size} "
                     f"examples, so none would be left to score after selecting on {n}")
  heldout = num_examples
  if size is not None and (heldout is None or n + heldout > size):
    heldout = size - n  # TFDS rejects a slice past the split's end
  return Selection(name, split, n, heldout)
