"""GPT-2 in the Hugging Face layout: loading (``from_pretrained``) and saving (``save_pretrained``), kept apart from
the model itself (``minirlhf/model.py``).

``from_pretrained`` takes a hub name (``gpt2`` .. ``gpt2-xl``, needs ``huggingface_hub`` and a network), a local Hugging
Face directory (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``, the latter read with
``weights_only=True`` so no pickled code runs), a ``.safetensors`` file beside its ``config.json``, or a minirlhf
checkpoint directory (its transformer trunk). ``save_pretrained`` writes the layout that
``transformers.GPT2LMHeadModel.from_pretrained`` loads unchanged.

The mapping: Hugging Face names the trunk's weights with or without a ``transformer.`` prefix; it stores the Conv1D
weights (in, out), transposed from and to our ``nn.Linear`` (out, in); its token embedding has ``vocab_size`` rows and
ours ``padded_vocab`` (the PAD row and the alignment rows are zero and never scored); the LM head is tied in both.
"""
import json
import pathlib

import torch
from safetensors.torch import load_file, save_file

from minirlhf.config import UserError
from minirlhf.model import GPT, GPTConfig

# GPT-2 sizes published on the Hugging Face hub.
HUB_MODELS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}
# Weights that the Hugging Face checkpoints store as Conv1D, (in, out): transposed from and to our nn.Linear (out, in).
HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


# ---------------------------------------------------------------------------------------------------------------------
# Reading checkpoint files (ours and Hugging Face's)


def read_config_json(file: pathlib.Path) -> dict:
    """A checkpoint's ``config.json`` (ours or Hugging Face's) as a dict, or one clear error saying what is wrong."""
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise UserError(f"{file}: not a JSON object")
    return meta


def read_weights(file: pathlib.Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a PyTorch ``.bin`` without executing pickled code."""
    try:
        if file.suffix == ".safetensors":
            return load_file(str(file))
        return torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise UserError(f"{file}: missing") from e
    except Exception as e:  # a corrupt or foreign file: any library error becomes one clear line
        raise UserError(f"{file}: cannot read weights ({type(e).__name__}: {e})") from e


def _take(hf: dict, key: str, shape, path) -> torch.Tensor:
    if key not in hf:
        raise UserError(f"{path}: weight {key!r} missing; not a GPT-2 checkpoint?")
    t = hf[key].float()
    if shape is not None and tuple(t.shape) != shape:
        raise UserError(f"{path}: weight {key!r} has shape {tuple(t.shape)}, expected {shape}")
    return t


def _download_from_hub(name: str) -> pathlib.Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise UserError(f"downloading {name!r} needs huggingface_hub (pip install 'minirlhf[hub]'); offline, pass a "
                        "local directory with config.json + model.safetensors instead") from e
    try:
        return pathlib.Path(snapshot_download(name, allow_patterns=["config.json", "model.safetensors"]))
    except Exception as e:  # network or hub errors of any kind: say what to do instead
        raise UserError(f"could not download {name!r} from the Hugging Face hub ({type(e).__name__}). Offline, pass a "
                        "local directory with config.json + model.safetensors (e.g. one saved by "
                        "GPT2LMHeadModel.save_pretrained) or train one with train_sft.py --init scratch") from e


# ---------------------------------------------------------------------------------------------------------------------
# Loading and saving


def from_pretrained(name_or_path: str, **overrides) -> GPT:
    """Load GPT-2 weights: a hub name, a Hugging Face directory or ``.safetensors`` file, or a minirlhf checkpoint
    directory (its transformer trunk). ``overrides`` replace config fields (e.g. ``dropout=0.0``)."""
    path = pathlib.Path(name_or_path)
    if not path.exists():
        if name_or_path not in HUB_MODELS:
            raise UserError(f"{name_or_path}: no such file or directory (and not a hub name: "
                            f"{', '.join(HUB_MODELS)})")
        path = _download_from_hub(name_or_path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise UserError(f"{path}: expected a directory or a .safetensors file")
        weights_file, path = path, path.parent
    else:
        weights_file = None
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path}: not a GPT-2 checkpoint (no config.json)")
    meta = read_config_json(config_file)
    if "minirlhf" in meta:  # our own checkpoint: config and state dict are stored as they are
        config = GPTConfig.from_dict({**meta.get("model", {}), **overrides}, f"{config_file}: \"model\"")
        model = GPT(config)
        state = read_weights(weights_file or path / "model.safetensors")
        trunk = {k[len("gpt."):]: v for k, v in state.items() if k.startswith("gpt.")} or state
        model.load_state_dict(trunk)
        return model
    return _from_hf(path, meta, weights_file, overrides)


def _from_hf(path: pathlib.Path, meta: dict, weights_file, overrides) -> GPT:
    """A GPT from a Hugging Face GPT-2 directory: its config.json checked and mapped, the weights copied in."""
    if meta.get("model_type") != "gpt2":
        raise UserError(f"{path}/config.json: model_type is {meta.get('model_type')!r}, only 'gpt2' is supported")
    act = meta.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"{path}/config.json: activation_function {act!r} is not GPT-2's gelu_new")
    if meta.get("n_inner") not in (None, 4 * meta["n_embd"]):
        raise UserError(f"{path}/config.json: n_inner={meta['n_inner']} is not 4 * n_embd")
    vocab = meta["vocab_size"]
    config = GPTConfig.from_dict({
        "vocab_size": vocab, "n_positions": meta["n_positions"], "n_layer": meta["n_layer"],
        "n_head": meta["n_head"], "n_embd": meta["n_embd"], "layer_norm_eps": meta.get("layer_norm_epsilon", 1e-5),
        "tokenizer": "gpt2" if vocab == 50257 else f"gpt2-{vocab - 1}", **overrides})
    if weights_file is None:
        weights_file = next((path / f for f in ("model.safetensors", "pytorch_model.bin") if (path / f).is_file()),
                            None)
        if weights_file is None:
            raise UserError(f"{path}: no model.safetensors or pytorch_model.bin")
    hf = read_weights(weights_file)
    hf = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in hf.items()}
    model = GPT(config)
    state = model.state_dict()
    for key in state:
        if key == "transformer.wte.weight":
            state[key][:vocab] = _take(hf, "wte.weight", (vocab, config.n_embd), path)
            state[key][vocab:] = 0.0  # PAD row and alignment rows: never scored
            continue
        src = key[len("transformer."):]
        t = _take(hf, src, None, path)
        state[key].copy_(t.t() if src.endswith(HF_CONV1D) else t)
    model.load_state_dict(state)
    return model


def save_pretrained(model: GPT, directory) -> pathlib.Path:
    """Write ``model`` as ``config.json`` + ``model.safetensors`` in the Hugging Face GPT-2 layout (Conv1D weights
    transposed, vocabulary without the PAD row, LM head tied)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    c = model.config
    out = {}
    for key, t in model.state_dict().items():
        if key == "transformer.wte.weight":
            t = t[: c.vocab_size]
        elif key.endswith(HF_CONV1D):
            t = t.t()
        out[key] = t.detach().to("cpu", torch.float32).contiguous()
    save_file(out, str(directory / "model.safetensors"), metadata={"format": "pt"})
    hf_config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
        "n_positions": c.n_positions, "n_ctx": c.n_positions, "n_embd": c.n_embd, "n_layer": c.n_layer,
        "n_head": c.n_head, "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": c.layer_norm_eps,
        "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout, "initializer_range": 0.02,
        "bos_token_id": c.vocab_size - 1, "eos_token_id": c.vocab_size - 1, "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2))
    return directory
