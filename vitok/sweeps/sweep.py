r"""Sweeps: a base config and a set of members, each a few fields changed, run as normal runs.

A sweep config file (e.g. configs/sweeps/vitok_sizes.py) holds

    base     the config every member starts from, as `--config` takes it ('configs/vitok.py:demo')
    members  a list of {dotted field: value}, built with the helpers below
    dit      '' or the argument of configs/dit.py for a DiT chained on every member's latents;
             a member's fields that start with 'dit.' set that DiT's fields ('dit.total_steps')
    evaluate whether `launch.eval` evaluates every tokenizer after training (every metric,
             rFVD / rFID included); False keeps the training run's own final evaluation

The helpers build member lists the way hyperparameter tools do (xmanager's `hyper`):

    sweep('model.channels', [4, 8, 16])                  -> 3 members
    product(sweep('a', [1, 2]), sweep('b', [3, 4]))      -> 4 members: the grid
    zipped(sweep('a', [1, 2]), sweep('b', [3, 4]))       -> 2 members: a=1,b=3 and a=2,b=4
    chain(list_1, list_2)                                -> list_1's members, then list_2's
    [{'a': 1}, {'a': 2, 'b': 5}]                         -> a plain list is a list of members

Every member is a normal run of the launch commands (the same code path as by hand), in
DIR/<name>/: `tokenizer/` (launch.train, then launch.eval unless `evaluate` is False), and with a DiT `latents/`
(launch.encode), `dit/` (launch.train, then launch.eval). A member's name is made of the fields
that vary across the sweep (`channels-8_variant-cpu128-cpu256-4x8`), so it stays the same when
members are added and a rerun finds its directory again.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import os
import re
import shlex
import sys
from typing import Any, Sequence

import ml_collections

from vitok.core import config_checks
from vitok.sweeps import chain as chain_lib

Members = list[dict[str, Any]]


# --- building member lists ---


def sweep(field: str, values: Sequence[Any]) -> Members:
  """One member per value of `field`."""
  return [{field: v} for v in values]


def product(*axes: Members) -> Members:
  """Every combination of one member from each of `axes` (the grid), the last axis fastest."""
  members = [{}]
  for axis in axes:
    members = [{**m, **a} for m in members for a in axis]
  _check_disjoint(axes, 'product')
  return members


def zipped(*axes: Members) -> Members:
  """The i-th members of all `axes` merged, for axes of equal length."""
  lengths = {len(a) for a in axes}
  if len(lengths) > 1:
    raise ValueError(f'zipped() needs axes of equal length, got {[len(a) for a in axes]}')
  _check_disjoint(axes, 'zipped')
  return [dict(itertools.chain.from_iterable(m.items() for m in group)) for group in zip(*axes)]


def chain(*lists: Members) -> Members:
  """The members of every list, one list after the other."""
  return [dict(m) for members in lists for m in members]


def _check_disjoint(axes, how: str) -> None:
  seen = set()
  for axis in axes:
    fields = set().union(*(m.keys() for m in axis)) if axis else set()
    if fields & seen:
      raise ValueError(f'{how}() axes set the same field twice: {sorted(fields & seen)}')
    seen |= fields


# --- members: names, configs, commands ---


@dataclasses.dataclass(frozen=True)
class Member:
  name: str
  fields: dict[str, Any]  # dotted field -> value, on top of the sweep's base config


@dataclasses.dataclass(frozen=True)
class Step:
  """One launch command of a member: its name ('train', 'eval', 'encode', 'dit', 'dit_eval')
  and its arguments (after `python`)."""

  name: str
  args: tuple[str, ...]

  def command(self, python: str = 'python') -> str:
    return ' '.join(shlex.quote(a) for a in (python, *self.args))


def _name_part(value: Any) -> str:
  text = str(value).replace('/', '-')
  return re.sub(r'[^A-Za-z0-9.+-]+', '-', text).strip('-') or 'empty'


def member_names(members: Members) -> list[str]:
  """Readable, unique directory names: `leaf-value` of each field whose value varies across
  the sweep, joined by '_' (a field's full dotted path where two varying fields share a leaf)."""
  fields = list(dict.fromkeys(k for m in members for k in m))  # in order of first appearance
  varying = [f for f in fields if len({repr(m.get(f)) for m in members}) > 1]
  leaves = [f.rsplit('.', 1)[-1] for f in varying]
  label = {
      f: (leaf if leaves.count(leaf) == 1 else f.replace('.', '-'))
      for f, leaf in zip(varying, leaves)
  }
  names = [
      '_'.join(f'{label[f]}-{_name_part(m[f])}' for f in varying if f in m) or 'base'
      for m in members
  ]
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise ValueError(f'the sweep has identical members: {", ".join(repeated)}')
  return names


def members(sweep_config) -> list[Member]:
  """The sweep's members with their names; raises ValueError on a malformed member list."""
  raw = list(sweep_config.members)
  for i, m in enumerate(raw):
    if not isinstance(m, dict) or not m:
      raise ValueError(f'sweep member {i} is {m!r}; each member is a non-empty dict of fields')
  return [Member(n, dict(m)) for n, m in zip(member_names(raw), raw)]


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """The ConfigDict of `spec` = 'path/to/config.py[:argument]', as --config reads it."""
  path, _, argument = spec.partition(':')
  if not os.path.isfile(path):
    raise ValueError(f'config file {path} does not exist (from {spec!r})')
  module_spec = importlib.util.spec_from_file_location(f'_sweep_config_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(argument or None)


def set_fields(config, fields: dict[str, Any], where: str) -> ml_collections.ConfigDict:
  """`config` with the dotted `fields` set; an unknown field or a value of the wrong type raises
  ValueError naming `where` (the member) and the field."""
  for dotted, value in fields.items():
    *parents, leaf = dotted.split('.')
    node = config
    for name in parents:
      node = node[name] if hasattr(node, 'keys') and name in node else None
      if node is None:
        break
    if node is None or not hasattr(node, 'keys') or leaf not in node:
      message = config_checks.unknown_field_message(f'config.{dotted}', config)
      raise ValueError(f'{where}: {message}')
    try:
      node[leaf] = value
    except TypeError as e:
      raise ValueError(f'{where}: config.{dotted}={value!r}: {e}') from None
  return config


DIT = 'dit.'  # the prefix of a member's fields that belong to its chained DiT


def tokenizer_fields(member: Member) -> dict[str, Any]:
  return {k: v for k, v in member.fields.items() if not k.startswith(DIT)}


def dit_fields(member: Member) -> dict[str, Any]:
  return {k[len(DIT) :]: v for k, v in member.fields.items() if k.startswith(DIT)}


def member_config(sweep_config, member: Member) -> ml_collections.ConfigDict:
  """The full training config of `member`'s tokenizer: the base config with its fields set."""
  return set_fields(
      load_config_file(sweep_config.base), tokenizer_fields(member), f'member {member.name}'
  )


def member_dit_config(sweep_config, member: Member) -> ml_collections.ConfigDict:
  """The config of `member`'s chained DiT (its latents are filled in when they exist)."""
  return set_fields(
      load_config_file(f'configs/dit.py:{sweep_config.dit}'),
      dit_fields(member),
      f'member {member.name} (its DiT)',
  )


def _flag_value(value: Any) -> str:
  return value if isinstance(value, str) else repr(value)


def steps(sweep_config, member: Member, directory: str) -> list[Step]:
  """The launch commands of `member`, in order, with its runs under directory/<name>/."""
  chain = chain_lib.Chain(os.path.join(directory, member.name))
  tokenizer_dir = chain.dir('tokenizer')
  fields = [f'--config.{k}={_flag_value(v)}' for k, v in tokenizer_fields(member).items()]
  result = [
      Step(
          'train',
          ('-m', 'launch.train', f'--config={sweep_config.base}', *fields,
           f'--workdir={tokenizer_dir}'),
      ),
  ]  # fmt: skip
  if sweep_config.get('evaluate', True):  # every metric, rFVD / rFID included
    result.append(Step('eval', ('-m', 'launch.eval', f'--workdir={tokenizer_dir}')))
  if sweep_config.get('dit'):
    latents, dit_dir = chain.dir('latents'), chain.dir('dit')
    # The latents are of the tokenizer run's own data; the DiT reads its tokenizer from them.
    result += [
        Step('encode', ('-m', 'launch.encode', f'--tokenizer={tokenizer_dir}', f'--out={latents}')),
        Step(
            'dit',
            ('-m', 'launch.train', f'--config=configs/dit.py:{sweep_config.dit}',
             *(f'--config.{k}={_flag_value(v)}' for k, v in dit_fields(member).items()),
             *(f'--config.{k}={v}' for k, v in chain.dit_fields.items()), f'--workdir={dit_dir}'),
        ),
        Step('dit_eval', ('-m', 'launch.eval', f'--workdir={dit_dir}')),
    ]  # fmt: skip
  return result


def python() -> str:
  """The interpreter the sweep runs members with (the one running it)."""
  return sys.executable
