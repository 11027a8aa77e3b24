"""Model specs: one grammar for the CLI, TOML configs and Python.

    zoo:NAME                          a model of kiln's zoo (`kiln models`)
    hf:PATH                           a local Hugging Face directory, loaded offline
    hf-config:TYPE[?key=value&...]    any transformers architecture from its config
    py:FILE.py:FACTORY                a user's factory returning a module (and inputs)
    preset:NAME[?key=value&...]       a published configuration at full size (kiln.models.presets)
"""
from __future__ import annotations

from urllib.parse import parse_qsl

from kiln.errors import KilnError
from kiln.models.hf import load_hf_dir
from kiln.models.hf_config import load_hf_config
from kiln.models.loaded import LoadedModel
from kiln.models.presets import load_preset
from kiln.models.pyfactory import load_factory
from kiln.models.zoo import load_zoo

ACCEPTED = "zoo:NAME, hf:PATH, hf-config:MODEL_TYPE[?key=value&...], py:FILE.py:FACTORY, preset:NAME"


def parse_query(spec: str, query: str) -> dict[str, str]:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise KilnError(f"bad query string {query!r} in {spec}: expected key=value&key=value") from None
    return dict(pairs)


def load(spec: str) -> LoadedModel:
    """Load a model spec into a LoadedModel (`.model`, `.example_inputs`, `.example_kwargs`)."""
    scheme, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise KilnError(f"unknown model spec {spec!r}; accepted: {ACCEPTED}")
    if scheme == "zoo":

        return load_zoo(rest)
    if scheme == "hf":

        return load_hf_dir(rest, spec)
    if scheme == "hf-config":

        model_type, _, query = rest.partition("?")
        return load_hf_config(model_type, parse_query(spec, query), spec)
    if scheme == "py":

        return load_factory(rest, spec)
    if scheme == "preset":
        name, _, query = rest.partition("?")
        return load_preset(name, parse_query(spec, query), spec)
    raise KilnError(f"unknown model spec scheme {scheme + ':'!r} in {spec!r}; accepted: {ACCEPTED}")
