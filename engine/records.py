"""A run's record: the file that says what a run trained, where and how well.  The drivers write
records (through runlog), the sweeps and the report read and match them; this is the one
module that knows their files.

A run's record is outdir/SCRIPT-TIME-PID.record.json, beside its parameter file
outdir/SCRIPT-TIME-PID.npz; older versions appended records to outdir/results.jsonl, still read.
CONFIGS are the published experiment's configurations, which the records are matched to.
"""
import datetime
import glob
import json
import os
import platform
import re
import sys
import time
import zipfile

from . import PROJECT, download
from .claims import process_alive

RECORDS = os.path.join(PROJECT, 'runs')             # the drivers' outdir: every run's record and parameters
RECORD_SUFFIX = '.record.json'                        # a run's record: its parameter file's name, this suffix
LEGACY_RECORDS = 'results.jsonl'                      # where older versions appended their records

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


def record_path(params_path):
    """A run's record file: beside its parameter file, of the same name."""
    return params_path[:-len('.npz')] + RECORD_SUFFIX


def write_record(path, record):
    """The record as a file of its own, whole or not at all and never over another's: written
    under a name of this process's, then linked to its own (link is atomic and exclusive, on
    NFS too, where appends to one shared file are not)."""
    partial = '%s.%s-%d.partial' % (path, platform.node(), os.getpid())
    try:
        with open(partial, 'w') as f:
            f.write(json.dumps(record, default=str) + '\n')
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(partial, path)
        except FileExistsError:
            raise
        except OSError:                     # a file system without hard links (FAT, some SMB shares)
            os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def new_params_path(folder, script, suffix='.npz'):
    """A parameter file name no other run has: time and process id, and a number if need be
    (neither it nor its record file exists)."""
    first = os.path.join(folder, '%s-%s-%d' % (script, time.strftime('%Y%m%d-%H%M%S'), os.getpid()))
    stem, n = first, 1
    while os.path.exists(stem + suffix) or os.path.exists(stem + RECORD_SUFFIX):
        stem, n = '%s-%d' % (first, n), n + 1
    return stem + suffix


def records_folder(base):
    """The drivers' outdir, resolved as the drivers resolve it: where the records are."""
    return download.resolve(base['outdir'])


def read_records(folder=RECORDS):
    """Every run's record in folder, oldest first: a .record.json file each, and the lines of
    results.jsonl, to which older versions appended (a damaged one skipped with a warning)."""
    records = []
    legacy = os.path.join(folder, LEGACY_RECORDS)
    if os.path.exists(legacy):
        with open(legacy) as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except ValueError:
                        sys.stderr.write('warning: %s, line %d is damaged; skipped\n' % (legacy, number))
    for path in sorted(glob.glob(os.path.join(folder, '*' + RECORD_SUFFIX))):
        try:
            with open(path) as f:
                records.append(json.load(f))
        except (OSError, ValueError) as e:
            sys.stderr.write('warning: %s cannot be read (%s); skipped\n' % (path, e))
    return sorted(records, key=lambda r: r.get('date', ''))


def params_path(record, folder=RECORDS):
    """A record's parameter file, resolved from the records' own folder."""
    return os.path.join(folder, os.path.basename(record.get('params', '')))


# what saved_settings raises for a file that is no parameter file of ours
SAVED_SETTINGS_ERRORS = (OSError, ValueError, KeyError, zipfile.BadZipFile)


def saved_settings(path):
    """The settings a parameter file or checkpoint was saved with (nnet.Network.save's JSON)."""
    import numpy as np
    with np.load(path) as f:
        return json.loads(str(f['settings']))


def settings_key(settings):
    return json.dumps({k: v for k, v in sorted(settings.items()) if k not in NOT_COMPARED})


def as_recorded(overrides):
    """Overrides as the JSON records hold them (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}


def same_settings(record, settings):
    """The record trained with these settings: every setting that changes training as asked."""
    return record.get('script') == 'cifar10_convnet' and settings_key(record['settings']) == settings_key(settings)


def runs_config(record, config_overrides, base):
    """The record trained this configuration at these base settings."""
    return same_settings(record, dict(base, **as_recorded(config_overrides)))


VECTOR_KERNELS = {'SkylakeX': 'AVX-512', 'Cooperlake': 'AVX-512', 'SapphireRapids': 'AVX-512',
                  'Haswell': 'AVX2', 'Zen': 'AVX2'}


def device_label(r):
    """The record's device; a GPU without its number (cuda1 and cuda0 of one machine are alike);
    for a CPU recorded without its vector instructions (older records), those its OpenBLAS
    kernels used, so that an AVX-512 and an AVX2 machine of one name differ."""
    device = re.sub(r' \(cuda\d+\)$', ' (cuda)', r.get('device', ''))
    if not device.startswith('cpu:') or re.search(r'AVX|NEON|SVE|no SIMD', device):
        return device
    kernels = re.findall(r' (\w+)(?:,|$| \()', r.get('blas', '').split('kernels:')[-1])
    isa = next((VECTOR_KERNELS[k] for k in kernels if k in VECTOR_KERNELS), None)
    return '%s, %s' % (device, isa) if isa else device


def ran_here(record, settings, device, data_fingerprint):
    """A run with these settings on this device (any GPU of its kind) and these data, whatever its status."""
    return (same_settings(record, settings) and device_label(record) == device_label({'device': device})
            and record.get('data_fingerprint') == data_fingerprint)


def matches(record, settings, device, data_fingerprint):
    """A completed run with these settings on this device and these data: a sweep skips it."""
    return ran_here(record, settings, device, data_fingerprint) and record.get('status') == 'completed'


def stopped_file(records, settings, device, data_fingerprint, folder):
    """The file to go on from if the latest run with these settings here did not finish: a stopped
    run's parameter file (its record says where it stopped), or the checkpoint of a run killed
    outright, which wrote no record (the newest one in the records' folder whose settings,
    device and data are these, younger than the last record here, its process gone).  None if
    the latest run finished, or nothing can go on."""
    runs = [r for r in records if ran_here(r, settings, device, data_fingerprint)]
    if runs and runs[-1].get('status') == 'interrupted' and 'position' in runs[-1]:
        path = params_path(runs[-1], folder)
        if os.path.exists(path):
            return path
    last_end = (datetime.datetime.fromisoformat(runs[-1]['date']).timestamp() + runs[-1]['seconds'].get('total', 0)
                if runs else 0)
    killed = []
    for path in glob.glob(os.path.join(folder, 'cifar10_convnet-*.checkpoint.npz')):
        pid = re.search(r'-\d{8}-\d{6}-(\d+)(-\d+)?\.checkpoint\.npz$', path)     # runlog.new_params_path's
        if os.path.getmtime(path) <= last_end or (pid and process_alive(int(pid.group(1)))):
            continue
        try:
            saved = saved_settings(path)
        except SAVED_SETTINGS_ERRORS:
            continue                        # not one a run finished writing
        record = {'script': 'cifar10_convnet', 'settings': {k: v for k, v in saved.items() if k in settings},
                  'device': saved.get('device'), 'data_fingerprint': saved.get('data_fingerprint')}
        if ran_here(record, settings, device, data_fingerprint):
            killed.append((os.path.getmtime(path), path))
    return max(killed)[1] if killed else None


def config_of(record, base):
    """The CONFIGS entry a record ran, if any: its overrides, every other setting that changes
    training at the driver's defaults (base), and the published split of CIFAR-10."""
    if record.get('data_sizes') != PUBLISHED_SIZES:
        return None
    for entry in CONFIGS:
        if runs_config(record, entry[2], base):
            return entry
    return None


def minutes(seconds):
    """A record's seconds as the log's progress line and the tables show them: 2m26s."""
    return '%dm%02ds' % divmod(round(seconds), 60)
