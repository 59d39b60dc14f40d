# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py//py:percent
#     notebook_metadata_filter: kernelspec,-jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 07 · Comparing runs: the results table, charts and several models side by side
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/YOUR_ORG/YOUR_REPO/blob/main/notebooks/07_comparison.ipynb)
#
# Every run of the project (these notebooks, `python -m helpers retrieve`, `train` then `retrieve --checkpoint`)
# writes one metrics JSON to `results/`. This notebook aggregates them: one table (best first), views grouped by
# model, pooling, fine-tuning and post-processing, bar charts, the report folder (`python -m helpers report`),
# then the best runs on one dataset as query-versus-top-k grids side by side, and an HTML page of the best run.
#
# - **Fast mode** (`RETRIEVAL_FAST=1`, default without a GPU): first runs a few quick baselines on a small real
#   Imagenette split (EfficientNet-Lite0 with offline weights, GAP and GeM, and a random ResNet-18) so that the
#   comparison has runs on one dataset; the table holds every run in fast mode's own `results/` (never the
#   project's).
# - **Full mode** (`RETRIEVAL_FAST=0`, default with a GPU): aggregates what notebooks 00-06 (or the command line)
#   wrote for your data; set `BASELINES` to add runs here.

# %%
# Colab only: fetch the project and install its requirements (Colab's own torch and torchvision are kept).
import os, subprocess, sys
if "google.colab" in sys.modules:
    if not os.path.isdir("/content/project"):
        subprocess.run(["git", "clone", "--depth", "1", "--branch", "main",
                        "https://github.com/YOUR_ORG/YOUR_REPO.git",
                        "/content/project"], check=True)
    os.chdir("/content/project")
    sys.path.insert(0, "/content/project")
    from helpers.colab import colab_setup
    colab_setup()

# %% tags=["parameters"]
FAST = None  # True: fast (small models, about a minute); False: the full job; None: RETRIEVAL_FAST, else fast without a GPU
# Your data: a folder; a folder or .zip on a mounted Google Drive (/content/drive/MyDrive/...); or a .zip path or
# URL, unpacked once. Layout: training/<class>/*, test/query/*, test/gallery/*, optional test/ground_truth.json.
DATA_SOURCE = "data"  # "data" in fast mode: a small split of the shared photos (else the embedded demo)
RESULTS_DIR = "results"  # metrics JSONs, relative to the output root (OUT below)
BASELINES = []  # full mode: (model, pooling) pairs to run here first, e.g. [("efficientnet-b3", "gem")]
FAST_BASELINES = [("efficientnet-lite0", "gap"), ("efficientnet-lite0", "gem"), ("resnet18", "gem")]
SORT_BY = "weighted_score"  # weighted_score | map@10 | hit@1 | ...
SIDE_BY_SIDE = 4  # how many of the best runs on the dataset to show side by side
N_QUERIES = 3  # queries in the side-by-side grid (spread over the classes)
K = 10
BATCH_SIZE = 32
DEVICE = "auto"

# %%
from helpers.data import load_retrieval_set
from helpers.html_report import write_html_report
from helpers.notebook import (best_runs_on, check_run_outputs, notebook_mode, notebook_data, output_paths,
                              output_root, plot_side_by_side, save_outputs, show_image, weights_for)
from helpers.notebook import scored_retrieval
from helpers.report import comparison_table, grouped_views, load_results, plot_metric_bars, write_report
from helpers.submission import validate_submission
from helpers.viz import save_figure

FAST, DEVICE = notebook_mode(FAST, DEVICE)  # prints the mode, why, and the GPU
DATA = notebook_data(FAST, DATA_SOURCE)
OUT = output_root(FAST)  # outputs: $RETRIEVAL_OUTPUT_DIR, else fast mode's own folder, else the project
RESULTS = OUT / RESULTS_DIR
PREFIX = "fast_07" if FAST else "07"
print(f"data: {DATA}, outputs: {OUT}, results: {RESULTS}")

# %% [markdown]
# ## Baselines on this dataset (fast mode, or `BASELINES` in full mode)

# %%
outputs = {}
for model, pool in FAST_BASELINES if FAST else BASELINES:
    run = scored_retrieval(DATA, model=model, weights=weights_for(model, FAST), model_options={"pool": pool}, k=K,
                           batch_size=BATCH_SIZE, device=DEVICE, run_name=f"{PREFIX}_{model}_{pool}", progress=False)
    outputs[run.run_name] = save_outputs(run, root=OUT)
list(outputs)

# %% [markdown]
# ## Every run in `results/`, best first
# Files that are not metrics JSONs of this project (e.g. zero-shot classification metrics) are listed as skipped.

# %%
loaded = load_results(RESULTS)
table = comparison_table(loaded.frame, sort_by=SORT_BY)
print(f"{len(table)} runs, {len(loaded.skipped)} file(s) skipped")
table[["run", "model", "dataset", "weights", "pooling", "finetuned", "rerank", "hit@1", "map@10", "weighted_score"]]

# %%
grouped_views(loaded.frame)["model"]

# %%
bars = save_figure(plot_metric_bars(loaded.frame, SORT_BY), output_paths(f"{PREFIX}_bars", OUT)["grid"])
show_image(bars, width=700)

# %% [markdown]
# ## The report folder
# The same aggregation as `python -m helpers report`: comparison CSV/Markdown, grouped views, charts, failure
# analysis per run (worst queries, per-class scores, confused classes) and the best two runs compared.

# %%
report = write_report(RESULTS, out_dir=OUT / "visualizations" / f"{PREFIX}_report", images=not FAST)
print(f"{len(report.files)} files in {report.out_dir}; analysed: {len(report.analysed)} run(s)")

# %% [markdown]
# ## The best runs on this dataset, side by side
# For each query (blue), one row per run: its top-k, green where the class is right, red where it is not.

# %%
best = best_runs_on(RESULTS, DATA, n=SIDE_BY_SIDE, sort_by=SORT_BY)
figure = plot_side_by_side(best, DATA, queries=N_QUERIES, k=K, title=f"best {len(best)} runs by {SORT_BY}")
side_by_side = save_figure(figure, output_paths(f"{PREFIX}_side-by-side", OUT)["grid"])
show_image(side_by_side)

# %% [markdown]
# ## An HTML page of the best run
# Self-contained (thumbnails embedded): open it in a browser, sort the queries by score, show only failures.

# %%
best_name, dataset = next(iter(best)), load_retrieval_set(DATA)
page = write_html_report(output_paths(f"{PREFIX}_best", OUT)["grid"].with_suffix(".html"), best[best_name],
                         dataset.query_dir, dataset.gallery_dir, ground_truth=dataset.ground_truth, title=best_name)
print(page)

# %% [markdown]
# ## Checks

# %%
for name, out in outputs.items():
    check_run_outputs(out.submission, DATA, out.metrics, [out.grid], k=K)
    assert name in set(table["run"]), name
assert not table.empty and table[SORT_BY].dropna().is_monotonic_decreasing
assert set(best) <= set(table["run"]) and len(best) >= min(2, len(outputs))
assert not validate_submission(best[best_name], k=K, query_names=dataset.query_names,
                               gallery_names=dataset.gallery_names)
assert all(path.is_file() and path.stat().st_size > 0 for path in [bars, side_by_side, page, *report.files])
table[["run", SORT_BY]].head()
