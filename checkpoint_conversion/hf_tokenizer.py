"""Write the run's tokenizer next to the converted weights, as a Hugging Face fast tokenizer.

Training never adds BOS/EOS when tokenizing (EOD is appended by preprocessing), so the
exported tokenizer adds no special tokens either. ``tokenizer_class`` is
``PreTrainedTokenizerFast`` so transformers loads ``tokenizer.json`` verbatim instead of
rebuilding its pipeline from the model type.

A SentencePiece model is rebuilt as a ``tokenizers`` pipeline from its own settings
(``normalizer_spec`` and ``trainer_spec`` of the model proto), in SentencePiece's order:

1. the precompiled character map (``nmt_nfkc``, ``nfkc``, …; empty for ``identity``);
2. ``remove_extra_whitespaces``: spaces at both ends dropped, runs of spaces collapsed to one
   (only U+0020, after the map: ``nmt_nfkc`` has already turned tabs and newlines into spaces);
3. ``add_dummy_prefix``: one space in front of any non-empty text, whatever it starts with;
4. ``escape_whitespaces``: spaces become "▁".

The model is BPE (merges ranked by the score of the merged piece, which is how SentencePiece
picks the next merge) or Unigram (the piece scores), with ``byte_fallback`` from the trainer
spec. User-defined symbols are cut out of the normalised text by the pre-tokenizer and
emitted whole, so the dummy prefix is added once per text, as SentencePiece does. Control
symbols (``<s>``, ``</s>``) are never produced from text by SentencePiece, so the exported
tokenizer sets ``split_special_tokens`` and encodes their spelling as ordinary text.

An HF tokenizer directory is copied as is. ``verify`` checks either against the training
tokenizer, ids and decoded text, and the conversion refuses an export that differs.

Known differences that the probes do not contain (both need text few corpora have):
``tokenizers``' ``Precompiled`` replaces a whole grapheme by the mapping of its first
character, so a combining mark after a character that the map rewrites is lost (decomposed
"ﬁ\u0301", or NFD text; huggingface/tokenizers#2116); and with user-defined symbols, a text
between two of them that spells a piece exactly (``<s>`` right after ``<sep>``) is emitted as
that piece, where SentencePiece would merge it from characters.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Iterable

from megatron_mile.data.tokenizer import build_tokenizer, infer_tokenizer_type

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "added_tokens.json", "tokenizer.model")
# What normalisation, whitespace handling, byte fallback and special symbols disagree on.
PROBES = (
    "Hello world",
    " leading space", "  two leading spaces", "trailing space ", "trailing spaces   ",
    "repeated   inner    spaces", " ", "   ", "",
    "tab\tseparated\t\tcolumns", "\tleading tab", "line one\nline two\n\n", "\n\nnew lines",
    "windows\r\nline ends", "def f(x):\n\treturn x  + 1\n",
    "ligatures ﬁnd ﬂow ﬀ", "full width ＡＢＣ１２３ and\u3000ideographic space", "½ ① ㎏ Å ﬃ",
    "digits 12345 and ünïcödé", "emoji 😀 👩\u200d💻 🇩🇪",
    "unknown 𓀀 ꙮ \u0378 \U000e0041", "zero\u200bwidth and soft\u00adhyphen",
    "spelled specials <s> </s> <unk> <pad> <0x41>",
)
# SentencePiece piece types (sentencepiece_model.proto).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2
# Unigram scores for pieces SentencePiece never matches in text (unknown, control, byte, unused):
# far below any real piece, so the lattice only takes them where nothing else fits.
NEVER_SCORE = -1e9
MAX_LEADING_SPACES = 1 << 20  # "all of them" for decoders.Strip, which takes a count


class TokenizerExportError(ValueError):
    """The tokenizer cannot be exported faithfully; the message is one line."""


def _special_ids(path: str, tokenizer_type: str | None) -> tuple[int | None, int | None]:
    tok = build_tokenizer(path, tokenizer_type)
    return tok.bos, tok.eod


def load_model_proto(path: str):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as f:
        try:
            proto.ParseFromString(f.read())
        except Exception as err:  # protobuf's DecodeError
            raise TokenizerExportError(f"{path}: not a SentencePiece model ({err})") from None
    return proto


def bpe_merges(proto) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces, best merged-piece score first.

    SentencePiece's BPE repeatedly merges the adjacent pair whose concatenation is the
    highest-scoring piece, so a merge's rank is its result's score (ties: lower id).
    """
    normal = {p.piece: (-p.score, i) for i, p in enumerate(proto.pieces) if p.type == NORMAL}
    ranked = [(rank, piece[:k], piece[k:]) for piece, rank in normal.items()
              for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal]
    return [(left, right) for _, left, right in sorted(ranked)]


def _model(proto, path: str, whole_pieces: bool):
    from tokenizers import models

    trainer = proto.trainer_spec
    if trainer.model_type == BPE:
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
        # ignore_merges: a chunk that is a piece (an isolated user-defined symbol) is emitted whole.
        return models.BPE(vocab=vocab, merges=bpe_merges(proto), unk_token=trainer.unk_piece, fuse_unk=True,
                          byte_fallback=trainer.byte_fallback, ignore_merges=whole_pieces)
    if trainer.model_type == UNIGRAM:
        vocab = [(p.piece, p.score if p.type in (NORMAL, USER_DEFINED) else NEVER_SCORE)
                 for p in proto.pieces]
        return models.Unigram(vocab, trainer.unk_id, trainer.byte_fallback)
    raise TokenizerExportError(f"{path}: SentencePiece model type {trainer.model_type} is not supported "
                               "(only BPE and Unigram)")


def _normalizer(spec):
    from tokenizers import Regex, normalizers

    space = "\u2581" if spec.escape_whitespaces else " "
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"\A +"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))  # skips empty text, as SentencePiece does
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", space))
    if spec.remove_extra_whitespaces:
        # Last, as in SentencePiece: a "▁" typed in the text is trailing space too.
        steps.append(normalizers.Replace(Regex(f"{space}+\\z"), ""))
    return normalizers.Sequence(steps)


def _decoder(spec, byte_fallback: bool):
    from tokenizers import decoders

    steps = [decoders.Replace("\u2581", " ")] if spec.escape_whitespaces else []
    if byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    # SentencePiece drops the first piece's leading space (the dummy prefix); when it removes
    # extra whitespace, every leading space, since the text it encoded had none.
    if spec.remove_extra_whitespaces:
        steps.append(decoders.Strip(" ", MAX_LEADING_SPACES, 0))
    elif spec.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    return decoders.Sequence(steps)


def sentencepiece_tokenizer(path: str):
    """A ``tokenizers.Tokenizer`` that encodes like ``SentencePieceProcessor(path).encode``."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers

    proto = load_model_proto(path)
    if proto.trainer_spec.treat_whitespace_as_suffix:
        raise TokenizerExportError(f"{path}: treat_whitespace_as_suffix is not supported")
    user_defined = sorted((p.piece for p in proto.pieces if p.type == USER_DEFINED), key=len, reverse=True)
    tokenizer = Tokenizer(_model(proto, path, whole_pieces=bool(user_defined)))
    tokenizer.normalizer = _normalizer(proto.normalizer_spec)
    if user_defined:
        # Cut out of the normalised text (after the dummy prefix, as SentencePiece matches them),
        # longest first; nothing merges across them.
        pattern = "|".join(re.escape(piece) for piece in user_defined)
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), "isolated")
    tokenizer.decoder = _decoder(proto.normalizer_spec, proto.trainer_spec.byte_fallback)
    return tokenizer


def _write_sentencepiece(path: str, out_dir: str, max_length: int) -> None:
    import sentencepiece

    tokenizer = sentencepiece_tokenizer(path)
    sp = sentencepiece.SentencePieceProcessor(model_file=path)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    shutil.copy(path, os.path.join(out_dir, "tokenizer.model"))
    specials = {name: sp.id_to_piece(i) for name, i in
                (("unk_token", sp.unk_id()), ("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()),
                 ("pad_token", sp.pad_id())) if i >= 0}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "split_special_tokens": True,
              "model_max_length": max_length, **specials}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def _copy_hf_directory(path: str, out_dir: str, max_length: int) -> None:
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    for name in HF_TOKENIZER_FILES:
        if os.path.isfile(os.path.join(directory, name)):
            shutil.copy(os.path.join(directory, name), os.path.join(out_dir, name))
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    config = {}
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    # Older configs spell special tokens as {"content": ...}; transformers >= 5 wants strings.
    for key, value in config.items():
        if key.endswith("_token") and isinstance(value, dict) and "content" in value:
            config[key] = value["content"]
    # Without a class, transformers would pick the model type's tokenizer and rebuild its pipeline.
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    config.setdefault("model_max_length", max_length)
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def export_tokenizer(path: str, tokenizer_type: str | None, out_dir: str, max_length: int,
                     ) -> tuple[int | None, int | None]:
    """Write the tokenizer files into ``out_dir``; returns the (bos, eos) ids for config.json."""
    if not os.path.exists(path):
        raise TokenizerExportError(f"tokenizer not found: {path} (pass --tokenizer-model)")
    kind = tokenizer_type or infer_tokenizer_type(path)
    if kind == "sentencepiece":
        _write_sentencepiece(path, out_dir, max_length)
    else:
        _copy_hf_directory(path, out_dir, max_length)
    return _special_ids(path, tokenizer_type)


def verify(path: str, tokenizer_type: str | None, out_dir: str, texts: Iterable[str] = PROBES) -> None:
    """The exported tokenizer must give the training ids (no special tokens, as lm-eval encodes)
    and decode them to the training tokenizer's text (lm-eval decodes generated ids).

    Decoding is compared where the ids hold no unknown or special token: SentencePiece spells
    those " ⁇ " and "", Hugging Face by their names.
    """
    from transformers import AutoTokenizer

    reference = build_tokenizer(path, tokenizer_type)
    try:
        exported = AutoTokenizer.from_pretrained(out_dir)
    except (OSError, TypeError, ValueError) as err:
        raise TokenizerExportError(f"transformers cannot load the exported tokenizer: {str(err).splitlines()[0]}")
    named = set(exported.all_special_ids)
    for text in texts:
        want = reference.tokenize(text)
        # verbose=False: a probe longer than a tiny model's context is fine here.
        got = exported(text, add_special_tokens=False, verbose=False)["input_ids"]
        if got != want:
            first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise TokenizerExportError(f"exported tokenizer differs from the training tokenizer on {text[:60]!r}: "
                                       f"{got[first:first + 8]} vs {want[first:first + 8]} at token {first}")
        if named.isdisjoint(want):
            decoded, expected = exported.decode(want), reference.detokenize(want)
            if decoded != expected:
                raise TokenizerExportError(f"exported tokenizer decodes {text[:60]!r} as {decoded[:60]!r}, "
                                           f"the training tokenizer as {expected[:60]!r}")
