"""Names from models, files and the store shown as literal text: never read as markdown or HTML."""

from __future__ import annotations

import re

from sosp_engine.shown import terminal_text

# what makes links, images, HTML, emphasis, code, tables, maths and icons (`:material/x:`) anywhere
_INLINE = re.compile(r"([\\`*_{}\[\]<>!|~$:])")
# GFM turns bare http://..., www.... and a@b.c into links whatever is escaped: an invisible word joiner breaks them
_AUTOLINK = re.compile(r"(?i)(\b(?:https?|ftp|www|mailto)(?=\\?[:.])|@)")
WORD_JOINER = "\u2060"
_BLOCK = re.compile(r"(?m)^(\s*)([#+\-=]|\d+(?=[.)]))")  # headings, lists, rules at a line's start


def plain(text: object) -> str:
    """`text` with every markdown / HTML control character escaped, so st.markdown-like calls show it as typed."""
    escaped = _INLINE.sub(r"\\\1", terminal_text(text, keep_newlines=True))
    escaped = _AUTOLINK.sub(lambda m: m.group(1) + WORD_JOINER, escaped)
    return _BLOCK.sub(
        lambda m: m.group(0) + "\\" if m.group(2)[0].isdigit() else m.group(1) + "\\" + m.group(2), escaped
    )


_TAGS = str.maketrans({"<": "&lt;", ">": "&gt;"})
_TRACE_TEXT = ("name", "text", "hovertext", "x", "y", "customdata", "labels")


def _escaped(value: object) -> object:
    if isinstance(value, str):
        return value.translate(_TAGS)
    if isinstance(value, (list, tuple)) or getattr(getattr(value, "dtype", None), "kind", "") == "O":
        return [_escaped(v) for v in value]
    return value


def text_only(fig):
    """The figure with its titles, names, labels and category values shown as typed: plotly otherwise renders
    `<a href>`, `<b>`, ... in them (a run named `<a href=...>` would become a live link). Our own templates keep their
    markup; escaping twice changes nothing."""
    layout = fig.layout
    for text in [layout.title, layout.legend.title] + [
        getattr(layout, key).title for key in layout if key.startswith(("xaxis", "yaxis"))
    ]:
        if text is not None and isinstance(text.text, str):
            text.text = text.text.translate(_TAGS)
    for note in layout.annotations or ():
        note.text = _escaped(note.text)
    for trace in fig.data:
        for field in _TRACE_TEXT:
            if field in trace and trace[field] is not None:
                trace[field] = _escaped(trace[field])
    return fig


COMPACT_FROM = 10_000_000  # a metric tile shows about 10 characters before it cuts a number off
_UNITS = ((1e12, "T"), (1e9, "G"), (1e6, "M"))


def count_text(n: int) -> str:
    """A count as a metric tile shows it whole: with separators below ten million, else three significant digits and
    a unit ('1.81 G' for 1,813,562,368); the exact count goes in the tile's help."""
    if abs(n) < COMPACT_FROM:
        return f"{n:,}"
    scale, unit = next((scale, unit) for scale, unit in _UNITS if abs(n) >= scale)
    return f"{n / scale:.3g} {unit}"
