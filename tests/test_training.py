"""Training: loss signs, LLRD groups, schedule, P-K batches, exact resume, learning on real images, checkpoints."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from helpers.training.losses import Criterion, PKSampler, balanced_pairs
from helpers.training.optim import backbone_layers, make_optimizer, make_scheduler, param_groups, warmup_cosine_factor
from helpers.training.recipes import RECIPES, make_config

SMALL = dict(input_size=32, classes_per_batch=4, images_per_class=4, progress=False, num_workers=0)


@pytest.fixture(scope="module")
def cifar_split(tmp_path_factory):
    """A real split of CIFAR-10 test images: 10 classes x (6 training, 2 query, 3 gallery)."""
    from helpers.data import split_dataset

    from .conftest import shared_dataset

    out = tmp_path_factory.mktemp("cifar_split")
    split_dataset(shared_dataset("cifar10-test"), out, train_per_class=6, query_per_class=2, gallery_per_class=3,
                  seed=0)
    return out


# --------------------------------------------------------------------------------------------------------------
# Loss signs
# --------------------------------------------------------------------------------------------------------------
def _unit(*vectors):
    return torch.nn.functional.normalize(torch.stack(vectors).float(), dim=-1)


def _criterion(recipe: str, n_classes: int = 2, dim: int = 8, **overrides) -> Criterion:
    torch.manual_seed(0)
    return Criterion(make_config(recipe, **overrides), num_classes=n_classes, embedding_size=dim)


PAIR_RECIPES = ["circle", "siamese", "triplet", "supcon"]


@pytest.mark.parametrize("recipe", PAIR_RECIPES + ["simclr"])
def test_pair_losses_fall_when_positives_close_and_negatives_part(recipe):
    e = torch.eye(8)
    labels = torch.tensor([0, 0, 1, 1])
    # all triplets here (the semi-hard miner would skip the hard ones this case is made of)
    criterion = _criterion(recipe, **({"miner": None} if recipe == "triplet" else {}))
    near_pos = _unit(e[0], e[0] + 0.2 * e[1], e[2], e[2] + 0.2 * e[3])
    far_pos = _unit(e[0], e[0] + 6.0 * e[1], e[2], e[2] + 6.0 * e[3])
    near_neg = _unit(e[0], e[0] + 0.2 * e[1], e[0] + 0.4 * e[2], e[0] + 0.4 * e[2] + 0.2 * e[3])
    with torch.no_grad():
        loss_near, loss_far = criterion(near_pos, labels, 1), criterion(far_pos, labels, 1)
        loss_neg_near = criterion(near_neg, labels, 1)
    assert loss_near < loss_far, "positives closer together must lower the loss"
    assert loss_near < loss_neg_near, "negatives closer together must raise the loss"


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_gradient_steps_pull_positives_and_push_negatives(recipe):
    """Descending each loss on free embeddings raises same-class and lowers other-class cosine similarity."""
    torch.manual_seed(1)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    criterion = _criterion(recipe, n_classes=3, dim=16)
    raw = torch.nn.Parameter(torch.randn(9, 16))
    opt = torch.optim.Adam([raw], lr=0.05)  # class weights (arcface, ce) stay fixed: only the embeddings move
    same = labels[:, None] == labels[None, :]
    off = ~torch.eye(9, dtype=torch.bool)

    def sims():
        z = torch.nn.functional.normalize(raw.detach(), dim=-1)
        s = z @ z.t()
        return s[same & off].mean().item(), s[~same].mean().item()

    pos0, neg0 = sims()
    for _ in range(60):
        loss = criterion(torch.nn.functional.normalize(raw, dim=-1), labels, 10)
        opt.zero_grad()
        loss.backward()
        opt.step()
    pos1, neg1 = sims()
    assert pos1 > pos0 + 0.05 and neg1 < neg0 - 0.02, (pos0, pos1, neg0, neg1)


def test_siamese_contrastive_sign_on_explicit_pairs():
    """Hadsell et al.: a positive pair costs its distance, a negative pair costs only inside the margin."""
    from pytorch_metric_learning import losses

    criterion = _criterion("siamese")
    assert isinstance(criterion.loss, losses.ContrastiveLoss)
    e = torch.eye(4)
    emb = _unit(e[0], e[0], e[1], e[1])  # two identical pairs (pytorch-metric-learning skips tuples of length 1)
    none = torch.tensor([], dtype=torch.long)
    pairs = (torch.tensor([0, 2]), torch.tensor([1, 3]))
    assert criterion.loss(emb, torch.tensor([0, 0, 1, 1]), indices_tuple=pairs + (none, none)) == 0
    identical_negatives = criterion.loss(emb, torch.tensor([0, 1, 2, 3]), indices_tuple=(none, none) + pairs)
    assert identical_negatives == pytest.approx(1.0)  # inside the margin (1): full cost
    far = _unit(e[0], e[1], e[2], e[3])  # distance sqrt(2) > margin: no cost for negatives, cost for positives
    assert criterion.loss(far, torch.tensor([0, 1, 2, 3]), indices_tuple=(none, none) + pairs) == 0
    assert criterion.loss(far, torch.tensor([0, 0, 1, 1]), indices_tuple=pairs + (none, none)) == pytest.approx(
        math.sqrt(2))
    a1, p, a2, n = balanced_pairs(torch.tensor([0, 0, 1, 1, 2]))
    labels5 = torch.tensor([0, 0, 1, 1, 2])
    assert torch.all(labels5[a1] == labels5[p]) and torch.all(a1 != p)
    assert torch.all(labels5[a2] != labels5[n]) and len(a2) == 5


def test_miner_starts_at_configured_epoch():
    criterion = Criterion(make_config("circle", miner_start_epoch=5), num_classes=2, embedding_size=8)
    assert [criterion.miner_active(e) for e in (1, 4, 5, 6)] == [False, False, True, True]


# --------------------------------------------------------------------------------------------------------------
# Optimiser groups and schedule
# --------------------------------------------------------------------------------------------------------------
class _ToyBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Linear(4, 4)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(4)])
        self.norm = torch.nn.LayerNorm(4)


class _ToyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Module()
        self.backbone.network = _ToyBlocks()
        self.head = torch.nn.Linear(4, 2, bias=False)


def test_llrd_groups_have_exactly_the_configured_rates():
    net = _ToyNet()
    groups = param_groups(net, None, lr=1e-4, head_lr=1e-3, weight_decay=0.05, layer_decay=0.65)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    bb = net.backbone.network
    # layers: stem (0), blocks 1-4, norm (5): layer i at lr * 0.65 ** (5 - i)
    assert lr_of[id(bb.stem.weight)] == (1e-4 * 0.65 ** 5, 0.05)
    assert lr_of[id(bb.stem.bias)] == (1e-4 * 0.65 ** 5, 0.0)
    for i, block in enumerate(bb.blocks, start=1):
        assert lr_of[id(block.weight)] == (1e-4 * 0.65 ** (5 - i), 0.05)
    assert lr_of[id(bb.norm.weight)] == (1e-4, 0.0)
    assert lr_of[id(net.head.weight)] == (1e-3, 0.05)
    assert len(lr_of) == sum(1 for _ in net.parameters())  # every parameter exactly once


def test_llrd_over_efficientnet_stages_and_frozen_blocks():
    from helpers.training.loop import set_trainable
    from helpers.training.model import build_network

    config = make_config("circle", weights="none", trainable="blocks:2", **SMALL)
    net, _ = build_network(config)
    set_trainable(net, config.trainable)
    groups = param_groups(net, None, lr=1e-4, head_lr=1e-3, layer_decay=0.65)
    layer_lrs = sorted({g["lr"] for g in groups if g["name"].startswith("layer_")}, reverse=True)
    # trainable: conv_head/bn2 (top layer), the last two stages of blocks
    assert layer_lrs == pytest.approx([1e-4, 1e-4 * 0.65, 1e-4 * 0.65 ** 2])
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == trainable
    layers = backbone_layers(net.backbone.network)
    assert len(layers) == 9  # stem, 7 stages, conv head
    assert not any(p.requires_grad for layer in layers[:-3] for _, p in layer)
    assert all(p.requires_grad for layer in layers[-3:] for _, p in layer)
    gem_p = [p for n, p in net.named_parameters() if n.endswith("gem.p")]
    assert len(gem_p) == 1 and gem_p[0].requires_grad and all(p.requires_grad for p in net.head.parameters())
    assert {g["lr"] for g in groups if any(p is gem_p[0] for p in g["params"])} == {1e-3}


def test_warmup_then_cosine_schedule():
    total, warmup = 100, 15
    f = [warmup_cosine_factor(s, total, warmup) for s in range(total)]
    assert f[0] == pytest.approx(1 / 15) and f[14] == pytest.approx(1.0)
    assert all(b > a for a, b in zip(f[:15], f[1:15]))  # linear warm-up, rising
    assert all(b <= a for a, b in zip(f[15:], f[16:]))  # cosine decay, falling
    assert f[15 + 85 // 2] == pytest.approx(0.5 * (1 + math.cos(math.pi * (85 // 2) / 85)))
    assert warmup_cosine_factor(total, total, warmup) == pytest.approx(0.0)

    net = _ToyNet()
    opt = make_optimizer(net, None, lr=1e-4, head_lr=1e-3)
    sched = make_scheduler(opt, total_steps=20, warmup_fraction=0.15)  # ceil(3.0) = 3 warm-up steps
    assert [g["initial_lr"] for g in opt.param_groups] == [g["lr"] / (1 / 3) for g in opt.param_groups]
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[-1]["lr"])
        opt.step()
        sched.step()
    expected = [1e-3 * warmup_cosine_factor(s, 20, 3) for s in range(20)]
    assert seen == pytest.approx(expected)


# --------------------------------------------------------------------------------------------------------------
# P-K batches
# --------------------------------------------------------------------------------------------------------------
def test_pk_batches_hold_p_classes_of_k_images():
    np.random.seed(0)
    labels = [c for c in range(6) for _ in range(10)]
    sampler = PKSampler(labels, classes_per_batch=4, images_per_class=3)
    indices = list(sampler)
    assert sampler.batch_size == 12 and len(indices) % 12 == 0 and not sampler.notes
    for start in range(0, len(indices), 12):
        batch = [labels[i] for i in indices[start:start + 12]]
        counts = {c: batch.count(c) for c in set(batch)}
        assert len(counts) == 4 and set(counts.values()) == {3}


def test_pk_sampler_adapts_and_says_so(caplog):
    labels = [0] * 5 + [1] * 2 + [2] * 6
    with caplog.at_level("WARNING"):
        sampler = PKSampler(labels, classes_per_batch=32, images_per_class=4)
    assert (sampler.p, sampler.k) == (3, 4)
    assert any("only 3 classes" in n for n in sampler.notes)
    assert any("fewer than K=4" in n for n in sampler.notes)
    assert "P-K sampler" in caplog.text
    batch = [labels[i] for i in list(sampler)[:12]]
    assert sorted(batch.count(c) for c in range(3)) == [4, 4, 4]
    # fewer classes than P, all of them large: K grows to keep about P*K images per batch
    big = PKSampler([c for c in range(4) for _ in range(50)], classes_per_batch=8, images_per_class=4)
    assert (big.p, big.k, big.batch_size) == (4, 8, 32) and "K=8" in big.notes[0]
    fixed = PKSampler([c for c in range(4) for _ in range(50)], classes_per_batch=8, images_per_class=4,
                      keep_batch=False)
    assert (fixed.p, fixed.k) == (4, 4)


# --------------------------------------------------------------------------------------------------------------
# Real training runs (tiny: 32 px CIFAR images, a few steps)
# --------------------------------------------------------------------------------------------------------------
def test_a_few_steps_on_real_images_lower_the_loss(cifar_split):
    from helpers.data import list_class_folder, load_image
    from helpers.training.loop import set_trainable
    from helpers.training.model import build_network, feature_preprocessing

    torch.manual_seed(0)
    config = make_config("circle", trainable="all", **SMALL)
    net, base = build_network(config)
    set_trainable(net, "all")
    items = list_class_folder(cifar_split / "training")
    chosen = [i for c in range(2) for i in range(c * 6, c * 6 + 4)]  # 2 classes x 4 images
    transform = feature_preprocessing(base, 32).transform()
    x = torch.stack([transform(load_image(items[i][0])) for i in chosen])
    y = torch.tensor([i // 4 for i in range(8)])
    assert len({items[i][1] for i in chosen}) == 2
    criterion = Criterion(config, num_classes=2, embedding_size=512)
    opt = make_optimizer(net, criterion, lr=1e-4, head_lr=1e-3)
    net.train()  # the training objective (batch statistics), with the same dropout mask for both measurements

    def loss_now():
        torch.manual_seed(123)
        with torch.no_grad():
            return float(criterion(net(x), y, 1))

    before = loss_now()
    for _ in range(5):
        loss = criterion(net(x), y, 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss_now() < before * 0.9


@pytest.fixture(scope="module")
def trained_run(cifar_split, tmp_path_factory):
    """Full fine-tuning at 32 px for 2 epochs, uninterrupted."""
    from helpers.training import train

    out = tmp_path_factory.mktemp("run_full")
    config = make_config("circle", data=str(cifar_split), trainable="all", epochs=2, out=str(out),
                         miner_start_epoch=2, **SMALL)
    return train(config), config


def test_resume_after_a_kill_mid_epoch_matches_an_uninterrupted_run(trained_run, tmp_path):
    from dataclasses import replace

    from helpers.training import train

    full, config = trained_run
    out = tmp_path / "interrupted"
    cfg = replace(config, out=str(out))

    def kill(epoch, step):
        if epoch == 2 and step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, callback=kill)
    assert (out / "last.pt").exists()
    resumed = train(cfg, resume=True)
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in full.history]
    assert resumed.best_metrics == full.best_metrics
    a = torch.load(full.last_path, weights_only=True)["model"]
    b = torch.load(resumed.last_path, weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    history = json.loads((out / "history.json").read_text())
    assert len(history["history"]) == 2 and "val_map@10" in history["history"][0]


def test_best_checkpoint_is_a_real_copy_of_its_epoch(trained_run):
    full, _ = trained_run
    best = torch.load(full.best_path, weights_only=True)
    last = torch.load(full.last_path, weights_only=True)
    assert best["epoch"] == full.best_epoch
    assert best["metrics"]["map@10"] == full.history[full.best_epoch - 1]["val_map@10"]
    assert best["training_info"]["num_epochs"] == full.best_epoch
    if full.best_epoch != last["epoch"]:
        assert any(not torch.equal(best["model"][k], last["model"][k]) for k in best["model"])
    assert set(json.loads((full.run_dir / "config.json").read_text())) >= {"recipe", "loss", "trainable"}


def test_retrieve_with_checkpoint_uses_the_head_embedding(trained_run, cifar_split, tmp_path):
    from helpers.cli import main
    from helpers.training import load_checkpoint_model

    full, _ = trained_run
    model = load_checkpoint_model(full.best_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        expected = model.network.head(model.network.features(x))
    assert out.shape == (2, 512) and torch.allclose(out, expected)
    assert torch.allclose(out.norm(dim=-1), torch.ones(2), atol=1e-5)

    metrics_path = tmp_path / "m.json"
    rc = main(["retrieve", "--data", str(cifar_split), "--checkpoint", str(full.best_path), "--quiet",
               "--out", str(tmp_path / "s.json"), "--metrics-out", str(metrics_path), "--no-cache"])
    assert rc == 0
    record = json.loads(metrics_path.read_text())
    assert record["is_finetuned"] is True and record["loss_function"] == "circle"
    assert record["num_epochs"] == full.best_epoch and record["pooling_type"] == "gem"
    assert record["final_train_loss"] == pytest.approx(full.history[full.best_epoch - 1]["train_loss"])


def test_train_verb_head_only_ce_retrieves_on_the_embedding_not_logits(cifar_split, tmp_path):
    from helpers.cli import main
    from helpers.training import load_checkpoint_model

    out = tmp_path / "ce"
    rc = main(["train", "--data", str(cifar_split), "--recipe", "ce", "--trainable", "head", "--epochs", "2",
               "--input-size", "32", "--classes-per-batch", "4", "--out", str(out), "--quiet"])
    assert rc == 0 and (out / "best.pt").exists() and (out / "config.json").exists()
    model = load_checkpoint_model(out / "best.pt")
    assert model.embed_dim == 512 and model.training_info["loss_function"] == "ce"
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 512)  # 10 classes: logits would be (2, 10)
    assert main(["train", "--data", str(cifar_split), "--trainable", "layers:2", "--out", str(out)]) == 2
    assert main(["train", "--data", str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_tensors_the_image_embedding_never_uses_stay_frozen():
    """E.g. CLIP's text tower: found by one backward pass, excluded from training."""
    from helpers.training.loop import freeze_unused
    from helpers.training.model import RetrievalNet

    class Backbone(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.network = torch.nn.Module()
            self.network.conv = torch.nn.Conv2d(3, 4, 3)
            self.network.bn = torch.nn.BatchNorm2d(4)
            self.network.text = torch.nn.Linear(4, 4)  # never on the image path

        def forward(self, x):
            return self.network.bn(self.network.conv(x)).mean(dim=(-2, -1))

    net = RetrievalNet(Backbone(), in_dim=4, embed_dim=8)
    running_mean = net.backbone.network.bn.running_mean.clone()
    unused = freeze_unused(net, 8, torch.device("cpu"))
    assert unused == ["network.text.weight", "network.text.bias"]
    assert not net.backbone.network.text.weight.requires_grad and net.backbone.network.conv.weight.requires_grad
    assert torch.equal(net.backbone.network.bn.running_mean, running_mean)  # statistics untouched
    groups = param_groups(net, None, lr=1e-4, head_lr=1e-3)
    assert all(p is not net.backbone.network.text.weight for g in groups for p in g["params"])


def test_simclr_learns_from_unlabeled_query_and_gallery_images(cifar_split, tmp_path):
    from helpers.training import train

    config = make_config("simclr", data=str(cifar_split), epochs=1, batch_size=16, out=str(tmp_path / "simclr"),
                         **{k: v for k, v in SMALL.items() if k not in ("classes_per_batch", "images_per_class")})
    assert config.trainable == "all" and config.loss == "ntxent" and config.sampler == "random"
    result = train(config)
    saved = json.loads((tmp_path / "simclr" / "config.json").read_text())
    assert saved["steps_per_epoch"] == 50 // 16  # the 20 query + 30 gallery images, two views each
    assert result.history[0]["train_loss"] > 0 and "val_map@10" in result.history[0]
    with pytest.raises(ValueError, match="cannot train on cached features"):
        make_config("simclr", trainable="head")


def test_head_only_checkpoint_of_a_random_backbone_reloads_identically(cifar_split, tmp_path):
    """A random backbone cannot be rebuilt from its name: the checkpoint must carry it."""
    from helpers.cli import main
    from helpers.training import load_checkpoint_model

    out = tmp_path / "random-head"
    assert main(["train", "--data", str(cifar_split), "--weights", "none", "--trainable", "head", "--epochs", "1",
                 "--input-size", "32", "--classes-per-batch", "4", "--out", str(out), "--quiet"]) == 0
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        first = load_checkpoint_model(out / "best.pt")(x)
        second = load_checkpoint_model(out / "best.pt")(x)
    assert torch.equal(first, second)


def test_mirrored_feature_extractor_sees_the_mirror_image_and_caches_separately():
    """``head_flip``: the second cached view of each training image is its horizontal mirror."""
    from helpers.training.model import FeatureExtractor, build_network

    net, base = build_network(make_config("circle", weights="none"))
    net.eval()
    plain = FeatureExtractor(base, net.backbone, 64, net.in_dim)
    mirrored = FeatureExtractor(base, net.backbone, 64, net.in_dim, flip=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(mirrored(x), plain(torch.flip(x, dims=[3])), atol=1e-5)
        assert not torch.allclose(mirrored(x), plain(x), atol=1e-3)
    assert mirrored.cache_key() != plain.cache_key()
