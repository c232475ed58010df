"""Turn the engine's errors into an st.error that says what happened and what to do, never a traceback."""

from __future__ import annotations

import time
import traceback
from contextlib import contextmanager
from typing import Iterator

import streamlit as st
import torch

from app.text import plain

from sosp_engine.errors import SospError, one_line_error


@contextmanager
def user_errors(action: str, stop: bool = True) -> Iterator[None]:
    """Run a UI action; a bad input or an out-of-memory becomes an st.error (and stops the page if `stop`)."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        st.error(
            f"{plain(action)} ran out of GPU memory. Lower the number of samples N' or the batch size, "
            "or pick the CPU as device."
        )
    except (SospError, ValueError, OSError) as exc:
        st.error(f"{plain(action)} failed: {plain(exc)}")
    except Exception as exc:  # unforeseen: one line on the page, the traceback in the workspace's log
        unexpected(action, exc)
    else:
        return
    if stop:
        st.stop()


def unexpected(action: str, exc: BaseException) -> None:
    """Show an unforeseen error as one st.error line; the traceback goes to <workspace>/logs/ui-errors.log."""
    from app.state import workspace

    try:
        log = workspace().root / "logs" / "ui-errors.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as fh:
            fh.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {action}\n{traceback.format_exc()}\n")
        where = f"The details are in {log}."
    except OSError:
        where = "The details could not be written to the workspace's log."
    st.error(
        f"{plain(action)} failed unexpectedly: {plain(one_line_error(exc))}. {plain(where)} "
        "Stored runs are not affected."
    )
