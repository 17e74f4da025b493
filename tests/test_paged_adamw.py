"""PagedAdamW (optim/adamw.py, states paged by optim/paging.py): bitwise torch.optim.AdamW in every state home, page-in/page-out copies
counted on a CPU-only machine, frozen parameters untouched, state_dict round trips (torch.save with
weights_only=True, torch.distributed.checkpoint's get/set_optimizer_state_dict as train/checkpointing.py uses
them) restoring into the optimizer's own home with a bitwise-equal resume, and the errors.

Tolerance: none. Every comparison here is bitwise (torch.equal), as a reference must be in fp32.
"""

import io
import json

import pytest
import torch
from torch import nn

from finetune_ref.optim.adamw import MasterWeightAdamW, PagedAdamW
from finetune_ref.optim.paging import DEFAULT_MIN_PAGED_SIZE, PagingStats, StatePager

HOMES = ("device", "host", "unified")
SHAPES = ((48, 40), (40,), (7, 3))  # 1920, 40 and 21 elements
THRESHOLD = 100  # pages the first and (not) the others, so each run mixes paged and unpaged states


pytestmark = pytest.mark.usefixtures("one_thread")


def make_params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def grads_for(params, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g).to(p.dtype) for p in params] for _ in range(steps)]


def groups(params):
    # Two groups with different weight decay, as train.trainer.param_groups builds them.
    return [{"params": params[::2], "weight_decay": 0.1}, {"params": params[1::2], "weight_decay": 0.0}]


def run(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()


HYPER = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6)


@pytest.mark.parametrize("home", HOMES)
def test_bitwise_equal_to_torch_adamw_over_10_steps(home):
    ours, ref = make_params(), make_params()
    frozen = nn.Parameter(torch.randn(30, 20), requires_grad=False)
    frozen_before = frozen.detach().clone()
    opt = PagedAdamW(groups(ours) + [{"params": [frozen]}], state_home=home, min_paged_size=THRESHOLD, **HYPER)
    opt_ref = torch.optim.AdamW(groups(ref), foreach=False, **HYPER)
    grads = grads_for(ours, 10)
    run(opt, ours, grads)
    run(opt_ref, ref, grads)
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][name], opt_ref.state[q][name]), name
        assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
    assert frozen not in opt.state and torch.equal(frozen, frozen_before)


def test_host_home_counts_every_page_in_and_out():
    params = make_params()
    opt = PagedAdamW(groups(params), state_home="host", min_paged_size=THRESHOLD, **HYPER)
    run(opt, params, grads_for(params, 3))
    big = params[0]  # the only parameter at or above the threshold
    per_step_bytes = 2 * big.numel() * 4  # exp_avg + exp_avg_sq, fp32
    assert opt.paging_stats == PagingStats(page_ins=3 * 2, page_outs=3 * 2, bytes_in=3 * per_step_bytes,
                                           bytes_out=3 * per_step_bytes, max_resident_bytes=per_step_bytes)
    assert [opt.pager.home_of(p) for p in params] == ["host", "device", "device"]
    # On a CPU-only machine the host tensors are plain (unpinned) CPU tensors, distinct from any working copy.
    assert all(t.device.type == "cpu" for t in opt.state[big].values())
    assert opt.state_bytes() == {"device": (40 + 21) * 8, "host": big.numel() * 8, "unified": 0}
    opt.paging_stats.reset()
    assert opt.paging_stats == PagingStats()


@pytest.mark.parametrize("home", ("device", "unified"))
def test_unpaged_homes_make_no_copies(home):
    params = make_params()
    opt = PagedAdamW(groups(params), state_home=home, min_paged_size=0, **HYPER)
    run(opt, params, grads_for(params, 2))
    assert opt.paging_stats == PagingStats()


def test_default_threshold_is_bitsandbytes_1e5_elements():
    pager = StatePager("host", DEFAULT_MIN_PAGED_SIZE)
    assert DEFAULT_MIN_PAGED_SIZE == 100_000
    assert pager.home_of(torch.empty(99_999)) == "device"
    assert pager.home_of(torch.empty(100_000)) == "host"
    assert StatePager("device", 0).home_of(torch.empty(10**6)) == "device"


def test_bf16_parameters_with_master_weights_equal_master_weight_adamw():
    ours, ref = make_params(torch.bfloat16), make_params(torch.bfloat16)
    opt = PagedAdamW(groups(ours), state_home="host", min_paged_size=THRESHOLD, **HYPER)
    opt_ref = MasterWeightAdamW(groups(ref), **HYPER)
    grads = grads_for(ours, 6)
    run(opt, ours, grads)
    run(opt_ref, ref, grads)
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)
        for name in ("master", "exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][name], opt_ref.state[q][name]), name
    assert opt.paging_stats.page_ins == 6 * 3  # master is paged with the moments


def test_bf16_without_master_weights_rounds_the_fp32_update():
    (p,) = [nn.Parameter(torch.randn(50).to(torch.bfloat16))]
    q = nn.Parameter(p.detach().float())
    opt = PagedAdamW([p], master_weights=False, state_home="device", **HYPER)
    opt_ref = torch.optim.AdamW([q], foreach=False, **HYPER)
    g = torch.randn(50).to(torch.bfloat16)
    p.grad, q.grad = g.clone(), g.float()
    opt.step()
    opt_ref.step()
    assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
    assert opt.state[p]["exp_avg"].dtype == torch.float32
    assert torch.equal(p, q.detach().to(torch.bfloat16))  # one step: fp32 update, then rounded


def state_roundtrip(opt):
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("saved_home,loaded_home", [("host", "host"), ("device", "host"), ("host", "device")])
def test_resume_from_torch_save_is_bitwise_equal(saved_home, loaded_home):
    grads = grads_for(make_params(), 10)
    straight = make_params()
    run(PagedAdamW(groups(straight), state_home=saved_home, min_paged_size=THRESHOLD, **HYPER), straight, grads)

    first = make_params()
    opt = PagedAdamW(groups(first), state_home=saved_home, min_paged_size=THRESHOLD, **HYPER)
    run(opt, first, grads[:5])
    saved = state_roundtrip(opt)
    second = [nn.Parameter(p.detach().clone()) for p in first]
    opt2 = PagedAdamW(groups(second), state_home=loaded_home, min_paged_size=THRESHOLD, lr=0.5)
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["lr"] == HYPER["lr"] and opt2.param_groups[0]["betas"] == HYPER["betas"]
    for p in second:  # each state sits in the loading optimizer's home, as a copy of the saved tensor
        assert opt2.state[p]["step"].item() == 5.0
        assert opt2.pager.home_of(p) == ("host" if loaded_home == "host" and p.numel() >= THRESHOLD else "device")
    assert all(opt2.state[second[0]]["exp_avg"].data_ptr() != t["exp_avg"].data_ptr() for t in saved["state"].values())
    run(opt2, second, grads[5:])
    assert opt2.paging_stats.page_ins == (5 * 2 if loaded_home == "host" else 0)
    for p, q in zip(second, straight):
        assert torch.equal(p, q)


def test_resume_through_distributed_checkpoint_state_dict_api():
    """train/checkpointing.py saves get_optimizer_state_dict (tensors to safetensors, the rest to JSON) and
    restores with set_optimizer_state_dict, which first runs a zero-gradient, lr=0 step on a fresh optimizer."""
    from safetensors.torch import load, save
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    def model_with(params):
        m = nn.Module()
        m.weights = nn.ParameterList(params)
        return m

    grads = grads_for(make_params(), 8)
    straight = make_params()
    run(PagedAdamW(groups(straight), state_home="host", min_paged_size=THRESHOLD, **HYPER), straight, grads)

    first = make_params()
    model = model_with(first)
    opt = PagedAdamW(groups(first), state_home="host", min_paged_size=THRESHOLD, **HYPER)
    run(opt, first, grads[:4])
    osd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    tensors = {f"{name}/{k}": v for name, entry in osd["state"].items() for k, v in entry.items()}
    blob, groups_json = save(tensors), json.dumps([{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
                                                   for g in osd["param_groups"]])

    second = [nn.Parameter(p.detach().clone()) for p in first]
    model2 = model_with(second)
    opt2 = PagedAdamW(groups(second), state_home="host", min_paged_size=THRESHOLD, **HYPER)
    state: dict = {}
    for key, value in load(blob).items():
        name, k = key.rsplit("/", 1)
        state.setdefault(name, {})[k] = value
    param_groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in json.loads(groups_json)]
    set_optimizer_state_dict(model2, opt2, {"state": state, "param_groups": param_groups},
                             options=StateDictOptions(full_state_dict=True))
    assert all(torch.equal(p, q) for p, q in zip(second, first))  # the lr=0 initialising step moved nothing
    run(opt2, second, grads[4:])
    for p, q in zip(second, straight):
        assert torch.equal(p, q)


def test_load_state_dict_rejects_mismatches_and_changes_nothing():
    params = make_params()
    opt = PagedAdamW(groups(params), state_home="host", min_paged_size=THRESHOLD, **HYPER)
    run(opt, params, grads_for(params, 1))
    good = state_roundtrip(opt)
    before = {k: v.clone() for k, v in opt.state[params[0]].items()}

    wrong_shape = state_roundtrip(opt)
    wrong_shape["state"][0]["exp_avg"] = torch.zeros(3)
    with pytest.raises(ValueError, match="exp_avg"):
        opt.load_state_dict(wrong_shape)
    missing = state_roundtrip(opt)
    del missing["state"][0]["exp_avg_sq"]
    with pytest.raises(ValueError, match="expects"):
        opt.load_state_dict(missing)
    with pytest.raises(ValueError, match="param groups"):
        opt.load_state_dict({"state": {}, "param_groups": good["param_groups"][:1]})
    bad_step = state_roundtrip(opt)
    bad_step["state"][0]["step"] = torch.tensor(1.5)
    with pytest.raises(ValueError, match="step"):
        opt.load_state_dict(bad_step)
    bf16_master = PagedAdamW(groups(make_params(torch.bfloat16)), **HYPER)
    with pytest.raises(ValueError, match="master"):
        bf16_master.load_state_dict(good)  # a 16-bit parameter's state needs its fp32 master copy
    for k, v in before.items():
        assert torch.equal(opt.state[params[0]][k], v)
    opt.load_state_dict(good)


def test_torch_adamw_state_dict_loads_into_paged_adamw():
    """The state names and the fp32 step counter are torch's, so a torch.optim.AdamW checkpoint resumes here."""
    params = make_params()
    ref = torch.optim.AdamW(groups(params), foreach=False, **HYPER)
    run(ref, params, grads_for(params, 2))
    opt = PagedAdamW(groups([nn.Parameter(p.detach().clone()) for p in params]), min_paged_size=THRESHOLD)
    opt.load_state_dict(state_roundtrip(ref))
    assert opt.param_groups[0]["lr"] == HYPER["lr"]


def test_bad_arguments_raise_clear_errors():
    p = [nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match="state_home"):
        PagedAdamW(p, state_home="disk")
    with pytest.raises(ValueError, match="min_paged_size"):
        PagedAdamW(p, min_paged_size=-1)
    with pytest.raises(ValueError, match="lr"):
        PagedAdamW(p, lr=float("nan"))
    with pytest.raises(ValueError, match="betas"):
        PagedAdamW(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="weight_decay"):
        PagedAdamW([{"params": p, "weight_decay": -1.0}])
    with pytest.raises(TypeError, match="fp32/bf16/fp16"):
        PagedAdamW([nn.Parameter(torch.zeros(3, dtype=torch.float64))])
    with pytest.raises(ValueError, match="unified"):
        PagedAdamW([nn.Parameter(torch.empty(4, device="meta"))], state_home="unified", min_paged_size=0)
    emb = nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    opt = PagedAdamW(emb.parameters())
    with pytest.raises(TypeError, match="sparse"):
        opt.step()


def test_factory_builds_each_named_optimizer():
    from finetune_ref.optim.adamw import AdamW8bit, PagedAdamW8bit
    from finetune_ref.optim.optimizers import OPTIMIZER_NAMES, build_optimizer
    from finetune_ref.recipes.lora import LoraRecipe
    from finetune_ref.recipes.qlora import QLoraRecipe

    expected = {"adamw": torch.optim.AdamW, "paged_adamw": PagedAdamW, "adamw8bit": AdamW8bit,
                "paged_adamw8bit": PagedAdamW8bit}
    assert OPTIMIZER_NAMES == tuple(expected)
    for name, cls in expected.items():
        params = make_params()
        opt = build_optimizer(name, groups(params), lr=2e-4, betas=(0.9, 0.95), eps=1e-6)
        assert type(opt) is cls
        assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # the groups' own values win
        assert opt.param_groups[0]["lr"] == 2e-4 and opt.param_groups[0]["betas"] == (0.9, 0.95)
    assert build_optimizer("paged_adamw", make_params(), lr=1e-3).state_home == "host"
    assert build_optimizer("adamw8bit", make_params(), lr=1e-3).state_home == "device"
    opt = build_optimizer("paged_adamw8bit", (p for p in make_params()), lr=1e-3, min_paged_size=10, rounding="lut",
                          min_8bit_size=1000)
    assert (opt.pager.min_paged_size, opt.rounding, opt.min_8bit_size) == (10, "lut", 1000)
    assert type(build_optimizer("adamw", make_params(torch.bfloat16), lr=1e-3)) is MasterWeightAdamW
    assert QLoraRecipe().optimizer == "paged_adamw" and LoraRecipe().optimizer == "adamw"  # the defaults
    with pytest.raises(ValueError, match="paged_adamw8bit"):
        build_optimizer("sgd", make_params(), lr=1e-3)
    with pytest.raises(TypeError, match="rounding"):
        build_optimizer("paged_adamw", make_params(), lr=1e-3, rounding="lut")
    with pytest.raises(TypeError, match="list"):
        build_optimizer("adamw", make_params()[0], lr=1e-3)


def test_add_param_group_checks_the_new_group():
    opt = PagedAdamW(make_params()[:1])
    with pytest.raises(TypeError, match="fp32/bf16/fp16"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, dtype=torch.float64))]})
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "lr": -1.0})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "betas": [0.5, 0.6]})
    assert opt.param_groups[1]["betas"] == (0.5, 0.6)
