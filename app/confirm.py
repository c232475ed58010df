"""Confirmations of destructive actions: each box confirms one action on one target, once."""

from __future__ import annotations

import streamlit as st


def _key(action: str, target: str) -> str:
    done = st.session_state.get(("confirmations-used", action, target), 0)
    return f"confirm-{action}-{target}-{done}"


def confirmation(label: str, action: str, target: str, where=st) -> bool:
    """A checkbox confirming `action` on `target`. Another target gets a box of its own (unticked), and a box that was
    used is replaced by a fresh one (see `confirmation_used`), so a tick never carries over to a second action."""
    return where.checkbox(label, key=_key(action, target))


def confirmation_used(action: str, target: str) -> None:
    """The confirmed action ran: the next run draws an unticked box for it."""
    used = ("confirmations-used", action, target)
    st.session_state[used] = st.session_state.get(used, 0) + 1
