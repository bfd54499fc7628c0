"""The bench's worker side: each pipeline runs in a process of its own (``bench.pipeline``
starts it and speaks JSON lines to it), so each has its own libraries, thread pools and peak
RSS, and the device pipeline's process never imports PyTorch.

``_Ours`` is the device's ``edge.runtime.Screener``; ``_Baseline`` is the research-style
pipeline (PyTorch FP32 eager + autograd Grad-CAM) on the same model and preprocessing;
``_Ours.cam_cost`` measures the explanation's share of the ONNX Runtime graph.
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from bench.pipeline import BASELINE, STAGES, _pct

# --------------------------------------------------------------- worker side: our pipeline


def _decode(screener: Any, path: Path) -> Any:
    from edge.ingest import load_study

    return load_study(path, screener.cfg.ingest, screener.sites)


def _prepare(screener: Any, study: Any) -> tuple[Any, Any, Any, NDArray, NDArray]:
    """Package, display image, geometry, model input and clinical vector, as ``screen``."""
    from edge.clinical import all_missing, clinical_vector
    from edge.preprocess import display_work, normalise, square_from_display

    pkg = screener.models[study.site].pkg
    display8, work_scale = display_work(study.raw, pkg.preprocess)
    square, geom = square_from_display(display8, work_scale, study.raw.pixels.shape, pkg.preprocess)
    image = normalise(square, pkg.preprocess)[None]
    vec = clinical_vector(study.facts, pkg.clinical)[None].astype(np.float32)
    if not pkg.card.get("clinical_inputs", True):
        vec = all_missing(vec)
    return pkg, display8, geom, image, vec


def _model_input(screener: Any, path: Path) -> tuple[str, NDArray, NDArray]:
    study = _decode(screener, path)
    *_, image, vec = _prepare(screener, study)
    return study.site, image, vec


class _Ours:
    def __init__(self, cfg: Any, precision: str | None) -> None:
        from edge.runtime import Screener

        self.screener = Screener(cfg, precision=precision)

    def describe(self) -> dict:
        return {
            site: {
                "model": m.pkg.name,
                "backend": m.choice.backend.name,
                "precision": m.choice.backend.precision,
                "reason": m.choice.reason,
            }
            for site, m in sorted(self.screener.models.items())
        }

    def run(self, path: str) -> dict:
        from edge.overlay import encode_jpeg, encode_png
        from osteofy.errors import InputRejected

        t0 = time.perf_counter()
        try:
            outcome = self.screener.screen(Path(path))
        except InputRejected as exc:
            return {"rejected": str(exc)}
        t1 = time.perf_counter()
        jpeg = encode_jpeg(outcome.overlay(include_image=True))
        t2 = time.perf_counter()
        stages = {k: float(outcome.result.timings_ms[k]) for k in STAGES[:4]}
        stages["render"] = (t2 - t1) * 1000.0
        stages["total"] = (t2 - t0) * 1000.0
        png = encode_png(outcome.overlay(include_image=outcome.publishable_pixels))
        t3 = time.perf_counter()
        return {
            "stages": stages,
            "png_ms": (t3 - t2) * 1000.0,
            "png_bytes": len(png),
            "jpeg_bytes": len(jpeg),
            "class": outcome.result.prediction.class_,
        }

    def cam_cost(self, paths: list[str], runs: int) -> dict:
        """Per site: what the explanation outputs cost inside the device's ONNX Runtime graph.

        ONNX Runtime executes the whole graph whatever outputs are requested (its profiler
        shows the same kernels either way: ``kernels_per_run``), so the explanation-free
        reference is the graph cut before the nodes that only ``cam`` and ``clinical_attr``
        need (``onnx.utils.extract_model``), loaded with the device's session options
        (threads, no spinning, batch fixed at 1). Two estimates: the profiler's kernel time
        of the kernels the cut removes (median per kernel over ``runs`` runs; a kernel that
        ONNX Runtime fused from several nodes is named after the first and counted when that
        node is cut), and the wall-clock difference between the device's session and the
        cut one, run alternately.
        """
        import onnx.utils
        import onnxruntime as ort

        from edge.backends.onnxruntime import session_options

        out = {}
        with tempfile.TemporaryDirectory() as tmp:
            for path in paths:
                site, image, vec = _model_input(self.screener, Path(path))
                backend = self.screener.models[site].choice.backend
                session = getattr(backend, "session", None)
                model = getattr(backend, "model_path", None)
                if session is None or model is None:  # TensorRT: not an ORT graph
                    continue
                options = (getattr(backend, "threads", None), getattr(backend, "batch", None))
                every = [o.name for o in session.get_outputs()]
                kept = [o for o in every if o not in EXPLANATION_OUTPUTS]
                cut = Path(tmp) / f"{site}.onnx"
                onnx.utils.extract_model(str(model), str(cut), ["image", "clinical"], kept)
                no_cam = ort.InferenceSession(
                    str(cut), session_options(*options), providers=["CPUExecutionProvider"]
                )
                feeds = {"image": image, "clinical": vec}
                variants = {"all": (session, every), "no_cam": (no_cam, kept)}
                times: dict[str, list[float]] = {k: [] for k in variants}
                for _ in range(3):
                    for sess, names in variants.values():
                        sess.run(names, feeds)
                for i in range(runs):
                    for name in list(variants) if i % 2 == 0 else list(variants)[::-1]:
                        sess, names = variants[name]
                        t0 = time.perf_counter()
                        sess.run(names, feeds)
                        times[name].append((time.perf_counter() - t0) * 1000.0)
                full = _kernel_ms(model, every, feeds, runs, options)
                not_requested = _kernel_ms(model, kept, feeds, 1, options)
                cut_kernels = _kernel_ms(cut, kept, feeds, 1, options)
                removed = {n.name for n in onnx.load(str(model)).graph.node} - {
                    n.name for n in onnx.load(str(cut)).graph.node
                }
                cam_kernels = {
                    k: v for k, v in full.items() if _kernel_node(k, removed) is not None
                }
                diff = np.asarray(times["all"]) - np.asarray(times["no_cam"])
                out[site] = {
                    "all_outputs_ms_p50": _pct(times["all"], 50),
                    "no_cam_ms_p50": _pct(times["no_cam"], 50),
                    "cam_wall_ms": round(float(np.median(diff)), 3),
                    "cam_kernel_ms": round(sum(cam_kernels.values()), 4),
                    "cam_kernels": sorted(k.removesuffix("_kernel_time") for k in cam_kernels),
                    "all_kernels_ms": round(sum(full.values()), 3),
                    "runs": runs,
                    "kernels_per_run": {
                        "model_all_outputs": len(full),
                        "model_cam_not_requested": len(not_requested),
                        "graph_without_cam": len(cut_kernels),
                    },
                }
        return out


EXPLANATION_OUTPUTS = ("cam", "clinical_attr")


def _kernel_node(kernel: str, nodes: set[str]) -> str | None:
    """The graph node a profiler kernel belongs to: its own name, or the first node of a
    fusion (ONNX Runtime names those ``<node>/<Fusion>/``)."""
    name = kernel.removesuffix("_kernel_time")
    if name in nodes:
        return name
    head = name.split("/", 2)
    first = "/" + head[1] if name.startswith("/") and len(head) > 1 else head[0]
    return first if first in nodes else None


def _kernel_ms(
    model: Path, outputs: list[str], feeds: dict, runs: int, options: tuple = (None, None)
) -> dict[str, float]:
    """Kernel time per node (ms, median over ``runs`` runs) from ONNX Runtime's profiler."""
    import onnxruntime as ort

    from edge.backends.onnxruntime import session_options

    with tempfile.TemporaryDirectory() as tmp:
        opts = session_options(*options)
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "profile")
        sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            sess.run(outputs, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_node: dict[str, list[float]] = {}
    for e in events:
        name = str(e.get("name", ""))
        if e.get("cat") == "Node" and name.endswith("_kernel_time"):
            per_node.setdefault(name, []).append(float(e.get("dur", 0.0)) / 1000.0)
    return {name: float(np.median(d)) for name, d in per_node.items()}


# -------------------------------------------------------- worker side: research baseline


def _strip_batchnorm(net: Any) -> None:
    """The export folded BatchNorm into the convolutions: identity BN, biased convs."""
    import torch
    from torch import nn

    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, name, nn.Identity())
            elif isinstance(child, nn.Conv2d) and child.bias is None:
                child.bias = nn.Parameter(torch.zeros(child.out_channels))


def torch_from_onnx(model_path: Path, backbone: str, n_clinical: int) -> Any:
    """FusionNet with the weights of ``model.onnx`` (the same model, in PyTorch FP32).

    Convolutions are matched to the graph's Conv nodes in order (checked by shape), the head
    by initializer name, the clinical weights by the MatMuls on the ``clinical`` input. Every
    parameter and buffer must be assigned, or this raises; the caller then compares outputs
    with ONNX Runtime (``_Baseline.verify``).
    """
    import onnx
    import torch
    from onnx import numpy_helper
    from torch import nn

    from model.fusion import FusionNet

    graph = onnx.load(str(model_path)).graph
    init = {t.name: numpy_helper.to_array(t).copy() for t in graph.initializer}
    net = FusionNet(backbone, n_clinical)
    _strip_batchnorm(net)
    state = {**dict(net.named_parameters()), **dict(net.named_buffers())}
    done: set[str] = set()
    convs = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    nodes = [n for n in graph.node if n.op_type == "Conv"]
    if len(convs) != len(nodes):
        raise ValueError(f"{len(convs)} convolutions in the network, {len(nodes)} in the graph")
    # The clinical branch exports as MatMul(clinical, W.T): [F, classes] for ``clin``, [F, 1]
    # for ``t_clin``.
    clinical_mm = {
        init[n.input[1]].shape[1]: init[n.input[1]]
        for n in graph.node
        if n.op_type == "MatMul" and n.input[0] == "clinical" and n.input[1] in init
    }

    def put(name: str, value: np.ndarray) -> None:
        if tuple(state[name].shape) != tuple(value.shape):
            raise ValueError(f"{name}: shape {tuple(value.shape)} != {tuple(state[name].shape)}")
        with torch.no_grad():
            state[name].copy_(torch.from_numpy(np.array(value, dtype=np.float32, order="C")))
        done.add(name)

    for (name, _), node in zip(convs, nodes, strict=True):
        put(f"{name}.weight", init[node.input[1]])
        put(f"{name}.bias", init[node.input[2]])
    put("clin.weight", clinical_mm[net.clin.out_features].T)
    put("t_clin.weight", clinical_mm[1].T)
    for name in state:
        if name not in done and f"net.{name}" in init:
            put(name, init[f"net.{name}"])
    missing = sorted(set(state) - done)
    if missing:
        raise ValueError(f"no ONNX weights for {', '.join(missing)}")
    return net.eval()


class _HookedGradCAM:
    """Grad-CAM the way pytorch-grad-cam computes it: hooks on the last feature map, one
    grad-mode forward, one backward pass per class; cam_k = ReLU(sum_c mean(dy_k/dA_c) A_c)."""

    def __init__(self, net: Any) -> None:
        self.net = net
        self.activations: Any = None
        self.gradients: Any = None
        net.backbone.body[-1].register_forward_hook(self._keep)

    def _keep(self, module: Any, inputs: Any, output: Any) -> None:
        if output.requires_grad:
            self.activations = output.detach()
            output.register_hook(self._keep_grad)

    def _keep_grad(self, grad: Any) -> None:
        self.gradients = grad.detach()

    def __call__(self, image: Any, clinical: Any) -> np.ndarray:
        import torch

        logits, _ = self.net(image, clinical)
        maps = []
        for k in range(logits.shape[1]):
            self.net.zero_grad(set_to_none=True)
            logits[:, k].sum().backward(retain_graph=k < logits.shape[1] - 1)
            weights = self.gradients.mean((2, 3), keepdim=True)
            maps.append(torch.relu((weights * self.activations).sum(1)))
        return torch.stack(maps, 1)[0].numpy()


class _Baseline:
    """Research-style pipeline: same decode, preprocessing and render; PyTorch + autograd."""

    def __init__(self, cfg: Any, threads: int) -> None:
        import torch

        from edge.runtime import Screener

        torch.set_num_threads(threads)
        # The Screener picks the same packages as ours and gives an FP32 ORT reference.
        self.screener = Screener(cfg, precision="fp32")
        self.nets = {}
        for site, m in self.screener.models.items():
            net = torch_from_onnx(
                m.pkg.model_file("fp32"), m.pkg.card["backbone"], m.pkg.clinical.width
            )
            self.nets[site] = (net, _HookedGradCAM(net))

    def describe(self) -> dict:
        import torch

        return {
            site: {"model": m.pkg.name, "backend": f"pytorch {torch.__version__} eager fp32"}
            for site, m in sorted(self.screener.models.items())
        }

    def _predict(self, net: Any, image: Any, clinical: Any) -> dict[str, np.ndarray]:
        import torch

        with torch.no_grad():
            p = net.parts(image, clinical)
            probs = torch.softmax(p["logits"] / net.temperature, dim=1)
            z = torch.matmul(p["ood_features"] - net.ood_mean, net.ood_whiten)
            return {
                "probs": probs.numpy(),
                "tscore": p["tscore"].numpy(),
                "ood": torch.sqrt((z * z).sum(1, keepdim=True)).numpy(),
                "clinical_attr": (clinical.unsqueeze(1) * net.clin.weight.unsqueeze(0)).numpy(),
            }

    def run(self, path: str) -> dict:
        import torch

        from edge.overlay import cam_to_display, encode_jpeg, peak_regions, render_overlay
        from edge.result import CLASSES
        from edge.runtime import _contributions

        t0 = time.perf_counter()
        study = _decode(self.screener, Path(path))
        t1 = time.perf_counter()
        pkg, display8, geom, image, vec = _prepare(self.screener, study)
        t2 = time.perf_counter()
        net, gradcam = self.nets[study.site]
        x, c = torch.from_numpy(image), torch.from_numpy(vec)
        out = self._predict(net, x, c)
        t3 = time.perf_counter()
        cam = gradcam(x, c)
        probs = out["probs"][0].astype(float)
        k = int(np.argmax(probs))
        peak_regions(cam[k], geom, k=3)
        _contributions(out["clinical_attr"][0], pkg, study.facts)
        t4 = time.perf_counter()
        heat = cam_to_display(cam[k], geom, display8.shape)
        overlay = render_overlay(
            display8,
            heat,
            label=CLASSES[k],
            probs=dict(zip(CLASSES, probs, strict=True)),
            tscore=float(out["tscore"][0, 0]),
            include_image=True,
        )
        encode_jpeg(overlay)
        t5 = time.perf_counter()
        return {
            "stages": {
                "decode": (t1 - t0) * 1000.0,
                "preprocess": (t2 - t1) * 1000.0,
                "inference": (t3 - t2) * 1000.0,
                "explanation": (t4 - t3) * 1000.0,
                "render": (t5 - t4) * 1000.0,
                "total": (t5 - t0) * 1000.0,
            },
            "class": CLASSES[k],
        }

    def verify(self, paths: list[str], noise: bool) -> dict:
        """PyTorch rebuild vs ONNX Runtime (fp32): probs, and autograd vs in-graph CAM."""
        import torch

        rng = np.random.default_rng(0)
        inputs = [_model_input(self.screener, Path(path)) for path in paths]
        for site, m in sorted(self.screener.models.items()) if noise else []:
            size = int(m.pkg.card["input"]["image"][-1])
            image = rng.standard_normal((1, 1, size, size)).astype(np.float32)
            inputs.append((site, image, np.zeros((1, m.pkg.clinical.width), np.float32)))
        probs_diff, cam_rel, pearson, flat = 0.0, 0.0, [], 0
        for site, image, vec in inputs:
            ort_out = self.screener.models[site].choice.backend.run(image, vec)
            net, gradcam = self.nets[site]
            x, c = torch.from_numpy(image), torch.from_numpy(vec)
            mine = self._predict(net, x, c)
            probs_diff = max(probs_diff, float(np.abs(mine["probs"] - ort_out["probs"]).max()))
            cam = gradcam(x, c)
            for a, b in zip(cam, ort_out["cam"][0], strict=True):
                top = max(float(np.abs(b).max()), 1e-12)
                cam_rel = max(cam_rel, float(np.abs(a - b).max()) / top)
                if a.std() == 0 and b.std() == 0:
                    flat += 1  # both all-zero (ReLU of a class with no positive evidence)
                    continue
                pearson.append(float(np.corrcoef(a.ravel(), b.ravel())[0, 1]))
        return {
            "inputs": len(inputs),
            "input_kinds": "preprocessed scans" + (" and noise images" if noise else ""),
            "probs_max_abs_diff": probs_diff,
            "cam_pearson_min": min(pearson) if pearson else None,
            "cam_maps_compared": len(pearson),
            "cam_maps_flat_in_both": flat,
            "cam_max_abs_diff_rel": cam_rel,
        }


# -------------------------------------------------------------------- worker protocol


def worker_main() -> None:
    """JSON lines on stdin -> JSON lines on stdout; library output goes to stderr."""
    reply_to = sys.stdout
    sys.stdout = sys.stderr
    pipe: Any = None
    for line in sys.stdin:
        msg = json.loads(line)
        op = msg["op"]
        try:
            if op == "init":
                from osteofy.config import Config

                cfg = Config(
                    data_dir=Path(msg["data_dir"]),
                    models_dir=Path(msg["models_dir"]),
                    mqtt={"url": ""},
                )
                if msg["kind"] == BASELINE:
                    pipe = _Baseline(cfg, int(msg["torch_threads"]))
                else:
                    pipe = _Ours(cfg, msg["precision"])
                reply: dict = {"describe": pipe.describe()}
            elif op == "run":
                reply = pipe.run(msg["path"])
            elif op == "cam_cost":
                reply = pipe.cam_cost(msg["paths"], int(msg["runs"]))
            elif op == "verify":
                reply = pipe.verify(msg["paths"], bool(msg["noise"]))
            elif op == "info":
                reply = {
                    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                    "torch_imported": "torch" in sys.modules,
                }
            elif op == "quit":
                reply = {}
            else:
                reply = {"error": f"unknown op {op}"}
        except Exception as exc:  # reported to the parent, which raises with the reason
            traceback.print_exc()
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        reply_to.write(json.dumps(reply) + "\n")
        reply_to.flush()
        if op == "quit":
            break
