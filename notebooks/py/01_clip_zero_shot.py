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
# # 01 · CLIP zero-shot: image retrieval, text-to-image search and zero-shot classification
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/YOUR_ORG/YOUR_REPO/blob/main/notebooks/01_clip_zero_shot.ipynb)
#
# CLIP (Radford et al., 2021) embeds images and text in one space, so one model does three jobs without any
# training: image-to-image retrieval (cosine similarity of image embeddings), text-to-image search (a sentence
# ranks the gallery) and zero-shot classification (class names turned into prompts, averaged over CLIP's
# templates).
#
# - **Fast mode** (`RETRIEVAL_FAST=1`, default without a GPU): a small real CIFAR-10 split from
#   `../shared/datasets` (else the digits demo) and a *randomly initialised* CLIP (no download): the numbers are
#   near chance, the point is that every step runs.
# - **Full mode** (`RETRIEVAL_FAST=0`, default with a GPU): the pretrained weights (`PRETRAINED_TAG`) and your
#   data.

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
MODEL = "clip-vit-b32"  # clip-vit-b32 | clip-vit-b16 | clip-vit-l14 | clip-vit-l14-336 | clip-vit-h14
PRETRAINED_TAG = "openai"  # open_clip weight tag (clip-vit-h14: laion2b_s32b_b79k)
TEXT_QUERIES = None  # None: "a photo of a <class>." for every class; or a list of sentences
TEMPLATES = "openai"  # zero-shot prompt ensemble: openai (CLIP's 18 templates) | simple (fast mode: simple)
K = 10
BATCH_SIZE = 64
DEVICE = "auto"
GROUP_NAME = ""  # set both GROUP_NAME and SERVER_URL to submit at the end
SERVER_URL = ""

# %%
from helpers.metrics import evaluate_rankings, format_metrics_table
from helpers.models import load_model
from helpers.notebook import (check_run_outputs, class_text_queries, notebook_mode, maybe_submit,
                              notebook_data, output_root, save_outputs, show_image)
from helpers.notebook import scored_retrieval, zero_shot_classes
from helpers.text import run_zero_shot, save_zero_shot, text_search

FAST, DEVICE = notebook_mode(FAST, DEVICE)  # prints the mode, why, and the GPU
DATA = notebook_data(FAST, DATA_SOURCE, source="cifar10-test")
OUT = output_root(FAST)  # outputs: $RETRIEVAL_OUTPUT_DIR, else fast mode's own folder, else the project
WEIGHTS = "none" if FAST else "pretrained"
TEMPLATES = "simple" if FAST else TEMPLATES
TAG = f"{'fast_' if FAST else ''}01_{MODEL}_zero-shot"
model = load_model(MODEL, weights=WEIGHTS, device=DEVICE, pretrained=PRETRAINED_TAG)
print(f"data: {DATA}, {model.name} ({WEIGHTS}), {model.embed_dim}-d")

# %% [markdown]
# ## 1. Image-to-image retrieval
# The default pooling (`proj`) is CLIP's own image embedding: the class token through the final projection,
# the space the text tower shares.

# %%
run = scored_retrieval(DATA, model=model, k=K, batch_size=BATCH_SIZE, device=DEVICE, run_name=TAG)
outputs = save_outputs(run, root=OUT)
print(format_metrics_table(run.metrics))
show_image(outputs.grid)

# %% [markdown]
# ## 2. Text-to-image search
# Each sentence is encoded by the text tower and ranks the gallery by cosine similarity. With one sentence per
# class, the gallery images of that class are the relevant ones, so the ranking can be scored like a submission.

# %%
queries, text_truth = class_text_queries(DATA)
queries = TEXT_QUERIES or queries
found = text_search(DATA, queries, model=model, k=K, batch_size=BATCH_SIZE, device=DEVICE)
text_eval = evaluate_rankings(found.rankings, {q: t for q, t in text_truth.items() if q in found.rankings}, k=K)
print(format_metrics_table(text_eval.metrics))
{q: names[:5] for q, names in list(found.rankings.items())[:5]}

# %% [markdown]
# ## 3. Zero-shot classification
# Every query and gallery image is labelled among the class names, each class embedded as the mean of its
# prompts (`TEMPLATES`); the true labels come from `test/labels.json`. Without it (a competition's test), the
# classes are the `training/` folders and no accuracy is computed.

# %%
zero_shot = run_zero_shot(DATA, classes=zero_shot_classes(DATA), templates=TEMPLATES, model=model,
                          batch_size=BATCH_SIZE, device=DEVICE)
zero_shot_files = save_zero_shot(zero_shot, OUT / "results" / "zero-shot" / TAG)
print({key: value for key, value in (zero_shot.metrics or {}).items() if not isinstance(value, dict)})
zero_shot.predictions_frame().head()

# %% [markdown]
# ## Submit (optional)
# Nothing is sent unless both `GROUP_NAME` and `SERVER_URL` are set in the parameters cell.

# %%
maybe_submit(outputs.submission, GROUP_NAME, SERVER_URL, data=DATA, k=K, root=OUT)

# %% [markdown]
# ## Checks

# %%
metrics = check_run_outputs(outputs.submission, DATA, outputs.metrics, [outputs.grid], k=K)
assert set(found.rankings) == set(queries) and all(len(r) == K for r in found.rankings.values())
assert all(0.0 <= value <= 1.0 for key, value in text_eval.metrics.items() if key != "weighted_score")
assert zero_shot_files.predictions.is_file() and len(zero_shot.names) == len(run.rankings) + len(run.gallery.paths)
assert zero_shot.metrics is None or 0.0 <= zero_shot.metrics["top1_accuracy"] <= 1.0
metrics
