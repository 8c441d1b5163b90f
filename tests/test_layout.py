"""The project's shape: the research scripts at the top, the machinery in engine/ beneath them,
imports pointing one way (scripts -> engine), no cycles, and no import that sets anything up."""
import ast
import glob
import json
import os
import subprocess
import sys

from conftest import ROOT
from engine import machine

SCRIPTS = {'cifar10', 'cifar10_convnet', 'convnet', 'mnist', 'mnist_mlp', 'nnet', 'sweep'}


def project_modules():
    """{module name: path} of the project's Python modules: the top level's and engine's."""
    paths = glob.glob(os.path.join(ROOT, '*.py')) + glob.glob(os.path.join(ROOT, 'engine', '*.py'))
    names = {}
    for path in paths:
        name = os.path.relpath(path, ROOT)[:-len('.py')].replace(os.sep, '.')
        names[name[:-len('.__init__')] if name.endswith('.__init__') else name] = path
    return names


def imports_of(name, path, modules):
    """The project modules that module `name` imports, anywhere in it (functions too)."""
    package = name.rsplit('.', 1)[0] if name.startswith('engine.') else ('engine' if name == 'engine' else '')
    found = set()
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                base = '.'.join(filter(None, [package, base]))
            targets = [base] + ['%s.%s' % (base, alias.name) for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def import_graph():
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_the_top_level_holds_the_research_scripts_and_the_rest_is_in_engine():
    top = {name for name in project_modules() if '.' not in name and name != 'engine'}
    assert top == SCRIPTS
    assert all(name == 'engine' or name.startswith('engine.') for name in set(project_modules()) - SCRIPTS)


def test_the_engine_never_imports_a_script():
    graph = import_graph()
    upward = {name: sorted(targets & SCRIPTS) for name, targets in graph.items()
              if name.startswith('engine') and targets & SCRIPTS}
    assert upward == {}


def test_a_run_never_imports_the_sweep_machinery():
    graph = import_graph()
    reached, todo = set(), ['cifar10_convnet', 'mnist_mlp']
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo += sorted(graph[name])
    assert reached & {'sweep', 'engine.sweeping', 'engine.report'} == set()


def cycles(graph):
    """Every import cycle, as a list of modules, found by depth-first search."""
    found, state = [], {}

    def visit(name, path):
        state[name] = 'open'
        for target in sorted(graph[name]):
            if state.get(target) == 'open':
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[name] = 'done'
    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return found


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': set()}) == [['a', 'b', 'c', 'a']]


def test_importing_a_module_sets_nothing_up():
    """Only machine.set_up() changes the environment and Theano: importing the engine's modules and
    the data modules leaves os.environ as it was and Theano not imported; after a set-up, importing the
    layers changes none of what Theano compiles with (the one set-up is not made again)."""
    code = '''
import json, os, sys
env = dict(os.environ)
from engine import claims, download, gpustack, machine, openblas, records, report, sweeping
import cifar10, mnist, sweep
unloaded = 'theano' not in sys.modules
same_env = dict(os.environ) == env
machine.set_up()
from theano.gof import COp, vm
from theano.gof.cc import CLinker
import theano
def state():
    return [os.environ.get('THEANO_FLAGS'), os.environ.get('OPENBLAS_CORETYPE'), str(theano.config),
            vm.VM_Linker.make_all, CLinker.compile_cmodule, COp.c_code_cache_version]
before = state()
import nnet, convnet
from engine import cpublas, cpuops, runlog
print(json.dumps([unloaded, same_env, state() == before]))
'''
    env = dict(os.environ)
    env.pop(machine.SET_BY_US, None)            # as a user's own process: decided afresh
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    unloaded, same_env, unchanged = json.loads(out.stdout.strip().splitlines()[-1])
    assert unloaded and same_env and unchanged


def test_import_nnet_in_a_notebook_started_in_the_project_folder_trains():
    """No driver made the set-up: `import nnet` makes it, and a network trains."""
    code = ('import json, numpy as np, nnet; from engine import machine; rng = np.random.RandomState(0); '
            'X = rng.randn(20, 4).astype("float32"); y = (X[:, 0] > 0).astype("int32"); '
            'trainer = nnet.Trainer(nnet.MLP(rng, 4, [3], 2), {"L": (X, y)}, 10, 0.1, 0.9, 0.0); '
            'print(json.dumps([bool(machine.NOTES), trainer.train_epoch()[1] >= 0]))')
    env = dict(os.environ)
    env.pop(machine.SET_BY_US, None)
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [True, True]


def test_the_layers_are_plain_theano_on_every_device():
    """nnet.py and convnet.py import none of our ops (the rewrites bring them) and ask for the device
    once: the workaround for Theano's GPU argmax, in FullLayer.cost_terms."""
    graph = import_graph()
    for script in ('nnet', 'convnet'):
        assert not graph[script] & {'engine.cpuops', 'engine.cpublas', 'engine.rewrites'}, script
        with open(os.path.join(ROOT, script + '.py')) as f:
            tree = ast.parse(f.read())
        asks = [node for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == 'gpu_asked']
        if script == 'convnet':
            assert asks == []
        else:
            cost_terms = next(node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
                              and node.name == 'cost_terms' and any(isinstance(n, ast.Attribute) and n.attr == 'gpu_asked'
                                                                    for n in ast.walk(node)))
            assert len(asks) == 1 and asks[0] in list(ast.walk(cost_terms))
