"""merge and resize never overwrite their inputs, and refuse out-of-range options with one line naming the value."""

from __future__ import annotations

import logging

import pytest
import torch
from test_tools import RANKS_A, RANKS_B, make_adapter

from lora2.cli import main
from lora2.export import read_adapter, write_adapter
from lora2.tools.merge import MergeSpec, merge_files
from lora2.tools.resize import ResizeSpec

FRACTION = "fraction must lie in (0, 1], got"


@pytest.fixture
def inputs(tmp_path):
    a = write_adapter(make_adapter(RANKS_A, 0), tmp_path / "a.safetensors", "diffusers", {}, torch.float32)
    b = write_adapter(make_adapter(RANKS_B, 1), tmp_path / "b", "diffusers", {}, torch.float32)  # b/<file>
    peft = write_adapter(make_adapter(RANKS_B, 2), tmp_path / "p", "peft", {}, torch.float32)
    return a, b, peft


def snapshot(*roots) -> dict:
    return {p: p.read_bytes() for root in roots for p in sorted([root] if root.is_file() else root.rglob("*"))
            if p.is_file()}  # fmt: skip


def run(argv: list[str], caplog) -> tuple[int, list[str]]:
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="lora2"):
        code = main(argv)
    return code, [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_merge_and_resize_refuse_to_overwrite_an_input(inputs, tmp_path, caplog, monkeypatch):
    a, b, peft = inputs
    before = snapshot(a, b.parent, peft)
    monkeypatch.chdir(tmp_path)
    link = tmp_path / "link.safetensors"
    link.symlink_to(a)
    cases = [
        ["merge", str(a), str(b), "--out", str(a)],  # the case: --out equal to an input
        ["merge", str(a), str(b), "--out", "./b/../a.safetensors"],  # the same file spelled otherwise
        ["merge", str(a), str(b), "--out", str(link)],  # a link to an input
        ["merge", str(a), str(b.parent), "--out", str(b.parent)],  # a folder whose diffusers file is an input
        ["resize", str(a), "--method", "fixed", "--param", "1", "--out", str(a)],
        ["resize", str(peft), "--method", "fixed", "--param", "1", "--out", str(peft)],  # peft folder in place
        ["resize", str(peft), "--method", "fixed", "--param", "1", "--format", "kohya", "--out", str(peft / "k")],
    ]
    for argv in cases:
        code, errors = run(argv, caplog)
        assert code == 2 and len(errors) == 1 and "would overwrite the input" in errors[0], (argv, errors)
    assert snapshot(a, b.parent, peft) == before
    # beside an input is fine: another file name in its folder
    assert main(["merge", str(a), str(b.parent), "--format", "kohya", "--out", str(b.parent)]) == 0
    assert read_adapter(b.parent / "lora_kohya.safetensors").format == "kohya"


@pytest.mark.parametrize(
    "options, message",
    [
        (["--max-rank", "0"], "max_rank (--max-rank) must be a positive integer, got 0"),
        (["--max-rank", "-2"], "max_rank (--max-rank) must be a positive integer, got -2"),
        (["--param", "0"], "fixed rank (--param) must be a positive integer, got 0.0"),
        (["--param", "2.5"], "fixed rank (--param) must be a positive integer, got 2.5"),
        (["--param", "inf"], "fixed rank (--param) must be a positive integer, got inf"),
        (["--method", "sv_ratio", "--param", "0.5"], "sv_ratio (--param, σ_max / σ_min kept) must be >= 1, got 0.5"),
        (["--method", "sv_fro", "--param", "nan"], f"sv_fro {FRACTION} nan (--param)"),
        (["--method", "sv_cumulative", "--param", "0"], f"sv_cumulative {FRACTION} 0.0 (--param)"),
    ],
)
def test_resize_options_are_validated(inputs, tmp_path, caplog, options, message):
    a, _, _ = inputs
    settings = {"--method": "fixed", "--param": "2", **dict(zip(options[::2], options[1::2]))}
    argv = [
        "resize",
        str(a),
        "--out",
        str(tmp_path / "r.safetensors"),
        *(x for item in settings.items() for x in item),
    ]
    code, errors = run(argv, caplog)
    assert code == 2 and errors == [message] and not (tmp_path / "r.safetensors").exists()


@pytest.mark.parametrize(
    "options, message",
    [
        (["--weights", "nan", "1"], "weight 1 of --weights must be a finite number, got nan"),
        (["--weights", "1", "inf"], "weight 2 of --weights must be a finite number, got inf"),
        (["--weights", "1"], "got 1 weights for 2 adapters"),
        (["--rank-budget", "0"], "rank_budget (--rank-budget) must be a positive integer, got 0"),
        (["--max-rank", "-1"], "max_rank (--max-rank) must be a positive integer, got -1"),
        (["--energy", "0"], "energy must lie in (0, 1] (--energy), got 0.0"),
        (["--energy", "1.5"], "energy must lie in (0, 1] (--energy), got 1.5"),
    ],
)
def test_merge_options_are_validated(inputs, tmp_path, caplog, options, message):
    a, b, _ = inputs
    code, errors = run(["merge", str(a), str(b), *options, "--out", str(tmp_path / "m.safetensors")], caplog)
    assert code == 2 and errors == [message] and not (tmp_path / "m.safetensors").exists()


def test_specs_validate_before_reading(tmp_path):
    """Library callers get the same errors, before any file is opened (the inputs here do not exist)."""
    with pytest.raises(ValueError, match="must be a positive integer, got -2"):
        ResizeSpec(input="missing", out="o", method="fixed", param=4, max_rank=-2)
    with pytest.raises(ValueError, match="finite number, got nan"):
        MergeSpec(inputs=["x", "y"], out="o", weights=[float("nan"), 1.0])


def test_a_merge_that_overflows_is_refused(inputs, tmp_path):
    a, b, _ = inputs
    with pytest.raises(ValueError, match="m.safetensors: module .* (NaN or Inf|too large)"):
        merge_files(MergeSpec(inputs=[str(a), str(b)], out=str(tmp_path / "m.safetensors"), weights=[1e38, 1e38]))
    assert not (tmp_path / "m.safetensors").exists()


def test_merge_and_resize_check_files_like_inspect(inputs, tmp_path, caplog):
    """A NaN weight: inspect, merge and resize all refuse the file with the same line, and write nothing."""
    from safetensors.torch import load_file, save_file

    a, _, _ = inputs
    tensors = load_file(a)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] * float("nan")
    nan = tmp_path / "nan.safetensors"
    save_file(tensors, str(nan))
    out = tmp_path / "o.safetensors"
    lines = []
    for argv in (["inspect", str(nan)], ["merge", str(a), str(nan), "--out", str(out)],
                 ["resize", str(nan), "--method", "fixed", "--param", "1", "--out", str(out)]):  # fmt: skip
        code, errors = run(argv, caplog)
        assert code == 2
        lines += errors
    assert len(set(lines)) == 1 and lines[0].startswith(f"{nan}: module") and "NaN or Inf" in lines[0]
    assert not out.exists()
