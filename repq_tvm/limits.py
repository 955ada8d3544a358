"""How large a batch a model can take: int32 indexing of the compiled kernels and this machine's memory.

A batch is fixed when a model is compiled (or exported, or calibrated in one forward pass), so its largest
activation tensor is `batch x` the largest one of a single image. TVM indexes a buffer with int32 when its
shape fits, and refuses a tensor of 2^31 elements or more (measured on the ViT fixture, whose largest
activation, the MLP hidden layer, is 65 x 512 = 33,280 elements per image: batch 64,000 compiles, 99.2% of
2^31; batch 65,000 fails with "Literal value 2163200000 exceeds range of int32"). The kernels pad their
row tiles by less than a tile, so a 1% margin (`PAD_MARGIN`) covers them. The memory estimate is a few of
the largest tensors alive at once (`LIVE_TENSORS`, float32; measured: the ViT fixture at batch 256 grew
resident memory by 113 MB on its first run, 3.5 of its 32.5 MB largest tensor), against this machine's
total RAM (a cross-compiled artifact is checked against the compiling machine's).

The per-image sizes are measured, not assumed: forward passes at batch 1 and 2 record the size of every
tensor that goes into or comes out of a module (for a calibrated model that includes the attention scores, which
the explicit `q @ kᵀ` / `attn @ V` modules take and return), so any architecture the project supports is
covered by the same rule.
"""

from __future__ import annotations

from .errors import ReqError

INT32_ELEMENTS = 2**31 - 1
PAD_MARGIN = 1.01  # row tiles of the integer kernels pad M = batch x tokens up by less than one tile
LIVE_TENSORS = 4  # measured 3.5 (ViT fixture, batch 256): the residual stream, an op's input, output and codes
BYTES_PER_ELEMENT = 4  # float32 activations (int32 accumulators are the same size)


def largest_activation(model, input_size) -> int:
    """Elements per image of the largest activation any module of `model` takes or returns, for images of
    `input_size` (C, H, W). Two forward passes (batch 1 and 2) with hooks on every module: a tensor whose
    size doubles with the batch is an activation (weights handed to weight quantizers do not grow)."""
    import torch

    def sizes(batch: int) -> list[int]:
        seen: list[int] = []

        def record(_module, inputs, output):
            outputs = output if isinstance(output, (tuple, list)) else (output,)
            seen.extend(t.numel() for t in (*inputs, *outputs) if isinstance(t, torch.Tensor))

        hooks = [m.register_forward_hook(record) for m in model.modules()]
        try:
            with torch.no_grad():
                model(torch.zeros(batch, *input_size))
        finally:
            for h in hooks:
                h.remove()
        return seen

    one, two = sizes(1), sizes(2)
    grown = [a for a, b in zip(one, two) if b == 2 * a] if len(one) == len(two) else []
    return max(grown) if grown else max(two) // 2


def total_ram() -> int:
    import psutil

    return psutil.virtual_memory().total


def max_batch(per_image: int, *, int32: bool = True, ram: int | None = None) -> tuple[int, str]:
    """The largest batch for a model whose largest activation has `per_image` elements, and what sets it."""
    ram = total_ram() if ram is None else ram
    by_memory = int(ram // (per_image * BYTES_PER_ELEMENT * LIVE_TENSORS))
    memory_reason = (f"about {LIVE_TENSORS} float32 activations of {per_image:,} elements per image must fit in "
                     f"this machine's {ram / 2**30:.1f} GiB of RAM")
    if not int32:
        return by_memory, memory_reason
    by_int32 = int(INT32_ELEMENTS // (per_image * PAD_MARGIN))
    if by_int32 <= by_memory:
        return by_int32, (f"the largest activation, {per_image:,} elements per image (+{PAD_MARGIN - 1:.0%} for "
                          f"kernel tiles), must stay below 2^31 elements for int32 indexing")
    return by_memory, memory_reason


def check_batch(model, input_size, batch: int, *, what: str = "batch", int32: bool = True, name: str = "the model",
                ram: int | None = None) -> int:
    """ReqError naming the limit when `batch` images of `input_size` are too many for `model`; else the limit."""
    limit, reason = max_batch(largest_activation(model, input_size), int32=int32, ram=ram)
    if batch > limit:
        raise ReqError(f"{what} {batch} is too large for {name}: at most {limit} ({reason})")
    return limit
