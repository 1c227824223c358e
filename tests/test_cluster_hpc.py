"""SLURM/PBS layout without a batch system (tests/test_slurm.py runs real jobs): how a job's cores, memory and
GPUs become dask-jobqueue job scripts (one worker per GPU with resource GPU=1, CPU jobs one worker per core),
the GPU each worker of a multi-GPU job keeps, bad options refused before anything is submitted, and the
``[cluster]`` table of the server's config file."""

from __future__ import annotations

import pytest

pytest.importorskip("dask_jobqueue")

from matcalc import cluster
from matcalc.cluster.hpc import plan_job
from matcalc.cluster.worker import gpu_for_worker


def test_job_layout_as_on_one_machine():
    gpu = plan_job(16, "64GB", 4)
    assert (gpu.workers, gpu.concurrency.slots, gpu.concurrency.torch_threads) == (4, 4, 4)
    assert gpu.gpu_share == 0.25  # 4 tasks share one GPU worker's resource GPU=1 exactly
    cpu = plan_job(8, "64GB")
    assert (cpu.workers, cpu.concurrency.slots, cpu.concurrency.torch_threads) == (8, 1, 1)
    assert cpu.gpu_share is None
    small = plan_job(8, "4GB")  # at most one CPU worker per 2 GiB of the job's memory
    assert small.workers == 1 and small.concurrency.torch_threads == 8
    with pytest.raises(ValueError, match="memory"):
        plan_job(8, "lots")
    with pytest.raises(ValueError, match="cores"):
        plan_job(0, "4GB")


def test_each_worker_of_a_multi_gpu_job_keeps_one_gpu():
    assert [gpu_for_worker(f"SLURMCluster-3-{i}", "0,1,2,3") for i in range(4)] == ["0", "1", "2", "3"]
    assert gpu_for_worker("SLURMCluster-3-1", "GPU-aa, GPU-bb") == "GPU-bb"  # UUIDs as SLURM may set them
    assert gpu_for_worker("SLURMCluster-3", "0") is None  # one GPU: nothing to choose
    assert gpu_for_worker("worker", "0,1") is None and gpu_for_worker("x-1", None) is None


def test_slurm_gpu_job_script():
    with cluster.start(kind="slurm", jobs=0, cores=16, memory="64GB", gpus_per_job=4, walltime="02:00:00",
                       queue="gpu", account="proj42", preload=(), verbose=False) as cl:
        script = cl.cluster.job_script()
        assert cl.kind == "slurm" and cl.gpu and cl.dashboard_link
    lines = script.splitlines()
    for directive in ("#SBATCH -p gpu", "#SBATCH -A proj42", "#SBATCH --cpus-per-task=16", "#SBATCH -t 02:00:00",
                      "#SBATCH --gres=gpu:4"):
        assert directive in lines, script
    (command,) = [ln for ln in lines if "distributed.cli.dask_worker" in ln]
    for arg in ("--nworkers 4", "--nthreads 4", "--resources GPU=1", "--nanny"):
        assert arg in command, command
    assert "unset MALLOC_TRIM_THRESHOLD_" in lines
    assert any("DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON" in ln and "'OMP_NUM_THREADS': '4'" in ln for ln in lines)


def test_pbs_cpu_job_script():
    with cluster.start(kind="pbs", jobs=0, cores=8, memory="32GB", walltime="01:00:00", queue="workq",
                       preload=(), verbose=False) as cl:
        script = cl.cluster.job_script()
        assert cl.kind == "pbs" and not cl.gpu
    lines = script.splitlines()
    assert "#PBS -q workq" in lines and "#PBS -l walltime=01:00:00" in lines
    assert "#PBS -l select=1:ncpus=8:mem=30GB" in lines, script  # 32 GB as PBS rounds it (GiB)
    (command,) = [ln for ln in lines if "distributed.cli.dask_worker" in ln]
    assert "--nworkers 8" in command and "--nthreads 1" in command and "GPU" not in command


def test_bad_options_are_refused_before_any_job():
    with pytest.raises(ValueError, match="kind"):
        cluster.start(kind="lsf", cores=1, memory="1GB", preload=(), verbose=False)
    with pytest.raises(ValueError, match="cores"):
        cluster.start(kind="slurm", memory="1GB", preload=(), verbose=False)
    with pytest.raises(ValueError, match="n_workers"):
        cluster.start(kind="slurm", n_workers=2, cores=1, memory="1GB", preload=(), verbose=False)
    with pytest.raises(ValueError, match="gpus_per_job"):
        cluster.start(kind="slurm", jobs=0, cores=1, memory="1GB", gpus_per_job=-1, preload=(), verbose=False)
    with cluster.start(kind="slurm", jobs=0, cores=1, memory="1GB", preload=(), verbose=False) as cl:
        with pytest.raises(ValueError, match="minimum"):
            cl.adapt(minimum_jobs=3, maximum_jobs=1)
        with pytest.raises(ValueError, match="jobs"):
            cl.scale(jobs=-1)


def test_server_cluster_table_from_the_config_file(tmp_path):
    from matcalc.server.cluster_executor import ClusterExecutor
    from matcalc.server.config import load_settings

    toml = tmp_path / "matcalc.toml"
    toml.write_text('[server]\nport = 9001\n\n[cluster]\nkind = "slurm"\njobs = 2\ncores = 8\nmemory = "32GB"\n'
                    'walltime = "04:00:00"\nqueue = "gpu"\ngpus_per_job = 2\nmaximum_jobs = 6\n')
    s = load_settings(config_file=toml, env={})
    assert s.cluster == "slurm" and s.port == 9001
    assert s.cluster_options == {"jobs": 2, "cores": 8, "memory": "32GB", "walltime": "04:00:00", "queue": "gpu",
                                 "gpus_per_job": 2, "maximum_jobs": 6}
    flat = tmp_path / "flat.toml"  # no [server] table: settings at the top level, the [cluster] table beside
    flat.write_text('cluster = "pbs"\n[cluster_options]\njobs = 1\n')
    assert load_settings(config_file=flat, env={}).cluster_options == {"jobs": 1}
    top = tmp_path / "top.toml"
    top.write_text('[cluster]\nkind = "slurm"\ncores = 4\nmemory = "8GB"\n')
    s = load_settings(config_file=top, env={"MATCALC_CLUSTER": "pbs"})  # the environment wins over the file
    assert s.cluster == "pbs" and s.cluster_options == {"cores": 4, "memory": "8GB"}
    s = load_settings(env={"MATCALC_CLUSTER_OPTIONS": '{"jobs": 3, "cores": 2}'})
    assert s.cluster_options == {"jobs": 3, "cores": 2}
    with pytest.raises(ValueError, match="cluster_options"):
        load_settings(env={"MATCALC_CLUSTER_OPTIONS": "{jobs: 3"})
    # an unknown option stops the server at start, naming it, before any job is submitted
    ex = ClusterExecutor("slurm", options={"jobs": 0, "cores": 1, "memory": "1GB", "no_such_option": 1})
    with pytest.raises(ValueError, match="no_such_option"):
        ex.start(callbacks=None)
