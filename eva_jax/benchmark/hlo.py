r"""Summaries of lowered (StableHLO) and compiled (HLO) programs: op counts per kind, collectives
with their bytes, group sizes and loop trips (tests/training/test_lowering.py,
experiments/aot_scaling.py).
"""
from __future__ import annotations

import collections
import math
import re
from typing import Any

import numpy as np


# What a lowered or compiled step contains (tests/training/test_lowering.py golden summaries,
# experiments/aot_scaling.py collective bytes). Text parsing, because jax exposes no structured
# view of an HLO module; the formats read are jax 0.10's StableHLO/Shardy text (`Lowered.as_text()`)
# and XLA's HLO text (`Compiled.as_text()`).
HOST_TRANSFER_OPS = ('infeed', 'outfeed', 'send', 'recv')


COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')


_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4,
                'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8}


_OP = re.compile(r'\b(stablehlo|sdy|mhlo|func)\.([a-z_]+)')


_CUSTOM_CALL = re.compile(r'custom_call @([\w$.\-]+)')


_DOT_TYPES = re.compile(r'stablehlo\.dot_general .*: \((tensor<[^>]*>), (tensor<[^>]*>)\) -> '
                        r'(tensor<[^>]*>)')  # one op per line in jax's text


_ELEM = re.compile(r'x?([a-z]+\d*)>$')


def _elem(tensor_type: str) -> str:
  m = _ELEM.search(tensor_type)
  return m.group(1) if m else tensor_type


def stablehlo_summary(text: str) -> dict[str, int]:
  """Counts per op kind of a lowered module (`jitted.trace(...).lower(...).as_text()`).

  Kinds: `while`, `dot_general A,B->C` (element types of operands and result, and the dot
  algorithm's operand and accumulation types when one is set), `custom_call
  TARGET`, `sharding_constraint`, host transfers (`infeed`, `outfeed`, `send`, `recv`), random bits
  (`rng_bit_generator`), and `args sharded over fsdp` / `args replicated` from the entry's Shardy
  annotations. Constants, elementwise ops and reshapes are left out: they change with every harmless
  edit, and what matters for speed on GPU/TPU is in the kinds kept."""
  counts: dict[str, int] = collections.Counter()
  for m in _OP.finditer(text):
    dialect, op = m.groups()
    if op in ('while', 'rng_bit_generator', *HOST_TRANSFER_OPS) or \
        (dialect == 'sdy' and op == 'sharding_constraint'):
      counts[op] += 1
  for m in _CUSTOM_CALL.finditer(text):
    counts[f'custom_call {m.group(1)}'] += 1
  for line in text.splitlines():
    m = _DOT_TYPES.search(line)
    if m:
      a, b, c = (_elem(t) for t in m.groups())
      # An explicit algorithm (e.g. bf16 x bf16 accumulating in f32) decides the operand precision
      # the hardware uses, whatever the operand types.
      alg = re.search(r'lhs_precision_type = (\w+), rhs_precision_type = (\w+), '
                      r'accumulation_type = (\w+)', line)
      key = f'dot_general {a},{b}->{c}'
      counts[key + (' algorithm {},{}->{}'.format(*alg.groups()) if alg else '')] += 1
  main = re.search(r'func\.func public @main\((.*?)\) -> ', text, re.S)
  if main:
    for arg in re.split(r'%arg\d+: ', main.group(1))[1:]:
      sh = re.search(r'sdy\.sharding<@\w+, \[(.*?)\]>', arg)
      counts['args sharded over fsdp' if sh and '"fsdp"' in sh.group(1) else
             'args sharded otherwise' if sh and '"' in sh.group(1) else 'args replicated'] += 1
  return dict(sorted(counts.items()))


def _type_bytes(types: str) -> int:
  """Bytes of an HLO result type, e.g. `f32[64,256]{1,0}` or a tuple of them."""
  total = 0
  for dtype, dims in re.findall(r'\b([a-z]+\d*)\[([\d,]*)\]', types):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(',') if d)
  return total


def _first_group(line: str) -> list[int]:
  """Device ids of the replica group holding device 0 of a collective's HLO line, from the three
  forms XLA prints: mesh['axis_0'=4,'axis_1'=2], device_ids=([2,4]T(1,0)) {'axis_0'} (axes of a
  reshaped device mesh, possibly permuted), iota [groups,size]<=[n], or explicit {{0,1},{2,3}}."""
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]([^{]*)\{([^}]*)\}", line)
  if m:
    axes = re.findall(r"'(\w+)'=(\d+)", m.group(1))
    shape = [int(v) for _, v in axes]
    ids = np.arange(math.prod(shape))
    perm = re.search(r'device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\)', m.group(2))
    if perm:
      ids = ids.reshape([int(v) for v in perm.group(1).split(',')])
      if perm.group(2):
        ids = ids.transpose([int(v) for v in perm.group(2).split(',')])
    ids = ids.reshape(shape)
    in_group = set(re.findall(r"'(\w+)'", m.group(3)))
    index = tuple(slice(None) if name in in_group else 0 for name, _ in axes)
    return sorted(int(i) for i in np.ravel(ids[index]))
  m = re.search(r'replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?', line)
  if m:
    groups, size = int(m.group(1)), int(m.group(2))
    ids = np.arange(groups * size).reshape([int(v) for v in m.group(3).split(',')])
    if m.group(4):
      ids = ids.transpose([int(v) for v in m.group(4).split(',')])
    return sorted(int(i) for i in ids.reshape(groups, size)[0])
  m = re.search(r'replica_groups=\{\{([\d,]*)\}', line)
  return sorted(int(v) for v in m.group(1).split(',')) if m and m.group(1) else [0]


def hlo_collectives(text: str) -> list[dict[str, Any]]:
  """The collectives of a compiled module (`compiled.as_text()`, after SPMD partitioning).

  One record per instruction: kind (all-gather, reduce-scatter, all-reduce, ...; the async
  -start halves counted once), result bytes, group size and the device ids of the group holding
  device 0 (which mesh axis it spans), the computation holding it, and `trips`:
  how many times it runs per step (the product of the known trip counts of the while loops around
  it: a scanned block's collectives run once per block), and jax's op_name (`transpose(jvp(...))`
  marks the backward pass). `full_bytes` is the unsharded size of the
  data: all-gather result, all-reduce operand, reduce-scatter operand (= result x group)."""
  comps: dict[str, list[str]] = {}
  name = None
  for line in text.splitlines():
    head = re.match(r'(?:ENTRY )?%([\w.\-]+) ', line)
    if head and not line.startswith(' '):
      name = head.group(1)
      comps[name] = []
    elif name is not None and line.startswith('  '):
      comps[name].append(line)
  entry = next((n for n in comps if re.search(rf'^ENTRY %{re.escape(n)} ', text, re.M)), None)
  # Calls between computations: while bodies multiply by their trip count, anything else by 1.
  callees: dict[str, list[tuple[str, int]]] = {n: [] for n in comps}
  for n, lines in comps.items():
    for line in lines:
      trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
      body = re.search(r'\bbody=%([\w.\-]+)', line)
      if body:
        callees[n].append((body.group(1), int(trips.group(1)) if trips else 1))
      for c in re.findall(r'(?:calls|to_apply|condition|branch_computations)=\{?%([\w.\-]+)', line):
        callees[n].append((c, 1))
  trips_of: dict[str, int] = {}
  stack = [(entry, 1)] if entry else []
  while stack:
    n, t = stack.pop()
    if n not in comps or trips_of.get(n, 0) >= t:
      continue
    trips_of[n] = t
    stack.extend((c, t * k) for c, k in callees[n])
  out = []
  for n, lines in comps.items():
    for line in lines:
      m = re.match(r'\s*%[\w.\-]+ = (.*?) (' + '|'.join(COLLECTIVES) + r')(-start)?\(', line)
      if not m:
        continue
      kind, size = m.group(2), _type_bytes(m.group(1))
      ids = _first_group(line)
      group = len(ids)
      if m.group(3) and kind in ('all-gather', 'all-reduce', 'reduce-scatter'):
        size = _type_bytes(m.group(1).rsplit('),', 1)[-1]) or size   # async: (operands), result
      full = size * group if kind == 'reduce-scatter' else size
      op_name = re.search(r'op_name="([^"]*)"', line)
      out.append({'kind': kind, 'bytes': size, 'full_bytes': full, 'group': group, 'group_ids': ids,
                  'computation': n, 'trips': trips_of.get(n, 1),
                  'op_name': op_name.group(1) if op_name else ''})
  return out


def collective_bytes_per_step(text: str) -> dict[str, float]:
  """Per kind: bytes each device sends per step with ring algorithms, from `hlo_collectives`:
  all-gather and reduce-scatter (g-1)/g of the full size, all-reduce 2(g-1)/g (a reduce-scatter
  then an all-gather), all-to-all (g-1)/g, collective-permute the whole buffer."""
  factor = {'all-gather': lambda g: (g - 1) / g, 'reduce-scatter': lambda g: (g - 1) / g,
            'all-reduce': lambda g: 2 * (g - 1) / g, 'all-to-all': lambda g: (g - 1) / g,
            'collective-permute': lambda g: 1.0}
  out: dict[str, float] = collections.defaultdict(float)
  for c in hlo_collectives(text):
    if c['group'] > 1 or c['kind'] == 'collective-permute':
      out[c['kind']] += c['full_bytes'] * c['trips'] * factor[c['kind']](max(c['group'], 1))
  return dict(out)
