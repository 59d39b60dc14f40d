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
# # 03 · DINOv2: self-supervised ViT descriptors, pooling and re-ranking
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/YOUR_ORG/YOUR_REPO/blob/main/notebooks/03_dinov2.ipynb)
#
# DINOv2 (Oquab et al., 2023) learns image features without labels; its frozen features are strong retrieval
# descriptors out of the box. This notebook compares the class token (`cls`) with GeM over the patch tokens
# (`gem`), then adds post-processing on the best descriptor: k-reciprocal re-ranking (Zhong et al., CVPR 2017),
# alpha query expansion and database-side augmentation (Radenovic et al., TPAMI 2019).
#
# - **Fast mode** (`RETRIEVAL_FAST=1`, default without a GPU): a small real Imagenette split from
#   `../shared/datasets` (else the digits demo), ViT-S/14 with random weights (no download): scores near chance,
#   every step runs.
# - **Full mode** (`RETRIEVAL_FAST=0`, default with a GPU): the LVD-142M weights (timm) on your data.

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
# (model, pooling) pairs: cls = class token, gem = GeM over patch tokens, mean = mean of patch tokens
RUNS = [("dinov2-vits14", "cls"), ("dinov2-vitb14", "cls"), ("dinov2-vitb14", "gem"), ("dinov2-vitl14", "cls")]
FAST_RUNS = [("dinov2-vits14", "cls"), ("dinov2-vits14", "gem")]
# post-processing tried on the best pair (options of run_retrieval)
POSTPROCESSING = {"kreciprocal": {"rerank": "kreciprocal"}, "alpha-qe": {"qe": "alpha"},
                  "dba-alpha-qe": {"dba": 3, "qe": "alpha"}}
K = 10
BATCH_SIZE = 32
DEVICE = "auto"
GROUP_NAME = ""  # set both GROUP_NAME and SERVER_URL to submit the best run at the end
SERVER_URL = ""

# %%
from helpers.models import load_model
from helpers.notebook import (check_run_outputs, notebook_mode, maybe_submit, metrics_frame, notebook_data,
                              output_root, runs_frame, save_outputs, show_image, weights_for)
from helpers.notebook import scored_retrieval
from helpers.report import plot_metric_bars

FAST, DEVICE = notebook_mode(FAST, DEVICE)  # prints the mode, why, and the GPU
DATA = notebook_data(FAST, DATA_SOURCE)
OUT = output_root(FAST)  # outputs: $RETRIEVAL_OUTPUT_DIR, else fast mode's own folder, else the project
PREFIX = "fast_03" if FAST else "03"
COMMON = dict(k=K, batch_size=BATCH_SIZE, device=DEVICE, progress=False)
print(f"data: {DATA}, outputs: {OUT}")

# %% [markdown]
# ## Descriptors: model and pooling
# Each run writes its submission (`submissions/`), metrics JSON (`results/`) and grid (`visualizations/`).

# %%
runs, outputs, models = {}, {}, {}
for name, pool in FAST_RUNS if FAST else RUNS:
    tag = f"{PREFIX}_{name}_{pool}"
    models[tag] = load_model(name, weights=weights_for(name, FAST), device=DEVICE, pool=pool)
    runs[tag] = scored_retrieval(DATA, model=models[tag], run_name=tag, **COMMON)
    outputs[tag] = save_outputs(runs[tag], root=OUT)
metrics_frame(runs)

# %% [markdown]
# ## Post-processing on the best descriptor
# The same model object is reused, so the embeddings come from the cache (even with random weights, whose every
# initialisation is a different model for the cache); only the ranking changes.

# %%
best_tag = max(runs, key=lambda tag: runs[tag].metrics["weighted_score"])
for name, options in POSTPROCESSING.items():
    tag = f"{best_tag}_{name}"
    runs[tag] = scored_retrieval(DATA, model=models[best_tag], run_name=tag, **options, **COMMON)
    outputs[tag] = save_outputs(runs[tag], root=OUT)
metrics_frame(runs)

# %%
plot_metric_bars(runs_frame(runs), "map@10", title="DINOv2: pooling and post-processing (mAP@10)")

# %% [markdown]
# ## The best run, query by query

# %%
best = max(runs, key=lambda tag: runs[tag].metrics["weighted_score"])
print(f"best run: {best}")
show_image(outputs[best].grid)

# %% [markdown]
# ## Submit (optional)
# Nothing is sent unless both `GROUP_NAME` and `SERVER_URL` are set in the parameters cell.

# %%
maybe_submit(outputs[best].submission, GROUP_NAME, SERVER_URL, data=DATA, k=K, root=OUT)

# %% [markdown]
# ## Checks
# Every run wrote a valid submission, metrics in range and its grid; the post-processed runs reused the cached
# embeddings (nothing was computed again).

# %%
for tag, out in outputs.items():
    metrics = check_run_outputs(out.submission, DATA, out.metrics, [out.grid], k=K)
    if runs[tag].config["weights"] == "pretrained":
        assert metrics["hit@1"] >= 0.5, (tag, metrics)
assert all(runs[f"{best_tag}_{name}"].gallery.n_computed == 0 for name in POSTPROCESSING)
assert len(runs) == len(FAST_RUNS if FAST else RUNS) + len(POSTPROCESSING)
metrics_frame(runs)[["run", "hit@1", "map@10"]]
