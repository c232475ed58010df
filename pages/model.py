"""Model page: choose a model, weights and data set; see its prunable groups, structures, parameters, MACs, accuracy."""

from pathlib import Path
import streamlit as st

from app.forms import form_values, more_options, option_input, show_values

from app.text import plain, count_text

from app.guard import user_errors
from app.pickers import unique_labels
from app.placement import current_placement, placement_caption
from app.tables import table as show_table
from app.state import (
    DEFAULT_DATA,
    DEFAULT_MODEL,
    DEMO_WEIGHTS,
    code_confirmed,
    current_choice,
    set_choice,
    workbench,
    workspace,
)
from sosp_engine.experiments.procedures import ExperimentConfig
from sosp_engine.runs.jobs import submit
from sosp_engine.pruning.masks import channel_table, layer_table, mask_summary
from sosp_engine.nets import USER_CODE_WARNING, is_user_code
from sosp_engine.experiments.training import TrainConfig, evaluate
from sosp_engine.nets.setup import ModelSetup
from sosp_engine.shown import terminal_text

SETUP_LAID_OUT = {"model_spec", "data_spec", "weights"}
SETUP_MORE = {"exclude", "preset", "device"}  # under "More model options"
FORM_KEYS = (
    "model-spec",
    "model-data",
    "model-weights",
    "model-path",
    *(f"model-setup-{n}" for n in SETUP_MORE),
)


def weights_choices(trained: list[dict]) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """The stored weights by path with their labels, and the model and data each was trained for."""
    stored = unique_labels(
        {
            m["weights"]: f"{m['name']} ({m['model_spec']}, test acc {m['metrics'].get('test_acc', 0):.1%})"
            for m in trained
        }
    )
    stored[DEMO_WEIGHTS] = "trained demo (ResNet-20, digits)"
    made_for = {m["weights"]: (m["model_spec"], m["data_spec"]) for m in trained}
    made_for[DEMO_WEIGHTS] = (DEFAULT_MODEL, DEFAULT_DATA)
    return stored, made_for


def show_loaded_choice(choice: ModelSetup, stored: dict[str, str]) -> None:
    """Put the loaded choice into the form's state where the form must show it."""
    # the form shows the loaded choice on a first visit, after a link or a load, and after a visit to another page
    # (Streamlit drops the state of widgets a page run does not draw)
    if st.session_state.get("model-form-shows") != choice or any(
        k not in st.session_state for k in FORM_KEYS
    ):
        st.session_state["model-form-shows"] = choice
        st.session_state["model-spec"] = choice.model_spec
        st.session_state["model-data"] = choice.data_spec
        st.session_state["model-weights"] = (
            choice.weights
            if choice.weights in stored
            else ("checkpoint path" if choice.weights else "random init")
        )
        st.session_state["model-path"] = (
            choice.weights if st.session_state["model-weights"] == "checkpoint path" else ""
        )
        show_values(choice, "model-setup", SETUP_MORE)


def load_form(choice: ModelSetup, stored: dict[str, str], made_for: dict) -> None:
    """The model, data and weights form; Load sets the choice to load (checked on the next run)."""
    options = ["random init", "checkpoint path"] + list(stored)
    # every widget has a key and takes its value from the session state only, so the form loads what it shows on the
    # first click (a widget whose default changes after a load is a new widget, and would drop what was typed into it)
    with st.form("model_form"):
        cols = st.columns(3)
        model_spec = cols[0].text_input(
            "Model spec",
            key="model-spec",
            help="resnet20/32/56/110 (x2, :widths=16,32,128), vgg19, densenet40, torchvision:NAME, timm:NAME, "
            "path/file.py:factory",
        )
        data_spec = cols[1].text_input(
            "Data spec",
            key="model-data",
            help="digits, cifar10:PATH, cifar100:PATH, imagefolder:PATH, synthetic:C,H,W:K",
        )
        if st.session_state["model-weights"] not in options:
            st.session_state["model-weights"] = "random init"
        source = cols[2].selectbox(
            "Weights",
            options,
            key="model-weights",
            format_func=lambda o: terminal_text(stored.get(o, o)),
            help="stored weights belong to the model and data they were trained for; pick 'random init' for another",
        )
        path = st.text_input("Checkpoint path (for 'checkpoint path')", key="model-path")
        upload = st.file_uploader(
            "... or upload a checkpoint (.pt / .pth, a state_dict; loaded with weights_only=True)",
            type=["pt", "pth"],
        )
        more_options(st, ModelSetup, "Model page", SETUP_LAID_OUT, "model-setup", "More model options")
        if is_user_code(model_spec):
            st.warning(USER_CODE_WARNING)
        if st.form_submit_button("Load model", type="primary"):
            weights = chosen_weights(source, path, upload)
            with user_errors("Reading the model options"):
                rest = form_values(ModelSetup, "model-setup", SETUP_MORE)
            wanted = ModelSetup(model_spec.strip(), data_spec.strip(), weights, **rest)
            wanted = fitting_weights(wanted, source, stored, made_for)
            st.session_state["pending_choice"] = wanted


def chosen_weights(source: str, path: str, upload) -> str | None:
    """The weights the form names: an upload wins (said so when it overrides a choice), else the path or entry."""
    if upload is not None:
        if path.strip() or source not in ("random init", "checkpoint path"):
            st.session_state["model-weights-note"] = (
                f"The uploaded file '{upload.name}' was loaded; what Weights and Checkpoint path say was not "
                "used (remove the upload to load those)."
            )
        return str(workspace().save_upload(upload.name, upload.getvalue()))
    if source == "checkpoint path":
        return path.strip() or None
    return None if source == "random init" else source


def fitting_weights(wanted: ModelSetup, source: str, stored: dict[str, str], made_for: dict) -> ModelSetup:
    """`wanted` with weights that fit its model: stored weights of another model are set aside (and come back when
    their model is chosen again), each said plainly."""
    set_aside = st.session_state.pop("model-weights-set-aside", None)
    if (
        wanted.weights is None
        and source == "random init"
        and made_for.get(set_aside)
        == (
            wanted.model_spec,
            wanted.data_spec,
        )
    ):
        wanted = wanted.with_weights(set_aside)
        st.session_state["model-weights-note"] = (
            f"The weights '{stored[set_aside]}' fit {wanted.model_spec} on {wanted.data_spec} again, so they were "
            "loaded back; pick 'random init' under Weights and load again for an untrained net."
        )
    weights = wanted.weights
    if weights in made_for and made_for[weights] != (wanted.model_spec, wanted.data_spec):
        spec, data = made_for[weights]  # stored weights follow their own model: another model starts afresh
        wanted = wanted.with_weights(None)
        st.session_state["model-weights-set-aside"] = weights
        st.session_state["model-weights-note"] = (
            f"The weights '{stored[weights]}' were trained for {spec} on {data}, so {wanted.model_spec} on "
            f"{wanted.data_spec} was loaded with random init; pick weights of this model under Weights to use them."
        )
    return wanted


def load_pending() -> None:
    """Load the choice the form asked for, once its user code is confirmed."""
    pending = st.session_state.get("pending_choice")
    if pending is not None and code_confirmed(pending.model_spec, "This model spec"):
        del st.session_state[
            "pending_choice"
        ]  # tried once: a failure shows its error and the last model stays
        with user_errors(f"Loading {pending.model_spec}", stop=False):
            workbench(pending)
            set_choice(pending)
            st.rerun()  # the form, the summary and the sidebar all show what was loaded


def model_summary(bench) -> None:
    """The net's counts: layers, structures, parameters, MACs, classes."""
    if bench.data.note:
        st.caption(plain(f"Data: {bench.data.note}."))
    summary = mask_summary(bench.structures)
    metrics = st.columns(5)
    metrics[0].metric("Prunable layers", len(bench.structures.layers))
    metrics[1].metric("Structures", f"{summary['structures']:,}")
    metrics[2].metric(
        "Parameters", count_text(summary["params_before"]), help=f"{summary['params_before']:,}"
    )
    metrics[3].metric("MACs / sample", count_text(summary["macs_before"]), help=f"{summary['macs_before']:,}")
    metrics[4].metric("Classes", bench.data.num_classes)
    st.caption(
        f"Input shape {plain(bench.data.input_shape)}; never pruned: the classifier"
        + (
            f" and {len(bench.structures.excluded) - 1:d} excluded modules (e.g. the ResNet downsampling path)"
            if len(bench.structures.excluded) > 1
            else ""
        )
    )


def training_start(setup) -> str:
    """What the background training starts from, said plainly (it never continues from the loaded weights)."""
    if setup.weights:
        return (
            f"Trains {setup.model_spec} on {setup.data_spec} from a random initialisation: the loaded weights "
            f"({Path(setup.weights).name}) are not used. To fine-tune them, prune on the Pruning ratios page."
        )
    return f"Trains {setup.model_spec} on {setup.data_spec} from a random initialisation."


def training_popover(column, choice: ModelSetup) -> None:
    """Start a background training job of the chosen model (all training options offered)."""
    store = workspace()
    with column.popover("Train this model in the background", icon=":material/model_training:"):
        option_input(st, TrainConfig, "epochs", "model-train", default=15)
        more_options(st, TrainConfig, "Model page", {"epochs"}, "model-train", "More training options")
        st.caption(plain(training_start(choice)))
        if st.button("Start training job", type="primary"):
            with user_errors("Starting the training job", stop=False):
                training = TrainConfig(**form_values(TrainConfig, "model-train"), device=choice.device)
                epochs = training.epochs
                job = submit(
                    store,
                    ExperimentConfig(
                        procedure="train",
                        setup=choice.with_weights(None),
                        training=training,
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


def accuracy_and_training(bench, choice: ModelSetup) -> None:
    cols = st.columns([1, 1, 2])
    if cols[0].button(
        "Test accuracy", icon=":material/speed:", help="evaluate the weights on the test split"
    ):
        with st.spinner("Evaluating ..."), user_errors("Evaluating", stop=False):
            loss, acc = evaluate(bench.model, bench.data.loader("test", 256))
            st.session_state[("accuracy", choice)] = (loss, acc)
    if ("accuracy", choice) in st.session_state:
        loss, acc = st.session_state[("accuracy", choice)]
        cols[1].metric("Test accuracy", f"{acc:.2%}", help=f"test loss {loss:.4f}")

    training_popover(cols[2], choice)


def channel_notes(bench) -> None:
    """Every conv / linear output channel: offered, unprunable (why) or excluded (with what)."""
    with st.expander("Every channel accounted for: offered, unprunable or excluded"):
        show_table(channel_table(bench.structures))


def structure_notes(bench) -> None:
    """Grouped layers, what is not prunable and why, and a pruned checkpoint's origin."""
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
            plain(
                "Not prunable: " + "; ".join(f"{n} ({why})" for n, why in bench.structures.unprunable.items())
            )
        )
    if bench.recipe is not None:
        st.caption(
            plain(
                f"These weights are a pruned checkpoint of {bench.recipe['model_spec']}: the model was "
                "rebuilt at its pruned widths."
            )
        )


st.title("Model")
choice = current_choice()
stored, made_for = weights_choices(workspace().models())
show_loaded_choice(choice, stored)
load_form(choice, stored, made_for)
load_pending()
with user_errors("Loading the model"):
    bench = workbench(choice)
if "model-weights-note" in st.session_state:
    st.info(plain(st.session_state.pop("model-weights-note")), icon=":material/info:")
model_summary(bench)
accuracy_and_training(bench, choice)
structure_notes(bench)
st.subheader("Prunable layers (coupled channel groups)")
show_table(
    layer_table(bench.structures).drop(
        columns=["kept", "pruned", "params_after", "macs_after", "pruning_ratio"]
    )
)
channel_notes(bench)
