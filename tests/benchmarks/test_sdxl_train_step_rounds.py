"""Rounds, budget and the CUDA-graph gradient check of benchmarks/sdxl_train_step.py (CPU, seconds)."""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

import lora2
from lora2.lora.model import adapters_of


def test_schedule_interleaves_pairs_and_swaps_their_order(bench):
    specs = bench.default_rows((4, 16), ["sdxl", "koala700m"], [1])
    order = bench.schedule(specs, repeats=3, once={"lora2+cudagraph"})
    backbones = [group[0].backbone for _, group in order]
    assert backbones == sorted(backbones, key=["sdxl", "koala700m"].index)  # one model build per backbone
    pairs = [(r, [s.method for s in g]) for r, g in order if len(g) == 2]
    assert pairs and all(methods == (["peft", "lora2"] if r % 2 == 0 else ["lora2", "peft"]) for r, methods in pairs)
    for r, group in order:
        assert len({(s.rank, s.batch, s.grad_ckpt) for s in group}) == 1
        assert r == 0 or all(s.method != "lora2+cudagraph" for s in group)
    measured = [s.key for _, g in order for s in g]
    assert all(measured.count(s.key) == (1 if s.method == "lora2+cudagraph" else 3) for s in specs)


@pytest.fixture()
def fake_bench(bench, monkeypatch):
    """Bench.measure replaced by synthetic rounds: peft steps 1.0 s, LoRA² 1.1 s, with a drift of +50 % in round 1."""
    calls = []

    def measure(self, spec, round_index=0):
        calls.append((round_index, spec.key))
        time.sleep(0.25)
        base = {"floor": 0.5, "peft": 1.0, "lora2": 1.1}[spec.method] * (1.5 if round_index == 1 else 1.0)
        times = [base, base, base * 1.2]
        return {
            **bench.asdict(spec),
            "round": round_index,
            "median_step_s": base,
            "step_times_s": times,
            "peak_mem_gib": 2.0 if spec.method == "lora2" else 2.2,
            "loss_finite": True,
        }

    monkeypatch.setattr(bench.Bench, "measure", measure)
    monkeypatch.setattr(bench, "environment", lambda device: {"device": "fake"})
    rows = [
        bench.RowSpec("sdxl", "floor", None, 1),
        bench.RowSpec("sdxl", "peft", 4, 1),
        bench.RowSpec("sdxl", "lora2", 4, 1),
    ]
    monkeypatch.setattr(bench, "default_rows", lambda *args: rows)
    return calls


def test_rounds_report_pooled_medians_spread_and_paired_ratios(bench, fake_bench, tmp_path):
    rows = bench.main(["--tiny", "--out-dir", str(tmp_path), "--repeats", "3"])
    assert [r for r, _ in fake_bench] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [key.split("/")[1] for _, key in fake_bench[1:3]] == ["peft", "lora2"]
    assert [key.split("/")[1] for _, key in fake_bench[4:6]] == ["lora2", "peft"]  # swapped in odd rounds
    by_method = {row["method"]: row for row in rows}
    lora, peft = by_method["lora2"], by_method["peft"]
    assert lora["rounds"] == 3 and lora["round_index"] == [0, 1, 2] and lora["steps_timed"] == 9
    assert lora["round_median_step_s"] == pytest.approx([1.1, 1.65, 1.1])
    assert lora["round_spread_s"] == pytest.approx([1.1, 1.65])
    assert lora["median_step_s"] == pytest.approx(1.1 * 1.2)  # median of the 9 pooled step times
    assert lora["ratio_time_vs_peft"] == pytest.approx(1.1)
    assert lora["round_ratio_time_vs_peft"] == pytest.approx([1.1, 1.1, 1.1])
    assert lora["ratio_time_vs_peft_round_median"] == pytest.approx(1.1)
    assert lora["ratio_mem_vs_peft"] == pytest.approx(2.0 / 2.2)
    assert peft["ratio_time_vs_peft"] == 1.0 and "round_ratio_time_vs_peft" not in peft
    assert json.loads((tmp_path / "sdxl_train_step.json").read_text()) == json.loads(json.dumps(rows))
    assert "3: 1.100–1.650" in bench.markdown_table(rows)


def test_budget_starts_no_group_that_would_overrun(bench, fake_bench, tmp_path):
    # round 0 takes 0.25 s (floor) + 0.5 s (pair); round 1 would end past 1.0 s: skipped, and so is round 2
    rows = bench.main(["--tiny", "--out-dir", str(tmp_path), "--repeats", "3", "--budget-s", "1.0"])
    by_method = {row["method"]: row for row in rows}
    assert by_method["peft"]["rounds"] == by_method["lora2"]["rounds"] == 1
    assert by_method["lora2"]["rounds_skipped"] == 2 and "time budget" in by_method["lora2"]["skip_reason"]
    assert by_method["peft"]["median_step_s"] == 1.0 and by_method["floor"]["rounds"] == 1
    skipped = bench.main(["--tiny", "--out-dir", str(tmp_path), "--budget-s", "0"])
    assert all(row["error"].startswith("skipped: time budget") for row in skipped)
    assert len(json.loads((tmp_path / "sdxl_train_step.json").read_text())) == 3


def test_compare_gradients_finds_equal_and_different_steps(bench):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4))
    lora2.inject(model, lora2.LoRA2Config(target_modules=["0", "2"], init_rank=2, max_rank=4))
    with torch.no_grad():
        for _, layer in lora2.lora_layers(model):
            layer.lora_B.normal_()  # B = 0 at initialisation would leave A without gradient
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params, names = [p for _, p in named], [name for name, _ in named]
    x = torch.randn(5, 8)

    def run(scale: float):
        def fn():
            for p in params:
                p.grad = None
            loss = scale * model(x).square().mean() + lora2.regularization(model)
            loss.backward()
            return loss

        return fn

    same = bench.compare_gradients(params, run(1.0), run(1.0), names)
    assert same["graph_vs_eager_ok"] and same["graph_vs_eager_max_abs_diff"] == 0.0
    assert set(same["graph_vs_eager_by_param"]) == {"lora_A", "lora_B", "log_nu"}
    other = bench.compare_gradients(params, run(1.0), run(1.1), names)
    assert not other["graph_vs_eager_ok"] and other["graph_vs_eager_rel_diff"] > 0.01
    assert other["eager_vs_eager_max_abs_diff"] == 0.0


def test_tiny_rounds_end_to_end(bench, monkeypatch, tmp_path):
    """The real step on the tiny UNet, two rounds of one pair; the CUDA-graph row is skipped on CPU with a reason."""
    rows = [
        bench.RowSpec("sdxl", "peft", 4, 1),
        bench.RowSpec("sdxl", "lora2", 4, 1),
        bench.RowSpec("sdxl", "lora2+cudagraph", 4, 1),
    ]
    monkeypatch.setattr(bench, "default_rows", lambda *args: rows)
    out = bench.main(["--tiny", "--out-dir", str(tmp_path), "--repeats", "2", "--warmup", "1", "--steps", "1"])
    by_method = {row["method"]: row for row in out}
    for method in ("peft", "lora2"):
        row = by_method[method]
        assert row["rounds"] == 2 and row["round_index"] == [0, 1] and row["loss_finite"]
        assert len(row["round_step_times_s"]) == 2 and row["median_step_s"] > 0
        for key in ("backbone", "rank", "batch", "grad_ckpt", "peak_mem_gib", "ratio_mem_vs_peft", "torch"):
            assert key in row
    assert len(by_method["lora2"]["round_ratio_time_vs_peft"]) == 2
    assert by_method["lora2+cudagraph"]["error"] == "skipped: CUDA graphs need a CUDA device, not cpu"


def python_state(module: nn.Module) -> list[tuple[object, dict]]:
    """Attributes of every submodule and of the lora2 objects they hold (the LoRA² forward hook and its caches)."""
    objects = list(module.modules())
    objects += [
        value
        for m in module.modules()
        for value in vars(m).values()
        if type(value).__module__.startswith("lora2.") and not isinstance(value, nn.Module)
    ]
    return [(obj, dict(vars(obj))) for obj in objects]


def restore(state: list[tuple[object, dict]]) -> None:
    for obj, attributes in state:
        vars(obj).clear()
        vars(obj).update(attributes)


def graph_stand_in(captured: list):
    """CPU stand-in for ``torch.cuda.make_graphed_callables`` with the two properties that matter to Python state.

    Capture: the module runs once with its hooks (their side effects stay, as in a real capture) and that graph is
    freed by a backward to the parameters and inputs (as the backward capture does). Replay: the same outputs and
    gradients as an eager call, but every Python attribute is left as it was before the call (a replay runs no
    Python, so no hook).
    """

    def make_graphed_callables(module, sample_args):
        captured.append(len(sample_args))
        out = module(*sample_args)
        wrt = [p for p in module.parameters() if p.requires_grad] + [a for a in sample_args if a.requires_grad]
        torch.autograd.grad(out, wrt, torch.ones_like(out), allow_unused=True)

        def replay(*args):
            state = python_state(module)
            out = module(*args)
            restore(state)
            return out

        return replay

    return make_graphed_callables


def test_graph_stand_in_leaves_python_state_alone():
    """The stand-in's replay computes the eager output but leaves the LoRA² hook's Λ and ν as the capture left them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4))
    lora2.inject(model, lora2.LoRA2Config(target_modules=["0", "2"], init_rank=2, max_rank=4))
    layers = [layer for _, layer in lora2.lora_layers(model)]
    hook = adapters_of(model)
    x = torch.randn(5, 8)  # (B, d_in)
    replay = graph_stand_in([])(model, (x,))

    def held() -> list:
        return [layer.storage_lambda for layer in layers] + [getattr(hook, "nu", None)]

    after_capture = held()
    assert after_capture[0] is not None
    out = replay(x)  # (B, d_out)
    assert all(now is then for now, then in zip(held(), after_capture))
    torch.testing.assert_close(out, model(x))
    assert held()[0] is not after_capture[0]  # an eager call runs the hook


def test_cudagraph_row_with_graph_stand_in(bench, monkeypatch):
    """The CUDA-graph row on the tiny UNet with a real LoRA² model and the stand-in graph: capture and replays in
    the warm-up (each step followed by the optimizer and its rank update), then eager, eager, graph, eager from one
    state in the gradient check, then timed graph steps. The H200 run of 2026-11-29 01:09 failed here in its first
    warm-up step ("Trying to backward through the graph a second time": the rank regularization reused the ν that
    the forward hook had computed during the capture)."""
    captured = []
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", graph_stand_in(captured))
    args = bench.parse_args(["--tiny", "--warmup", "2", "--steps", "2"])
    row = bench.Bench(args).measure(bench.RowSpec("sdxl", "lora2+cudagraph", 4, 1))
    assert captured[0] == 5 and row["graph_captures"] == len(captured)  # sample + 4 conditioning tensors
    assert row["loss_finite"] and row["steps_timed"] == 2
    assert row["graph_vs_eager_ok"] and "graph_check_error" not in row, row
    assert row["graph_vs_eager_rel_diff"] <= 1e-6 and row["eager_after_graph_rel_diff"] <= 1e-6
    assert set(row["graph_vs_eager_by_param"]) == {"lora_A", "lora_B", "log_nu"}
    assert row["graph_vs_eager_by_param"]["lora_B"]["max_abs_grad"] > 0
    assert row["graph_vs_eager_by_param"]["log_nu"]["max_abs_grad"] > 0  # the rank regularization's gradient


def test_graph_step_sequence_matches_eager(bench, monkeypatch):
    """Eager twice, stand-in graph, eager again, graph after an optimizer step: each graph step's gradients equal
    an eager step's from the same state, through the benchmark's forward on a real LoRA² model of the tiny UNet."""
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", graph_stand_in([]))
    config = bench.tiny_unet_config()
    unet = bench.build_unet(config, torch.device("cpu"))
    lora2.inject(unet, lora2.LoRA2Config(target_modules=bench.TARGETS, init_rank=4, max_rank=16, adaptive=True))
    layers = [layer for _, layer in lora2.lora_layers(unet)]
    with torch.no_grad():
        for layer in layers:
            layer.lora_B.normal_(std=0.1)  # B = 0 at initialisation would leave A and ν without gradient
    inputs = bench.make_inputs(config, 1, 8, torch.device("cpu"))
    cond = (inputs["timestep"], inputs["encoder_hidden_states"], inputs["text_embeds"], inputs["time_ids"])
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    graphed = {}

    def forward_backward(use_graph: bool) -> list[torch.Tensor]:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            if not use_graph:
                pred = bench.UNetCall(unet)(inputs["sample"], *cond)
            else:
                if "fn" not in graphed:
                    graphed["fn"] = torch.cuda.make_graphed_callables(bench.UNetCall(unet), (inputs["sample"], *cond))
                pred = graphed["fn"](inputs["sample"], *cond)
        loss = torch.nn.functional.mse_loss(pred.float(), inputs["target"]) + lora2.regularization(unet)
        loss.backward()
        return [p.grad.clone() for p in params]

    def assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)

    first = forward_backward(False)
    assert_same(forward_backward(False), first)
    assert_same(forward_backward(True), first)
    assert_same(forward_backward(False), first)
    optimizer.step()  # moves ν and every weight: the graph's next step must follow
    after_step = forward_backward(False)
    assert_same(forward_backward(True), after_step)
    assert_same(forward_backward(True), after_step)
    assert_same(forward_backward(False), after_step)
