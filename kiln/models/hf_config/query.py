"""The query string of `hf-config:TYPE?key=value&...`: which keys a config has, and values parsed.

Values parse as int, then float, then true/false, else string; commas make a list
(`depths=1,2`); dotted keys reach sub-configs (`hf-config:clip?vision_config.image_size=64`).
"""
from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any

from kiln.errors import KilnError


def squash(exc: BaseException, limit: int = 240) -> str:
    # Config validation errors put the useful part on their second line: keep the lines joined.
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."



def known_keys(cls) -> dict[str, Any]:
    """Settable config keys of `cls` -> their default (dataclasses.MISSING where none)."""
    if dataclasses.is_dataclass(cls):
        keys = {f.name: f.default for f in dataclasses.fields(cls)}
    else:
        params = inspect.signature(cls.__init__).parameters.values()
        keys = {p.name: p.default for p in params if p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self"}
    aliases = getattr(cls, "attribute_map", {}) or {}
    return keys | {alias: keys.get(target, dataclasses.MISSING) for alias, target in aliases.items()}


def canonical(cls, key: str) -> str:
    # Aliases (gpt2's hidden_size -> n_embd) must not fight the real name in kwargs.
    return (getattr(cls, "attribute_map", {}) or {}).get(key, key)



def fit_token_ids(cls, kwargs: dict, chosen: set) -> None:
    """Move special token ids that fall outside the tiny vocabulary back inside it.

    Out-of-range ids break embeddings whose padding_idx is the pad id (modernbert, whisper)
    and make transformers warn; `id % vocab` keeps equal ids equal and distinct ones distinct.
    """
    vocab = kwargs.get("vocab_size")
    if not isinstance(vocab, int) or vocab <= 0:
        return
    for key, default in known_keys(cls).items():
        if key.endswith("token_id") and key not in chosen and key == canonical(cls, key):
            value = kwargs.get(key, default)
            if isinstance(value, int) and not isinstance(value, bool) and value >= vocab:
                kwargs[key] = value % vocab


def suggest(name: str, known: dict) -> str:
    import difflib

    from transformers import PreTrainedConfig

    common = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    close = difflib.get_close_matches(name, list(known), n=3)
    own = [k for k in known if k not in common and not k.startswith("_") and k not in close][:8]
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return f"{hint}valid keys include {', '.join(own)}, ..."


# Config fields that are sizes or counts (layers, heads, widths): torch fails deep inside the
# build, or builds an empty model, when one is 0 or negative. Token ids, dropout, epsilons and
# window lengths (where -1 or 0 can mean "off") do not match.
_SIZE = re.compile(r"(^num_|^n_|_size$|_layers$|_heads$|_dim$|_dims$|_channels$|^d_model$|^d_ff$|^d_kv$"
                   r"|_ffn_dim$|^depths$|^max_position_embeddings$)")


def check_sizes(query: dict[str, str], spec: str) -> None:
    for key, text in query.items():
        values = [_scalar(part.strip()) for part in text.split(",")]
        if _SIZE.search(key.rpartition(".")[2]) and any(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v < 1 for v in values):
            raise KilnError(f"{spec}: {key}={text}: a size or count, it must be a positive integer")


def parse_value(key: str, text: str, default: Any, spec: str) -> Any:
    """int, then float, then true/false, else the string; commas make a list (depths=1,2)."""
    if not text.strip():
        raise KilnError(f"{spec}: empty value for {key}; expected a number, true/false or a string")
    if "," in text:
        return [_scalar(part.strip()) for part in text.split(",")]
    value = _scalar(text)
    if isinstance(default, (bool, int, float)) and isinstance(value, str):
        raise KilnError(f"{spec}: cannot parse {key}={text!r}: expected {type(default).__name__}")
    if isinstance(default, float) and type(value) is int:
        value = float(value)  # the config's strict validation refuses an int for a float field
    if isinstance(default, (list, tuple)):
        value = [value]  # depths=1 means a one-stage list
    return value


def _scalar(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)

