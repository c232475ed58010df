"""Model page: choose a model, weights and data set; see its prunable groups, structures, parameters and MACs."""
import streamlit as st

from app.state import ModelChoice, cached_workbench, current_choice, set_choice
from sosp_engine.errors import SospError
from sosp_engine.masks import layer_table, mask_summary
from sosp_engine.models import USER_CODE_WARNING, is_user_code

st.title("Model")
choice = current_choice()
with st.form("model_form"):
    cols = st.columns([2, 2, 2])
    model_spec = cols[0].text_input("Model spec", choice.model_spec,
                                    help="resnet20/32/56/110 (x2, :widths=16,32,128), vgg19, densenet40, torchvision:NAME, or path/file.py:factory")
    data_spec = cols[1].text_input("Data spec", choice.data_spec, help="digits, cifar10:PATH, cifar100:PATH, imagefolder:PATH, synthetic:C,H,W:K")
    weights = cols[2].text_input("Weights (checkpoint path, empty = random init)", choice.weights or "")
    if is_user_code(model_spec):
        st.warning(USER_CODE_WARNING)
    if st.form_submit_button("Load model", type="primary"):
        choice = ModelChoice(model_spec.strip(), data_spec.strip(), weights.strip() or None)
        set_choice(choice)

try:
    workbench = cached_workbench(choice.model_spec, choice.data_spec, choice.weights)
except SospError as exc:
    st.error(f"{exc}")
    st.info("Fix the spec above and press 'Load model'. The demo is model `resnet20` on data `digits`.")
    st.stop()

summary = mask_summary(workbench.structures)
metrics = st.columns(5)
metrics[0].metric("Prunable layers", len(workbench.structures.layers))
metrics[1].metric("Structures", f"{summary['structures']:,}")
metrics[2].metric("Parameters", f"{summary['params_before']:,}")
metrics[3].metric("MACs / sample", f"{summary['macs_before']:,}")
metrics[4].metric("Classes", workbench.data.num_classes)
st.caption(f"Input shape {workbench.data.input_shape}; never pruned: the classifier"
           + (f" and {len(workbench.structures.excluded) - 1} excluded modules" if len(workbench.structures.excluded) > 1 else ""))
st.subheader("Prunable layers (coupled channel groups)")
st.dataframe(layer_table(workbench.structures).drop(columns=["kept", "pruned", "params_after", "macs_after", "pruning_ratio"]),
             hide_index=True, width="stretch")
