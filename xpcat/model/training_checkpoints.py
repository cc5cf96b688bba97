"""Training checkpoints: one ``phase<k>.npz`` of arrays and a JSON marker per completed phase.

The marker (written last, atomically) holds the phase, the fingerprint of the
data and schedule, the checksum of the npz and the loss history, so that
:func:`load_checkpoint` resumes only from a complete phase of the same run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from xpcat.fileio import atomic_path, file_sha256, write_text_atomic

__all__ = ["flatten_params", "unflatten_params", "save_checkpoint", "load_checkpoint"]

logger = logging.getLogger(__name__)


def flatten_params(params: dict) -> dict[str, np.ndarray]:
    """The model pytree as flat named arrays (``layers/<i>/W``, ``layers/<i>/b``, ``ln_R``)."""
    out = {f"layers/{i}/{k}": np.asarray(v) for i, layer in enumerate(params["layers"]) for k, v in layer.items()}
    out["ln_R"] = np.asarray(params["ln_R"])
    return out


def unflatten_params(arrays: dict[str, np.ndarray], dtype: Any) -> dict:
    """Inverse of :func:`flatten_params`, as device arrays of ``dtype``."""
    n = len({k.split("/")[1] for k in arrays if k.startswith("layers/")})
    return {"layers": [{"W": jnp.asarray(arrays[f"layers/{i}/W"], dtype), "b": jnp.asarray(arrays[f"layers/{i}/b"], dtype)}
                       for i in range(n)], "ln_R": jnp.asarray(arrays["ln_R"], dtype)}


def save_checkpoint(directory: Path, phase: int, fingerprint: str, params, scaler, stars, clean, history) -> None:
    """Write the state after ``phase``: model, scaler, stars, self-cleaning masks ``clean``, then the marker."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = flatten_params(params)
    arrays.update({"scaler/mean": np.asarray(scaler["mean"]), "scaler/scale": np.asarray(scaler["scale"]),
                   "stars/theta": np.asarray(stars["theta"]), "stars/ln_plx": np.asarray(stars["ln_plx"]),
                   "stars/ln_e": np.asarray(stars["ln_e"]), "removed_param": clean[0], "removed_flux": clean[1]})
    npz = directory / f"phase{phase}.npz"
    with atomic_path(npz) as tmp, tmp.open("wb") as fh:
        np.savez(fh, **arrays)
    marker = {"phase": phase, "fingerprint": fingerprint, "sha256": file_sha256(npz), "history": history}
    write_text_atomic(directory / f"phase{phase}.json", json.dumps(marker, allow_nan=True))
    logger.info("checkpoint after phase %d written to %s", phase, npz)


def load_checkpoint(directory: Path, fingerprint: str, phases: tuple[int, ...]) -> tuple[int, dict | None]:
    """The last of ``phases`` with a valid checkpoint matching ``fingerprint``: (phase, arrays + history), or (0, None)."""
    for phase in sorted(phases, reverse=True):
        mj, npz = directory / f"phase{phase}.json", directory / f"phase{phase}.npz"
        if not (mj.is_file() and npz.is_file()):
            continue
        try:
            marker = json.loads(mj.read_text())
        except json.JSONDecodeError:
            logger.warning("checkpoint marker %s is corrupt; ignoring it", mj)
            continue
        if marker.get("fingerprint") != fingerprint:
            logger.warning("checkpoint %s was made with other data or schedule; not resuming from it", mj)
            continue
        if file_sha256(npz) != marker.get("sha256"):
            logger.warning("checkpoint %s does not match its checksum; ignoring it", npz)
            continue
        with np.load(npz, allow_pickle=False) as z:
            arrays = {k: np.asarray(z[k]) for k in z.files}
        arrays["history"] = marker["history"]
        return phase, arrays
    return 0, None
