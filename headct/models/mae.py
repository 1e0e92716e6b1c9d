"""Masked autoencoder pre-training for a ViT3D (He et al. 2021, "Masked Autoencoders Are Scalable Vision
Learners"), in 3D.

One step reads as: patchify the volume, keep a random subset of patches per volume (random_masking), embed
and encode the visible patches only (forward_encoder), restore the full grid with mask tokens and decode with a
narrower transformer (forward_decoder), then take the MSE on the masked patches only (forward_loss).
The masking noise comes from a torch.Generator the caller seeds, so it is a function of the global step.

One departure from the reference code, same loss: voxels are predicted for the masked patches only (the
visible ones never enter the loss), which halves the cost of the output layer and loss on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from headct.models.pos_embed import sincos_pos_embed_3d
from headct.models.vit import Block, ViT3D, init_weights


@dataclass
class Masking:
    """One random masking of a batch of B volumes with N patches each."""

    ids_keep: torch.Tensor  # (B, N_keep) grid indices of the patches the encoder sees
    ids_masked: torch.Tensor  # (B, N - N_keep) grid indices of the hidden patches
    ids_restore: torch.Tensor  # (B, N) position of each grid patch in the [kept..., masked...] order

    @property
    def mask(self) -> torch.Tensor:
        """(B, N) float, 1 = masked, in grid order."""
        b, n = self.ids_restore.shape
        mask = torch.ones(b, n, device=self.ids_restore.device)
        mask[:, : self.ids_keep.shape[1]] = 0
        return torch.gather(mask, 1, self.ids_restore)


class MAE(nn.Module):
    """Encoder + light decoder predicting the voxels of masked patches.

    Args:
        encoder: the ViT3D to pre-train (saved alone in the model directory afterwards).
        mask_ratio: fraction of patches hidden from the encoder, per volume.
        decoder_dim: decoder width (default: half the encoder's).
        decoder_depth: decoder blocks.
        decoder_heads: decoder heads (default: the encoder's).
        norm_pix_loss: regress per-patch normalised voxels (zero mean, unit variance) instead of raw ones.
    """

    def __init__(
        self,
        encoder: ViT3D,
        mask_ratio: float = 0.75,
        decoder_dim: int | None = None,
        decoder_depth: int = 2,
        decoder_heads: int | None = None,
        norm_pix_loss: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.in_chans = encoder.arch["in_chans"]
        dim = decoder_dim or encoder.embed_dim // 2
        heads = decoder_heads or encoder.num_heads
        self.decoder_embed = nn.Linear(encoder.embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_3d(dim, encoder.grid)[None], persistent=False)
        self.decoder_blocks = nn.ModuleList(Block(dim, heads) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dim, encoder.patch_size**3 * self.in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(init_weights)

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()} | {"mask_token", "decoder_pos_embed"}

    # ------------------------------------------------------------------------------------------- patches
    def patchify(self, volumes: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, Z) -> (B, N, C * p**3) in the encoder's token and Conv3d-weight order."""
        return self.encoder.patch_embed.patchify(volumes)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, C * p**3) -> (B, C, X, Y, Z) on the encoder's built grid (inverse of ``patchify``)."""
        b = patches.shape[0]
        p, c = self.encoder.patch_size, self.in_chans
        gx, gy, gz = self.encoder.grid
        v = patches.reshape(b, gx, gy, gz, c, p, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return v.reshape(b, c, gx * p, gy * p, gz * p)

    # ------------------------------------------------------------------------------------------- masking
    def random_masking(
        self, batch: int, n_patches: int, generator: torch.Generator | None = None, device: torch.device | None = None
    ) -> Masking:
        """Keep a random ``1 - mask_ratio`` share of the N patches of each volume (argsort of uniform noise).

        The noise is drawn on the generator's device (a CPU generator serves any device), then moved to `device`.
        """
        n_keep = max(1, int(round(n_patches * (1.0 - self.mask_ratio))))
        gen_device = generator.device if generator is not None else device
        noise = torch.rand(batch, n_patches, generator=generator, device=gen_device).to(device)
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the first n_keep are kept
        return Masking(ids_shuffle[:, :n_keep], ids_shuffle[:, n_keep:], torch.argsort(ids_shuffle, dim=1))

    # ------------------------------------------------------------------------------------------- model
    def forward_encoder(
        self, patches: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, Masking]:
        """patches (B, N, C * p**3) -> latent (B, 1 + N_keep, D) and the masking used.

        Only the kept patches are embedded and encoded: that is where MAE's 3-4x saving comes from. Register
        tokens (if any) take part in the encoder and are dropped from the latent.
        """
        b, n, p = patches.shape
        masking = self.random_masking(b, n, generator, patches.device)
        visible = torch.gather(patches, 1, masking.ids_keep[:, :, None].expand(-1, -1, p))
        tokens = self.encoder.embed_patches(visible, self.encoder.grid, masking.ids_keep)
        latent = self.encoder.encode(self.encoder.prepend_cls(tokens))
        return self.encoder.drop_registers(latent), masking  # registers never reach the decoder

    def forward_decoder(self, latent: torch.Tensor, masking: Masking) -> torch.Tensor:
        """latent (B, 1 + N_keep, D) -> predicted voxels of the masked patches (B, N_mask, C * p**3),
        in the order of ``masking.ids_masked``."""
        x = self.decoder_embed(latent)
        b, n = masking.ids_restore.shape
        d = x.shape[2]
        tokens = torch.cat([x[:, 1:], self.mask_token.expand(b, n + 1 - x.shape[1], -1)], dim=1)
        tokens = torch.gather(tokens, 1, masking.ids_restore[:, :, None].expand(-1, -1, d))  # grid order
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        hidden = torch.gather(x[:, 1:], 1, masking.ids_masked[:, :, None].expand(-1, -1, d))
        return self.decoder_pred(self.decoder_norm(hidden))

    def masked_target(self, patches: torch.Tensor, masking: Masking) -> torch.Tensor:
        """(B, N, C * p**3) -> the masked patches (B, N_mask, C * p**3), per-patch normalised if norm_pix_loss."""
        rows = torch.arange(patches.shape[0], device=patches.device)[:, None]
        target = patches[rows, masking.ids_masked]
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def forward_loss(self, patches: torch.Tensor, pred: torch.Tensor, masking: Masking) -> torch.Tensor:
        """Mean squared error over the voxels of the masked patches; patches (B, N, P), pred (B, N_mask, P)."""
        return F.mse_loss(pred.float(), self.masked_target(patches, masking).float())

    def forward(
        self, volumes: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, Masking]:
        """(B, C, X, Y, Z) in [0, 1] -> loss (), pred (B, N_mask, C * p**3), masking."""
        if self.encoder.grid_of(volumes) != self.encoder.grid:
            raise ValueError(f"MAE was built for a {list(self.encoder.grid)} patch grid, got volumes "
                             f"{list(volumes.shape[2:])} (patch {self.encoder.patch_size})")
        patches = self.patchify(volumes)
        latent, masking = self.forward_encoder(patches, generator)
        pred = self.forward_decoder(latent, masking)
        return self.forward_loss(patches, pred, masking), pred, masking

    @torch.no_grad()
    def reconstruct(
        self, volumes: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For figures: (B, C, X, Y, Z) -> mask volume (B, 1, X, Y, Z) with 1 = hidden, and the reconstruction
        (B, C, X, Y, Z): visible patches from the input, masked ones predicted (de-normalised when
        ``norm_pix_loss``)."""
        patches = self.patchify(volumes)
        latent, masking = self.forward_encoder(patches, generator)
        pred = self.forward_decoder(latent, masking).float()
        rows = torch.arange(patches.shape[0], device=patches.device)[:, None]
        if self.norm_pix_loss:
            hidden = patches[rows, masking.ids_masked]
            pred = pred * (hidden.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + hidden.mean(dim=-1, keepdim=True)
        recon = patches.float().clone()
        recon[rows, masking.ids_masked] = pred
        mask = masking.mask[:, :, None].expand(-1, -1, patches.shape[2])
        return self.unpatchify(mask)[:, :1], self.unpatchify(recon)
