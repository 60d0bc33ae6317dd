"""RoutingStats, the one routing counter: what a training step and an inference step record equals a
direct count (Mixtral's top-k of the router logits, real tokens only) of the forwards they ran."""
import torch

from conftest import tiny_args
from epkit import Mixtral
from epkit.infer import LLM, SamplingParams
from epkit.moe import load_balancing_loss

torch.set_num_threads(1)


def _model(**overrides):
    model = Mixtral(tiny_args(**overrides)).init_weights(seed=1, router_std=0.5)
    return model


def _record_forwards(model):
    """Every forward's (positions or None, router logits per layer), via a forward hook."""
    seen = []

    def hook(module, args, kwargs, out):
        positions = args[1] if len(args) > 1 else kwargs.get("positions")
        seen.append((positions, [r.detach() for r in out.router_logits]))
    model.register_forward_hook(hook, with_kwargs=True)
    return seen


def _direct_count(forwards, num_layers, num_experts, k):
    counts = torch.zeros(num_layers, num_experts, dtype=torch.int64)
    for positions, router_logits in forwards:
        for layer, logits in enumerate(router_logits):
            real = torch.ones(logits.shape[0], dtype=torch.bool) if positions is None else positions.reshape(-1) >= 0
            ids = torch.topk(torch.softmax(logits[real].float(), -1), k, dim=-1).indices
            counts[layer] += torch.bincount(ids.reshape(-1), minlength=num_experts)
    return counts


def test_training_step_counts_real_tokens_once():
    """Activation checkpointing runs each layer twice; padding (position -1) is not routed work."""
    from epkit.train.loop import lm_and_router_losses
    model = _model().train()
    model.activation_checkpointing = True
    args = model.args
    forwards = _record_forwards(model)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, args.vocab_size, (3, 10), generator=g)
    positions = torch.arange(10).expand(3, 10).clone()
    positions[2, 6:] = -1  # a packed row's padded tail
    labels = torch.where(positions >= 0, tokens, -100)
    batch = {"tokens": tokens, "labels": labels, "positions": positions}
    loss, _ = lm_and_router_losses(model, batch, aux_coef=0.02, z_coef=0.0)
    loss.backward()
    lm_and_router_losses(model, batch, 0.0, 0.0, count_routing=False)  # e.g. evaluation: not counted
    counts = model.routing_stats.counts()
    assert torch.equal(counts, _direct_count(forwards[:1], args.num_layers, args.num_experts, args.experts_per_token))
    assert counts.sum() == 2 * args.num_layers * (3 * 10 - 4)
    # the aux loss reuses the routed ids and equals the loss computed from the logits alone
    out = model(tokens, positions, count_routing=False)
    torch.testing.assert_close(
        load_balancing_loss(out.router_logits, args.num_experts, 2, positions >= 0, expert_ids=out.expert_ids),
        load_balancing_loss(out.router_logits, args.num_experts, 2, positions >= 0))


def test_inference_steps_count_what_the_forwards_routed():
    """Chunked prefill and decode batches pad rows (position -1); the load report counts real tokens.
    Decode steps run Mixtral.forward here ("reference"), so a hook sees every forward; the engine's own
    decode forward (epkit/infer/decode.py) must then report the same counts."""
    model = _model().eval()
    args = model.args
    llm = LLM.from_model(model, block_size=4, max_num_batched_tokens=16, decode_kernels="reference")
    llm.runner.merge_tokens = 0  # batch by batch: each is a Mixtral.forward the hook sees
    forwards = _record_forwards(model)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, args.vocab_size, (n,), generator=g).tolist() for n in (2, 9, 5, 6, 3)]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert any((p < 0).any() for p, _ in forwards), "the test needs padded rows"
    direct = _direct_count(forwards, args.num_layers, args.num_experts, args.experts_per_token)
    assert llm.expert_load()["per_expert"] == direct.tolist()
    assert direct.sum() == 2 * args.num_layers * (2 + 9 + 5 + 6 + 3 + 5 * 3)  # prompts + all but the last new token
    fused = LLM.from_model(model, block_size=4, max_num_batched_tokens=16)
    assert fused.runner.decode is not None and fused.runner.merge_tokens > 0
    merged, forward_segments = [], model.forward_segments
    model.forward_segments = lambda segments: merged.append(len(segments)) or forward_segments(segments)
    fused.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    del model.forward_segments
    assert merged, "the steps that mix decode rows and prompt chunks should have run as one forward"
    assert fused.expert_load()["per_expert"] == direct.tolist()  # merged forwards count as the separate ones
