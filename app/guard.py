"""Turn the engine's errors into an st.error that says what happened and what to do, never a traceback."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import streamlit as st
import torch

from sosp_engine.errors import SospError


@contextmanager
def user_errors(action: str, stop: bool = True) -> Iterator[None]:
    """Run a UI action; a bad input or an out-of-memory becomes an st.error (and stops the page if `stop`)."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        st.error(f"{action} ran out of GPU memory. Lower the number of samples N' or the batch size, or pick the CPU as device.")
    except (SospError, ValueError, OSError) as exc:
        st.error(f"{action} failed: {exc}")
    else:
        return
    if stop:
        st.stop()
