"""Reproduce the published experiment table: run the configurations, then tabulate and plot them.

    python sweep.py run [--only=1,2,6] [--again] [--nepoch=50] [-- any --name=value for the driver]
    python sweep.py table                 # RESULTS.md + results/*.png from runs/results.jsonl

`run` starts each configuration as its own `python cifar10_convnet.py --name=value ...`
process (the device comes from THEANO_FLAGS, as always) and skips those already
recorded as completed with the same settings on the same device, so an interrupted
sweep resumes where it stopped; --again runs them anyway (after a change of code, flags
or BLAS, which the settings do not capture: the records and the table keep both runs).
`table` needs matplotlib for the pictures (pip install -r requirements-plot.txt).
"""
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, 'runs', 'results.jsonl')
PAGE = os.path.join(HERE, 'RESULTS.md')
PICTURES = os.path.join(HERE, 'results')
LOGS = os.path.join(HERE, 'runs', 'logs')

# number, description, overrides of cifar10_convnet.py, published (CPU, Tesla K20c) test % and wall-clock
CONFIGS = [
    (1, '16 filters (the default run)', {}, ('73.69% 61m45s', '73.85% 10m19s')),
    (2, '64 filters', {'W1dim': (64, 5, 5)}, ('', '75.92% 13m01s')),
    (3, '256 filters', {'W1dim': (256, 5, 5)}, ('', '75.99% 20m53s')),
    (4, '64 filters, two ReLU layers (H2 = H3 = 1000)', {'W1dim': (64, 5, 5), 'H3': 1000},
     ('', '75.51% 13m39s')),
    (5, '64 filters, pool 2x2 (H1 = 12544)', {'W1dim': (64, 5, 5), 'ds1': (2, 2)}, ('', '72.72% 15m55s')),
    (6, '64 filters, overlapping pool 4x4 stride 2x2', {'W1dim': (64, 5, 5), 'st1': (2, 2)},
     ('', 'abandoned: 30 min an epoch, GPU idle')),
]
# settings that do not change what is computed (conv: the same values, computed another way)
NOT_COMPARED = {'datadir', 'outdir', 'datanote', 'conv'}


def read_records(path=RESULTS):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def settings_key(settings):
    return json.dumps({k: v for k, v in sorted(settings.items()) if k not in NOT_COMPARED})


def as_recorded(overrides):
    """Overrides as the JSON records hold them (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}


def matches(record, config_overrides, base, device):
    wanted = dict(base, **as_recorded(config_overrides))
    return (record.get('script') == 'cifar10_convnet' and record.get('status') == 'completed'
            and record.get('device') == device and settings_key(record['settings']) == settings_key(wanted))


def to_run(only, again, base, device, records):
    """(entry, already recorded) for each configuration asked for."""
    return [(entry, not again and any(matches(r, entry[2], base, device) for r in records))
            for entry in CONFIGS if not only or entry[0] in only]


def run(argv):
    only, again, extra = None, False, []
    for arg in argv:
        if arg.startswith('--only='):
            only = {int(n) for n in arg[7:].split(',')}
        elif arg == '--again':
            again = True
        else:
            extra.append(arg)
    driver = [sys.executable, os.path.join(HERE, 'cifar10_convnet.py')]
    probe = subprocess.run(driver + extra + ['--help'], capture_output=True, text=True)
    if probe.returncode != 0:
        sys.exit(probe.stderr)
    lines = probe.stdout.strip().splitlines()
    base, device = json.loads(lines[-1]), json.loads(lines[-2])['device']
    for (number, title, overrides, _), recorded in to_run(only, again, base, device, read_records()):
        if recorded:
            print('# %d. %s: already recorded on %s, skipped' % (number, title, device), flush=True)
            continue
        args = ['--%s=%s' % (k, repr(v).replace(' ', '')) for k, v in overrides.items()]
        print('# %d. %s: %s' % (number, title, ' '.join(driver[1:] + args + extra)), flush=True)
        os.makedirs(LOGS, exist_ok=True)
        log = os.path.join(LOGS, '%d-%s.log' % (number, time.strftime('%Y%m%d-%H%M%S')))
        with open(log, 'w') as f:            # the run's own log, kept beside its record
            proc = subprocess.Popen(driver + args + extra, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                f.write(line)
                f.flush()
            code = proc.wait()
        if code != 0:
            sys.exit('# %d. %s stopped with exit code %d; run again to resume' % (number, title, code))


def config_of(record):
    """The CONFIGS entry a record ran, if any (same overrides, other settings at their defaults)."""
    for entry in CONFIGS:
        wanted = dict({'W1dim': [16, 5, 5], 'ds1': [4, 4], 'st1': None, 'H3': None}, **as_recorded(entry[2]))
        if all(record['settings'].get(k) == v for k, v in wanted.items()):
            return entry
    return None


def minutes(seconds):
    return '%dm%02ds' % divmod(round(seconds), 60)


def table(records):
    rows = ['| # | configuration | published CPU | published Tesla K20c | our test % | data s | compile s'
            ' | train s | total | epochs | device | BLAS | date | data |',
            '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    completed = [(config_of(r), r) for r in records if r.get('status') == 'completed']
    done = sorted(((entry, r) for entry, r in completed if entry), key=lambda d: (d[0][0], d[1]['date']))
    for entry, r in done:
        s = r['seconds']
        rows.append('| %d | %s | %s | %s | **%.2f** | %.1f | %.1f | %.1f | %s | %d | %s | %s | %s | %s |' % (
            entry[0], entry[1], entry[3][0] or '-', entry[3][1], r['test'][1], s['data'], s['compile'],
            s['train'], minutes(s['total']), r['settings']['nepoch'], r['device'],
            r.get('blas', '').split(' (')[0], r['date'][:10],
            r['settings'].get('datanote') or r.get('data_dir', '')))
    return rows, done


def pictures(done):
    """Learning curves of each configuration's latest run and the first layer's filters of the
    latest default run, as PNGs."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np
    os.makedirs(PICTURES, exist_ok=True)
    names = []
    latest = {entry[0]: (entry, r) for entry, r in done}       # done is in (number, date) order
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for entry, r in latest.values():
        e = np.array(r['epochs'])
        line, = axes[0].plot(e[:, 0], e[:, 1], '--', alpha=0.7)
        axes[0].plot(e[:, 0], e[:, 3], '-', color=line.get_color(), label='%d. %s' % entry[:2])
        axes[1].plot(e[:, 0], e[:, 2], '--', color=line.get_color(), alpha=0.7)
        axes[1].plot(e[:, 0], e[:, 4], '-', color=line.get_color())
    axes[0].set(xlabel='epoch', ylabel='cross-entropy', title='cost (dashed: training, solid: validation)')
    axes[1].set(xlabel='epoch', ylabel='% correct', title='accuracy (dashed: training, solid: validation)')
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(PICTURES, 'learning_curves.png'), dpi=80)
    names.append('learning_curves.png')
    default = [r for entry, r in done if entry[0] == 1]
    if default and os.path.exists(default[-1].get('params', '')):
        with np.load(default[-1]['params']) as f:
            W = f['00_W1']                                  # (F, 3, 5, 5), R G B planes
        fig, axes = plt.subplots(2, (len(W) + 1) // 2, figsize=(len(W) * 0.6, 2.6))
        for ax, w in zip(axes.ravel(), W):
            im = w.transpose(1, 2, 0)
            ax.imshow((im - im.min()) / (im.max() - im.min()), interpolation='nearest')
            ax.axis('off')
        fig.suptitle('first-layer filters of the default run (each scaled to its own range)')
        fig.savefig(os.path.join(PICTURES, 'filters_default.png'), dpi=80)
        names.append('filters_default.png')
    return names


def write_page(argv):
    rows, done = table(read_records())
    try:
        images = pictures(done) if done else []
    except ImportError:
        images = []
        print('# no matplotlib: table only (pip install -r requirements-plot.txt)')
    head = open(PAGE).read().split('<!-- table -->')[0] if os.path.exists(PAGE) else '# Results\n\n'
    with open(PAGE, 'w') as f:
        f.write(head + '<!-- table -->\n' + '\n'.join(rows) + '\n\n')
        f.write(''.join('![%s](results/%s)\n\n' % (n[:-4].replace('_', ' '), n) for n in images))
    print('# wrote %s (%d runs)%s' % (PAGE, len(done), ''.join(' and results/' + n for n in images)))


if __name__ == '__main__':
    if len(sys.argv) < 2 or sys.argv[1] not in ('run', 'table'):
        sys.exit(__doc__)
    (run if sys.argv[1] == 'run' else write_page)(sys.argv[2:])
