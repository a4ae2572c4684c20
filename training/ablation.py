"""Train the ablation variants side by side: what PBC data and lab-robust augmentation each buy.

On a GPU (the runs are Python-bound, so four processes share one GPU almost for free), from the repository root:

    KERAS_BACKEND=torch python training/ablation.py --data-dir ../shared/data/blood-cells/dataset2-master/images/TRAIN \
        --pbc-dir ../shared/data/pbc-4class \
        --weights ../shared/weights/mobilenet_v2_1.0_224_coralquant_bnrecal_no_top_legacy.h5 \
        --max-minutes 6.5 --out-dir /tmp/ablation [--set longer]

`--set labs` (the default) is the first ablation, A-D, each from ImageNet; `--set longer` (E-H) is the second,
which made the shipped model (G, at --max-minutes 8.3): E, F and H continue from the model in model/ (B), G starts
from ImageNet again with batches of 128. Within a set, every variant has the same grouped Kaggle validation split
and the same time budget; only the named options differ. Each writes <out-dir>/<variant>/blood_cell_model.h5
(+ .json metadata, curves, train.log). Compare them with training/compare_variants.py, which evaluates every
variant on the validation data (to choose) and on the test sets (to report).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (uses PBC train rows, extra train.py options). "labs": what PBC data and lab-robust augmentation buy,
# each from ImageNet. "longer": more training than one GPU budget gave B, either by continuing from the shipped
# model (B) with a fresh, lower cosine schedule, or by larger batches (the loop is bound by Python per step, so
# a batch of 128 runs about twice the epochs in the same time).
SHIPPED = ROOT / "model" / "blood_cell_model.h5"
CONTINUE = ["--init-model", str(SHIPPED), "--head-epochs", "0", "--lr", "1e-4"]
VARIANT_SETS = {
    "labs": {
        "A_kaggle_geometric": (False, ["--augment", "geometric"]),
        "B_pbc_geometric": (True, ["--augment", "geometric"]),
        "C_pbc_stain": (True, ["--augment", "stain"]),
        "D_pbc_stain_seed2": (True, ["--augment", "stain", "--seed", "2"]),
    },
    "longer": {
        "E_continue_geometric": (True, [*CONTINUE, "--augment", "geometric"]),
        "F_continue_stain": (True, [*CONTINUE, "--augment", "stain"]),
        "G_imagenet_batch128": (True, ["--augment", "geometric", "--batch-size", "128", "--lr", "3e-4"]),
        "H_continue_batch128": (True, [*CONTINUE, "--augment", "geometric", "--batch-size", "128", "--seed", "2"]),
    },
}
VARIANTS = {name: spec for variants in VARIANT_SETS.values() for name, spec in variants.items()}
# Later options win (argparse keeps the last), so a variant's own options override these.
COMMON = ["--head-epochs", "1", "--epochs", "40", "--lr", "2e-4", "--batch-size", "64", "--patience", "6"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, type=Path, help="Kaggle TRAIN, folder per class")
    p.add_argument("--pbc-dir", required=True, type=Path, help="PBC, folder per class")
    p.add_argument("--weights", required=True, help="ImageNet weights (.h5) or 'imagenet'")
    p.add_argument("--max-minutes", type=float, default=6.5, help="wall-time budget of every variant")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--set", choices=sorted(VARIANT_SETS), default="labs", help="which variants (default labs)")
    p.add_argument("--only", nargs="*", choices=sorted(VARIANTS), help="run just these variants")
    p.add_argument("--threads", type=int, default=4, help="CPU threads per process")
    return p.parse_args(argv)


def command_for(name: str, args: argparse.Namespace) -> list[str]:
    uses_pbc, extra = VARIANTS[name]
    cmd = [sys.executable, str(ROOT / "training" / "train.py"), "--data-dir", str(args.data_dir),
           "--weights", str(args.weights), "--max-minutes", str(args.max_minutes),
           "--out", str(args.out_dir / name / "blood_cell_model.h5"), *COMMON, *extra]
    return cmd + (["--pbc-dir", str(args.pbc_dir)] if uses_pbc else [])


def main(argv=None) -> dict[str, int]:
    args = parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    running = {}
    for name in args.only or VARIANT_SETS[args.set]:
        (args.out_dir / name).mkdir(parents=True, exist_ok=True)
        log = open(args.out_dir / name / "train.log", "w")  # noqa: SIM115 - closed when its process ends
        cmd = command_for(name, args)
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log)
    started = time.time()
    codes = {}
    for name, (proc, log) in running.items():
        codes[name] = proc.wait()
        log.close()
        print(f"{name}: exit {codes[name]} after {time.time() - started:.0f} s", flush=True)
    return codes


if __name__ == "__main__":
    sys.exit(max(main().values(), default=0))
