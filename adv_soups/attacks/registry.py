"""The attack registry: one entry per attack, owning what it is, what it costs and how it runs.

Everything that runs or names an attack (the runner, `load().attack`, the masking checks, the
command lines, `config.evals`) looks its name up here and calls the entry; nothing else branches
on attack names. Adding an attack is one module plus one `register(Attack(...))` call.

An entry says:
  - its name ('apgd-t') and display name ('APGD-T'); what its budget counts ('iterations' or
    'queries') and its default budget (AutoAttack's: 100 iterations, 5,000 queries; PGD has none:
    the run's config.eval.attack_steps);
  - whether it is targeted (one runner stage per runner-up class) and the fewest classes it needs;
  - the norms it supports and its settings per (suite version, norm): restarts, targets, and room
    for what other versions need (an eps schedule, EOT draws);
  - `stage`: how one stage runs on a batch (one target rank for a targeted attack), returning the
    adversarial images; `breaks`: how a stage's point counts (FAB-T: misclassified *and* within
    eps; the others: misclassified); `full`: the whole attack over all its targets for
    `load().attack` (default: the stages in turn, each example keeping its first breaking point).

A *suite* is an ordered tuple of attack names run in sequence, each on the points every earlier
one failed on. 'autoattack' is AutoAttack's standard version (APGD-CE, APGD-T, FAB-T, Square) at
the reference budgets; run with other budgets it is reported under its attacks' names, never as
AutoAttack.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from adv_soups.attacks import apgd as apgd_lib
from adv_soups.attacks import fab as fab_lib
from adv_soups.attacks import pgd as pgd_lib
from adv_soups.attacks import square as square_lib

NUM_TARGETS = 9  # AutoAttack's targets for APGD-T and FAB-T (at most K - 1)
STANDARD = "standard"  # AutoAttack's version whose settings every entry carries
BUDGET_KINDS = ("iterations", "queries")


def misclassified(logits_fn, x_adv, images, labels, *, eps, norm) -> jax.Array:
  """[B] bool: the point is misclassified (how most attacks' points count)."""
  del images, eps, norm
  return jnp.argmax(logits_fn(x_adv), axis=-1) != labels


def misclassified_within_eps(logits_fn, x_adv, images, labels, *, eps, norm) -> jax.Array:
  """[B] bool: misclassified *and* within eps of the clean image (FAB's minimal-distortion
  points may lie outside the ball; AutoAttack counts them only inside)."""
  wrong = jnp.argmax(logits_fn(x_adv), axis=-1) != labels
  return wrong & fab_lib.within_eps(x_adv, images, eps, norm)


@dataclasses.dataclass(frozen=True)
class Attack:
  """One registry entry.

  stage(logits_fn, images, labels, rng, *, eps, norm, budget, settings, index, rank, step_size)
    -> adversarial images [B, H, W, C]: one runner stage. `settings` is the dict of static
    settings (restarts, targets, loss, ...); eps, rank (the target rank, 0 for untargeted
    attacks) and step_size (0 = the attack's own) may be traced; index [B] keys each example's
    random stream.
  breaks(logits_fn, x_adv, images, labels, *, eps, norm) -> [B] bool: the stage broke the point.
  full: like `stage` without rank / step_size, over all targets (None: the stages in turn).
  settings: {(version, norm): {setting: value}}; `settings_for` falls back to the standard
    version's. restartable: whether `restarts` changes the attack (Square's does not).
  """
  name: str
  display: str
  stage: Callable[..., jax.Array]
  budget: str = "iterations"
  default_steps: int | None = 100
  targeted: bool = False
  min_classes: int = 2
  norms: tuple[str, ...] = ("linf", "l2")
  settings: Mapping[tuple[str, str], Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  breaks: Callable[..., jax.Array] = misclassified
  full: Callable[..., jax.Array] | None = None
  restartable: bool = True
  description: str = ""

  def __post_init__(self):
    if self.budget not in BUDGET_KINDS:
      raise ValueError(f"attack {self.name!r}: budget must be one of {BUDGET_KINDS}, got "
                       f"{self.budget!r}")
    if self.default_steps is not None and (int(self.default_steps) != self.default_steps
                                           or self.default_steps < 1):
      raise ValueError(f"attack {self.name!r}: default_steps must be an integer >= 1 or None")

  def settings_for(self, norm: str, version: str = STANDARD) -> dict:
    """The static settings of this attack in suite `version` under `norm` (a copy): restarts,
    targets (targeted attacks), loss, ...; the standard version's when `version` has none."""
    for key in ((version, norm), (STANDARD, norm), (STANDARD, "*")):
      if key in self.settings:
        return dict(self.settings[key])
    return dict(restarts=1, targets=NUM_TARGETS if self.targeted else 1)

  def num_stages(self, num_classes: int, targets: int) -> int:
    """Runner stages: min(targets, K - 1) for a targeted attack, else 1."""
    return min(int(targets), int(num_classes) - 1) if self.targeted else 1

  def run_full(self, logits_fn, images, labels, rng, *, eps, norm, budget, settings,
               index=None) -> jax.Array:
    """The whole attack on a batch (every target), adversarial images [B, H, W, C]."""
    if self.full is not None:
      return self.full(logits_fn, images, labels, rng, eps=eps, norm=norm, budget=budget,
                       settings=settings, index=index)
    x = lax.stop_gradient(jnp.asarray(images, jnp.float32))
    index = pgd_lib._default_index(x, index)  # pylint: disable=protected-access
    num_classes = pgd_lib.num_classes_of(logits_fn, x)
    best, done = x, jnp.zeros(x.shape[:1], bool)
    for rank in range(self.num_stages(num_classes, settings.get("targets", 1))):
      x_adv = self.stage(logits_fn, x, labels, rng, eps=eps, norm=norm, budget=budget,
                         settings=settings, index=index, rank=rank, step_size=0.0)
      ok = self.breaks(logits_fn, x_adv, x, labels, eps=eps, norm=norm) & ~done
      best = jnp.where(pgd_lib._bcast(ok, x), x_adv, best)  # pylint: disable=protected-access
      done = done | ok
    return best


ATTACKS: dict[str, Attack] = {}
STANDARD_AUTOATTACK = ("apgd-ce", "apgd-t", "fab-t", "square")
WHITE_BOX_CORE = ("apgd-ce", "apgd-t")
SUITES: dict[str, tuple[str, ...]] = {
    "autoattack": STANDARD_AUTOATTACK,  # AutoAttack's standard version
    "none": (),
}


def register(attack: Attack, *, replace: bool = False) -> Attack:
  """Adds `attack` to the registry (every runner, `load().attack` and the CLIs see it at once).
  ValueError when its name is taken (unless `replace`) or is a suite's name."""
  if not isinstance(attack, Attack):
    raise TypeError(f"register() takes an Attack, got {type(attack).__name__}")
  if attack.name in SUITES or "," in attack.name or not attack.name:
    raise ValueError(f"attack name {attack.name!r} is a suite's name or not a plain name")
  if attack.name in ATTACKS and not replace:
    raise ValueError(f"attack {attack.name!r} is already registered (replace=True to replace)")
  ATTACKS[attack.name] = attack
  return attack


def unregister(name: str) -> None:
  """Removes attack `name` (for tests that registered a toy one)."""
  ATTACKS.pop(name, None)


def allowed_text() -> str:
  """'pgd, apgd-ce, ..., autoattack, none, or a comma list such as apgd-ce,apgd-t'."""
  return (", ".join(list(ATTACKS) + list(SUITES)) +
          ", or a comma list of attacks such as apgd-ce,apgd-t")


def get(name: str) -> Attack:
  """The entry of attack `name`; ValueError listing the registered ones otherwise."""
  attack = ATTACKS.get(name)
  if attack is None:
    raise ValueError(f"unknown attack {name!r}: allowed {', '.join(ATTACKS)}")
  return attack


# ---------------------------------------------------------------------------------------------
# The attacks
# ---------------------------------------------------------------------------------------------
def _pgd_stage(f, x, y, rng, *, eps, norm, budget, settings, index, rank, step_size):
  del rank
  step = jnp.where(step_size > 0, step_size, 2.5 * eps / budget)
  return pgd_lib.pgd(f, x, y, rng, eps=eps, num_steps=budget, norm=norm, step_size=step,
                     restarts=settings["restarts"], loss=settings["loss"], example_index=index)


def _apgd_stage(f, x, y, rng, *, eps, norm, budget, settings, index, rank, step_size):
  del rank, step_size
  return apgd_lib.apgd(f, x, y, rng, eps=eps, num_steps=budget, norm=norm,
                       loss=settings["loss"], restarts=settings["restarts"], example_index=index)


def _apgd_t_stage(f, x, y, rng, *, eps, norm, budget, settings, index, rank, step_size):
  del step_size
  return apgd_lib.apgd_t_single(f, x, y, rng, rank, eps=eps, num_steps=budget, norm=norm,
                                restarts=settings["restarts"], example_index=index)[0]


def _apgd_t_full(f, x, y, rng, *, eps, norm, budget, settings, index):
  return apgd_lib.apgd_t(f, x, y, rng, eps=eps, num_steps=budget, norm=norm,
                         num_targets=settings["targets"], restarts=settings["restarts"],
                         example_index=index)


def _fab_t_stage(f, x, y, rng, *, eps, norm, budget, settings, index, rank, step_size):
  del step_size
  return fab_lib.fab_t_single(f, x, y, rng, rank, eps=eps, num_steps=budget, norm=norm,
                              restarts=settings["restarts"], example_index=index)[0]


def _fab_t_full(f, x, y, rng, *, eps, norm, budget, settings, index):
  return fab_lib.fab_t(f, x, y, rng, eps=eps, num_steps=budget, norm=norm,
                       num_targets=settings["targets"], restarts=settings["restarts"],
                       example_index=index)


def _square_stage(f, x, y, rng, *, eps, norm, budget, settings, index, rank, step_size):
  del rank, step_size, settings
  return square_lib.square(f, x, y, rng, eps=eps, num_queries=budget, norm=norm,
                           example_index=index)


def _settings(loss: str, targets: int | None = None, **extra) -> dict:
  """The standard version's settings under both norms."""
  s = dict(restarts=1, loss=loss, **extra)
  if targets is not None:
    s["targets"] = targets
  return {(STANDARD, "linf"): s, (STANDARD, "l2"): s}


for _attack in (
    Attack("pgd", "PGD", _pgd_stage, default_steps=None,
           settings=_settings("ce", step_size=None),  # None: 2.5 eps / k
           description="PGD-k on the cross-entropy, random start, step 2.5 eps / k"),
    Attack("apgd-ce", "APGD-CE", _apgd_stage, settings=_settings("ce"),
           description="APGD on the cross-entropy (Croce & Hein 2020)"),
    Attack("apgd-dlr", "APGD-DLR", _apgd_stage, min_classes=3, settings=_settings("dlr"),
           description="APGD on the DLR loss"),
    Attack("apgd-t", "APGD-T", _apgd_t_stage, targeted=True, min_classes=4, full=_apgd_t_full,
           settings=_settings("dlr-targeted", NUM_TARGETS),
           description="APGD on the targeted DLR loss, 9 runner-up targets"),
    Attack("fab-t", "FAB-T", _fab_t_stage, targeted=True, full=_fab_t_full,
           breaks=misclassified_within_eps, settings=_settings("fab-targeted", NUM_TARGETS),
           description="targeted FAB, minimal-distortion points counted only within eps"),
    Attack("square", "Square", _square_stage, budget="queries",
           default_steps=square_lib.NUM_QUERIES, restartable=False,
           settings=_settings("margin", p_init=square_lib.P_INIT),
           description="score-based Square attack (no gradients), margin loss"),
):
  register(_attack)
del _attack


# ---------------------------------------------------------------------------------------------
# Suites and budgets
# ---------------------------------------------------------------------------------------------
def parse_suite(text: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
  """The attacks a request runs, in order: 'autoattack' -> the four of the standard version,
  'apgd-ce,apgd-t' -> those two, 'none' / '' / None -> (). ValueError naming the bad part."""
  if text is None:
    return ()
  if isinstance(text, (tuple, list)):
    items = [str(t) for t in text]
  else:
    items = [t.strip() for t in str(text).split(",")]
  if len(items) == 1 and items[0] in SUITES:
    return SUITES[items[0]]
  if len(items) == 1 and items[0] == "":
    return ()
  names: list[str] = []
  for item in items:
    if item in SUITES and len(items) > 1:
      raise ValueError(f"--attack={text!r}: the suite {item!r} cannot be part of a comma list; "
                       f"allowed {allowed_text()}")
    if item not in ATTACKS:
      raise ValueError(f"unknown attack {item!r}: allowed {allowed_text()}")
    if item in names:
      raise ValueError(f"--attack={text!r} names {item!r} twice")
    names.append(item)
  return tuple(names)


def check_budget(name: str, value: Any, flag: str | None = None) -> int:
  """`value` as an integer budget >= 1; ValueError naming `flag` (default the attack) else."""
  what = flag or f"the budget of {name}"
  try:
    ok = int(value) == value and value >= 1
  except (TypeError, ValueError):
    ok = False
  if not ok or isinstance(value, bool):
    kind = ATTACKS[name].budget if name in ATTACKS else "iterations or queries"
    raise ValueError(f"{what}={value!r} must be an integer >= 1 ({kind})")
  return int(value)


def resolve_budgets(names: Sequence[str], num_steps: int | Mapping[str, int] | None = None, *,
                    pgd_steps: int | None = None,
                    square_queries: int | None = None) -> dict[str, int]:
  """The budget of each attack of `names`.

  num_steps: None (every attack its own default), an integer (the *iteration* attacks only;
    query attacks keep theirs), or {attack name: budget} (only those named; each must be run).
  pgd_steps: PGD's default (the run's config.eval.attack_steps); PGD without any is refused.
  square_queries: the budget of the query attacks (Square) when given.
  A budget below 1 (or not an integer) is a ValueError, never replaced by a default.
  """
  names = tuple(names)
  named: dict[str, Any] = {}
  if isinstance(num_steps, Mapping):
    for n, v in num_steps.items():
      if n not in names:
        raise ValueError(f"num_steps names attack {n!r}, which does not run (running: "
                         f"{', '.join(names) or 'none'})")
      named[n] = check_budget(n, v)
  elif num_steps is not None:
    check_budget("iteration attacks", num_steps, "num_steps")
  if square_queries is not None:
    check_budget("square", square_queries, "square_queries")
  out = {}
  for n in names:
    attack = get(n)
    if n in named:
      out[n] = named[n]
    elif attack.budget == "queries" and square_queries is not None:
      out[n] = int(square_queries)
    elif attack.budget == "iterations" and num_steps is not None and not isinstance(
        num_steps, Mapping):
      out[n] = int(num_steps)
    elif attack.default_steps is not None:
      out[n] = int(attack.default_steps)
    elif pgd_steps is not None:
      out[n] = check_budget(n, pgd_steps, "config.eval.attack_steps")
    else:
      raise ValueError(f"attack {n!r} has no default budget: give num_steps (e.g. "
                       f"num_steps={{{n!r}: 10}})")
  return out


def resolve_steps(names: Sequence[str], steps: int | None, pgd_steps: int,
                  square_queries: int | None = None) -> dict[str, int]:
  """`resolve_budgets` with the command line's arguments (`--steps` for the iteration attacks,
  PGD's default from config.eval.attack_steps, `--square_queries`)."""
  return resolve_budgets(names, steps, pgd_steps=pgd_steps, square_queries=square_queries)


def is_reference(names: Sequence[str], budgets: Mapping[str, int]) -> bool:
  """True when `names` is AutoAttack's standard suite at its reference budgets."""
  return tuple(names) == STANDARD_AUTOATTACK and all(
      budgets.get(n) == ATTACKS[n].default_steps for n in names)


def suite_label(names: Sequence[str], budgets: Mapping[str, int] | None = None) -> str:
  """A short, file-name-safe label: 'autoattack' for the standard version at the reference
  budgets (any budgets when `budgets` is None), 'apgd-ce+apgd-t' otherwise, 'none' for clean
  accuracy only."""
  if not names:
    return "none"
  if tuple(names) == STANDARD_AUTOATTACK and (budgets is None or is_reference(names, budgets)):
    return "autoattack"
  return "+".join(names)


def describe(names: Sequence[str], budgets: Mapping[str, int]) -> str:
  """What ran, in words: 'PGD-20', 'APGD-CE + APGD-T (100 iterations each)', or
  "AutoAttack, standard version: APGD-CE + APGD-T + FAB-T (100 iterations each; Square 5000
  queries)". A partial suite, or the suite at other budgets, is never called AutoAttack."""
  names = tuple(names)
  if not names:
    return "none (clean accuracy only)"
  if names == ("pgd",):
    return f"PGD-{budgets['pgd']}"
  parts = []
  iters = sorted({budgets[n] for n in names if ATTACKS[n].budget == "iterations"})
  for n in names:
    a = ATTACKS[n]
    parts.append(f"{a.display}-{budgets[n]}" if a.default_steps is None else a.display)
  text = " + ".join(parts)
  details = []
  if iters:
    details.append(f"{iters[0]} iterations" + (" each" if len(names) > 1 else "")
                   if len(iters) == 1 else "iterations " + "/".join(map(str, iters)))
  for n in names:
    if ATTACKS[n].budget == "queries":
      details.append(f"{ATTACKS[n].display} {budgets[n]} queries")
  text += f" ({'; '.join(details)})" if details else ""
  if is_reference(names, budgets):
    return "AutoAttack, standard version: " + text
  if names == STANDARD_AUTOATTACK:
    return text + ", AutoAttack's attacks at other budgets, not AutoAttack's standard version"
  if names == WHITE_BOX_CORE:
    return text + ", AutoAttack's white-box core, not the full AutoAttack"
  return text


def display(name: str) -> str:
  """'apgd-ce' -> 'APGD-CE'."""
  return ATTACKS[name].display if name in ATTACKS else name.upper()
