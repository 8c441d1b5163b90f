"""Where our CPU kernels enter Theano: graph rewrites in Theano's optimizer, under one tag.

The layers are written in plain Theano (conv2d, pool_2d, maximum, the momentum formula) and
build the same graph on every device; as Theano itself lowers conv2d to CorrMM and dot to
Gemm, the rewrites here replace what they recognise, in any graph, with engine/cpuops.py's and
engine/cpublas.py's ops.  All of them carry the tag TAG, so

    THEANO_FLAGS=optimizer_excluding=cpu_kernels python cifar10_convnet.py

runs stock Theano (docs/cpu.md).  Two places in Theano's optimizer (theano/compile/mode.py
lists its phases):

  AS_BUILT (position 0.05, before Theano's shape feature and canonicalize): the expressions as the layers wrote them and
    as Theano's gradient made them, to our ops: conv2d and its filter gradient, pool_2d and its
    gradient, maximum(x + b, 0) and its gradient, the momentum update.  Here, before Theano's
    canonicalization rearranges them, the patterns are the formulas themselves.
  later positions, registered with register(): Theano's own BLAS ops, sums and in-place ops
    to ours, after Theano has made them (the dense products, channel sums, in-place variants).

Only where the graph runs on the CPU: with device=cuda, Theano's GPU rewrites take the same
plain graph (cpu_graph() says which).
"""
import sys

import theano
from theano.compile import optdb
from theano.gof.opt import copy_stack_trace
from theano.gof.optdb import LocalGroupDB, TopoDB

TAG = 'cpu_kernels'

AS_BUILT = LocalGroupDB()
AS_BUILT.__name__ = 'cpu_kernels_as_built'


def cpu_graph():
    """Whether the functions compiled now run on the CPU: no default GPU context (device=cuda
    makes one, Theano's GPU rewrites then take the graph), and a C compiler (our ops are C)."""
    gpu_types = sys.modules.get('theano.gpuarray.type')        # not loaded: no GPU
    return bool(theano.config.cxx) and not (gpu_types and None in gpu_types.list_contexts())


def elemwise(var, scalar_op):
    """var's node if it is an elementwise op of that scalar op class, else None."""
    node = var.owner
    if node and isinstance(node.op, theano.tensor.Elemwise) and isinstance(node.op.scalar_op, scalar_op):
        return node
    return None


def register(name, optimizer, position, *tags):
    """An optimizer of ours in Theano's optdb at that position, in fast_run and under TAG."""
    optdb.register(name, optimizer, position, 'fast_run', TAG, *tags)


def register_as_built(local_optimizer):
    """A local optimizer of the AS_BUILT pass (a rewrite of the layers' own expressions), tried
    only on a graph for the CPU (cpu_graph).  What it puts in keeps the stack trace of what it
    replaces (where the user's code built it), as Theano's own rewrites keep it."""
    transform = local_optimizer.transform

    def on_the_cpu_keeping_stack_traces(node):
        new = cpu_graph() and transform(node)
        if new:
            for old, var in (new.items() if isinstance(new, dict) else zip(node.outputs, new)):
                copy_stack_trace(old, var)
        return new
    local_optimizer.transform = on_the_cpu_keeping_stack_traces
    AS_BUILT.register(local_optimizer.__name__, local_optimizer, 'fast_run', TAG)
    return local_optimizer


# after merge1 (0), before Theano's shape feature (ShapeOpt, 0.1): the shapes it records are then our ops' own
register('cpu_kernels_as_built', TopoDB(AS_BUILT, order='in_to_out'), 0.05)
