"""Reproduce the published experiment table: run the configurations, then tabulate and plot them.

    python sweep.py run [--only=1,2,6] [--again] [--nepoch=50] [-- any --name=value for the driver]
    python sweep.py table                 # RESULTS.md, docs/history.md, README's table, results/*.png

`run` starts each configuration as its own `python cifar10_convnet.py --name=value ...`
process (the device comes from THEANO_FLAGS, as always) and skips those already
recorded as completed with the same settings on the same device, so an interrupted
sweep resumes where it stopped: a configuration whose last run here was stopped (Ctrl-C)
goes on from that run's minibatch (--resume=its parameter file), one killed outright from
its last logged row (--resume=its checkpoint); --again runs completed
ones anyway (after a change of code, flags or BLAS, which the settings do not capture: the
records and the table keep both runs).
`table` needs matplotlib for the pictures (pip install -r requirements-plot.txt).
"""
import datetime
import glob
import json
import os
import re
import subprocess
import sys
import time
import zipfile

import download

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, 'runs', 'results.jsonl')
PAGE = os.path.join(HERE, 'RESULTS.md')              # the newest run of each configuration, the pictures
HISTORY = os.path.join(HERE, 'docs', 'history.md')    # every run
FRONT = os.path.join(HERE, 'README.md')               # the results at a glance
PICTURES = os.path.join(HERE, 'results')

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
# settings that do not change what is trained (conv: the same values, computed another way;
# quickL: only how the training columns are logged)
NOT_COMPARED = {'datadir', 'outdir', 'datanote', 'conv', 'quickL', 'resume'}
PUBLISHED_SIZES = {'L': 40000, 'V': 10000, 'T': 10000}


def read_records(path=RESULTS):
    """The records of results.jsonl; a damaged line (a writer killed mid-line) is skipped with a warning."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError:
                    sys.stderr.write('warning: %s, line %d is damaged; skipped\n' % (path, number))
    return records


def results_path(base):
    """results.jsonl in the drivers' outdir, resolved as the drivers resolve it."""
    return os.path.join(download.resolve(base['outdir']), 'results.jsonl')


def driver_defaults(extra=()):
    """(settings, device) of cifar10_convnet.py with these overrides, from its --help=json."""
    probe = subprocess.run([sys.executable, os.path.join(HERE, 'cifar10_convnet.py')] + list(extra) + ['--help=json'],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        sys.exit(probe.stderr)
    described = json.loads(probe.stdout.strip().splitlines()[-1])      # after the overrides' lines
    return described['settings'], described['device']


def settings_key(settings):
    return json.dumps({k: v for k, v in sorted(settings.items()) if k not in NOT_COMPARED})


def as_recorded(overrides):
    """Overrides as the JSON records hold them (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}


def runs_config(record, config_overrides, base):
    """The record trained this configuration: every setting that changes training as asked."""
    wanted = dict(base, **as_recorded(config_overrides))
    return record.get('script') == 'cifar10_convnet' and settings_key(record['settings']) == settings_key(wanted)


def ran_here(record, config_overrides, base, device, data_fingerprint):
    """A run of this configuration on this device and these data, whatever its status."""
    return (runs_config(record, config_overrides, base) and device_label(record) == device
            and record.get('data_fingerprint') == data_fingerprint)


def matches(record, config_overrides, base, device, data_fingerprint):
    """A completed run of this configuration on this device and these data: resume skips it."""
    return ran_here(record, config_overrides, base, device, data_fingerprint) and record.get('status') == 'completed'


def stopped_file(records, config_overrides, base, device, data_fingerprint, results):
    """The file to go on from if this configuration's latest run here did not finish: a stopped
    run's parameter file (its record says where it stopped), or the checkpoint of a run killed
    outright, which wrote no record (the newest one in the records' folder whose settings,
    device and data are these, younger than the last record here, its process gone).  None if
    the latest run finished, or nothing can go on."""
    runs = [r for r in records if ran_here(r, config_overrides, base, device, data_fingerprint)]
    if runs and runs[-1].get('status') == 'interrupted' and 'position' in runs[-1]:
        path = params_path(runs[-1], results)
        if os.path.exists(path):
            return path
    last_end = (datetime.datetime.fromisoformat(runs[-1]['date']).timestamp() + runs[-1]['seconds'].get('total', 0)
                if runs else 0)
    killed = []
    for path in glob.glob(os.path.join(os.path.dirname(results), 'cifar10_convnet-*.checkpoint.npz')):
        pid = re.search(r'-\d{8}-\d{6}-(\d+)(-\d+)?\.checkpoint\.npz$', path)     # runlog.new_params_path's
        if os.path.getmtime(path) <= last_end or (pid and process_alive(int(pid.group(1)))):
            continue
        try:
            saved = saved_settings(path)
        except SAVED_SETTINGS_ERRORS:
            continue                        # not one a run finished writing
        record = {'script': 'cifar10_convnet', 'settings': {k: v for k, v in saved.items() if k in base},
                  'device': saved.get('device'), 'data_fingerprint': saved.get('data_fingerprint')}
        if ran_here(record, config_overrides, base, device, data_fingerprint):
            killed.append((os.path.getmtime(path), path))
    return max(killed)[1] if killed else None


# what saved_settings raises for a file that is no parameter file of ours
SAVED_SETTINGS_ERRORS = (OSError, ValueError, KeyError, zipfile.BadZipFile)


def saved_settings(path):
    """The settings a parameter file or checkpoint was saved with (nnet.Network.save's JSON)."""
    import numpy as np
    with np.load(path) as f:
        return json.loads(str(f['settings']))


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:         # someone else's: alive
        pass
    return True


def to_run(only, again, base, device, data_fingerprint, records, results=RESULTS):
    """(entry, already recorded, the stopped run's file to go on from or None) for each configuration
    asked for."""
    return [(entry, not again and any(matches(r, entry[2], base, device, data_fingerprint) for r in records),
             stopped_file(records, entry[2], base, device, data_fingerprint, results))
            for entry in CONFIGS if not only or entry[0] in only]


def configuration_numbers(text):
    """--only=1,2,6 as a set of CONFIGS numbers; anything else refused with one line."""
    numbers = {entry[0] for entry in CONFIGS}
    try:
        only = {int(n) for n in text.split(',')}
    except ValueError:
        only = None
    if not only or not only <= numbers:
        sys.exit('error: --only=%s: needs numbers of the published configurations, from %s, e.g. --only=1,2,6'
                 % (text, ', '.join(map(str, sorted(numbers)))))
    return only


def run(argv):
    only, again, extra = None, False, []
    for arg in argv:
        if arg.startswith('--only='):
            only = configuration_numbers(arg[7:])
        elif arg == '--again':
            again = True
        elif arg != '--':                   # what follows a bare -- goes to the driver, as the rest
            extra.append(arg)
    driver = [sys.executable, os.path.join(HERE, 'cifar10_convnet.py')]
    base, device = driver_defaults(extra)
    import cifar10
    try:
        data_fingerprint = cifar10.fingerprint(cifar10.load_raw(base['datadir'] and download.resolve(base['datadir'])))
    except cifar10.DataError as e:
        sys.exit('error: %s' % e)
    results = results_path(base)
    for (number, title, overrides, _), recorded, stopped in to_run(only, again, base, device, data_fingerprint,
                                                                   read_records(results), results):
        if recorded:
            print('# %d. %s: already recorded on %s, skipped' % (number, title, device), flush=True)
            continue
        args = ['--%s=%s' % (k, repr(v).replace(' ', '')) for k, v in overrides.items()]
        if stopped:                         # its settings are these; it goes on from where it stopped
            args = ['--resume=' + stopped]
        print('# %d. %s: %s' % (number, title, ' '.join(driver[1:] + args + extra)), flush=True)
        logs = os.path.join(os.path.dirname(results), 'logs')       # beside the records, in outdir
        os.makedirs(logs, exist_ok=True)
        log = os.path.join(logs, '%d-%s.log' % (number, time.strftime('%Y%m%d-%H%M%S')))
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


def config_of(record, base):
    """The CONFIGS entry a record ran, if any: its overrides, every other setting that changes
    training at the driver's defaults (base), and the published split of CIFAR-10."""
    if record.get('data_sizes') != PUBLISHED_SIZES:
        return None
    for entry in CONFIGS:
        if runs_config(record, entry[2], base):
            return entry
    return None


def differences(record, base):
    """What sets a run apart from the published default run: settings, data sizes."""
    out = ['%s=%s' % (k, json.dumps(v)) for k, v in sorted(record['settings'].items())
           if k not in NOT_COMPARED and v != base.get(k)]
    if record.get('data_sizes') != PUBLISHED_SIZES:
        out.append('data %s' % ('NL/NV/NT %(L)d/%(V)d/%(T)d' % record['data_sizes'] if record.get('data_sizes')
                                else 'not fingerprinted (recorded before data fingerprints)'))
    return ', '.join(out) or 'none'


def minutes(seconds):
    return '%dm%02ds' % divmod(round(seconds), 60)


def total(r):
    """What `time` showed; a resumed run's covers its last process only, and says so."""
    return minutes(r['seconds']['total']) + (' (resumed)' if r.get('resumed') else '')


def data_label(r):
    """The data's fingerprint and the description a run of them was given (never a machine's folder)."""
    return '%s %s' % (r.get('data_fingerprint', '')[:8] or '-', r['settings'].get('datanote') or '')


VECTOR_KERNELS = {'SkylakeX': 'AVX-512', 'Cooperlake': 'AVX-512', 'SapphireRapids': 'AVX-512',
                  'Haswell': 'AVX2', 'Zen': 'AVX2'}


def device_label(r):
    """The record's device; for a CPU recorded without its vector instructions (older records),
    those its OpenBLAS kernels used, so that an AVX-512 and an AVX2 machine of one name differ."""
    device = r.get('device', '')
    if not device.startswith('cpu:') or re.search(r'AVX|NEON|SVE|no SIMD', device):
        return device
    kernels = re.findall(r' (\w+)(?:,|$| \()', r.get('blas', '').split('kernels:')[-1])
    isa = next((VECTOR_KERNELS[k] for k in kernels if k in VECTOR_KERNELS), None)
    return '%s, %s' % (device, isa) if isa else device


RUN_COLUMNS = ('our test %', 'data s', 'compile s', 'train s', 'total', 'device', 'BLAS', 'date', 'data')
WHERE_COLUMNS = ('BLAS', 'data')        # in the tables of every run only


def run_column_names(full=True):
    return [name for name in RUN_COLUMNS if full or name not in WHERE_COLUMNS]


def run_columns(r, full=True):
    """A run's columns, RUN_COLUMNS (full=False: without WHERE_COLUMNS)."""
    s = r['seconds']
    values = dict(zip(RUN_COLUMNS, ['**%.2f**' % r['test'][1], '%.1f' % s['data'], '%.1f' % s['compile'],
                                    '%.1f' % s['train'], total(r), device_label(r), r.get('blas', '').split(' (')[0],
                                    r['date'][:10], data_label(r)]))
    return ' | '.join(values[name] for name in run_column_names(full)) + ' |'


def header(names):
    """A markdown table's header and rule for these column names."""
    return ['| %s |' % ' | '.join(names), '|%s' % ('---|' * len(names))]


def config_header(full=True):
    return header(['#', 'configuration', 'published CPU', 'published Tesla K20c'] + run_column_names(full))


def config_row(entry, r, full=True):
    return '| %d | %s | %s | %s | %s' % (entry[0], entry[1], entry[3][0] or '-', entry[3][1], run_columns(r, full))


def table(records, base):
    """The page's generated part in two: the newest run of each published configuration on each
    device (and the MNIST runs); every run of them and the other runs, oldest first.  Also the
    published configurations' runs as (entry, record), oldest first."""
    notes = {r.get('data_fingerprint'): r['settings'].get('datanote') for r in records
             if r.get('data_fingerprint') and r.get('settings', {}).get('datanote')}
    records = [dict(r, settings=dict(r['settings'], datanote=notes[r['data_fingerprint']]))
               if not r['settings'].get('datanote') and r.get('data_fingerprint') in notes else r for r in records]
    completed = [(config_of(r, base), r) for r in records
                 if r.get('status') == 'completed' and r.get('script') == 'cifar10_convnet']
    done = sorted(((entry, r) for entry, r in completed if entry), key=lambda d: (d[0][0], d[1]['date']))
    newest = {(entry[0], device_label(r)): (entry, r) for entry, r in done}      # later runs overwrite
    summary = (['The newest run of each published configuration on each device (every run, with its BLAS and'
                ' data: [docs/history.md](docs/history.md)):', ''] + config_header(full=False)
               + [config_row(entry, r, full=False) for entry, r in
                  sorted(newest.values(), key=lambda d: (d[0][0], device_label(d[1])))])
    every = ['Every run of the published configurations, oldest first (the code, the machine and the BLAS'
             ' kernels changed between them: see the steps below):', ''] + config_header()
    every += [config_row(entry, r) for entry, r in done]
    others = [r for entry, r in completed if not entry]
    if others:
        every += (['', 'Other runs (each differs from a published configuration as shown):', '']
                  + header(['differs in', 'test %', 'total', 'device', 'date', 'data']))
        every += ['| %s | %.2f | %s | %s | %s | %s |' % (differences(r, base), r['test'][1],
                                                       total(r), device_label(r), r['date'][:10],
                                                       data_label(r)) for r in others]
    return summary + mnist_rows(records), every, done


def glance(done):
    """The README's table: the published figures beside our newest run of each configuration on
    a CPU and on a GPU, test accuracy and the whole run's time."""
    newest = {}
    for entry, r in done:                       # in (number, date) order: later runs overwrite
        newest[entry[0], 'CPU' if r['device'].startswith('cpu:') else 'GPU'] = r
    devices = {kind: sorted({device_label(r) for (n, k), r in newest.items() if k == kind}) for kind in ('CPU', 'GPU')}

    def cell(number, kind):
        r = newest.get((number, kind))
        if not r:
            return ''
        seconds = r['seconds']['total']
        return '%.2f%% %s' % (r['test'][1], '%d s' % round(seconds) if seconds < 60 else minutes(seconds))
    rows = header(['configuration', 'published CPU (6 cores)', 'published Tesla K20c', 'ours, CPU', 'ours, GPU'])
    rows += ['| %d. %s | %s | %s | %s | %s |' % (entry[0], entry[1], entry[3][0], entry[3][1], cell(entry[0], 'CPU'),
                                              cell(entry[0], 'GPU')) for entry in CONFIGS]
    return rows + ['', 'Ours on %s.' % ' and '.join('; '.join(d) for d in devices.values() if d)]


MNIST_SETTINGS = ('H1', 'H2', 'eta', 'mu', 'lam', 'batchsize', 'nepoch', 'Wstd', 'seed')


def mnist_rows(records):
    """Rows of the MNIST MLP's completed runs (`python mnist_mlp.py`), oldest first."""
    runs = sorted((r for r in records if r.get('status') == 'completed' and r.get('script') == 'mnist_mlp'),
                  key=lambda r: r['date'])
    if not runs:
        return []
    rows = (['', 'The MNIST MLP (`python mnist_mlp.py`; its split 50000 / 10000 / 10000):', '']
            + header(['settings'] + run_column_names()))
    rows += ['| %s | %s' % (', '.join('%s=%s' % (k, json.dumps(r['settings'][k])) for k in MNIST_SETTINGS
                                      if k in r['settings']), run_columns(r)) for r in runs]
    return rows


PICTURE_NAMES = ('learning_curves.png', 'filters_default.png')


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
    params = default and params_path(default[-1])
    if params and os.path.exists(params):
        with np.load(params) as f:
            W = f['00_W1']                                  # (F, 3, 5, 5), R G B planes
        fig, axes = plt.subplots(2, (len(W) + 1) // 2, figsize=(len(W) * 0.6, 2.6))
        for ax, w in zip(axes.ravel(), W):
            im = w.transpose(1, 2, 0)
            ax.imshow((im - im.min()) / (im.max() - im.min()), interpolation='nearest')
            ax.axis('off')
        fig.suptitle('first-layer filters of the default run (each scaled to its own range)')
        fig.savefig(os.path.join(PICTURES, 'filters_default.png'), dpi=80)
        names.append('filters_default.png')
    elif default and os.path.exists(os.path.join(PICTURES, 'filters_default.png')):
        print('# results/filters_default.png kept as it was: the newest default run\'s parameter file %s is not here'
              % params)
        names.append('filters_default.png')
    return names


def params_path(record, results=RESULTS):
    """A record's parameter file, resolved from the records' own folder."""
    return os.path.join(os.path.dirname(results), os.path.basename(record.get('params', '')))


TABLE_START = '<!-- table: written by python sweep.py table -->'
TABLE_END = '<!-- end of table -->'


def filled(page, generated, name=PAGE):
    """The page's text with its generated part (between TABLE_START and TABLE_END) replaced by the
    lines `generated`; the hand-written text around it kept."""
    if TABLE_START not in page or TABLE_END not in page:
        sys.exit('# %s lost its markers %s and %s: put them back where the table goes' % (name, TABLE_START, TABLE_END))
    head, rest = page.split(TABLE_START, 1)
    return head + TABLE_START + '\n' + '\n'.join(generated) + '\n' + TABLE_END + rest.split(TABLE_END, 1)[1]


def with_pictures(summary, images):
    lines = summary + ['']
    for n in images:
        lines += ['![%s](results/%s)' % (n[:-4].replace('_', ' '), n), '']
    return lines[:-1]


def rewrite(path, generated, title):
    page = open(path).read() if os.path.exists(path) else '# %s\n\n%s\n%s\n' % (title, TABLE_START, TABLE_END)
    page = filled(page, generated, path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write(page)


def write_page(argv):
    base = driver_defaults(argv)[0]
    records = read_records(results_path(base))
    if not records:     # a mistyped --outdir would otherwise empty the page's tables
        sys.exit('error: no records in %s: %s left as it is (python sweep.py run writes them)'
                 % (results_path(base), PAGE))
    summary, every, done = table(records, base)
    try:
        images = pictures(done) if done else []
    except ImportError:     # the pictures already drawn stay on the page, as they are
        images = [n for n in PICTURE_NAMES if os.path.exists(os.path.join(PICTURES, n))]
        print('# no matplotlib: the tables only, results/*.png kept as they were (pip install -r requirements-plot.txt)')
    rewrite(PAGE, with_pictures(summary, images), 'Results')
    rewrite(HISTORY, every, 'History')
    if os.path.exists(FRONT):
        rewrite(FRONT, glance(done), 'README')
    print('# wrote %s, %s and %s (%d runs)%s' % (PAGE, HISTORY, FRONT, len(done),
                                               ''.join(' and results/' + n for n in images)))


if __name__ == '__main__':
    if len(sys.argv) < 2 or sys.argv[1] not in ('run', 'table'):
        sys.exit(__doc__)
    import machine      # both run the driver (its settings); a Python that cannot is named here, with this command
    machine.require_theano_python()
    (run if sys.argv[1] == 'run' else write_page)(sys.argv[2:])
