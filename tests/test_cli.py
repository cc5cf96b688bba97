"""The command line: --help everywhere, user errors as one line with a non-zero exit."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from xpcat.cli import cli


def _commands(group, prefix=()):
    for name, cmd in group.commands.items():
        yield prefix + (name,)
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, prefix + (name,))


@pytest.mark.parametrize("path", list(_commands(cli)))
def test_help_on_every_command(path):
    res = CliRunner().invoke(cli, list(path) + ["--help"])
    assert res.exit_code == 0, res.output
    assert "Usage:" in res.output


def test_bad_config_is_one_line(tmp_path):
    cfg = tmp_path / "x.toml"
    cfg.write_text("[model]\nhidden_width = -1\n")
    res = CliRunner().invoke(cli, ["condition", str(tmp_path / "run"), "--config", str(cfg)])
    assert res.exit_code == 1
    assert "hidden_width = -1: must be >= 1" in res.output
    assert "Traceback" not in res.output


def test_output_dir_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    res = CliRunner().invoke(cli, ["simulate", str(f), "--stars", "10"])
    assert res.exit_code == 1
    assert "exists and is not a directory" in res.output


def test_unwritable_output_dir(tmp_path):
    # /proc refuses new folders even for root; a read-only folder does for other users.
    target = "/proc/xpcat-not-writable/sub"
    res = CliRunner().invoke(cli, ["simulate", target, "--stars", "10"])
    assert res.exit_code == 1
    assert "cannot create directory /proc/xpcat-not-writable/sub" in res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize("args", [["--stars", "-5"], ["--stars", "0"], ["--seed", "abc"], ["--seed", "1.5"]])
def test_bad_numbers_rejected(tmp_path, args):
    res = CliRunner().invoke(cli, ["simulate", str(tmp_path / "u")] + args)
    assert res.exit_code == 2
    assert "Invalid value" in res.output


def test_debug_shows_traceback(tmp_path):
    cfg = tmp_path / "x.toml"
    cfg.write_text("[model]\nhidden_width = -1\n")
    res = CliRunner().invoke(cli, ["--debug", "condition", str(tmp_path / "run"), "--config", str(cfg)])
    assert res.exit_code != 0
    assert res.exception is not None


def test_logging_setup_leaves_astroquery_logger_alone():
    """astroquery installs its own logger class at import; creating its logger first breaks that import."""
    import subprocess
    import sys

    code = (
        "from xpcat.cli import _setup_logging; _setup_logging(False); "
        "import logging; assert 'astroquery' not in logging.root.manager.loggerDict"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- issue 19: one-line errors, sane numbers, no SPEC
@pytest.mark.parametrize("cluster, named", [
    ('lifetime = "fifty"', "[cluster] lifetime = 'fifty': not a duration"),
    ('profile = "local"\noptions = { queue = "debug" }', "queue = 'debug' is not a keyword argument of LocalCluster"),
])
def test_bad_cluster_settings_are_one_line_when_the_config_is_read(tmp_path, cluster, named):
    cfg = tmp_path / "run" / "config.toml"
    cfg.parent.mkdir()
    cfg.write_text(f"[cluster]\n{cluster}\n")
    res = CliRunner().invoke(cli, ["run", str(cfg)])
    assert res.exit_code == 1
    assert named in res.output and len(res.output.strip().splitlines()) == 1
    assert "Traceback" not in res.output and "Nanny" not in res.output


@pytest.mark.parametrize("stars", ["1", str(10**20)])
def test_plan_rejects_nonsense_star_counts(tmp_path, stars):
    res = CliRunner().invoke(cli, ["plan", "--stars", stars])
    assert res.exit_code in (1, 2)
    assert ("fewer than the 12,288 partitions" in res.output) if stars == "1" else ("Invalid value" in res.output)


def test_plan_numbers_refuse_out_of_range_counts():
    from xpcat.errors import InputError
    from xpcat.production.capacity import check_plan_stars

    check_plan_stars(219_197_643, 5)
    with pytest.raises(InputError, match="more than any Gaia release"):
        check_plan_stars(10**20, 5)
    with pytest.raises(InputError, match="--stars 1 is fewer than the 12,288 partitions of HEALPix level 5"):
        check_plan_stars(1, 5)


@pytest.mark.parametrize("path", list(_commands(cli)))
def test_no_help_text_cites_spec(path):
    res = CliRunner().invoke(cli, list(path) + ["--help"])
    assert "SPEC" not in res.output


def test_demo_too_small_refused_at_once(tmp_path):
    work = tmp_path / "w"
    res = CliRunner().invoke(cli, ["demo", "--workdir", str(work), "--stars", "3000"])
    assert res.exit_code == 1
    assert "the smallest demo is --stars 4100" in res.output and "Traceback" not in res.output
    assert not work.exists()
