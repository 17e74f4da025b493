"""``finetune generate`` with several prompts and one adapter per prompt, on a tiny model made in the test:
the mixed batch prints exactly what each prompt gives alone with its adapter (greedy); bad flags are one line."""

import pytest
import torch

from finetune_ref.cli.main import main
from tiny_model_dir import make_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["What is a list?", "Name a loop.", "Explain scope"]


@pytest.fixture(scope="module")
def model_and_adapters(tmp_path_factory):
    from finetune_ref import lora
    from finetune_ref.models.loader import load_model

    root = tmp_path_factory.mktemp("gen")
    model_dir, _ = make_model_dir(root)
    adapters = {}
    for name, r in (("a", 2), ("b", 4)):
        torch.manual_seed(r)
        model = load_model(model_dir)
        lora.inject_lora(model, lora.LoraConfig(r=r, lora_alpha=8, target_modules="all-linear",
                                                init_lora_weights=False))
        with torch.no_grad():
            for _, layer in lora.lora_layers(model):
                layer.lora_B["default"].weight.mul_(20)  # large enough to change the greedy tokens
        adapters[name] = lora.save_adapter(model, root / name)
    return model_dir, adapters


def run(capsys, *argv):
    assert main(["generate", *argv, "--max-new-tokens", "8"]) == 0
    return capsys.readouterr().out


def test_adapter_per_prompt_equals_each_prompt_alone(model_and_adapters, capsys, tmp_path):
    model_dir, adapters = model_and_adapters
    names = ["a", "-", "b"]
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS[1:]) + "\n\n")
    out = run(capsys, "--model", str(model_dir), "--adapter", f"a={adapters['a']}", "--adapter",
              f"b={adapters['b']}", "--prompt", PROMPTS[0], "--prompts-file", str(prompts_file),
              "--adapter-per-prompt", ",".join(names))
    blocks = out.split("--- prompt ")[1:]
    assert [b.split(" ---\n")[0] for b in blocks] == ["1 (a)", "2 (base)", "3 (b)"]
    texts = [b.split(" ---\n", 1)[1].removesuffix("\n") for b in blocks]
    alone = []
    for prompt, name in zip(PROMPTS, names):
        extra = [] if name == "-" else ["--adapter", str(adapters[name])]
        alone.append(run(capsys, "--model", str(model_dir), "--prompt", prompt, *extra).removesuffix("\n"))
    assert texts == alone
    assert len(set(alone)) == 3  # the adapters change the answers


@pytest.mark.parametrize("argv, message", [
    (["--adapter-per-prompt", "a"], "1 adapter(s) but there are 2 prompts"),
    (["--adapter-per-prompt", "a,zzz"], "unknown adapter(s) ['zzz']"),
])
def test_bad_adapter_per_prompt_is_one_line(model_and_adapters, capsys, argv, message):
    model_dir, adapters = model_and_adapters
    code = main(["generate", "--model", str(model_dir), "--adapter", f"a={adapters['a']}", "--prompt", "x",
                 "--prompt", "y", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_no_prompt_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate"])
    assert exc.value.code == 2 and "--prompt" in capsys.readouterr().err
