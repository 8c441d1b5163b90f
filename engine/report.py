"""The report of the records: tables of the published configurations, the grids' runs and MNIST's
runs, the pictures (learning curves, the default run's filters), and the pages they fill:
RESULTS.md, docs/history.md and the README's results at a glance, between their markers.
"""
import json
import os
import sys

from . import PROJECT
from .records import (CONFIGS, NOT_COMPARED, PUBLISHED_SIZES, RECORDS, as_recorded, config_of, device_label, minutes,
                      params_path, read_records, records_folder)

PAGE = os.path.join(PROJECT, 'RESULTS.md')              # the newest run of each configuration, the pictures
HISTORY = os.path.join(PROJECT, 'docs', 'history.md')    # every run
FRONT = os.path.join(PROJECT, 'README.md')               # the results at a glance
PICTURES = os.path.join(PROJECT, 'results')


def varied(record):
    """The published configuration a run varies (a grid's point, other settings): the one whose
    overrides it has, the most of them (1, the default run, has none)."""
    return max((entry for entry in CONFIGS if all(record['settings'].get(k) == v
                                                  for k, v in as_recorded(entry[2]).items())),
               key=lambda entry: len(entry[2]))


def differences(record, base, entry=CONFIGS[0]):
    """What sets a run apart from a published configuration (the default run's, unless given):
    settings, data sizes."""
    wanted = dict(base, **as_recorded(entry[2]))
    out = ['%s=%s' % (k, json.dumps(v)) for k, v in sorted(record['settings'].items())
           if k not in NOT_COMPARED and v != wanted.get(k)]
    if record.get('data_sizes') != PUBLISHED_SIZES:
        out.append('data %s' % ('NL/NV/NT %(L)d/%(V)d/%(T)d' % record['data_sizes'] if record.get('data_sizes')
                                else 'not fingerprinted (recorded before data fingerprints)'))
    return ', '.join(out) or 'none'


def total(r):
    """What `time` showed; a resumed run's covers its last process only, and says so."""
    return minutes(r['seconds']['total']) + (' (resumed)' if r.get('resumed') else '')


def data_label(r):
    """The data's fingerprint and the description a run of them was given (never a machine's folder)."""
    return '%s %s' % (r.get('data_fingerprint', '')[:8] or '-', r['settings'].get('datanote') or '')


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
    others = sorted(((varied(r), differences(r, base, varied(r)), r) for entry, r in completed if not entry),
                    key=lambda o: (o[0][0], o[1], o[2]['date']))
    if others:
        every += (['', 'Other runs (grids and the like), under the published configuration each varies, with what '
                   'differs:', ''] + other_rows(others))
    grids = {(entry[0], differs, device_label(r)): (entry, differs, r) for entry, differs, r in others
             if r.get('data_sizes') == PUBLISHED_SIZES}                   # later runs overwrite
    if grids:
        summary += ['', 'Runs with other settings (`python sweep.py run --grid=...`), the newest of each, under the '
                    'published configuration each varies:', ''] + other_rows(sorted(grids.values(), key=lambda o: (
                        o[0][0], o[1], device_label(o[2]))))
    return summary + mnist_rows(records), every, done


def other_rows(others):
    """The table of (configuration varied, what differs, record)s."""
    return header(['#', 'differs in', 'test %', 'total', 'device', 'date', 'data']) + [
        '| %d | %s | %.2f | %s | %s | %s | %s |' % (entry[0], differs, r['test'][1], total(r), device_label(r),
                                                  r['date'][:10], data_label(r)) for entry, differs, r in others]


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


def pictures(done, folder=RECORDS):
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
    params = default and params_path(default[-1], folder)
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


def write_page(base):
    """RESULTS.md, docs/history.md and the README's table from the records in the drivers' outdir
    (base: the driver's settings), and the pictures."""
    records = read_records(records_folder(base))
    if not records:     # a mistyped --outdir would otherwise empty the page's tables
        sys.exit('error: no records in %s: %s left as it is (python sweep.py run writes them)'
                 % (records_folder(base), PAGE))
    summary, every, done = table(records, base)
    try:
        images = pictures(done, records_folder(base)) if done else []
    except ImportError:     # the pictures already drawn stay on the page, as they are
        images = [n for n in PICTURE_NAMES if os.path.exists(os.path.join(PICTURES, n))]
        print('# no matplotlib: the tables only, results/*.png kept as they were (pip install -r requirements-plot.txt)')
    rewrite(PAGE, with_pictures(summary, images), 'Results')
    rewrite(HISTORY, every, 'History')
    if os.path.exists(FRONT):
        rewrite(FRONT, glance(done), 'README')
    print('# wrote %s, %s and %s (%d runs)%s' % (PAGE, HISTORY, FRONT, len(done),
                                               ''.join(' and results/' + n for n in images)))
