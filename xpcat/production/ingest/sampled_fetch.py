"""DataLink ``XP_SAMPLED`` for ``xpcat fetch`` with ``[fetch] xp = "sampled"``.

:func:`load_xp_sampled` asks the archive's DataLink service for the sampled
XP spectra (343 samples, 336-1020 nm every 2 nm, W m^-2 nm^-1) of at most 5000
sources, as CSV (:mod:`xpcat.production.ingest.sampled_format`), and turns the
answer into raw ``xp_sampled_spectrum`` rows through the same code as
``xpcat ingest`` of a DataLink file
(:func:`xpcat.production.ingest.sampled.datalink_input`): xpcat's 61 samples,
``input_form = "datalink_xp_sampled"``.

A wrong answer (a source on another grid or of another length, a source
twice, no ``XP_SAMPLED`` file, a missing column) fails the range permanently
with the reason: the archive's product is not what xpcat reads, and asking
again cannot change it. NaN fluxes or non-positive errors are kept (those
samples get zero weight when conditioned, the star ``BAD_XP_INPUT``) and logged.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from xpcat.catalog_schema.raw import XP_SAMPLED, XP_SAMPLED_TABLE
from xpcat.production.ingest.client import FetchOptions, PermanentFailure
from xpcat.production.ingest.sampled import datalink_input
from xpcat.production.ingest.sampled_format import long_form_records

__all__ = ["RETRIEVAL_TYPE", "load_xp_sampled"]

logger = logging.getLogger(__name__)

#: The DataLink product asked for.
RETRIEVAL_TYPE = "XP_SAMPLED"
_REQUIRED = ("source_id", "wavelength", "flux", "flux_error")


def _columns(tab: Any, key: str) -> dict[str, np.ndarray]:
    """The long-form columns of one astropy table of the answer (masked values -> NaN)."""
    missing = [c for c in _REQUIRED if c not in tab.colnames]
    if missing:
        raise PermanentFailure(f"DataLink {RETRIEVAL_TYPE} file {key} has no column(s) {', '.join(missing)}; "
                               f"got {', '.join(tab.colnames[:10])}")
    sid = np.ma.asarray(tab["source_id"])
    if np.ma.count_masked(sid) or sid.dtype.kind not in "iu":
        raise PermanentFailure(f"DataLink {RETRIEVAL_TYPE} file {key}: source_id column holds missing or "
                               f"non-integer values (dtype {sid.dtype})")
    cols = {"source_id": np.asarray(sid, dtype=np.int64)}
    for c in ("solution_id", "ra", "dec", "wavelength", "flux", "flux_error"):
        if c in tab.colnames:
            col = np.ma.asarray(tab[c])
            cols[c] = np.asarray(col) if c == "solution_id" else np.ma.filled(col.astype(np.float64), np.nan)
    return cols


def load_xp_sampled(client: Any, source_ids: np.ndarray, options: FetchOptions,
                    workdir: Path) -> tuple[pa.Table, list[dict]]:
    """One DataLink ``XP_SAMPLED`` request, parsed into raw ``xp_sampled_spectrum`` rows.

    Parameters
    ----------
    client : astroquery GaiaClass
    source_ids : (n,) int64, n <= 5000
    options : FetchOptions
        ``data_structure`` (RAW: one file for all sources; INDIVIDUAL: one per source).
    workdir : Path
        Writable folder astroquery unpacks the zip in.

    Returns
    -------
    (rows, bad) : (pyarrow.Table in XP_SAMPLED, list)
        ``bad`` is empty: a row that cannot be read fails the whole answer.

    Raises
    ------
    PermanentFailure
        The answer holds no XP_SAMPLED file, a column is missing, or a source is
        on another grid than 343 samples 336-1020 nm every 2 nm or comes twice
        (the message counts them and names the first).
    """
    with contextlib.chdir(workdir):  # astroquery's load_data unpacks into a temp folder under the cwd
        files = client.load_data(ids=[int(s) for s in source_ids], data_release="Gaia DR3",
                                 retrieval_type=RETRIEVAL_TYPE, data_structure=options.data_structure, format="csv")
    files = files or {}
    if files and not any(k.startswith(RETRIEVAL_TYPE) for k in files):
        raise PermanentFailure(f"DataLink answer holds no {RETRIEVAL_TYPE} file; got {', '.join(sorted(files)[:5])}")
    records: list[dict] = []
    for key in sorted(k for k in files if k.startswith(RETRIEVAL_TYPE)):
        value = files[key]
        for tab in value if isinstance(value, list) else [value]:
            records.extend(long_form_records(_columns(tab, key)))
    if not records:
        return XP_SAMPLED.empty_table(), []
    got = datalink_input(records)
    refused = [f for f in got.flagged if not f["kept"]]
    if refused:
        first = refused[0]
        raise PermanentFailure(f"DataLink {RETRIEVAL_TYPE} answer: {len(refused)} of {len(records)} source(s) "
                               f"refused, e.g. source_id {first['source_id']}: {first['reason']}")
    kept = [f for f in got.flagged if f["kept"]]
    if kept:
        logger.warning("DataLink %s: %d source(s) with NaN fluxes or non-positive errors kept (zero weight, "
                       "BAD_XP_INPUT), e.g. source_id %s: %s", RETRIEVAL_TYPE, len(kept), kept[0]["source_id"],
                       kept[0]["reason"])
    return got.tables[XP_SAMPLED_TABLE], []
