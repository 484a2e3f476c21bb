"""The stage worker: one DEALER to the broker, an I/O thread and a compute thread.

The I/O thread (the one that calls `StageWorker.run`) is the only user of the DEALER socket:
it runs the link to the broker (`stage.link`). The compute thread runs loads and forwards
(`stage.compute`). The two share the job queue, the stats the compute side keeps, and one
inproc PAIR socket that carries replies back, so the I/O thread wakes at once.
"""

from __future__ import annotations

import structlog
import zmq

from stage.checkpoint import Checkpoint, open_checkpoint
from stage.compute import Compute
from stage.config import EXIT_OK, StageConfig
from stage.link import Link


class StageWorker:
    """A stage: registers with the broker, loads the layers it is assigned, runs forwards."""

    def __init__(self, config: StageConfig, checkpoint: Checkpoint | None = None):
        self.config = config
        self.checkpoint = checkpoint or open_checkpoint(config.model)
        self.log = structlog.get_logger("stage").bind(stage=config.name)
        self._ctx = zmq.Context()
        self._results_addr = f"inproc://stage-results-{id(self):x}"
        self._compute = Compute(config, self.checkpoint, self._ctx, self._results_addr, self.log)
        self._link = Link(config, self.checkpoint, self._ctx, self._compute, self.log)

    # --- control, callable from any thread or a signal handler ------------------------------

    def stop(self, code: int = EXIT_OK, reason: str = "stopped") -> None:
        """Exit as soon as the I/O loop next wakes (within one heartbeat interval)."""
        self._link.stop(code, reason)

    def leave(self) -> None:
        """Drain: tell the broker we are leaving, serve until it says BYE drained."""
        self._link.leave()

    @property
    def leaving(self) -> bool:
        return self._link.leaving

    @property
    def exit_code(self) -> int | None:
        return self._link.exit_code

    @property
    def compute_alive(self) -> bool:
        return self._compute.alive

    # --- the I/O thread ---------------------------------------------------------------------

    def run(self) -> int:
        """Serve until told to exit; return the process exit code."""
        results = self._ctx.socket(zmq.PAIR)
        results.setsockopt(zmq.LINGER, 0)
        results.bind(self._results_addr)
        self._compute.start()
        try:
            self._link.run(results)
        finally:
            self._compute.close()
            results.close(linger=0)
            if not self._compute.alive:
                self._ctx.term()
        self.log.info("exit", code=self.exit_code, reason=self._link.exit_reason)
        return self.exit_code
