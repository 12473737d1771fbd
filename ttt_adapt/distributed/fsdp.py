"""Fully sharded data parallelism (FSDP2) for training: the request, the wrapping, the sharded step's helpers.

Asked for by the recipe (`parallel.fsdp: true`) or by Accelerate's FSDP settings (`accelerate launch --use_fsdp
--fsdp_version 2`, or an `accelerate config` file with FSDP), read from the environment `accelerate launch`
sets. Either way the model is sharded by torch's `fully_shard` here, on every device type: Accelerate 1.15
turns an FSDP request on CPU into plain data parallelism without a word, so the wrapping is not left to it.
Every decoder layer (TTT layers included) is one FSDP unit, the rest (embeddings, final norm, head) the root
unit; the weights are sharded over all processes (with context parallelism too: the (dp, cp) mesh of
`ttt_adapt.distributed.context_parallel` decides which rows and tokens a rank reads, the FSDP mesh which weights it holds).
Gradients are reduced in fp32; with bf16 mixed precision the weights are gathered in bf16 and the fast-weight
scan still accumulates in fp32 (`ttt_layer.fast_weight_scan`).

A request that cannot be honoured raises `RecipeError` (one line): FSDP1, parameter offloading here, fp16 and a
single process in `ttt_adapt.training.preflight.check_fsdp_run`.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from ttt_adapt._util import RecipeError
from ttt_adapt.model_setup import build_model, decoder_layers
from ttt_adapt.recipe.sections import Recipe

ACCELERATE_ENV = "ACCELERATE_USE_FSDP"  # set by `accelerate launch --use_fsdp` and FSDP config files


def _env_flag(name: str, default: str = "false") -> bool:
    return os.environ.get(name, default).strip().lower() in ("1", "true", "yes")


class FSDPRequest:
    """What was asked for: `source` (who asked), `reshard_after_forward`, `activation_checkpointing`."""

    def __init__(self, source: str, reshard_after_forward: bool = True, activation_checkpointing: bool = False):
        self.source = source
        self.reshard_after_forward = reshard_after_forward
        self.activation_checkpointing = activation_checkpointing


def fsdp_request(recipe: Recipe) -> FSDPRequest | None:
    """The FSDP request of the recipe or of Accelerate's launch settings, None if neither asks; RecipeError for
    settings that cannot be honoured."""
    from_accelerate = _env_flag(ACCELERATE_ENV)
    if not (recipe.parallel.fsdp or from_accelerate):
        return None
    if not from_accelerate:
        return FSDPRequest("parallel.fsdp")
    version = os.environ.get("FSDP_VERSION", "1").strip()  # Accelerate's default is FSDP1
    if version != "2":
        raise RecipeError(
            f"Accelerate's FSDP settings ask for fsdp_version {version}: ttt-adapt shards with FSDP2 only; "
            "set fsdp_version: 2 (accelerate launch --use_fsdp --fsdp_version 2) or use parallel.fsdp=true"
        )
    if _env_flag("FSDP_OFFLOAD_PARAMS"):
        raise RecipeError("Accelerate's FSDP settings ask for fsdp_offload_params, which ttt-adapt does not support; "
                          "set it to false")
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().lower()
    if reshard not in ("true", "false", "1", "0"):
        raise RecipeError(f"Accelerate's FSDP setting fsdp_reshard_after_forward={reshard!r} is not an FSDP2 value "
                          "(true or false)")
    return FSDPRequest("accelerate (--use_fsdp)", reshard in ("true", "1"), _env_flag("FSDP_ACTIVATION_CHECKPOINTING"))


def shard_model(model, mesh, mixed_precision: str = "no", reshard_after_forward: bool = True):
    """Shard `model` in place over the 1-D device `mesh`: one FSDP unit per decoder layer, the rest in the root.

    Build the optimizer afterwards (the parameters become DTensors). With `mixed_precision="bf16"` the weights
    are gathered for compute in bf16 while the sharded master weights, gradients' reduction and optimizer stay
    fp32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if mixed_precision == "bf16" else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def build_sharded_model(recipe: Recipe, base_config, mesh, device, prepare=None, **shard_kwargs):
    """The recipe's model sharded over `mesh` without a full copy of the weights in every process: process 0
    builds it (`ttt_adapt.model_setup.build_model`: reads the weights, initialises the TTT ones), the others on
    the meta device; after sharding each process receives its shards from process 0, one tensor at a time.
    `prepare(model)` runs before sharding (e.g. activation checkpointing); `shard_kwargs` go to `shard_model`."""
    model, full = sharded_skeleton(recipe, base_config, mesh, prepare, **shard_kwargs)
    load_from_rank0(model, full, device)
    return model


def sharded_skeleton(recipe: Recipe, base_config, mesh, prepare=None, **shard_kwargs):
    """(model sharded over `mesh`, the full state dict on process 0 / {} elsewhere): on process 0 the shards hold
    the weights, on the others they are on the meta device (nothing allocated) until `load_from_rank0`."""

    rank0 = dist.get_rank() == 0
    model = build_model(recipe, config=base_config) if rank0 else build_model(recipe, "meta", base_config)
    if prepare is not None:
        prepare(model)
    full = model.state_dict() if rank0 else {}  # references: the full tensors live until loaded
    shard_model(model, mesh, **shard_kwargs)
    return model, full


def load_from_rank0(model, full: dict, device) -> None:
    """Fill the shards of a `sharded_skeleton` model from process 0's full state dict (torch's distributed
    state-dict API, broadcasting one tensor at a time), and give every process process 0's buffers and tensor
    attributes that no state dict holds (rotary frequencies)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if dist.get_rank() != 0:
        model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    set_model_state_dict(model, full, options=options)
    full.clear()
    _broadcast_unsaved_tensors(model, device)


def _broadcast_unsaved_tensors(model, device) -> None:
    """Every buffer and plain tensor attribute of every module, broadcast from process 0 (they are small)."""
    slots = []
    for name, module in model.named_modules():
        for attr in sorted(module._buffers):
            if module._buffers[attr] is not None:
                slots.append((name, attr, True))
        for attr, value in sorted(vars(module).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                slots.append((name, attr, False))
    rank0 = dist.get_rank() == 0
    specs = [[(tuple(t.shape), t.dtype) for t in (_slot(model, s) for s in slots)] if rank0 else None]
    dist.broadcast_object_list(specs, src=0)
    for slot, (shape, dtype) in zip(slots, specs[0]):
        tensor = _slot(model, slot) if rank0 else torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(tensor, src=0)
        if not rank0:
            module = model.get_submodule(slot[0])
            if slot[2]:
                module._buffers[slot[1]] = tensor
            else:
                setattr(module, slot[1], tensor)


def _slot(model, slot):
    module = model.get_submodule(slot[0])
    return module._buffers[slot[1]] if slot[2] else getattr(module, slot[1])


def fsdp_mesh(device_type: str):
    """All processes in one 1-D mesh: FSDP shards the weights over every rank."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("fsdp",))


def is_sharded(model) -> bool:
    """True for a model wrapped by `fully_shard` (FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gradient_sync(model, enabled: bool):
    """Context: reduce-scatter the gradients in this backward (`enabled`) or only accumulate them locally."""
    if not is_sharded(model) or enabled:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def no_sync():
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    return no_sync()


def clip_grad_norm(model, max_norm: float) -> float:
    """Clip the sharded gradients to the global norm `max_norm`; return the global norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def local_parameter_bytes(model) -> int:
    """Bytes of parameters this process holds (its shards under FSDP)."""
    return sum(local(p).numel() * p.element_size() for p in model.parameters())


__all__ = [
    "FSDPRequest", "fsdp_request", "shard_model", "build_sharded_model", "sharded_skeleton", "load_from_rank0",
    "fsdp_mesh", "is_sharded",
    "gradient_sync", "clip_grad_norm", "local", "local_parameter_bytes",
]
