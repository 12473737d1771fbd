"""An export of every family reloads in a fresh process without ttt_adapt (trust_remote_code) and equals the
in-memory model. Each export is a LoRA-tuned model merged first, as export.py does; one process checks them all.
The in-memory models and the reloads run on the test device (`--device`; the scripts read TTT_TEST_DEVICE)."""

import subprocess
import sys
import textwrap

import torch
from conftest import BLOCK_TTT_ADAPT, DEVICE, FAMILY_ARCHS, randomize_ttt, tiny_base
from safetensors.torch import save_file

from ttt_adapt import TTTConfig, convert

RELOAD = BLOCK_TTT_ADAPT + textwrap.dedent(
    """
    import os
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForCausalLM

    DEVICE = os.environ.get("TTT_TEST_DEVICE", "cpu")


    def check(folder, expected):
        lm = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval().to(DEVICE)
        assert type(lm).__name__ == expected["name"].cpu().numpy().tobytes().decode(), type(lm).__name__
        with torch.no_grad():
            torch.testing.assert_close(lm(expected["ids"]).logits, expected["logits"], rtol=0, atol=0)
            base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval().to(DEVICE)
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
        ids = torch.zeros(2, 9, dtype=torch.long, device=DEVICE)
        mask = torch.zeros(2, 9, dtype=torch.long, device=DEVICE)
        for i, p in enumerate(prompts):
            ids[i, 9 - len(p):], mask[i, 9 - len(p):] = p, 1
        batch = lm.generate(ids, attention_mask=mask, max_new_tokens=6, **kw)
        for i, p in enumerate(prompts):
            alone = lm.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long, device=DEVICE),
                                max_new_tokens=6, **kw)
            assert torch.equal(batch[i, 9:], alone[0, len(p):]), (i, batch[i, 9:], alone[0, len(p):])


    for folder, expected in zip(sys.argv[1::2], sys.argv[2::2]):
        check(folder, load_file(expected, device=DEVICE))
        print("reloaded ok", folder)
    """
)


def _merged_lora_model(arch):
    """A TTT model tuned with LoRA (attention and the fast-weight down_proj; TTT parameters in modules_to_save),
    merged; the merged model must give the LoRA model's logits."""
    from peft import LoraConfig, get_peft_model

    model = convert(tiny_base(arch, tie=arch in ("llama", "gemma3"), device=DEVICE),
                    TTTConfig(layers=[0, 2], chunk_size=4, lr_mode="token"))
    model = randomize_ttt(model).eval()
    ids = torch.randint(3, 97, (2, 15)).to(DEVICE)
    with torch.no_grad():
        plain = model(ids).logits
        torch.manual_seed(0)
        lora = LoraConfig(r=2, target_modules=["q_proj", "down_proj"], modules_to_save=["ttt"], init_lora_weights=False)
        tuned = get_peft_model(model, lora).eval()
        for name, p in tuned.named_parameters():  # the trained copy of the TTT parameters differs from the original
            if "modules_to_save" in name and name.endswith("conv.weight"):
                p.mul_(1.5)
        lora_logits = tuned(ids).logits
        merged = tuned.merge_and_unload().eval()
        assert not torch.allclose(lora_logits, plain, atol=1e-3)
        torch.testing.assert_close(merged(ids).logits, lora_logits, rtol=1e-5, atol=1e-5)
    assert type(merged).__name__.startswith("TTT") and not any("lora" in n for n, _ in merged.named_parameters())
    return merged, ids


def test_every_family_exports_and_reloads_without_ttt_adapt(tmp_path):
    args = []
    for arch in FAMILY_ARCHS:
        model, ids = _merged_lora_model(arch)
        with torch.no_grad():
            expected = {
                "ids": ids,
                "logits": model(ids).logits,
                "hidden": model.model(ids).last_hidden_state,
                "generated": model.generate(ids[:1, :5], max_new_tokens=7, do_sample=False, pad_token_id=0,
                                            eos_token_id=None),
                "name": torch.frombuffer(bytearray(type(model).__name__.encode()), dtype=torch.uint8),
            }
        folder = tmp_path / arch
        model.save_pretrained(folder)
        save_file({k: v.cpu() for k, v in expected.items()}, str(tmp_path / f"{arch}.safetensors"))
        args += [str(folder), str(tmp_path / f"{arch}.safetensors")]
        files = {p.name for p in folder.iterdir()}
        assert {"configuration_ttt.py", "modeling_ttt.py", "ttt_layer.py", "ttt_state.py", "model.safetensors"} <= files
        for name in ("configuration_ttt.py", "modeling_ttt.py", "ttt_layer.py", "ttt_state.py"):  # torch/transformers
            src = (folder / name).read_text()
            imports = [l.strip().split()[1] for l in src.splitlines() if l.strip().startswith(("import ", "from "))]
            stdlib = {"copy", "dataclasses", "functools", "inspect", "sys", "warnings", "hashlib", "json", "os",
                      "safetensors"}  # safetensors: a requirement of transformers
            assert all(m.split(".")[0] in {"torch", "transformers", *stdlib} or m.startswith(".") for m in imports), imports
    script = tmp_path / "reload.py"
    script.write_text(RELOAD)
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=tmp_path,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.count("reloaded ok") == len(FAMILY_ARCHS), proc.stderr[-3000:]


def test_delta_rule_export_reloads_without_ttt_adapt(tmp_path):
    """The delta rule with normalised keys and a fixed TTT learning rate (a buffer, saved with the weights) ships in
    the export's own code: reloaded in a fresh process without ttt_adapt it gives the in-memory logits, decodes as
    its full forwards do and keeps left-padded rows apart."""
    ttt = TTTConfig(layers=[0, 2], chunk_size=4, write_rule="delta", key_norm=True, lr_learned=False, lr_init=0.7,
                    state_decay=0.9, lr_mode="token")
    model = randomize_ttt(convert(tiny_base("qwen3", device=DEVICE), ttt)).eval()
    ids = torch.randint(3, 97, (2, 15)).to(DEVICE)
    with torch.no_grad():
        expected = {"ids": ids, "logits": model(ids).logits, "hidden": model.model(ids).last_hidden_state,
                    "generated": model.generate(ids[:1, :5], max_new_tokens=7, do_sample=False, pad_token_id=0,
                                                eos_token_id=None),
                    "name": torch.frombuffer(bytearray(type(model).__name__.encode()), dtype=torch.uint8)}
    model.save_pretrained(tmp_path / "delta")
    save_file({k: v.cpu() for k, v in expected.items()}, str(tmp_path / "delta.safetensors"))
    script = tmp_path / "reload.py"
    script.write_text(RELOAD)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "delta"), str(tmp_path / "delta.safetensors")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0 and "reloaded ok" in proc.stdout, proc.stderr[-3000:]


FINE_TUNE = BLOCK_TTT_ADAPT + textwrap.dedent(
    """
    import os
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    folder, out = sys.argv[1], sys.argv[2]
    device = torch.device(os.environ.get("TTT_TEST_DEVICE", "cpu")).type
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    autocast = set()
    for m in model.modules():
        if type(m).__name__ == "TTTMLP":
            m.register_forward_hook(lambda mod, args, out: autocast.add(torch.is_autocast_enabled(device)))
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 97, (8, 20), generator=g)]  # 5 chunks
    args = TrainingArguments(output_dir=out, bf16=True, use_cpu=device == "cpu", max_steps=3,
                             per_device_train_batch_size=2,
                             learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[],
                             gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses))), losses
    assert autocast == {True}, autocast
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert any(".ttt.conv" in n for n in changed) and all(torch.isfinite(p).all() for p in model.parameters())
    print("fine-tuned ok", losses)
    """
)


def test_export_fine_tunes_with_trainer_bf16_without_ttt_adapt(tmp_path):
    """transformers' Trainer with bf16=True (CPU or CUDA autocast, `--device`) and reentrant gradient checkpointing,
    as a downstream user runs it on an export whose rows span 5 chunks (target input_embed): finite losses, weights
    trained."""
    model = convert(tiny_base("llama", tie=True), TTTConfig(layers=[0, 2], chunk_size=4, target="input_embed"))
    randomize_ttt(model).save_pretrained(tmp_path / "export")
    script = tmp_path / "fine_tune.py"
    script.write_text(FINE_TUNE)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "export"), str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0 and "fine-tuned ok" in proc.stdout, proc.stderr[-3000:]
