"""The checkpoint's tokenizer, served to clients in chunks (TOKENIZER), so that a client on
another machine needs only the broker's URL."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import structlog

from broker import messages as M
from broker import protocol as P
from common.checkpoint import CheckpointMeta
from common.text import ships_tokenizer
from common.tokenizer_files import (
    SHIPPED_FILES,
    Bundle,
    BundleError,
    export_dirs,
    pack,
    read_directory,
    recorded_failure,
)

log = structlog.get_logger("broker")

# Exporting a GGUF file's tokenizer imports transformers and converts its vocabulary: 16 to
# 26 s for SmolLM2's 49k tokens on the 2-core VM. It runs beside the broker's loop, and one
# stuck this long is killed (the broker then serves no tokenizer).
EXPORT_TIMEOUT_S = 300.0
# What a client that asks while the export runs is told to wait before asking again.
EXPORT_RETRY_S = 1.0


class TokenizerSource:
    """The bundle the broker serves: packed at start from a Hugging Face directory or an
    earlier export, or exported from a GGUF file by a subprocess (the broker never imports
    transformers) while the broker already serves; `poll()` takes the export's result."""

    def __init__(self, checkpoint: CheckpointMeta):
        self.path = checkpoint.path
        self.bundle: Bundle | None = None
        self.export: subprocess.Popen | None = None
        self.started = 0.0
        self._out = self._err = None
        try:
            if self.path.is_dir():
                if ships_tokenizer(self.path):
                    self.bundle = pack(read_directory(self.path, SHIPPED_FILES))
                return
            candidates = export_dirs(self.path, checkpoint.fingerprint)
            done = next((d for d in candidates if d.is_dir()), None)
            if done is not None:
                self.bundle = pack(read_directory(done))
                return
            failed = recorded_failure(candidates)
            if failed is not None:
                record, reason = failed
                log.warning(
                    "tokenizer_not_served",
                    model=str(self.path),
                    reason=f"{reason} (found by an earlier export; delete {record} to export "
                    "again)",
                )
                return
        except (OSError, BundleError) as e:
            log.warning("tokenizer_not_served", model=str(self.path), reason=str(e))
            return
        # Files, not pipes: the loop reads them once the export has ended, and a pipe that
        # nobody reads meanwhile would stop an export that writes many warnings.
        self._out = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed by close())
        self._err = tempfile.TemporaryFile("w+")  # noqa: SIM115
        command = [sys.executable, "-m", "stage.tokenizer_export", str(self.path)]
        self.export = subprocess.Popen(
            [*command, *map(str, candidates)], stdout=self._out, stderr=self._err
        )
        self.started = time.monotonic()
        log.info("tokenizer_exporting", model=str(self.path), pid=self.export.pid)

    @property
    def preparing(self) -> bool:
        return self.export is not None

    def poll(self, now: float) -> None:
        """Take the export's result once it has finished (or kill it past EXPORT_TIMEOUT_S)."""
        if self.export is None:
            return
        code = self.export.poll()
        if code is None and now - self.started < EXPORT_TIMEOUT_S:
            return
        seconds = round(now - self.started, 3)
        if code is None:
            self.close()
            log.warning("tokenizer_not_served", model=str(self.path), reason="its export timed out")
            return
        self._out.seek(0)
        self._err.seek(0)
        out, err = self._out.read().strip(), self._err.read().strip()
        self.close()
        if code != 0:
            reason = err.splitlines()[-1:] or [f"exit code {code}"]
            log.warning("tokenizer_not_served", model=str(self.path), reason=reason[0])
            return
        try:
            self.bundle = pack(read_directory(Path(out)))
        except (OSError, BundleError) as e:
            log.warning("tokenizer_not_served", model=str(self.path), reason=str(e))
            return
        log.info("tokenizer_exported", model=str(self.path), directory=out, seconds=seconds)

    def close(self) -> None:
        """Stop an export still running (the broker is stopping, or it took too long)."""
        if self.export is not None:
            if self.export.poll() is None:
                self.export.kill()
            self.export.wait()
            self.export = None
        for f in (self._out, self._err):
            if f is not None:
                f.close()
        self._out = self._err = None

    def info(self) -> M.TokenizerInfo | None:
        """What STATUS says of the bundle: a client compares its cached copy with `sha256`."""
        if self.preparing:
            return M.TokenizerInfo(state="preparing")
        if self.bundle is None:
            return None
        b = self.bundle
        return M.TokenizerInfo(sha256=b.sha256, size=len(b.data), files=b.files)


class TokenizerFiles:
    """The `Broker`'s TOKENIZER handler: one chunk of the bundle per request."""

    def on_tokenizer(self, ident: bytes, msg: P.Message) -> None:
        source: TokenizerSource | None = self.tokenizer
        bundle = source.bundle if source is not None else None
        offset = msg.body.offset
        refusal = None
        if source is not None and source.preparing:
            refusal = P.error(
                P.Code.BUSY,
                f"the broker is exporting the tokenizer of {source.path.name} (for "
                f"{time.monotonic() - source.started:.0f} s); ask again",
                retry_after_s=EXPORT_RETRY_S,
            )
        elif bundle is None:
            refusal = P.error(
                P.Code.NO_TOKENIZER,
                f"the checkpoint {self.checkpoint.path.name} has no tokenizer to serve; "
                "send token ids, or give the client a local tokenizer",
            )
        elif offset > len(bundle.data):
            refusal = P.error(
                P.Code.BAD_REQUEST,
                f"offset {offset} is past the end of the {len(bundle.data)}-byte tokenizer bundle",
            )
        if refusal is not None:
            self.send(ident, P.encode(msg.tag, refusal))
            return
        chunk = bundle.data[offset : offset + self.config.tokenizer_chunk_bytes]
        reply = M.TokenizerChunk(sha256=bundle.sha256, size=len(bundle.data), offset=offset)
        self.metrics.tokenizer_bytes.inc(len(chunk))
        self.send(ident, P.encode(msg.tag, reply, [(M.bytes_desc(len(chunk)), chunk)]))
