"""Patient-level heads over a bag of cell features: mean cell probability, mean-pooled logistic, gated attention."""
from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from leukfed.common.errors import LeukError

HEADS = ("meanprob", "meanpool", "attention")


class PatientHead(nn.Module):
    """Standardises cell features, then maps a bag (n_cells, D) to (patient logit, per-cell scores)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("center", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    def set_standardisation(self, cells: torch.Tensor) -> None:
        self.center.copy_(cells.mean(0))
        self.scale.copy_(cells.std(0).clamp_min(1e-4))

    def standardise(self, bag: torch.Tensor) -> torch.Tensor:
        return (bag - self.center) / self.scale


class MeanProbHead(PatientHead):
    """The paper's aggregation: a cell classifier trained on weak labels; patient = mean cell probability."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.linear = nn.Linear(dim, 1)

    def cell_logits(self, bag: torch.Tensor) -> torch.Tensor:
        return self.linear(self.standardise(bag)).squeeze(-1)

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cells = torch.sigmoid(self.cell_logits(bag))
        p = cells.mean().clamp(1e-6, 1 - 1e-6)
        return torch.log(p) - torch.log1p(-p), cells


class MeanPoolHead(PatientHead):
    """Logistic regression on the patient's mean feature vector (= mean of linear cell logits)."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.linear = nn.Linear(dim, 1)

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cell_logits = self.linear(self.standardise(bag)).squeeze(-1)
        return cell_logits.mean(), torch.sigmoid(cell_logits)


class GatedAttentionHead(PatientHead):
    """Gated attention multiple-instance pooling (Ilse, Tomczak, Welling, ICML 2018); scores = attention."""

    def __init__(self, dim: int, reduce: int = 128, hidden: int = 64, attention: int = 32,
                 dropout: float = 0.25) -> None:
        super().__init__(dim)
        # fixed PCA projection of the standardised features (set from the training cells): ~50 patients
        # cannot fit a 1280-wide first layer, and it is 10x cheaper to train on a CPU
        self.register_buffer("projection", torch.eye(dim)[:, :min(reduce, dim)].clone())
        self.embed = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.projection.shape[1], hidden), nn.ReLU())
        self.attention_v = nn.Linear(hidden, attention)
        self.attention_u = nn.Linear(hidden, attention)
        self.attention_w = nn.Linear(attention, 1)
        self.classifier = nn.Linear(hidden, 1)

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, weights = self.attend(bag[None], torch.ones(1, len(bag), dtype=torch.bool))
        return logits[0], weights[0]

    def attend(self, bags: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded bags (B, N, D) with a mask of real cells (B, N): logits (B,), attention (B, N)."""
        return self.attend_projected(self.standardise(bags) @ self.projection, mask)

    def attend_projected(self, z: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(z)
        a = self.attention_w(torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))).squeeze(-1)
        weights = torch.softmax(a.masked_fill(~mask, float("-inf")), 1)
        return self.classifier(torch.einsum("bn,bnh->bh", weights, h)).squeeze(-1), weights


def make_head(kind: str, dim: int) -> PatientHead:
    heads = {"meanprob": MeanProbHead, "meanpool": MeanPoolHead, "attention": GatedAttentionHead}
    if kind not in heads:
        raise LeukError(f"unknown patient head {kind!r}; choose one of {', '.join(HEADS)}")
    return heads[kind](dim)


def _class_weights(y: np.ndarray) -> np.ndarray:
    """Weight per patient so that both diagnoses weigh the same in the loss."""
    counts = np.bincount(y, minlength=2).astype(np.float64)
    return (len(y) / (2 * np.maximum(counts, 1)))[y]


def train_head(kind: str, bags: Sequence[np.ndarray], y: Sequence[int], *, weight_decay: float = 1e-2,
               epochs: int = 40, seed: int = 0) -> PatientHead:
    """Fit a head on patients' bags (float32 (n_i, D)) and labels (1 = positive), class-balanced."""
    torch.manual_seed(seed)
    y = np.asarray(y, dtype=np.int64)
    tensors = [torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32)) for b in bags]
    head = make_head(kind, tensors[0].shape[1])
    head.set_standardisation(torch.cat(tensors))
    weights = torch.tensor(_class_weights(y), dtype=torch.float32)
    target = torch.tensor(y, dtype=torch.float32)
    if kind == "attention":
        cells = head.standardise(torch.cat(tensors))
        _, _, v = torch.pca_lowrank(cells, q=head.projection.shape[1], center=False, niter=3)
        head.projection.copy_(v)
        _fit_bags(head, [head.standardise(b) @ v for b in tensors], target, weights, weight_decay, epochs, seed)
    elif kind == "meanpool":
        means = torch.stack([t.mean(0) for t in tensors])
        _fit_lbfgs(head.linear, head.standardise(means), target, weights, weight_decay)
    else:
        cells = torch.cat(tensors)
        sizes = torch.tensor([len(t) for t in tensors], dtype=torch.float32)
        per_cell = torch.repeat_interleave(weights / sizes, sizes.long())  # each patient weighs its class weight
        _fit_lbfgs(head.linear, head.standardise(cells), torch.repeat_interleave(target, sizes.long()),
                   per_cell / per_cell.mean(), weight_decay)
    return head.eval()


def continue_training(head: PatientHead, bags: Sequence[np.ndarray], y: Sequence[int], *, epochs: int,
                      weight_decay: float = 1e-2, lr: float = 0.1, batch: int = 256, seed: int = 0,
                      class_counts: tuple[int, int] | None = None) -> PatientHead:
    """A copy of a linear head (meanprob, meanpool) trained `epochs` more passes over these patients: a FedAvg
    client's local update. Plain minibatch SGD (stateless, so that averaged updates follow the averaged
    gradient; Adam restarted every round does not) on the same class-balanced, L2-penalised loss as
    `train_head`; the head's standardisation is kept. `class_counts` (negative, positive patients) sets the
    class weights, e.g. the federation's totals (default: these patients'). The loss is normalised per
    patient, so averaging sites' updates weighted by their numbers of patients follows the pooled loss."""
    if isinstance(head, GatedAttentionHead) or not isinstance(getattr(head, "linear", None), nn.Linear):
        raise LeukError("continue_training covers the linear patient heads (meanprob, meanpool)")
    head = copy.deepcopy(head)
    linear = head.linear
    y = np.asarray(y, dtype=np.int64)
    counts = np.bincount(y, minlength=2) if class_counts is None else np.asarray(class_counts, dtype=np.float64)
    weights = torch.tensor((counts.sum() / (2 * np.maximum(counts, 1)))[y], dtype=torch.float32)
    tensors = [torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32)) for b in bags]
    target = torch.tensor(y, dtype=torch.float32)
    if isinstance(head, MeanPoolHead):
        x, t, w = head.standardise(torch.stack([b.mean(0) for b in tensors])), target, weights
    else:  # meanprob: cells, each patient weighing its class weight in all (the mean over cells is per patient)
        sizes = torch.tensor([len(b) for b in tensors])
        x, t = head.standardise(torch.cat(tensors)), torch.repeat_interleave(target, sizes)
        w = torch.repeat_interleave(weights / sizes, sizes) * (len(x) / len(tensors))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(linear.parameters(), lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch):
            idx = order[start:start + batch]
            optimizer.zero_grad()
            bce = nn.functional.binary_cross_entropy_with_logits(linear(x[idx]).squeeze(-1), t[idx], reduction="none")
            ((bce * w[idx]).mean() + weight_decay * linear.weight.pow(2).sum()).backward()
            optimizer.step()
    return head.eval()


def _fit_lbfgs(linear: nn.Linear, x: torch.Tensor, t: torch.Tensor, w: torch.Tensor, l2: float) -> None:
    """Weighted, L2-penalised logistic regression (the bias is not penalised)."""
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = linear(x).squeeze(-1)
        loss = (nn.functional.binary_cross_entropy_with_logits(logits, t, reduction="none") * w).mean()
        loss = loss + l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)


def _fit_bags(head: GatedAttentionHead, bags: list[torch.Tensor], t: torch.Tensor, w: torch.Tensor,
              weight_decay: float, epochs: int, seed: int, batch: int = 8, cells: int = 128) -> None:
    """AdamW on minibatches of `batch` projected bags, each a random subset of at most `cells` cells per step
    (the subsampling is also an augmentation: a patient's diagnosis holds for any subset of its cells)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=weight_decay * 10)
    head.train()
    for _ in range(epochs):
        order = torch.randperm(len(bags), generator=generator)
        for start in range(0, len(bags), batch):
            chosen = order[start:start + batch].tolist()
            x, mask = _padded([bags[i] for i in chosen], cells, generator)
            optimizer.zero_grad()
            logits, _ = head.attend_projected(x, mask)
            loss = (nn.functional.binary_cross_entropy_with_logits(logits, t[chosen], reduction="none")
                    * w[chosen]).mean()
            loss.backward()
            optimizer.step()
    head.eval()


def _padded(bags: list[torch.Tensor], cells: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    subsets = [b[torch.randperm(len(b), generator=generator)[:cells]] for b in bags]
    n = max(len(b) for b in subsets)
    x = torch.zeros(len(bags), n, bags[0].shape[1])
    mask = torch.zeros(len(bags), n, dtype=torch.bool)
    for i, b in enumerate(subsets):
        x[i, :len(b)], mask[i, :len(b)] = b, True
    return x, mask


@torch.no_grad()
def head_scores(head: PatientHead, bags: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Patient logits and per-cell scores (attention weights or cell probabilities)."""
    head.eval()
    logits, cells = [], []
    for b in bags:
        z, c = head(torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32)))
        logits.append(float(z))
        cells.append(c.numpy())
    return np.asarray(logits), cells
