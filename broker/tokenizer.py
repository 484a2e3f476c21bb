"""The checkpoint's tokenizer, served to clients in chunks (TOKENIZER), so that a client on
another machine needs only the broker's URL."""

from __future__ import annotations

import subprocess
import sys
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
)

log = structlog.get_logger("broker")

# Exporting a GGUF file's tokenizer imports transformers and converts its vocabulary: 16 s for
# SmolLM2's 49k tokens on the 2-core VM; a stuck export must not hold the broker's start.
EXPORT_TIMEOUT_S = 300.0


def tokenizer_bundle(checkpoint: CheckpointMeta) -> Bundle | None:
    """The checkpoint's tokenizer files as one bundle; None for a checkpoint without one (it
    serves token ids only), or one whose tokenizer cannot be served (logged, with why)."""
    path = checkpoint.path
    try:
        if path.is_dir():
            if not ships_tokenizer(path):
                return None
            return pack(read_directory(path, SHIPPED_FILES))
        directory = _exported(path, checkpoint.fingerprint)
        return None if directory is None else pack(read_directory(directory))
    except (OSError, BundleError) as e:
        log.warning("tokenizer_not_served", model=str(path), reason=str(e))
        return None


def _exported(gguf: Path, fingerprint: str) -> Path | None:
    """The directory of the GGUF file's exported tokenizer files, exported now if there is
    none yet (by a subprocess: the broker never imports transformers)."""
    candidates = export_dirs(gguf, fingerprint)
    for directory in candidates:
        if directory.is_dir():
            return directory
    started = time.perf_counter()
    command = [sys.executable, "-m", "stage.tokenizer_export", str(gguf), *map(str, candidates)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=EXPORT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        log.warning("tokenizer_not_served", model=str(gguf), reason="its export timed out")
        return None
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        log.warning("tokenizer_not_served", model=str(gguf), reason=reason[0])
        return None
    directory = Path(done.stdout.strip())
    log.info(
        "tokenizer_exported",
        model=str(gguf),
        directory=str(directory),
        seconds=round(time.perf_counter() - started, 3),
    )
    return directory


class TokenizerFiles:
    """The `Broker`'s TOKENIZER handler: one chunk of the bundle per request."""

    @property
    def tokenizer_info(self) -> M.TokenizerInfo | None:
        """What STATUS says of the bundle: a client compares its cached copy with `sha256`."""
        bundle: Bundle | None = self.tokenizer
        if bundle is None:
            return None
        return M.TokenizerInfo(sha256=bundle.sha256, size=len(bundle.data), files=bundle.files)

    def on_tokenizer(self, ident: bytes, msg: P.Message) -> None:
        bundle: Bundle | None = self.tokenizer
        offset = msg.body.offset
        refusal = None
        if bundle is None:
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
