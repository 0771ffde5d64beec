"""``--finetune last|all``: the networks the chosen heads read — the identity backbone,
an attribute network (age, gender, emotion), or both — trained together with the heads, on
the main face chips (cached with the embeddings), step 2 of the two-step recipe.

Step 1 is the frozen-feature fit (``ddp.fit``): it picks each task's head and its input,
and starts it well, so the new heads' random gradients never reach the pretrained
networks.  Step 2 (here) trains the chosen heads and the last stage of each network they
read (``last``: the backbone's 256-channel blocks and projection, ``backbone.LAST_STAGE``;
an attribute network's ``attributes.last_stage``) or all of it (``all``) with Ray Train
DDP: per-sample augmentation (torchvision ``transforms.v2``) of the chip on the worker's
device, each network resampling its own input from it as at inference, a smaller learning
rate for the pretrained weights than for the heads, bf16 autocast and NCCL on CUDA (gloo,
fp32 on CPU), a checkpoint per epoch and ``FailureConfig`` resume.  The epoch kept is the
one with the best mean validation criterion over the tasks; ``run._fine_tune`` then keeps
the tuned model only when it beats the frozen one on validation.
"""
from __future__ import annotations

import copy
import io
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.contract import CLASSIFICATION, UsageError
from pipeline.heads import IDENTITY, TaskSpec
from pipeline.training.config import TrainConfig
from pipeline.training.ddp import (MultiHead, _class_weights, _validation_metrics, end_epoch, resume, run_name,
                                   task_losses, weighted_loss)
from pipeline.training.split import Encoded

MODES = ("none", "last", "all")
HEAD_LR_FACTOR = 10.0      # heads learn at 10× the backbone's rate (discriminative rates)


def check_flags(mode: str, layout: str, features: str) -> None:
    """Usage errors for a ``--finetune`` this layout cannot serve (``features``: any set the
    heads may read is tunable)."""
    if mode not in MODES:
        raise UsageError(f"--finetune {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "none":
        return
    if layout in ("people", "labels"):
        raise UsageError(f"--finetune needs the faces' chips, and the {layout} layout brings only embeddings "
                         f"from its table: train --layout {layout} with --finetune none, or fine-tune on labelled "
                         "photos")


class TunedNet(torch.nn.Module):
    """Chips → what the heads read, from the networks being tuned → the heads.

    ``backbone`` (the identity network, or None when no head reads the embedding) gives the
    unit embedding; ``attributes`` (network name → module) give their feature sets
    (``attributes.network_features``).  With ``last`` only each network's last stage
    trains; its frozen part runs without gradients, so it costs a forward pass only."""

    def __init__(self, backbone: torch.nn.Module | None, heads: MultiHead, mode: str,
                 attributes: dict[str, torch.nn.Module] | None = None) -> None:
        super().__init__()
        from pipeline.attributes import last_stage, output_modules
        from pipeline.backbone import LAST_STAGE

        self.backbone, self.heads = backbone, heads
        self.attributes = torch.nn.ModuleDict(attributes or {})
        self.split = LAST_STAGE if mode == "last" else 0
        for net in [*([backbone] if backbone is not None else []), *self.attributes.values()]:
            for p in net.parameters():
                p.requires_grad_(mode == "all")
        if mode == "last":
            if backbone is not None:
                for m in (backbone.blocks[LAST_STAGE:], backbone.fc):
                    for p in m.parameters():
                        p.requires_grad_(True)
            for task, net in self.attributes.items():
                for m in last_stage(task, net):
                    for p in m.parameters():
                        p.requires_grad_(True)
        for task, net in self.attributes.items():   # the output layer: off the features' path
            for m in output_modules(task, net):
                for p in m.parameters():
                    p.requires_grad_(False)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Network input (``embed.net_input``) → unit embeddings, as ``Embedder`` makes them."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.split == 0):
            h = self.backbone.trunk(x, self.split)
        return F.normalize(self.backbone.tail(h, self.split).float(), dim=1)

    def forward(self, chips: torch.Tensor) -> dict[str, torch.Tensor]:
        """float N×3×S×S chips (0..255, augmented) → every head's output."""
        from pipeline.attributes import AttributeNets, network_features, resample
        from pipeline.backbone import DLIB_RESNET
        from pipeline.embed import net_input

        xs: dict[str, torch.Tensor] = {}
        if self.backbone is not None:
            xs[IDENTITY] = self.embed(net_input(chips.permute(0, 2, 3, 1), DLIB_RESNET.geometry.net_input))
        for task, net in self.attributes.items():
            inp = resample(chips, AttributeNets.inputs[task]).contiguous(memory_format=torch.channels_last)
            xs.update({k: v.float() for k, v in network_features(task, net, inp).items()})
        return self.heads(xs)

    def backbone_groups(self) -> tuple[list, list]:
        """(trainable network parameters, head parameters): two learning rates."""
        nets = [*([self.backbone] if self.backbone is not None else []), *self.attributes.values()]
        return [p for n in nets for p in n.parameters() if p.requires_grad], list(self.heads.parameters())


def augmenter():
    """Per-face augmentation of uint8 C×H×W chips: mirror, a small affine (the aligner's
    own jitter), colour jitter — nothing that moves the face out of its alignment."""
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomHorizontalFlip(), v2.RandomAffine(degrees=8, translate=(0.04, 0.04),
                                                                  scale=(0.94, 1.06)),
                       v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3)])


def _inputs(chips: torch.Tensor, device: torch.device, aug=None) -> torch.Tensor:
    """uint8 N×S×S×3 → float N×3×S×S chips on ``device`` (0..255), each face augmented
    when ``aug``; every tuned network resamples its own input from them."""
    x = chips.to(device, non_blocking=True).permute(0, 3, 1, 2)
    if aug is not None:
        x = torch.stack([aug(c) for c in x])
    return x.float()


def _autocast(device: torch.device):
    """bf16 autocast on CUDA (mixed precision); fp32 on CPU, where training in bf16 is
    not faster than the gradients are worth."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)


def finetune_loop(config: dict[str, Any]) -> None:
    """Runs on every Train worker: DDP over the shard of chips, full validation, a
    checkpoint per epoch (backbone + heads + optimiser)."""
    import ray.train
    import ray.train.torch

    from pipeline.backbone import load_backbone

    specs = [TaskSpec.from_json(d) for d in config["specs"]]
    variants: dict[str, list[str]] = config["variants"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config["seed"] + rank)
    device = ray.train.torch.get_device()
    heads = MultiHead(specs, variants)
    heads.heads.load_state_dict(config["heads_init"])
    attrs = {}
    if config["networks"]:
        from pipeline.attributes import load_networks

        nets = load_networks(config.get("cache_dir"))
        attrs = {k: nets[k].train() for k in config["networks"]}
    backbone = load_backbone(config["weights"])[0].train() if config["identity"] else None
    model = TunedNet(backbone, heads, config["mode"], attrs)
    ddp = ray.train.torch.prepare_model(model)
    net = ddp.module if hasattr(ddp, "module") else ddp
    back, head = net.backbone_groups()
    opt = torch.optim.AdamW([{"params": back, "lr": config["lr"]},
                             {"params": head, "lr": config["lr"] * HEAD_LR_FACTOR}],
                            weight_decay=config["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, config["epochs"]))
    class_w = {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in config["class_weights"].items()}
    val_chips = torch.from_numpy(config["val_chips"])
    val_y = {s.name: torch.as_tensor(config["val_y"][s.name]).to(device) for s in specs}
    start_epoch, resumed_from, best, history = 0, -1, None, []
    st, finished = resume(rank)
    if finished:
        return
    if st:
        net.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        best, history = st["best"], st["history"]
        start_epoch = resumed_from = st["epoch"] + 1
    aug = augmenter()
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(start_epoch, config["epochs"]):
        net.train()
        t0, seen, total = time.monotonic(), 0, 0.0
        for batch in shard.iter_batches(batch_size=config["batch_size"], batch_format="numpy",
                                        local_shuffle_buffer_size=config["shuffle_buffer"]):
            ys = {s.name: torch.as_tensor(batch[f"y_{s.name}"], dtype=torch.int64 if s.kind == CLASSIFICATION
                                          else torch.float32).to(device) for s in specs}
            x = _inputs(torch.as_tensor(batch["chip"]), device, aug)
            with _autocast(device):
                out = ddp(x)
            loss = weighted_loss(task_losses({k: v.float() for k, v in out.items()}, ys, specs, variants, class_w,
                                             config["huber_delta"]), config["task_weights"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(x)
            total += float(loss.detach()) * len(x)
        sched.step()
        train_s = time.monotonic() - t0
        out = _evaluate(net, val_chips, device)
        with torch.no_grad():
            vloss = task_losses(out, val_y, specs, variants, class_w, config["huber_delta"], weighted=False)
        val_metrics, crit = _validation_metrics({k: v.cpu() for k, v in out.items()},
                                                {k: v.cpu() for k, v in vloss.items()},
                                                {k: v.cpu() for k, v in val_y.items()}, specs, variants)
        score = float(np.mean(list(crit.values())))
        if best is None or score < best["crit"] - 1e-5:
            best = {"crit": score, "epoch": epoch, "state": copy.deepcopy(
                {k: v.detach().cpu() for k, v in net.state_dict().items()})}
        metrics: dict[str, Any] = {"epoch": epoch, "train_loss": total / max(seen, 1),
                                   "rows_per_s_per_worker": seen / max(train_s, 1e-9), "world_size": world,
                                   "resumed_from": resumed_from, "val_crit": score, **val_metrics}
        history.append(dict(metrics))
        stop = (epoch - best["epoch"] >= config["patience"]) or epoch == config["epochs"] - 1
        state = {"model": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "epoch": epoch,
                 "best": best, "history": history}
        if end_epoch(config, rank, world, metrics, state, stop, t0, device):
            break


@torch.no_grad()
def _evaluate(net: TunedNet, chips: torch.Tensor, device: torch.device, batch: int = 128) -> dict[str, torch.Tensor]:
    """Head outputs for every validation chip (no augmentation, eval mode)."""
    net.eval()
    outs: list[dict[str, torch.Tensor]] = []
    for i in range(0, len(chips), batch):
        with _autocast(device):
            outs.append({k: v.float() for k, v in net(_inputs(chips[i:i + batch], device)).items()})
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}


def networks_read(specs: list[TaskSpec]) -> tuple[bool, list[str]]:
    """(whether some head reads the identity embedding, the attribute networks heads read)."""
    from pipeline.attributes import FEATURE_NETWORK

    return (any(s.features == IDENTITY for s in specs),
            sorted({FEATURE_NETWORK[s.features] for s in specs if s.features != IDENTITY}))


def finetune(train: Encoded, val: Encoded, specs: list[TaskSpec], heads_init: dict[str, dict[str, torch.Tensor]],
             cfg: TrainConfig, weights: str | None, storage_uri: str,
             log: Callable[[str], None] = print, cache_dir: str | None = None
             ) -> tuple[dict[str, bytes], dict[str, torch.Tensor], list[dict], dict]:
    """Step 2: ``heads_init`` (``task@variant`` → the frozen fit's best head state, one
    variant per task) and the networks those heads read (the identity backbone, attribute
    networks: ``networks_read``) trained on the chips.  Returns each tuned network's state
    dict as bytes keyed ``identity`` (what ``backbone.load_backbone`` reads) or by network
    name (what ``AttributeNets(tuned=)`` reads), the heads' state keyed ``task.<param>``
    (as ``select_heads`` gives), the history and the last metrics."""
    import ray
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    from pipeline.training.ddp import run_trainer

    if train.chips is None or val.chips is None:
        raise ValueError("fine-tuning needs the examples' chips (embed_labelled(chips=True))")
    variants = {k.split("@")[0]: [k.split("@")[1]] for k in heads_init}
    cols = {"chip": ArrowTensorArray.from_numpy(train.chips)}
    cols.update({f"y_{k}": pa.array(v) for k, v in train.y.items()})
    ds = ray.data.from_arrow(pa.table(cols))
    identity, networks = networks_read(specs)
    config = {"specs": [s.to_json() for s in specs], "variants": variants, "mode": cfg.finetune,
              "identity": identity, "networks": networks, "cache_dir": cache_dir,
              "heads_init": {f"{k}.{n}": v for k, st in heads_init.items() for n, v in st.items()},
              "weights": weights, "seed": cfg.seed, "lr": cfg.finetune_lr, "weight_decay": cfg.weight_decay,
              "class_weights": _class_weights(train, specs), "task_weights": cfg.task_weights,
              "huber_delta": cfg.huber_delta, "epochs": cfg.finetune_epochs, "patience": cfg.patience,
              "batch_size": cfg.finetune_batch_size, "shuffle_buffer": cfg.shuffle_buffer,
              "val_chips": val.chips, "val_y": val.y}
    st, last = run_trainer(finetune_loop, config, ds, cfg, cfg.finetune_epochs, storage_uri,
                           run_name(config, train, val, "finetune", ("val_chips", "val_y", "heads_init", "progress")),
                           f"fine-tuning ({cfg.finetune}) {', '.join((['identity'] if identity else []) + networks)} "
                           f"with {sorted(heads_init)} on {len(train.chips)} train / {len(val.chips)} val chips",
                           "finetune", log)
    state = st["best"]["state"]
    tuned = {}
    for name, prefix in [*([("identity", "backbone.")] if identity else []), *((n, f"attributes.{n}.") for n in networks)]:
        buf = io.BytesIO()
        torch.save({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, buf)
        tuned[name] = buf.getvalue()
    heads = {}
    for k, v in state.items():
        if k.startswith("heads.heads."):
            task_variant, param = k[len("heads.heads."):].split(".", 1)
            heads[f"{task_variant.split('@')[0]}.{param}"] = v
    return tuned, heads, st["history"], last | {"best_epoch": st["best"]["epoch"]}

