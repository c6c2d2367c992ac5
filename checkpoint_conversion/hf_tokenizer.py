"""Write the run's tokenizer next to the converted weights, as a Hugging Face fast tokenizer.

Training never adds BOS/EOS when tokenizing (EOD is appended by preprocessing), so the
exported tokenizer adds no special tokens either. ``tokenizer_class`` is
``PreTrainedTokenizerFast`` so transformers loads ``tokenizer.json`` verbatim instead of
rebuilding its pre-tokenizer from the model type.

A SentencePiece model is converted through transformers, then its normalisation is
pinned to SentencePiece's own: one "▁" is always prepended (``add_dummy_prefix``) and
spaces become "▁". transformers' Llama conversion (Metaspace, prepend only when the text
does not already start with a space) tokenises leading spaces differently. ``verify``
checks the result against the training tokenizer on probe strings.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from megatron_mile.data.tokenizer import build_tokenizer, infer_tokenizer_type

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "added_tokens.json", "tokenizer.model")
PROBES = ("Hello world", " leading space", "  two leading spaces", "def f(x):\n\treturn x  + 1\n",
          "digits 12345 and ünïcödé 😀", "\n\nnew lines", "trailing space ")


class TokenizerExportError(ValueError):
    """The tokenizer cannot be exported faithfully; the message is one line."""


def _special_ids(path: str, tokenizer_type: str | None) -> tuple[int | None, int | None]:
    tok = build_tokenizer(path, tokenizer_type)
    return tok.bos, tok.eod


def _sentencepiece_to_fast(model_path: str, out_dir: str, max_length: int) -> None:
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import normalizers, processors
    from transformers import AutoTokenizer

    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
    specials = {name: sp.id_to_piece(i) for name, i in
                (("unk_token", sp.unk_id()), ("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()))
                if i >= 0}
    with tempfile.TemporaryDirectory() as scratch:
        shutil.copy(model_path, os.path.join(scratch, "tokenizer.model"))
        with open(os.path.join(scratch, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
                       **specials}, f)
        backend = AutoTokenizer.from_pretrained(scratch).backend_tokenizer
    steps = [normalizers.Replace(" ", "\u2581")]
    if proto.normalizer_spec.add_dummy_prefix:
        steps.insert(0, normalizers.Prepend("\u2581"))
    backend.normalizer = normalizers.Sequence(steps)
    backend.pre_tokenizer = None
    backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    backend.save(os.path.join(out_dir, "tokenizer.json"))
    shutil.copy(model_path, os.path.join(out_dir, "tokenizer.model"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
                   "clean_up_tokenization_spaces": False, "model_max_length": max_length, **specials}, f, indent=2)


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
        _sentencepiece_to_fast(path, out_dir, max_length)
    else:
        _copy_hf_directory(path, out_dir, max_length)
    return _special_ids(path, tokenizer_type)


def verify(path: str, tokenizer_type: str | None, out_dir: str) -> None:
    """The exported tokenizer must give the training ids (no special tokens, as lm-eval encodes)."""
    from transformers import AutoTokenizer

    reference = build_tokenizer(path, tokenizer_type)
    try:
        exported = AutoTokenizer.from_pretrained(out_dir)
    except (OSError, TypeError, ValueError) as err:
        raise TokenizerExportError(f"transformers cannot load the exported tokenizer: {str(err).splitlines()[0]}")
    for text in PROBES:
        want = reference.tokenize(text)
        # verbose=False: a probe longer than a tiny model's context is fine here.
        got = exported(text, add_special_tokens=False, verbose=False)["input_ids"]
        if got != want:
            raise TokenizerExportError(f"exported tokenizer differs from the training tokenizer on {text!r}: "
                                       f"{got[:8]} vs {want[:8]}")
