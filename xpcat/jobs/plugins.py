"""A ``distributed.WorkerPlugin`` that loads the model artifact once per worker.

The client loads the artifact once to learn its content hash and registers
:class:`ModelPlugin` with that hash. Every worker, including workers that
``adapt`` starts later, runs :meth:`ModelPlugin.setup`: it loads the artifact
and refuses it (``InputError``) when its content hash differs from the
client's, so all partitions of a run are fitted with the same model. Tasks get
the loaded artifact with :func:`worker_model`.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any

from distributed import WorkerPlugin

from xpcat.errors import InputError

logger = logging.getLogger(__name__)

__all__ = ["PLUGIN_NAME", "DEFAULT_LOADER", "ModelPlugin", "load_model", "worker_model"]

#: Name under which the plugin is registered on every worker.
PLUGIN_NAME = "xpcat-model"
#: ``module:function`` that loads an artifact directory; the result has ``.content_hash``.
DEFAULT_LOADER = "xpcat.model.artifact:load_artifact"

_local_cache: dict[tuple[str, str], Any] = {}


def _resolve(loader: str):
    module, _, name = loader.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise InputError(f"model loader {loader!r} cannot be imported: {err}") from err


def load_model(model_dir: str | os.PathLike, expected_hash: str | None = None, loader: str = DEFAULT_LOADER) -> Any:
    """Load an artifact and check its content hash.

    Parameters
    ----------
    model_dir : path-like
        The artifact directory.
    expected_hash : str, optional
        The content hash the artifact must have.
    loader : str
        ``module:function`` loading the artifact.

    Raises
    ------
    InputError
        When the artifact is missing, unreadable, or its hash differs.
    """
    path = Path(model_dir)
    if not path.exists():
        raise InputError(f"model artifact {path} not found; train one with `xpcat train RUN_DIR` first")
    artifact = _resolve(loader)(path)
    got = getattr(artifact, "content_hash", None)
    if expected_hash is not None and got != expected_hash:
        raise InputError(
            f"model artifact {path} has content hash {got!r}, but the run uses {expected_hash!r}; "
            "the artifact changed after the run started"
        )
    return artifact


class ModelPlugin(WorkerPlugin):
    """Load the model artifact once when a worker starts (checked by hash).

    Parameters
    ----------
    model_dir : path-like
        Artifact directory, visible from the workers.
    expected_hash : str
        Content hash computed by the client.
    loader : str
        ``module:function`` loading the artifact.
    """

    idempotent = False
    name = PLUGIN_NAME

    def __init__(self, model_dir: str | os.PathLike, expected_hash: str, loader: str = DEFAULT_LOADER) -> None:
        self.model_dir = str(model_dir)
        self.expected_hash = expected_hash
        self.loader = loader
        self.artifact: Any = None

    def setup(self, worker) -> None:  # noqa: D401 - distributed API
        """Load the artifact on ``worker`` and check its hash."""
        self.artifact = load_model(self.model_dir, self.expected_hash, self.loader)
        logger.info("worker %s loaded model %s (hash %s)", getattr(worker, "address", "?"), self.model_dir, self.expected_hash)

    def teardown(self, worker) -> None:  # noqa: D401 - distributed API
        """Drop the artifact."""
        self.artifact = None


def worker_model(model_dir: str | os.PathLike, expected_hash: str, loader: str = DEFAULT_LOADER) -> Any:
    """The artifact loaded by this worker's :class:`ModelPlugin`.

    Outside a worker, or on a worker without the plugin, the artifact is
    loaded once per process and cached (same hash check).

    Returns
    -------
    The loaded artifact.
    """
    try:
        from distributed import get_worker

        worker = get_worker()
    except ValueError:
        worker = None
    if worker is not None:
        plugin = worker.plugins.get(PLUGIN_NAME)
        if isinstance(plugin, ModelPlugin) and plugin.expected_hash == expected_hash and plugin.artifact is not None:
            return plugin.artifact
    key = (str(Path(model_dir).resolve()), expected_hash)
    if key not in _local_cache:
        _local_cache[key] = load_model(model_dir, expected_hash, loader)
    return _local_cache[key]
