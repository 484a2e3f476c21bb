"""The launcher's cluster as the tests start it; LAYERLINE_TEST_LOGS=DIR keeps its logs."""

from __future__ import annotations

import os
import time
from pathlib import Path

from layerline import cluster as launcher


class Cluster(launcher.Cluster):
    """Broker + named stages with one torch thread each, logs kept where asked."""

    def __init__(
        self,
        model: Path,
        stages: int = 3,
        *,
        broker_args: tuple[str, ...] = (),
        stage_args: tuple[str, ...] = (),
        log_dir: Path | None = None,
        keys: Path | None = None,
        bind_host: str = "127.0.0.1",
    ):
        super().__init__(
            model,
            stages,
            broker_args=broker_args,
            stage_args=stage_args,
            keys=keys,
            bind_host=bind_host,
        )
        # LAYERLINE_TEST_LOGS=DIR keeps every cluster's process logs, one folder per cluster.
        kept = os.environ.get("LAYERLINE_TEST_LOGS")
        if log_dir is None and kept:
            log_dir = Path(kept) / f"{time.strftime('%H%M%S')}-{self.port}"
        self.log_dir = log_dir

    def wait_idle(self, timeout_s: float = 20.0) -> Cluster:
        """This cluster once it holds no request and no stage cache: a cluster shared by a
        module's tests, with nothing left over from an earlier one."""
        self.wait_for(
            lambda s: (
                s["requests"] == 0 and sum(x.get("kv_requests") or 0 for x in s["stages"]) == 0
            ),
            timeout_s,
            "an idle cluster",
        )
        return self
