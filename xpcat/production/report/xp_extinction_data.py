"""Rebuild the report's packaged XP extinction curve table from the ``XP-Extinction-Toolkit`` distribution.

The report compares the learned extinction curve with the median XP
extinction curve of Zhang R., Yuan H. et al. (2024), shipped by the
``XP-Extinction-Toolkit`` package (PyPI, MIT licence) as
``xp_extinction_toolkit/XP_extinction_curve.csv`` (columns ``wave`` in nm and
``ext`` = k(lambda - 55) = E(lambda - 550) / E(440 - 550)). The package is
not a dependency of xpcat (it pulls pandas and tqdm and ships 0.5 MB for one
curve): :data:`TABLE_FILE` holds the curve at xpcat's 66 wavelengths instead,
with ``data/PROVENANCE.md`` stating where it comes from.

Rebuild it with::

    pip download --no-deps XP-Extinction-Toolkit==1.0 -d /tmp/xpext
    python -m xpcat.production.report.xp_extinction_data /tmp/xpext/XP_Extinction_Toolkit-1.0-py3-none-any.whl

The curve is interpolated linearly in wavelength (as the toolkit's own
``ExtinctionToolkit.ext_curve(wave)``) and converted to A(lambda) / A(550 nm)
= k / R55 + 1 with the toolkit's R55 = 2.730 (``ExtinctionToolkit.XPEC_R55``).
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import zipfile
from pathlib import Path

import numpy as np

from xpcat.catalog_schema.conditioned import (
    NIR_BANDS,
    NIR_WAVELENGTHS_UM,
    XP_WAVELENGTHS_NM,
)
from xpcat.fileio import write_text_atomic

logger = logging.getLogger(__name__)

__all__ = [
    "SOURCE_MEMBER",
    "TABLE_FILE",
    "TOOLKIT_MAX_NM",
    "TOOLKIT_R55",
    "derive_table",
    "main",
    "read_toolkit_curve",
    "table_text",
]

#: The curve's file inside the toolkit's wheel.
SOURCE_MEMBER = "xp_extinction_toolkit/XP_extinction_curve.csv"
#: The packaged table (CSV: band, wavelength_nm, k_lambda_55, a_over_a550).
TABLE_FILE = Path(__file__).resolve().parent / "data" / "xp_extinction_curve.csv"
#: A(550 nm) / E(440 - 550) of the toolkit's curve (``ExtinctionToolkit.XPEC_R55``).
TOOLKIT_R55 = 2.730
#: The toolkit uses its curve below this wavelength (nm; ``ext_curve`` keeps ``wave < 5341.4``).
TOOLKIT_MAX_NM = 5341.4


def read_toolkit_curve(source: Path) -> tuple[np.ndarray, np.ndarray]:
    """The toolkit's curve from its wheel (or the bare ``XP_extinction_curve.csv``).

    Returns
    -------
    wave_nm : (m,) float64
        Wavelengths in nm, increasing, below :data:`TOOLKIT_MAX_NM`.
    k : (m,) float64
        k(lambda - 55) = E(lambda - 550) / E(440 - 550), dimensionless.
    """
    source = Path(source)
    if source.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(source) as z:
            text = z.read(SOURCE_MEMBER).decode()
    else:
        text = source.read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    wave = np.array([float(r["wave"]) for r in rows])
    k = np.array([float(r["ext"]) for r in rows])
    keep = wave < TOOLKIT_MAX_NM
    order = np.argsort(wave[keep])
    return wave[keep][order], k[keep][order]


def derive_table(wave_nm: np.ndarray, k: np.ndarray) -> list[tuple[str, float, float, float]]:
    """The curve at xpcat's 61 XP samples and 5 NIR bands (those inside the toolkit's range).

    Parameters
    ----------
    wave_nm, k : (m,) arrays
        :func:`read_toolkit_curve`'s output.

    Returns
    -------
    list of (band, wavelength_nm, k_lambda_55, a_over_a550)
        ``band`` is ``"XP"`` for the XP samples, else the NIR band's name.
    """
    bands = ["XP"] * len(XP_WAVELENGTHS_NM) + list(NIR_BANDS)
    wl = np.concatenate([np.asarray(XP_WAVELENGTHS_NM), 1000.0 * np.asarray(NIR_WAVELENGTHS_UM)])
    inside = (wl >= wave_nm[0]) & (wl <= wave_nm[-1])
    kk = np.interp(wl[inside], wave_nm, k)
    return [(b, float(w), float(v), float(v / TOOLKIT_R55 + 1.0))
            for b, w, v in zip(np.asarray(bands)[inside], wl[inside], kk)]


def table_text(rows: list[tuple[str, float, float, float]]) -> str:
    """The CSV text of :data:`TABLE_FILE` (17 significant digits)."""
    lines = ["band,wavelength_nm,k_lambda_55,a_over_a550"]
    lines += [f"{b},{w:.4f},{k:.17g},{a:.17g}" for b, w, k, a in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Command line: rebuild :data:`TABLE_FILE` from a toolkit wheel or curve CSV."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path, help="XP_Extinction_Toolkit-*.whl or its XP_extinction_curve.csv")
    ap.add_argument("--out", type=Path, default=TABLE_FILE, help="table to write (default: the packaged one)")
    args = ap.parse_args(argv)
    rows = derive_table(*read_toolkit_curve(args.source))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, table_text(rows))
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
