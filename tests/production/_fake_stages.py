"""Simple per-partition stage functions for testing the run machinery.

They stand in for conditioning and inference: ``fake_condition`` copies a
source_id range of ``raw/gaia_source``; ``fake_infer`` turns it into catalog
rows (Table 2 schema) with values derived from the source_id. Faults are
injected through files ``RUN_DIR/faults/<stage>-<partition>`` holding one word:
``raise`` (an exception), ``kill`` (write half a file, then SIGKILL the worker
process), ``badschema`` (write an output with a wrong column type). A file
``RUN_DIR/faults/sleep`` holding a number of seconds makes every task take
at least that long (to kill jobs mid-run).
"""

from __future__ import annotations

import os
import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from xpcat.catalog_schema import CATALOG
from xpcat.production import partitions as P
from xpcat.production.stages import Stage, condition_stage, infer_stage

FAKE_CONDITIONED = pa.schema(
    [pa.field("source_id", pa.int64(), nullable=False), pa.field("ra", pa.float64(), nullable=False),
     pa.field("dec", pa.float64(), nullable=False)]
)


def _fault(run_dir: Path, stage: str, name: str) -> str:
    f = Path(run_dir) / "faults" / f"{stage}-{name}"
    return f.read_text().strip() if f.exists() else ""


def _inject(run_dir: Path, stage: str, name: str, out: Path, table: pa.Table) -> None:
    sleep = Path(run_dir) / "faults" / "sleep"
    if sleep.exists():
        import time

        time.sleep(float(sleep.read_text()))
    fault = _fault(run_dir, stage, name)
    if fault == "raise":
        raise ValueError(f"injected failure in {stage} {name}")
    if fault == "kill":
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".partial")
        pq.write_table(table, tmp)
        data = tmp.read_bytes()
        tmp.unlink()
        out.write_bytes(data[: len(data) // 2])  # half-written output, no marker
        os.kill(os.getpid(), signal.SIGKILL)


def fake_condition(ctx, part) -> dict:
    run_dir = ctx.run_dir
    raw = pq.read_table(Path(run_dir) / "raw" / "gaia_source", columns=["source_id", "ra", "dec"])
    sid = raw.column("source_id")
    t = raw.filter(pc.and_(pc.greater_equal(sid, part.lo), pc.less(sid, part.hi)))
    t = t.sort_by("source_id").cast(FAKE_CONDITIONED)
    out = Path(run_dir) / "conditioned" / f"{part.name}.parquet"
    _inject(run_dir, "condition", part.name, out, t)
    P.atomic_write_parquet(t, out, schema=FAKE_CONDITIONED, expected_rows=part.rows)
    return {"rows": t.num_rows}


def fake_infer(ctx, part) -> dict:
    run_dir = ctx.run_dir
    src = P.read_table(Path(run_dir) / "conditioned" / f"{part.name}.parquet")
    n = src.num_rows
    sid = src.column("source_id").to_numpy()
    g = np.random.default_rng(sid % 1000)
    est = np.column_stack([4 + (sid % 7) / 7.0, np.zeros(n), np.full(n, 4.4), np.full(n, 0.1), np.ones(n)])
    fsl = lambda a, k: pa.FixedSizeListArray.from_arrays(pa.array(a.astype(np.float32).ravel()), k)  # noqa: E731
    cols = {
        "gdr3_source_id": src.column("source_id"),
        "ra": src.column("ra"),
        "dec": src.column("dec"),
        "stellar_params_est": fsl(est, 5),
        "stellar_params_err": fsl(np.full((n, 5), 0.1), 5),
        "chi2_opt": pa.array(g.random(n).astype(np.float32)),
        "ln_prior": pa.array(np.zeros(n, np.float32)),
        "teff_confidence": pa.array(np.ones(n, np.float32)),
        "feh_confidence": pa.array(np.ones(n, np.float32)),
        "logg_confidence": pa.array(np.ones(n, np.float32)),
        "quality_flags": pa.array((sid % 16).astype(np.uint8)),
        "stellar_params_icov_triu": fsl(np.ones((n, 15)), 15),
        "stellar_params_cov_triu": fsl(np.ones((n, 15)), 15),
        "fit_status": pa.array(np.zeros(n, np.uint8)),
        "condition_flags": pa.array((sid % 3).astype(np.uint16)),
    }
    t = pa.table(cols).cast(CATALOG)
    out = Path(run_dir) / "fitted" / f"{part.name}.parquet"
    _inject(run_dir, "infer", part.name, out, t)
    if _fault(run_dir, "infer", part.name) == "badschema":
        t = t.set_column(t.schema.get_field_index("chi2_opt"), "chi2_opt", pa.array(np.zeros(n, np.float64)))
        P.atomic_write_parquet(t, out, expected_rows=part.rows)  # no schema check: the runner must catch it
        return {"rows": n}
    P.atomic_write_parquet(t, out, schema=CATALOG, expected_rows=part.rows)
    return {"rows": n}


#: The real stages' specs (names, folders, done keys) with the fake functions.
FAKE_STAGES = [
    replace(condition_stage(), func=fake_condition, schema=FAKE_CONDITIONED),
    replace(infer_stage(), func=fake_infer),
]


def fake_context(run_dir: Path, config, stage: Stage = FAKE_STAGES[0]):
    """A :class:`xpcat.production.run.StageContext` for calling the fake stage functions directly."""
    from xpcat.production import run_state as S
    from xpcat.production.run import stage_context
    from xpcat.production.run_dir import RunPaths

    paths = RunPaths.of(run_dir, config)
    return stage_context(stage, paths, config, {}, S.input_fingerprint(paths.root, config), None, None)


def write_raw(run_dir: Path, n: int, level: int, pixels: list[int], seed: int = 1, name: str = "part-000") -> np.ndarray:
    """Write ``raw/gaia_source/<name>.parquet`` with ``n`` stars spread over ``pixels`` at ``level``.

    Returns the source_ids (int64).
    """
    rng = np.random.default_rng(seed)
    shift = P.partition_shift(level)
    pix = rng.choice(np.asarray(pixels), size=n)
    sid = (pix.astype(np.int64) << shift) + rng.integers(0, 1 << shift, size=n, dtype=np.int64)
    sid = np.unique(sid)
    ra = rng.uniform(0, 360, sid.size)
    dec = np.degrees(np.arcsin(rng.uniform(-1, 1, sid.size)))
    d = Path(run_dir) / "raw" / "gaia_source"
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"source_id": sid, "ra": ra, "dec": dec}), d / f"{name}.parquet")
    return sid


def _wavelengths_nm() -> np.ndarray:
    """(66,) nm: the 61 XP samples, then J H Ks W1 W2."""
    from xpcat.catalog_schema.conditioned import NIR_WAVELENGTHS_UM, XP_WAVELENGTHS_NM

    return np.array(XP_WAVELENGTHS_NM + tuple(1000.0 * w for w in NIR_WAVELENGTHS_UM))


def make_artifact(path: Path, seed: int = 0, width: int = 8) -> str:
    """A small untrained model artifact (random network, GMM of random labels); returns its hash.

    Enough for pipeline mechanics (every star gets a row, flagged when its fit
    fails); not for science.
    """
    import jax

    from xpcat.catalog_schema import FLUX_UNIT_W_M2_NM
    from xpcat.model.artifact import save_artifact
    from xpcat.model.forward import init_params, make_scaler
    from xpcat.model.prior import fit_gmm

    rng = np.random.default_rng(seed)
    labels = np.column_stack([rng.uniform(4000, 7000, 200), rng.normal(0, 0.3, 200), rng.uniform(1, 5, 200)])
    params = jax.tree_util.tree_map(np.asarray, init_params(jax.random.PRNGKey(seed), n_hidden=1, width=width))
    return save_artifact(path, params=params, scaler=make_scaler(labels), activation="tanh",
                         gmm=fit_gmm(labels, n_components=2, seed=seed),
                         wavelengths=_wavelengths_nm(), flux_unit=FLUX_UNIT_W_M2_NM)
