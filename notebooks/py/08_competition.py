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
# # 08 · The competition: from the data to a submission, choices measured on held-out classes
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/YOUR_ORG/YOUR_REPO/blob/main/notebooks/08_competition.ipynb)
#
# A competition folder has `training/<identity>/*` (labelled) and `test/query/*`, `test/gallery/*` without labels:
# the server holds the ground truth, and the test shows identities training may never have seen. So every choice
# (model, pooling, TTA, DBA, query expansion, re-ranking, fusion, fine-tuning) is measured here on a validation
# split that looks like the test: a seeded 20 % of whole training classes, held out as query/gallery with ground
# truth (`helpers.select`, the `python -m helpers select` verb). The best configuration then runs on the test, and
# its submission is checked and, only when `GROUP_NAME` and `SERVER_URL` are set, sent.
#
# - **Fast mode** (`RETRIEVAL_FAST=1`, default without a GPU): a small real Imagenette split from
#   `../shared/datasets` (else the digits demo), EfficientNet-Lite0 with its offline ImageNet weights, the quick
#   grid, a 2-minute budget, no fine-tuning: about a minute on a CPU.
# - **Full mode** (`RETRIEVAL_FAST=0`, default with a GPU): your data from `DATA_SOURCE`, `select`'s models for the
#   device (on a GPU: CLIP ViT-L/14, DINOv2 ViT-L/14, ...; `MODELS` overrides), `BUDGET_MINUTES`, and with a GPU a
#   head fine-tuned on the training classes that are not held out, as one more candidate.

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
MODELS = []  # empty: select's defaults for the device (fast mode: ["efficientnet-lite0"]); `python -m helpers models`
GRID = "quick"  # quick | default | full: how many pooling, TTA and post-processing settings are tried
BUDGET_MINUTES = 30.0  # select stops with the best so far (fast mode: at most 2)
FINETUNE = None  # None: on with a GPU in full mode, else off; True/False force it
RECIPE = "circle"  # the fine-tuning recipe (`python -m helpers train --help`)
HOLDOUT_CLASSES = 0.2  # share of the training classes held out as the validation split (at least 2 classes)
SEED = 0
K = 10
DEVICE = "auto"  # auto: CUDA, else MPS, else CPU
GROUP_NAME = ""  # set both GROUP_NAME and SERVER_URL to send the submission at the end
SERVER_URL = ""
TOKEN = ""  # only for a server started with per-group tokens

# %%
import pandas as pd

from helpers.notebook import (check_run_outputs, competition_plan, maybe_submit, notebook_data, notebook_mode,
                              output_root, save_selection, show_image)
from helpers.select import select

FAST, DEVICE = notebook_mode(FAST, DEVICE)  # prints the mode, why, and the GPU
DATA = notebook_data(FAST, DATA_SOURCE, need_training=True)
OUT = output_root(FAST)  # outputs: $RETRIEVAL_OUTPUT_DIR, else fast mode's own folder, else the project
TAG = f"{'fast_' if FAST else ''}08_competition"
PLAN = competition_plan(FAST, DEVICE, MODELS, BUDGET_MINUTES, FINETUNE, RECIPE)
print(f"data: {DATA}, outputs: {OUT}")

# %% [markdown]
# ## Select on held-out classes
# `select` builds (or reuses) the validation split in `OUT/runs/08_competition/validation/` (`classes.json` names
# the held-out classes, which fine-tuning leaves out), scores every candidate there (one metrics JSON each), and
# runs the winner on `test/`. Models whose weights cannot be had are skipped with the reason.

# %%
outcome = select(data=str(DATA), grid=GRID, holdout_classes=HOLDOUT_CLASSES, seed=SEED, k=K, device=DEVICE,
                 out=str(OUT / "runs" / TAG), **PLAN)
for name, reason in outcome.skipped_models:
    print(f"skipped {name}: {reason}")
print(f"held-out classes: {', '.join(outcome.split.held_out)}")
print(f"winner: {outcome.winner.candidate.name} ({len(outcome.results)} candidates, {outcome.left_out} left out by "
      f"the budget, {outcome.seconds / 60:.1f} min)")

# %% [markdown]
# ## The leaderboard
# One row per candidate, best first, scored on the held-out classes: the course's weighted score (600 for a right
# rank 1, +300 for one in the top 5, +100 in the top 10), hit@k and mAP@10.

# %%
leaderboard = pd.read_csv(outcome.leaderboard["csv"])
leaderboard.drop(columns=["metrics_json"]).dropna(axis=1, how="all").head(15)

# %%
show_image(outcome.leaderboard["png"])

# %% [markdown]
# ## The winner on the test queries
# Each row: a test query, then its top-k gallery images. Without test labels the grid cannot colour right and
# wrong: look for the same identity.

# %%
outputs = save_selection(outcome, TAG, DATA, root=OUT)
print(f"winner's configuration (`python -m helpers retrieve --config` runs it again): {outcome.winner_config}")
show_image(outputs.grid)

# %% [markdown]
# ## Submit (optional)
# The submission is checked as `submit.py --dry-run --data DIR` checks it. Nothing is sent unless both `GROUP_NAME`
# and `SERVER_URL` are set in the parameters cell; from a terminal, the one command that sends it is printed below.

# %%
print(outcome.send_command)
maybe_submit(outputs.submission, GROUP_NAME, SERVER_URL, data=DATA, k=K, root=OUT, token=TOKEN)

# %% [markdown]
# ## Checks
# A valid submission for the test, the winner's validation metrics in range, a leaderboard row per candidate, a
# validation split made only of training classes, and the files written. With EfficientNet-Lite0's ImageNet
# weights most held-out queries find their class at rank 1.

# %%
metrics = check_run_outputs(outputs.submission, DATA, outputs.metrics, [outputs.grid, outcome.leaderboard["png"]],
                            k=K)
assert not outcome.problems, outcome.problems
assert len(leaderboard) == len(outcome.results) >= 4, leaderboard
assert set(outcome.split.held_out) <= {p.name for p in (DATA / "training").iterdir() if p.is_dir()}
assert outcome.winner_config.is_file() and outcome.split.held_out
if FAST and "efficientnet-lite0" in PLAN["models"]:
    assert metrics["hit@1"] >= 0.5, metrics
metrics
