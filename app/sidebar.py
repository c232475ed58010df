"""The sidebar every page shows: the active model, data set and compute device."""
import streamlit as st

from app.state import current_choice
from sosp_engine.devices import device_name


@st.cache_data
def _device_label() -> str:
    return device_name("auto")


def render_sidebar() -> None:
    choice = current_choice()
    with st.sidebar:
        st.markdown("### SOSP Lab")
        st.caption("Second-order structured pruning and bottleneck analysis")
        st.markdown(f"**Model** `{choice.model_spec}`  \n**Weights** {choice.weights or 'random init'}  \n"
                    f"**Data** `{choice.data_spec}`  \n**Device** {_device_label()}")
