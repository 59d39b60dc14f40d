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
# # 00 · Quickstart: query → top-10 in a few calls
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/YOUR_ORG/YOUR_REPO/blob/main/notebooks/00_quickstart.ipynb)
#
# Rank the gallery for every query image with the offline default model (EfficientNet-Lite0 with ImageNet
# weights), score the rankings, and write the three outputs every notebook writes: a submission
# (`submissions/`), a metrics JSON (`results/`) and a query-versus-top-k grid (`visualizations/`).
#
# - **Fast mode** (`RETRIEVAL_FAST=1`, the default without a GPU): a small real split of `../shared/datasets`
#   where present, else the embedded digits demo; runs on a CPU in well under a minute. Its outputs go to a folder
#   of their own (`$RETRIEVAL_OUTPUT_DIR`, else `retrieval-fast-outputs` in the temporary folder), never to the
#   project's `results/`.
# - **Full mode** (`RETRIEVAL_FAST=0`, the default with a GPU): your dataset in `DATA_SOURCE`
#   (`training/<class>/*`, `test/query/*`, `test/gallery/*`, optional `test/ground_truth.json`).

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
MODEL = "efficientnet-lite0"  # `python -m helpers models` lists every name
WEIGHTS = "pretrained"
K = 10
BATCH_SIZE = 32
DEVICE = "auto"  # auto: CUDA, else MPS, else CPU
GROUP_NAME = ""  # set both GROUP_NAME and SERVER_URL to submit at the end
SERVER_URL = ""

# %%
from helpers.metrics import format_metrics_table
from helpers.notebook import (check_run_outputs, notebook_mode, maybe_submit, notebook_data, output_root,
                              save_outputs, show_image)
from helpers.notebook import scored_retrieval

FAST, DEVICE = notebook_mode(FAST, DEVICE)  # prints the mode, why, and the GPU
DATA = notebook_data(FAST, DATA_SOURCE)
OUT = output_root(FAST)  # outputs: $RETRIEVAL_OUTPUT_DIR, else fast mode's own folder, else the project
TAG = f"{'fast_' if FAST else ''}00_quickstart_{MODEL}"
print(f"data: {DATA}, outputs: {OUT}")

# %% [markdown]
# ## Retrieve, score, save
# `run_retrieval` embeds the query and gallery images (L2-normalised), ranks the gallery by cosine similarity and
# scores the rankings when `test/ground_truth.json` exists; `save_outputs` writes the submission, the metrics JSON
# and the grid under the output root `OUT` (the project root in full mode).

# %%
run = scored_retrieval(DATA, model=MODEL, weights=WEIGHTS, k=K, batch_size=BATCH_SIZE, device=DEVICE,
                       run_name=TAG)
outputs = save_outputs(run, root=OUT)
print(format_metrics_table(run.metrics))
print(outputs)

# %%
show_image(outputs.grid)

# %% [markdown]
# ## Submit (optional)
# Nothing is sent unless both `GROUP_NAME` and `SERVER_URL` are set in the parameters cell.

# %%
maybe_submit(outputs.submission, GROUP_NAME, SERVER_URL, data=DATA, k=K, root=OUT)

# %% [markdown]
# ## Checks
# The notebook ends by checking what it wrote: a valid submission (every query, `K` distinct gallery names),
# metrics in range, the grid present. ImageNet weights find the right class at rank 1 for most queries.

# %%
metrics = check_run_outputs(outputs.submission, DATA, outputs.metrics, [outputs.grid], k=K)
assert metrics["hit@1"] >= 0.5, metrics
metrics
