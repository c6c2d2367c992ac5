#!/usr/bin/env python
"""Train a LLaMA-style SentencePiece BPE tokenizer (byte fallback) on JSONL / .jsonl.zst / .jsonl.gz text.

  python tools/train_tokenizer.py --input data/demo/corpus.jsonl.zst --model-prefix data/demo/tokenizer \
      --vocab-size 4096

writes data/demo/tokenizer.model and .vocab. Ids: unk 0, bos 1, eos 2 (the EOD token), no pad.
Whitespace is kept as is (code indentation survives a round trip) and digits are split, as in LLaMA.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from typing import Iterator

if not __package__:  # run as a script from a checkout, not as megatron_mile.tools
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_mile.data.documents import lookup  # noqa: E402  (no megatron import: fast start)
from megatron_mile.data.jsonl import TruncatedInput, expand_inputs, read_blocks  # noqa: E402


def sentences(files: list[str], json_key: str, limit: int) -> Iterator[str]:
    """Non-empty lines of the documents' text, up to ``limit``; unusable lines are passed over."""
    count = 0
    for path in files:
        try:
            for block in read_blocks(path):
                for line in block.data.splitlines():
                    try:
                        text = lookup(json.loads(line), json_key)
                    except (ValueError, KeyError, TypeError):
                        continue
                    if not isinstance(text, str):
                        continue
                    for sentence in text.splitlines():
                        if sentence.strip():
                            yield sentence
                            count += 1
                            if count >= limit:
                                return
        except TruncatedInput:
            continue  # training on the readable part is fine; preprocess_data.py reports it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="JSONL files or globs")
    parser.add_argument("--json-key", default="text", help="dotted path of the text")
    parser.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--max-sentences", type=int, default=2_000_000, help="lines of text to train on")
    parser.add_argument("--character-coverage", type=float, default=0.9995)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)

    import sentencepiece

    try:
        files = expand_inputs(args.input)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    os.makedirs(os.path.dirname(os.path.abspath(args.model_prefix)), exist_ok=True)
    model = io.BytesIO()  # not model_prefix=: the model would embed the output path and differ per directory
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=sentences(files, args.json_key, args.max_sentences),
            model_writer=model,
            model_type="bpe",
            vocab_size=args.vocab_size,
            byte_fallback=True,
            character_coverage=args.character_coverage,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            num_threads=args.threads,
            minloglevel=2,
        )
    except RuntimeError as exc:
        print(f"error: sentencepiece training failed: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    processor = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = "".join(f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n"
                    for i in range(processor.get_piece_size()))
    # Temporary names, the .model last: its presence means training finished.
    for suffix, data in ((".vocab", vocab.encode("utf-8")), (".model", model.getvalue())):
        with open(args.model_prefix + suffix + ".partial", "wb") as f:
            f.write(data)
        os.replace(args.model_prefix + suffix + ".partial", args.model_prefix + suffix)
    print(args.model_prefix + ".model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
