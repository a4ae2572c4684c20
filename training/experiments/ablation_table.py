"""The ablation table of docs/training.md: minutes against validation accuracy, one row per train.py run.

    python training/train.py ... --out /tmp/abl/base.h5 --hold-out kaggle --epochs 4 --crop-cache /tmp/crops
    python training/train.py ... --out /tmp/abl/colour.h5 --hold-out kaggle --epochs 4 --stain 0.15 ...
    python training/experiments/ablation_table.py --run base=/tmp/abl/base.h5 --run colour=/tmp/abl/colour.h5 \
        --json training/experiments/results/ablation.json

Every figure is read from the metadata train.py wrote beside each model: its settings, its end-to-end minutes and
its validation accuracy per lab (the epoch it chose). A run with --hold-out also has the accuracy on the held-out
lab's *validation* rows (scored once at the end, never used by the run): the figure that compares recipes for a
lab a model has never seen without reading that lab's test rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="append", required=True, metavar="NAME=MODEL.h5",
                   help="a row: its name and the model train.py wrote")
    p.add_argument("--base-setting", action="append", default=[], metavar="KEY=VALUE",
                   help="the first row's value of a setting its train.py did not have yet (a JSON value)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    return p.parse_args(argv)


def row(name: str, model: Path) -> dict:
    metadata = json.loads(model.with_suffix(".json").read_text(encoding="utf-8"))
    run = metadata["training"]
    held = run.get("held_out_lab")
    evaluation = metadata.get("evaluation", {})
    unseen = evaluation.get(f"{held}_validation_held_out_lab") if held else None
    return {"name": name, "settings": run["settings"], "best_epoch": run.get("best_epoch"),
            "minutes": round(run["wall_seconds"] / 60, 1), "cpu_count": run.get("cpu_count"),
            "validation": {lab: round(v, 4) for lab, v in metadata["validation"]["by_lab"].items()},
            "held_out_lab": held,
            "held_out_validation": round(unseen["accuracy"], 4) if unseen else None}


def differences(rows: list[dict], assumed: dict | None = None) -> list[str]:
    """Each row's settings that differ from the first row's (`assumed`: the first row's value of a setting its
    train.py did not have yet, which then ran as that value)."""
    base = {**(assumed or {}), **rows[0]["settings"]}
    return [", ".join(f"{k}={v}" for k, v in r["settings"].items() if k in base and base[k] != v) or "(first row)"
            for r in rows]


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = []
    for spec in args.run:
        name, _, path = spec.partition("=")
        if not path or not Path(path).with_suffix(".json").is_file():
            print(f"ablation_table.py: --run {spec}: expected NAME=MODEL.h5 with its .json beside it", file=sys.stderr)
            return 2
        rows.append(row(name, Path(path)))
    labs = sorted({lab for r in rows for lab in r["validation"]})
    print("| run | changed | minutes | " + " | ".join(f"validation {lab}" for lab in labs)
          + " | held-out lab: validation |")
    print("|---|---|---|" + "---|" * len(labs) + "---|")
    assumed = {}
    for spec in args.base_setting:
        key, _, value = spec.partition("=")
        try:
            assumed[key] = json.loads(value)
        except json.JSONDecodeError:
            print(f"ablation_table.py: --base-setting {spec}: expected KEY=JSON value", file=sys.stderr)
            return 2
    for r, changed in zip(rows, differences(rows, assumed), strict=True):
        held = (f"{r['held_out_lab']} {r['held_out_validation']:.3f}" if r["held_out_validation"] is not None
                else r["held_out_lab"] or "")
        print(f"| {r['name']} | {changed} | {r['minutes']} | "
              + " | ".join(f"{r['validation'].get(lab, float('nan')):.3f}" for lab in labs) + f" | {held} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
