"""The run's files the report reads: the catalog rows and the reference values, as numpy arrays.

- :func:`load_catalog`: ``fitted/*.parquet``, else the HATS catalog in ``catalog/``;
- :func:`load_reference`: the truth table (synthetic universes), else the
  labels, the reddening table and the Gaia parallaxes;
- :func:`load_g_mag`: the Gaia G magnitudes (``raw/gaia_source``) of the catalog stars;
- :class:`ReportData`: both, aligned on source_id, in report units (Teff in K).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xpcat.catalog_schema import CATALOG, PARAM_NAMES, read_metadata
from xpcat.catalog_schema.catalog import TEFF_K_PER_UNIT
from xpcat.catalog_schema.flags import BASIC_CUT_MAX
from xpcat.config import read_run_config
from xpcat.errors import InputError, StageError
from xpcat.production.run_dir import RunPaths

logger = logging.getLogger(__name__)

__all__ = [
    "CATALOG_COLUMNS",
    "REPORTED_METADATA",
    "REPORT_SCALE",
    "ReportData",
    "load_catalog",
    "load_g_mag",
    "load_reference",
]

#: Factor from catalog units to report units per parameter: Teff is reported in K (the catalog stores kK).
REPORT_SCALE = {"teff": TEFF_K_PER_UNIT, "feh": 1.0, "logg": 1.0, "extinction": 1.0, "parallax": 1.0}
#: Catalog columns the report reads.
CATALOG_COLUMNS = ["gdr3_source_id", "ra", "dec", "stellar_params_est", "stellar_params_err", "chi2_opt",
                   "ln_prior", "teff_confidence", "feh_confidence", "logg_confidence", "quality_flags",
                   "fit_status"]
#: The catalog metadata keys saying how its numbers were made (which errors, which confidences) the report states.
REPORTED_METADATA = ("uncertainty", "confidence_source", "confidence_per_parameter", "confidence_fallback",
                     "confidence_rule")


def _catalog_files(run_dir: Path) -> tuple[list[Path], str]:
    """The catalog's Parquet files and where they come from (``"fitted"`` or ``"catalog"``)."""
    paths = RunPaths.of(run_dir)
    fitted = sorted(paths.fitted.glob("*.parquet"))
    if fitted:
        return fitted, "fitted"
    cat = paths.catalog
    files = sorted(p for p in cat.glob("**/*.parquet") if not p.name.startswith("_") and "Norder=" in str(p))
    if not files:
        files = sorted(p for p in (cat / "dataset").glob("**/*.parquet") if not p.name.startswith("_"))
    return files, "catalog"


def load_catalog(run_dir: Path) -> tuple[pa.Table, dict[str, Any]]:
    """The run's catalog rows (``fitted/*.parquet``, else the HATS catalog in ``catalog/``).

    Parameters
    ----------
    run_dir : Path
        The run directory.

    Returns
    -------
    table : pyarrow.Table
        The :data:`CATALOG_COLUMNS` (n rows), sorted by ``gdr3_source_id``.
    info : dict
        ``{"source": "fitted" | "catalog", "files": int, "model_hashes": sorted list of str,
        "metadata": dict}``: ``metadata`` holds the :data:`REPORTED_METADATA` keys of the
        first file that has any ({} for a catalog written before they existed).

    Raises
    ------
    StageError
        When the run directory holds no catalog (names the stage to run).
    InputError
        When a catalog file cannot be read or lacks a column.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise StageError(f"run directory {run_dir} does not exist")
    files, source = _catalog_files(run_dir)
    if not files:
        raise StageError(
            f"no catalog in {run_dir}: neither fitted/*.parquet nor a catalog/ exists; "
            f"run the inference stage first (`xpcat infer {run_dir}` or `xpcat run {run_dir}`)"
        )
    tables, hashes, reported = [], set(), {}
    for f in files:
        try:
            pf = pq.ParquetFile(f)
            meta = read_metadata(pf.schema_arrow)
            t = pf.read(columns=CATALOG_COLUMNS)
        except (pa.ArrowInvalid, OSError) as err:
            raise InputError(f"catalog file {f} cannot be read ({err})") from err
        except KeyError as err:
            raise InputError(f"catalog file {f} lacks column {err}") from err
        if meta.get("model_hash"):
            hashes.add(str(meta["model_hash"]))
        if not reported:
            reported = {k: meta[k] for k in REPORTED_METADATA if k in meta}
        tables.append(t.select(CATALOG_COLUMNS).cast(pa.schema([CATALOG.field(c) for c in CATALOG_COLUMNS])))
    table = pa.concat_tables(tables).sort_by("gdr3_source_id")
    logger.debug("report: %d catalog rows from %d %s files", table.num_rows, len(files), source)
    return table, {"source": source, "files": len(files), "model_hashes": sorted(hashes), "metadata": reported}


def _read_dir(path: Path, columns: list[str]) -> pa.Table | None:
    """``columns`` of a Parquet file or of every ``*.parquet`` in a folder (None when there is none)."""
    files = sorted(path.glob("*.parquet")) if path.is_dir() else ([path] if path.is_file() else [])
    if not files:
        return None
    tables = []
    for f in files:
        try:
            tables.append(pq.read_table(f, columns=columns))
        except (pa.ArrowInvalid, OSError) as err:
            raise InputError(f"{f} cannot be read ({err})") from err
        except KeyError as err:
            raise InputError(f"{f} lacks column {err}") from err
    return pa.concat_tables(tables, promote_options="permissive")


def _align(sid: np.ndarray, table: pa.Table | None, key: str, cols: dict[str, str]) -> dict[str, np.ndarray]:
    """Columns of ``table`` aligned to ``sid`` (n,): ``{name: (n,) float64}``, NaN where the star is absent."""
    out = {name: np.full(sid.shape, np.nan) for name in cols}
    if table is None or table.num_rows == 0:
        return out
    tsid = table.column(key).to_numpy()
    order = np.argsort(tsid, kind="stable")
    tsid = tsid[order]
    pos = np.clip(np.searchsorted(tsid, sid), 0, max(tsid.size - 1, 0))
    hit = tsid[pos] == sid
    for name, col in cols.items():
        v = np.asarray(table.column(col).to_numpy(zero_copy_only=False), dtype=np.float64)[order]
        out[name][hit] = v[pos[hit]]
    return out


def load_reference(run_dir: Path, sid: np.ndarray) -> tuple[dict[str, np.ndarray], str]:
    """Reference values and errors for the catalog stars, in catalog units except Teff in K.

    The truth table when the run has one (errors 0), else the labels (Teff,
    [Fe/H], logg), the reddening table (E) and the Gaia parallaxes.

    Parameters
    ----------
    run_dir : Path
        The run directory (its ``config.toml`` names the raw inputs when there is no truth).
    sid : (n,) int64 array
        The catalog's source_ids.

    Returns
    -------
    ref : dict
        ``<param>`` and ``<param>_error`` (n,) float64 for the 5 parameters
        (NaN where unknown), plus ``r_v`` (truth only).
    kind : str
        ``"truth"`` or ``"labels"``.
    """
    run_dir = Path(run_dir)
    truth_path = RunPaths.of(run_dir).truth / "truth.parquet"
    if truth_path.is_file():
        t = _read_dir(truth_path, ["source_id", "teff", "feh", "logg", "e", "parallax", "r_v"])
        ref = _align(sid, t, "source_id", {"teff": "teff", "feh": "feh", "logg": "logg", "extinction": "e",
                                           "parallax": "parallax", "r_v": "r_v"})
        for p in PARAM_NAMES:
            ref[f"{p}_error"] = np.where(np.isfinite(ref[p]), 0.0, np.nan)
        return ref, "truth"
    cfg = read_run_config(run_dir)
    paths = RunPaths.of(run_dir, cfg)
    raw = paths.raw
    lab_path = paths.user_file(cfg.data.labels) or paths.raw_table("labels")
    red_path = paths.user_file(cfg.data.reddening) or paths.raw_table("reddening")
    ref = _align(sid, _read_dir(lab_path, ["source_id", "teff", "teff_error", "feh", "feh_error", "logg",
                                           "logg_error"]), "source_id",
                 {"teff": "teff", "teff_error": "teff_error", "feh": "feh", "feh_error": "feh_error",
                  "logg": "logg", "logg_error": "logg_error"})
    ref.update(_align(sid, _read_dir(red_path, ["source_id", "e", "e_error"]), "source_id",
                      {"extinction": "e", "extinction_error": "e_error"}))
    ref.update(_align(sid, _read_dir(raw / "gaia_source", ["source_id", "parallax", "parallax_error"]), "source_id",
                      {"parallax": "parallax", "parallax_error": "parallax_error"}))
    return ref, "labels"


def load_g_mag(run_dir: Path, sid: np.ndarray) -> np.ndarray:
    """Gaia G (``phot_g_mean_mag``, mag) of the catalog stars from ``raw/gaia_source`` (the catalog has no G).

    Parameters
    ----------
    run_dir : Path
        The run directory (its ``config.toml`` names the raw folder; the default ``raw/`` without one).
    sid : (n,) int64 array
        The catalog's source_ids.

    Returns
    -------
    (n,) float64 array, mag; NaN where the star is not in ``gaia_source``, or everywhere when the
    run has no ``gaia_source`` or it lacks ``phot_g_mean_mag`` (the G bins are then left out, with a warning).
    """
    paths = RunPaths.of(run_dir, read_run_config(Path(run_dir)))
    try:
        table = _read_dir(paths.raw_table("gaia_source"), ["source_id", "phot_g_mean_mag"])
    except InputError as err:
        logger.warning("report: no G for the error calibration's G bins (%s)", err)
        table = None
    if table is None:
        logger.info("report: no raw/gaia_source in %s: no G for the error calibration's G bins", run_dir)
    return _align(sid, table, "source_id", {"g": "phot_g_mean_mag"})["g"]


@dataclass
class ReportData:
    """Everything the report computes from, as numpy arrays of the n catalog rows.

    Attributes
    ----------
    source_id : (n,) int64
    ra, dec : (n,) float64, deg
    est, err : (n, 5) float64
        Estimates and errors in report units (Teff K, [Fe/H] dex, logg dex, E mag, parallax mas).
    chi2, ln_prior : (n,) float64
    confidence : (n, 3) float64
        Teff, [Fe/H], logg confidences.
    quality_flags, fit_status : (n,) uint8
    ref : dict of (n,) float64
        :func:`load_reference`'s values and errors.
    ref_kind : str
        ``"truth"`` or ``"labels"``.
    """

    source_id: np.ndarray
    ra: np.ndarray
    dec: np.ndarray
    est: np.ndarray
    err: np.ndarray
    chi2: np.ndarray
    ln_prior: np.ndarray
    confidence: np.ndarray
    quality_flags: np.ndarray
    fit_status: np.ndarray
    ref: dict[str, np.ndarray]
    ref_kind: str

    @classmethod
    def from_table(cls, table: pa.Table, ref: dict[str, np.ndarray], ref_kind: str) -> ReportData:
        """Numpy views of a :func:`load_catalog` table (Teff converted to K)."""
        n = table.num_rows
        scale = np.array([REPORT_SCALE[p] for p in PARAM_NAMES])

        def lst(name: str) -> np.ndarray:
            col = table.column(name).combine_chunks()
            vals = np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float64).reshape(n, 5)
            valid = ~np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
            return np.where(valid[:, None], vals, np.nan)

        def num(name: str) -> np.ndarray:
            return np.asarray(table.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)

        return cls(
            source_id=table.column("gdr3_source_id").to_numpy(),
            ra=num("ra"), dec=num("dec"), est=lst("stellar_params_est") * scale, err=lst("stellar_params_err") * scale,
            chi2=num("chi2_opt"), ln_prior=num("ln_prior"),
            confidence=np.column_stack([num("teff_confidence"), num("feh_confidence"), num("logg_confidence")]),
            quality_flags=table.column("quality_flags").to_numpy().astype(np.uint8),
            fit_status=table.column("fit_status").to_numpy().astype(np.uint8),
            ref=ref, ref_kind=ref_kind,
        )

    @property
    def basic(self) -> np.ndarray:
        """(n,) bool: passes the basic cut (quality_flags < 8)."""
        return self.quality_flags < BASIC_CUT_MAX

    def residuals(self, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Residual, pull and use of parameter ``j`` (index into ``PARAM_NAMES``) for every row.

        Returns
        -------
        res : (n,) float64
            estimate - reference, report units.
        pull : (n,) float64
            res / sqrt(err_est^2 + err_ref^2).
        used : (n,) bool
            Rows entering the statistics: basic cut, converged fit, finite residual and pull.
        """
        p = PARAM_NAMES[j]
        res = self.est[:, j] - self.ref[p]
        with np.errstate(invalid="ignore", divide="ignore"):
            pull = res / np.sqrt(self.err[:, j] ** 2 + self.ref[f"{p}_error"] ** 2)
        used = self.basic & (self.fit_status == 0) & np.isfinite(res) & np.isfinite(pull)
        return res, pull, used
