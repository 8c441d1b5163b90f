"""Compile-cache keys for our C ops, from the C they compile: a changed kernel is never served stale.

Theano keys a compiled module by its ops' c_code_cache_version, not by the C text: a version
raised by hand was forgotten, and a warm ~/.theano then ran the old kernel without a word
(measured: a changed ReLU loop, rows identical to the old code's).  KeyedBySource gives an op,
for each node, a digest of everything it hands the compiler for that node: its code, support
code, headers, flags and libraries, with every setting that shaped them (the CPU's vector
instructions, OpenMP, the dtype) already in the text.  One byte changed anywhere in it, and
the module is built again.
"""
import collections
import hashlib
import inspect
import sys

from theano.gof.utils import MethodNotDefined


def generated_c(op, node):
    """Everything op compiles for node, as one text (with fixed names in place of Theano's)."""
    inputs = ['input%d' % i for i in range(len(node.inputs))]
    outputs = ['output%d' % i for i in range(len(node.outputs))]
    sub = collections.defaultdict(lambda: 'SUB', fail='FAIL', params='PARAMS', struct_id=0)
    parts = [lambda: op.c_code(node, 'NODE', inputs, outputs, sub),
             lambda: op.c_code_cleanup(node, 'NODE', inputs, outputs, sub),
             lambda: op.c_support_code(),
             lambda: op.c_support_code_apply(node, 'NODE'),
             lambda: op.c_support_code_struct(node, 'NODE'),
             lambda: op.c_init_code_struct(node, 'NODE', sub),
             lambda: op.c_cleanup_code_struct(node, 'NODE'),
             lambda: op.c_init_code(),
             lambda: op.c_init_code_apply(node, 'NODE'),
             lambda: op.c_headers(), lambda: op.c_header_dirs(), lambda: op.c_compile_args(),
             lambda: op.c_no_compile_args(), lambda: op.c_libraries(), lambda: op.c_lib_dirs()]
    texts = []
    for part in parts:
        try:
            made = part()
        except MethodNotDefined:
            made = '-'
        if isinstance(made, list):      # each once: Theano's CorrMM adds -fopenmp to a list it keeps, at each call
            made = list(dict.fromkeys(made))
        texts.append(repr(made))
    return '\0'.join(texts)


class KeyedBySource:
    """A C op whose compile-cache version is the digest of the C it compiles (generated_c)."""

    def c_code_cache_version_apply(self, node):
        version = ('c-source', hashlib.sha256(generated_c(self, node).encode()).hexdigest()[:32])
        if hasattr(self, 'params_type'):
            version += (self.params_type.c_code_cache_version(),)
        return version

    def c_code_cache_version(self):
        """Without a node (Theano's cache clean-up asks so): the digest of the op's module."""
        source = inspect.getsource(sys.modules[type(self).__module__])
        return ('module-source', hashlib.sha256(source.encode()).hexdigest()[:32])
