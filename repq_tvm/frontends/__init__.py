"""Import a calibrated fake-quant model into TVM Relax, by torch.export or by ONNX, in ONE canonical form.

Compiler passes match this form, so both routes must produce it (same op counts, checked by the tests).
In `main`, with s a float32 scalar constant, z a uint8 scalar constant and b the bit width:

- Uniform activation quantizer (layer-wise, integer z in [0, 255])::

      q  = R.quantize(x, s, z, axis=-1, out_dtype="uint8")
      q  = R.clip(q, 0, 2^b - 1)                      # only when b < 8
      x̂  = R.dequantize(q, s, z, axis=-1, out_dtype="float32")

- Weight quantizer (per output channel): a uint8 constant of codes clamp(round(W/s)+z, 0, 2^b − 1)::

      Ŵ  = R.dequantize(codes[N, ...], scale[N] f32, zp[N] u8, axis=0, out_dtype="float32")

  followed by whatever the layer does with it (`permute_dims` + `matmul` for Linear, `nn.conv2d`).
  b is not stored: the codes are already in [0, 2^b − 1].
- log√2 post-Softmax quantizer (log2 likewise, named "repq.log2_fake_quant")::

      x̂  = R.call_pure_packed("repq.log_sqrt2_fake_quant", x, R.const(s, "float32"), R.prim_value(b),
                             ty_args=x.ty)

  meaning x̂ = s·2^(−q/2), q = clamp(round(−2·log2(x/s)), 0, 2^b − 1), and 0 where the code would exceed
  2^b − 1 (this includes x = 0). Importing this package registers a NumPy implementation under that
  name, so a plain `tvm.compile` + `relax.VirtualMachine` runs it; `lower_log_quant(mod)` rewrites it
  into plain Relax ops instead (for libraries run without Python).

Everything else is ordinary float Relax (layer_norm, softmax, gelu, add, reshape, ...), with parameter-only
arithmetic constant-folded, `x + 0`, zero pads and reshape chains removed, unbind as `strided_slice` +
`squeeze`, and timm's fused attention never present (the quant model uses explicit matmuls).

Why these choices: R.quantize/R.dequantize with uint8 codes are what both frontends import cleanly
(ONNX QuantizeLinear/DequantizeLinear map to them directly) and what Relax legalizes; the clip carries
the bit width; an opaque named call survives both imports unchanged (no standard op expresses log√2).

Public API: `export_relax(model, input_shape)` (torch.export route), `export_onnx(model, input_shape, path)`
and `import_onnx(path)` (ONNX route), `canonical_ops(mod)`, `lower_log_quant(mod)`. Input shapes are static.
"""

from .canonical import LOG_OPS, canonical_ops, lower_log_quant

__all__ = ["LOG_OPS", "canonical_ops", "lower_log_quant", "export_relax", "export_onnx", "import_onnx"]


def __getattr__(name):
    """Load the frontends on first use: they pull in torch.export / onnxscript, which take seconds to import."""
    if name == "export_relax":
        from .torch_export import export_relax
        return export_relax
    if name in ("export_onnx", "import_onnx"):
        from . import onnx_export
        return getattr(onnx_export, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
