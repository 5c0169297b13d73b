"""How many processes this machine gives the work: the CPUs this process may use, the processes torchrun starts on
this machine, and the DataLoader workers (or decoding processes) each gets. No torch: cache.py's decoding processes
import this, and on Windows each of them re-imports its command."""

import os
import platform

WINDOWS_MAX_WORKERS = 4  # Windows spawns each DataLoader worker, re-importing train.py (about 0.8 GB and 15 s each)


def usable_cpus():
    """The CPUs this process may run on (a cluster job's share, not the whole machine's count)."""
    if hasattr(os, "sched_getaffinity"):  # Linux
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def local_world_size():
    """Processes on this machine (torchrun sets LOCAL_WORLD_SIZE; WORLD_SIZE counts every machine's)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def worker_count(requested=-1, cpus=None, processes=None, system=None):
    """DataLoader workers per process: `requested` when 0 or more, else this machine's usable CPUs shared by its
    processes, less one per process to feed the device; at most WINDOWS_MAX_WORKERS on Windows."""
    if requested >= 0:
        return requested
    cpus = usable_cpus() if cpus is None else cpus
    processes = local_world_size() if processes is None else processes
    workers = max(1, cpus // max(processes, 1) - 1)
    if (system or platform.system()) == "Windows":
        workers = min(workers, WINDOWS_MAX_WORKERS)
    return workers
