"""The broker's tokenizer files, fetched once into the client's cache (TOKENIZER), so that a client
on another machine needs only the broker's URL.

`TokenizerFetch` holds the fetch's state and checks; the sync and async clients drive it with
their own calls. The cache is `$XDG_CACHE_HOME/layerline/tokenizers/<fingerprint>/`; a cached
copy is used where its files pack to the bundle that STATUS names, else fetched again.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

from broker import messages as M
from broker import protocol as P
from client.errors import ClientError
from common.text import tokenizer_source
from common.tokenizer_files import (
    MAX_BUNDLE_BYTES,
    BundleError,
    cache_dir,
    cached_bundle,
    install,
    unpack,
)

# While a broker exports its GGUF file's tokenizer (STATUS `tokenizer.state: preparing`, at its
# first start on that file: 16 to 26 s for SmolLM2 on a 2-core VM), a new client asks STATUS
# again every PREPARE_POLL_S, for at most PREPARE_WAIT_S.
PREPARE_POLL_S = 0.5
PREPARE_WAIT_S = 120.0


def preparing_too_long(status: M.Status) -> ClientError:
    return ClientError(
        f"the broker has been exporting its checkpoint's tokenizer for over {PREPARE_WAIT_S:g} "
        "s; see its log (tokenizer_not_served), or pass tokenizer=PATH (--tokenizer PATH)"
    )


class TokenizerFetch:
    """One fetch of the bundle STATUS names into `directory`."""

    def __init__(self, info: M.TokenizerInfo, directory: Path):
        if info.size > MAX_BUNDLE_BYTES:
            raise ClientError(
                f"the broker's tokenizer files take {info.size} bytes, over the client's "
                f"limit of {MAX_BUNDLE_BYTES}; pass tokenizer=PATH (--tokenizer PATH)"
            )
        self.info = info
        self.directory = directory
        self.data = bytearray()

    @classmethod
    def needed(cls, status: M.Status, tokenizer: Any) -> TokenizerFetch | None:
        """The fetch a client needs: none where it was given a tokenizer, where the broker's
        checkpoint is on this machine with its tokenizer, or where the broker serves none (token
        ids only). A path that exists here but holds no tokenizer (another machine's layout, an
        empty mount) is not the broker's checkpoint."""
        if tokenizer is not None or status.tokenizer is None:
            return None
        local = Path(status.model).expanduser()
        if local.exists() and tokenizer_source(local) is not None:
            return None
        return cls(status.tokenizer, cache_dir(status.fingerprint or status.tokenizer.sha256))

    @property
    def preparing(self) -> bool:
        """The broker is still exporting the files: ask STATUS again (PREPARE_POLL_S)."""
        return self.info.state == "preparing"

    def cached(self) -> bool:
        """Whether the cache already holds the bundle (its files, unchanged). Where it does not,
        the cache must take the files: ClientError now, before anything is fetched, if not."""
        if cached_bundle(self.directory, self.info.sha256):
            return True
        try:
            self.directory.parent.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=self.directory.parent).close()
        except OSError as e:
            raise self._unwritable(e) from None
        return False

    def _unwritable(self, e: OSError) -> ClientError:
        return ClientError(
            f"cannot cache the broker's tokenizer in {self.directory}: {e}; set "
            "XDG_CACHE_HOME to a writable directory, or pass tokenizer=PATH"
        )

    def next_query(self) -> M.TokenizerQuery | None:
        """The next TOKENIZER request, or None once the whole bundle is here."""
        if len(self.data) >= self.info.size:
            return None
        return M.TokenizerQuery(offset=len(self.data))

    def take(self, msg: P.Message) -> None:
        """One TOKENIZER reply: its chunk must be of the bundle asked for, at the offset asked."""
        body: M.TokenizerChunk = msg.body
        if body.sha256 != self.info.sha256 or body.size != self.info.size:
            raise ClientError(
                "the broker's tokenizer changed while it was fetched (the broker restarted on "
                "another checkpoint?); connect again"
            )
        chunk = P.frame_buffer(msg.frames[0])
        if body.offset != len(self.data) or not chunk.nbytes:
            raise ClientError(
                f"the broker sent tokenizer bytes from {body.offset} ({chunk.nbytes} bytes) "
                f"when bytes from {len(self.data)} were asked for"
            )
        self.data += chunk[: self.info.size - len(self.data)]

    def install(self) -> None:
        """Check the bundle against its digest and write its files into the cache."""
        got = hashlib.sha256(self.data).hexdigest()
        if got != self.info.sha256:
            raise ClientError(
                f"the tokenizer files from the broker do not match their digest (sha256 {got}, "
                f"expected {self.info.sha256}); connect again"
            )
        try:
            files = unpack(bytes(self.data))
        except BundleError as e:
            raise ClientError(f"the broker sent a broken tokenizer bundle: {e}") from None
        try:
            install(self.directory, files)
        except OSError as e:
            raise self._unwritable(e) from None
