"""Cluster profiles: shipped YAML files, keyword arguments, job scripts, bad options."""

from __future__ import annotations

import pytest

from xpcat.config import ClusterConfig, ConfigError, config_from_dict
from xpcat.jobs.clusters import (
    ClusterProfileError,
    accepted_options,
    available_profiles,
    cluster_kwargs,
    load_profile,
    open_cluster,
)


def test_shipped_profiles_parse():
    assert {"local", "slurm", "pbs", "slurm-gpu", "pbs-gpu"} <= set(available_profiles())
    for name in available_profiles():
        p = load_profile(name)
        assert p.kind in ("local", "slurm", "pbs")
        assert p.gpu == name.endswith("-gpu")


def test_unknown_profile_lists_the_shipped_ones(tmp_path):
    with pytest.raises(ClusterProfileError, match="unknown cluster profile 'lsf'.*slurm-gpu"):
        load_profile("lsf")
    bad = tmp_path / "x.yaml"
    bad.write_text("kind: lsf\n")
    with pytest.raises(ClusterProfileError, match="kind = 'lsf'"):
        load_profile(bad)
    bad.write_text("kind: slurm\nqueue: x\n")
    with pytest.raises(ClusterProfileError, match="unknown key.*queue"):
        load_profile(bad)


def test_slurm_gpu_job_script_has_gres_resources_prologue_and_lifetime(tmp_path):
    from dask_jobqueue import SLURMCluster

    cfg = ClusterConfig(profile="slurm-gpu", threads_per_worker=2, memory_limit="6GiB", lifetime="20m",
                        lifetime_stagger="2m", options={"queue": "gpu", "scheduler_options": {"host": "127.0.0.1"}})
    kw = cluster_kwargs(load_profile("slurm-gpu"), cfg, log_dir=tmp_path)
    assert kw["processes"] == 1 and kw["cores"] == 2 and kw["queue"] == "gpu"
    with SLURMCluster(**kw) as cluster:
        script = cluster.job_script()
    assert "#SBATCH --gres=gpu:1" in script and "#SBATCH -p gpu" in script
    assert "export XLA_PYTHON_CLIENT_PREALLOCATE=false" in script
    assert "--resources GPU=1" in script and "--lifetime 20m --lifetime-stagger 2m" in script
    assert "--nthreads 2" in script and "--mem=" in script


def test_worker_extra_args_in_options_add_to_the_profiles_and_the_lifetime():
    """A run's own worker arguments must not drop the lifetime, the profile's resources or the preload."""
    cfg = ClusterConfig(profile="slurm-gpu", lifetime="20m", lifetime_stagger="2m",
                        options={"worker_extra_args": ["--preload", "mymodule"], "queue": "gpu"})
    extra = cluster_kwargs(load_profile("slurm-gpu"), cfg)["worker_extra_args"]
    assert "--resources" in extra and extra[extra.index("--resources") + 1] == "GPU=1"
    assert extra[extra.index("--lifetime") + 1] == "20m" and extra[extra.index("--lifetime-stagger") + 1] == "2m"
    assert extra[extra.index("--preload") + 1] == "mymodule"  # the run's preload replaces the default one
    plain = cluster_kwargs(load_profile("slurm"), ClusterConfig(profile="slurm", lifetime="5m"))["worker_extra_args"]
    assert plain[-2:] == ["--preload", "xpcat.jobs.preload"] and "--lifetime" in plain


def test_pbs_gpu_resource_spec_filled_in():
    from dask_jobqueue import PBSCluster

    kw = cluster_kwargs(load_profile("pbs-gpu"), ClusterConfig(profile="pbs-gpu", memory_limit="4GiB"))
    assert kw["resource_spec"] == "select=1:ncpus=1:ngpus=1:mem=4096MB"
    with PBSCluster(**kw) as cluster:
        script = cluster.job_script()
    assert "#PBS -l select=1:ncpus=1:ngpus=1:mem=4096MB" in script and "--resources GPU=1" in script


def test_option_the_cluster_class_cannot_take_is_refused_when_the_config_is_read():
    """Issue 19.9: such options reached LocalCluster and ended in "Nanny failed to start" tracebacks."""
    named = r"\[cluster\] options: qeueu = 'debug' is not a keyword argument of SLURMCluster"
    with pytest.raises(ConfigError, match=named):
        ClusterConfig(profile="slurm", options={"qeueu": "debug"})
    with pytest.raises(ConfigError, match="queue = 'debug' is not a keyword argument of LocalCluster.*slurm or pbs"):
        config_from_dict({"cluster": {"profile": "local", "options": {"queue": "debug"}}})
    # what the classes take passes: job-queue keywords, and LocalCluster's own and its workers'
    ClusterConfig(profile="slurm", options={"queue": "debug", "account": "a", "job_extra_directives": ["-C gpu"]})
    ClusterConfig(profile="local", options={"processes": False, "silence_logs": 40, "nthreads": 1})
    assert {"queue", "account", "walltime", "cores", "memory"} <= accepted_options("slurm")
    assert {"n_workers", "lifetime", "resources", "memory_limit"} <= accepted_options("local")


def test_profile_keyword_the_cluster_class_cannot_take_is_named_before_starting(tmp_path):
    prof = tmp_path / "mine.yaml"
    prof.write_text("kind: local\ncluster:\n  queue: debug\n")
    with pytest.raises(ClusterProfileError, match=f"queue = 'debug' in profile {prof} is not a keyword argument"):
        with open_cluster(ClusterConfig(profile=str(prof), n_workers=1, memory_limit="1GiB")):
            pass


@pytest.mark.parametrize("values, match", [
    ({"lifetime": "fifty"}, "lifetime = 'fifty': not a duration"),
    ({"lifetime": "30m", "lifetime_stagger": "soon"}, "lifetime_stagger = 'soon': not a duration"),
    ({"lifetime_stagger": "5m"}, "lifetime_stagger = '5m' needs a lifetime"),
    ({"memory_limit": "lots"}, "memory_limit = 'lots': not a size"),
    ({"memory_limit": "0GiB"}, "memory_limit = '0GiB': must be a positive size"),
])
def test_bad_durations_and_sizes_are_one_config_error(values, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"cluster": values})


def test_closing_a_cluster_leaves_distributed_quiet_and_restores_its_level():
    import logging

    log = logging.getLogger("distributed")
    before = log.level
    with open_cluster(ClusterConfig(profile="threads", n_workers=1, memory_limit="1GiB")) as (_, client, _p):
        assert client.submit(sum, [1, 2]).result() == 3
    assert log.level == before


def test_local_profile_cluster_and_more_processes_refused():
    cfg = ClusterConfig(profile="local", n_workers=1, memory_limit="1GiB", options={"processes": False})
    with open_cluster(cfg) as (cluster, client, profile):
        assert profile.kind == "local"
        assert client.submit(sum, [1, 2]).result() == 3
    with pytest.raises(ClusterProfileError, match="one worker process per job"):
        cluster_kwargs(load_profile("slurm"), ClusterConfig(profile="slurm", options={"processes": 4}))
    with pytest.raises(ConfigError, match="memory_limit = 'lots'"):
        ClusterConfig(profile="slurm", memory_limit="lots")


def test_threads_profile_has_no_per_worker_memory_limit():
    """In-process workers see the whole process's memory: a limit would pause them and hang the run."""
    from xpcat.config import ClusterConfig
    from xpcat.jobs.clusters import cluster_kwargs, load_profile

    kw = cluster_kwargs(load_profile("threads"), ClusterConfig(profile="threads", memory_limit="1GiB"))
    assert kw["processes"] is False and kw["memory_limit"] == 0
    assert cluster_kwargs(load_profile("local"), ClusterConfig(memory_limit="1GiB"))["memory_limit"] == 1 << 30
