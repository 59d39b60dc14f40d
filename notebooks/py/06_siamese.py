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
# # 06 · Siamese network: contrastive learning on image pairs
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/YOUR_ORG/YOUR_REPO/blob/main/notebooks/06_siamese.ipynb)
#
# A Siamese network passes both images of a pair through one shared encoder and learns from whether they show the
# same class: the contrastive loss (Hadsell, Chopra and LeCun, CVPR 2006) pulls same-class pairs together and
# pushes different-class pairs at least a margin apart. The `siamese` recipe draws balanced positive and negative
# pairs from each P-K batch; the encoder is an ImageNet backbone with GeM pooling and an embedding head. The
# notebook compares the encoder before and after training: retrieval metrics, pair-similarity histograms and the
# same queries side by side.
#
# - **Fast mode** (`RETRIEVAL_FAST=1`, default without a GPU): a small real Imagenette split from
#   `../shared/datasets` (else the digits demo) and EfficientNet-Lite0 with its offline ImageNet weights, the head
#   trained for a few epochs on cached backbone features (seconds on a CPU).
# - **Full mode** (`RETRIEVAL_FAST=0`, default with a GPU): ResNet-50 with ImageNet weights, its last two stages
#   and the head trained on your data.

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
RECIPE = "siamese"  # contrastive loss on balanced pairs; try "triplet" for the three-branch variant
MODEL = "resnet50"  # full mode
EPOCHS = 15
TRAINABLE = "blocks:2"  # head | blocks:N | all
FAST_MODEL = "efficientnet-lite0"  # fast mode: offline ImageNet weights
FAST_EPOCHS = 3
FAST_TRAINABLE = "head"  # trains on cached backbone features
OVERRIDES = {}  # any other training option, e.g. {"contrastive_neg_margin": 0.8, "lr": 3e-4}
K = 10
BATCH_SIZE = 32
DEVICE = "auto"
GROUP_NAME = ""  # set both GROUP_NAME and SERVER_URL to submit the trained run at the end
SERVER_URL = ""

# %%
import pandas as pd

from helpers.notebook import (check_run_outputs, notebook_mode, maybe_submit, metrics_frame, notebook_data,
                              output_paths, output_root, plot_pair_similarities, plot_side_by_side, save_outputs,
                              show_image, weights_for)
from helpers.notebook import scored_retrieval, scored_runs
from helpers.training import make_config, train
from helpers.viz import save_figure

FAST, DEVICE = notebook_mode(FAST, DEVICE)  # prints the mode, why, and the GPU
DATA = notebook_data(FAST, DATA_SOURCE, need_training=True, train_per_class=16)
OUT = output_root(FAST)  # outputs: $RETRIEVAL_OUTPUT_DIR, else fast mode's own folder, else the project
MODEL, EPOCHS, TRAINABLE = (FAST_MODEL, FAST_EPOCHS, FAST_TRAINABLE) if FAST else (MODEL, EPOCHS, TRAINABLE)
WEIGHTS = weights_for(MODEL, FAST)
PREFIX = f"{'fast_' if FAST else ''}06_{MODEL}"
print(f"data: {DATA}, {MODEL} ({WEIGHTS}), {EPOCHS} epoch(s), {TRAINABLE}")

# %% [markdown]
# ## Before: the ImageNet encoder with GeM pooling, untrained

# %%
runs, outputs = {}, {}
runs["untrained"] = scored_retrieval(DATA, model=MODEL, weights=WEIGHTS, model_options={"pool": "gem"}, k=K,
                                     batch_size=BATCH_SIZE, device=DEVICE, run_name=f"{PREFIX}_gem", progress=False)
outputs["untrained"] = save_outputs(runs["untrained"], root=OUT)
runs["untrained"].metrics

# %% [markdown]
# ## Train the Siamese encoder
# The run folder (`runs/<name>/`) holds `best.pt` (best validation mAP@10), `last.pt` and `history.json`.

# %%
config = make_config(RECIPE, data=str(DATA), model=MODEL, weights=WEIGHTS, trainable=TRAINABLE, epochs=EPOCHS,
                     device=DEVICE, out=str(OUT / "runs" / f"{PREFIX}_{RECIPE}"), progress=not FAST,
                     **OVERRIDES)
result = train(config)
print(f"{result.epochs_run} epoch(s) in {result.seconds:.0f} s, best epoch {result.best_epoch}: {result.best_path}")
pd.DataFrame(result.history)

# %% [markdown]
# ## After: retrieval with the trained encoder

# %%
runs["siamese"] = scored_retrieval(DATA, checkpoint=result.best_path, k=K, batch_size=BATCH_SIZE, device=DEVICE,
                                   run_name=f"{PREFIX}_{RECIPE}", progress=False)
outputs["siamese"] = save_outputs(runs["siamese"], root=OUT)
metrics_frame(runs)

# %% [markdown]
# ## Pair similarities
# What the contrastive loss optimises directly: same-class pairs (green) should score above different-class pairs
# (red). The AUC is the chance that a random same-class pair scores above a random different-class pair. Without
# ground truth for the test, the pairs come from the validation split of the training classes.

# %%
pairs = plot_pair_similarities(scored_runs(runs))  # the validation runs where the test has no ground truth
histograms = save_figure(pairs, output_paths(f"{PREFIX}_pair-similarities", OUT)["grid"])
show_image(histograms, width=800)

# %% [markdown]
# ## Side by side: the same queries before and after training

# %%
figure = plot_side_by_side({name: run.rankings for name, run in runs.items()}, DATA, queries=4,
                           scores={name: run.scores for name, run in runs.items()}, title=f"{MODEL}: {RECIPE}")
side_by_side = save_figure(figure, output_paths(f"{PREFIX}_side-by-side", OUT)["grid"])
show_image(side_by_side)

# %% [markdown]
# ## Submit (optional)
# Nothing is sent unless both `GROUP_NAME` and `SERVER_URL` are set in the parameters cell.

# %%
maybe_submit(outputs["siamese"].submission, GROUP_NAME, SERVER_URL, data=DATA, k=K, root=OUT)

# %% [markdown]
# ## Checks
# Both runs wrote a valid submission, metrics in range and grids; the trained run is recorded with its loss. With
# ImageNet weights the encoder finds the query's class at rank 1 for most queries, before and after training.

# %%
for name, out in outputs.items():
    metrics = check_run_outputs(out.submission, DATA, out.metrics, [out.grid, side_by_side, histograms], k=K)
    if WEIGHTS == "pretrained":
        assert metrics["hit@1"] >= 0.5, (name, metrics)
record = runs["siamese"].metrics_record()
assert record["is_finetuned"] and record["loss_function"] == "contrastive" and result.best_path.is_file(), record
metrics_frame(runs)[["run", "hit@1", "map@10"]]
