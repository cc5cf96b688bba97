"""Puts ``tests/production`` on ``sys.path`` (pytest's prepend mode) so the stage tests in its sub-folders can import its shared helpers (``_archive_universe``, ``_fake_stages``, ``_slow_tasks``)."""

import pytest


@pytest.fixture(scope="module")
def dask_client():
    """A Dask client on an in-process cluster (the ``threads`` profile's kind): for code that takes a client."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        yield client
