"""The open-set protocol of ``python -m benchmarks training --protocol open``: train on half of the classes, test
retrieval on the other half (classes training never saw), for Imagenette and CIFAR-10.

Per dataset and seed, :func:`helpers.data.validation_split` (fraction 0.5) draws the held-out classes. Training uses
``--train-per-class`` images of each training class (from ``imagenette-train-300`` / ``cifar10-train-1000``),
no validation (fixed epochs, best.pt = the last epoch); the test uses ``--query-per-class`` queries and
``--gallery-per-class`` gallery images of each held-out class (from ``imagenette-val`` / ``cifar10-test``).

- frozen: the frozen backbone's GeM features (the head's input), L2-normalised;
- head-only: each loss on those cached features (224 px), P-K batches of 5 classes x 16 images, on every seed;
- ``blocks:N`` and full fine-tuning for ``--full-losses`` on the first seed at ``--full-input-size`` px (P-K 5 x
  ``--open-k``), with the frozen backbone scored at that size too.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

DATASETS = {"imagenette": ("imagenette-train-300", "imagenette-val"), "cifar10": ("cifar10-train-1000", "cifar10-test")}
KEYS = ("hit@1", "map@10")


def _by_class(root: Path) -> dict[str, list[Path]]:
    from helpers.data import list_class_folder

    out: dict[str, list[Path]] = {}
    for path, label in list_class_folder(root):
        out.setdefault(label, []).append(path)
    return out


def _training_folder(source: dict[str, list[Path]], classes: list[str], per_class: int, pool: Path, out: Path) -> Path:
    """``out/<class>`` -> ``pool/<class>`` (links to the first ``per_class`` images): every seed's folder resolves to
    the same files, so the embedding cache serves every seed."""
    for label in classes:
        target = pool / label
        if not target.exists():
            target.mkdir(parents=True)
            for path in source[label][:per_class]:
                os.link(path, target / path.name)
        link = out / label
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(target.resolve(), target_is_directory=True)
    return out


def _metrics(query: Any, gallery: Any, q_labels: list[str], g_labels: list[str]) -> dict[str, float]:
    from helpers.metrics import evaluate_rankings
    from helpers.search import cosine_topk

    top, _ = cosine_topk(query, gallery, k=10)
    rankings = {str(i): [str(j) for j in row] for i, row in enumerate(top)}
    truth = {str(i): [str(j) for j, g in enumerate(g_labels) if g == q] for i, q in enumerate(q_labels)}
    return evaluate_rankings(rankings, truth, k=10).metrics


def _features(config, paths: list[Path], device: str):
    """The frozen backbone's pooled features of ``paths`` (cached), L2-normalised, as the training loop sees them."""
    import torch

    from helpers.embedding import EmbeddingCache, extract_embeddings
    from helpers.training.model import FeatureExtractor, build_network

    net, base = build_network(config, device=device)
    result = extract_embeddings(FeatureExtractor(base, net.backbone, config.input_size, net.in_dim), paths,
                                batch_size=64, device=device, cache=EmbeddingCache(), progress=False)
    return torch.nn.functional.normalize(torch.from_numpy(result.embeddings), dim=-1)


class OpenSet:
    """One dataset's open-set runs; rows are ``(dataset, method, size, seed, metrics, train s)``."""

    def __init__(self, args, name: str, work: Path) -> None:
        from helpers.data import validation_split

        train_name, test_name = DATASETS[name]
        self.args, self.name, self.work = args, name, work / name
        self.train_src, self.test_src = _by_class(Path(args.datasets) / train_name), _by_class(Path(args.datasets) / test_name)
        items = [(p, c) for c, ps in self.train_src.items() for p in ps[:2]]
        self.splits = [validation_split(items, 0.5, seed=seed) for seed in args.seeds]
        self.rows: list[tuple[str, str, int, int, dict[str, float], float]] = []

    def _test(self, held_out: list[str]) -> tuple[list[Path], list[Path], list[str], list[str]]:
        q, g, ql, gl = [], [], [], []
        for label in held_out:
            files = self.test_src[label]
            q += files[: self.args.open_query_per_class]
            g += files[self.args.open_query_per_class: self.args.open_query_per_class + self.args.open_gallery_per_class]
            ql += [label] * len(files[: self.args.open_query_per_class])
            gl += [label] * (len(g) - len(gl))
        return q, g, ql, gl

    def _config(self, recipe: str, folder: Path, out: Path, **kw):
        """The recipe's defaults, no validation (fixed epochs); ``None`` values keep the recipe's default."""
        from helpers.training import make_config

        kw.setdefault("images_per_class", self.args.open_k)
        return make_config(recipe, data=str(folder), model=self.args.model, out=str(out), device=self.args.device,
                           progress=False, val_split="images", val_fraction=0.0, patience=10**6,
                           classes_per_batch=5, **kw)

    def _record(self, method: str, size: int, seed: int, metrics: dict[str, float], seconds: float) -> None:
        self.rows.append((self.name, method, size, seed, metrics, seconds))
        print(f"{self.name:<10} {method:<22} {size:>4}px seed {seed}  hit@1 {metrics['hit@1']:.4f}  "
              f"map@10 {metrics['map@10']:.4f}  train {seconds:.0f}s", flush=True)

    def head_only(self) -> None:
        import torch

        from helpers.training import load_checkpoint_model, train

        for seed, split in zip(self.args.seeds, self.splits):
            folder = _training_folder(self.train_src, split.training, self.args.open_train_per_class,
                                      self.work / "pool", self.work / f"seed{seed}")
            q, g, ql, gl = self._test(split.held_out)
            probe = self._config("circle", folder, self.work / "probe", trainable="head", seed=seed)
            feats = _features(probe, q + g, self.args.device)
            self._record("frozen", 224, seed, _metrics(feats[: len(q)], feats[len(q):], ql, gl), 0.0)
            for loss in self.args.losses:
                t0 = time.perf_counter()
                result = train(self._config(loss, folder, self.work / f"head-{loss}-{seed}", trainable="head",
                                            epochs=self.args.head_epochs, seed=seed, images_per_class=16))
                seconds = time.perf_counter() - t0
                net = load_checkpoint_model(result.best_path).network
                with torch.inference_mode():
                    emb = net.head(feats).numpy()
                self._record(f"head-only {loss}", 224, seed, _metrics(emb[: len(q)], emb[len(q):], ql, gl), seconds)

    def fine_tune(self) -> None:
        from helpers.embedding import extract_embeddings
        from helpers.training import load_checkpoint_model, train

        seed, split, size = self.args.seeds[0], self.splits[0], self.args.full_input_size
        folder = _training_folder(self.train_src, split.training, self.args.full_per_class, self.work / "pool-full",
                                  self.work / f"full-seed{seed}")
        q, g, ql, gl = self._test(split.held_out)
        probe = self._config("circle", folder, self.work / "probe", trainable="head", seed=seed, input_size=size)
        feats = _features(probe, q + g, self.args.device)
        self._record("frozen", size, seed, _metrics(feats[: len(q)], feats[len(q):], ql, gl), 0.0)
        for trainable in (f"blocks:{self.args.blocks}", "all"):
            for loss in self.args.full_losses:
                t0 = time.perf_counter()
                result = train(self._config(loss, folder, self.work / f"ft-{loss}-{trainable.replace(':', '')}",
                                            trainable=trainable, epochs=self.args.full_epochs, seed=seed,
                                            input_size=size, num_workers=self.args.workers, lr=self.args.full_lr,
                                            layer_decay=self.args.full_layer_decay,
                                            backbone_lr=self.args.full_backbone_lr))
                seconds = time.perf_counter() - t0
                model = load_checkpoint_model(result.best_path)
                emb = extract_embeddings(model, q + g, batch_size=64, device=self.args.device, progress=False).embeddings
                label = "full" if trainable == "all" else trainable
                self._record(f"{label} {loss}", size, seed, _metrics(emb[: len(q)], emb[len(q):], ql, gl), seconds)


def _table(rows: list[tuple[str, str, int, int, dict[str, float], float]]) -> list[str]:
    """Mean and spread (population standard deviation over seeds) per dataset, method and size."""
    groups: dict[tuple[str, str, int], list[tuple[dict[str, float], float]]] = {}
    for dataset, method, size, _, metrics, seconds in rows:
        groups.setdefault((dataset, method, size), []).append((metrics, seconds))
    lines = ["| dataset | method | input | seeds | hit@1 | map@10 | train s (mean) |", "|---|---|---|---|---|---|---|"]
    for (dataset, method, size), runs in groups.items():
        cells = []
        for key in KEYS:
            values = [m[key] for m, _ in runs]
            spread = statistics.pstdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {spread:.3f}" if len(values) > 1 else f"{values[0]:.3f}")
        seconds = statistics.mean(s for _, s in runs)
        lines.append(f"| {dataset} | {method} | {size} px | {len(runs)} | {' | '.join(cells)} | {seconds:.0f} |")
    return lines


def run_open_set(args, work: Path) -> int:
    """Every dataset present: head-only on every seed, then fine-tuning on the first; prints the table."""
    rows = []
    for name in args.open_datasets:
        train_name, test_name = DATASETS[name]
        if not (Path(args.datasets) / train_name).is_dir() or not (Path(args.datasets) / test_name).is_dir():
            print(f"skipped {name}: {train_name} or {test_name} is absent under {args.datasets}")
            continue
        bench = OpenSet(args, name, work)
        print(f"{name}: held-out classes per seed: " + "; ".join(
            f"seed {s}: {', '.join(sp.held_out)}" for s, sp in zip(args.seeds, bench.splits)), flush=True)
        if not args.skip_head:
            bench.head_only()
        if not args.skip_full:
            bench.fine_tune()
        rows += bench.rows
    print()
    print("\n".join(_table(rows)))
    print(f"run folders: {work}")
    return 0
