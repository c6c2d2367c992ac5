"""megatron-mile: MiLe / focal / cross-entropy pretraining on megatron-core."""

__version__ = "0.1.0"

import warnings as _warnings

# Warnings megatron-core 0.16.1 gives on every use, about itself rather than the run: at import,
# the optional CUDA extensions it falls back from (the trainer logs the kernels it uses instead:
# model.optional_kernels); in training, deprecations inside its own calls. Every module here
# imports megatron-core, so the filters go in first; they match the message and the warning module.
for _message, _module in (
    ("Transformer Engine and Apex are not installed", r"megatron\.core\."),
    ("Apex is not installed", r"megatron\.core\."),
    ("full scope is deprecated", r"megatron\.core\.transformer\.transformer_config"),
    (r"The \.grad attribute of a Tensor that is not a leaf Tensor", r"megatron\.core\.optimizer"),
    ("c10d::allreduce_: an autograd kernel was not registered", r"megatron\.core\."),
    (r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
     r"torch\.distributed\.c10d_logger"),
):
    _warnings.filterwarnings("ignore", message=_message, module=_module)
