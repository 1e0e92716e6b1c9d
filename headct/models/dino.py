"""DINO self-distillation for a ViT3D (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision
Transformers"), with the optional KoLeo regulariser of DINOv2 (Sablayrolles et al. 2019).

One step reads as: the student (encoder + projection head) sees every view of a volume, the teacher (an EMA copy
of the student, never trained by gradients) sees the global views only; the student's softmax (temperature 0.1)
on each view is pulled towards the teacher's centred, sharpened softmax on every OTHER global view (DINOLoss).
After the optimizer step the teacher moves towards the student by EMA with a momentum that rises to 1
(``headct.train.schedules.teacher_momentum``); the teacher temperature warms up from 0.04
(``teacher_temperature``). Collapse is avoided by centring (subtract an EMA of the teacher's batch mean) and
sharpening (low teacher temperature) together.

Fixes of the seed's recipe (REFERENCE.md section 1): the teacher is a copy OF the student at construction;
local views run at their own smaller grid (the ViT interpolates its position table); norms, biases, position
and special tokens are kept out of weight decay (``no_weight_decay``); the head's last layer is frozen in the
first epoch (``cancel_last_layer_grad``).

Inputs are windowed views (B, C, X, Y, Z) float in [0, 1] (``headct.data.crops.multi_crop`` then
``headct.data.windows.hu_to_windows``). Only the CLS token of ``ViT3D.forward_features`` is used.
Import-light: torch only.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from headct.models.vit import ViT3D


class DINOHead(nn.Module):
    """Projection head: MLP (in -> hidden -> hidden -> bottleneck, GELU), L2 normalisation, then a
    weight-normalised linear layer to ``out_dim`` prototypes (no bias).

    With ``norm_last_layer`` the weight-norm magnitude is fixed to 1, so each logit is a cosine between the
    normalised bottleneck feature and a unit prototype: logits lie in [-1, 1] before the temperature, which keeps
    the softmax temperatures meaningful and the training stable (DINO's default for ViTs).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        n_layers: int = 3,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            layers.append(nn.Linear(d_in, d_out))
            if i < n_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.mlp.apply(self._init_linear)
        # weight = g * v / ||v|| per output row; g is "original0" (out, 1), v is "original1" (out, bottleneck).
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False), dim=0)
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    @staticmethod
    def _init_linear(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> (B, out_dim) logits (cosines when the last layer is normed)."""
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def _is_distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo regulariser: -mean log distance of each L2-normalised feature to its nearest neighbour in the batch.

    (B, D) -> scalar. Lower when the features spread out uniformly on the sphere (a differential entropy
    estimate), so adding it with a positive weight pushes a batch's embeddings apart. Needs B >= 2; a batch of one
    has no neighbour and gives 0. Computed within the local batch (per rank), as in DINOv2.
    """
    if features.shape[0] < 2:
        return features.sum() * 0.0  # keeps the graph (and DDP) happy
    x = F.normalize(features.float(), dim=-1, eps=eps)
    with torch.no_grad():
        similarity = x @ x.T
        similarity.fill_diagonal_(-2.0)  # below any real cosine: a point is not its own neighbour
        neighbour = similarity.argmax(dim=1)
    distance = F.pairwise_distance(x, x[neighbour], eps=eps)
    return -torch.log(distance + eps).mean()


class DINOLoss(nn.Module):
    """Cross-entropy between the teacher's centred, sharpened softmax and the student's log-softmax.

    For teacher global view i and student view j (globals first, in the same order as the teacher's), every pair
    with i != j contributes H(teacher_i, student_j), averaged over pairs and the batch. The centre (1, out_dim) is
    an EMA (``center_momentum``) of the teacher's batch mean of raw logits, all-reduced over ranks when
    torch.distributed is initialised; it is a buffer, so it is checkpointed and a resumed run continues exactly.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(
        self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float, update_center: bool = True
    ) -> torch.Tensor:
        """student_out (n_views, B, K) logits, teacher_out (n_global, B, K) logits -> scalar loss.

        The centre is updated AFTER the loss is computed (this step's targets use last step's centre).
        """
        n_views, n_global = student_out.shape[0], teacher_out.shape[0]
        if n_views < 2 or n_global > n_views:
            raise ValueError(f"need >= 2 student views including the {n_global} global ones, got {n_views}")
        teacher_out = teacher_out.detach().float()
        targets = F.softmax((teacher_out - self.center) / teacher_temp, dim=-1)
        log_probs = F.log_softmax(student_out.float() / self.student_temp, dim=-1)
        # cross[i, j] = -mean_b sum_k targets[i, b, k] * log_probs[j, b, k]: one contraction for all pairs.
        b = student_out.shape[1]
        cross = -torch.einsum("ibk,jbk->ij", targets, log_probs) / b
        same_view = torch.eye(n_global, n_views, dtype=torch.bool, device=cross.device)
        loss = cross[~same_view].mean()
        if update_center:
            self.update_center(teacher_out)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """EMA of the teacher's mean logit over every view and volume (and every rank)."""
        flat = teacher_out.reshape(-1, teacher_out.shape[-1]).float()
        batch_sum = flat.sum(dim=0, keepdim=True)
        count = torch.tensor(float(flat.shape[0]), device=flat.device)
        if _is_distributed():
            torch.distributed.all_reduce(batch_sum)
            torch.distributed.all_reduce(count)
        batch_center = batch_sum / count
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)


class DINOBranch(nn.Module):
    """Encoder + head: (B, C, X, Y, Z) views -> CLS features (B, D) and head logits (B, K)."""

    def __init__(self, encoder: ViT3D, head: DINOHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def cls(self, views: torch.Tensor) -> torch.Tensor:
        return self.encoder.forward_features(views)[:, 0]

    def forward(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.cls(views)
        return features, self.head(features)


def _stack_views(views: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """n views of (B, C, X, Y, Z) (a list, or an (n, B, C, X, Y, Z) tensor) -> one (n * B, C, X, Y, Z) batch,
    view-major (rows v * B .. v * B + B - 1 are view v)."""
    if isinstance(views, torch.Tensor):
        if views.dim() != 6:
            raise ValueError(f"expected (n_views, B, C, X, Y, Z) views, got shape {list(views.shape)}")
        return views.flatten(0, 1)
    return torch.cat(list(views), dim=0)


class DINO(nn.Module):
    """Student (encoder + head) trained by gradients, teacher (EMA copy) as the target.

    Args:
        encoder: the ViT3D to pre-train. It becomes ``student.encoder``; the teacher gets a deep copy, so both
            start identical (the seed initialised them independently).
        out_dim: number of prototypes (DINO: 65536; smaller is fine for small data).
        hidden_dim, bottleneck_dim, head_layers: projection head MLP.
        student_temp: student softmax temperature.
        center_momentum: EMA momentum of the centre.
        koleo_weight: weight of the KoLeo regulariser on the student's CLS features of each global view
            (0 disables it; DINOv2 uses 0.1).
        norm_last_layer: fix the magnitude of the head's last layer to 1.

    ``forward`` returns a dict: ``loss`` (what to backpropagate), ``dino`` and ``koleo`` (detached, for logging).
    ``teacher.encoder`` (the EMA encoder, which DINO reports as the better one for evaluation) is what
    `headct pretrain` saves in the model directory (``headct.train.pretext.DinoTask.encoder``); ``encoder`` is the
    student's, the one the optimizer trains.
    """

    def __init__(
        self,
        encoder: ViT3D,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        head_layers: int = 3,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        koleo_weight: float = 0.0,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        head = DINOHead(encoder.embed_dim, out_dim, hidden_dim, bottleneck_dim, head_layers, norm_last_layer)
        self.student = DINOBranch(encoder, head)
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.loss_fn = DINOLoss(out_dim, student_temp, center_momentum)
        self.koleo_weight = koleo_weight

    @property
    def encoder(self) -> ViT3D:
        """The student's encoder: the network the optimizer trains (the teacher's EMA copy is the one saved)."""
        return self.student.encoder

    def train(self, mode: bool = True) -> DINO:
        """The teacher always stays in eval mode (no stochastic depth or dropout in the target)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(
        self,
        global_views: torch.Tensor | Sequence[torch.Tensor],
        local_views: torch.Tensor | Sequence[torch.Tensor] | None,
        teacher_temp: float,
        update_center: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Global views: n_global x (B, C, X, Y, Z); local views: n_local x (B, C, x, y, z) on a smaller grid
        (or None / empty). Every view's grid must be a multiple of the patch size.

        The student runs once on all global views stacked and once on all local views stacked (two grids, two
        encoder calls); the teacher runs once, on the global views, without gradients. ``update_center=False``
        scores without moving the centre (held-out evaluation).
        """
        g = _stack_views(global_views)
        n_global = len(global_views)
        b = g.shape[0] // n_global
        with torch.no_grad():
            _, teacher_logits = self.teacher(g)
        student_features, student_logits = self.student(g)
        global_features = student_features
        has_local = local_views is not None and len(local_views) > 0
        if has_local:
            local_features = self.student.encoder.forward_features(_stack_views(local_views))[:, 0]
            student_logits = torch.cat([student_logits, self.student.head(local_features)], dim=0)
        k = student_logits.shape[-1]
        dino = self.loss_fn(student_logits.view(-1, b, k), teacher_logits.view(n_global, b, k), teacher_temp,
                            update_center=update_center)
        loss = dino
        koleo = torch.zeros((), device=dino.device)
        if self.koleo_weight > 0:
            koleo = torch.stack([koleo_loss(f) for f in global_features.reshape(n_global, b, -1)]).mean()
            loss = loss + self.koleo_weight * koleo
        return {"loss": loss, "dino": dino.detach(), "koleo": koleo.detach()}

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter (call after the
        optimizer step). Parameters are matched by name; the two branches have the same structure."""
        student = dict(self.student.named_parameters())
        pairs = [(t, student[name]) for name, t in self.teacher.named_parameters()]
        teacher_params = [t for t, _ in pairs]
        student_params = [s.detach().to(t.dtype) for t, s in pairs]
        # One fused kernel per op for all parameters (matters on GPU with ~200 tensors).
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)

    def cancel_last_layer_grad(self, epoch: int, freeze_epochs: int = 1) -> bool:
        """Drop the gradients of the head's last layer while ``epoch < freeze_epochs`` (call between backward and
        the optimizer step). Returns whether it did.

        Gradients are set to None, not zero, so AdamW skips those parameters entirely (no weight decay, no moment
        update). Freezing the prototypes at first lets the rest of the network settle before they move; DINO
        reports it helps stability.
        """
        if epoch >= freeze_epochs:
            return False
        for param in self.student.head.last_layer.parameters():
            param.grad = None
        return True

    def no_weight_decay(self) -> set[str]:
        """Names (in ``named_parameters``) kept out of weight decay: every norm and bias, the encoder's tokens and
        position table (CLS, registers), for student and teacher alike. ``headct.train.engine.adamw`` reads it."""
        names: set[str] = set()
        for prefix, branch in (("student", self.student), ("teacher", self.teacher)):
            special = {f"{prefix}.encoder.{n}" for n in branch.encoder.no_weight_decay()}
            for name, param in branch.named_parameters(prefix=prefix):
                leaf = name.rsplit(".", 1)[-1]
                if param.ndim <= 1 or name in special or "token" in leaf or "pos_embed" in leaf:
                    names.add(name)
            for module_name, module in branch.named_modules(prefix=prefix):
                if isinstance(module, nn.LayerNorm | nn.GroupNorm | nn.BatchNorm1d):
                    names.update(f"{module_name}.{n}" for n, _ in module.named_parameters())
        return names
