"""Responses from a policy checkpoint, sampled once and kept: the items of a batch, and the live replies of red teaming.

The policy is loaded with :func:`minirlhf.checkpoint.load_policy` and sampled by :class:`minirlhf.redteaming.attacks.Policy` (the
project's batched generation, :func:`minirlhf.generate.generate_batch`), so the crowd sees exactly what redteam.py and
the trainers would produce with the same sampling settings. Identical texts among one prompt's K samples are kept
once (a ranking of two copies of one text teaches nothing, and the reward model's reader refuses it). A red-team
chat's reply (:meth:`Sampler.reply`) continues the whole conversation as one text; when it does not fit beside the
reply in the model's context, its beginning is cut (``Sampler.max_prompt_tokens`` are kept).
"""
import threading
from dataclasses import dataclass, fields

from minirlhf.redteaming.attacks import Policy
from minirlhf.checkpoint import load_policy
from minirlhf.run import resolve_device
from minirlhf.config import UserError, option


@dataclass
class Sampling:
    """How responses are sampled (the flags of the commands that sample, and the provenance of every batch)."""

    policy: str = option("", "policy checkpoint that writes the responses (a minirlhf or Hugging Face GPT-2 directory)")
    max_new_tokens: int = option(48, "longest response in tokens")
    temperature: float = option(1.0, "sampling temperature")
    top_k: int = option(0, "sample from the k most likely tokens only (0 = off)")
    top_p: float = option(1.0, "nucleus sampling threshold (1 = off)")
    seed: int = option(0, "random seed of the sampling (and of the batch's shuffles)")
    device: str = option("cpu", "cpu, cuda, or auto")


SAMPLING_FIELDS = [f.name for f in fields(Sampling)]


class Sampler:
    """``sampler(prompts, k)`` -> for each prompt, its distinct responses ``[{"text", "policy", "ended"}]``; safe to
    call from several threads (one generation at a time)."""

    def __init__(self, sampling: Sampling):
        if not sampling.policy:
            raise UserError("--policy is required: the policy checkpoint that writes the responses")
        self.sampling = sampling
        model, tokenizer = load_policy(sampling.policy, dropout=0.0)
        self.policy = Policy(model.to(resolve_device(sampling.device)), tokenizer, name=sampling.policy,
                             max_new_tokens=sampling.max_new_tokens, seed=sampling.seed,
                             temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
        self.lock = threading.Lock()

    @property
    def max_prompt_tokens(self) -> int:
        """The longest prompt the policy sees: its context less --max-new-tokens (longer ones lose their start)."""
        return self.policy.max_prompt_tokens

    def provenance(self) -> dict:
        return {name: getattr(self.sampling, name) for name in SAMPLING_FIELDS}

    def __call__(self, prompts: list[str], k: int) -> list[list[dict]]:
        with self.lock:
            samples = self.policy.respond([p for p in prompts for _ in range(k)])
        out = []
        for j in range(len(prompts)):
            distinct = {s.output: s for s in samples[j * k:(j + 1) * k]}
            out.append([{"text": s.output, "policy": s.policy, "ended": s.ended} for s in distinct.values()])
        return out

    def reply(self, prompt: str) -> tuple[str, bool, dict]:
        """One reply to ``prompt``: its text, whether it ended with EOS, and its provenance (the sampling settings and
        ``prompt_truncated``, the prompt tokens cut from the left to fit the context)."""
        with self.lock:
            [sample] = self.policy.respond([prompt])
        return sample.output, sample.ended, {**self.provenance(), "prompt_truncated": sample.prompt_truncated}
