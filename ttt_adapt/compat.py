"""What differs between the transformers releases ttt-adapt supports (see `TESTED_TRANSFORMERS`), in one place.

transformers 5.x renamed `gradient_checkpointing_*` to `activation_checkpointing_*` (the old names now warn);
5.0 has only the old ones.
"""


def enable_activation_checkpointing(model, use_reentrant: bool = False) -> None:
    """Recompute each decoder layer's activations in backward (transformers' own checkpointing)."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def disable_activation_checkpointing(model) -> None:
    """Undo `enable_activation_checkpointing` (a no-op if it is off)."""
    if hasattr(model, "activation_checkpointing_disable"):
        if model.is_activation_checkpointing:
            model.activation_checkpointing_disable()
    elif model.is_gradient_checkpointing:
        model.gradient_checkpointing_disable()
