"""Form widgets read from the engine's option declarations: a widget per option (its title, help, range, choices and
default from the declaration), and the config the form's values give."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable

import streamlit as st

from app.state import kept
from app.text import plain
from sosp_engine.experiments.front_ends import not_offered
from sosp_engine.options import NONE_WORD, Option, option_named, options_of

BROWSER_LARGEST_INT = 2**53 - 1


def option_input(
    container: Any,
    cls: type,
    name: str,
    prefix: str,
    labels: Callable[[Any], str] | None = None,
    default: Any = ...,
) -> None:
    """Draw the widget of option `name` of config class `cls` in `container` (`default`: the page's own, else the
    declared one); its value is kept under `prefix`."""
    option = option_named(cls, name)
    option = replace(option, default=option.default if default is ... else default)
    key = kept(f"{prefix}-{name}", _shown(option, option.default))
    common = {"label": option.title, "key": key, "help": option.described()}
    if option.kind is bool:
        container.toggle(**common)
    elif option.choices:
        container.selectbox(options=option.choices, format_func=labels or str, **common)
    elif option.nullable or option.words or option.kind is tuple:
        container.text_input(**common)  # a number, a word ("auto", "none") or a list: read by the declaration
    elif option.kind in (int, float):
        # closed bounds only: an open one (a learning rate above 0) is checked by the declaration when submitted
        low = None if option.low is None or option.low_open else option.kind(option.low)
        high = None if option.high is None or option.high_open else option.kind(option.high)
        if option.kind is int:  # the browser holds numbers as doubles
            high = min(high, BROWSER_LARGEST_INT) if high is not None else None
            container.number_input(min_value=low, max_value=high, step=1, **common)
        else:  # a step and a format of the default's own scale: a weight decay of 1e-4 shows as 0.0001, not 0.00
            step = 10.0 ** math.floor(math.log10(abs(option.default))) if option.default else 0.01
            container.number_input(min_value=low, max_value=high, step=step, format="%g", **common)
    else:
        container.text_input(**common)


def more_options(
    container: Any, cls: type, front_end: str, laid_out: set[str], prefix: str, label: str
) -> None:
    """An expander with a widget for every declared option of `cls` the page neither laid out nor leaves out (so a
    new option reaches the form), and the reviewed list of those it leaves out, with the reasons."""
    skipped = not_offered(cls, front_end)
    with container.expander(plain(label)):
        for option in options_of(cls):
            if option.name not in laid_out and option.name not in skipped:
                option_input(st, cls, option.name, prefix)
        if skipped:
            reasons = "; ".join(f"{o.title}: {skipped[o.name]}" for o in options_of(cls) if o.name in skipped)
            st.caption(plain(f"Not offered here: {reasons}."))


def form_values(cls: type, prefix: str, names: set[str] | None = None) -> dict[str, Any]:
    """The values of the form's widgets for `cls`'s options (those in `names`, or all drawn), read as declared;
    a text that does not parse raises ValueError naming the option."""
    values = {}
    for option in options_of(cls):
        key = f"{prefix}-{option.name}"
        if (names is not None and option.name not in names) or key not in st.session_state:
            continue
        values[option.name] = _read(option, st.session_state[key])
    return values


def show_values(config: object, prefix: str, names: set[str]) -> None:
    """Put the values of `config`'s options in `names` into their widgets (drawn afterwards with `option_input`)."""
    for option in options_of(type(config)):
        if option.name in names:
            st.session_state[f"{prefix}-{option.name}"] = _shown(option, getattr(config, option.name))


def _shown(option: Option, value: Any) -> Any:
    """A value as its widget holds it (text for the options typed as text)."""
    if option.kind is tuple:
        return " ".join(map(str, value))
    if option.nullable or option.words:
        return NONE_WORD if value is None else str(value)
    return value


def _read(option: Option, shown: Any) -> Any:
    try:
        if option.kind is tuple:
            return tuple(option.item(part) for part in str(shown).replace(",", " ").split())
        if option.nullable or option.words:
            return option.parse(str(shown).strip())
    except ValueError as exc:
        raise ValueError(f"{option.title} {exc}") from None
    return option.kind(shown) if option.kind in (int, float) else shown
