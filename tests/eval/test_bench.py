"""`lora2 bench` with stand-in jobs: grid layout, resumability, a crashing cell recorded, dependencies, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora2.cli import main
from lora2.eval.bench import RESIZE_COMMAND, Bench, BenchConfig, Method, bench, method_registry, resolve_methods
from lora2.eval.evaluate import adapter_summary
from lora2.eval.report import report

FAKE = [sys.executable, str(Path(__file__).parent / "fake_jobs.py")]


def _config(out: Path, dreambooth_root: Path, methods: list[str], **overrides) -> BenchConfig:
    values = dict(
        subjects=["toy1"], methods=methods, out=str(out), seeds=[0, 1], data_root=str(dreambooth_root), steps=2,
        base="hub-org/some-model",
        gpus=[], cpu_jobs=2, poll_seconds=0.05, train_command=[*FAKE, "train"], eval_command=[*FAKE, "eval"],
        resize_command=[*FAKE, "resize"],
    )  # fmt: skip
    return BenchConfig(**{**values, **overrides})


def _calls(path: Path) -> list[list[str]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _with_unsupported(monkeypatch) -> None:
    """A registry with one unsupported method (no built-in method is unsupported any more)."""
    from lora2.eval import bench as bench_module

    registry = method_registry()
    registry["notyet"] = Method("notyet", "a method", kind="unsupported", reason="lora2 train has no NotYet option")
    monkeypatch.setattr(bench_module, "method_registry", lambda: registry)


def test_bench_resumes_and_records_a_crash(tmp_path, dreambooth_root, monkeypatch):
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    monkeypatch.setenv("FAKE_CRASH_RANK", "16")
    _with_unsupported(monkeypatch)
    out = tmp_path / "bench"
    states = bench(_config(out, dreambooth_root, ["fixed-8", "fixed-16", "lora2", "notyet"]))
    assert states == {"done": 4, "failed": 2, "unsupported": 2}

    cell = out / "cells" / "toy1" / "fixed-16" / "seed0"
    status = json.loads((cell / "status.json").read_text())
    assert status["state"] == "failed" and len(status["attempts"]) == 2  # retried once
    assert "exit code 1" in status["error"] and "CUDA out of memory (fake)" in status["error"]
    assert not (cell / "train.done").exists()
    trains = [c for c in _calls(calls) if c[0] == "train"]
    assert len(trains) == 2 * 2 + 2 * 2  # fixed-8 and lora2 once per seed, fixed-16 twice per seed
    assert "--rank-mode" in trains[0] and "--max-train-steps" in trains[0] and "--device" in trains[0]
    log = [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "failed" for e in log) == 2 and sum(e["event"] == "unsupported" for e in log) == 2
    notyet = json.loads((out / "cells" / "toy1" / "notyet" / "seed0" / "status.json").read_text())
    assert notyet["state"] == "unsupported" and "NotYet" in notyet["error"]
    assert (out / "cells" / "toy1" / "lora2" / "seed1" / "run" / "eval.json").is_file()

    # second call: finished cells and recorded failures are skipped, nothing is run again
    calls.unlink()
    assert bench(_config(out, dreambooth_root, ["fixed-8", "fixed-16", "lora2", "notyet"])) == states
    assert _calls(calls) == []
    # --retry-failed reruns only the failed cells
    monkeypatch.delenv("FAKE_CRASH_RANK")
    states = bench(_config(out, dreambooth_root, ["fixed-8", "fixed-16", "lora2"], retry_failed=True))
    assert states == {"done": 6}
    assert sorted(c[0] for c in _calls(calls)) == ["eval", "eval", "train", "train"]


def test_interrupted_eval_is_rerun_but_training_is_not(tmp_path, dreambooth_root, monkeypatch):
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    out = tmp_path / "bench"
    bench(_config(out, dreambooth_root, ["fixed-8"], seeds=[0]))
    (out / "cells" / "toy1" / "fixed-8" / "seed0" / "eval.done").unlink()
    calls.unlink()
    assert bench(_config(out, dreambooth_root, ["fixed-8"], seeds=[0])) == {"done": 1}
    assert [c[0] for c in _calls(calls)] == ["eval"]


def test_svd_cell_waits_for_its_dependencies(tmp_path, dreambooth_root, monkeypatch):
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    out = tmp_path / "bench"
    methods = ["fixed-512", "lora2", "svd-512-lora2-ranks"]
    states = bench(_config(out, dreambooth_root, methods, seeds=[0], resize_command=list(RESIZE_COMMAND)))
    assert states == {"done": 3}
    svd = adapter_summary(out / "cells/toy1/svd-512-lora2-ranks/seed0/run/pytorch_lora_weights.safetensors")
    lora2 = adapter_summary(out / "cells/toy1/lora2/seed0/run/pytorch_lora_weights.safetensors")
    assert svd["ranks"] == lora2["ranks"] and len(svd["ranks"]) == 24
    assert (out / "cells/toy1/svd-512-lora2-ranks/seed0/train.done").is_file()

    path = report(out)
    text = path.read_text()
    assert "| svd-512-lora2-ranks |" in text and "| fixed-512 |" in text
    for png in ("pareto.png", "rank_by_block.png", "rank_heatmap_toy1.png"):
        assert (out / png).stat().st_size > 1000


def test_svd_cell_fails_when_a_dependency_fails(tmp_path, dreambooth_root, monkeypatch):
    monkeypatch.setenv("FAKE_CALLS", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("FAKE_CRASH_RANK", "512")
    out = tmp_path / "bench"
    states = bench(_config(out, dreambooth_root, ["fixed-512", "lora2", "svd-512-to-lora2"], seeds=[0]))
    assert states == {"done": 1, "failed": 2}
    status = json.loads((out / "cells/toy1/svd-512-to-lora2/seed0/status.json").read_text())
    assert "dependency failed: toy1/fixed-512/seed0:train" in status["error"]
    assert "exit code 1" in json.loads((out / "cells/toy1/fixed-512/seed0/status.json").read_text())["error"]


def test_parametric_method_names():
    name = "lora2-rt16-lr3e-4-le1e-3-init4-q0.95"
    variant, svd, iso = resolve_methods([name, f"svd-fixed-128-uniform-{name}", f"iso-lr1e-3-{name}", "fixed-128"])[:3]
    assert variant.train_args == {"rank_mode": "adaptive", "entropy_weight": 1e-3, "weight_reg_weight": 0.0,
                                  "target_rank": 16.0, "learning_rate": 3e-4, "init_rank": 4,
                                  "quantile": 0.95}  # fmt: skip
    assert svd.kind == "resize" and svd.train_args == {"allocation": "uniform"}
    assert svd.depends_on == ("fixed-128", variant.name)
    assert iso.kind == "iso" and iso.depends_on == (variant.name,) and iso.train_args["learning_rate"] == 1e-3
    with pytest.raises(ValueError, match="needs \\['lora2-rt8'\\]"):
        resolve_methods(["iso-lora2-rt8"])
    sum_, dora, adalora = resolve_methods(["lora2-rt8-scalesum", "dora-16-lr1e-3", "adalora-32-16"])
    assert sum_.train_args["lambda_scaling"] == "sum" and sum_.train_args["target_rank"] == 8.0
    assert dora.train_args == {"adapter_type": "dora", "init_rank": 16, "learning_rate": 1e-3}
    assert adalora.train_args == {"adapter_type": "adalora", "init_rank": 32, "target_rank": 16}
    for bad in ("lora2-xx3", "lora2-scalemax", "adalora-32", "dora-16-8"):
        with pytest.raises(ValueError, match="unknown method"):
            resolve_methods([bad])


def test_iso_cell_trains_uniform_lora_at_its_targets_size(tmp_path, dreambooth_root, monkeypatch):
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    out = tmp_path / "bench"
    methods = ["lora2", "iso-lora2", "fixed-16", "svd-fixed-16-uniform-lora2"]
    states = bench(_config(out, dreambooth_root, methods, seeds=[1], resize_command=list(RESIZE_COMMAND)))
    assert states == {"done": 4}
    summaries = {
        m: adapter_summary(out / f"cells/toy1/{m}/seed1/run/pytorch_lora_weights.safetensors") for m in methods
    }
    learned = summaries["lora2"]
    for method in ("iso-lora2", "svd-fixed-16-uniform-lora2"):
        ranks = summaries[method]["ranks"]
        assert max(ranks.values()) - min(ranks.values()) == 1 and ranks.keys() == learned["ranks"].keys()
        # every fake layer costs 16 per unit of rank: the uniform allocation spends the learned one's total rank
        assert summaries[method]["total_rank"] == learned["total_rank"]
    trains = [c for c in _calls(calls) if c[0] == "train"]
    assert "--rank-pattern" in trains[-1] and trains[-1][trains[-1].index("--rank-mode") + 1] == "fixed"


def test_time_limit_interrupts_and_the_next_call_resumes(tmp_path, dreambooth_root, monkeypatch):
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    out = tmp_path / "bench"
    sleeper = [sys.executable, "-c", "import time; time.sleep(30)"]
    states = bench(_config(out, dreambooth_root, ["fixed-8"], seeds=[0], train_command=sleeper, time_limit=0.5))
    assert states == {"interrupted": 1}
    assert bench(_config(out, dreambooth_root, ["fixed-8"], seeds=[0])) == {"done": 1}


def test_jobs_run_seed_by_seed(tmp_path, dreambooth_root):
    """A grid cut short by its time limit has whole seeds over every subject and method, not whole subjects."""
    config = _config(tmp_path / "bench", dreambooth_root, ["fixed-8", "lora2"], subjects=["toy1", "pup"])
    order = [(job.cell.seed, job.cell.subject, job.cell.method.name) for job in Bench(config).jobs()[::2]]
    assert order == [(seed, s, m) for seed in (0, 1) for s in ("toy1", "pup") for m in ("fixed-8", "lora2")]


def test_a_train_arg_that_a_method_sets_itself_is_refused(tmp_path, dreambooth_root):
    """--train-arg comes after a method's own options on the job's command line and would win: "lora2-lr4e-3" with
    --train-arg learning_rate=1e-3 would train at 1e-3 under the name of 4e-3."""
    with pytest.raises(ValueError, match=r"'lora2-lr4e-3' sets \['learning_rate'\] itself"):
        Bench(_config(tmp_path / "b", dreambooth_root, ["lora2-lr4e-3"], train_args=["learning_rate=1e-3"]))
    with pytest.raises(ValueError, match=r"'iso-lora2' sets \['init_rank'\] itself"):
        Bench(_config(tmp_path / "b", dreambooth_root, ["lora2", "iso-lora2"], train_args=["init-rank=4"]))
    assert not (tmp_path / "b").exists()
    Bench(_config(tmp_path / "b", dreambooth_root, ["lora2", "fixed-8"], train_args=["learning_rate=1e-3"]))


def test_bad_input_before_any_job(tmp_path, dreambooth_root, monkeypatch):
    monkeypatch.setenv("FAKE_CALLS", str(tmp_path / "calls.jsonl"))
    with pytest.raises(ValueError, match="unknown method.*'fixed-7'.*known: fixed-8"):
        bench(_config(tmp_path / "b", dreambooth_root, ["fixed-7"]))
    with pytest.raises(ValueError, match="needs \\['fixed-512'\\]"):
        resolve_methods(["lora2", "svd-512-to-lora2"])
    with pytest.raises(ValueError, match="neither a folder nor a subject"):
        bench(_config(tmp_path / "b", dreambooth_root, ["fixed-8"], subjects=["nobody"]))
    empty = tmp_path / "db"
    (empty / "thing").mkdir(parents=True)
    (empty / "prompts_and_classes.txt").write_text((dreambooth_root / "prompts_and_classes.txt").read_text())
    with pytest.raises(ValueError, match="not in the Classes table"):
        bench(_config(tmp_path / "b", dreambooth_root, ["fixed-8"], subjects=[str(empty / "thing")]))
    with pytest.raises(ValueError, match="evaluator folder /nowhere/dino"):
        bench(_config(tmp_path / "b", dreambooth_root, ["fixed-8"], eval_args=["dino_model=/nowhere/dino"]))
    import lora2.world

    monkeypatch.setattr(lora2.world, "info", lambda materialize=True: {"base_model": "/w", "ready": {}})
    with pytest.raises(ValueError, match="no base model: give --base"):
        bench(_config(tmp_path / "b", dreambooth_root, ["fixed-8"], base=None))
    assert not (tmp_path / "b").exists() and not (tmp_path / "calls.jsonl").exists()
    assert main(["bench", "--subjects", "toy1", "--data-root", str(dreambooth_root), "--methods", "nope",
                 "--out", str(tmp_path / "b")]) == 2  # fmt: skip


def test_registry_has_the_issue_methods():
    names = set(method_registry())
    assert {f"fixed-{r}" for r in (8, 16, 32, 64, 128, 256, 512)} <= names
    assert {"lora2", "lora2-noreg", "lora2-noentropy", "svd-512-to-lora2", "adalora", "dora"} <= names
    registry = method_registry()
    assert registry["lora2-noreg"].train_args["rank_reg_weight"] == 0.0
    assert (
        registry["lora2-noentropy"].train_args["entropy_weight"]
        == 0.0
        < registry["lora2"].train_args["entropy_weight"]
    )


def test_sigterm_stops_the_jobs_and_records_them(tmp_path, dreambooth_root):
    out, pid_file = tmp_path / "bench", tmp_path / "child.pid"
    sleeper = [
        sys.executable,
        "-c",
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)",
    ]
    config = _config(out, dreambooth_root, ["fixed-8"], seeds=[0], train_command=sleeper)
    script = f"from lora2.eval.bench import BenchConfig, bench; bench(BenchConfig(**{config.__dict__!r}))"
    parent = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while not pid_file.is_file() or not pid_file.read_text():
        assert time.time() < deadline and parent.poll() is None
        time.sleep(0.1)
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=60) == 0
    status = json.loads((out / "cells/toy1/fixed-8/seed0/status.json").read_text())
    assert status["state"] == "interrupted"
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_slots_follow_visible_gpus(tmp_path, dreambooth_root, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,GPU-abc,-1,3")
    runner = Bench(_config(tmp_path / "b", dreambooth_root, ["fixed-8"], gpus=None, jobs_per_gpu=2))
    assert runner._slots() == ["2", "2", "GPU-abc", "GPU-abc"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert runner._slots() == [None, None]  # cpu_jobs=2
    assert Bench(_config(tmp_path / "b", dreambooth_root, ["fixed-8"], gpus=[1, 0]))._slots() == ["1", "0"]


def test_changed_protocol_is_refused(tmp_path, dreambooth_root, monkeypatch):
    monkeypatch.setenv("FAKE_CALLS", str(tmp_path / "calls.jsonl"))
    out = tmp_path / "bench"
    bench(_config(out, dreambooth_root, ["fixed-8"], seeds=[0]))
    with pytest.raises(ValueError, match="other settings \\(steps: 2 -> 3\\)"):
        bench(_config(out, dreambooth_root, ["fixed-8"], seeds=[0], steps=3))
    assert bench(_config(out, dreambooth_root, ["fixed-8", "lora2"], seeds=[0, 1])) == {"done": 4}  # grid may grow


def test_concurrent_jobs_share_the_cores(tmp_path, dreambooth_root, monkeypatch):
    threads = tmp_path / "threads.txt"
    monkeypatch.setenv("FAKE_CALLS", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("FAKE_THREADS", str(threads))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    bench(_config(tmp_path / "bench", dreambooth_root, ["fixed-8"], seeds=[0]))  # cpu_jobs=2
    assert set(threads.read_text().split()) == {"4"}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # a user's own setting is kept
    bench(_config(tmp_path / "bench2", dreambooth_root, ["fixed-8"], seeds=[0]))
    assert threads.read_text().split()[-1] == "3"


def _spans(path: Path) -> list[list]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _wait_for(condition, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def _start_bench(config: BenchConfig, env: dict) -> subprocess.Popen:
    script = f"from lora2.eval.bench import BenchConfig, bench; bench(BenchConfig(**{config.__dict__!r}))"
    return subprocess.Popen([sys.executable, "-c", script], env={**os.environ, **env})


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def _started_and_locked(spans: Path, lock: Path) -> bool:
    """The fake trainer runs and the bench has recorded it in the cell's lock."""
    started = _spans(spans)
    return (
        bool(started) and lock.is_file() and started[0][1] in [pid for pid, _ in json.loads(lock.read_text())["pids"]]
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux-only")
def test_a_job_dies_with_its_bench_even_by_sigkill(tmp_path, dreambooth_root):
    out, spans = tmp_path / "bench", tmp_path / "spans.jsonl"
    lock = out / "cells/toy1/fixed-8/seed0/job.lock"
    env = {"FAKE_CALLS": str(tmp_path / "calls.jsonl"), "FAKE_SPANS": str(spans), "FAKE_TRAIN_SECONDS": "60"}
    parent = _start_bench(_config(out, dreambooth_root, ["fixed-8"], seeds=[0]), env)
    _wait_for(lambda: _started_and_locked(spans, lock))
    (event, trainer, _), *_ = _spans(spans)
    assert event == "begin" and _running(trainer)
    parent.kill()  # SIGKILL: the bench runs no handler
    parent.wait()
    _wait_for(lambda: not _running(trainer), seconds=30)
    assert [e for e, pid, _ in _spans(spans) if pid == trainer] == ["begin", "end"]  # it got SIGTERM and ended


def test_a_resumed_bench_never_runs_two_trainers_in_one_cell(tmp_path, dreambooth_root, monkeypatch):
    """The first bench is SIGKILLed while its trainer writes a checkpoint for 4 s after SIGTERM; a bench resumed at
    once waits for that trainer to end before it starts its own in the same cell."""
    out, spans, calls = tmp_path / "bench", tmp_path / "spans.jsonl", tmp_path / "calls.jsonl"
    lock = out / "cells/toy1/fixed-8/seed0/job.lock"
    config = _config(out, dreambooth_root, ["fixed-8"], seeds=[0])
    env = {"FAKE_CALLS": str(calls), "FAKE_SPANS": str(spans), "FAKE_TRAIN_SECONDS": "60", "FAKE_TERM_SECONDS": "4"}
    parent = _start_bench(config, env)
    _wait_for(lambda: _started_and_locked(spans, lock))
    for key, value in {**env, "FAKE_TRAIN_SECONDS": "0"}.items():
        monkeypatch.setenv(key, value)
    resumed = Bench(config)  # validated before the kill, so that it starts jobs at once after it
    parent.kill()
    parent.wait()
    assert resumed.run() == {"done": 1}
    (b1, first, start1), (e1, first_again, end1), (b2, second, start2), (e2, *_) = _spans(spans)
    assert (b1, e1, b2, e2) == ("begin", "end", "begin", "end") and first == first_again != second
    assert end1 <= start2  # never two trainers at once on the run folder
    assert [c[0] for c in _calls(calls)] == ["train", "train", "eval"] and not lock.exists()
