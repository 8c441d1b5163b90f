"""Claims: a run is claimed (a file in outdir/claims/) while a process runs it, so that two sweeps,
on one machine or on the nodes of a cluster sharing the folder, never run it twice at once;
and the cores of one machine shared among the runs claimed there (CoreShare, which a driver
started by `sweep.py run --jobs=N` calls between minibatches).
"""
import datetime
import json
import os
import platform
import threading
import time

CLAIM_HEARTBEAT = 30        # seconds between touches of a held claim
CLAIM_SILENT = 180          # a claim not touched for this long is its process's no more (another node's)


def claims_folder(folder):
    return os.path.join(folder, 'claims')


def read_claim(path):
    """What a claim says of its holder ({} while it is being written), None if it is gone."""
    try:
        with open(path) as f:
            holder = json.loads(f.read() or '{}')
    except FileNotFoundError:
        return None
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def take_claim(path, what):
    """None once this process holds the claim at path (created exclusively: atomic, on NFS 3 and
    later too), else a description of the live process holding it.  A claim whose process is
    gone (this host) or silent for CLAIM_SILENT seconds (any host) is taken over."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = claim_holder(path)
            if holder:
                return holder
            continue
        with os.fdopen(fd, 'w') as f:
            json.dump({'host': platform.node(), 'pid': os.getpid(), 'run': what,
                       'since': datetime.datetime.now().isoformat(timespec='seconds')}, f)
        return None


def claim_holder(path):
    """Who holds the claim at path, or None after removing it if its holder is gone."""
    try:
        silent = time.time() - os.path.getmtime(path)
    except FileNotFoundError:
        return None
    holder = read_claim(path)
    if holder is None:
        return None
    gone = holder.get('host') == platform.node() and not process_alive(holder.get('pid', 0))
    if not gone and silent < CLAIM_SILENT:
        return '%s, process %s on %s since %s' % (path, holder.get('pid', '?'), holder.get('host', '?'),
                                                   holder.get('since', '?'))
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    return None


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:         # someone else's: alive
        pass
    return True


class Heartbeat(threading.Thread):
    """Touches the claims this process holds every CLAIM_HEARTBEAT seconds."""

    def __init__(self):
        super().__init__(daemon=True)
        self.held, self.lock = set(), threading.Lock()

    def run(self):
        while True:
            time.sleep(CLAIM_HEARTBEAT)
            with self.lock:
                for path in self.held:
                    try:
                        os.utime(path)
                    except OSError:
                        pass


SHARED_CORES = 'NNET_SHARED_CORES'     # names a sweep's claims to a driver whose cores it shares


class CoreShare:
    """In a run of `sweep.py run --jobs=N` on the CPU (SHARED_CORES names the sweep's claims):
    the cores this process may use divided among the runs claimed there from this host, their
    sweeps alive, looked at once a second; set_threads(n) when this run's share changes, so
    that the cores of a run that ends go to those still going.  Call it between minibatches."""

    def __init__(self, folder, set_threads, cores=None, clock=time.time):
        self.folder, self.set_threads, self.clock = folder, set_threads, clock
        self.cores = cores or cpu_count()
        self.threads, self.last = None, 0.0

    def runs(self):
        count = 0
        for name in os.listdir(self.folder) if os.path.isdir(self.folder) else ():
            try:
                holder = read_claim(os.path.join(self.folder, name))
            except OSError:
                continue
            count += bool(holder and holder.get('host') == platform.node() and type(holder.get('pid')) is int
                          and process_alive(holder['pid']))
        return count

    def __call__(self):
        now = self.clock()
        if now - self.last < 1:
            return
        self.last = now
        threads = max(1, self.cores // max(1, self.runs()))
        if threads != self.threads:
            self.set_threads(threads)
            self.threads = threads


def cpu_count():
    """The cores this process may use (a scheduler's allocation, taskset), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
