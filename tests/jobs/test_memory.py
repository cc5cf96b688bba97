"""Peak memory as the run summaries report it: this process image's, not its parent's."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np

from xpcat.jobs.memory import peak_rss_mib


def _child(queue) -> None:
    queue.put(peak_rss_mib())


def test_spawned_child_does_not_report_the_parents_peak():
    big = np.ones(600 * 2**20 // 8)  # 600 MiB touched in the parent before the child starts
    assert peak_rss_mib() > 600
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q,))
    p.start()
    child = q.get(timeout=120)
    p.join()
    assert 0 < child < 400, child
    del big
