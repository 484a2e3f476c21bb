"""Write a GGUF checkpoint's tokenizer (vocabulary, merges, special tokens, chat template) out
as Hugging Face tokenizer files, which the broker serves to clients.

The broker never imports transformers, so it runs this once per checkpoint in a subprocess.

Usage: ``python -m stage.tokenizer_export FILE.gguf DIR [DIR ...]``: the files go into the first
DIR that can be written, whose path is printed (exit code 1: none could be; 3: the file holds no
tokenizer, which is recorded beside the first DIR that takes it: `DIR.failed`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common.tokenizer_files import install, read_directory, record_failure

NOT_WRITTEN = 1
NO_TOKENIZER = 3


def tokenizer_files(gguf: Path) -> dict[str, bytes]:
    """The tokenizer of `gguf`'s metadata, as the files `save_pretrained` writes."""
    from transformers import AutoTokenizer  # deferred: --help answers at once

    tokenizer = AutoTokenizer.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, local_files_only=True
    )
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        return read_directory(Path(scratch))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stage.tokenizer_export", description=__doc__)
    parser.add_argument("gguf", type=Path)
    parser.add_argument("outs", type=Path, nargs="+", metavar="DIR")
    args = parser.parse_args(argv)
    try:
        files = tokenizer_files(args.gguf)
    except (OSError, ValueError, KeyError) as e:
        reason = f"{args.gguf} holds no usable tokenizer: {e}"
        record_failure(args.outs, reason)
        print(reason, file=sys.stderr)
        return NO_TOKENIZER
    errors = []
    for out in args.outs:
        try:
            install(out, files)
        except OSError as e:
            errors.append(f"{out}: {e}")
            continue
        print(out)
        return 0
    print(f"cannot write the tokenizer files: {'; '.join(errors)}", file=sys.stderr)
    return NOT_WRITTEN


if __name__ == "__main__":
    sys.exit(main())
