"""Names from models, files and the store shown as literal text: never read as markdown or HTML."""
from __future__ import annotations

import re

_MARKDOWN = re.compile(r"([\\`*_{}\[\]()<>#+\-.!|~$:])")


def plain(text: object) -> str:
    """`text` with every markdown / HTML control character escaped, so st.markdown-like calls show it as typed."""
    return _MARKDOWN.sub(r"\\\1", str(text))
