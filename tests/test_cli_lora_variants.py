"""The LoRA family through ``finetune``: train with --dora (LoRA and QLoRA), --init pissa|olora|loftq (olora on
LoRA and QLoRA) and
--loraplus-lr-ratio on a tiny random Llama with SmolLM2's tokenizer, then eval the saved adapter: the held-out
loss eval computes from the files equals the one training printed (to the printed 4 decimals: 1e-4; a
PiSSA/OLoRA adapter is evaluated as its rank-2r conversion on the original base, a different fp32 sum: 2e-4)."""

import json

import pytest

from finetune_ref.cli.main import main
from tiny_model_dir import make_hf_model_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_dir):
    """(model dir, corpus file): a tiny HF Llama with SmolLM2's tokenizer, and a few pydoc topics as text."""
    return make_hf_model_dir(tmp_path_factory.mktemp("tiny-variants"), smollm2_dir)


DATA = ["--seq-len", "32", "--batch-size", "2", "--eval-fraction", "0.3"]


def losses(stdout: str) -> tuple[float, float]:
    before = float(stdout.split("held-out before: loss ")[1].split(",")[0])
    return before, float(stdout.split("held-out after:  loss ")[1].split(",")[0])


@pytest.mark.parametrize("method, flags, tol", [
    ("lora", ["--dora"], 1e-4),
    ("qlora", ["--dora"], 1e-4),
    ("lora", ["--init", "pissa"], 2e-4),
    ("lora", ["--init", "olora", "--loraplus-lr-ratio", "4"], 2e-4),
    ("qlora", ["--init", "loftq", "--loftq-iter", "2"], 1e-4),
    ("qlora", ["--init", "olora"], 1e-4),
    ("lora", ["--modules-to-save", "norm,input_layernorm", "--dora"], 1e-4),
    # B starts N(0, 1) on the embedding (PEFT's init): a smaller --lr, more updates (the last flag given wins)
    ("lora", ["--targets", "q_proj,v_proj,embed_tokens", "--ensure-weight-tying", "--lr", "1e-3", "--steps", "8"], 1e-4),
    ("qlora", ["--targets", "all-linear,embed_tokens", "--ensure-weight-tying", "--lr", "1e-3", "--steps", "8"], 1e-4),
    ("lora", ["--trainable-tokens", "0,5,17,198,271,1116"], 1e-4),
])
def test_train_then_eval_the_saved_adapter(tiny, tmp_path, capsys, method, flags, tol):
    model, corpus = tiny
    out = tmp_path / "run"
    assert main(["train", "--method", method, "--model", str(model), "--data", str(corpus), *DATA, "--steps", "3",
                 "--warmup", "1", "--lr", "1e-2", "--precision", "fp32", "--no-progress", "--out", str(out),
                 *flags]) == 0
    before, after = losses(capsys.readouterr().out)
    assert after < before
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is ("--dora" in flags)
    base = model
    if method == "qlora" and ("loftq" in flags or "olora" in flags):
        # the adapter fits only the 4-bit base its initialisation made (saved beside it); the original is refused
        base = out / ("loftq_base" if "loftq" in flags else "olora_base")
        assert main(["eval", "--model", str(model), "--data", str(corpus), *DATA, "--adapter", str(out)]) == 2
        assert "--model " + str(base) in capsys.readouterr().err
        assert (config["r"], config["init_lora_weights"]) == (8, True)  # plain LoRA on that base
    elif "pissa" in flags or "olora" in flags:
        assert (config["r"], config["init_lora_weights"]) == (16, True)  # converted to plain LoRA on the original
    if "--ensure-weight-tying" in flags:  # LoRA on the tied embedding, the head given the same update
        assert config["ensure_weight_tying"] is True and any(t.endswith("embed_tokens") for t in config["target_modules"])
    assert main(["eval", "--model", str(base), "--data", str(corpus), *DATA, "--json", "--adapter", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(after, abs=tol)
    if "--trainable-tokens" in flags:  # the rows of those tokens trained (and the tied head with them)
        assert config["trainable_token_indices"] == [0, 5, 17, 198, 271, 1116]
    if "--ensure-weight-tying" in flags or "--trainable-tokens" in flags:  # merged (the tied head too): same loss
        merged = tmp_path / "merged"
        assert main(["merge", "--model", str(model), "--adapter", str(out), "--out", str(merged)]) == 0
        capsys.readouterr()
        assert main(["eval", "--model", str(merged), "--data", str(corpus), *DATA, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(after, abs=tol)


def test_a_tied_embedding_target_without_ensure_weight_tying_is_refused_by_name(tiny, tmp_path, capsys):
    model, corpus = tiny
    assert main(["train", "--model", str(model), "--data", str(corpus), *DATA, "--steps", "1", "--no-progress",
                 "--targets", "q_proj,embed_tokens", "--dry-run", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--targets q_proj,embed_tokens" in err and "--ensure-weight-tying" in err and "Traceback" not in err
    assert "its linear layers are" not in err and len(err.strip().splitlines()) == 1  # the tie, not a target list
    # --ensure-weight-tying with nothing to tie (no embedding targeted) is refused, not recorded and ignored
    assert main(["train", "--model", str(model), "--data", str(corpus), *DATA, "--steps", "1", "--no-progress",
                 "--ensure-weight-tying", "--dry-run", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--ensure-weight-tying: nothing to tie here" in err and "Traceback" not in err
    assert main(["train", "--model", str(model), "--data", str(corpus), *DATA, "--steps", "1", "--no-progress",
                 "--trainable-tokens", "5,999999", "--dry-run", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--trainable-tokens 5,999999" in err and "outside the vocabulary" in err and "Traceback" not in err


def test_combine_two_adapters_then_eval_with_scales(tiny, tmp_path, capsys):
    """combine --method cat is exact: the combined adapter with weights (1, 1) equals the two stacked, which is
    also what eval computes with --adapter-scale 1,1; scale 0 removes an adapter."""
    model, corpus = tiny
    runs = []
    for seed in ("1", "2"):
        out = tmp_path / f"lora{seed}"
        assert main(["train", "--model", str(model), "--data", str(corpus), *DATA, "--steps", "2", "--warmup", "1",
                     "--lr", "1e-2", "--precision", "fp32", "--no-progress", "--seed", seed, "--out", str(out)]) == 0
        runs.append(str(out))
    capsys.readouterr()
    evaluate = ["eval", "--model", str(model), "--data", str(corpus), *DATA, "--json"]
    assert main(["combine", "--model", str(model), "--adapter", runs[0], "--adapter", runs[1], "--weights", "1,1",
                 "--method", "cat", "--out", str(tmp_path / "cat")]) == 0
    assert json.loads((tmp_path / "cat" / "adapter_config.json").read_text())["r"] == 16
    capsys.readouterr()
    assert main([*evaluate, "--adapter", str(tmp_path / "cat")]) == 0
    combined = json.loads(capsys.readouterr().out)["loss"]
    assert main([*evaluate, "--adapter", runs[0], "--adapter", runs[1], "--adapter-scale", "1,1"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(combined, abs=1e-5)
    assert main([*evaluate, "--adapter", runs[0], "--adapter", runs[1], "--adapter-scale", "1,0"]) == 0
    first_only = json.loads(capsys.readouterr().out)["loss"]
    assert main([*evaluate, "--adapter", runs[0]]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(first_only, abs=1e-6)
    assert main(["combine", "--model", str(model), "--adapter", runs[0], "--adapter", runs[1], "--weights", "1",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "--weights" in capsys.readouterr().err
    # TIES / DARE: a plain adapter eval takes; DARE's masks follow --seed (same seed, same file)
    combine = ["combine", "--model", str(model), "--adapter", runs[0], "--adapter", runs[1], "--weights", "0.6,0.4"]
    assert main([*combine, "--method", "ties", "--density", "0.5", "--majority-sign-method", "frequency",
                 "--out", str(tmp_path / "ties")]) == 0
    assert main([*evaluate, "--adapter", str(tmp_path / "ties")]) == 0
    files = []
    for name, s in (("dare1", "3"), ("dare2", "3"), ("dare3", "4")):
        assert main([*combine, "--method", "dare_ties", "--density", "0.7", "--seed", s, "--out",
                     str(tmp_path / name)]) == 0
        files.append((tmp_path / name / "adapter_model.safetensors").read_bytes())
    assert files[0] == files[1] != files[2]
    capsys.readouterr()
    for flags, message in [(["--method", "ties"], "needs --density"),
                           (["--method", "cat", "--density", "0.5"], "--density applies to"),
                           (["--method", "ties", "--density", "0"], "--density: expected a number in (0, 1]"),
                           (["--method", "magnitude_prune", "--density", "0.5", "--majority-sign-method", "total"],
                            "--majority-sign-method applies to"),
                           (["--method", "ties", "--density", "0.5", "--seed", "1"], "--seed seeds DARE"),
                           (["--method", "linear", "--svd-rank", "2"], "--svd-rank"),
                           # a density that keeps no entry: refused, not an all-zero adapter with exit 0
                           (["--method", "magnitude_prune", "--density", "1e-9"], "all zeros")]:
        try:
            code = main([*combine, *flags, "--out", str(tmp_path / "bad")])
        except SystemExit as e:  # argparse's own refusals (a --density out of range)
            code = e.code
        assert code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) <= 3, err
    assert not (tmp_path / "bad").exists()


def test_qlora_refuses_pissa_naming_why(tiny, tmp_path, capsys):
    model, corpus = tiny
    assert main(["train", "--method", "qlora", "--model", str(model), "--data", str(corpus), *DATA, "--steps", "1",
                 "--init", "pissa", "--no-progress", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--init pissa" in err and "pissa_init" in err and "--init olora" in err
    assert not (tmp_path / "run").exists()


def test_an_adapter_with_its_own_4bit_base_is_refused_on_another_4bit_base(tiny, tmp_path, capsys):
    """OLoRA on NF4 saves the re-quantized base beside the adapter; another such base (here from a rank-4 run) is
    4-bit too, so only its weights tell it apart (the fingerprint recorded in qlora_config.json)."""
    model, corpus = tiny
    runs = []
    for rank in ("8", "4"):
        out = tmp_path / f"olora{rank}"
        assert main(["train", "--method", "qlora", "--init", "olora", "--rank", rank, "--model", str(model),
                     "--data", str(corpus), *DATA, "--steps", "1", "--precision", "fp32", "--no-progress",
                     "--out", str(out)]) == 0
        runs.append(out)
    capsys.readouterr()
    evaluate = ["eval", "--data", str(corpus), *DATA, "--adapter", str(runs[0])]
    assert main([*evaluate, "--model", str(runs[1] / "olora_base")]) == 2
    err = capsys.readouterr().err
    assert "is not the 4-bit base this adapter was initialised with" in err and str(runs[0] / "olora_base") in err
    assert main([*evaluate, "--model", str(runs[0] / "olora_base")]) == 0
    # two such adapters cannot be combined (each fits only its own base): said so, not "differently quantized"
    assert main(["combine", "--model", str(runs[0] / "olora_base"), "--adapter", str(runs[0]), "--adapter",
                 str(runs[0]), "--weights", "0.5,0.5", "--out", str(tmp_path / "both")]) == 2
    assert "fits only that base" in capsys.readouterr().err
    # a QLoRA adapter with a LoRA one, in either order: refused before anything is written
    lora = tmp_path / "lora"
    assert main(["train", "--model", str(model), "--data", str(corpus), *DATA, "--steps", "1", "--no-progress",
                 "--out", str(lora)]) == 0
    qlora = tmp_path / "qlora"
    assert main(["train", "--method", "qlora", "--model", str(model), "--data", str(corpus), *DATA, "--steps", "1",
                 "--no-progress", "--out", str(qlora)]) == 0
    capsys.readouterr()
    for pair in ((lora, qlora), (qlora, lora)):
        assert main(["combine", "--model", str(model), "--adapter", str(pair[0]), "--adapter", str(pair[1]),
                     "--weights", "0.5,0.5", "--out", str(tmp_path / "mixed")]) == 2
        err = capsys.readouterr().err
        assert "use adapters trained on the same base together" in err and "Traceback" not in err
        assert not (tmp_path / "mixed").exists()


def test_combine_refuses_trainable_token_adapters(tiny, tmp_path, capsys):
    model, corpus = tiny
    out = tmp_path / "tokens"
    assert main(["train", "--model", str(model), "--data", str(corpus), *DATA, "--steps", "1", "--no-progress",
                 "--trainable-tokens", "0,5", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["combine", "--model", str(model), "--adapter", str(out), "--adapter", str(out), "--weights",
                 "0.5,0.5", "--method", "cat", "--out", str(tmp_path / "both")]) == 2
    err = capsys.readouterr().err
    assert "trainable-token" in err and "Traceback" not in err
    assert not (tmp_path / "both").exists()
