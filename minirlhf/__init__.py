"""minirlhf: a from-scratch, minimal RLHF toolkit (GPT-2, SFT, reward model, PPO, red teaming).

Modules in dependency order: config -> tokenizer -> model -> generate -> checkpoint -> data -> sft / reward / ppo.
"""
__version__ = "0.1.0"
