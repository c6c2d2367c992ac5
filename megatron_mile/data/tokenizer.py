"""Tokenizers for preprocessing and training: a SentencePiece model file or an HF tokenizer directory.

Both are megatron-core ``MegatronTokenizerBase`` subclasses, so they plug straight into
``GPTDatasetConfig(tokenizer=...)``. ``tokenize`` never adds BOS/EOS; ``--append-eod`` does that
explicitly, so the stored ids are exactly ``tokenize(text) (+ [eod])``.

``--tokenizer-type`` takes this project's names (``sentencepiece``, ``huggingface``) or
Megatron-LM's; ``resolve_tokenizer_type`` is the one place that maps them. Megatron-LM's
names load the same files but differ in special tokens (see ``MEGATRON_LM_TOKENIZER_TYPES``).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

from megatron.core.tokenizers import MegatronTokenizerBase

from megatron_mile.data.errors import DataError

TOKENIZER_TYPES = ("sentencepiece", "huggingface")

# Megatron-LM's --tokenizer-type names that load the same files, with how Megatron-LM's own
# tokenizer of that name differs from ours (ours never adds special tokens to a document).
MEGATRON_LM_TOKENIZER_TYPES: dict[str, tuple[str, str]] = {
    "GPTSentencePieceTokenizer": ("sentencepiece", "identical: the model's pieces, EOD is its EOS"),
    "SentencePieceTokenizer": ("sentencepiece", "Megatron-LM appends <CLS>, <SEP>, <EOD>, <MASK> (and <PAD>, <BOS>, "
                                                "<EOS> when the model lacks them) to the vocabulary and uses <EOD> "
                                                "as end of document; here the vocabulary is the model's and EOD is "
                                                "its EOS"),
    "Llama2Tokenizer": ("sentencepiece", "Megatron-LM prepends BOS to every document; here no BOS is added"),
    "HuggingFaceTokenizer": ("huggingface", "Megatron-LM loads any AutoTokenizer (hub names too) and adds its "
                                            "special tokens, e.g. BOS, to every document; here a local fast "
                                            "tokenizer directory, no special tokens added, EOD is its eos_token"),
}
# Megatron-LM's other names, refused with the reason.
UNSUPPORTED_TOKENIZER_TYPES: dict[str, str] = {
    "GPT2BPETokenizer": "GPT-2 vocab/merges files (--vocab-file, --merge-file) are not read; save the tokenizer "
                        "as a Hugging Face directory (tokenizer.json) and pass that",
    "BertWordPieceLowerCase": "BERT WordPiece vocabularies are not supported (GPT pretraining only)",
    "BertWordPieceCase": "BERT WordPiece vocabularies are not supported (GPT pretraining only)",
    "TikTokenizer": "tiktoken vocabularies are not supported; convert to a Hugging Face tokenizer directory",
    "NullTokenizer": "there is no mock-data mode: training needs a real tokenizer (--tokenizer-model)",
    "NullMultimodalTokenizer": "multimodal tokenizers are not supported",
    "MultimodalTokenizer": "multimodal tokenizers are not supported",
    "SFTTokenizer": "fine-tuning chat tokenizers are not supported (pretraining only)",
}


def resolve_tokenizer_type(name: Optional[str]) -> Optional[str]:
    """This project's type for ``name`` (its own or Megatron-LM's spelling); None stays None (inferred).

    Raises ``DataError`` with one line for a name that is unknown or not supported.
    """
    if name is None or name in TOKENIZER_TYPES:
        return name
    if name in MEGATRON_LM_TOKENIZER_TYPES:
        return MEGATRON_LM_TOKENIZER_TYPES[name][0]
    if name in UNSUPPORTED_TOKENIZER_TYPES:
        raise DataError(f"--tokenizer-type {name} is not supported: {UNSUPPORTED_TOKENIZER_TYPES[name]}")
    raise DataError(f"--tokenizer-type {name!r} is unknown; choose from {', '.join(accepted_tokenizer_types())}")


def accepted_tokenizer_types() -> tuple[str, ...]:
    return TOKENIZER_TYPES + tuple(MEGATRON_LM_TOKENIZER_TYPES)


def tokenizer_type_argument(name: str) -> str:
    """``argparse`` type for ``--tokenizer-type``: the resolved name, or a one-line usage error."""
    try:
        return resolve_tokenizer_type(name)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--tokenizer-type ")) from None


TOKENIZER_TYPE_HELP = ("sentencepiece (a .model file) or huggingface (a directory with tokenizer.json); "
                       "Megatron-LM's " + ", ".join(MEGATRON_LM_TOKENIZER_TYPES) + " are accepted too "
                       "(default: inferred from --tokenizer-model)")


def infer_tokenizer_type(path: str) -> str:
    """A directory or a ``tokenizer.json`` is Hugging Face; any other file is a SentencePiece model."""
    if os.path.isdir(path) or os.path.basename(path) == "tokenizer.json":
        return "huggingface"
    return "sentencepiece"


class _Tokenizer(MegatronTokenizerBase):
    """Shared surface; subclasses set ``_vocab_size``, ``_eod``, ``_bos`` and the encode/decode calls."""

    library: str = ""

    def __init__(self, path: str) -> None:
        super().__init__(path, {"library": self.library})

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> Optional[int]:
        return self._eod

    @property
    def bos(self) -> Optional[int]:
        return self._bos

    @property
    def eos(self) -> Optional[int]:
        return self._eod

    @property
    def unique_identifiers(self) -> dict:
        return {"class": type(self).__name__, "tokenizer_path": os.path.abspath(self.path)}

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.tokenize(t) for t in texts]

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("pretraining tokenizers have no chat template")


class SentencePieceTokenizer(_Tokenizer):
    """LLaMA-style SentencePiece model; BOS/EOS ids come from the model itself."""

    library = "sentencepiece"

    def __init__(self, path: str) -> None:
        import sentencepiece

        super().__init__(path)
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(path)
        except (OSError, RuntimeError) as exc:
            raise DataError(f"{path}: not a readable SentencePiece model ({exc})") from None
        self._vocab_size = self._sp.get_piece_size()
        self._eod = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        self._bos = self._sp.bos_id() if self._sp.bos_id() >= 0 else None

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # One thread: parallelism comes from preprocessing workers, and threads would oversubscribe them.
        return self._sp.encode(list(texts), num_threads=1)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    @property
    def vocab(self) -> dict[str, int]:
        return {self._sp.id_to_piece(i): i for i in range(self._vocab_size)}


def _special_token(config: dict, name: str) -> Optional[str]:
    value = config.get(name)
    if isinstance(value, dict):  # {"content": "</s>", ...} in older tokenizer_config.json files
        value = value.get("content")
    return value if isinstance(value, str) else None


class HuggingFaceTokenizer(_Tokenizer):
    """A fast tokenizer saved as a directory (``tokenizer.json`` + ``tokenizer_config.json``).

    Loaded with the ``tokenizers`` library alone: no ``transformers`` import, no hub access.
    EOD is the configured ``eos_token``.
    """

    library = "huggingface"

    def __init__(self, path: str) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise DataError(f"{path}: Hugging Face tokenizers need the 'tokenizers' package") from None

        super().__init__(path)
        directory = path if os.path.isdir(path) else os.path.dirname(path)
        tokenizer_file = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise DataError(f"{path}: no tokenizer.json (only fast Hugging Face tokenizers are supported)")
        try:
            self._tok = Tokenizer.from_file(tokenizer_file)
        except Exception as exc:  # the Rust side raises a bare Exception on malformed files
            raise DataError(f"{tokenizer_file}: not a readable Hugging Face tokenizer ({exc})") from None
        config: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later file wins
            config_path = os.path.join(directory, name)
            if os.path.isfile(config_path):
                with open(config_path, encoding="utf-8") as f:
                    config.update(json.load(f))
        self._vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._eod = self._token_id(_special_token(config, "eos_token"))
        self._bos = self._token_id(_special_token(config, "bos_token"))

    def _token_id(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self._tok.token_to_id(token)

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)


def build_tokenizer(path: str, tokenizer_type: Optional[str] = None) -> _Tokenizer:
    """Load a SentencePiece ``.model`` file or an HF tokenizer directory; the type is inferred unless given."""
    if not path or not os.path.exists(path):
        raise DataError(f"tokenizer not found: {path!r}")
    if not os.access(path, os.R_OK):
        raise DataError(f"tokenizer not readable: {path!r}")
    kind = resolve_tokenizer_type(tokenizer_type) or infer_tokenizer_type(path)
    if kind == "sentencepiece":
        if os.path.isdir(path):
            raise DataError(f"{path}: a directory, but --tokenizer-type sentencepiece needs a .model file")
        return SentencePieceTokenizer(path)
    return HuggingFaceTokenizer(path)
