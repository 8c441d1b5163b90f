"""Theano's own tests of the ops our rewrites replace, run with the rewrites (as the scripts run)
and without them (optimizer_excluding=cpu_kernels: stock Theano), on the installed Theano 1.0.5.

    .venv/bin/python tests/theano_tests.py             # the five files (docs/testing.md: time, figures)
    .venv/bin/python tests/theano_tests.py --quick     # the part CI runs (tests/test_theano_tests.py)
    .venv/bin/python tests/theano_tests.py FILE -k ...  # any of Theano's test files, any pytest options

For each file it prints the counts both ways, every test whose outcome differs, and how many
compiled functions held each of our ops (that the tests reach our kernels at all).  It fails
(exit 1) when a test fails with the rewrites and passes without, unless OP_IDENTITY lists it:
a test that asserts which op class is in the graph before it compares values, which a
replaced op cannot pass as written; its values are checked by tests/test_rewrites.py and
tests/test_cpuops.py against stock Theano.  Needs nose and parameterized
(requirements-test.txt), as Theano's tests do.
"""
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAG = 'cpu_kernels'     # engine.rewrites.TAG (not imported: this process never loads Theano)

# Theano's test files (inside its package) and which of their tests run: k, pytest's -k; generators,
# the classes whose nose-style generator tests run one check at a time
FILES = {
    'tensor/signal/tests/test_pool.py': None,
    'tensor/nnet/tests/test_corr.py': None,
    'tensor/nnet/tests/test_abstract_conv.py': {'k': 'not 3d and not 3D and not NoOptim',     # the 2-d convolutions
                                                'generators': ['TestCorrConv2d']},
    'tensor/nnet/tests/test_nnet.py': None,
    'tensor/tests/test_blas.py': {'generators': ['TestGemmNoFlags']},
}
QUICK = {
    'tensor/nnet/tests/test_corr.py': None,
    # a few window shapes (each compiles its own module): windows larger than the maps, the gradient
    'tensor/signal/tests/test_pool.py': {'k': 'StrideExtra or max_pool_2d_2D or (DownsampleFactorMax_grad and not '
                                              'stride and not Padding)'},
}

# test id (parameters left out) -> why it fails with our ops and not without
OP_IDENTITY = {
    'theano.tensor.signal.tests.test_pool.TestDownsampleFactorMax::test_infer_shape':
        "InferShapeTester asserts Theano's Pool is in the graph before it compares shapes (ours: "
        "tests/test_cpuops.py::test_pooling_shapes_are_inferred_without_pooling)",
    'theano.tensor.tests.test_blas::test_dot22scalar_cast':
        "asserts Theano's Dot22 instance is in the graph: ours is there (a Dot22 subclass, float32 with AVX-512)",
}

# what each child process runs: the project's set-up (our rewrites registered), then pytest,
# then the file's nose-style generator tests (which pytest no longer collects), each yielded
# check a test, recording the op classes of every function compiled (ours are engine.*'s)
CHILD = r'''
import collections, importlib, inspect, json, sys, unittest
sys.path.insert(0, %(root)r)
from engine import machine
machine.set_up()
import pytest
from theano.compile import function_module
ours = collections.Counter()
make = function_module.FunctionMaker.__init__
def counting(self, *args, **kwargs):
    make(self, *args, **kwargs)
    ours.update({type(n.op).__name__ for n in self.fgraph.apply_nodes if type(n.op).__module__.startswith('engine.')})
function_module.FunctionMaker.__init__ = counting
code = pytest.main(%(args)r)
module = importlib.import_module(%(module)r)
yielded = {}
for cls in [getattr(module, name) for name in %(generator_classes)r]:
    for name in sorted(n for n in dir(cls) if n.startswith('test') and inspect.isgeneratorfunction(getattr(cls, n))):
        if hasattr(cls, 'setup_class'):
            cls.setup_class()
        test = cls()
        if hasattr(test, 'setUp'):
            test.setUp()
        for i, (check, *args) in enumerate(getattr(test, name)()):
            key = '%%s::%%s::%%s[%%d]' %% (module.__name__, cls.__name__, name, i)
            try:
                check(*args)
                yielded[key] = 'passed'
            except unittest.SkipTest:
                yielded[key] = 'skipped'
            except Exception as e:
                yielded[key] = 'failed: %%s: %%s' %% (type(e).__name__, (str(e).splitlines() or [''])[0][:160])
with open(%(counts)r, 'w') as f:
    json.dump({'ours': ours, 'yielded': yielded}, f)
sys.exit(0 if code in (0, 5) else int(code))
'''


def theano_folder():
    import importlib.util
    return os.path.dirname(importlib.util.find_spec('theano').origin)


def run(name, path, select, stock, extra):
    """{test id: 'passed'|'failed: why'|'skipped'}, {our op: functions holding it}, seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        report, counts = os.path.join(tmp, 'report.xml'), os.path.join(tmp, 'counts.json')
        args = ['-q', '-p', 'no:cacheprovider', '--continue-on-collection-errors', '--junitxml=' + report, path]
        env = dict(os.environ)
        if stock:
            env['THEANO_FLAGS'] = ','.join(filter(None, [env.get('THEANO_FLAGS', ''), 'optimizer_excluding=' + TAG]))
        select = select or {}
        child = CHILD % dict(root=ROOT, args=args + (['-k', select['k']] if 'k' in select else []) + list(extra),
                             counts=counts, module='theano.' + name[:-len('.py')].replace('/', '.'),
                             generator_classes=select.get('generators', []))
        done = subprocess.run([sys.executable, '-c', child], cwd=tmp, env=env, capture_output=True, text=True)
        if not os.path.exists(report):
            sys.exit('error: pytest did not run %s:\n%s' % (path, (done.stdout + done.stderr)[-3000:]))
        outcomes, seconds = {}, 0.0
        for case in ElementTree.parse(report).iter('testcase'):
            if case.get('name') == case.get('classname').split('.')[-1] and any(c.tag == 'error' for c in case):
                continue        # a class pytest could not collect (generator tests: run below)
            seconds += float(case.get('time', 0))
            name = '%s::%s' % (re.sub(r'^.*?(?=theano\.)', '', case.get('classname')), case.get('name'))   # no site-packages
            kinds = {child.tag for child in case}
            outcomes[name] = ('failed' if kinds & {'failure', 'error'} else 'skipped' if 'skipped' in kinds
                              else 'passed')
            if outcomes[name] == 'failed':
                outcomes[name] += ': ' + next(((c.get('message') or '').splitlines() or [''])[0][:160]
                                              for c in case if c.tag in ('failure', 'error'))
        with open(counts) as f:
            counted = json.load(f)
        outcomes.update(counted['yielded'])
        return outcomes, counted['ours'], seconds


def main(argv):
    quick = '--quick' in argv
    argv = [a for a in argv if a != '--quick']
    if argv and not argv[0].startswith('-'):
        files = {argv[0]: FILES.get(argv[0])}
        extra = argv[1:]
    else:
        files, extra = (QUICK if quick else FILES), argv
    folder, unexplained = theano_folder(), 0
    for name, select in files.items():
        path = name if os.path.isabs(name) else os.path.join(folder, name)
        ours, reached, seconds = run(name, path, select, False, extra)
        stock, _, stock_seconds = run(name, path, select, True, extra)
        count = collections.Counter
        print('%s%s: with our rewrites %s (%.0f s); stock %s (%.0f s)' % (
            name, ' -k "%s"' % select['k'] if select and 'k' in select else '',
            dict(count(o.split(':')[0] for o in ours.values())),
            seconds, dict(count(o.split(':')[0] for o in stock.values())), stock_seconds))
        print('    our ops compiled: %s' % (', '.join('%s in %d functions' % kv for kv in sorted(reached.items()))
                                           or 'none'))
        for test in sorted(set(ours) | set(stock)):
            a, b = ours.get(test, 'absent'), stock.get(test, 'absent')
            if a.split(':')[0] == b.split(':')[0]:
                continue
            key = test.split('[')[0]
            known = OP_IDENTITY.get(key)
            unexplained += not known and a.startswith('failed')
            print('    %s\n        with our rewrites %s\n        stock %s%s' % (
                test, a, b, '\n        (%s)' % known if known else ''))
    print('tests that fail only with our rewrites, unexplained: %d' % unexplained)
    return 1 if unexplained else 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
