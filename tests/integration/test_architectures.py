"""The model families researchers bring, not only Llama: GPT-2 (tied head, Conv1D layers, no
padding token), Qwen2 and Qwen3, Mistral, Gemma-2 (soft-capped logits, no sdpa), Gemma-3, Phi-3,
GPT-NeoX (Pythia), OPT, OLMo-2 and the mixtures of experts Mixtral and Qwen3-MoE, each a tiny
random model saved to a folder and loaded by path.

For each: the completion log-probs and their gradients equal a float64 log-softmax over the full
logits (the split head where the logits are a plain ``lm_head(h)``, the full logits elsewhere);
the padding-free check says yes exactly where packed rows do score as padded ones; and a DPO run
trains through DeepSpeed, starting at ln 2, and saves a model that loads again.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import run_config
from test_training import scalars
from dpo_hpc.algorithms.logprobs import CompletionScorer, sequence_logps
from dpo_hpc.config import ConfigError, validate_mapping
from dpo_hpc.data.collate import TokenizedPair, collate_pairs
from dpo_hpc.tiny_model import build_byte_tokenizer

pytestmark = pytest.mark.slow

SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
FAMILIES = {  # model_type -> config, tiny
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=256),
    "qwen2": dict(SHAPE, num_key_value_heads=2),
    "qwen3": dict(SHAPE, num_key_value_heads=2, head_dim=8),
    "mistral": dict(SHAPE, num_key_value_heads=2),
    "gemma2": dict(SHAPE, num_key_value_heads=2, head_dim=8),
    "phi3": dict(SHAPE, num_key_value_heads=4),
    "gpt_neox": dict(SHAPE),
    "opt": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32),
    "gemma3_text": dict(SHAPE, num_key_value_heads=2, head_dim=8),
    "qwen3_moe": dict(SHAPE, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=32),
    "mixtral": dict(SHAPE, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "olmo2": dict(SHAPE, num_key_value_heads=2),
}
SPLIT_HEAD = set(FAMILIES) - {"gemma2"}  # Gemma-2 soft-caps its logits: the full head is kept
EAGER_ONLY = {"gemma2"}  # no sdpa path in transformers
PACKED_ROWS_LEAK = {"opt"}  # its sdpa attention ignores restarting position ids (transformers 5.25)


@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> dict[str, Path]:
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("families")
    tokenizer = build_byte_tokenizer()
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    folders = {}
    for family, shape in FAMILIES.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **shape, **ids))
        folders[family] = root / family
        model.save_pretrained(folders[family])
        if family == "gpt2":  # GPT-2's tokenizer has no padding token
            tokenizer.pad_token = None
        tokenizer.save_pretrained(folders[family])
    return folders


def attention(family: str) -> str:
    return "eager" if family in EAGER_ONLY else "sdpa"


def load(folder: Path, family: str):
    from dpo_hpc.trainers.engine import load_causal_lm

    return load_causal_lm(str(folder), "fp32", trainable=True, attn_implementation=attention(family))


def random_batch(seed: int, count: int, layout: str = "padded") -> dict:
    g = torch.Generator().manual_seed(seed)
    pairs = [TokenizedPair(*(torch.randint(3, 250, (int(k),), generator=g).tolist() for k in lengths))
             for lengths in torch.randint(1, 12, (count, 3), generator=g)]
    return collate_pairs(pairs, pad_id=0, layout=layout)


@pytest.mark.parametrize("family", FAMILIES)
def test_log_probs_and_gradients_equal_a_float64_log_softmax(family_models, family):
    model = load(family_models[family], family)
    scorer = CompletionScorer(chunk_rows=5)
    assert (scorer.splittable_head(model) is not None) == (family in SPLIT_HEAD)
    batch = random_batch(1, 4)
    params = [p for p in model.parameters() if p.requires_grad]
    ours = scorer.sequence_logps(model, batch)
    our_grads = torch.autograd.grad(ours.sum(), params)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    exact = sequence_logps(logits, batch["input_ids"], batch["loss_mask"]).double()
    exact_grads = torch.autograd.grad(exact.sum(), params)
    torch.testing.assert_close(ours.double(), exact, rtol=0, atol=1e-5)
    for a, b in zip(our_grads, exact_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_padding_free_check_says_yes_exactly_where_packed_rows_score_as_padded(family_models, family):
    from dpo_hpc.trainers.engine import check_packing

    model = load(family_models[family], family)
    scorer = CompletionScorer()
    with torch.no_grad():
        padded = scorer.sequence_logps(model, random_batch(2, 6))
        packed = scorer.sequence_logps(model, random_batch(2, 6, layout="packed"))
    kept_apart = torch.allclose(packed, padded, rtol=0, atol=1e-4)
    if kept_apart:
        check_packing(model)
    else:
        with pytest.raises(ConfigError, match=r"padding_free: .* lets packed sequences attend to each other"):
            check_packing(model)
    assert kept_apart == (family not in PACKED_ROWS_LEAK)


@pytest.mark.parametrize("family", FAMILIES)
def test_dpo_trains_each_family_and_saves_a_model_that_loads(tmp_path, family_models, reverse_data, family):
    from transformers import AutoModelForCausalLM

    from dpo_hpc.trainers.trainer import train

    raw = run_config(tmp_path, family_models[family], reverse_data, "dpo_training", learning_rate=1e-3,
                     max_steps=2, batch_size=4)
    raw["attn_implementation"] = attention(family)
    summary = train(validate_mapping(raw, "dpo"), "dpo")
    assert summary["status"] == "completed"
    run = Path(raw["dpo_training"]["save_dir"])
    logged = scalars(run / "tensorboard")
    losses = [v for _, v in logged["loss"]]
    # a mixture of experts adds its router loss with its config's weight, as TRL 1.16 does
    router = family_models[family].joinpath("config.json").read_text().count('"output_router_logits"')
    assert ("aux_loss" in logged) == bool(router)
    router_term = json.loads((family_models[family] / "config.json").read_text())["router_aux_loss_coef"] * \
        logged["aux_loss"][0][1] if router else 0.0
    assert len(losses) == 2 and losses[0] == pytest.approx(math.log(2) + router_term, abs=1e-6)
    saved = AutoModelForCausalLM.from_pretrained(run, attn_implementation=attention(family))
    assert type(saved).__name__ == type(load(family_models[family], family)).__name__


def test_a_model_without_sdpa_is_told_which_attn_implementation_to_set(family_models):
    from dpo_hpc.trainers.engine import load_causal_lm

    with pytest.raises(ConfigError, match=r"attn_implementation = 'sdpa': Gemma2ForCausalLM does not support it; "
                                          r"set attn_implementation = \"eager\""):
        load_causal_lm(str(family_models["gemma2"]), "fp32", trainable=True)


def test_pre_flight_refuses_a_model_without_the_attention_it_is_given(tmp_path, family_models, reverse_data):
    """Before a job waits in the queue: the policy is built on the meta device with the config's
    attn_implementation."""
    from test_commands import dpo_hpc

    for attention, code in (("sdpa", 2), ("eager", 0)):
        config = tmp_path / f"{attention}.yaml"
        config.write_text(f"policy_name: {family_models['gemma2']}\nattn_implementation: {attention}\n"
                          f"dataset: {{dataset_name: {reverse_data}}}\n"
                          f"dpo_training: {{learning_rate: 1.0e-6, batch_size: 2, save_dir: {tmp_path}/run}}\n")
        result = dpo_hpc(tmp_path, "validate", str(config))
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == code and "Traceback" not in result.stderr, result.stderr[-2000:]
        if code:
            assert errors == [f"error: {config}: attn_implementation = 'sdpa': Gemma2ForCausalLM does not support it; "
                              "set attn_implementation = \"eager\", which every model supports"], errors


MIXTURES = {"mixtral": ("num_local_experts", "num_experts_per_tok"), "qwen3_moe": ("num_experts", "num_experts_per_tok")}


def naive_router_loss(router_logits, attention_mask, experts: int, top_k: int) -> torch.Tensor:
    """Switch Transformer's load-balancing loss over every layer's router, on the real tokens only:
    experts x sum over experts of (share of the tokens' top-k choices that go to it, one share per
    k) x (its mean router probability)."""
    real = attention_mask.reshape(-1).bool()
    logits = torch.cat([layer[real] for layer in router_logits]).detach().double()  # (tokens x layers, experts)
    probs = logits.softmax(-1)
    chosen = torch.zeros(logits.shape[0], top_k, experts, dtype=torch.float64)
    chosen.scatter_(2, probs.topk(top_k, dim=-1).indices.unsqueeze(-1), 1.0)
    return experts * (chosen.mean(0) * probs.mean(0)).sum()


@pytest.mark.parametrize("family", MIXTURES)
def test_router_aux_loss_is_added_to_the_loss_of_each_pair_and_trains_the_router(tmp_path, family_models,
                                                                                reverse_data, family):
    """``router_aux_loss_coef``: the objective's loss is the pairwise loss plus coef x the router's
    load-balancing loss (equal to a naive one), with gradient into the routers; a run logs it as
    ``aux_loss``, starting at ln 2 + coef x aux_loss; 0 turns it off. (Left out, the model config's
    weight applies: the test of every family above.)"""
    from dpo_hpc.algorithms.beta.fixed import FixedBeta
    from dpo_hpc.algorithms.losses import Sigmoid
    from dpo_hpc.algorithms.objectives import PreferenceObjective, SFTObjective
    from dpo_hpc.data.collate import collate_conversations
    from dpo_hpc.data.tokenize import TokenizedConversation
    from dpo_hpc.runtime import init_distributed
    from dpo_hpc.trainers.engine import load_causal_lm, router_loss_weight
    from dpo_hpc.trainers.trainer import train

    coef = 0.25
    model = load_causal_lm(str(family_models[family]), "fp32", trainable=True)
    assert router_loss_weight(model, coef) == coef
    batch = random_batch(3, 4)
    batch["ref_logps"] = torch.zeros(8)
    objective = PreferenceObjective(None, Sigmoid(), FixedBeta(0.1), 0, init_distributed(), CompletionScorer(),
                                    router_aux_loss_coef=coef)
    plain = PreferenceObjective(None, Sigmoid(), FixedBeta(0.1), 0, init_distributed(), CompletionScorer())
    loss, stats = objective.loss_and_stats(model, batch)
    pairwise, _ = plain.loss_and_stats(model, batch)
    forward = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
    experts, top_k = (getattr(model.config, key) for key in MIXTURES[family])
    aux = naive_router_loss(forward.router_logits, batch["attention_mask"], experts, top_k)
    assert aux > 0
    torch.testing.assert_close(stats["aux_loss"][0].double(), aux, rtol=1e-5, atol=0)
    torch.testing.assert_close(loss.double(), pairwise.double() + coef * aux * 4, rtol=1e-5, atol=0)
    assert stats["loss"][0] / stats["loss"][1] == pytest.approx(float(pairwise.detach() / 4 + coef * aux), rel=1e-5)
    routers = [p for name, p in model.named_parameters() if "gate" in name and "proj" not in name]
    assert routers and all(g.abs().sum() > 0 for g in torch.autograd.grad(loss, routers))
    sft_batch = collate_conversations([TokenizedConversation([1, 7, 8, 9, 2], [0, 0, 1, 1, 1]),
                                       TokenizedConversation([1, 5, 6, 2], [0, 1, 1, 1])], pad_id=0)
    sft_loss, sft_stats = SFTObjective(0, CompletionScorer(), router_aux_loss_coef=coef).loss_and_stats(model, sft_batch)
    nll, _ = SFTObjective(0, CompletionScorer()).loss_and_stats(model, sft_batch)
    forward = model(input_ids=sft_batch["input_ids"], attention_mask=sft_batch["attention_mask"],
                    output_router_logits=True)
    aux = naive_router_loss(forward.router_logits, sft_batch["attention_mask"], experts, top_k)
    torch.testing.assert_close(sft_loss.double(), nll.double() + coef * aux * 6, rtol=1e-5, atol=0)  # 6 tokens

    for name, weight in (("set", coef), ("off", 0.0)):
        raw = run_config(tmp_path / name, family_models[family], reverse_data, "dpo_training", max_steps=2,
                         batch_size=4)
        raw["router_aux_loss_coef"] = weight
        train(validate_mapping(raw, "dpo"), "dpo")
        logged = scalars(Path(raw["dpo_training"]["save_dir"]) / "tensorboard")
        if not weight:  # 0 turns it off: no router loss in the loss or the logs
            assert "aux_loss" not in logged and logged["loss"][0][1] == pytest.approx(math.log(2), abs=1e-6)
            continue
        (step, first_aux), _ = logged["aux_loss"]
        assert step == 1 and first_aux > 0
        assert logged["loss"][0][1] == pytest.approx(math.log(2) + coef * first_aux, abs=1e-6)


def test_router_aux_loss_on_a_dense_model_is_refused_before_the_queue(tmp_path, family_models, reverse_data):
    from test_commands import dpo_hpc

    config = tmp_path / "dense.yaml"
    config.write_text(f"policy_name: {family_models['qwen3']}\nrouter_aux_loss_coef: 0.02\n"
                      f"dataset: {{dataset_name: {reverse_data}}}\n"
                      f"dpo_training: {{learning_rate: 1.0e-6, batch_size: 2, save_dir: {tmp_path}/run}}\n")
    result = dpo_hpc(tmp_path, "validate", str(config))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and errors == [
        f"error: {config}: router_aux_loss_coef = 0.02: Qwen3ForCausalLM has no router (it is not a mixture of "
        "experts); leave the key out"], result.stderr[-2000:]
