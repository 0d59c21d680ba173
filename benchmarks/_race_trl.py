"""The TRL side of benchmarks/bench_race.py: one system for a number of RL steps, run by the Python of a virtual
environment that holds TRL (bench_race.py builds it; TRL is never a dependency of minirlhf). Standalone: only torch,
transformers, trl, datasets, tokenizers and the standard library, so it runs outside this repository's environment.

    <venv>/bin/python benchmarks/_race_trl.py '<json spec>'    # prints one line "RACE_RESULT {json}" at the end

Systems: ``trl-ppo`` (``trl.experimental.ppo.PPOTrainer``, TRL 0.29.1: policy, reference, reward model and a separate
value model), ``trl-grpo`` and ``trl-rloo`` (``GRPOTrainer`` / ``RLOOTrainer`` of TRL 1.x, beta > 0 so the reference
model runs). All random-weight GPT-2 models of the shape in the spec (weights differ from minirlhf's, which does not
matter for speed). The tokenizer is a word-level one whose vocabulary is the token ids themselves ("<15496>"), so the
prompts are exactly the token ids that minirlhf's GPT-2 tokenizer made (no download), and decoding then re-encoding for
the reward model gives the same ids back. Responses never stop early: PPO's generation has no stop token, GRPO/RLOO
get ``min_new_tokens = max_new_tokens``.

One RL step = one batch of ``batch`` completions generated, scored, and trained on for ``epochs`` passes as one
minibatch (GRPO / RLOO: ``num_iterations = epochs`` optimizer steps on one generation batch, ``batch / group``
prompts with ``group`` completions each). Step times come from a trainer callback (the wall time between the ends of
consecutive RL steps; the first includes start-up and is the warm-up).
"""
import json
import math
import os
import resource
import sys
import tempfile
import time

import torch

EOS = "<|endoftext|>"


def word_tokenizer(vocab_size: int, eos_id: int):
    """A PreTrainedTokenizerFast over the tokens "<0>" ... "<V-1>" (EOS for eos_id): text <-> ids, one to one."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {(EOS if i == eos_id else f"<{i}>"): i for i in range(vocab_size)}
    tok = Tokenizer(WordLevel(vocab, unk_token=EOS))
    # tokens may be glued together ("<1><2>": TRL concatenates prompt and completion text for the reward model)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"<[^<>]*>"), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, padding_side="left")
    return fast


def text_of(ids, eos_id: int) -> str:
    return "".join(EOS if i == eos_id else f"<{i}>" for i in ids)


def make_models(spec: dict, folder: str):
    """Random GPT-2 policy (saved to folder/policy, which TRL 1.x reloads for its reference) and reward model."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=spec["vocab_size"], n_positions=spec["n_positions"], n_layer=spec["n_layer"],
                     n_head=spec["n_head"], n_embd=spec["n_embd"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=spec["eos_id"], eos_token_id=spec["eos_id"], pad_token_id=spec["eos_id"],
                     num_labels=1)
    torch.manual_seed(spec["seed"])
    policy = GPT2LMHeadModel(cfg)
    policy.generation_config.eos_token_id = spec["eos_id"]
    policy.generation_config.pad_token_id = spec["eos_id"]
    policy.save_pretrained(f"{folder}/policy")
    reward = GPT2ForSequenceClassification(cfg)
    reward.save_pretrained(f"{folder}/reward")
    return f"{folder}/policy", f"{folder}/reward"


def clock(per_step: int):
    """A TrainerCallback recording the wall time of each RL step (``per_step`` optimizer steps each) and the logs."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.t0, self.ends, self.logs = None, [], []

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % per_step == 0:
                self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            self.logs.append(dict(logs or {}))

        def step_times(self):
            return [b - a for a, b in zip([self.t0] + self.ends[:-1], self.ends)]

    return Clock()


def dtype_probe(model, seen: set):
    """Record the output dtype of the first block's MLP matmul in every forward of ``model`` (the precision that ran)."""
    model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda module, args, out: seen.add(str(out.dtype)))


def common_args(spec: dict, folder: str) -> dict:
    """TrainingArguments shared by the trainers: CPU, the precision asked, no saving, no eval, no reporting."""
    return dict(output_dir=f"{folder}/out", use_cpu=True, bf16=spec["precision"] == "bf16", fp16=False,
                save_strategy="no", eval_strategy="no", report_to="none", logging_steps=1, seed=spec["seed"],
                disable_tqdm=True, learning_rate=1e-5, dataloader_num_workers=0, gradient_accumulation_steps=1,
                per_device_train_batch_size=spec["batch"])


def run_ppo(spec: dict, folder: str) -> dict:
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    policy_path, reward_path = make_models(spec, folder)
    tok = word_tokenizer(spec["vocab_size"], spec["eos_id"])
    prompts = [spec["prompt_ids"][i % len(spec["prompt_ids"])] for i in range(spec["batch"])]
    data = Dataset.from_dict({"input_ids": prompts})
    args = PPOConfig(**common_args(spec, folder), num_ppo_epochs=spec["epochs"], num_mini_batches=1,
                     total_episodes=spec["batch"] * spec["steps"], local_rollout_forward_batch_size=spec["batch"],
                     response_length=spec["new_tokens"], stop_token=None, stop_token_id=None,
                     num_sample_generations=0, temperature=0.7, kl_coef=0.15, missing_eos_penalty=None)
    c, seen = clock(1), set()
    policy = AutoModelForCausalLM.from_pretrained(policy_path)
    dtype_probe(policy, seen)
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy,
                         ref_model=AutoModelForCausalLM.from_pretrained(policy_path),
                         reward_model=AutoModelForSequenceClassification.from_pretrained(reward_path),
                         value_model=AutoModelForSequenceClassification.from_pretrained(reward_path),
                         train_dataset=data, eval_dataset=data, callbacks=[c])
    trainer.train()
    logs = [r for r in c.logs if "loss/policy_avg" in r]
    return dict(step_times=c.step_times(),
                response_len=[spec["new_tokens"] - 0.0 for _ in logs],  # no stop token: every response is full
                eos_tokens=[r["val/num_eos_tokens"] for r in logs],
                losses=[r["loss/policy_avg"] for r in logs] + [r["loss/value_avg"] for r in logs],
                matmul_dtypes=sorted(seen))


def run_group(spec: dict, folder: str, kind: str) -> dict:
    """GRPO or RLOO: batch / group prompts, group completions each, num_iterations = epochs on one generation."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification

    if kind == "grpo":
        from trl import GRPOConfig as Config, GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config, RLOOTrainer as Trainer
    policy_path, reward_path = make_models(spec, folder)
    tok = word_tokenizer(spec["vocab_size"], spec["eos_id"])
    texts = [text_of(p, spec["eos_id"]) for p in spec["prompt_ids"]]
    data = Dataset.from_dict({"prompt": [texts[i % len(texts)] for i in range(spec["batch"])]})
    args = Config(**common_args(spec, folder), num_generations=spec["group"], steps_per_generation=1,
                  num_iterations=spec["epochs"], max_completion_length=spec["new_tokens"], beta=0.05,
                  temperature=0.7, top_p=1.0, top_k=0, max_steps=spec["steps"] * spec["epochs"],
                  generation_kwargs={"min_new_tokens": spec["new_tokens"]}, log_completions=False)
    c = clock(spec["epochs"])
    trainer = Trainer(model=policy_path, reward_funcs=AutoModelForSequenceClassification.from_pretrained(reward_path),
                      args=args, train_dataset=data, processing_class=tok, reward_processing_classes=tok,
                      callbacks=[c])
    seen = set()
    dtype_probe(trainer.model, seen)
    trainer.train()
    logs = [r for r in c.logs if "loss" in r]
    per_step = [logs[i:i + spec["epochs"]] for i in range(0, len(logs), spec["epochs"])]
    return dict(step_times=c.step_times(),
                response_len=[step[0].get("completions/mean_length", float("nan")) for step in per_step],
                losses=[r["loss"] for r in logs], matmul_dtypes=sorted(seen))


def main():
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec["threads"])
    if spec["precision"] == "bf16":  # PPOTrainer makes its own Accelerator, which reads bf16 from here only
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
    import transformers
    import trl

    with tempfile.TemporaryDirectory() as folder:
        result = run_ppo(spec, folder) if spec["system"] == "trl-ppo" else run_group(spec, folder,
                                                                                     spec["system"][len("trl-"):])
    result.update(system=spec["system"], phases=None, threads=torch.get_num_threads(),
                  peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
                  versions=f"trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}",
                  losses_finite=all(math.isfinite(x) for x in result["losses"]))
    print("RACE_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
