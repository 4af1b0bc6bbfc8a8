"""The parameter shapes of well-known models, for benchmarking an optimizer on a model without building it.

`model_shapes(name)` returns a model's (name, shape) list, from torchvision
or timm when either is importable and knows the name (the model is built on
the meta device: no memory, no weights, no download), else from the
catalogue below: shape generators written from each architecture's
definition, with the parameter names and order of its reference
implementation (torchvision for ResNet and ViT, Hugging Face transformers for
GPT-2 and BERT). Each model lists its trainable parameters once: GPT-2's
output head is tied to its token embedding, and BatchNorm's running
statistics are buffers, not parameters.

The catalogue's counts are the published ones (tests/test_benchmark_cli.py
checks them, and checks the shapes against torchvision where it is
installed): resnet50 25,557,032, vit_b_16 86,567,656, gpt2 124,439,808,
bert-base-uncased 109,482,240.
"""

from __future__ import annotations

import math
from typing import Callable

NamedShapes = list[tuple[str, tuple[int, ...]]]


# --------------------------------------------------------------------------
# Generators, one per architecture family
# --------------------------------------------------------------------------

def _conv_bn(prefix: str, conv: str, bn: str, out_ch: int, in_ch: int, k: int) -> NamedShapes:
    """A bias-free conv and the BatchNorm after it (weight and bias)."""
    return [(f"{prefix}{conv}.weight", (out_ch, in_ch, k, k)), (f"{prefix}{bn}.weight", (out_ch,)),
            (f"{prefix}{bn}.bias", (out_ch,))]


def resnet(blocks: tuple[int, int, int, int], bottleneck: bool, num_classes: int = 1000) -> NamedShapes:
    """torchvision.models.resnet: a 7x7 stem, four stages of basic (two 3x3) or bottleneck (1x1, 3x3, 1x1,
    expansion 4) blocks with a 1x1 projection where the shape changes, and a linear head."""
    expansion = 4 if bottleneck else 1
    out = _conv_bn("", "conv1", "bn1", 64, 3, 7)
    inplanes = 64
    for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
        for i in range(n):
            stride = 2 if stage > 1 and i == 0 else 1
            p = f"layer{stage}.{i}."
            if bottleneck:
                out += _conv_bn(p, "conv1", "bn1", planes, inplanes, 1)
                out += _conv_bn(p, "conv2", "bn2", planes, planes, 3)
                out += _conv_bn(p, "conv3", "bn3", planes * expansion, planes, 1)
            else:
                out += _conv_bn(p, "conv1", "bn1", planes, inplanes, 3)
                out += _conv_bn(p, "conv2", "bn2", planes, planes, 3)
            if stride != 1 or inplanes != planes * expansion:
                out += _conv_bn(p, "downsample.0", "downsample.1", planes * expansion, inplanes, 1)
            inplanes = planes * expansion
    return out + [("fc.weight", (num_classes, 512 * expansion)), ("fc.bias", (num_classes,))]


def _linear(name: str, out_f: int, in_f: int) -> NamedShapes:
    return [(f"{name}.weight", (out_f, in_f)), (f"{name}.bias", (out_f,))]


def _norm(name: str, d: int) -> NamedShapes:
    return [(f"{name}.weight", (d,)), (f"{name}.bias", (d,))]


def vit(patch: int, layers: int, hidden: int, mlp: int, image: int = 224, num_classes: int = 1000) -> NamedShapes:
    """torchvision.models.vision_transformer: a patch-embedding conv, a class token, learned position
    embeddings, pre-norm encoder layers (nn.MultiheadAttention's packed qkv, a 2-layer MLP), a final
    LayerNorm and a linear head."""
    seq = (image // patch) ** 2 + 1
    out: NamedShapes = [("class_token", (1, 1, hidden)), ("conv_proj.weight", (hidden, 3, patch, patch)),
                        ("conv_proj.bias", (hidden,)), ("encoder.pos_embedding", (1, seq, hidden))]
    for i in range(layers):
        p = f"encoder.layers.encoder_layer_{i}."
        out += _norm(p + "ln_1", hidden)
        out += [(p + "self_attention.in_proj_weight", (3 * hidden, hidden)),
                (p + "self_attention.in_proj_bias", (3 * hidden,))]
        out += _linear(p + "self_attention.out_proj", hidden, hidden)
        out += _norm(p + "ln_2", hidden)
        out += _linear(p + "mlp.0", mlp, hidden) + _linear(p + "mlp.3", hidden, mlp)
    return out + _norm("encoder.ln", hidden) + _linear("heads.head", num_classes, hidden)


def gpt2(layers: int, d: int, vocab: int = 50257, n_ctx: int = 1024) -> NamedShapes:
    """Hugging Face GPT2Model (the LM head is tied to wte, so it adds no parameter): token and position
    embeddings, pre-norm blocks of Conv1D layers (weights stored (in, out)), a final LayerNorm."""
    out: NamedShapes = [("wte.weight", (vocab, d)), ("wpe.weight", (n_ctx, d))]
    for i in range(layers):
        p = f"h.{i}."
        out += _norm(p + "ln_1", d)
        out += [(p + "attn.c_attn.weight", (d, 3 * d)), (p + "attn.c_attn.bias", (3 * d,)),
                (p + "attn.c_proj.weight", (d, d)), (p + "attn.c_proj.bias", (d,))]
        out += _norm(p + "ln_2", d)
        out += [(p + "mlp.c_fc.weight", (d, 4 * d)), (p + "mlp.c_fc.bias", (4 * d,)),
                (p + "mlp.c_proj.weight", (4 * d, d)), (p + "mlp.c_proj.bias", (d,))]
    return out + _norm("ln_f", d)


def bert(layers: int, hidden: int, intermediate: int, vocab: int = 30522, max_pos: int = 512,
         type_vocab: int = 2) -> NamedShapes:
    """Hugging Face BertModel with its pooler: word, position and token-type embeddings and their LayerNorm,
    post-norm encoder layers (separate q, k, v), the pooler's dense layer."""
    out: NamedShapes = [("embeddings.word_embeddings.weight", (vocab, hidden)),
                        ("embeddings.position_embeddings.weight", (max_pos, hidden)),
                        ("embeddings.token_type_embeddings.weight", (type_vocab, hidden))]
    out += _norm("embeddings.LayerNorm", hidden)
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for qkv in ("query", "key", "value"):
            out += _linear(f"{p}attention.self.{qkv}", hidden, hidden)
        out += _linear(p + "attention.output.dense", hidden, hidden) + _norm(p + "attention.output.LayerNorm", hidden)
        out += _linear(p + "intermediate.dense", intermediate, hidden)
        out += _linear(p + "output.dense", hidden, intermediate) + _norm(p + "output.LayerNorm", hidden)
    return out + _linear("pooler.dense", hidden, hidden)


# name -> (generator, where its definition comes from)
CATALOGUE: dict[str, tuple[Callable[[], NamedShapes], str]] = {
    "resnet18": (lambda: resnet((2, 2, 2, 2), bottleneck=False), "torchvision"),
    "resnet34": (lambda: resnet((3, 4, 6, 3), bottleneck=False), "torchvision"),
    "resnet50": (lambda: resnet((3, 4, 6, 3), bottleneck=True), "torchvision"),
    "resnet101": (lambda: resnet((3, 4, 23, 3), bottleneck=True), "torchvision"),
    "resnet152": (lambda: resnet((3, 8, 36, 3), bottleneck=True), "torchvision"),
    "vit_b_16": (lambda: vit(16, 12, 768, 3072), "torchvision"),
    "vit_b_32": (lambda: vit(32, 12, 768, 3072), "torchvision"),
    "vit_l_16": (lambda: vit(16, 24, 1024, 4096), "torchvision"),
    "gpt2": (lambda: gpt2(12, 768), "Hugging Face transformers"),
    "gpt2-medium": (lambda: gpt2(24, 1024), "Hugging Face transformers"),
    "gpt2-large": (lambda: gpt2(36, 1280), "Hugging Face transformers"),
    "gpt2-xl": (lambda: gpt2(48, 1600), "Hugging Face transformers"),
    "bert-base-uncased": (lambda: bert(12, 768, 3072), "Hugging Face transformers"),
    "bert-large-uncased": (lambda: bert(24, 1024, 4096), "Hugging Face transformers"),
}
ALIASES = {"bert-base": "bert-base-uncased", "bert-large": "bert-large-uncased", "gpt2-small": "gpt2"}


def _from_module(model) -> NamedShapes:
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def _torchvision(name: str):
    """The torchvision model `name` built on the meta device, or None when torchvision is absent or lacks it."""
    try:
        import torchvision
    except Exception:  # optional
        return None
    if name not in torchvision.models.list_models():
        return None
    import torch

    with torch.device("meta"):
        return torchvision.models.get_model(name, weights=None)


def _timm(name: str):
    """The timm model `name` built on the meta device, or None when timm is absent or lacks it."""
    try:
        import timm
    except Exception:  # optional
        return None
    if name not in timm.list_models():
        return None
    import torch

    with torch.device("meta"):
        return timm.create_model(name, pretrained=False)


def known_models() -> list[str]:
    """The catalogue's names (torchvision's and timm's come on top when they are installed)."""
    return list(CATALOGUE) + list(ALIASES)


def model_shapes(name: str, source: str = "auto") -> tuple[NamedShapes, str]:
    """(the trainable parameters of model `name` as (name, shape), where they came from).

    source: "auto" (torchvision, then timm, then the catalogue), "catalogue", "torchvision" or "timm".
    Raises KeyError, naming the known models, for a name no source has.
    """
    key = ALIASES.get(name, name)
    if source in ("auto", "torchvision"):
        model = _torchvision(key)
        if model is not None:
            return _from_module(model), "torchvision (meta device)"
    if source in ("auto", "timm"):
        model = _timm(key)
        if model is not None:
            return _from_module(model), "timm (meta device)"
    if source in ("auto", "catalogue") and key in CATALOGUE:
        gen, origin = CATALOGUE[key]
        return gen(), f"pyoptim's catalogue ({origin}'s definition)"
    raise KeyError(f"unknown model {name!r} (source {source}); the catalogue has {', '.join(known_models())}"
                   + ("" if source != "auto" else "; install torchvision or timm for theirs"))


def count(shapes: NamedShapes) -> int:
    """Elements over all parameters."""
    return sum(math.prod(s) for _, s in shapes)
