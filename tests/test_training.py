"""Training: loss signs, LLRD groups, schedule, P-K batches, exact resume, learning on real images, checkpoints."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from helpers.training.losses import Criterion, PKSampler, balanced_pairs
from helpers.training.optim import make_optimizer, make_scheduler, param_groups, warmup_cosine_factor
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
def test_plan_of_clip_gem_circle_gives_the_recipe_rates_to_every_trainable_tensor_once():
    """ViT-B/32 (12 blocks): block i at 4e-4 * 0.65 ** (11 - i), stem and neck 4e-5, head 4e-4, weight decay 0.05."""
    from helpers.training.loop import build_trainable

    config = make_config("clip-gem-circle", model="clip-vit-b32", weights="none")
    net, _, _ = build_trainable(config, torch.device("cpu"))
    groups = param_groups(net, None, config.lr, config.head_lr, config.backbone_lr, config.weight_decay,
                          config.layer_decay)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in net.parameters() if p.requires_grad}
    rates = {g["group"]: g["lr"] for g in groups}
    assert {k for k in rates if k.startswith("block.")} == {f"block.{i}" for i in range(12)}
    for i in range(12):
        assert rates[f"block.{i}"] == pytest.approx(4e-4 * 0.65 ** (11 - i), rel=1e-12)
    assert rates["stem"] == rates["neck"] == 4e-5 and rates["head"] == 4e-4
    assert {g["weight_decay"] for g in groups} == {0.05, 0.0}
    visual = net.backbone.network.model.visual
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert lr_of[id(visual.conv1.weight)] == lr_of[id(visual.positional_embedding)] == 4e-5
    assert lr_of[id(visual.ln_post.weight)] == 4e-5
    assert lr_of[id(net.backbone.network.gem.p)] == 4e-4  # GeM's p trains with the head
    assert not any(p.requires_grad for p in net.backbone.network.model.transformer.parameters())  # text tower


def test_plan_verb_for_resnet18_blocks_1_trains_only_layer4_the_neck_and_the_head(tmp_path, capsys):
    from helpers.cli import main
    from helpers.training.loop import build_trainable

    out = tmp_path / "plan"
    assert main(["train", "--model", "resnet18", "--weights", "none", "--trainable", "blocks:1", "--plan",
                 "--data", str(tmp_path / "none"), "--out", str(out)]) == 0
    assert "| block.3 |" in capsys.readouterr().out
    rows = json.loads((out / "param_groups.json").read_text())
    assert {r["group"] for r in rows} == {"block.3", "head"}
    assert {r["lr"] for r in rows if r["group"] == "block.3"} == {1e-4}
    assert {r["lr"] for r in rows if r["group"] == "head"} == {1e-3}
    assert set(rows[0]) == {"group", "tensors", "numel", "lr", "weight_decay"}
    config = make_config("circle", model="resnet18", weights="none", trainable="blocks:1")
    net, _, _ = build_trainable(config, torch.device("cpu"))
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert sum(r["tensors"] for r in rows) == len(trainable)
    backbone = [n for n in trainable if n.startswith("backbone.network.model.")]
    assert backbone and all(n.startswith("backbone.network.model.layer4.") for n in backbone)
    assert {n for n in trainable if not n.startswith("backbone.network.model.")} == {
        "backbone.network.gem.p", "head.linear.weight", "head.bn.weight", "head.bn.bias"}
    with pytest.raises(ValueError, match="has 4 blocks"):
        build_trainable(make_config("circle", model="resnet18", weights="none", trainable="blocks:5"),
                        torch.device("cpu"))


def test_frozen_stages_keep_their_batch_norm_statistics_across_blocks_training(cifar_split):
    from helpers.data import list_class_folder, load_image
    from helpers.training.loop import _train_mode, build_trainable, train_transform
    from helpers.training.model import feature_preprocessing

    torch.manual_seed(0)
    config = make_config("circle", model="resnet18", weights="none", trainable="blocks:1", **SMALL)
    net, base, _ = build_trainable(config, torch.device("cpu"))
    items = list_class_folder(cifar_split / "training")[:8]
    transform = train_transform(feature_preprocessing(base, 32), config)
    x = torch.stack([transform(load_image(p)) for p, _ in items])
    y = torch.tensor([i // 4 for i in range(8)])
    bns = {n: m for n, m in net.backbone.network.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    before = {n: m.running_mean.clone() for n, m in bns.items()}
    criterion = Criterion(config, num_classes=2, embedding_size=512)
    opt = make_optimizer(net, criterion, 1e-4, 1e-3, 1e-5)
    for _ in range(2):
        _train_mode(net)
        loss = criterion(net(x), y, 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    frozen = [n for n in bns if not n.startswith("model.layer4.")]
    assert frozen and all(torch.equal(bns[n].running_mean, before[n]) for n in frozen)
    assert all(not torch.equal(bns[n].running_mean, before[n]) for n in bns if n.startswith("model.layer4."))


@pytest.mark.parametrize("model", ["efficientnet-lite0", "clip-vit-b32"])
def test_the_training_transform_uses_the_models_own_mean_and_std(model):
    from PIL import Image

    from helpers.models import get_spec
    from helpers.training.loop import train_transform

    prep = get_spec(model).preprocessing
    config = make_config("circle", color_jitter=0, grayscale_p=0, erasing_p=0)
    out = train_transform(prep, config)(Image.new("RGB", (40, 40), (100, 150, 200)))
    expected = [(v / 255 - m) / s for v, m, s in zip((100, 150, 200), prep.mean, prep.std)]
    assert [float(out[c].mean()) for c in range(3)] == pytest.approx(expected, abs=1e-4)


def test_gradient_accumulation_of_2_equals_a_doubled_batch():
    from helpers.training.loop import Stepper, run_epoch

    torch.manual_seed(0)
    x, y = torch.randn(8, 5), torch.randn(8, 3)

    def trained(batches, accum):
        torch.manual_seed(1)
        model = torch.nn.Linear(5, 3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        stepper = Stepper(opt, sched, torch.amp.GradScaler("cuda", enabled=False), accum, 0.0)
        run_epoch(model, lambda out, target, epoch: ((out - target) ** 2).mean(), batches, stepper, 1)
        return model.weight.detach().clone()

    halves = [(x[:4], y[:4]), (x[4:], y[4:])]
    doubled = trained([(x, y)], 1)
    assert torch.allclose(trained(halves, 2), doubled, atol=1e-6)
    assert not torch.allclose(trained(halves, 1), doubled, atol=1e-4)  # two steps are not one


def test_gem_exponent_is_kept_at_one_or_more():
    from helpers.models.pooling import GeM

    pool = GeM()
    x = torch.rand(2, 3, 4, 4) + 0.1
    with torch.no_grad():
        pool.p.fill_(0.2)
    assert torch.allclose(pool(x), x.mean(dim=(-2, -1)), atol=1e-5)  # used as p=1 (average pooling)
    pool.clamp_()
    assert float(pool.p.detach()) == 1.0


def test_warmup_then_cosine_schedule():
    total, warmup = 100, 15
    f = [warmup_cosine_factor(s, total, warmup) for s in range(total)]
    assert f[0] == pytest.approx(1 / 15) and f[14] == pytest.approx(1.0)
    assert all(b > a for a, b in zip(f[:15], f[1:15]))  # linear warm-up, rising
    assert all(b <= a for a, b in zip(f[15:], f[16:]))  # cosine decay, falling
    assert f[15 + 85 // 2] == pytest.approx(0.5 * (1 + math.cos(math.pi * (85 // 2) / 85)))
    assert warmup_cosine_factor(total, total, warmup) == pytest.approx(0.0)

    net = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW([{"params": [net.weight], "lr": 1e-4}, {"params": [net.bias], "lr": 1e-3}])
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
    opt = make_optimizer(net, criterion, lr=1e-4, head_lr=1e-3, backbone_lr=1e-5)
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


# --------------------------------------------------------------------------------------------------------------
# Held-out classes, bad input, offline reload, seeding, recorded rates
# --------------------------------------------------------------------------------------------------------------
def _tiny_folder(root, cifar_split, per_class: int = 6, corrupt: bool = False):
    """Links to the CIFAR training images of ``cifar_split``; ``corrupt`` adds one broken JPEG."""
    import os

    from helpers.data import list_class_folder

    taken: dict[str, int] = {}
    for path, label in list_class_folder(cifar_split / "training"):
        if taken.get(label, 0) < per_class:
            taken[label] = taken.get(label, 0) + 1
            (root / label).mkdir(parents=True, exist_ok=True)
            os.link(path, root / label / path.name)
    if corrupt:
        (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return root


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_the_class_split_never_shares_a_class_between_training_and_validation(seed, tmp_path):
    from PIL import Image

    from helpers.data import validation_split

    items = []
    for c in range(12):
        for i in range(3 + c % 4):
            path = tmp_path / "src" / f"c{c}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (20 * c, 10 * i, 0)).save(path)
            items.append((path, f"c{c}"))
    tmp_path = tmp_path / "out"
    split = validation_split(items, 0.2, seed=seed, out=tmp_path)
    assert not set(split.held_out) & set(split.training)
    assert sorted(split.held_out + split.training) == sorted({c for _, c in items})
    assert len(split.held_out) == round(0.2 * 12)
    assert {split.labels[p] for p in split.query + split.gallery} == set(split.held_out)
    truth = json.loads((tmp_path / "test" / "ground_truth.json").read_text())
    assert len(truth) == len(split.query) and all(truth.values())
    assert json.loads((tmp_path / "split.json").read_text()) == split.to_dict()
    assert validation_split(items, 0.01, seed=seed).held_out.__len__() == 2  # at least 2 classes


def test_full_training_leaves_out_a_corrupt_image_and_its_checkpoint_reloads_offline(cifar_split, tmp_path,
                                                                                    monkeypatch):
    """Started from a local weight file that is then deleted; reloaded with HF_HUB_OFFLINE=1."""
    from helpers.cli import main
    from helpers.models import load_model, save_weights
    from helpers.training import load_checkpoint_model

    data = _tiny_folder(tmp_path / "data", cifar_split, corrupt=True)
    weights = save_weights(load_model("resnet18", weights="none"), tmp_path / "start.pt")
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--model", "resnet18", "--weights", str(weights), "--trainable",
                 "all", "--epochs", "1", "--input-size", "32", "--classes-per-batch", "4", "--out", str(out),
                 "--quiet"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["skipped"] == [str(data / "cat" / "broken.jpg")]
    assert any("broken.jpg" in note for note in saved["notes"])
    assert saved["val_split"] == "classes" and len(saved["held_out"]) == 2
    assert not set(saved["held_out"]) & set(saved["classes"])
    weights.unlink()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        first = load_checkpoint_model(out / "best.pt")(x)
        again = load_checkpoint_model(out / "best.pt")(x)
    assert torch.equal(first, again) and first.shape == (2, 512)


def test_resume_from_a_truncated_or_foreign_last_pt_is_a_one_line_error(tmp_path, capsys):
    from helpers.cli import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    assert main(["train", "--data", str(tmp_path), "--out", str(out), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot resume from") and "\n" not in err
    torch.save({"weights": torch.zeros(2)}, out / "last.pt")
    assert main(["train", "--data", str(tmp_path), "--out", str(out), "--resume", "--quiet"]) == 2
    assert "not a last.pt written by" in capsys.readouterr().err


def test_same_seed_same_head_only_run_with_a_cold_and_a_warm_cache(cifar_split, tmp_path, monkeypatch):
    from dataclasses import replace

    from helpers.training import train

    monkeypatch.setenv("RETRIEVAL_CACHE_DIR", str(tmp_path / "cache"))
    config = make_config("circle", data=str(cifar_split), trainable="head", epochs=2, seed=3, **SMALL)
    cold = train(replace(config, out=str(tmp_path / "a")))
    warm = train(replace(config, out=str(tmp_path / "b")))
    assert [h["train_loss"] for h in cold.history] == [h["train_loss"] for h in warm.history]
    a, b = (torch.load(r.best_path, weights_only=True)["model"] for r in (cold, warm))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_history_records_the_head_and_top_block_rates_used_in_each_epoch(trained_run):
    full, config = trained_run
    saved = json.loads((full.run_dir / "config.json").read_text())
    steps = saved["optimizer_steps"] // config.epochs
    warmup = math.ceil(config.warmup_fraction * saved["optimizer_steps"])
    for epoch, row in enumerate(full.history):
        factors = [warmup_cosine_factor(s, saved["optimizer_steps"], warmup)
                   for s in range(epoch * steps, (epoch + 1) * steps)]
        assert row["lr_head"] == pytest.approx(config.head_lr * np.mean(factors))
        assert row["lr_top_block"] == pytest.approx(config.lr * np.mean(factors))
    history = json.loads((full.run_dir / "history.json").read_text())
    assert history["val_split"] == "classes"


def test_clip_input_size_resamples_the_position_embedding():
    from helpers.models import ModelError
    from helpers.training.model import build_network

    net, _ = build_network(make_config("clip-gem-circle", model="clip-vit-b32", weights="none", input_size=64))
    visual = net.backbone.network.model.visual
    assert tuple(visual.positional_embedding.shape) == (1 + 2 * 2, 768)
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 64, 64)).shape == (2, 512)
    with pytest.raises(ModelError, match="multiple of the patch size"):
        build_network(make_config("clip-gem-circle", model="clip-vit-b32", weights="none", input_size=70))
