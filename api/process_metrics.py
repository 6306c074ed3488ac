"""Metrics that every cdm process with a /metrics endpoint exports (``cdm daemon`` and ``cdm serve``), defined once
so both use the same name and meaning (``daemon.metrics`` and ``api.metrics`` register them):

    cdm_ready                                 1 while the process answers /readyz with 200, else 0
    cdm_registry_latest_epoch                 the registry's epoch as last read from Redis (not the served one)
    cdm_volume_free_bytes{volume}             free bytes of the file system holding a directory (statvfs)
    cdm_volume_size_bytes{volume}             size of that file system
    cdm_volume_used_bytes{volume}             bytes of the files under the directory itself (e.g. the spool)

``volume`` is a fixed word per directory ("spool", "artifacts", "cache"), never a path: the label set is bounded.
The served epoch stays per component (``cdm_registry_epoch`` in the daemon, ``cdm_serve_epoch`` in serve) so a
rule compares it with ``cdm_registry_latest_epoch`` of the same target.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

READY = "cdm_ready"
REGISTRY_LATEST_EPOCH = "cdm_registry_latest_epoch"
VOLUME_FREE_BYTES = "cdm_volume_free_bytes"
VOLUME_SIZE_BYTES = "cdm_volume_size_bytes"
VOLUME_USED_BYTES = "cdm_volume_used_bytes"
VOLUMES = ("spool", "artifacts", "cache")  # every value the `volume` label may take


def ready_gauge(registry: CollectorRegistry, probe: Callable[[], bool] | None = None) -> Gauge:
    """``cdm_ready``; with ``probe`` its value is read at scrape time (the probe must not block: read a cache)."""
    gauge = Gauge(READY, "1 while the process is ready (its /readyz answers 200), else 0.", registry=registry)
    if probe is not None:
        gauge.set_function(lambda: 1.0 if probe() else 0.0)
    return gauge


def registry_latest_epoch_gauge(registry: CollectorRegistry) -> Gauge:
    """``cdm_registry_latest_epoch``: set by whoever polls the registry (never by the hot-swap watcher itself)."""
    return Gauge(
        REGISTRY_LATEST_EPOCH,
        "The registry's current epoch as last read from Redis; the served epoch trails it while a hot swap runs.",
        registry=registry,
    )


def _existing(path: Path) -> Path | None:
    """``path`` or its nearest existing ancestor (a spool not created yet still has a file system)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return None


def directory_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path`` (0 if it does not exist); files vanishing meanwhile are skipped."""
    total = 0
    stack = [path]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(Path(entry.path))
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:
                        continue  # removed while we walked (a spool purge, a cache eviction)
        except (FileNotFoundError, NotADirectoryError):
            continue
    return total


class VolumeCollector(Collector):
    """Disk use of the directories a process writes, computed at scrape time.

    Args:
        directories: ``volume`` label -> directory; labels must be in ``VOLUMES``.
        used: labels whose own file sizes are summed into ``cdm_volume_used_bytes`` (a directory walk per scrape:
            keep it to directories of bounded size, e.g. the spool and the artifact cache).
    """

    def __init__(self, directories: Mapping[str, Path | str], *, used: tuple[str, ...] = ()) -> None:
        unknown = sorted(set(directories) - set(VOLUMES))
        if unknown:
            raise ValueError(f"unknown volume label(s) {unknown}; use one of {VOLUMES}")
        self.directories = {name: Path(path) for name, path in directories.items()}
        self.used = tuple(used)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        free = GaugeMetricFamily(VOLUME_FREE_BYTES, "Free bytes of the file system of a directory.", labels=["volume"])
        size = GaugeMetricFamily(VOLUME_SIZE_BYTES, "Size of the file system holding a directory.", labels=["volume"])
        used = GaugeMetricFamily(VOLUME_USED_BYTES, "Bytes of the files under a directory.", labels=["volume"])
        for name, path in self.directories.items():
            base = _existing(path.resolve())
            if base is None:
                continue
            try:
                usage = shutil.disk_usage(base)
            except OSError as exc:  # a vanished mount must not fail the whole scrape
                log.warning("disk usage of %s (%s) failed: %s", name, base, exc)
                continue
            free.add_metric([name], float(usage.free))
            size.add_metric([name], float(usage.total))
            if name in self.used:
                used.add_metric([name], float(directory_bytes(path)))
        yield free
        yield size
        yield used
