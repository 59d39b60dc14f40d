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
# # 02 · Fine-tuning CLIP with GeM pooling and Circle loss
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/YOUR_ORG/YOUR_REPO/blob/main/notebooks/02_clip_finetune_gem_circle.ipynb)
#
# The full recipe (`clip-gem-circle`): CLIP's visual transformer, GeM over its pre-projection patch tokens, a
# BNNeck embedding head, Circle loss (Sun et al., CVPR 2020) with the MultiSimilarity miner, P-K batches, AdamW
# with layer-wise learning-rate decay, warm-up then cosine. Training uses `DATA_SOURCE/training/<class>/*` and keeps a
# validation split per class; `best.pt` is the epoch with the best validation mAP@10. The fine-tuned model is then
# compared with zero-shot CLIP on the same queries.
#
# - **Fast mode** (`RETRIEVAL_FAST=1`, default without a GPU): a small real Imagenette split from
#   `../shared/datasets` (else the digits demo), ViT-B/32 with random weights, one epoch of the last block and the
#   head: it checks that every step runs, the scores mean nothing.
# - **Full mode** (`RETRIEVAL_FAST=0`, default with a GPU): ViT-L/14 with OpenAI weights, the whole network, 20
#   epochs (early stopping after 5 without improvement), mixed precision.

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
RECIPE = "clip-gem-circle"  # `python -m helpers train --help` lists the recipes
MODEL = "clip-vit-l14"  # full mode; clip-vit-b32 | clip-vit-b16 | clip-vit-l14 | clip-vit-l14-336 | clip-vit-h14
EPOCHS = 20  # full mode (early stopping after `patience` = 5 epochs without improvement)
TRAINABLE = "all"  # full mode; head | blocks:N | all
FAST_MODEL = "clip-vit-b32"  # fast mode: random weights
FAST_EPOCHS = 1
FAST_TRAINABLE = "blocks:1"  # the last transformer block and the head
OVERRIDES = {}  # any other training option, e.g. {"lr": 2e-5, "classes_per_batch": 16}
K = 10
BATCH_SIZE = 64
DEVICE = "auto"
GROUP_NAME = ""  # set both GROUP_NAME and SERVER_URL to submit the fine-tuned run at the end
SERVER_URL = ""

# %%
import pandas as pd

from helpers.notebook import (check_run_outputs, notebook_mode, maybe_submit, metrics_frame, notebook_data,
                              output_paths, output_root, plot_side_by_side, save_outputs, show_image, weights_for)
from helpers.notebook import scored_retrieval
from helpers.training import make_config, train
from helpers.viz import save_figure

FAST, DEVICE = notebook_mode(FAST, DEVICE)  # prints the mode, why, and the GPU
DATA = notebook_data(FAST, DATA_SOURCE, need_training=True)
OUT = output_root(FAST)  # outputs: $RETRIEVAL_OUTPUT_DIR, else fast mode's own folder, else the project
MODEL, EPOCHS, TRAINABLE = (FAST_MODEL, FAST_EPOCHS, FAST_TRAINABLE) if FAST else (MODEL, EPOCHS, TRAINABLE)
WEIGHTS = weights_for(MODEL, FAST)
PREFIX = f"{'fast_' if FAST else ''}02_{MODEL}"
print(f"data: {DATA}, {MODEL} ({WEIGHTS}), {EPOCHS} epoch(s), {TRAINABLE}")

# %% [markdown]
# ## Before: zero-shot CLIP
# CLIP's own image embedding (class token through the projection), no training.

# %%
runs, outputs = {}, {}
runs["zero-shot"] = scored_retrieval(DATA, model=MODEL, weights=WEIGHTS, k=K, batch_size=BATCH_SIZE, device=DEVICE,
                                     run_name=f"{PREFIX}_zero-shot", progress=False)
outputs["zero-shot"] = save_outputs(runs["zero-shot"], root=OUT)
runs["zero-shot"].metrics

# %% [markdown]
# ## Fine-tune
# The run folder (`runs/<name>/`) holds `best.pt`, `last.pt` (to resume: `python -m helpers train --resume`),
# `history.json` and the config.

# %%
config = make_config(RECIPE, data=str(DATA), model=MODEL, weights=WEIGHTS, trainable=TRAINABLE, epochs=EPOCHS,
                     device=DEVICE, out=str(OUT / "runs" / f"{PREFIX}_{RECIPE}"), progress=not FAST,
                     **OVERRIDES)
result = train(config)
print(f"{result.epochs_run} epoch(s) in {result.seconds:.0f} s, best epoch {result.best_epoch}: {result.best_path}")
for note in result.notes:
    print("note:", note)
pd.DataFrame(result.history)

# %% [markdown]
# ## After: retrieval with the fine-tuned embedding
# `checkpoint=` loads the trained backbone and head (`python -m helpers retrieve --checkpoint RUN/best.pt` on the
# command line); the metrics JSON records the recipe, loss and epochs.

# %%
runs["fine-tuned"] = scored_retrieval(DATA, checkpoint=result.best_path, k=K, batch_size=BATCH_SIZE, device=DEVICE,
                                      run_name=f"{PREFIX}_{RECIPE}", progress=False)
outputs["fine-tuned"] = save_outputs(runs["fine-tuned"], root=OUT)
metrics_frame(runs)

# %% [markdown]
# ## Side by side: the same queries before and after fine-tuning

# %%
figure = plot_side_by_side({name: run.rankings for name, run in runs.items()}, DATA, queries=4,
                           scores={name: run.scores for name, run in runs.items()}, title=f"{MODEL}: {RECIPE}")
side_by_side = save_figure(figure, output_paths(f"{PREFIX}_side-by-side", OUT)["grid"])
show_image(side_by_side)

# %% [markdown]
# ## Submit (optional)
# Nothing is sent unless both `GROUP_NAME` and `SERVER_URL` are set in the parameters cell.

# %%
maybe_submit(outputs["fine-tuned"].submission, GROUP_NAME, SERVER_URL, data=DATA, k=K, root=OUT)

# %% [markdown]
# ## Checks
# Both runs wrote a valid submission, metrics in range and grids; the checkpoint exists and the fine-tuned run is
# recorded as such.

# %%
for name, out in outputs.items():
    check_run_outputs(out.submission, DATA, out.metrics, [out.grid, side_by_side], k=K)
assert result.best_path.is_file() and len(result.history) == result.epochs_run >= 1
record = runs["fine-tuned"].metrics_record()
assert record["is_finetuned"] and record["loss_function"] == "circle" and record["pooling_type"] == "gem", record
metrics_frame(runs)[["run", "hit@1", "map@10"]]
