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
# # 04 · EfficientNet B0 and B3: GeM versus global average pooling
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/YOUR_ORG/YOUR_REPO/blob/main/notebooks/04_efficientnet.ipynb)
#
# An ImageNet CNN becomes an image descriptor by pooling its last feature map. Global average pooling (GAP) is
# the classifier's own pooling; generalized-mean pooling (GeM, Radenovic et al., TPAMI 2019, p = 3) leans
# towards the strongest activations and usually retrieves better. This notebook runs each model with both
# poolings on the same queries and compares them.
#
# - **Fast mode** (`RETRIEVAL_FAST=1`, default without a GPU): a small real Imagenette split from
#   `../shared/datasets` (else the digits demo). EfficientNet-Lite0 keeps its real ImageNet weights (they ship
#   offline), so its GAP-versus-GeM comparison is real; B0 and B3 run with random weights (no download) to check
#   that every step works.
# - **Full mode** (`RETRIEVAL_FAST=0`, default with a GPU): B0 and B3 with their timm ImageNet weights on your data.

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
# (model, pooling) pairs: gap = global average pooling, gem = generalized mean (p = 3)
RUNS = [("efficientnet-b0", "gap"), ("efficientnet-b0", "gem"), ("efficientnet-b3", "gap"), ("efficientnet-b3", "gem")]
# fast mode: Lite0 keeps its offline ImageNet weights (a real comparison); B0 and B3 run once each, randomly initialised
FAST_RUNS = [("efficientnet-lite0", "gap"), ("efficientnet-lite0", "gem"), ("efficientnet-b0", "gem"),
             ("efficientnet-b3", "gem")]
K = 10
BATCH_SIZE = 32
DEVICE = "auto"
GROUP_NAME = ""  # set both GROUP_NAME and SERVER_URL to submit the best run at the end
SERVER_URL = ""

# %%
from helpers.notebook import (check_run_outputs, notebook_mode, maybe_submit, metrics_frame, notebook_data,
                              output_root, runs_frame, save_outputs, show_image, weights_for)
from helpers.notebook import scored_retrieval
from helpers.report import plot_metric_bars

FAST, DEVICE = notebook_mode(FAST, DEVICE)  # prints the mode, why, and the GPU
DATA = notebook_data(FAST, DATA_SOURCE)
OUT = output_root(FAST)  # outputs: $RETRIEVAL_OUTPUT_DIR, else fast mode's own folder, else the project
PREFIX = "fast_04" if FAST else "04"
print(f"data: {DATA}, outputs: {OUT}")

# %% [markdown]
# ## Every (model, pooling) pair
# Each run writes its submission (`submissions/`), metrics JSON (`results/`) and grid (`visualizations/`).

# %%
runs, outputs = {}, {}
for model, pool in FAST_RUNS if FAST else RUNS:
    tag = f"{PREFIX}_{model}_{pool}"
    runs[tag] = scored_retrieval(DATA, model=model, weights=weights_for(model, FAST), k=K, batch_size=BATCH_SIZE,
                                 device=DEVICE, model_options={"pool": pool}, run_name=tag, progress=False)
    outputs[tag] = save_outputs(runs[tag], root=OUT)
metrics_frame(runs)

# %%
plot_metric_bars(runs_frame(runs), "map@10", title="EfficientNet: GAP versus GeM (mAP@10)")

# %% [markdown]
# ## The best run, query by query
# Each row: a query (blue), then its top-k gallery images, green where the class is right, red where it is not.

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
# Every run wrote a valid submission, metrics in range and its grid. Where real ImageNet weights are used, both
# poolings find the query's class at rank 1 for most queries.

# %%
for tag, out in outputs.items():
    metrics = check_run_outputs(out.submission, DATA, out.metrics, [out.grid], k=K)
    if runs[tag].config["weights"] == "pretrained":
        assert metrics["hit@1"] >= 0.5, (tag, metrics)
assert len(runs) == len(FAST_RUNS if FAST else RUNS)
metrics_frame(runs)[["run", "hit@1", "map@10"]]
