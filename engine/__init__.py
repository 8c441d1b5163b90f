"""The engine beneath the research scripts: what makes them run, and fast, on today's machines.

The scripts at the top (cifar10_convnet.py, mnist_mlp.py, nnet.py, convnet.py, cifar10.py,
mnist.py, sweep.py) are what a researcher reads and edits; open these modules only when the
machinery itself needs a change.  Imports point one way: scripts -> engine, never back, and
importing a module here changes nothing in Theano beyond registering ops and their rewrites.

    machine      the one machine set-up, machine.set_up(), called by the drivers (and the tests)
                 before anything else: Theano's flags, the BLAS and its kernels, compiling C
                 modules on every core and reusing them; the device, described and checked
    openblas     which OpenBLAS kernels run (OPENBLAS_CORETYPE); the loaded BLAS libraries and
                 their threads through threadpoolctl
    gpustack     the GPU's libraries: CUDA wheels for the driver, the links libgpuarray opens
    rewrites     where the faster CPU ops enter Theano's optimizer, under one tag (cpu_kernels)
    cpuops       faster CPU ops: pooling, the convolution's patch copy, bias + ReLU; their rewrites
    cpublas      faster CPU ops: the dense products, channel sums, the momentum update; their rewrites
    csource      their C, read from engine/c/*.c, and their compile-cache keys, from the C
                 they compile: never a stale kernel
    download     the data folder, verified downloads, the data's fingerprint, the splits
    runlog       the drivers' plumbing: --name=value overrides, the published log, Ctrl-C,
                 resume, checkpoints, saving a run
    records      a run's record files: written, read, matched to the published configurations
    claims       a run claimed while it goes on; the cores shared among the claimed runs
    sweeping     running many runs: here N at a time, GNU parallel's lines, Slurm job arrays
    report       the tables, the pictures, and the pages written from the records
"""
import os

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))    # the scripts' folder
