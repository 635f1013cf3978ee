"""Numbers from text, below both the command lines and the library: eps ('4/255'), soup alphas
('0:1:11'), and fractions in `--config.a.b=4/255` overrides. Errors are ValueErrors whose one line
names the bad value and the accepted forms (the programs turn them into `error: ...`, exit 2).
"""
from __future__ import annotations

import fractions
import math
import re


def parse_number(text: str, what: str = "value") -> float:
  """'0.1', '4/255' or '1e-2' -> float. Raises ValueError naming `what` and the accepted forms."""
  text = str(text).strip()
  try:
    if "/" in text:
      num, den = text.split("/")
      return float(fractions.Fraction(num.strip()) / fractions.Fraction(den.strip()))
    return float(text)
  except (ValueError, ZeroDivisionError):
    raise ValueError(f"malformed {what} {text!r}: expected a number such as 0.1 or a fraction "
                     "such as 4/255") from None


def parse_eps(text: str | float, norm: str = "linf") -> float:
  """eps in pixel units from '0.1' or '4/255'; l_inf eps must be in [0, 1], l_2 eps >= 0."""
  eps = text if isinstance(text, (int, float)) else parse_number(text, "--eps")
  eps = float(eps)
  high = 1.0 if norm == "linf" else float("inf")
  if not 0.0 <= eps <= high:
    allowed = "[0, 1] for linf" if norm == "linf" else ">= 0 for l2"
    raise ValueError(f"--eps={text} is out of range: allowed {allowed}")
  return eps


def parse_alphas(text: str, extrapolate: bool = False) -> list[float]:
  """Soup coefficients from 'START:STOP:NUM' (NUM evenly spaced values, both ends included),
  a comma list '0,0.25,1' or one value '0.5'. Values must lie in [0, 1] unless `extrapolate`."""
  text = str(text).strip()
  grid = re.fullmatch(r"([^:]+):([^:]+):([^:]+)", text)
  try:
    if grid:
      start, stop = (parse_number(g, "alpha") for g in grid.groups()[:2])
      num = int(grid.group(3))
      if num < 1:
        raise ValueError
      if num == 1:
        alphas = [start]
      else:
        alphas = [start + (stop - start) * i / (num - 1) for i in range(num)]
    else:
      alphas = [parse_number(t, "alpha") for t in text.split(",")]
  except ValueError:
    raise ValueError(f"malformed --alphas={text!r}: expected START:STOP:NUM (e.g. 0:1:11, NUM an "
                     "integer >= 1) or a comma-separated list (e.g. 0,0.25,1)") from None
  alphas = [round(a, 10) + 0.0 for a in alphas]  # 0.30000000000000004 -> 0.3; -0.0 -> 0.0
  if not extrapolate:
    bad = [a for a in alphas if not 0.0 <= a <= 1.0]
    if bad:
      raise ValueError(f"--alphas={text} has values outside [0, 1] ({', '.join(map(str, bad))}); "
                       "pass --extrapolate to allow them")
  elif not all(math.isfinite(a) for a in alphas):
    raise ValueError(f"--alphas={text} contains a non-finite value: allowed finite numbers")
  return alphas


def fractions_to_numbers(argv: list[str]) -> list[str]:
  """`--config.attack.eps=4/255` -> `--config.attack.eps=0.01568...` (absl parses floats only)."""
  out = []
  for arg in argv:
    name, sep, value = arg.partition("=")
    if sep and name.startswith("--config.") and "/" in value and not name.endswith("data_dir"):
      try:
        value = repr(parse_number(value, name))
      except ValueError:
        pass  # not a fraction (e.g. a path): let the flag parser judge it
    out.append(name + sep + value if sep else arg)
  return out
