"""``lora2 inspect``: per-module ranks, totals, parameter count and file size of any adapter file."""

from __future__ import annotations

import math
from pathlib import Path

from lora2.export.adapter import Adapter
from lora2.export.formats import read_adapter
from lora2.export.names import underscore


def summarize(adapter: Adapter, lora2: dict | None = None, magnitudes: dict | None = None) -> dict:
    """Per-module rows and totals of an adapter (ν per module when the lora2 header has it).

    Parameters of a module: r·(d_in·kh·kw + d_out), plus d_out for a DoRA magnitude vector (``magnitudes``:
    component → module → m); bytes: parameters × 4 (fp32) or × 2 (fp16).
    """
    described = (lora2 or {}).get("components", {})
    magnitudes = magnitudes or {}
    rows = []
    for component, modules in adapter.items():
        infos = {underscore(n): i for n, i in described.get(component, {}).get("modules", {}).items()}
        for name, module in modules.items():
            info = infos.get(underscore(name), {})
            magnitude = magnitudes.get(component, {}).get(name)
            rows.append(
                {
                    "component": component,
                    "module": name,
                    "kind": "conv" if module.is_conv else "linear",
                    "shape": [module.out_features, *module.down.shape[1:]],
                    "rank": module.rank,
                    "parameters": module.parameter_count() + (0 if magnitude is None else magnitude.numel()),
                    "scale": module.scale,
                    "nu": info.get("nu") if info.get("adaptive") else None,
                }
            )
    ranks = [row["rank"] for row in rows]
    parameters = sum(row["parameters"] for row in rows)
    components = {}
    for component in adapter:
        mine = [row for row in rows if row["component"] == component]
        components[component] = {
            "modules": len(mine),
            "total_rank": sum(row["rank"] for row in mine),
            "parameters": sum(row["parameters"] for row in mine),
        }
    return {
        "modules": rows,
        "components": components,
        "totals": {
            "modules": len(rows),
            "total_rank": sum(ranks),
            "mean_rank": sum(ranks) / len(ranks) if ranks else 0.0,
            "min_rank": min(ranks, default=0),
            "max_rank": max(ranks, default=0),
            "parameters": parameters,
            "bytes_fp32": parameters * 4,
            "bytes_fp16": parameters * 2,
        },
    }


def inspect_file(path: str | Path) -> dict:
    """``summarize`` of an adapter file or directory (DoRA files too: their magnitude vectors count in the size),
    with its path, format, whether it is DoRA, and its lora2 header."""
    file = read_adapter(path, dora=True)
    report = summarize(file.adapter, file.lora2, file.magnitudes)
    report.update({"path": str(file.path), "format": file.format, "dora": bool(file.magnitudes), "lora2": file.lora2})
    return report


def format_report(report: dict) -> str:
    """A human-readable table of ``inspect_file``'s report."""
    rows = report["modules"]
    width = max([len(f"{r['component']}.{r['module']}".lstrip(".")) for r in rows] + [6])
    lines = [f"{report['path']}  ({report['format']} format)", ""]
    lines.append(f"{'module':<{width}}  {'kind':<6} {'rank':>5} {'params':>10}  {'nu':>9}  shape")
    for r in rows:
        name = f"{r['component']}.{r['module']}".lstrip(".")
        nu = "" if r["nu"] is None else f"{r['nu']:.4g}"
        shape = "x".join(str(d) for d in r["shape"])
        lines.append(f"{name:<{width}}  {r['kind']:<6} {r['rank']:>5} {r['parameters']:>10}  {nu:>9}  {shape}")
    t = report["totals"]
    lines.append("")
    for component, c in report["components"].items():
        lines.append(
            f"{component or '(model)'}: {c['modules']} modules, total rank {c['total_rank']}, "
            f"{c['parameters']:,} parameters"
        )
    lines.append(
        f"total: {t['modules']} modules, rank mean {t['mean_rank']:.2f} (min {t['min_rank']}, max {t['max_rank']}), "
        f"{t['parameters']:,} parameters, {_size(t['bytes_fp32'])} fp32, {_size(t['bytes_fp16'])} fp16"
    )
    return "\n".join(lines)


def _size(num_bytes: int) -> str:
    if num_bytes < 1024:
        return f"{num_bytes} B"
    exponent = min(int(math.log(num_bytes, 1024)), 3)
    return f"{num_bytes / 1024**exponent:.2f} {['B', 'KiB', 'MiB', 'GiB'][exponent]}"
