"""Declarative value ranges of config fields: one `Range` says what a numeric field may hold.

Shared by the run's config checks (training/checks.py) and the encoder's own checks
(models/config.py validate), so both print the same kind of message: the field, the value and the
valid range, plus why when the range is not obvious.
"""
from __future__ import annotations

import dataclasses
import math
import numbers

INF = math.inf


def is_number(v) -> bool:
  """int or float, not bool (a bool is an int in Python but a switch in a config)."""
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class Range:
  """lo <= v <= hi (or < with lo_open / hi_open); `integer`: an int; `also`: extra allowed values
  (-1 = "the rest"); `length`: a tuple of that many numbers, each in range; `ordered`: a tuple whose
  values do not decrease ((min, max) pairs); `why`: appended to the message."""
  lo: float = -INF
  hi: float = INF
  lo_open: bool = False
  hi_open: bool = False
  integer: bool = False
  also: tuple = ()
  length: int = 0
  ordered: bool = False
  why: str = ''

  def describe(self) -> str:
    kind = 'an integer' if self.integer else 'a finite number'
    if self.lo > -INF and self.hi < INF:
      left, right = '(' if self.lo_open else '[', ')' if self.hi_open else ']'
      span = f'in {left}{_fmt(self.lo)}, {_fmt(self.hi)}{right}'
    elif self.lo > -INF:
      span = f'{">" if self.lo_open else ">="} {_fmt(self.lo)}'
    elif self.hi < INF:
      span = f'{"<" if self.hi_open else "<="} {_fmt(self.hi)}'
    else:
      span = ''
    out = f'{kind} {span}'.strip()
    if self.also:
      out += ' or ' + ' or '.join(map(str, self.also))
    if self.length:
      out = f'{self.length} values, each {out}' + (', not decreasing' if self.ordered else '')
    return out

  def _ok(self, v) -> bool:
    if not is_number(v) or not math.isfinite(v):   # NaN compares False to everything: refuse it
      return False
    if v in self.also:
      return True
    if self.integer and int(v) != v:
      return False
    if v < self.lo or (self.lo_open and v == self.lo):
      return False
    if v > self.hi or (self.hi_open and v == self.hi):
      return False
    return True

  def check(self, name: str, v) -> None:
    """Raises ValueError 'config.NAME=VALUE is out of range: must be ...' when v does not fit."""
    if self.length:
      ok = (isinstance(v, (tuple, list)) and len(v) == self.length and all(map(self._ok, v))
            and not (self.ordered and any(a > b for a, b in zip(v, v[1:]))))
    else:
      ok = self._ok(v)
    if not ok:
      why = f' ({self.why})' if self.why else ''
      raise ValueError(f'{name}={v!r} is out of range: must be {self.describe()}{why}.')


def _fmt(x: float) -> str:
  return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f'{x:g}'


# Shorthands for the tables.
def count(lo: int = 0, hi: float = INF, why: str = '', also: tuple = ()) -> Range:
  return Range(lo=lo, hi=hi, integer=True, why=why, also=also)


def positive(why: str = '') -> Range:
  return Range(lo=0.0, lo_open=True, why=why)


def nonneg(why: str = '') -> Range:
  return Range(lo=0.0, why=why)


def fraction(lo_open: bool = False, hi_open: bool = False, why: str = '') -> Range:
  return Range(lo=0.0, hi=1.0, lo_open=lo_open, hi_open=hi_open, why=why)
