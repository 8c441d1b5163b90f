"""Does the suite pin the published experiment?  Each mutation below changes one published detail
in a scratch copy of the project; the whole suite then has to fail.

    python tests/mutate.py            # a few minutes; not part of the default test run

Prints one line per mutation, `caught` or `MISSED`, and exits non-zero if any was missed
(or no longer applies: the code it changes has moved, and the list needs updating).
"""
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MUTATIONS = [  # what, file, published text, mutated text
    ('the pool threshold weight-decayed (the rule decays W only)', 'convnet.py',
     'self.params, self.decay = [self.b], []', 'self.params, self.decay = [self.b], [self.b]'),
    ('the log every 5th epoch (published: 0-5, then every 10th)', 'engine/runlog.py',
     'return epoch <= 5 or epoch % 10 == 0', 'return epoch % 5 == 0'),
    ('the epoch-0 row evaluating V in place of L', 'engine/runlog.py',
     "            if epoch == 0:\n                costL, accL = trainer.evaluate('L')",
     "            if epoch == 0:\n                costL, accL = trainer.evaluate('V')"),
    ('the training columns from the training pass (published: L evaluated after the epoch)', 'engine/runlog.py',
     'if epoch > 0 and not quickL:', 'if epoch > 0 and quickL:'),
    ('the starred row evaluating V in place of T', 'engine/runlog.py',
     "costT, accT = trainer.evaluate('T')", "costT, accT = trainer.evaluate('V')"),
    ('MNIST validating on 5000 images (its table: 50000 / 10000 / 10000)', 'mnist.py',
     '\nNV = 10000 ', '\nNV = 5000 '),
    ('ZCA epsilon 0.003 (published 0.001)', 'cifar10.py', 'ZCA_EPSILON = 0.001', 'ZCA_EPSILON = 0.003'),
    ('ZCA epsilon added outside the square root', 'cifar10.py',
     '(1.0 / np.sqrt(s + epsilon))', '(1.0 / np.sqrt(s) + epsilon)'),
    ('MNIST weight decay 0.001 (its run: 0)', 'mnist_mlp.py', '\nlam = 0.0\n', '\nlam = 0.001\n'),
    ('CIFAR-10 momentum 0.95 (published 0.9)', 'cifar10_convnet.py', '\nmu = 0.9 ', '\nmu = 0.95'),
    ('weight decay not scaled by eta (published: -eta * (dE/dW + lam * W))', 'nnet.py',
     'v_new = self.mu * v - self.eta * self.lam * p - self.eta * g', 'v_new = self.mu * v - self.lam * p - self.eta * g'),
    ('the momentum kept in full (published: mu * dW)', 'nnet.py',
     'v_new = self.mu * v - self.eta * self.lam * p - self.eta * g', 'v_new = v - self.eta * self.lam * p - self.eta * g'),
    ('weights not decayed (W decays, the thresholds do not)', 'nnet.py',
     'if any(p is w for w in net.decay):', 'if False:'),
    ('a leaky ReLU in the CPU kernel of the pooled maps (published: max(a, 0))', 'engine/c/bias_relu.c',
     'to[m * S + s] = a < 0 ? 0 : a;', 'to[m * S + s] = a < 0 ? 0.01f * a : a;'),
    ('the rewrites outside their tag (optimizer_excluding=cpu_kernels: still our ops)', 'engine/rewrites.py',
     "'fast_run', TAG, *tags)", "'fast_run', *tags)"),
    ('the validation split from data_batch_4 (published: data_batch_5)', 'cifar10.py',
     "'V': ['data_batch_5']", "'V': ['data_batch_4']"),
    ('pixels / 256 (published: / 255)', 'engine/download.py', 'np.asarray(255, splits[name].dtype)',
     'np.asarray(256, splits[name].dtype)'),
    ('the mean taken over every split (published: the training images only)', 'engine/download.py',
     "mean = splits['L'].mean(axis=0", "mean = np.concatenate(list(splits.values())).mean(axis=0"),
    ('the ZCA fitted on training and validation images (published: training only)', 'cifar10.py',
     "W = zca_matrix(X['L'], epsilon)", "W = zca_matrix(np.concatenate([X['L'], X['V']]), epsilon)"),
    ('the pool stride half the window by default (published: stride = window)', 'convnet.py',
     'tuple(st or ds)', 'tuple(st or (ds[0] // 2, ds[1] // 2))'),
    ('the thresholds starting at 0.1 (published: b = 0)', 'convnet.py',
     'self.b = nnet.theano.shared(np.zeros(C, nnet.floatX))', 'self.b = nnet.theano.shared(np.full(C, 0.1, nnet.floatX))'),
    ('the gradient of the summed cost (published: the minibatch mean, for eta = 0.01)', 'nnet.py',
     'T.grad(sum_cost / x.shape[0].astype(floatX), net.params)', 'T.grad(sum_cost, net.params)'),
    ('a resumed run starting its momenta from zero (resume: as a run never stopped)', 'nnet.py',
     '                v.set_value(f[name].astype(floatX))', '                v.set_value(0 * f[name].astype(floatX))'),
    ('the seconds column starting again at 0 when resumed (docs/running.md: it goes on)', 'engine/runlog.py',
     't0 = time.time() - before ', 't0 = time.time() '),
    ('no checkpoint at the logged rows (a run killed outright has nothing to go on from)', 'engine/runlog.py',
     'if checkpoint and not write_checkpoint(', 'if False and not write_checkpoint('),
    ('a record left in the outdir whose parameters went elsewhere (a full disk)', 'engine/runlog.py',
     '                    os.remove(written)', '                    pass'),
]


def tracked_files():
    out = subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.split()


def run_mutation(what, filename, published, mutated, files):
    scratch = tempfile.mkdtemp(prefix='mutate-')
    try:
        for name in files:
            os.makedirs(os.path.join(scratch, os.path.dirname(name)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), os.path.join(scratch, name))
        path = os.path.join(scratch, filename)
        text = open(path).read()
        if text.count(published) != 1:
            return 'STALE (the published text is no longer found once in %s)' % filename
        with open(path, 'w') as f:
            f.write(text.replace(published, mutated))
        try:
            result = subprocess.run([sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider'],
                                    cwd=scratch, capture_output=True, text=True, timeout=1200)
        except subprocess.TimeoutExpired:
            return 'MISSED (the suite timed out)'
        failed = [line for line in result.stdout.splitlines() if line.startswith('FAILED')]
        return ('caught by %s' % failed[0][7:].split(' - ')[0]) if result.returncode else 'MISSED'
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main():
    files = tracked_files()
    missed = 0
    for what, filename, published, mutated in MUTATIONS:
        verdict = run_mutation(what, filename, published, mutated, files)
        missed += not verdict.startswith('caught')
        print('%-90s %s' % (what, verdict), flush=True)
    print('%d of %d mutations caught' % (len(MUTATIONS) - missed, len(MUTATIONS)))
    return 1 if missed else 0


if __name__ == '__main__':
    sys.exit(main())
