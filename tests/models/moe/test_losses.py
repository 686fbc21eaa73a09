"""Global-batch load balancing: expert fractions counted over every data-parallel rank."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moetool.models.moe.losses import expert_fractions, load_balancing_loss, router_losses

E = 4


def _logits(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(rank)
    logits = torch.randn(10 + 6 * rank, E, generator=g)
    logits[:, rank] += 3.0  # each rank's tokens prefer their own expert
    return logits


def _reference(rank: int) -> float:
    """Plain form: f over the concatenated tokens of both ranks, P over this rank's."""
    everyone = torch.cat([_logits(0), _logits(1)])
    top1 = everyone.argmax(-1)
    f = torch.tensor([(top1 == i).float().mean().item() for i in range(E)])
    probs = torch.softmax(_logits(rank), -1)
    return float(E * (f * probs.mean(0)).sum())


def _worker(rank: int, init_file: str, out: dict):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        logits = _logits(rank)
        probs = torch.softmax(logits, -1)
        top1 = probs.argmax(-1, keepdim=True)
        out[rank] = (
            load_balancing_loss(probs, top1, global_batch=True).item(),
            load_balancing_loss(probs, top1).item(),
            router_losses([logits], global_batch=True)[0].item(),
        )
    finally:
        dist.destroy_process_group()


def test_global_batch_fractions_equal_the_fractions_of_all_ranks_tokens(tmp_path):
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(str(tmp_path / "init"), out), nprocs=2, join=True)
    for rank in (0, 1):
        global_aux, local_aux, from_logits = out[rank]
        assert abs(global_aux - _reference(rank)) < 1e-6
        assert abs(from_logits - global_aux) < 1e-6
        assert abs(local_aux - global_aux) > 1e-3  # the scope makes a difference here


def test_global_batch_without_a_process_group_is_the_micro_batch():
    assert not dist.is_initialized()
    top1 = torch.tensor([0, 0, 1, 3])
    torch.testing.assert_close(
        expert_fractions(top1, E, global_batch=True), torch.tensor([0.5, 0.25, 0.0, 0.25])
    )


def test_the_model_passes_its_balance_scope_to_the_loss(monkeypatch, tmp_path):
    """A sparse model with balance_scope = "global-batch" all-reduces its counts (another rank
    stood in by a patched all-reduce); the default does not."""
    from moetool.models.build import save_checkpoint
    from moetool.models.moe.config import MoEConfig
    from moetool.recipe import load_recipe
    from moetool.recipe.paths import recipes_root
    from moetool.tiny import build_random_lvlm
    from moetool.upcycle import upcycle_checkpoint

    model, processor = build_random_lvlm(load_recipe(recipes_root() / "tiny/llama.toml"), seed=0)
    save_checkpoint(model, processor, tmp_path / "dense")
    from transformers import AutoModelForImageTextToText

    import moetool  # noqa: F401

    reduced = []

    def all_reduce(tensor, *args, **kwargs):
        reduced.append(tensor.clone())
        tensor += torch.tensor([1000.0, 0.0, 0.0, 0.0])  # another rank's tokens, all to 0

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    ids = torch.randint(20, 500, (2, 12))
    losses = {}
    for scope in ("micro-batch", "global-batch"):
        upcycle_checkpoint(
            tmp_path / "dense",
            tmp_path / scope,
            MoEConfig(balance_scope=scope, router_std=1.0),
        )
        sparse = AutoModelForImageTextToText.from_pretrained(tmp_path / scope)
        with torch.no_grad():
            losses[scope] = sparse(input_ids=ids, router_losses=True).aux_loss
        assert len(reduced) == (0 if scope == "micro-batch" else 2)  # one per MoE layer
    assert not torch.allclose(losses["micro-batch"], losses["global-batch"])
