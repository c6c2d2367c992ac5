"""Dataset blends: Megatron-LM ``[weight] prefix ...`` lists, or blend JSON files made from a manifest.

A blend JSON (``tools/make_blend.py``) looks like::

    {"format": "megatron-mile-blend/1",
     "train":   {"prefixes": ["pile_ArXiv_text_document", ...], "weights": [0.12, ...]},
     "eval":    {"prefixes": [...same or separate validation data...], "weights": [...]},
     "domains": {"ArXiv": "pile_ArXiv_text_document", ...}}

Relative prefixes are resolved against the directory of the JSON file that names them.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

from megatron_mile.data.errors import DataError

BLEND_FORMAT = "megatron-mile-blend/1"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Blend:
    """Train and eval blends over the same or separate prefixes, plus domain → prefix for per-domain eval."""

    train_prefixes: list[str]
    train_weights: Optional[list[float]]  # None: megatron-core weighs by dataset size
    eval_prefixes: list[str]
    eval_weights: Optional[list[float]]
    domains: dict[str, str] = field(default_factory=dict)


def _resolve(prefix: str, base_dir: str) -> str:
    return prefix if os.path.isabs(prefix) else os.path.normpath(os.path.join(base_dir, prefix))


def check_prefix(prefix: str, where: str) -> None:
    """A usable prefix has a ``.bin``/``.idx`` pair holding at least one token."""
    if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
        raise DataError(f"{where}: dataset {prefix!r} not found (need {prefix}.bin and {prefix}.idx)")
    if os.path.getsize(prefix + ".bin") == 0:
        raise DataError(f"{where}: dataset {prefix!r} is empty (no tokens)")


def _normalize(weights: list[float], where: str) -> list[float]:
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise DataError(f"{where}: weights must be non-negative with a positive sum, got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


def _parse_megatron_list(data_path: list[str]) -> tuple[list[str], Optional[list[float]]]:
    """``["a"]``, ``["a", "b"]`` (weights from sizes) or ``["0.3", "a", "0.7", "b"]``."""

    def is_number(s: str) -> bool:
        try:
            float(s)
            return True
        except ValueError:
            return False

    numeric = [is_number(s) for s in data_path]
    if not any(numeric):
        return list(data_path), None
    if len(data_path) % 2 or numeric[0::2] != [True] * (len(data_path) // 2) or any(numeric[1::2]):
        raise DataError(f"--data-path {' '.join(data_path)}: expected 'prefix ...' or 'weight prefix ...' pairs")
    weights = [float(w) for w in data_path[0::2]]
    return list(data_path[1::2]), _normalize(weights, "--data-path")


def _load_blend_json(path: str) -> Blend:
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read blend JSON ({exc})") from None
    if not isinstance(spec, dict) or spec.get("format") != BLEND_FORMAT:
        raise DataError(f"{path}: not a blend file (expected \"format\": \"{BLEND_FORMAT}\"; "
                        "make one with tools/make_blend.py)")
    base = os.path.dirname(os.path.abspath(path))
    parts = {}
    for name in ("train", "eval"):
        part = spec.get(name)
        if not isinstance(part, dict) or not part.get("prefixes"):
            raise DataError(f"{path}: missing or empty '{name}.prefixes'")
        prefixes = [_resolve(p, base) for p in part["prefixes"]]
        weights = part.get("weights")
        if weights is not None:
            if len(weights) != len(prefixes):
                raise DataError(f"{path}: '{name}' has {len(prefixes)} prefixes but {len(weights)} weights")
            weights = _normalize([float(w) for w in weights], f"{path} '{name}'")
        parts[name] = (prefixes, weights)
    domains = {d: _resolve(p, base) for d, p in (spec.get("domains") or {}).items()}
    return Blend(*parts["train"], *parts["eval"], domains=domains)


def load_blend(data_path: list[str]) -> Blend:
    """Parse and check a blend; any missing or empty prefix raises DataError with one clear line."""
    if isinstance(data_path, str):
        data_path = [data_path]
    if not data_path:
        raise DataError("--data-path: no dataset given")
    if len(data_path) == 1 and data_path[0].endswith(".json"):
        blend = _load_blend_json(data_path[0])
        where = data_path[0]
    else:
        prefixes, weights = _parse_megatron_list(data_path)
        blend = Blend(prefixes, weights, prefixes, weights)
        where = "--data-path"
    for prefix in dict.fromkeys(blend.train_prefixes + blend.eval_prefixes + list(blend.domains.values())):
        check_prefix(prefix, where)
    return blend


# Sampling weights shipped with the package: pile (the paper's 22 Pile domains) and demo.
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def shipped_weights() -> list[str]:
    return sorted(name.removesuffix("_sampling_rates.json") for name in os.listdir(CONFIGS_DIR)
                  if name.endswith("_sampling_rates.json"))


def weights_file(spec: str) -> str:
    """A weights file's path: ``spec`` itself, or for a bare name such as ``pile`` the shipped file."""
    if not os.path.exists(spec) and spec in shipped_weights():
        return os.path.join(CONFIGS_DIR, f"{spec}_sampling_rates.json")
    return spec


def read_weights(path: str) -> tuple[dict[str, float], dict[str, float]]:
    """Train and eval domain weights from ``{"train_domain_weights": .., "eval_domain_weights": ..}``.

    A flat ``{domain: weight}`` file gives the same weights for both.
    """
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read weights ({exc})") from None
    if isinstance(spec, dict) and "train_domain_weights" in spec:
        train = spec["train_domain_weights"]
        evals = spec.get("eval_domain_weights", train)
    else:
        train = evals = spec
    for name, weights in (("train", train), ("eval", evals)):
        if not isinstance(weights, dict) or not all(isinstance(v, (int, float)) for v in weights.values()):
            raise DataError(f"{path}: {name} weights must map domain names to numbers")
    return {k: float(v) for k, v in train.items()}, {k: float(v) for k, v in evals.items()}


def read_manifest(path: str) -> dict[str, dict]:
    """Domain → {"prefix" (absolute), "documents", "tokens"} from a preprocessing manifest."""
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        domains = manifest["domains"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a preprocessing manifest ({exc})") from None
    base = os.path.dirname(os.path.abspath(path))
    return {d: dict(entry, prefix=_resolve(entry["prefix"], base)) for d, entry in domains.items()}


def _domain_weights(weights: Optional[dict[str, float]], available: list[str], source: str,
                    manifest: str) -> tuple[list[float], tuple[tuple[str, ...], float]]:
    """One weight per available domain; unknown weighted domains are errors, unweighted ones get the mean.

    Also returns the unweighted domains and the mean they got, for the caller's warning.
    """
    if weights is None:
        return [1.0] * len(available), ((), 1.0)
    missing_data = sorted(set(weights) - set(available))
    if missing_data:
        raise DataError(f"{source}: weights name domain(s) with no data in {manifest}: {', '.join(missing_data)}")
    known = [weights[d] for d in available if d in weights]
    default = sum(known) / len(known) if known else 1.0
    unweighted = tuple(d for d in available if d not in weights)
    return [weights.get(d, default) for d in available], (unweighted, default)


def _warn_unweighted(source: str, unweighted: dict[str, tuple[tuple[str, ...], float]]) -> None:
    """One warning per distinct case: train and eval usually miss the same domains (a flat weights file)."""
    for case in dict.fromkeys(case for case in unweighted.values() if case[0]):
        domains, default = case
        parts = " or ".join(name for name, other in unweighted.items() if other == case)
        logger.warning("%s: no %s weight for %s; using the mean weight %.4g", source, parts, ", ".join(domains), default)


def make_blend(manifest_path: str, weights_path: Optional[str] = None,
               eval_manifest_path: Optional[str] = None) -> dict:
    """Blend JSON content (absolute prefixes) from a manifest and an optional weights file
    (a path, or a shipped name: see ``weights_file``).

    Without weights every domain weighs the same. Domains of the manifest missing from the weights
    get the mean weight (a warning is logged); weighted domains missing from the manifest are errors.
    With ``eval_manifest_path`` (e.g. the Pile's val.jsonl.zst), validation uses that data instead
    of a held-out split of the training data.
    """
    train_domains = read_manifest(manifest_path)
    eval_domains = read_manifest(eval_manifest_path) if eval_manifest_path else train_domains
    weights_path = weights_file(weights_path) if weights_path else None
    train_w, eval_w = read_weights(weights_path) if weights_path else (None, None)

    unweighted: dict[str, tuple[tuple[str, ...], float]] = {}

    def part(name: str, domains: dict[str, dict], weights, manifest: str) -> dict:
        available = sorted(d for d, e in domains.items() if e["documents"] > 0 and e["tokens"] > 0)
        values, unweighted[name] = _domain_weights(weights, available, weights_path or "uniform weights", manifest)
        chosen = [(d, w) for d, w in zip(available, values) if w > 0]
        if not chosen:
            raise DataError(f"{manifest}: no domain with data and a positive weight")
        total = sum(w for _, w in chosen)
        return {"prefixes": [domains[d]["prefix"] for d, _ in chosen],
                "weights": [w / total for _, w in chosen], "domains": [d for d, _ in chosen]}

    train = part("train", train_domains, train_w, manifest_path)
    evals = part("eval", eval_domains, eval_w, eval_manifest_path or manifest_path)
    _warn_unweighted(weights_path or "uniform weights", unweighted)
    return {
        "format": BLEND_FORMAT,
        "train": train,
        "eval": evals,
        "domains": {d: eval_domains[d]["prefix"] for d in evals["domains"]},
    }


def write_blend(blend: dict, path: str) -> None:
    """Write with prefixes relative to the blend file, so the data directory can be moved as a whole."""
    base = os.path.dirname(os.path.abspath(path))

    def rel(p: str) -> str:
        return os.path.relpath(p, base)

    out = dict(blend)
    for name in ("train", "eval"):
        out[name] = dict(blend[name], prefixes=[rel(p) for p in blend[name]["prefixes"]])
    out["domains"] = {d: rel(p) for d, p in blend["domains"].items()}
    os.makedirs(base, exist_ok=True)
    with open(path + ".partial", "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    os.replace(path + ".partial", path)
