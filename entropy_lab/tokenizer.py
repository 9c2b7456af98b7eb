"""A character-level tokenizer for the built-in tasks, built with the ``tokenizers`` library.

Every character of the alphabet is one token; ids are 0..3 for ``<pad>``, ``<bos>``,
``<eos>``, ``<unk>``, then the distinct alphabet characters in sorted order, so the
same set of characters always gives the same ids. Characters outside the alphabet
encode as ``<unk>``. ``decode(ids, skip_special_tokens=True)`` returns the exact text
(the Fuse decoder concatenates tokens; no clean-up of spaces).

Simplifications: no post-processor, so encoding adds no BOS/EOS (the caller places
them); no chat template; special-token strings such as "<eos>" typed in raw text are
matched as special tokens (the built-in alphabets contain no '<').
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from entropy_lab.errors import EntropyLabError

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")


def build_char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """A fast tokenizer with one token per character of ``alphabet`` plus the four special tokens."""
    chars = sorted(set(alphabet))
    if not chars:
        raise EntropyLabError("build_char_tokenizer needs a non-empty alphabet.")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({c: len(SPECIAL_TOKENS) + i for i, c in enumerate(chars)})

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Isolate every character (newlines included) so each is looked up on its own.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
