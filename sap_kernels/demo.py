"""Demo on real data with no download: SAP against one-shot and lottery-ticket
pruning on scikit-learn's bundled handwritten digits (1,797 8x8 images).

For every model (a small MLP and a small CNN) and every policy, the paper's
Algorithm 1 runs for iterations t = 0..T from one shared initialisation w_init:

    w~_t = w_init (.) m_t          rewind the retained weights (m_0 = all ones)
    train E epochs with m_t        pruned weights held at 0 (grads masked, masks re-applied)
    evaluate -> test accuracy,  PQI I(w_t) over all retained weights (p=0.5, q=1)
    prune    -> m_{t+1}            one `Pruner.prune()` call

Written to the output folder: results.json, results.csv, results.md (the table:
iteration, % weights remaining, test accuracy, PQI), accuracy_vs_remaining.png
and pqi_vs_iteration.png. `sap-kernels demo` or `python -m sap_kernels.demo`.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .api import pqi
from .sap import LotteryTicketPolicy, OneShotPolicy, Pruner, SAPPolicy

POLICY_FACTORIES = {
    "sap-global": lambda: SAPPolicy(scope="global"),
    "sap-layer": lambda: SAPPolicy(scope="layer"),
    "sap-neuron": lambda: SAPPolicy(scope="neuron"),
    "one-shot": lambda: OneShotPolicy(rate=0.2),
    "lottery-ticket": lambda: LotteryTicketPolicy(fraction=0.2),
}
MODEL_NAMES = ("mlp", "cnn")


def make_model(name: str) -> nn.Module:
    """A small MLP (64-128-64-10) or CNN (two 3x3 convs, pool, two linears) for 8x8 digits."""
    if name == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, 128),
            nn.ReLU(),
            nn.Linear(128, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )
    raise ValueError(f"model must be one of {MODEL_NAMES}, got {name!r}")


def load_digits_split(seed: int = 0, reduced: bool = False):
    """(train_x, train_y, test_x, test_y): images scaled to [0, 1] as [N, 1, 8, 8]
    float32, a stratified 80/20 split; `reduced` keeps 300 train / 150 test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(
        range(len(labels)), test_size=0.2, random_state=seed, stratify=digits.target
    )
    if reduced:
        train_idx, test_idx = train_idx[:300], test_idx[:150]
    train_idx, test_idx = torch.tensor(train_idx), torch.tensor(test_idx)
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


def selection_backend(backend: str) -> str:
    """`backend`, except 'auto' falls back to 'reference' on a build without the
    CPU selection kernels (the PQI kernels alone are not enough to prune)."""
    if backend != "auto":
        return backend
    has_cpu_prune = torch._C._dispatch_has_kernel_for_dispatch_key(
        "sap_kernels::prune_masks", "CPU"
    )
    return backend if has_cpu_prune else "reference"


def train_epochs(model, pruner, data, epochs: int, batch_size: int, lr: float, seed: int):
    """SGD (momentum 0.9, weight decay 5e-4) from a fresh optimizer; masks enforced."""
    train_x, train_y = data[0], data[1]
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_y), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(train_x[batch]), train_y[batch])
            loss.backward()
            pruner.mask_gradients_()
            optimizer.step()
            pruner.apply_masks_()


@torch.no_grad()
def accuracy(model, images, labels) -> float:
    model.eval()
    return float((model(images).argmax(1) == labels).double().mean())


def run_policy(model_name, policy_name, data, *, iterations, epochs, lr, seed, backend, bar):
    """Rows (one per iteration t = 0..T) of one model pruned by one policy."""
    torch.manual_seed(seed)  # same w_init for every policy
    model = make_model(model_name)
    pruner = Pruner(model, POLICY_FACTORIES[policy_name](), backend=backend)
    rows = []
    for t in range(iterations + 1):
        start = time.perf_counter()
        train_epochs(model, pruner, data, epochs, batch_size=64, lr=lr, seed=seed + t)
        test_accuracy = accuracy(model, data[2], data[3])
        layer_remaining = [100.0 * float(m.double().mean()) for m in pruner.masks]
        record = pruner.prune()  # PQI of the retrained w_t, then m_{t+1}
        pruned_pqi = float(pqi(pruner.parameters, pruner.masks, backend=backend))
        rows.append(
            {
                "model": model_name,
                "policy": policy_name,
                "iteration": t,
                "remaining_percent": 100.0 * record.density_before,
                "test_accuracy": test_accuracy,
                "pqi": record.global_pqi,
                "pqi_after_pruning": pruned_pqi,
                "pruned_next": int(record.pruned.sum()),
                "next_remaining_percent": 100.0 * record.density,
                "layer_remaining_percent": layer_remaining,
                "seconds": time.perf_counter() - start,
            }
        )
        pruner.rewind_()
        bar.update(1)
    return rows


def format_table(rows) -> str:
    """Markdown table: model, policy, iteration, % remaining, test accuracy, PQI."""
    lines = [
        "| model | policy | t | % remaining | test accuracy | PQI (retrained) | PQI (pruned) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['policy']} | {r['iteration']} | {r['remaining_percent']:.2f} "
            f"| {100 * r['test_accuracy']:.2f}% | {r['pqi']:.4f} | {r['pqi_after_pruning']:.4f} |"
        )
    return "\n".join(lines)


def write_results(rows, config: dict, output_dir: Path) -> None:
    (output_dir / "results.json").write_text(json.dumps({"config": config, "rows": rows}, indent=1))
    columns = [k for k in rows[0] if k != "layer_remaining_percent"]
    with open(output_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (output_dir / "results.md").write_text(format_table(rows) + "\n")


def plot_results(rows, models, policies, output_dir: Path) -> list[Path]:
    """accuracy_vs_remaining.png and pqi_vs_iteration.png, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    paths = []
    for name, x_key, y_key, y_label in (
        ("accuracy_vs_remaining", "remaining_percent", "test_accuracy", "test accuracy (%)"),
        ("pqi_vs_iteration", "iteration", "pqi", "PQI of retrained weights (p=0.5, q=1)"),
    ):
        fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
        for ax, model_name in zip(axes[0], models):
            for policy_name in policies:
                sel = [r for r in rows if r["model"] == model_name and r["policy"] == policy_name]
                xs = [r[x_key] for r in sel]
                ys = [100 * r[y_key] if y_key == "test_accuracy" else r[y_key] for r in sel]
                ax.plot(xs, ys, marker="o", markersize=3, label=policy_name)
            if x_key == "remaining_percent":
                ax.set_xscale("log")
                ax.invert_xaxis()
                ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
                ax.set_xlabel("% weights remaining (log scale)")
            else:
                ax.set_xlabel("pruning iteration t")
            ax.set_ylabel(y_label)
            ax.set_title(f"{model_name.upper()} on digits")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = output_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def run_demo(
    output_dir: str | Path = "demo-out",
    *,
    iterations: int = 15,
    epochs: int = 12,
    models: Sequence[str] = MODEL_NAMES,
    policies: Sequence[str] = tuple(POLICY_FACTORIES),
    reduced: bool = False,
    seed: int = 0,
    lr: float = 0.05,
    backend: str = "auto",
    progress: bool = True,
    threads: int | None = None,
    plots: bool = True,
) -> list[dict]:
    """Runs every (model, policy) pair for T = `iterations` pruning iterations of
    E = `epochs` epochs each and writes the table, JSON, CSV and plots into
    `output_dir`. `reduced` uses a data subset, T <= 2 and E <= 1 (for tests).
    Returns the rows."""
    from tqdm.auto import tqdm

    for name in models:
        if name not in MODEL_NAMES:
            raise ValueError(f"model must be one of {MODEL_NAMES}, got {name!r}")
    for name in policies:
        if name not in POLICY_FACTORIES:
            raise ValueError(f"policy must be one of {tuple(POLICY_FACTORIES)}, got {name!r}")
    if reduced:
        iterations, epochs = min(iterations, 2), min(epochs, 1)
    if threads is not None:
        torch.set_num_threads(threads)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    chosen_backend = selection_backend(backend)
    data = load_digits_split(seed, reduced)
    config = {
        "iterations": iterations,
        "epochs": epochs,
        "models": list(models),
        "policies": list(policies),
        "reduced": reduced,
        "seed": seed,
        "lr": lr,
        "backend": chosen_backend,
        "train_size": len(data[1]),
        "test_size": len(data[3]),
    }
    rows = []
    total = len(models) * len(policies) * (iterations + 1)
    with tqdm(total=total, desc="sap demo", disable=not progress) as bar:
        for model_name in models:
            for policy_name in policies:
                bar.set_postfix_str(f"{model_name} {policy_name}")
                rows += run_policy(
                    model_name,
                    policy_name,
                    data,
                    iterations=iterations,
                    epochs=epochs,
                    lr=lr,
                    seed=seed,
                    backend=chosen_backend,
                    bar=bar,
                )
    write_results(rows, config, output_dir)
    if plots:
        plot_results(rows, list(models), list(policies), output_dir)
    return rows


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the demo's options to `parser` (e.g. the `sap-kernels demo` subcommand)."""
    parser.add_argument("--output-dir", default="demo-out", help="folder for table, JSON, plots")
    parser.add_argument("--iterations", type=int, default=15, help="pruning iterations T")
    parser.add_argument("--epochs", type=int, default=12, help="training epochs per iteration")
    parser.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    parser.add_argument(
        "--policies", nargs="+", choices=list(POLICY_FACTORIES), default=list(POLICY_FACTORIES)
    )
    parser.add_argument("--reduced", action="store_true", help="tiny run (data subset, T=2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument(
        "--backend", default="auto", choices=["auto", "cpu", "cuda", "triton", "reference"]
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_demo_from_args(args: argparse.Namespace) -> int:
    """Runs the demo from parsed `add_demo_arguments` options and prints the table."""
    rows = run_demo(
        args.output_dir,
        iterations=args.iterations,
        epochs=args.epochs,
        models=args.models,
        policies=args.policies,
        reduced=args.reduced,
        seed=args.seed,
        lr=args.lr,
        backend=args.backend,
        progress=not args.no_progress,
        threads=args.threads,
    )
    print(format_table(rows))
    print(f"\nwrote results.json, results.csv, results.md and plots to {args.output_dir}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sap-kernels demo", description=__doc__.split("\n")[0])
    add_demo_arguments(parser)
    return run_demo_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
