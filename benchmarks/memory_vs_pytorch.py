"""Peak memory of one PyTorch training step against our compiled plan's planned peak SRAM, same model and scheme.

One command: ``python benchmarks/memory_vs_pytorch.py [--quick] [--models imu,mbv2]``. Per model and scheme:
- ours: ``compile_plan`` -> ``peak_sram_bytes`` (arena + trainable + runtime allowance) and ``arena_bytes``;
- PyTorch, measured in a fresh subprocess per case (fp32 float twin of the same int8 graph, only the scheme's
  parameters trainable, SGD, batch 1, one forward + backward + step):
  ``torch_peak_rss_bytes`` = the process's peak resident set (what running PyTorch on a board would need),
  ``torch_step_rss_bytes`` = the rise of the peak during the step alone (VmHWM reset just before it),
  ``torch_tensor_bytes`` = a floor counted from tensors: parameters + gradients of trainable ones + tensors
  autograd saved for backward (``saved_tensors_hooks``, each storage once).
Ratios are reported against ours in the same run. Last stdout line: one JSON object (bytes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import MODELS, emit

CASES = {"imu": ("ImuCNN:tail", "full"), "mbv2": ("mbv2-w0.35:99kb", "last", "full")}


def build(model: str):
    """(graph, scheme resolver) for ``model``; shared by the parent and the measuring subprocess."""
    import torch

    if model == "imu":
        from fleet.compiler.models import ImuCNN
        from fleet.compiler.torch_import import import_torch

        torch.manual_seed(0)
        return import_torch(ImuCNN().eval(), torch.randn(256, 6, 128), name="ImuCNN")
    from fleet.compiler.mit_import import import_mit
    from fleet.compiler.quantize import new_classifier

    return new_classifier(import_mit(MODELS / "mbv2-w0.35.pkl", name="mbv2-w0.35"), 10, init="small")


def _vm(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def measure_torch(model: str, scheme_name: str) -> dict:
    """Run in a fresh process: one fp32 training step at batch 1; returns the byte counts."""
    import torch

    from benchmarks.ablation import graph_to_torch, torch_scheme_params
    from fleet.compiler.scheme import named_scheme

    torch.set_num_threads(1)
    graph = build(model)
    scheme = named_scheme(graph, scheme_name)
    net = graph_to_torch(graph)
    params, masks = torch_scheme_params(net, graph, scheme)
    for p, m in masks.items():
        p.register_hook(lambda g, m=m: g * m)
    opt = torch.optim.SGD(params, lr=1e-3)
    t_in = graph.tensors[graph.input_id]
    x = torch.randn(1, *t_in.shape)
    y = torch.zeros(1, dtype=torch.int64)
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    Path("/proc/self/clear_refs").write_text("5")  # NOTE: resets VmHWM to the current RSS
    before = _vm("VmHWM")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.nn.functional.cross_entropy(net(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    step = _vm("VmHWM") - before
    Path("/proc/self/clear_refs").write_text("5")
    param_b = sum(p.numel() * 4 for p in net.parameters())
    grad_b = sum(p.numel() * 4 for p in params)
    # peak RSS over the whole process life (VmHWM was reset, so use getrusage's max)
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"torch_peak_rss_bytes": peak, "torch_step_rss_bytes": step,
            "torch_tensor_bytes": param_b + grad_b + sum(saved.values()), "torch_saved_bytes": sum(saved.values()),
            "torch_param_bytes": param_b}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(measure_torch(sys.argv[2], sys.argv[3])))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the sparse scheme of each model only")
    ap.add_argument("--models", default="imu,mbv2")
    args = ap.parse_args()
    from fleet.compiler.compile import compile_plan
    from fleet.compiler.scheme import named_scheme

    result: dict = {}
    rows = []
    for model in args.models.split(","):
        if model == "mbv2" and not (MODELS / "mbv2-w0.35.pkl").exists():
            print(f"skip mbv2: {MODELS / 'mbv2-w0.35.pkl'} absent", file=sys.stderr)
            continue
        graph = build(model)
        out = {}
        for sname in CASES[model][:1] if args.quick else CASES[model]:
            _, rep = compile_plan(graph, named_scheme(graph, sname), serialize=False)
            child = subprocess.run([sys.executable, __file__, "--child", model, sname], capture_output=True,
                                   text=True, check=True)
            t = json.loads(child.stdout.strip().splitlines()[-1])
            r = {"ours_peak_sram_bytes": rep.peak_sram_bytes, "ours_arena_bytes": rep.arena_bytes,
                 "ours_trainable_bytes": rep.trainable_bytes, **t,
                 "torch_peak_rss_over_ours": round(t["torch_peak_rss_bytes"] / rep.peak_sram_bytes, 1),
                 "torch_tensor_over_ours": round(t["torch_tensor_bytes"] / rep.peak_sram_bytes, 2)}
            out[sname] = r
            rows.append((model, sname, f"{rep.peak_sram_bytes / 1000:.1f}", f"{rep.arena_bytes / 1000:.1f}",
                         f"{t['torch_tensor_bytes'] / 1000:.1f}", f"{t['torch_step_rss_bytes'] / 1e6:.2f}",
                         f"{t['torch_peak_rss_bytes'] / 1e6:.1f}", r["torch_peak_rss_over_ours"]))
        result[model] = out
    emit(result, rows, ("model", "scheme", "ours peak KB", "ours arena KB", "torch tensors KB", "torch step MB",
                        "torch peak RSS MB", "RSS/ours"))


if __name__ == "__main__":
    main()
