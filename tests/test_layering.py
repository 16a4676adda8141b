"""The package's layering, checked on the source (every import, including those inside functions).

vitok/core, vitok/data              the shared layer: no model family, no launch scripts
vitok/layers, attention, tokenizer,  model code: nothing of hosts, checkpoints or the training loop
  discriminator
dit/                                may use the shared layer and the tokenizer, never the reverse
"""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAMILIES = (
    'vitok.tokenizer',
    'vitok.discriminator',
    'vitok.stage1',
    'vitok.stage2',
    'vitok.lpips',
    'dit',
    'launch',
    'configs',
)
HOSTS_AND_CHECKPOINTS = (
    'vitok.core.checkpoint',
    'vitok.core.manifest',
    'vitok.core.trainer',
    'vitok.core.train_state',
    'vitok.core.distributed',
    'vitok.core.signals',
    'vitok.core.writer',
    'orbax',
    'launch',
)


def imported_modules(source: str, package: str) -> set[str]:
  """Every module a source file imports: `import a.b` -> a.b; `from a import b` -> a and a.b
  (b may be a module); relative imports resolved against `package`."""
  found = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        parent = package.split('.')[: len(package.split('.')) - node.level + 1]
        base = '.'.join(parent + ([base] if base else []))
      found.add(base)
      found.update(f'{base}.{alias.name}' for alias in node.names)
  return found


def violations(source: str, package: str, forbidden: tuple[str, ...]) -> list[str]:
  return sorted(
      m
      for m in imported_modules(source, package)
      if any(m == f or m.startswith(f + '.') for f in forbidden)
  )


def python_files(*relative: str):
  for path in relative:
    full = os.path.join(REPO, path)
    if os.path.isfile(full):
      yield path
      continue
    for root, _, files in os.walk(full):
      for name in sorted(files):
        if name.endswith('.py'):
          yield os.path.relpath(os.path.join(root, name), REPO)


def check(paths, forbidden) -> list[str]:
  problems = []
  for path in paths:
    package = os.path.dirname(path).replace(os.sep, '.')
    with open(os.path.join(REPO, path)) as f:
      bad = violations(f.read(), package, forbidden)
    problems += [f'{path} imports {m}' for m in bad]
  return problems


def test_the_shared_layer_and_the_data_layer_import_no_model_family():
  paths = list(python_files('vitok/core', 'vitok/data'))
  assert len(paths) >= 14
  assert check(paths, FAMILIES) == []


def test_model_code_knows_nothing_of_hosts_or_checkpoints():
  paths = list(
      python_files(
          'vitok/layers.py', 'vitok/attention.py', 'vitok/tokenizer.py', 'vitok/discriminator.py'
      )
  )
  if os.path.isdir(os.path.join(REPO, 'dit')):
    paths += [p for p in python_files('dit') if os.path.basename(p) in ('model.py', 'diffusion.py')]
  assert check(paths, HOSTS_AND_CHECKPOINTS) == []


def test_the_tokenizer_never_imports_the_dit():
  paths = [p for p in python_files('vitok') if not p.startswith(os.path.join('vitok', 'core'))]
  assert check(paths, ('dit',)) == []


@pytest.mark.parametrize(
    'source',
    [
        'from vitok import stage1',
        'import vitok.tokenizer as t',
        'def f():\n  from dit import model\n',
        'from ..tokenizer import ViTok',
        'from configs import vitok',
    ],
)
def test_the_check_sees_every_kind_of_import(source):
  assert violations(source, 'vitok.core', FAMILIES), source


def test_the_check_lets_the_shared_layer_import_itself():
  assert (
      violations(
          'from vitok.core import sharding\nfrom . import perf\nfrom vitok.data import pipeline',
          'vitok.core',
          FAMILIES,
      )
      == []
  )
