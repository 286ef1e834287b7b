"""An in-process rollout engine on a transformers model: the engine of the CPU example and of the tests.

It is deliberately plain but exact: all prompts x n samples are generated together (sorted by prompt
length and cut into micro-batches of at most max_batch_tokens), left-padded with explicit position ids,
decoding one token per step through the model's KV cache, and rows that have stopped are dropped from the
batch (and from the cache) as soon as they stop. As with SGLang's prefix cache, the prefill is shared: each
distinct prompt of a micro-batch is prefilled once, and its KV cache, last logits and routes are copied to
its n sample rows. Log-probs, finish reasons and MoE routed experts follow the conventions of `Completion`,
so the trainer can replay them without caring which engine produced them.

Weights may be updated from another thread while generate runs (async partial rollouts): the update waits
for the next token boundary, where the generating thread applies it; generation then goes on under the new
weights with the KV cache it has (like SGLang's in-place pause), and `token_versions` records the version
of the forward that sampled each token (and produced its routes).
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache

from grpo_megatron.rollout.engines.base import Completion, RolloutEngine, SamplingParams
from grpo_megatron.rollout.engines.hf_layout import CheckpointLayout
from grpo_megatron.rollout.engines.sampling import sample_next_tokens

PositionalSampler = Callable[[torch.Tensor, SamplingParams, torch.Generator, torch.Tensor],
                             tuple[torch.Tensor, torch.Tensor]]
"""(logits [B, V], params, generator, positions [B]) -> (tokens [B], log-probs [B])."""


class EmbeddedEngine(RolloutEngine):
    """Generate with a transformers AutoModelForCausalLM held in this process.

    hf_path_or_config: an HF checkpoint directory (config + safetensors), or a config to build with random
    weights (seeded by `seed`) that update_weights then replaces. `seed` also seeds the sampler used when
    SamplingParams.seed is None. `sampler` replaces the sampling step (a server's own sampler, as a test's
    stand-in server does for SGLang's seeded one); it also gets each row's position. The logits are computed as the decoder's last hidden state through the
    output embedding, which is what the CausalLM heads of llama/qwen2/qwen3/qwen3_moe/mixtral do.
    """

    def __init__(
        self,
        hf_path_or_config: str | Path | transformers.PretrainedConfig,
        dtype: torch.dtype = torch.float32,
        max_batch_tokens: int = 16384,
        seed: int = 0,
        device: str | torch.device = "cpu",
        sampler: PositionalSampler | None = None,
    ):
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens={max_batch_tokens}: must be >= 1")
        self._model = _build_model(hf_path_or_config, dtype, seed).to(device).eval()
        self._device = torch.device(device)
        self._layout = CheckpointLayout(self._model)
        config = self._model.config
        self._vocab_size = config.vocab_size
        self._pad_id = config.pad_token_id if config.pad_token_id is not None else 0
        self._eos_ids = _eos_token_ids(self._model)
        self._moe_top_k = getattr(config, "num_experts_per_tok", None)
        self._max_batch_tokens = max_batch_tokens
        self._sampler = sampler
        self._generator = torch.Generator(self._device).manual_seed(seed)
        self._version = 0
        self._alive = True
        self._updates = threading.Lock()  # guards the two fields below
        self._generating = 0  # generate calls running
        self._pending: list[tuple[list, int, threading.Event, list]] = []  # (tensors, version, done, error)

    @property
    def weight_version(self) -> int:
        return self._version

    @property
    def expected_weight_shapes(self) -> dict[str, torch.Size]:
        """HF checkpoint name -> shape of every tensor update_weights expects."""
        return self._layout.expected_shapes

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load now, or, while another thread generates, at its next token boundary (and wait for that)."""
        self._check_alive()
        with self._updates:
            if not self._generating:
                self._layout.load(named_tensors)
                self._version = version
                return
            update = (list(named_tensors), version, threading.Event(), [])
            self._pending.append(update)
        update[2].wait()
        if update[3]:
            raise update[3][0]

    def _apply_pending(self) -> None:
        """On the generating thread, between two tokens: the updates other threads asked for, in order."""
        with self._updates:
            pending, self._pending = self._pending, []
        for tensors, version, done, error in pending:
            try:
                self._layout.load(tensors)
                self._version = version
            except Exception as err:  # re-raised in update_weights' thread
                error.append(err)
            done.set()

    def shutdown(self) -> None:
        self._alive = False
        self._model = None
        self._layout = None

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, return_routed_experts: bool = False
    ) -> list[list[Completion]]:
        self._check_alive()
        params.validate()
        self._check_prompts(prompts)
        if return_routed_experts and self._moe_top_k is None:
            raise ValueError("return_routed_experts=True needs a MoE model (Qwen3-MoE, Mixtral); this one is dense")
        generator = self._generator
        if params.seed is not None:
            generator = torch.Generator(self._device).manual_seed(params.seed)
        prompt_of_row = [p for p in range(len(prompts)) for _ in range(params.n)]
        rows_by_length = sorted(range(len(prompt_of_row)), key=lambda r: len(prompts[prompt_of_row[r]]))
        completions: list[Completion | None] = [None] * len(prompt_of_row)
        with self._updates:
            self._generating += 1
        try:
            with torch.inference_mode():
                for rows in self._micro_batches(rows_by_length, [len(prompts[p]) for p in prompt_of_row], params):
                    batch = [prompts[prompt_of_row[r]] for r in rows]
                    for row, completion in zip(rows, self._generate_batch(batch, params, generator,
                                                                          return_routed_experts)):
                        completions[row] = completion
        finally:
            with self._updates:
                self._generating -= 1
            self._apply_pending()  # one that arrived after the last token
        return [completions[p * params.n:(p + 1) * params.n] for p in range(len(prompts))]

    def _micro_batches(self, rows: list[int], prompt_lengths: list[int], params: SamplingParams) -> list[list[int]]:
        """Consecutive runs of `rows` whose decode size (rows x (longest prompt + new tokens)) fits the budget.

        `rows` come sorted by prompt length in groups of n rows of one prompt. A group that does not fit beside
        the rows already taken starts a new micro-batch, so that its n samples share one prefill; only a group
        too big for the budget on its own is split (each part then prefills the prompt once).
        """
        batches: list[list[int]] = []
        current: list[int] = []
        for i, row in enumerate(rows):
            adding = params.n if i % params.n == 0 else 1  # the whole group at its first row, then row by row
            width = prompt_lengths[row] + params.max_new_tokens
            if current and (len(current) + adding) * width > self._max_batch_tokens:
                batches.append(current)
                current = []
            current.append(row)
        batches.append(current)
        return batches

    def _generate_batch(
        self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator, record_routes: bool
    ) -> list[Completion]:
        # Prefill each distinct prompt once, then copy its cache, logits and mask to every row sampling it.
        distinct: dict[tuple[int, ...], int] = {}
        source = [distinct.setdefault(tuple(prompt), len(distinct)) for prompt in prompts]  # row -> distinct prompt
        batch_size, width = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.full((len(distinct), width), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(distinct), width), dtype=torch.long)
        for i, prompt in enumerate(distinct):
            input_ids[i, width - len(prompt):] = torch.tensor(prompt)
            attention_mask[i, width - len(prompt):] = 1
        input_ids, attention_mask = input_ids.to(self._device), attention_mask.to(self._device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self._model.config)
        self._apply_pending()
        logits, prefill_routes = self._forward(input_ids, attention_mask, position_ids, cache, record_routes)
        logits_version = self._version
        if len(distinct) < batch_size:
            # Index selection rather than batch_repeat_interleave(n): prompts of a micro-batch may have unequal
            # row counts (part of a split group, or a prompt given twice).
            expand = torch.tensor(source, device=self._device)
            cache.batch_select_indices(expand)
            logits, attention_mask = logits[expand], attention_mask[expand]
        next_position = attention_mask.sum(-1)

        stop_ids = torch.tensor(sorted(self._eos_ids | set(params.stop_token_ids)), device=self._device)
        active = torch.arange(batch_size, device=self._device)  # batch rows still generating
        responses: list[list[int]] = [[] for _ in range(batch_size)]
        logprobs: list[list[float]] = [[] for _ in range(batch_size)]
        versions: list[list[int]] = [[] for _ in range(batch_size)]
        stopped = [False] * batch_size
        decode_routes: list[list[torch.Tensor]] = [[] for _ in range(batch_size)]
        for step in range(params.max_new_tokens):
            if self._sampler is None:
                tokens, token_logprobs = sample_next_tokens(logits, params, generator)
            else:  # the position of the last token fed, as SGLang's sampler gets it
                tokens, token_logprobs = self._sampler(logits, params, generator, next_position - 1)
            is_stop = torch.isin(tokens, stop_ids)
            for row, token, logprob, stop in zip(active.tolist(), tokens.tolist(), token_logprobs.tolist(),
                                                 is_stop.tolist()):
                responses[row].append(token)
                logprobs[row].append(logprob)
                versions[row].append(logits_version)
                stopped[row] = stop
            keep = ~is_stop
            if step == params.max_new_tokens - 1 or not keep.any():
                break
            if not keep.all():
                cache.batch_select_indices(keep.nonzero().squeeze(-1))
                active, tokens = active[keep], tokens[keep]
                attention_mask, next_position = attention_mask[keep], next_position[keep]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(active), 1))], dim=-1)
            self._apply_pending()
            logits, routes = self._forward(tokens[:, None], attention_mask, next_position[:, None], cache,
                                           record_routes)
            logits_version = self._version
            next_position = next_position + 1
            if record_routes:
                for i, row in enumerate(active.tolist()):
                    decode_routes[row].append(routes[i])

        completions = []
        for row, prompt in enumerate(prompts):
            routed = None
            if record_routes:
                prompt_routes = prefill_routes.view(len(distinct), width, *prefill_routes.shape[1:])[
                    source[row], width - len(prompt):]
                routed = torch.cat([prompt_routes, *[r[None] for r in decode_routes[row]]]).cpu()
            completions.append(Completion(
                prompt_ids=list(prompt), response_ids=responses[row], response_logprobs=logprobs[row],
                finish_reason="stop" if stopped[row] else "length", routed_experts=routed,
                weight_version=versions[row][0], token_versions=versions[row],
            ))
        return completions

    def _forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
        cache: DynamicCache, record_routes: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Float logits [B, V] of the last position, and (when recording) experts [B*S, layers, topk] int32.

        The decoder is called directly because the CausalLM forward, asked for router logits, also computes
        a load-balancing loss that fails on a one-token step with a longer attention mask.
        """
        extra = {"output_router_logits": True} if record_routes else {}
        out = self._model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=cache, use_cache=True, **extra,
        )
        logits = self._model.get_output_embeddings()(out.last_hidden_state[:, -1]).float()
        if not record_routes:
            return logits, None
        # As the HF routers do: top-k of the float softmax of the router logits.
        routes = [torch.topk(torch.softmax(layer.float(), dim=-1), self._moe_top_k, dim=-1).indices
                  for layer in out.router_logits]
        return logits, torch.stack(routes, dim=1).to(torch.int32)

    def _check_prompts(self, prompts: list[list[int]]) -> None:
        if not prompts:
            raise ValueError("generate() got no prompts; pass a non-empty list of token-id lists")
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (e.g. <bos>)")
            bad = [t for t in prompt if not 0 <= t < self._vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token ids {bad[:5]} outside the vocabulary [0, {self._vocab_size}); "
                                 f"tokenize with the checkpoint's own tokenizer")

    def _check_alive(self) -> None:
        if not self._alive:
            raise RuntimeError("this EmbeddedEngine was shut down; create a new one")


def _build_model(source: str | Path | transformers.PretrainedConfig, dtype: torch.dtype,
                 seed: int) -> transformers.PreTrainedModel:
    if isinstance(source, transformers.PretrainedConfig):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return transformers.AutoModelForCausalLM.from_config(source, dtype=dtype)
    path = Path(source)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; pass an HF checkpoint directory "
                                f"(config.json + *.safetensors) or a transformers config")
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def _eos_token_ids(model: transformers.PreTrainedModel) -> set[int]:
    """eos ids from the config and the generation config (either may hold an int or a list)."""
    ids: set[int] = set()
    for source in (model.config, getattr(model, "generation_config", None)):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
    if not ids:
        raise ValueError("the model config has no eos_token_id; set it so generation can stop")
    return ids
