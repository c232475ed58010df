"""Session state and cached engine objects shared by the pages: the chosen model, the workspace, stored analyses."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from sosp_engine.saliency.analysis import AnalysisResult
from app.text import plain
from sosp_engine.errors import SospError
from sosp_engine.nets import read_checkpoint
from sosp_engine.nets.setup import ModelSetup
from sosp_engine.pruning.workbench import Workbench, open_workbench
from sosp_engine.pruning.pruned_models import recipe_of
from sosp_engine.nets import is_user_code
from sosp_engine.runs.records import load_stored_analysis
from sosp_engine.runs.store import Store, default_workspace

DEFAULT_MODEL = "resnet20"
DEFAULT_DATA = "digits"
DEMO_WEIGHTS = str(Path(__file__).resolve().parent.parent / "assets" / "demo" / "resnet20-digits.pt")


def demo_setup() -> ModelSetup:
    """The demo the dashboard opens on: ResNet-20 on digits with the trained checkpoint ("after training" views work
    from the first start)."""
    return ModelSetup(DEFAULT_MODEL, DEFAULT_DATA, DEMO_WEIGHTS)


def current_choice() -> ModelSetup:
    """The model setup of this browser session (the demo model until the user picks another).

    It is mirrored in the page's URL (?model=&data=&weights=), so a browser reload keeps it.
    """
    if "model_choice" not in st.session_state:
        params = st.query_params
        default = demo_setup()
        st.session_state["model_choice"] = ModelSetup(
            params.get("model", default.model_spec),
            params.get("data", default.data_spec),
            params.get("weights", default.weights or "")
            or (None if "weights" in params else default.weights),
        )
    return st.session_state["model_choice"]


def set_choice(choice: ModelSetup) -> None:
    st.session_state["model_choice"] = choice
    st.query_params.update(model=choice.model_spec, data=choice.data_spec, weights=choice.weights or "")


@st.cache_resource(show_spinner="Building the model and finding its prunable structures ...", max_entries=8)
def setup_workbench(setup: ModelSetup) -> Workbench:
    """The engine's workbench for a setup, built once per setup (the whole setup is the key: no field is dropped)."""
    return open_workbench(setup)


def code_confirmed(spec: str, what: str) -> bool:
    """Whether this session confirmed the user code `spec` names; if not, a warning and 'Run this code' are shown.

    Nothing of a user's file is imported before this returns True: a link, a stored analysis or job, or a typed spec
    only names the code; the click in this session is the consent.
    """
    trusted = st.session_state.setdefault("confirmed_specs", set())
    if not is_user_code(spec) or spec in trusted:
        return True
    st.warning(
        plain(
            f"{what} names user code: {spec}. Running it imports and runs that Python file with your "
            "rights. Run it only if you trust it."
        ),
        icon=":material/warning:",
    )
    if st.button("Run this code", key=f"trust-{spec}"):
        trusted.add(spec)
        st.rerun()
    return False


def require_code_confirmed(spec: str, what: str) -> None:
    """Stop the page here until this session confirms the user code `spec` names (see `code_confirmed`)."""
    if not code_confirmed(spec, what):
        st.stop()


def workbench(choice: ModelSetup) -> Workbench:
    """The workbench of the Model page's choice, built only once any user code it names is confirmed."""
    require_code_confirmed(choice.model_spec, "This model spec")
    return setup_workbench(choice)


def workbench_for(result: AnalysisResult) -> Workbench:
    """The workbench an analysis was made on (its model spec, data, weights and exclusions).

    A stored spec that names user code runs only after this session confirms that very spec.
    """
    setup = result.config.setup
    require_code_confirmed(setup.model_spec, "This analysis")
    return setup_workbench(result.opening_setup())


@st.cache_data(max_entries=32)
def _pruned_checkpoint(path: str, modified: float) -> bool:
    try:
        return recipe_of(read_checkpoint(path)) is not None
    except SospError:
        return False


def is_pruned_checkpoint(path: str | None) -> bool:
    """Whether `path` holds a pruned checkpoint (read once per file version, weights_only; runs no code)."""
    if not path or not Path(path).is_file():
        return False
    return _pruned_checkpoint(path, Path(path).stat().st_mtime)


@st.cache_resource
def _store(root: str) -> Store:
    return Store(root)


def workspace() -> Store:
    """The run store of the active workspace ($SOSP_WORKSPACE or ./workspace)."""
    return _store(str(default_workspace().resolve()))


@st.cache_resource(max_entries=32)
def cached_analysis(root: str, record_id: str) -> AnalysisResult:
    """A stored analysis, read from disk once."""
    return load_stored_analysis(Store(root), record_id)


def analysis(record_id: str) -> AnalysisResult:
    return cached_analysis(str(workspace().root.resolve()), record_id)


KEPT = "kept_widget_values"


def kept(key: str, default: object) -> str:
    """A widget key whose value survives a visit to another page (Streamlit drops the state of widgets a page run
    does not draw): the value is copied aside every run and put back when the page is drawn again. The widget then
    takes its value from the session state only: pass no default to it."""
    store = st.session_state.setdefault(KEPT, {})
    if key in st.session_state:
        store[key] = st.session_state[key]
    else:
        st.session_state[key] = store.get(key, default)
    return key
