"""The package's layering, checked on the source (every import, including those inside functions).

    vitok/core, vitok/data    the model-agnostic layer: imports no model family, no tooling
    vitok/nn                  network blocks: the layer below, nothing else
    vitok/evals               evaluation networks and metrics: the layers below, no model family
    vitok/tokenizer           the ViTok family: the layers below, never the DiT
    dit/                      the DiT family: the layers below and, of the tokenizer family, only
                              what a frozen tokenizer is (the model, its loader, tiled coding);
                              never its training objectives (stage1, stage2, discriminator)
    vitok/sweeps              experiment tooling: anything but the launch scripts

Model code (the blocks, the two networks, the diffusion process) knows nothing of hosts or
checkpoints, and no module imports itself through others (no circles).
"""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TOOLING = ('launch', 'configs', 'vitok.sweeps')
FAMILIES = ('vitok.tokenizer', 'dit')
# What each package may not import (a prefix forbids the module and everything under it).
FORBIDDEN = {
    'vitok/core': FAMILIES + TOOLING + ('vitok.nn', 'vitok.evals'),
    'vitok/data': FAMILIES + TOOLING + ('vitok.nn', 'vitok.evals'),
    'vitok/nn': FAMILIES + TOOLING + ('vitok.evals',),
    'vitok/evals': FAMILIES + TOOLING,
    'vitok/tokenizer': ('dit',) + TOOLING,
    'dit': TOOLING
    + ('vitok.tokenizer.stage1', 'vitok.tokenizer.stage2', 'vitok.tokenizer.discriminator'),
    'vitok/sweeps': ('launch',),
}
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
MODEL_CODE = (
    'vitok/nn',
    'vitok/tokenizer/model.py',
    'vitok/tokenizer/discriminator.py',
    'dit/model.py',
    'dit/diffusion.py',
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


def read(path: str) -> str:
  with open(os.path.join(REPO, path)) as f:
    return f.read()


def check(paths, forbidden) -> list[str]:
  problems = []
  for path in paths:
    package = os.path.dirname(path).replace(os.sep, '.')
    problems += [f'{path} imports {m}' for m in violations(read(path), package, forbidden)]
  return problems


def module_name(path: str) -> str:
  name = path[: -len('.py')].replace(os.sep, '.')
  return name[: -len('.__init__')] if name.endswith('.__init__') else name


def import_graph(*roots: str) -> dict[str, set[str]]:
  """module -> the project modules it imports (a package's import also counts as its modules')."""
  paths = list(python_files(*roots))
  modules = {module_name(p) for p in paths}
  graph = {}
  for path in paths:
    package = os.path.dirname(path).replace(os.sep, '.')
    graph[module_name(path)] = {
        m for m in imported_modules(read(path), package) if m in modules
    } - {module_name(path)}
  return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan): each is a circle."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


@pytest.mark.parametrize('package', sorted(FORBIDDEN))
def test_each_package_imports_only_the_layers_below_it(package):
  paths = list(python_files(package))
  assert len(paths) >= 3, package
  assert check(paths, FORBIDDEN[package]) == []


def test_model_code_knows_nothing_of_hosts_or_checkpoints():
  paths = list(python_files(*MODEL_CODE))
  assert len(paths) >= 7
  assert check(paths, HOSTS_AND_CHECKPOINTS) == []


def test_no_module_imports_itself_through_others():
  graph = import_graph('vitok', 'dit', 'launch', 'configs')
  assert len(graph) >= 60
  assert circles(graph) == []


def test_no_library_file_is_longer_than_one_person_holds_in_mind():
  long = {p: n for p in python_files('vitok', 'dit') if (n := len(read(p).splitlines())) > 450}
  assert long == {}


def test_the_circle_finder_finds_a_circle_through_a_function_level_import():
  stage1 = 'from vitok.tokenizer import model\ndef f():\n  from vitok.tokenizer import stage2\n'
  stage2 = 'from vitok.tokenizer import stage1\n'
  graph = {
      'vitok.tokenizer.stage1': set(imported_modules(stage1, 'vitok.tokenizer')),
      'vitok.tokenizer.stage2': set(imported_modules(stage2, 'vitok.tokenizer')),
      'vitok.tokenizer.model': set(),
  }
  graph = {k: v & set(graph) for k, v in graph.items()}
  assert circles(graph) == [['vitok.tokenizer.stage1', 'vitok.tokenizer.stage2']]
  del graph['vitok.tokenizer.stage2']
  assert circles(graph) == []


@pytest.mark.parametrize(
    'source',
    [
        'from vitok.tokenizer import stage1',
        'import vitok.tokenizer.model as t',
        'def f():\n  from dit import model\n',
        'from ..tokenizer import model',
        'from configs import vitok',
    ],
)
def test_the_check_sees_every_kind_of_import(source):
  assert violations(source, 'vitok.core', FORBIDDEN['vitok/core']), source


def test_the_check_lets_the_shared_layer_import_itself():
  assert (
      violations(
          'from vitok.core import sharding\nfrom . import perf\nfrom vitok.data import pipeline',
          'vitok.core',
          FORBIDDEN['vitok/core'],
      )
      == []
  )
