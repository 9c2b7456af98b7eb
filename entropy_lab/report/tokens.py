"""Token text for reports: the tokenizer a run directory holds, read without transformers or torch.

``find_tokenizer`` looks for a ``tokenizer.json`` (the file every fast Hugging Face tokenizer
saves) in this order: the run's latest checkpoint (``checkpoints/step_*/model/``), the
checkpoints of the run a checkpoint trace's directory sits in (its parent or grandparent), and the configuration's
``model`` when that is a local directory. ``TokenText`` decodes one id at a time with the
``tokenizers`` library.

Deliberate simplifications:

- A token is decoded on its own (``decode([id])``): a byte-level BPE piece that is part of
  a multi-byte character shows as the replacement character, as it does in any per-token
  view; the whole response is not re-decoded.
- Without a tokenizer (none saved, or an unreadable file) the text of a token is its id,
  written ``#id``, and ``TokenText.source`` says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from entropy_lab.runs import RunDir

TOKENIZER_FILE = "tokenizer.json"


def _latest_checkpoint_tokenizer(run: RunDir) -> Path | None:
    checkpoints = run.checkpoints()
    for step in sorted(checkpoints, reverse=True):
        candidate = checkpoints[step] / "model" / TOKENIZER_FILE
        if candidate.is_file():
            return candidate
    return None


def find_tokenizer(run: RunDir, config: Mapping[str, Any] | None = None) -> Path | None:
    """The ``tokenizer.json`` that decodes this run's token ids, or None (see the module docstring)."""
    found = _latest_checkpoint_tokenizer(run)
    # A checkpoint trace's directory sits inside its run (RUN/retrace-*/ or RUN/retrace/step_N/).
    for above in run.path.parents[:2]:
        if found is None and (above / "config.json").is_file():
            found = _latest_checkpoint_tokenizer(RunDir(above))
    model = (config or {}).get("model")
    if found is None and model:
        candidate = Path(str(model)) / TOKENIZER_FILE
        found = candidate if candidate.is_file() else None
    return found


class TokenText:
    """Id -> display text of one token, from a ``tokenizer.json`` or, without one, ``#id``."""

    def __init__(self, path: Path | None, base: Path | None = None) -> None:
        """``path``: the tokenizer.json (None = ids); ``base``: shown paths are relative to it when inside."""
        self._tokenizer = None
        self.source = "token ids (no tokenizer.json found in the run)"
        if path is not None:
            shown = path.relative_to(base) if base is not None and path.is_relative_to(base) else path
            try:
                from tokenizers import Tokenizer

                self._tokenizer = Tokenizer.from_file(str(path))
                self.source = str(shown)
            except Exception as error:  # a corrupt or foreign file: fall back to ids, and say why
                self.source = f"token ids ({shown} could not be read: {error})"
        self.decode = lru_cache(maxsize=None)(self._decode)

    @property
    def has_tokenizer(self) -> bool:
        return self._tokenizer is not None

    def _decode(self, token_id: int) -> str:
        if self._tokenizer is None:
            return f"#{token_id}"
        return self._tokenizer.decode([int(token_id)], skip_special_tokens=False)
