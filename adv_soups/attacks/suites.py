"""The one table of attacks: names, display names, default budgets, and named suites.

Everything that runs or names an attack (the runner, the evaluation engine, `load()`, the demo,
the command lines) reads this table, so an attack is added in one place.

A *suite* is an ordered tuple of attack names run in sequence, each on the points every earlier
one failed on; a point is robust only if all of them fail. A request names a suite as one of
`SUITES` ('autoattack' is AutoAttack's standard version: APGD-CE, APGD-T, FAB-T, Square) or as a
comma list of attacks ('apgd-ce,apgd-t', AutoAttack's white-box core), or 'none' (clean only).
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Attack:
  """One attack of the table.

  name: the name requests use ('apgd-t'); display: the name reports print ('APGD-T').
  budget: what `steps` counts, 'iterations' (gradient attacks) or 'queries' (Square).
  default_steps: AutoAttack's default budget; None = the run's config.eval.attack_steps (PGD).
  targeted: one runner stage per target class (9 runner-up classes in AutoAttack).
  min_classes: the fewest classes the attack's loss is defined for.
  """
  name: str
  display: str
  budget: str = "iterations"
  default_steps: int | None = 100
  targeted: bool = False
  min_classes: int = 2
  description: str = ""


ATTACKS: dict[str, Attack] = {a.name: a for a in (
    Attack("pgd", "PGD", default_steps=None,
           description="PGD-k on the cross-entropy, random start, step 2.5 eps / k"),
    Attack("apgd-ce", "APGD-CE", description="APGD on the cross-entropy (Croce & Hein 2020)"),
    Attack("apgd-dlr", "APGD-DLR", min_classes=3, description="APGD on the DLR loss"),
    Attack("apgd-t", "APGD-T", targeted=True, min_classes=4,
           description="APGD on the targeted DLR loss, 9 runner-up targets"),
    Attack("fab-t", "FAB-T", targeted=True,
           description="targeted FAB, minimal-distortion points counted only within eps"),
    Attack("square", "Square", budget="queries", default_steps=5000,
           description="score-based Square attack (no gradients), margin loss"),
)}

STANDARD_AUTOATTACK = ("apgd-ce", "apgd-t", "fab-t", "square")
WHITE_BOX_CORE = ("apgd-ce", "apgd-t")
SUITES: dict[str, tuple[str, ...]] = {
    "autoattack": STANDARD_AUTOATTACK,  # AutoAttack's standard version
    "none": (),
}
NUM_TARGETS = 9  # AutoAttack's targets for APGD-T and FAB-T (at most K - 1)


def allowed_text() -> str:
  """'pgd, apgd-ce, ..., autoattack, none, or a comma list such as apgd-ce,apgd-t'."""
  return (", ".join(list(ATTACKS) + list(SUITES)) +
          ", or a comma list of attacks such as apgd-ce,apgd-t")


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


def suite_label(names: tuple[str, ...]) -> str:
  """A short, file-name-safe label: 'autoattack' for the standard version, 'apgd-ce+apgd-t'
  otherwise, 'none' for clean accuracy only."""
  if not names:
    return "none"
  if tuple(names) == STANDARD_AUTOATTACK:
    return "autoattack"
  return "+".join(names)


def resolve_steps(names: tuple[str, ...], steps: int | None, pgd_steps: int,
                  square_queries: int | None = None) -> dict[str, int]:
  """The budget of each attack: `steps` (when given) for the iteration attacks, else the table's
  default (PGD: `pgd_steps`, the run's config.eval.attack_steps); Square's queries from
  `square_queries` (default 5,000)."""
  out = {}
  for name in names:
    attack = ATTACKS[name]
    if attack.budget == "queries":
      out[name] = int(square_queries or attack.default_steps)
    elif steps is not None:
      out[name] = int(steps)
    else:
      out[name] = int(pgd_steps if attack.default_steps is None else attack.default_steps)
  return out


def describe(names: tuple[str, ...], budgets: dict[str, int]) -> str:
  """What ran, in words: 'PGD-20', 'APGD-CE + APGD-T (100 iterations each)', or
  "AutoAttack, standard version: APGD-CE + APGD-T + FAB-T (100 iterations each) + Square
  (5000 queries)". A partial suite is never called AutoAttack."""
  if not names:
    return "none (clean accuracy only)"
  if tuple(names) == ("pgd",):
    return f"PGD-{budgets['pgd']}"
  parts = []
  iters = sorted({budgets[n] for n in names if ATTACKS[n].budget == "iterations"})
  for n in names:
    a = ATTACKS[n]
    parts.append(f"{a.display}-{budgets[n]}" if n == "pgd" else a.display)
  text = " + ".join(parts)
  details = []
  if iters and not (len(names) == 1 and names[0] == "pgd"):
    details.append(f"{iters[0]} iterations" + (" each" if len(names) > 1 else "")
                   if len(iters) == 1 else "iterations " + "/".join(map(str, iters)))
  if "square" in names:
    details.append(f"Square {budgets['square']} queries")
  text += f" ({'; '.join(details)})" if details else ""
  if tuple(names) == STANDARD_AUTOATTACK:
    return "AutoAttack, standard version: " + text
  if tuple(names) == WHITE_BOX_CORE:
    return text + ", AutoAttack's white-box core, not the full AutoAttack"
  return text


def display(name: str) -> str:
  """'apgd-ce' -> 'APGD-CE'."""
  return ATTACKS[name].display if name in ATTACKS else name.upper()
