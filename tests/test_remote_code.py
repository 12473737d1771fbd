"""An export reloads in a fresh process without ttt_adapt (trust_remote_code) and equals the in-memory model."""

import subprocess
import sys
import textwrap

import torch
from conftest import BLOCK_TTT_ADAPT, randomize_ttt, tiny_base
from safetensors.torch import save_file

from ttt_adapt import TTTConfig, convert

RELOAD = BLOCK_TTT_ADAPT + textwrap.dedent(
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForCausalLM
    folder, expected = sys.argv[1], load_file(sys.argv[2])
    lm = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(lm).__name__ == expected["name"].numpy().tobytes().decode(), type(lm).__name__
    with torch.no_grad():
        torch.testing.assert_close(lm(expected["ids"]).logits, expected["logits"], rtol=0, atol=0)
        base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        torch.testing.assert_close(base(expected["ids"]).last_hidden_state, expected["hidden"], rtol=0, atol=0)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    out = lm.generate(expected["ids"][:1, :5], max_new_tokens=7, **kw)
    assert torch.equal(out, expected["generated"]), (out, expected["generated"])
    # cached greedy decoding == greedy by full forwards (no cache), across several chunk boundaries
    greedy = expected["ids"][:1, :5]
    with torch.no_grad():
        for _ in range(7):
            nxt = lm(greedy, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            greedy = torch.cat([greedy, nxt], 1)
    assert torch.equal(out, greedy), (out, greedy)
    # a left-padded batch == each prompt alone
    prompts = [expected["ids"][0, :9], expected["ids"][1, :4]]
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 9 - len(p):], mask[i, 9 - len(p):] = p, 1
    batch = lm.generate(ids, attention_mask=mask, max_new_tokens=6, **kw)
    for i, p in enumerate(prompts):
        alone = lm.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=6, **kw)
        assert torch.equal(batch[i, 9:], alone[0, len(p):]), (i, batch[i, 9:], alone[0, len(p):])
    print("reloaded ok")
    """
)


def _check(arch, tmp_path):
    model = randomize_ttt(convert(tiny_base(arch), TTTConfig(layers=[0, 2], chunk_size=4, lr_mode="token"))).eval()
    ids = torch.randint(3, 97, (2, 15))
    with torch.no_grad():
        expected = {
            "ids": ids,
            "logits": model(ids).logits,
            "hidden": model.model(ids).last_hidden_state,
            "generated": model.generate(ids[:1, :5], max_new_tokens=7, do_sample=False, pad_token_id=0, eos_token_id=None),
            "name": torch.frombuffer(bytearray(type(model).__name__.encode()), dtype=torch.uint8),
        }
    model.save_pretrained(tmp_path / "export")
    save_file(expected, str(tmp_path / "expected.safetensors"))
    script = tmp_path / "reload.py"
    script.write_text(RELOAD)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "export"), str(tmp_path / "expected.safetensors")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0 and "reloaded ok" in proc.stdout, proc.stderr[-3000:]
    files = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert {"configuration_ttt.py", "modeling_ttt.py", "ttt_layer.py", "model.safetensors"} <= set(files)
    for name in ("configuration_ttt.py", "modeling_ttt.py", "ttt_layer.py"):  # only torch/transformers imports
        src = (tmp_path / "export" / name).read_text()
        imports = [l.split()[1] for l in src.splitlines() if l.startswith(("import ", "from "))]
        stdlib = {"dataclasses", "inspect"}
        assert all(m.split(".")[0] in {"torch", "transformers", *stdlib} or m.startswith(".") for m in imports), imports


def test_qwen3_export_reloads_without_ttt_adapt(tmp_path):
    _check("qwen3", tmp_path)


def test_llama_export_reloads_without_ttt_adapt(tmp_path):
    _check("llama", tmp_path)
