"""Fills kernel templates with validated values: the only way values reach generated source.

Entry points: render(template_text, values), load_template(name), kernel_source(template
name, symbol prefix, values), Int/Ident checks.
Template placeholders are written @NAME@; every placeholder must be given and every value
must be an int (within its declared range), a bool, an identifier from a fixed set, or a
tuple of ints (rendered as a C++ brace list: a table the kernel reads, e.g. a row program).
"""
from __future__ import annotations

import hashlib
import pathlib
import re

_PLACEHOLDER = re.compile(r"@([A-Z][A-Z0-9_]*)@")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TEMPLATE_DIR = pathlib.Path(__file__).parent


class RenderError(ValueError):
    """A value that may not go into generated source."""


def load_template(name: str) -> str:
    """Text of a template file next to this module (e.g. "conv2d.cc")."""
    return (_TEMPLATE_DIR / name).read_text()


def kernel_source(template_name: str, prefix: str, values: dict):
    """The runtime.KernelSource of template_name filled with values (which hold
    WORKSPACE_BYTES). The symbol, prefix + 16 hex digits, hashes exactly what reaches the
    source (the values and the template), so value sets that render the same kernel (a
    matmul's kc >= K, say) share one build."""
    from alt_jax import runtime

    template = load_template(template_name)
    digest = hashlib.sha256(repr((sorted(values.items()), template)).encode()).hexdigest()
    symbol = f"{prefix}_{digest[:16]}"
    code = render(template, {"SYMBOL": symbol, **values})
    return runtime.KernelSource(symbol, code, values["WORKSPACE_BYTES"])


def _source_text(key: str, value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if not -(2**62) <= value <= 2**62:
            raise RenderError(f"@{key}@={value} is out of the int64 range kernels accept")
        return str(value)
    if isinstance(value, str) and _IDENT.match(value):
        return value
    if isinstance(value, tuple) and value and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return "{" + ", ".join(_source_text(key, v) for v in value) + "}"
    raise RenderError(
        f"@{key}@={value!r}: only ints, bools, identifiers and non-empty tuples of ints may "
        f"be rendered into source")


def render(template: str, values: dict) -> str:
    """Substitute @KEY@ placeholders; unknown or missing keys are errors, not silent."""
    needed = set(_PLACEHOLDER.findall(template))
    given = set(values)
    if needed - given:
        raise RenderError(f"template placeholders without a value: {sorted(needed - given)}")
    if given - needed:
        raise RenderError(f"values for placeholders the template lacks: {sorted(given - needed)}")
    texts = {k: _source_text(k, v) for k, v in values.items()}
    return _PLACEHOLDER.sub(lambda m: texts[m.group(1)], template)


def check_int(name: str, value, lo: int, hi: int) -> int:
    """Validate one knob or shape value before it is rendered."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise RenderError(f"{name} must be an int, got {value!r}")
    if not lo <= value <= hi:
        raise RenderError(f"{name}={value} is outside [{lo}, {hi}]")
    return value
