"""Time and peak memory of each saliency as a ratio to one forward+backward pass over the same N' samples.

Usage: python bench/bench_saliency.py [--models resnet56,resnet56x2,...] [--samples 1000] [--out results.jsonl]
Each measurement runs in a fresh process (so peak memory is its own); the baseline runs in the same way.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _setup(
    model_spec: str,
    samples: int,
    device: str,
    shape: tuple[int, ...] = (3, 32, 32),
    classes: int = 10,
    batch_size: int = 100,
):
    import torch

    from sosp_engine.devices import resolve_device
    from sosp_engine.nets.setup import default_preset
    from sosp_engine.nets import build_model
    from sosp_engine.saliency.common import AnalysisInputs
    from sosp_engine.pruning.offered import find_structures

    torch.manual_seed(0)
    dev = resolve_device(device)
    model = build_model(model_spec, classes, shape[0]).eval()
    x = torch.randn(samples, *shape)
    y = torch.randint(0, classes, (samples,))
    structures = find_structures(model, x[:1], preset=default_preset(model_spec))
    model.to(dev)
    return AnalysisInputs(model, structures, x, y, batch_size=batch_size)


def _measure(
    task: str,
    model_spec: str,
    samples: int,
    device: str,
    queue,
    shape: tuple[int, ...] = (3, 32, 32),
    classes: int = 10,
    batch_size: int = 100,
) -> None:
    import torch

    from sosp_engine.saliency.common import sample_losses
    from sosp_engine.saliency.sosp_h import sosp_h_terms
    from sosp_engine.saliency.curvature import FactorRows, MatrixRows
    from sosp_engine.saliency.sosp_i import gauss_newton_factor, gauss_newton_terms, sosp_i_matrix
    from sosp_engine.saliency.selection import greedy_order, literal_greedy_order

    torch.set_num_threads(torch.get_num_threads())
    if task.startswith("analysis-"):  # the whole user call: run_analysis as the CLI and the app run it
        return _measure_analysis(task, model_spec, samples, device, queue, shape, classes, batch_size)
    inputs = _setup(model_spec, samples, device, shape, classes, batch_size)
    cuda = inputs.device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def forward_backward():
        for x, y in inputs.batches():
            inputs.model.zero_grad(set_to_none=True)
            sample_losses(inputs.model(x), y, inputs.loss).mean().backward()

    if task.startswith(
        "tp-"
    ):  # peers: torch-pruning's importances over every coupled group (graph built untimed)
        import torch_pruning as tp

        from sosp_engine.pruning.structures import PRODUCER_TYPES

        graph = tp.DependencyGraph().build_dependency(
            inputs.model, example_inputs=inputs.x[:1].to(inputs.device)
        )
        groups = list(graph.get_all_groups(root_module_types=PRODUCER_TYPES))
        if (
            task == "tp-obdc"
        ):  # its hooks follow the groups of torch-pruning's own pruner (the graph built untimed)
            obdc = tp.importance.OBDCImportance(num_classes=classes)
            pruner = tp.pruner.MetaPruner(inputs.model, inputs.x[:1].to(inputs.device), importance=obdc)
            groups = list(
                pruner.DG.get_all_groups(
                    ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
                )
            )

    if (
        task == "nni-sensitivity"
    ):  # NNI 2.x's sensitivity analysis: each conv pruned alone (L1) at 3 sparsities
        from nni.compression.pytorch.utils.sensitivity_analysis import SensitivityAnalysis

        def validation_loss(model) -> float:
            with torch.no_grad():
                return -sum(float(sample_losses(model(x), y, inputs.loss).sum()) for x, y in inputs.batches())

    def run_task(extra: dict, start: float) -> None:
        if task == "nni-sensitivity":
            SensitivityAnalysis(
                inputs.model, validation_loss, sparsities=[0.25, 0.5, 0.75], prune_type="l1"
            ).analysis(val_args=[inputs.model])
        elif task == "forward+backward":
            forward_backward()
        elif task == "sosp-h":
            sosp_h_terms(inputs)
        elif (
            task == "sosp-h-params"
        ):  # SOSP-H's Hessian-vector product in parameter space (the path for other layers)
            from sosp_engine.saliency.sosp_h import gradient_and_hvp

            grads, hvp = gradient_and_hvp(inputs, inputs.theta_struc())
            inputs.per_structure(grads), inputs.per_structure(hvp)
        elif task == "sosp-i" or task.startswith(("sosp-i-factor", "sosp-i-mc")):
            # sosp-i[-factor][-mcK]: the S x S matrix (or its R x S factor), with K sampled labels per sample
            mc_labels = int(task.split("-mc")[1]) if "-mc" in task else 0
            if "factor" in task:
                rows = FactorRows(*gauss_newton_factor(inputs, mc_labels=mc_labels))
            else:
                first, gram = gauss_newton_terms(inputs, mc_labels=mc_labels)
                rows = MatrixRows(sosp_i_matrix(first, gram))
            sync()
            extra["gram_and_products_s"] = time.perf_counter() - start
            t0 = time.perf_counter()
            greedy_order(rows, inputs.structures)
            sync()
            extra["selection_s"] = time.perf_counter() - t0
        elif task.startswith(
            "diagonal-mc"
        ):  # diagonal-mcK: the diagonal baseline from K sampled labels per sample
            gauss_newton_terms(inputs, diagonal_only=True, mc_labels=int(task[len("diagonal-mc") :]))
        elif task == "diagonal":
            gauss_newton_terms(inputs, diagonal_only=True)
        elif (
            task == "sosp-i-floor"
        ):  # SOSP-I's floor: its own passes, without products (a lower bound by construction)
            from sosp_engine.saliency.sosp_i import pass_floor

            pass_floor(inputs)
        elif task == "tp-taylor":  # first-order Taylor: one forward+backward, then |w * g| per group
            forward_backward()
            importance = tp.importance.GroupTaylorImportance()
            for group in groups:
                importance(group)
        elif (
            task == "tp-hessian"
        ):  # grouped OBD as documented: a backward per sample through the batch's graph
            importance = tp.importance.GroupHessianImportance()
            importance.zero_grad()
            for x, y in inputs.batches():
                for loss in sample_losses(inputs.model(x), y, inputs.loss):
                    inputs.model.zero_grad(set_to_none=True)
                    loss.backward(retain_graph=True)
                    importance.accumulate_grad(inputs.model)
            for group in groups:
                importance(group)
        elif (
            task == "tp-hessian-b1"
        ):  # grouped OBD, its cheapest recipe: one forward+backward per sample at batch 1
            importance = tp.importance.GroupHessianImportance()
            importance.zero_grad()
            for x, y in inputs.batches():
                for i in range(len(y)):
                    inputs.model.zero_grad(set_to_none=True)
                    sample_losses(inputs.model(x[i : i + 1]), y[i : i + 1], inputs.loss).sum().backward()
                    importance.accumulate_grad(inputs.model)
            for group in groups:
                importance(group)
        elif (
            task == "tp-obdc"
        ):  # EigenDamage's Fisher (OBD in the KFE): one sampled label per sample, per-sample grads
            out_channels = (
                tp.pruner.function.prune_conv_out_channels,
                tp.pruner.function.prune_linear_out_channels,
            )
            for (
                group
            ) in groups:  # what OBDCImportance._prepare_model does (its attention re-rooting fails in 1.6.0)
                for dep, _ in group:
                    layer = dep.target.module
                    if (
                        isinstance(layer, tuple(obdc.target_types))
                        and dep.handler in out_channels
                        and layer not in obdc.modules
                    ):
                        obdc.modules.append(layer)
                        layer.register_forward_pre_hook(obdc._save_input)
                        layer.register_full_backward_hook(obdc._save_grad_output)
            for x, _ in inputs.batches():
                inputs.model.zero_grad(set_to_none=True)
                logits = inputs.model(x)
                sampled = torch.multinomial(torch.softmax(logits.detach(), 1), 1).squeeze(1)
                torch.nn.functional.cross_entropy(logits, sampled).backward()
                obdc.step()
            for group in groups:
                obdc(group)
        elif task == "greedy":
            s = inputs.structures.num_structures
            q = torch.rand(s, s, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
            q = (q + q.T) / 2
            t0 = time.perf_counter()
            greedy_order(q, inputs.structures)
            extra["fast_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            literal_greedy_order(q, inputs.structures)
            extra["literal_s"] = time.perf_counter() - t0

    if (
        cuda
    ):  # one untimed run first: CUDA's lazy module loading and cuDNN's kernel choice would land in the timing
        run_task({}, time.perf_counter())
        sync()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:
        with torch.no_grad():  # warm-up of kernels and allocator, not timed
            inputs.model(next(inputs.batches())[0])
    extra: dict = {}
    sync()
    start = time.perf_counter()
    run_task(extra, start)
    sync()
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    queue.put(
        {
            "seconds": seconds,
            "peak_rss_mb": peak_mb,
            "peak_gpu_mb": gpu_mb,
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if cuda else None,
            "structures": inputs.structures.num_structures,
            **extra,
        }
    )


def _measure_analysis(
    task: str,
    model_spec: str,
    samples: int,
    device: str,
    queue,
    shape: tuple[int, ...],
    classes: int,
    batch_size: int,
) -> None:
    """analysis-METHOD: the whole `run_analysis` call, warm (a first call untimed, as a second analysis in the
    dashboard or a study); analysis-METHOD-cold: the first call of a fresh process, after only opening the workbench
    (what `analyze` on the command line pays). The seconds of each stage of the timed call come with it."""
    import torch

    from sosp_engine.nets.setup import ModelSetup
    from sosp_engine.pruning.workbench import open_workbench
    from sosp_engine.saliency.analysis import AnalysisConfig, run_analysis

    cold = task.endswith("-cold")
    method = task[len("analysis-") :].removesuffix("-cold")
    data = f"synthetic:{','.join(map(str, shape))}:{classes}:{samples}"
    workbench = open_workbench(ModelSetup(model_spec, data, device=device))
    config = AnalysisConfig(
        method=method, samples=samples, batch_size=batch_size, memory_budget_gb=None, setup=workbench.setup
    )
    if not cold:
        run_analysis(workbench, config)
    cuda = next(workbench.model.parameters()).device.type == "cuda" or device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = run_analysis(workbench, config)
    if cuda:
        torch.cuda.synchronize()
    queue.put(
        {
            "seconds": time.perf_counter() - start,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if cuda else None,
            "structures": workbench.structures.num_structures,
            "stages": result.timings,
            "open_stages": workbench.timings,
            "exactness_reused": result.exactness.get("reused"),
            "curvature_form": result.curvature_form,
        }
    )


def measure(
    task: str,
    model_spec: str,
    samples: int,
    device: str,
    shape: tuple[int, ...] = (3, 32, 32),
    classes: int = 10,
    batch_size: int = 100,
) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(
        target=_measure, args=(task, model_spec, samples, device, queue, shape, classes, batch_size)
    )
    proc.start()
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except Exception:
            if not proc.is_alive():
                return {
                    "seconds": float("nan"),
                    "peak_rss_mb": float("nan"),
                    "peak_gpu_mb": None,
                    "structures": None,
                    "error": f"the measuring process died (exit code {proc.exitcode}; out of memory?)",
                }
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="resnet56,resnet56x2,resnet56x4,vgg19,densenet40")
    parser.add_argument("--tasks", default="forward+backward,sosp-h,sosp-i,sosp-i-mc3")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--greedy-model", default="resnet56x2", help="model whose S is used for fast vs literal greedy"
    )
    parser.add_argument("--input", default="3,32,32", help="input shape C,H,W")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--out", default="bench/results.jsonl")
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.input.split(","))
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the spawned measuring processes read it at start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for model_spec in args.models.split(","):
        base = None
        for task in args.tasks.split(","):
            result = measure(
                task, model_spec, args.samples, args.device, shape, args.classes, args.batch_size
            )
            if task == "forward+backward":
                base = result["seconds"]
            row = {
                "model": model_spec,
                "task": task,
                "samples": args.samples,
                "input": args.input,
                "classes": args.classes,
                "batch_size": args.batch_size,
                "threads": args.threads,
                **result,
                "ratio_to_forward_backward": result["seconds"] / base if base else None,
            }
            print(json.dumps(row), flush=True)
            with out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
    if args.greedy_model:
        result = measure("greedy", args.greedy_model, 100, args.device)
        row = {
            "model": args.greedy_model,
            "task": "greedy",
            **result,
            "speedup": result["literal_s"] / result["fast_s"],
        }
        print(json.dumps(row), flush=True)
        with out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
