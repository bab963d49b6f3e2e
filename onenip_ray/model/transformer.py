"""OneNIP reconstruction transformer: learned position embedding, neighbour-masked encoder and
the bidirectional (two-way) prompt decoder. Tokens are batch-first: (batch, tokens, dim)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LearnedPositionEmbedding(nn.Module):
    """Separable row/column embedding: position (y, x) → concat(col[x], row[y])."""

    def __init__(self, grid: int, dim: int) -> None:
        super().__init__()
        self.grid = grid
        self.row_embed = nn.Embedding(grid, dim // 2)
        self.col_embed = nn.Embedding(grid, dim - dim // 2)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self) -> torch.Tensor:
        """(grid*grid, dim), row-major (y outer)."""
        g = self.grid
        col = self.col_embed.weight.unsqueeze(0).expand(g, g, -1)
        row = self.row_embed.weight.unsqueeze(1).expand(g, g, -1)
        return torch.cat([col, row], dim=-1).reshape(g * g, -1)


def neighbor_mask(grid: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean (HW, HW) mask, True = may attend. Each token is blocked from its own k×k window,
    half-size (grid//2)//2 (7×7 at 14×14, 9×9 at 16×16), clipped at the borders."""
    half = (grid // 2) // 2
    ys, xs = torch.meshgrid(torch.arange(grid, device=device), torch.arange(grid, device=device), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    near = ((ys[:, None] - ys[None, :]).abs() <= half) & ((xs[:, None] - xs[None, :]).abs() <= half)
    return ~near


class Attention(nn.Module):
    """Multi-head attention (fused SDPA kernel) with separate q/k/v projections; same parameter
    count as ``nn.MultiheadAttention``. Positions are added to queries and keys by the caller."""

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.zeros_(proj.bias)  # as nn.MultiheadAttention (the official layer) initialises them

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        b, nq, d = q.shape
        h = self.num_heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(b, x.shape[1], h, d // h).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            split(self.q_proj(q)),
            split(self.k_proj(k)),
            split(self.v_proj(v)),
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out_proj(out.transpose(1, 2).reshape(b, nq, d))


class EncoderLayer(nn.Module):
    """Post-norm self-attention layer (DETR style) with the neighbour mask."""

    def __init__(self, dim: int, num_heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = Attention(dim, num_heads, dropout)
        self.linear1 = nn.Linear(dim, ffn)
        self.linear2 = nn.Linear(ffn, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        qk = x + pos
        x = self.norm1(x + self.drop(self.self_attn(qk, qk, x, mask)))
        return self.norm2(x + self.drop(self.linear2(self.drop(F.relu(self.linear1(x))))))


class TwoWayDecoderLayer(nn.Module):
    """Prompt→image attention, MLP on the prompt, image→prompt attention (post-norm).

    ``buggy_v1`` reproduces the official pre-fix layer, where the image update added the prompt's
    MLP output instead of the image→prompt attention (the paper's numbers were made with it).
    """

    def __init__(self, dim: int, num_heads: int, ffn: int, dropout: float, buggy_v1: bool = False) -> None:
        super().__init__()
        self.cross_attn_prompt_to_image = Attention(dim, num_heads, dropout)
        self.cross_attn_image_to_prompt = Attention(dim, num_heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(), nn.Linear(ffn, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.buggy_v1 = buggy_v1

    def forward(self, prompt: torch.Tensor, image: torch.Tensor, pos: torch.Tensor,
                mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        prompt = self.norm1(prompt + self.drop(self.cross_attn_prompt_to_image(prompt + pos, image + pos, image, mask)))
        mlp_out = self.mlp(prompt)
        prompt = self.norm2(prompt + self.drop(mlp_out))
        if self.buggy_v1:
            update = mlp_out
        else:
            update = self.cross_attn_image_to_prompt(image + pos, prompt + pos, prompt, mask)
        image = self.norm3(image + self.drop(update))
        return prompt, image


class ReconstructionTransformer(nn.Module):
    """Encoder (on image and prompt tokens alike) and the bidirectional decoder; the reconstruction
    is read from the prompt stream after a final unmasked prompt→image attention and LayerNorm."""

    def __init__(
        self,
        grid: int,
        dim: int = 256,
        num_heads: int = 8,
        num_encoder_layers: int = 4,
        num_decoder_layers: int = 4,
        ffn: int = 1024,
        dropout: float = 0.1,
        use_neighbor_mask: bool = True,
        buggy_v1: bool = False,
    ) -> None:
        super().__init__()
        self.grid = grid
        self.use_neighbor_mask = use_neighbor_mask
        self.pos_embed = LearnedPositionEmbedding(grid, dim)
        self.encoder = nn.ModuleList(EncoderLayer(dim, num_heads, ffn, dropout) for _ in range(num_encoder_layers))
        self.decoder = nn.ModuleList(TwoWayDecoderLayer(dim, num_heads, ffn, dropout, buggy_v1)
                                     for _ in range(num_decoder_layers))
        self.final_attn = Attention(dim, num_heads, dropout)
        self.final_drop = nn.Dropout(dropout)
        self.final_norm = nn.LayerNorm(dim)
        self.register_buffer("mask", neighbor_mask(grid), persistent=False)

    def residual_branch_outputs(self) -> list[nn.Linear]:
        """The last linear layer of every residual branch (attention out_proj, FFN/MLP output)."""
        layers: list[nn.Linear] = []
        for enc in self.encoder:
            layers += [enc.self_attn.out_proj, enc.linear2]
        for dec in self.decoder:
            layers += [dec.cross_attn_prompt_to_image.out_proj, dec.mlp[2], dec.cross_attn_image_to_prompt.out_proj]
        return layers + [self.final_attn.out_proj]

    def _mask(self) -> torch.Tensor | None:
        return self.mask if self.use_neighbor_mask else None

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, HW, dim) projected tokens → encoded tokens."""
        pos = self.pos_embed()
        for layer in self.encoder:
            tokens = layer(tokens, pos, self._mask())
        return tokens

    def decode(self, image: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """Encoded image and prompt tokens (N, HW, dim) → reconstructed tokens (N, HW, dim)."""
        pos = self.pos_embed()
        for layer in self.decoder:
            prompt, image = layer(prompt, image, pos, self._mask())
        prompt = prompt + self.final_drop(self.final_attn(prompt + pos, image + pos, image))
        return self.final_norm(prompt)
