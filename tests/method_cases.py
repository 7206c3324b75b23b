"""Shared helpers for method tests: the TokenContext every method can use, built from plain tensors."""

import torch

from tokreduce import TokenContext


def full_context(x: torch.Tensor, grid, seed: int = 0) -> TokenContext:
    """A TokenContext with every optional field filled, aligned with x (B, N, C)."""
    b, n, c = x.shape
    g = torch.Generator().manual_seed(seed)
    return TokenContext(
        grid=grid,
        attention=torch.rand(b, n, generator=g),
        metric=x.float() + 0.1 * torch.randn(b, n, c, generator=g),
        keys=torch.randn(b, n, 8, generator=g),
        text_hidden=torch.randn(b, 5, c, generator=g),
        text_keys=torch.randn(b, 5, 8, generator=g),
        instruction=torch.randn(b, 6, c, generator=g),
        logits=torch.randn(b, n, n // grid[0] if grid else n, generator=g),  # to the tokens of each one's frame
    )


def row(ctx: TokenContext, i: int) -> TokenContext:
    """The context of sample i alone."""
    fields = {}
    for name in ("attention", "metric", "size", "keys", "text_hidden", "text_keys", "instruction", "logits"):
        value = getattr(ctx, name)
        fields[name] = None if value is None else value[i : i + 1]
    return TokenContext(grid=ctx.grid, protected=ctx.protected, span=ctx.span, **fields)
