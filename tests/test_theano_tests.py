"""Theano's own tests reach our kernels: tests/theano_tests.py --quick (CI's part of them), with our
rewrites and without, the same outcomes; the full run is one command (docs/testing.md)."""
import importlib.util
import re
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.skipif(not (importlib.util.find_spec('nose') and importlib.util.find_spec('parameterized')),
                    reason="Theano's tests need nose and parameterized: pip install -r requirements-test.txt")
def test_theanos_own_tests_of_pooling_and_correlation_pass_on_our_ops():
    done = subprocess.run([sys.executable, 'tests/theano_tests.py', '--quick'], cwd=ROOT, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    reached = dict(re.findall(r'^(\S+)(?: -k "[^"]*")?: .*\n    our ops compiled: (.*)$', done.stdout, re.M))
    assert re.search(r'\bCorrMM in [1-9]', reached['tensor/nnet/tests/test_corr.py'])
    assert re.search(r'\bCorrMM_gradWeights in [1-9]', reached['tensor/nnet/tests/test_corr.py'])
    assert re.search(r'\bMaxPool in [1-9]', reached['tensor/signal/tests/test_pool.py'])
    assert re.search(r'\bMaxPoolGrad in [1-9]', reached['tensor/signal/tests/test_pool.py'])
    assert 'tests that fail only with our rewrites, unexplained: 0' in done.stdout
