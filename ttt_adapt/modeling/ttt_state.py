"""Fast-weight memory: the state of every TTT layer after reading some text, kept apart from the text.

A `TTTState` holds, per TTT layer and per row, the fast weight S (d x H, fp32) and the unfinished chunk's pending part
(its MLP inputs, its target sources with target="input_embed", its length), plus what it belongs to: the TTT layout
(model type, layers, chunk size, decay, conv and target settings), the dtype of the model that read it and a
fingerprint of the TTT weights. Reading text into it and starting forwards or `generate()` from it are methods of the
TTT models (`read_state`, `load_state`, `ttt_state=`, in modeling_ttt.py). A saved state is one safetensors file whose
metadata holds the JSON header. This file ships inside every export: torch and transformers only (safetensors is a
requirement of transformers).
"""

import hashlib
import json
import os

import torch

FORMAT = "ttt-adapt-state/1"
# The settings a state must share with the model that uses it: another value changes what S and the pending part mean.
LAYOUT_KEYS = ("model_type", "layers", "chunk_size", "state_decay", "conv_kernel_size", "use_proj", "lr_mode", "target",
               "clip_update_norm", "hidden_size", "intermediate_size", "key_norm", "write_rule")
# Keys newer than some states and exports: what their absence means (the published fast weight).
LAYOUT_DEFAULTS = {"key_norm": False, "write_rule": "sum"}


def state_header(model) -> dict:
    """What a state read by `model` belongs to: its layout, its dtype and the fingerprint of its TTT weights."""
    config = model.config
    ttt = config.ttt
    header = {"format": FORMAT, "model_type": config.model_type}
    for key in LAYOUT_KEYS[2:]:
        header[key] = ttt.get(key, LAYOUT_DEFAULTS[key]) if key in LAYOUT_DEFAULTS else \
            ttt.get(key, getattr(config, key, None))
    header["layers"] = list(ttt["layers"])
    header["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    header["fingerprint"] = ttt_fingerprint(model)
    return header


def ttt_fingerprint(model) -> str:
    """sha256 (first 16 hex digits) of the TTT parameters' names, dtypes, shapes and bytes."""
    # named from the decoder layers on, so that the causal LM and its decoder (`model.model`) agree
    params = sorted((n[n.find("layers."):], p) for n, p in model.named_parameters() if ".ttt." in f".{n}")
    key = tuple((n, p.data_ptr(), p._version, p.dtype) for n, p in params)  # unchanged parameters: hashed once
    memo = getattr(model, "_ttt_fingerprint_memo", None)
    if memo is not None and memo[0] == key:
        return memo[1]
    digest = hashlib.sha256()
    for name, p in params:
        t = p.detach()
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    model._ttt_fingerprint_memo = (key, digest.hexdigest()[:16])
    return model._ttt_fingerprint_memo[1]


class TTTState:
    """The fast weights of every TTT layer after reading some text, one row per reader (see the module docstring).

    `layers[i]`: {"S": (B, d, H) fp32, "buf_x": (B, C, d), "buf_t": (B, C, d) or absent, "n": (B,) long} for TTT
    layer i; `header`: `state_header` of the model that read it plus `tokens`, the tokens each row has read.
    """

    def __init__(self, layers: dict, header: dict):
        self.layers, self.header = layers, header

    @property
    def batch_size(self) -> int:
        return next(iter(self.layers.values()))["S"].shape[0]

    @property
    def tokens(self) -> list:
        return list(self.header.get("tokens", [0] * self.batch_size))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers.values() for t in layer.values())

    def __repr__(self):
        h = self.header
        return (f"TTTState({h['model_type']}, layers {h['layers']}, chunk {h['chunk_size']}, rows {self.batch_size}, "
                f"tokens {self.tokens}, {self.nbytes() / 2**20:.1f} MiB)")

    def rows(self, index) -> "TTTState":
        """The state of the rows `index` (a list of row numbers), as a new state."""
        idx = torch.as_tensor(index, dtype=torch.long)
        layers = {i: {k: t.index_select(0, idx.to(t.device)) for k, t in layer.items()} for i, layer in self.layers.items()}
        tokens = self.tokens
        return TTTState(layers, {**self.header, "tokens": [tokens[int(r)] for r in idx]})

    # ------------------------------------------------------------------------------------------- checks

    def check(self, model) -> None:
        """Raise a one-line ValueError unless this state belongs to `model` (layout, dtype, TTT weights)."""
        mine, theirs = self.header, state_header(model)
        for key in LAYOUT_KEYS:
            if mine.get(key, LAYOUT_DEFAULTS.get(key)) != theirs[key]:
                raise ValueError(f"this TTT state belongs to another TTT layout: it was read with {key}="
                                 f"{mine.get(key, LAYOUT_DEFAULTS.get(key))!r}, this model has {key}={theirs[key]!r}")
        if mine.get("dtype") != theirs["dtype"]:
            raise ValueError(f"this TTT state was read by a {mine.get('dtype')} model, this one is {theirs['dtype']}: "
                             f"load the model in {mine.get('dtype')} or read the state again")
        if mine.get("fingerprint") != theirs["fingerprint"]:
            raise ValueError(f"this TTT state was read by another model (TTT weights {mine.get('fingerprint')}, this "
                             f"model's {theirs['fingerprint']}): read it again with this model")

    # ------------------------------------------------------------------------------------------- caches

    @classmethod
    def from_layer_states(cls, states: dict, header: dict, tokens) -> "TTTState":
        """A copy of the decode-time states {layer_idx: TTTLayerState} (a layer that has read nothing: zeros)."""
        layers = {}
        B = len(tokens)
        for i, st in states.items():
            if not st.started:
                raise ValueError("the TTT state is empty: nothing was read")
            layer = {"S": st.S.detach().clone(), "buf_x": st.buf_x.detach().clone(), "n": st.n.detach().clone()}
            if st.buf_t is not None:
                layer["buf_t"] = st.buf_t.detach().clone()
            stale = torch.arange(layer["buf_x"].shape[1]).unsqueeze(0) >= layer["n"].cpu().unsqueeze(1)  # (B, C)
            for name in ("buf_x", "buf_t"):  # slots past the pending part hold leftovers of earlier chunks
                if name in layer:
                    layer[name][stale.to(layer[name].device)] = 0
            if layer["S"].shape[0] != B:
                raise ValueError(f"the cache holds {layer['S'].shape[0]} rows, {B} token counts were given")
            layers[i] = layer
        return cls(layers, {**header, "tokens": [int(t) for t in tokens]})

    def load_into(self, states: dict, batch_size: int, seen: dict, device) -> None:
        """Set the decode-time states {layer_idx: TTTLayerState} to copies of this state for a batch of `batch_size`
        rows (one row per batch row, or one row shared by all) on `device`; `seen[i]`: the tokens layer i's attention
        cache holds."""
        if self.batch_size not in (1, batch_size):
            raise ValueError(f"this TTT state has {self.batch_size} rows; the batch has {batch_size}: pass a state "
                             f"of 1 row (shared) or of one row per batch row (TTTState.rows)")
        if set(states) != set(self.layers):
            raise ValueError(f"this TTT state holds layers {sorted(self.layers)}, the model's are {sorted(states)}")
        for i, st in states.items():
            layer = self.layers[i]

            def rows(t, host=False):
                t = t.expand(batch_size, *t.shape[1:]) if t.shape[0] != batch_size else t
                return t.to("cpu" if host else device, copy=True).contiguous()

            st.S, st.buf_x, st.n = rows(layer["S"]), rows(layer["buf_x"]), rows(layer["n"], host=True)
            st.buf_t = rows(layer["buf_t"]) if "buf_t" in layer else None
            st.seen = torch.tensor(int(seen[i]), dtype=torch.long)

    def to(self, device) -> "TTTState":
        """This state with its tensors on `device` (the row lengths stay on the CPU, as the layers keep them)."""
        layers = {i: {k: t if k == "n" else t.to(device) for k, t in layer.items()} for i, layer in self.layers.items()}
        return TTTState(layers, dict(self.header))

    # ------------------------------------------------------------------------------------------- files

    def save(self, path) -> None:
        """Write this state to `path` (one safetensors file, the header as JSON in its metadata), atomically: a temp
        file in the same folder renamed over `path`, so a failed write leaves no half file."""
        from safetensors.torch import save_file

        path = os.fspath(path)
        tensors = {f"layers.{i}.{k}": t.detach().cpu().contiguous() for i, layer in self.layers.items()
                   for k, t in layer.items()}
        folder, name = os.path.split(os.path.abspath(path))
        tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
        try:
            save_file(tensors, tmp, metadata={"ttt_state": json.dumps(self.header)})
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    @classmethod
    def load(cls, path, model=None) -> "TTTState":
        """Read a state written by `save`; with `model`, also `check` it against that model. One-line ValueError for
        a missing, truncated or foreign file."""
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"no such TTT state file: {path}")
        try:
            with safe_open(path, framework="pt") as f:
                header = json.loads((f.metadata() or {})["ttt_state"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except KeyError:
            raise ValueError(f"{path} is a safetensors file but not a TTT state (no ttt_state header)") from None
        except Exception as e:  # safetensors raises its own errors for a truncated or corrupt file
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"{path} is not a complete TTT state file ({reason})") from None
        if header.get("format") != FORMAT:
            raise ValueError(f"{path}: unknown TTT state format {header.get('format')!r} (this code reads {FORMAT})")
        layers = {}
        for key, t in tensors.items():
            _, i, name = key.split(".", 2)
            layers.setdefault(int(i), {})[name] = t
        named = header.get("layers")
        if not isinstance(named, list) or sorted(layers) != sorted(named) or any(
                {"S", "buf_x", "n"} - set(v) for v in layers.values()):
            raise ValueError(f"{path} is not a complete TTT state file (layers {sorted(layers)}, header {named})")
        state = cls(layers, header)
        if model is not None:
            state.check(model)
        return state


__all__ = ["TTTState", "state_header", "ttt_fingerprint"]
