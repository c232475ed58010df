"""Model page: choose a model, weights and data set; see its prunable groups, structures, parameters, MACs, accuracy."""

from pathlib import Path

import streamlit as st

from app.text import plain

from app.guard import user_errors
from app.placement import current_placement, placement_caption
from app.tables import table as show_table
from app.state import (
    DEMO_WEIGHTS,
    ModelChoice,
    code_confirmed,
    current_choice,
    set_choice,
    workbench,
    workspace,
)
from sosp_engine.experiments.procedures import ExperimentConfig
from sosp_engine.runs.jobs import submit
from sosp_engine.pruning.masks import layer_table, mask_summary
from sosp_engine.nets import USER_CODE_WARNING, is_user_code
from sosp_engine.experiments.training import evaluate

st.title("Model")
store = workspace()
choice = current_choice()
trained = store.models()

with st.form("model_form"):
    cols = st.columns(3)
    model_spec = cols[0].text_input(
        "Model spec",
        choice.model_spec,
        help="resnet20/32/56/110 (x2, :widths=16,32,128), vgg19, densenet40, torchvision:NAME, timm:NAME, "
        "path/file.py:factory",
    )
    data_spec = cols[1].text_input(
        "Data spec",
        choice.data_spec,
        help="digits, cifar10:PATH, cifar100:PATH, imagefolder:PATH, synthetic:C,H,W:K",
    )
    stored = {
        m["weights"]: f"{m['name']} ({m['model_spec']}, test acc {m['metrics'].get('test_acc', 0):.1%})"
        for m in trained
    }
    stored[DEMO_WEIGHTS] = "trained demo (ResNet-20, digits)"
    options = ["random init", "checkpoint path"] + list(stored)
    current = (
        choice.weights
        if choice.weights in stored
        else ("checkpoint path" if choice.weights else "random init")
    )
    source = cols[2].selectbox(
        "Weights", options, index=options.index(current), format_func=lambda o: stored.get(o, o)
    )
    path = st.text_input(
        "Checkpoint path (for 'checkpoint path')", choice.weights if current == "checkpoint path" else ""
    )
    upload = st.file_uploader(
        "... or upload a checkpoint (.pt / .pth, a state_dict; loaded with weights_only=True)",
        type=["pt", "pth"],
    )
    if is_user_code(model_spec):
        st.warning(USER_CODE_WARNING)
    if st.form_submit_button("Load model", type="primary"):
        weights = None
        if upload is not None:
            target = store.root / "uploads" / Path(upload.name).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(upload.getvalue())
            weights = str(target)
        elif source == "checkpoint path":
            weights = path.strip() or None
        elif source != "random init":
            weights = source
        st.session_state["pending_choice"] = ModelChoice(model_spec.strip(), data_spec.strip(), weights)

pending = st.session_state.get("pending_choice")
if pending is not None and code_confirmed(pending.model_spec, "This model spec"):
    del st.session_state["pending_choice"]  # tried once: a failure shows its error and the last model stays
    with user_errors(f"Loading {pending.model_spec}", stop=False):
        workbench(pending)
        set_choice(pending)
        choice = pending

with user_errors("Loading the model"):
    bench = workbench(choice)

summary = mask_summary(bench.structures)
metrics = st.columns(5)
metrics[0].metric("Prunable layers", len(bench.structures.layers))
metrics[1].metric("Structures", f"{summary['structures']:,}")
metrics[2].metric("Parameters", f"{summary['params_before']:,}")
metrics[3].metric("MACs / sample", f"{summary['macs_before']:,}")
metrics[4].metric("Classes", bench.data.num_classes)
st.caption(
    f"Input shape {plain(bench.data.input_shape)}; never pruned: the classifier"
    + (
        f" and {len(bench.structures.excluded) - 1:d} excluded modules (e.g. the ResNet downsampling path)"
        if len(bench.structures.excluded) > 1
        else ""
    )
)

cols = st.columns([1, 1, 2])
if cols[0].button("Test accuracy", icon=":material/speed:", help="evaluate the weights on the test split"):
    with st.spinner("Evaluating ..."), user_errors("Evaluating", stop=False):
        loss, acc = evaluate(bench.model, bench.data.loader("test", 256))
        st.session_state[("accuracy", choice)] = (loss, acc)
if ("accuracy", choice) in st.session_state:
    loss, acc = st.session_state[("accuracy", choice)]
    cols[1].metric("Test accuracy", f"{acc:.2%}", help=f"test loss {loss:.4f}")

with cols[2].popover("Train this model in the background", icon=":material/model_training:"):
    epochs = st.number_input("Epochs", 1, 1000, 15)
    if st.button("Start training job", type="primary"):
        with user_errors("Starting the training job", stop=False):
            job = submit(
                store,
                ExperimentConfig(
                    procedure="train",
                    model_spec=choice.model_spec,
                    data_spec=choice.data_spec,
                    epochs=int(epochs),
                    label=f"train {choice.model_spec}",
                ),
                name=f"train {choice.model_spec} ({epochs} epochs)",
                placement=current_placement(),
            )
            st.success(
                f"Job {plain(job)} started on {plain(placement_caption())}. It keeps running if you close the tab; "
                "follow it "
                "on the Runs page (where you can also choose a Ray cluster). "
                "When it is done, its weights appear in the Weights list above."
            )

grouped = [l for l in bench.structures.layers if l.structure_size > 1]
if grouped:
    st.caption(
        plain(
            f"{len(grouped)} layers sit at grouped convolutions or GroupNorm: one structure there is one "
            f"channel per group ({', '.join(f'{l.name}: {l.structure_size} channels' for l in grouped[:4])}"
            f"{', ...' if len(grouped) > 4 else ''}), so every mask stays physically prunable."
        )
    )
if bench.structures.unprunable:
    st.caption(
        plain("Not prunable: " + "; ".join(f"{n} ({why})" for n, why in bench.structures.unprunable.items()))
    )
if bench.recipe is not None:
    st.caption(
        plain(
            f"These weights are a pruned checkpoint of {bench.recipe['model_spec']}: the model was "
            "rebuilt at its pruned widths."
        )
    )
st.subheader("Prunable layers (coupled channel groups)")
show_table(
    layer_table(bench.structures).drop(
        columns=["kept", "pruned", "params_after", "macs_after", "pruning_ratio"]
    )
)
