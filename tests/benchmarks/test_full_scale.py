"""benchmarks/full_scale.py on the CPU: tiny pipelines of the three families, rows run through the real CLI, the
step probe on a tiny torch loop, the vs-script plan and ratios, the table, the diffusers script's flags."""

from __future__ import annotations

import argparse
import ast
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "full_scale.py"
PROBE = REPO / "benchmarks" / "step_probe"
# ../shared beside the checkout (or beside the folder of worktrees)
SHARED = next((p for p in (REPO.parent / "shared", REPO.parent.parent / "shared") if (p / "configs").is_dir()), None)
needs_shared = pytest.mark.skipif(SHARED is None, reason="../shared (configs, peers, datasets) is not here")


@pytest.fixture(scope="module")
def fs(load_script):
    return load_script("full_scale")


@pytest.fixture(scope="module")
def tiny(fs, tmp_path_factory):
    """Tiny pipelines of the three families and a prepared data folder."""
    if SHARED is None:
        pytest.skip("../shared is not here")
    root = tmp_path_factory.mktemp("full_scale")
    fs.build(SHARED / "configs", root / "fs", ["sd15", "koala-700m", "sdxl"], "cpu", "fp32", tiny=True)
    fs.prepare(SHARED, root / "data")
    return root


def _run_probe(tmp_path: Path, code: str, env_path: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROBE), os.environ.get("PYTHONPATH", "")])}
    env.pop("LORA2_STEP_PROBE", None)
    if env_path is not None:
        env["LORA2_STEP_PROBE"] = env_path
    script = tmp_path / "program.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------------------------------------- the probe
LOOP = """
    import torch

    class Outer(torch.optim.SGD):  # a wrapper whose step calls another optimizer's: one step, not two
        def __init__(self, params, inner):
            super().__init__(params, lr=0.1)
            self.inner = inner

        def step(self, closure=None):
            self.inner.step()
            return super().step(closure)

    model = torch.nn.Linear(3, 2)
    plain = torch.optim.AdamW(model.parameters())
    for _ in range(6):
        model(torch.randn(4, 3)).sum().backward()
        plain.step()
        plain.zero_grad()
    nested = Outer([torch.nn.Parameter(torch.zeros(2))], torch.optim.SGD(model.parameters(), lr=0.1))
    for _ in range(3):
        nested.step()
"""


def test_probe_records_every_optimizer_step_once(tmp_path):
    result = _run_probe(tmp_path, LOOP, str(tmp_path / "probe-{pid}.json"))
    assert result.returncode == 0, result.stderr
    (path,) = tmp_path.glob("probe-*.json")
    record = json.loads(path.read_text())
    assert len(record["steps"]) == 9  # 6 AdamW steps + 3 nested steps counted once each
    assert record["steps"] == sorted(record["steps"])
    assert record["probe_loaded"] <= record["steps"][0] <= record["exit_time"]
    assert record["exit"] == "atexit" and record["cuda"] is False and record["max_memory_reserved"] is None
    assert path.name == f"probe-{record['pid']}.json"


def test_probe_is_silent_without_the_variable_and_never_imports_torch(tmp_path):
    program = "import sys\nprint('torch' in sys.modules)\n"
    result = _run_probe(tmp_path, program, None)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr
    assert not list(tmp_path.glob("*.json"))
    result = _run_probe(tmp_path, program, str(tmp_path / "p.json"))
    assert result.stdout.strip() == "False"
    assert json.loads((tmp_path / "p.json").read_text())["steps"] == []


def test_probe_writes_on_sigterm(tmp_path):
    code = """
        import sys, time, torch
        model = torch.nn.Linear(2, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            optimizer.step()
        print("ready", flush=True)
        time.sleep(60)
    """
    script = tmp_path / "program.py"
    script.write_text(textwrap.dedent(code))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROBE), os.environ.get("PYTHONPATH", "")])}
    env["LORA2_STEP_PROBE"] = str(tmp_path / "p.json")
    process = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == -signal.SIGTERM
    record = json.loads((tmp_path / "p.json").read_text())
    assert record["exit"] == "SIGTERM" and len(record["steps"]) == 2


def test_step_intervals_leave_out_the_warm_up_and_pool_processes(fs):
    ends = [0.0, 1.0, 3.0, 6.0, 10.0, 15.0, 21.0]
    assert fs.step_intervals(ends, 5) == [5.0, 6.0]  # steps 6 and 7
    assert fs.step_intervals(ends, 0) == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    records = [
        {"steps": ends, "max_memory_allocated": 2 * fs.GIB, "max_memory_reserved": 3 * fs.GIB, "process_start": -8.0},
        {
            "steps": [100.0, 101.0, 110.0],
            "max_memory_allocated": 4 * fs.GIB,
            "max_memory_reserved": None,
            "exit_time": 112.5,
        },
        {"steps": [], "max_memory_allocated": None},  # a launcher process
    ]
    summary = fs.probe_summary(records, warmup=1)
    assert summary["intervals"] == 6 + 2
    assert summary["s_per_step"] == 3.5  # median of 1 2 3 4 5 6 1 9
    assert summary["peak_alloc_gib"] == 4.0 and summary["peak_process_gib"] == 3.0
    assert summary["steps_per_process"] == [7, 3]
    assert summary["to_first_step_s"] == 8.0 and summary["after_last_step_s"] == 2.5


# ---------------------------------------------------------------------------------------------- build
@needs_shared
def test_full_size_configs_have_the_published_parameter_counts(fs):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    configs = SHARED / "configs"
    with torch.device("meta"):
        for backbone, spec in fs.BACKBONES.items():
            unet = UNet2DConditionModel.from_config(fs.read_config(configs, Path(spec["unet"]).stem, tiny=False))
            assert sum(p.numel() for p in unet.parameters()) == fs.EXPECTED_PARAMETERS[(backbone, "unet")]
        config = fs.read_config(configs, "sdxl_text_encoder_2", tiny=False)
        config = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype")}
        encoder = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(config))
        assert sum(p.numel() for p in encoder.parameters()) == fs.EXPECTED_PARAMETERS[("sdxl", "text_encoder_2")]
        sd15_vae = AutoencoderKL.from_config(fs.sd15_vae_config(configs, tiny=False))
    assert sd15_vae.config.scaling_factor == 0.18215


@needs_shared
def test_tiny_builds_load_as_diffusers_pipelines(tiny):
    import torch
    from diffusers import DiffusionPipeline

    expected = {"sdxl": "StableDiffusionXLPipeline", "koala-700m": "StableDiffusionXLPipeline",
                "sd15": "StableDiffusionPipeline"}  # fmt: skip
    for backbone, class_name in expected.items():
        pipe = DiffusionPipeline.from_pretrained(tiny / "fs" / backbone, torch_dtype=torch.float32)
        assert type(pipe).__name__ == class_name
        assert pipe.tokenizer.model_max_length == 77
        info = json.loads((tiny / "fs" / backbone / "build.json").read_text())
        assert info["tiny"] and info["parameters"]["unet"] == sum(p.numel() for p in pipe.unet.parameters())
    koala = DiffusionPipeline.from_pretrained(tiny / "fs" / "koala-700m", torch_dtype=torch.float32)
    assert koala.unet.mid_block is None and (tiny / "fs" / "koala-700m" / "vae").is_symlink()
    sd15 = DiffusionPipeline.from_pretrained(tiny / "fs" / "sd15", torch_dtype=torch.float32)
    assert sd15.vae.config.scaling_factor == 0.18215


@needs_shared
def test_prepare_copies_photos_class_images_and_the_script(tiny):
    data = tiny / "data"
    assert len(list((data / "dreambooth" / "dog").glob("*.jpg"))) == 5
    assert (data / "dreambooth" / "prompts_and_classes.txt").is_file()
    assert len(list((data / "class_images").iterdir())) == 2
    assert (data / "peers" / "train_dreambooth_lora_sdxl.py").is_file()
    assert (data / "peers" / "LICENSE-diffusers").is_file()
    assert json.loads((data / "prepare.json").read_text())["class_name"] == "dog"


# ---------------------------------------------------------------------------------------------- rows
@needs_shared
def test_rows_run_through_the_cli_and_merge_into_one_file(fs, tiny):
    out = tiny / "out" / "full_scale.json"
    common = ["--pipelines", str(tiny / "fs"), "--data", str(tiny / "data"), "--out", str(out),
              "--work", str(tiny / "work"), "--device", "cpu", "--precision", "no", "--resolution", "64",
              "--steps", "3", "--warmup", "1", "--gpus", "0"]  # fmt: skip
    rows = ["sdxl-adaptive", "sdxl-torchrun2"]
    run = subprocess.run([sys.executable, str(SCRIPT), "run", "--rows", *rows, *common], capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr
    # a second call that the budget stops: the earlier result stays
    again = [sys.executable, str(SCRIPT), "run", "--rows", "sdxl-adaptive", "sd15-*", *common, "--budget-s", "1"]
    assert subprocess.run(again, capture_output=True, text=True, timeout=600).returncode == 0
    results = json.loads(out.read_text())
    by_name = {row["name"]: row for row in results["rows"]}
    assert list(by_name) == ["sdxl-adaptive", "sdxl-torchrun2", "sd15-adaptive"]  # the table's order
    row = by_name["sdxl-adaptive"]
    assert row["status"] == "ok", row["error"]
    assert row["backbone"] == "sdxl" and row["steps_per_process"] == [3] and row["intervals"] == 2
    assert row["s_per_step"] > 0 and row["wall_s"] > row["to_first_step_s"] > 0 and row["after_last_step_s"] > 0
    assert row["final_mean_rank"] >= 1 and row["adapter_mib"] > 0 and row["adapter_modules"] > 0
    assert "--max-train-steps 3" in row["command"] and "--device cpu" in row["command"]
    assert row["peak_alloc_gib"] is None  # no CUDA here
    assert by_name["sdxl-torchrun2"]["status"] == "skipped" and "2 GPUs" in by_name["sdxl-torchrun2"]["error"]
    assert by_name["sd15-adaptive"]["status"] == "not_run"
    assert "5 steps" in results["measurement"]["s_per_step"] and len(results["calls"]) == 2
    with tarfile.open(out.parent / "logs.tgz") as tar:
        names = tar.getnames()
    assert "sdxl-adaptive/log.txt" in names and any(n.startswith("sdxl-adaptive/probe-") for n in names)


def test_rows_cover_every_value_of_the_train_options_with_sdxl(fs):
    from lora2.cli import build_parser
    from lora2.train.config import TrainConfig

    train = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    choices = {a.dest: a.choices for a in train._actions if a.choices and a.option_strings}
    defaults = TrainConfig().to_dict()
    common = fs.train_args(fs.Setup(pipelines=Path("fs"), data=Path("data"), work=Path("work")), "sdxl", Path("out"))
    flags = [arg for row in fs.ROWS if row.backbone == "sdxl" for arg in [*common, *row.args]]
    for option in ("rank_mode", "adapter_type", "optimizer", "lr_scheduler", "mixed_precision", "lambda_scaling"):
        flag = "--" + option.replace("_", "-")
        given = {flags[i + 1] for i, arg in enumerate(flags) if arg == flag}
        assert set(choices[option]) <= given | {defaults[option]}, option
    for switch in ("--gradient-checkpointing", "--with-prior-preservation", "--train-text-encoder",
                   "--no-cache-latents", "--random-flip", "--no-center-crop"):  # fmt: skip
        assert switch in flags
    kinds = {row.kind for row in fs.ROWS}
    assert kinds == {"train", "resume", "torchrun", "generate", "eval"}
    assert {row.backbone for row in fs.ROWS} == set(fs.BACKBONES)


def test_select_rows_takes_names_and_globs_in_the_order_given(fs):
    chosen = fs.select_rows(["sd15-adaptive", "sdxl-fp*", "sdxl-fp32"])
    assert [row.name for row in chosen] == ["sd15-adaptive", "sdxl-fp16", "sdxl-fp32"]
    assert len(fs.select_rows(["all"])) == len(fs.ROWS)
    with pytest.raises(ValueError, match="no row matches"):
        fs.select_rows(["sdxl-nothing"])


def test_merge_keeps_results_a_later_call_did_not_run(fs):
    results = {"rows": [{"name": "sdxl-fp16", "status": "ok"}]}
    fs.merge_row(results, {"name": "sdxl-fp16", "status": "not_run"})
    fs.merge_row(results, {"name": "sdxl-adaptive", "status": "failed"})
    assert results["rows"] == [{"name": "sdxl-adaptive", "status": "failed"}, {"name": "sdxl-fp16", "status": "ok"}]


def test_merge_files_of_calls_that_grew_one_file(fs, tmp_path):
    run = {"call": "c1", "program": "script", "config": "script", "repeat": 0, "steps": 30, "role": "round"}
    first = {"rows": [{"name": "sdxl-fp16", "status": "ok"}], "vs_script": {"fixed64": {"time_ratio": 1.1},
             "runs": [run]}, "calls": [{"id": "c1"}]}  # fmt: skip
    second = {"rows": [{"name": "sdxl-fp16", "status": "not_run"}, {"name": "sd15-adaptive", "status": "ok"}],
              "vs_script": {"fixed64_ckpt": {"time_ratio": 0.9}, "runs": [run, {**run, "call": "c2"}]},
              "calls": [{"id": "c1"}, {"id": "c2"}]}  # fmt: skip
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, data in zip(paths, (first, second)):
        path.write_text(json.dumps(data))
    merged = fs.merge_files(paths)
    assert [(r["name"], r["status"]) for r in merged["rows"]] == [("sdxl-fp16", "ok"), ("sd15-adaptive", "ok")]
    assert set(merged["vs_script"]) == {"fixed64", "fixed64_ckpt", "runs"} and len(merged["vs_script"]["runs"]) == 2
    assert [call["id"] for call in merged["calls"]] == ["c1", "c2"]


def test_wall_from_a_row_divides_by_the_fastest_script_run_of_as_many_steps(fs):
    script = {"config": "script", "role": "wall", "status": "ok", "s_per_step": 0.6, "peak_process_gib": 15.0}
    results = {"rows": [{"name": "sdxl-adaptive-500", "status": "ok", "steps_per_process": [500], "wall_s": 180.0,
                         "s_per_step": 0.2, "peak_process_gib": 16.5}],
               "vs_script": {"runs": [{**script, "call": "a", "steps": 500, "wall_s": 360.0},
                                      {**script, "call": "b", "steps": 500, "wall_s": 300.0},
                                      {**script, "call": "c", "steps": 20, "wall_s": 40.0}]}}  # fmt: skip
    entry = fs.wall_from_row(results, "sdxl-adaptive-500")
    assert entry["wall_500"]["time_ratio"] == 0.6 and entry["wall_500"]["mem_ratio"] == 1.1
    assert entry["wall_500"]["same_call"] is False and entry["wall_500"]["time_ratios_to_other_script_runs"] == [0.5]
    assert entry["fast_wall_500"]["same_runs_as"] == "wall_500"
    with pytest.raises(ValueError, match="sdxl-adaptive-400"):
        fs.wall_from_row(results, "sdxl-adaptive-400")


# ---------------------------------------------------------------------------------------------- vs the script
def test_vs_plan_interleaves_rounds_and_puts_whole_runs_last(fs):
    plan = fs.vs_plan(fs.LORA2_CONFIGS, repeats=2, steps=30, wall_steps=500, wall={"adaptive": ()})
    one_round = [("script", "script"), ("lora2", "fixed64"), ("lora2", "adaptive"), ("script", "script_ckpt"),
                 ("lora2", "fixed64_ckpt"), ("lora2", "adaptive_ckpt")]  # fmt: skip
    assert [(p.program, p.config) for p in plan[:12]] == one_round * 2
    assert [p.repeat for p in plan[:12]] == [0] * 6 + [1] * 6
    assert [(p.program, p.config, p.steps, p.role) for p in plan[12:]] == [
        ("script", "script", 500, "wall"),
        ("lora2", "adaptive", 500, "wall"),
    ]


def test_vs_summary_ratios_are_lora2_over_script(fs):
    def run(config, repeat, seconds, reserved, role="round", wall=60.0):
        return {"config": config, "repeat": repeat, "s_per_step": seconds, "peak_process_gib": reserved,
                "peak_train_reserved_gib": reserved, "nvidia_smi_gib": None, "peak_alloc_gib": 1.0,
                "status": "ok", "role": role, "steps": 500 if role == "wall" else 30, "wall_s": wall}  # fmt: skip

    runs = [run("script", 0, 0.40, 10.0), run("fixed64", 0, 0.44, 12.0), run("script", 1, 0.50, 10.0),
            run("fixed64", 1, 0.45, 12.0), run("script", 0, 0.4, 10.0, "wall", 300.0),
            run("adaptive", 0, 0.4, 9.0, "wall", 270.0)]  # fmt: skip
    configs = {"fixed64": fs.LORA2_CONFIGS["fixed64"], "adaptive": ()}
    summary = fs.vs_summary(runs, configs, {"adaptive": ()})
    assert summary["fixed64"]["time_ratio"] == round(0.445 / 0.45, 3)
    assert summary["fixed64"]["mem_ratio"] == 1.2
    assert summary["fixed64"]["per_repeat_time_ratio"] == [1.1, 0.9]
    assert summary["fixed64"]["nvidia_smi_ratio"] is None
    assert "adaptive" not in summary  # no round of it in this call
    assert summary["wall_500"]["time_ratio"] == 0.9 and summary["wall_500"]["lora2_config"] == "adaptive"


@needs_shared
def test_the_script_accepts_the_flags_we_pass(fs, tmp_path):
    """The peers script's own parse_args (its source, with a stand-in for torchvision's InterpolationMode)."""
    source = (SHARED / "peers" / "train_dreambooth_lora_sdxl.py").read_text(encoding="utf-8")
    function = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "parse_args")
    namespace = {"argparse": argparse, "os": os, "warnings": __import__("warnings"),
                 "transforms": argparse.Namespace(InterpolationMode=type("Mode", (), {"LANCZOS": 1}))}  # fmt: skip
    exec(compile(ast.Module([function], []), "parse_args", "exec"), namespace)
    setup = fs.Setup(pipelines=tmp_path / "fs", data=tmp_path / "data", work=tmp_path / "work")
    for checkpointing in (False, True):
        command = fs.script_command(setup, tmp_path / "out", 30, checkpointing)
        args = namespace["parse_args"](command[2:])
        assert (args.rank, args.mixed_precision, args.learning_rate, args.train_batch_size) == (64, "bf16", 1e-4, 1)
        assert (args.max_train_steps, args.resolution, args.gradient_checkpointing) == (30, 1024, checkpointing)
        assert args.validation_prompt is None and args.pretrained_model_name_or_path == str(tmp_path / "fs" / "sdxl")
    assert set(fs.SCRIPT_FLAGS) <= {a for a in fs.script_command(setup, tmp_path, 1, True) if a.startswith("--")}


# ---------------------------------------------------------------------------------------------- table
def test_markdown_shows_rows_failures_and_ratios(fs):
    results = {
        "rows": [
            {"name": "sdxl-adaptive", "backbone": "sdxl", "status": "ok", "s_per_step": 0.49, "peak_alloc_gib": 14.2,
             "peak_process_gib": 17.3, "nvidia_smi_gib": 17.9, "final_mean_rank": 25.0, "adapter_mib": 138.4,
             "wall_s": 41.0, "command": "python -m lora2.cli train ..."},
            {"name": "sdxl-prior-generated", "backbone": "sdxl", "status": "failed",
             "error": "lora2 train exited with 1\nRuntimeError: Input type (c10::BFloat16) and bias type (float)"},
            {"name": "sdxl-torchrun2", "backbone": "sdxl", "status": "skipped", "error": "needs 2 GPUs"},
        ],
        "vs_script": {
            "fixed64": {"time_ratio": 1.04, "mem_ratio": 1.18, "lora2_s_per_step": 0.46, "script_s_per_step": 0.44,
                        "lora2_peak_process_gib": 18.4, "script_peak_process_gib": 15.6},
            "wall_500": {"time_ratio": 1.1, "lora2_wall_s": 330.0, "script_wall_s": 300.0, "lora2_config": "adaptive"},
            "runs": [],
        },
    }  # fmt: skip
    text = fs.markdown(results, commands=True)
    assert "| sdxl-adaptive | sdxl | ok | 0.490 | 14.2 | 17.3 | 17.9 | 25.0 | 138.4 | 41 |" in text
    assert "| sdxl-prior-generated | sdxl | **failed** | — |" in text
    assert "- sdxl-prior-generated (failed): `RuntimeError: Input type (c10::BFloat16)" in text
    assert "| fixed64 | 1.04 | 0.460 | 0.440 | 1.18 | 18.4 | 15.6 | time ≤ 0.95×, memory ≤ 1.0× |" in text
    assert "| wall_500 (adaptive, whole run) | 1.10 | 330 s | 300 s |" in text
    assert "python -m lora2.cli train ..." in text
