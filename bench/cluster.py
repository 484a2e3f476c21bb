"""The launcher's cluster as the benchmark starts it: quiet, without a feed, patient with a
cold page cache, OpenMP as asked. Each process's peak memory is read from /proc/<pid>/status
of the process bench started.
"""

from __future__ import annotations

from pathlib import Path

from layerline import cluster as launcher

# Loading tinyllama (4.4 GB) from a cold page cache on a slow disk takes minutes.
READY_TIMEOUT_S = 900.0


def bench_env(omp_wait_policy: str | None = None) -> dict[str, str]:
    """The environment of every process bench starts: offline, unbuffered, OpenMP as asked."""
    env = {**launcher.cluster_env(), "TRANSFORMERS_OFFLINE": "1"}
    env.pop("OMP_WAIT_POLICY", None)  # "default" means libgomp's own default, not the caller's
    if omp_wait_policy and omp_wait_policy != "default":
        env["OMP_WAIT_POLICY"] = omp_wait_policy
    return env


def proc_status(pid: int) -> dict[str, int]:
    """Memory fields of /proc/<pid>/status in bytes (VmHWM, VmRSS, RssAnon, RssFile)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


class Cluster(launcher.Cluster):
    """Broker + stages s0..s{N-1} on the benchmark's dtype, device and threads."""

    def __init__(
        self,
        model: Path,
        stages: int,
        *,
        threads: int = 1,
        dtype: str = "float32",
        device: str = "cpu",
        omp_wait_policy: str | None = None,
        log_dir: Path | None = None,
        broker_args: tuple[str, ...] = (),
        stage_args: tuple[str, ...] = (),
        keys: Path | None = None,
    ):
        super().__init__(
            model,
            stages,
            feed=False,
            threads=threads,
            dtype=dtype,
            device=device,
            log_level="warning",
            broker_args=broker_args,
            # The scenarios compare against transformers' float model: stages hold what it
            # computes with, unless a scenario says otherwise (the weights scenario).
            stage_args=stage_args if "--weights" in stage_args else ("--weights", dtype),
            env=bench_env(omp_wait_policy),
            log_dir=log_dir,
            ready_timeout_s=READY_TIMEOUT_S,
            keys=keys,
        )
