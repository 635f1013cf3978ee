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
AutoAttack. 'autoattack-rand' is its version for randomised defences (`VERSIONS`): APGD-CE and
APGD-DLR with EOT over 20 draws of the model's randomness per gradient (`attacks.eot`).

Settings per (version, norm), as AutoAttack's `set_version`: at l_1 the standard version runs
APGD-CE with 5 restarts and APGD-T with 5 targets, both with the 3 / 2 / 1 eps schedule
(`largereps`, `attacks.l1`); FAB-T (9 targets) and Square (5,000 queries) as at l_inf / l_2.
The rand version: APGD-CE and APGD-DLR, 1 restart, `eot_draws` 20. PGD (a training attack) has no
l_1 form.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from adv_soups.attacks import apgd as apgd_lib
from adv_soups.attacks import eot as eot_lib
from adv_soups.attacks import fab as fab_lib
from adv_soups.attacks import pgd as pgd_lib
from adv_soups.attacks import square as square_lib

NUM_TARGETS = 9  # AutoAttack's targets for APGD-T and FAB-T (at most K - 1)
STANDARD = "standard"  # AutoAttack's version whose settings every entry carries
RAND = "rand"  # AutoAttack's version for randomised defences (EOT)
EOT_DRAWS = eot_lib.DEFAULT_DRAWS  # the rand version's draws per gradient (20)
L1_RESTARTS, L1_TARGETS = 5, 5  # the standard version at l_1: APGD-CE restarts, APGD-T targets
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
  full: like `stage` without rank / step_size, over all targets (None: the stages in turn, each
    example keeping the first stage's point that breaks it, else the first stage's point).
  settings: {(version, norm): {setting: value}}; `settings_for` falls back to the standard
    version's. restartable: whether `restarts` changes the attack (Square's does not).
  row_args: the stage and `full` take `logits_fn(x, *row_args)` and a `row_args=` tuple of
    per-row model inputs ([B, ...] each, e.g. the soup's mixing weights), so rows they compact
    inside the stage keep their own inputs (Square, FAB-T); other attacks get a logits_fn of
    the images alone.
  eot: the stage can average its gradients over draws of a randomised model (`eot_draws`).
  """
  name: str
  display: str
  stage: Callable[..., jax.Array]
  budget: str = "iterations"
  default_steps: int | None = 100
  targeted: bool = False
  min_classes: int = 2
  norms: tuple[str, ...] = ("linf", "l2", "l1")
  settings: Mapping[tuple[str, str], Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  breaks: Callable[..., jax.Array] = misclassified
  full: Callable[..., jax.Array] | None = None
  restartable: bool = True
  row_args: bool = False
  eot: bool = False
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

  def run_stage(self, f, images, labels, rng, *, rows=None, **kwargs) -> jax.Array:
    """`stage` on `f` (images -> logits). A `row_args` attack gets `rows` = (rows_fn, row_args)
    instead where given (`rows_fn(x, *row_args)` equals `f(x)`), so per-row model inputs move
    with the rows it compacts; `f` must then close over nothing per-row."""
    if self.row_args and rows is not None:
      rows_fn, row_args = rows
      return self.stage(rows_fn, images, labels, rng, row_args=tuple(row_args), **kwargs)
    return self.stage(f, images, labels, rng, **kwargs)

  def run_full(self, logits_fn, images, labels, rng, *, eps, norm, budget, settings,
               index=None, rows=None) -> jax.Array:
    """The whole attack on a batch (every target), adversarial images [B, H, W, C]; `rows` as
    in `run_stage`."""
    if self.full is not None:
      if self.row_args and rows is not None:
        return self.full(rows[0], images, labels, rng, eps=eps, norm=norm, budget=budget,
                         settings=settings, index=index, row_args=tuple(rows[1]))
      return self.full(logits_fn, images, labels, rng, eps=eps, norm=norm, budget=budget,
                       settings=settings, index=index)
    x = lax.stop_gradient(jnp.asarray(images, jnp.float32))
    index = pgd_lib._default_index(x, index)  # pylint: disable=protected-access
    num_classes = pgd_lib.num_classes_of(logits_fn, x)
    best = done = None
    for rank in range(self.num_stages(num_classes, settings.get("targets", 1))):
      x_adv = self.run_stage(logits_fn, x, labels, rng, rows=rows, eps=eps, norm=norm,
                             budget=budget, settings=settings, index=index, rank=rank,
                             step_size=0.0)
      ok = self.breaks(logits_fn, x_adv, x, labels, eps=eps, norm=norm)
      if best is None:  # the first stage's point, unless a later stage breaks the example
        best, done = x_adv, ok
      else:
        take = ok & ~done
        best = jnp.where(pgd_lib._bcast(take, x), x_adv, best)  # pylint: disable=protected-access
        done = done | ok
    return best


ATTACKS: dict[str, Attack] = {}
STANDARD_AUTOATTACK = ("apgd-ce", "apgd-t", "fab-t", "square")
WHITE_BOX_CORE = ("apgd-ce", "apgd-t")
RAND_AUTOATTACK = ("apgd-ce", "apgd-dlr")
SUITES: dict[str, tuple[str, ...]] = {
    "autoattack": STANDARD_AUTOATTACK,  # AutoAttack's standard version
    "autoattack-rand": RAND_AUTOATTACK,  # its version for randomised defences (EOT)
    "none": (),
}
VERSIONS = {"autoattack": STANDARD, "autoattack-rand": RAND}  # suite name -> its version


def version_of(text: Any) -> str:
  """The version a request's attack text asks for: 'rand' for 'autoattack-rand', else
  'standard' (the settings every attack runs with when named one by one)."""
  return VERSIONS.get(text.strip(), STANDARD) if isinstance(text, str) else STANDARD


def check_norm(names: Sequence[str], norm: str) -> None:
  """ValueError (one line) when an attack of `names` has no form for `norm`."""
  for n in names:
    if norm not in get(n).norms:
      have = [a for a in ATTACKS if norm in ATTACKS[a].norms]
      whole = [s for s, members in SUITES.items() if members and all(
          norm in ATTACKS[m].norms for m in members)]
      raise ValueError(f"attack {n!r} has no {norm} form: for norm={norm} use "
                       f"{', '.join(have + whole)}")


def check_eot(names: Sequence[str], eot_draws: Any) -> int | None:
  """`eot_draws` (None or an int >= 1) after checking every attack of `names` has an EOT form;
  ValueError (one line) otherwise."""
  if eot_draws is None:
    return None
  draws = eot_lib.check_draws(eot_draws)
  other = [n for n in names if not get(n).eot]
  if other:
    have = [n for n in ATTACKS if ATTACKS[n].eot]
    raise ValueError(f"EOT draws (--eot_draws={eot_draws}) apply to {', '.join(have)} only, "
                     f"not {', '.join(other)}: use --attack=autoattack-rand or {','.join(have)}")
  return draws


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


def _eot_factory(f, rng, index, draws):
  """APGD's EOT `state_factory` for `f`: a randomised model's `f.keyed(images, keys)` with its
  per-row keys `f.model_keys` (set by the runner), or a deterministic f (every draw the same)."""
  keyed = getattr(f, "keyed", None)
  if keyed is None:
    return eot_lib.eot_state_factory(lambda z, ks: f(z), pgd_lib.example_keys(rng, index), draws)
  return eot_lib.eot_state_factory(keyed, f.model_keys, draws)


def _apgd_stage(f, x, y, rng, *, eps, norm, budget, settings, index, rank, step_size):
  del rank, step_size
  draws = settings.get("eot_draws")
  factory = _eot_factory(f, rng, pgd_lib._default_index(x, index), draws) if draws else None  # pylint: disable=protected-access
  return apgd_lib.apgd(f, x, y, rng, eps=eps, num_steps=budget, norm=norm,
                       loss=settings["loss"], restarts=settings["restarts"], example_index=index,
                       largereps=settings.get("largereps", False), state_factory=factory)


def _apgd_t_stage(f, x, y, rng, *, eps, norm, budget, settings, index, rank, step_size):
  del step_size
  return apgd_lib.apgd_t_single(f, x, y, rng, rank, eps=eps, num_steps=budget, norm=norm,
                                restarts=settings["restarts"], example_index=index,
                                largereps=settings.get("largereps", False))[0]


def _apgd_t_full(f, x, y, rng, *, eps, norm, budget, settings, index):
  return apgd_lib.apgd_t(f, x, y, rng, eps=eps, num_steps=budget, norm=norm,
                         num_targets=settings["targets"], restarts=settings["restarts"],
                         example_index=index, largereps=settings.get("largereps", False))


def _fab_t_stage(f, x, y, rng, *, eps, norm, budget, settings, index, rank, step_size,
                 row_args=()):
  del step_size
  return fab_lib.fab_t_single(f, x, y, rng, rank, eps=eps, num_steps=budget, norm=norm,
                              restarts=settings["restarts"], example_index=index,
                              row_args=row_args)[0]


def _fab_t_full(f, x, y, rng, *, eps, norm, budget, settings, index, row_args=()):
  return fab_lib.fab_t(f, x, y, rng, eps=eps, num_steps=budget, norm=norm,
                       num_targets=settings["targets"], restarts=settings["restarts"],
                       example_index=index, row_args=row_args)


def _square_stage(f, x, y, rng, *, eps, norm, budget, settings, index, rank, step_size,
                  row_args=()):
  del rank, step_size, settings
  return square_lib.square(f, x, y, rng, eps=eps, num_queries=budget, norm=norm,
                           example_index=index, row_args=row_args)


def _settings(loss: str, targets: int | None = None, norms=("linf", "l2", "l1"), l1=None,
              rand: bool = False, **extra) -> dict:
  """The standard version's settings under `norms` (`l1`: what differs at l_1); `rand`: the rand
  version's too (1 restart, EOT over 20 draws)."""
  s = dict(restarts=1, loss=loss, **extra)
  if targets is not None:
    s["targets"] = targets
  out = {(STANDARD, n): dict(s, **(l1 or {}) if n == "l1" else {}) for n in norms}
  if rand:
    out.update({(RAND, n): dict(s, eot_draws=EOT_DRAWS) for n in norms})
  return out


for _attack in (
    Attack("pgd", "PGD", _pgd_stage, default_steps=None, norms=("linf", "l2"),
           settings=_settings("ce", norms=("linf", "l2"), step_size=None),  # None: 2.5 eps / k
           description="PGD-k on the cross-entropy, random start, step 2.5 eps / k"),
    Attack("apgd-ce", "APGD-CE", _apgd_stage, eot=True, settings=_settings(
        "ce", l1=dict(restarts=L1_RESTARTS, largereps=True), rand=True),
           description="APGD on the cross-entropy (Croce & Hein 2020)"),
    Attack("apgd-dlr", "APGD-DLR", _apgd_stage, min_classes=3, eot=True,
           settings=_settings("dlr", rand=True),
           description="APGD on the DLR loss"),
    Attack("apgd-t", "APGD-T", _apgd_t_stage, targeted=True, min_classes=4, full=_apgd_t_full,
           settings=_settings("dlr-targeted", NUM_TARGETS,
                              l1=dict(targets=L1_TARGETS, largereps=True)),
           description="APGD on the targeted DLR loss, 9 runner-up targets"),
    Attack("fab-t", "FAB-T", _fab_t_stage, targeted=True, full=_fab_t_full,
           breaks=misclassified_within_eps, settings=_settings("fab-targeted", NUM_TARGETS),
           row_args=True, description="targeted FAB, minimal-distortion points counted only within eps"),
    Attack("square", "Square", _square_stage, budget="queries",
           default_steps=square_lib.NUM_QUERIES, restartable=False, row_args=True,
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


def is_rand_reference(names: Sequence[str], budgets: Mapping[str, int], version: str,
                      eot_draws: int | None = None) -> bool:
  """True when `names` is AutoAttack's rand version at its reference budgets and 20 draws."""
  return (version == RAND and tuple(names) == RAND_AUTOATTACK
          and all(budgets.get(n) == ATTACKS[n].default_steps for n in names)
          and eot_draws in (None, EOT_DRAWS))


def suite_label(names: Sequence[str], budgets: Mapping[str, int] | None = None,
                version: str = STANDARD, eot_draws: int | None = None) -> str:
  """A short, file-name-safe label: 'autoattack' for the standard version at the reference
  budgets (any budgets when `budgets` is None), 'autoattack-rand' for the rand version at its
  reference settings, 'apgd-ce+apgd-t' otherwise, 'none' for clean accuracy only."""
  if not names:
    return "none"
  if version == RAND:
    ok = budgets is None or is_rand_reference(names, budgets, version, eot_draws)
    return "autoattack-rand" if ok and tuple(names) == RAND_AUTOATTACK else "+".join(names)
  if tuple(names) == STANDARD_AUTOATTACK and (budgets is None or is_reference(names, budgets)):
    return "autoattack"
  return "+".join(names)


def describe(names: Sequence[str], budgets: Mapping[str, int], version: str = STANDARD,
             norm: str = "linf", eot_draws: int | None = None) -> str:
  """What ran, in words: 'PGD-20', 'APGD-CE + APGD-T (100 iterations each)', or
  "AutoAttack, standard version: APGD-CE + APGD-T + FAB-T (100 iterations each; Square 5000
  queries)". A partial suite, or the suite at other budgets, is never called AutoAttack; nor is
  the rand version at other than 20 draws. The per-(version, norm) settings that differ from
  one restart / 9 targets (l_1: restarts, targets, the eps schedule; EOT draws) are named."""
  names = tuple(names)
  text = _describe(names, budgets, version, norm, eot_draws)
  extra = []
  for n in names:
    s = get(n).settings_for(norm, version)
    draws = eot_draws if (eot_draws is not None and get(n).eot) else s.get("eot_draws")
    bits = [f"{s['restarts']} restarts"] if s.get("restarts", 1) > 1 else []
    if get(n).targeted and s.get("targets", NUM_TARGETS) != NUM_TARGETS:
      bits.append(f"{s['targets']} targets")
    if s.get("largereps"):
      bits.append("eps schedule 3/2/1 eps")
    if draws:
      bits.append(f"EOT {draws} draws")
    if bits:
      extra.append(f"{display(n)}: {', '.join(bits)}")
  return text + (f" [{'; '.join(extra)}]" if extra else "")


def _describe(names, budgets, version, norm, eot_draws) -> str:
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
  if version == RAND:
    if is_rand_reference(names, budgets, version, eot_draws):
      return "AutoAttack, rand version (randomised defences): " + text
    return text + ", with EOT, not AutoAttack's rand version" if any(
        get(n).eot for n in names) else text
  if is_reference(names, budgets):
    return f"AutoAttack, standard version{' (l1)' if norm == 'l1' else ''}: " + text
  if names == STANDARD_AUTOATTACK:
    return text + ", AutoAttack's attacks at other budgets, not AutoAttack's standard version"
  if names == WHITE_BOX_CORE:
    return text + ", AutoAttack's white-box core, not the full AutoAttack"
  return text


def display(name: str) -> str:
  """'apgd-ce' -> 'APGD-CE'."""
  return ATTACKS[name].display if name in ATTACKS else name.upper()
