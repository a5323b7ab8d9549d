"""Sampling and optimization under torchrun: 2 CPU processes (gloo) against one process drawing
the same per-rank streams (one torchrun launch, tests/dist_worker.py, serves every test)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import optidiff as od
from optidiff import rng
from optidiff.distributed import rank_seed, shard
from optidiff.optimize import DSMFinetune, Objective, make_guidance
from optidiff.optimize.delivered import delivered_fraction

_spec = importlib.util.spec_from_file_location("dist_worker", Path(__file__).with_name("dist_worker.py"))
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)  # the worker's settings, shared with the emulations below
WORLD = 2


def test_shards_cover_the_batch_in_order():
    for n, world in ((7, 2), (8, 4), (5, 3), (3, 3)):
        parts = [shard(n, r, world) for r in range(world)]
        assert [i for s in parts for i in range(n)[s]] == list(range(n))
        assert max(s.stop - s.start for s in parts) - min(s.stop - s.start for s in parts) <= 1


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the 2 ranks returned, and the run directories (written by rank 0)."""
    out = tmp_path_factory.mktemp("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(Path(__file__).with_name("dist_worker.py")),
                           str(out)], env=env, capture_output=True, text=True, timeout=180,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = [{**load_file(out / f"rank{r}.safetensors"),
            **json.loads((out / f"rank{r}.json").read_text())} for r in (0, 1)]
    return got, out


def test_sample_under_torchrun_equals_one_process_with_the_same_streams(ranks):
    model = W.mlp().eval()
    ddpm = torch.cat([od.sample(model, W.SIGMAS, batch_size=n, sampler="ddpm",
                                seed=rank_seed(3, r), progress=False)
                      for r, n in enumerate((4, 3))])
    x_init = torch.randn(5, 3, generator=torch.Generator().manual_seed(9)) * 10
    ge = torch.cat([od.sample(model, W.SIGMAS, x_init=x_init[shard(5, r, 2)], sampler="ge",
                              seed=rank_seed(0, r), progress=False) for r in (0, 1)])
    for got in ranks[0]:  # every rank returns the gathered batch
        assert torch.equal(got["ddpm"], ddpm) and torch.equal(got["x_init"], ge)
        assert got["refused"].item() == 1  # a generator cannot be shared out by rank
    assert not torch.equal(ddpm[:3], ddpm[4:])  # the two ranks drew different streams


# ------------------------------------------------------------------ one-process emulation


def _dsm_step(net, opt, ft, data, weights, gens):
    """One DistributedDataParallel step of DSMFinetune on one process: rank r's minibatch loss
    from its own stream, the gradients averaged over the ranks (DDP's mean), one Adam step.
    Returns the whole minibatch's mean loss."""
    params = list(net.parameters())
    losses, grads = [], []
    for r, gen in enumerate(gens):
        rows = shard(len(data), r, WORLD)
        loss = ft.loss(net, data, weights, rows.stop - rows.start, gen)
        grads.append(torch.autograd.grad(loss, params))
        losses.append(loss.detach() * ((rows.stop - rows.start) / len(data)))
    for p, *gs in zip(params, *grads):
        p.grad = sum(g * (1 / WORLD) for g in gs)
    opt.step()
    return torch.stack(losses).sum().item()


def _emulate(model, *, rounds, batch_size, seed, increment=None, target=None,
             gradient_at="sample", steps_per_round=None):
    """Algorithm 1 (Algorithm 2 with ``steps_per_round``: DSM fine-tuning on the rounds so far)
    written out on one process with rank r's stream rank_seed(seed, r) for rows shard(B, r, 2):
    (samples of every round, history records)."""
    gens = [rng.generator(rank_seed(seed, r)) for r in range(WORLD)]
    parts = [shard(batch_size, r, WORLD) for r in range(WORLD)]
    obj = Objective(W.objective)
    beta = None
    if steps_per_round:
        ft = DSMFinetune(lr=1e-3, steps=steps_per_round, sigmas=W.SIGMAS[W.SIGMAS > 0])
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
        beta, buffer = "official", []

    def draw(guids):
        return torch.cat([od.sample(model, W.SIGMAS, batch_size=p.stop - p.start, guidance=gd,
                                    generator=gen, sampler="ddpm", progress=False)
                          for p, gd, gen in zip(parts, guids, gens)])

    def scored(z, y, extra):
        rewards = torch.cat([obj.value(z[p]) for p in parts])  # each rank scores its shard
        at_mean = obj.value(z.mean(0, keepdim=True))[0] if gradient_at == "mean" else None
        rec = {"reward_mean": rewards.mean().item(), "reward_max": rewards.max().item(),
               "reward_top_k": rewards.topk(4).values.mean().item(),
               "reward_at_mean": None if at_mean is None else at_mean.item(),
               "target_mean": None if y is None else y.mean().item(), **obj.queries, **extra}
        return at_mean, rec

    zs = [draw([None] * WORLD)]
    at_mean, rec = scored(zs[0], None, {})
    history = [rec]
    for _ in range(rounds):
        z = zs[-1]
        if gradient_at == "sample":  # y_i = g_iᵀz_i + δ, g_i = ∇f(z_i) on each rank's rows
            g = torch.cat([obj.grad(z[p]) for p in parts])
            y = (g * z).sum(1) + increment
            guids = [make_guidance("lookahead", g[p], y[p], beta=beta) for p in parts]
        else:  # at the batch mean: y = y* − f(z̄) + gᵀz̄
            zbar = z.mean(0, keepdim=True)
            g = obj.grad(zbar)
            y = (target - at_mean + (g * zbar).sum(1))[0]
            g = g[0]
            guids = [make_guidance("lookahead", g, y, beta=beta)] * WORLD
        extra = {}
        if steps_per_round:
            buffer.append(z)
            data = torch.cat(buffer)
            # round j weighted ∝ 0.9^(k − j), the default replay_decay for a network
            per_round = torch.tensor([0.9 ** (len(buffer) - 1 - j) for j in range(len(buffer))],
                                     dtype=torch.float64)
            weights = (per_round / per_round.sum() / batch_size).repeat_interleave(batch_size)
            model.train()
            for _ in range(steps_per_round):
                extra["finetune_loss"] = _dsm_step(model, opt, ft, data, weights, gens)
        zs.append(draw(guids))
        at_mean, rec = scored(zs[-1], y, extra)
        rec["delivered_fraction"] = delivered_fraction(g, y, zs[-1], zs[0])
        history.append(rec)
    return zs, history


def _same_history(got, want):
    assert len(got) == len(want)
    for rec, ref in zip(got, want):
        assert {k: rec[k] for k in ref} == ref


def test_gradient_guided_under_torchrun_equals_one_process_with_the_same_streams(ranks):
    got, out = ranks
    for name, kw in W.GG.items():
        zs, history = _emulate(W.gaussian(), **kw)
        for rank in got:  # every rank holds the gathered samples and the same record
            assert torch.equal(rank[f"gg_{name}.samples"], zs[-1])
            _same_history(rank["histories"][f"gg_{name}"], history)
            assert rank["histories"][f"gg_{name}"] == got[0]["histories"][f"gg_{name}"]
        for k, z in enumerate(zs):  # rank 0 saved the whole batch of every round
            saved = load_file(out / f"gg_{name}" / "samples" / f"round_{k:05d}.safetensors")
            assert torch.equal(saved["samples"], z)
        best = torch.cat(zs)[W.objective(torch.cat(zs)).topk(4).indices]
        assert torch.equal(got[0][f"gg_{name}.best"], best)
        assert got[0][f"gg_{name}.best"].shape == got[1][f"gg_{name}.best"].shape
    assert not torch.equal(zs[0][:3], zs[0][3:])  # the two ranks drew different streams
    # per-sample gradients: B queries a round; at the mean: one (by rank 0 only)
    assert got[0]["histories"]["gg_sample"][-1]["grad_queries"] == 3 * 7
    assert got[0]["histories"]["gg_mean"][-1]["grad_queries"] == 2
    assert got[0]["gg_refused"].item() == 1  # a shared generator is refused under torchrun


def test_resumed_run_under_torchrun_continues_and_only_rank_0_writes(ranks):
    got, _ = ranks
    for rank in got:
        assert torch.equal(rank["resumed.samples"], rank["gg_sample.samples"])
        assert rank["histories"]["resumed"] == rank["histories"]["gg_sample"]
    assert got[0]["writes"]["save_state"] > 0 and got[0]["writes"]["save_tensors"] > 0
    assert sum(got[1]["writes"].values()) == 0


def test_adaptive_under_torchrun_fine_tunes_with_ddp_as_one_process(ranks):
    got, _ = ranks
    net = W.mlp()
    zs, history = _emulate(net, **W.AD)
    for rank in got:
        assert torch.equal(rank["adaptive.samples"], zs[-1])
        _same_history(rank["histories"]["adaptive"], history)
    weights = [{k[len("adaptive.weights."):]: v for k, v in rank.items()
                if k.startswith("adaptive.weights.")} for rank in got]
    want = net.state_dict()
    assert set(weights[0]) == set(want)
    for k in want:  # both ranks hold the same fine-tuned weights, those of the emulation
        assert torch.equal(weights[0][k], weights[1][k]) and torch.equal(weights[0][k], want[k])
    init = W.mlp().state_dict()
    assert any(not torch.equal(want[k], init[k]) for k in want)  # fine-tuning moved them
