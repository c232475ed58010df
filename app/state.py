"""Session state shared by the pages: the chosen model, weights and data spec, and cached engine objects."""
from __future__ import annotations

from dataclasses import dataclass

import streamlit as st

from sosp_engine.loading import Workbench, open_workbench

DEFAULT_MODEL = "resnet20"
DEFAULT_DATA = "digits"


@dataclass(frozen=True)
class ModelChoice:
    """What the user picked on the Model page."""

    model_spec: str = DEFAULT_MODEL
    data_spec: str = DEFAULT_DATA
    weights: str | None = None


def current_choice() -> ModelChoice:
    """The model choice of this browser session (the demo model until the user picks another)."""
    return st.session_state.setdefault("model_choice", ModelChoice())


def set_choice(choice: ModelChoice) -> None:
    st.session_state["model_choice"] = choice


@st.cache_resource(show_spinner="Building the model and finding its prunable structures ...", max_entries=8)
def cached_workbench(model_spec: str, data_spec: str, weights: str | None) -> Workbench:
    """The engine's workbench for a choice, built once per (model, data, weights)."""
    return open_workbench(model_spec, data_spec, weights)
