"""Our C ops' source, read from engine/c/, and their compile-cache keys, from the C they compile:
a changed kernel is never served stale.

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
import os
import re
import sys

from theano.gof.utils import MethodNotDefined


C_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'c')


def c_sections(*filenames):
    """The sections of C files in engine/c/, {name: text}.

    A file is cut into sections, each begun by a line `#section NAME` (as the files of Theano's
    COp); a section's text runs to the next such line, its last newline left out, and what
    comes before the first one is the file's own comment.  Lines that begin with `///`
    document the code and are left out of it.  The text is C with %(name)s where the op puts
    what it fills in per node, as in Theano's own corr_gemm.c (the names of the inputs and
    outputs, window sizes, the OpenMP pragma); `%%` stands for `%`.
    """
    sections = {}
    for filename in filenames:
        with open(os.path.join(C_FOLDER, filename)) as f:
            text = re.sub(r'^///.*\n', '', f.read(), flags=re.M)
        parts = re.split(r'^#section (\w+)\n', text, flags=re.M)
        for name, code in zip(parts[1::2], parts[2::2]):
            if name in sections:
                raise ValueError('%s: a second section %s' % (filename, name))
            sections[name] = code[:-1] if code.endswith('\n') else code
    return sections


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
        """Without a node (Theano's cache clean-up asks so): the digest of the op's module and of
        the C sections it read (its C dict: the C is in engine/c/, not in the module)."""
        module = sys.modules[type(self).__module__]
        source = inspect.getsource(module) + repr(sorted(getattr(module, 'C', {}).items()))
        return ('module-source', hashlib.sha256(source.encode()).hexdigest()[:32])
