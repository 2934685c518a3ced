"""How much agreement can choosing tokens alone buy a frozen ViT-Tiny at DynamicViT's token counts?

    python benchmarks/oracle_rankings.py [--threads 2]

Keeps the same number of patch tokens as ``dynamicvit:rho=0.7`` (137, 96, 67 entering blocks 3,
6, 9; each location chooses among the previous one's survivors) but ranks them by signals
computed from the *unreduced* model on the same image, which a predictor can at best imitate:

- ``class attention, block before``: head-averaged class attention of the block before the location;
- ``rollout``: attention rollout from the location to the last block (what the calibration's warm
  start imitates);
- ``|grad x input|``: gradient of the unreduced model's top-1 log-probability with respect to the tokens
  entering the location, times the tokens, summed over channels;
- ``|grad| norm``: the norm of that gradient;
- ``optimised per image``: scores started from the rollout and moved by 3 Adam steps (lr 0.1) that
  lower this image's KL to the unreduced model through soft keep masks (a sigmoid around each
  location's k-th score, temperature 1 -> 0.05, multiplied over locations, masking attention keys):
  what choosing tokens alone can reach on the frozen model when the choice is fitted to the image
  itself, an upper reference no predictor is expected to reach.

``topk`` (tokensparse, pruning after its block's attention, as in the calibration benchmark) is shown
for reference. Prints agreement with the unreduced model and mean KL on the even and odd positions
of the shared images: nothing here is fitted across images.
"""
from __future__ import annotations

import argparse
import copy

import torch
from dynamicvit_calibrate import MODEL, logits_of  # this folder: run as a script
from shared_args import add_shared_args
from torch import Tensor

import tokensparse
from tokensparse.data import ImageNetFolder, load_rgb, model_transform
from tokensparse.measure import fidelity
from tokensparse.models import create_model
from tokensparse.ops import attention_rollout

LOCATIONS, KEEP = [3, 6, 9], [137, 96, 67]


def block_forward(block: torch.nn.Module, x: Tensor, key_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One timm ViT block with its attention matrix ``(B, H, N, N)`` made explicit; ``key_bias``
    ``(B, 1, 1, N)`` is added to the attention logits."""
    attn = block.attn
    B, N, C = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    a = (logits if key_bias is None else logits + key_bias).softmax(dim=-1)
    x = x + block.ls1(attn.proj((a @ v).transpose(1, 2).reshape(B, N, C)))
    return x + block.ls2(block.mlp(block.norm2(x))), a


def embed(model: torch.nn.Module, images: Tensor) -> Tensor:
    return model.norm_pre(model._pos_embed(model.patch_embed(images)))


def oracle_scores(model: torch.nn.Module, images: Tensor) -> tuple[Tensor, dict[str, dict[int, Tensor]]]:
    """The unreduced logits and, per signal, ``{location: (B, 196) scores}`` over the original patches."""
    x = embed(model, images)
    inputs, attentions = [], []
    for block in model.blocks:
        inputs.append(x)
        x, a = block_forward(block, x)
        attentions.append(a.detach())
    logits = model.forward_head(model.norm(x))
    top1 = logits.argmax(dim=-1, keepdim=True)
    grads = torch.autograd.grad(logits.log_softmax(-1).gather(1, top1).sum(), [inputs[b] for b in LOCATIONS])
    return logits.detach(), {
        "class attention, block before": {b: attentions[b - 1][:, :, 0, 1:].mean(dim=1) for b in LOCATIONS},
        "rollout": {b: attention_rollout([a.mean(dim=1) for a in attentions[b:]])[:, 0, 1:] for b in LOCATIONS},
        "|grad x input|": {b: (g * inputs[b]).sum(-1)[:, 1:].abs().detach() for b, g in zip(LOCATIONS, grads)},
        "|grad| norm": {b: g[:, 1:].norm(dim=-1) for b, g in zip(LOCATIONS, grads)},
    }


def soft_keep(scores: dict[int, Tensor], tau: float) -> dict[int, Tensor]:
    """Per location, keep weights ``(B, 196)`` in (0, 1): a sigmoid around the midpoint of the k-th and
    (k+1)-th best score among the tokens still kept, times the previous location's weights."""
    out, weights, alive = {}, None, None
    for b, k in zip(LOCATIONS, KEEP):
        s = scores[b]
        ranked = (s if alive is None else s.masked_fill(~alive, float("-inf"))).topk(k + 1, dim=1).values
        w = torch.sigmoid((s - (ranked[:, k - 1:k] + ranked[:, k:k + 1]).detach() / 2) / tau)
        weights = w if weights is None else weights * w
        alive = s >= ranked[:, k - 1:k] if alive is None else alive & (s >= ranked[:, k - 1:k])
        out[b] = weights
    return out


def optimised_scores(model: torch.nn.Module, images: Tensor, reference: Tensor, start: dict[int, Tensor],
                     steps: int = 3) -> dict[int, Tensor]:
    """``start`` scores (standardised) after ``steps`` Adam steps lowering KL(reference || soft-masked model)."""
    scores = {b: ((s - s.mean(1, keepdim=True)) / s.std(1, keepdim=True)).requires_grad_(True) for b, s in start.items()}
    optimizer = torch.optim.Adam(list(scores.values()), lr=0.1)
    target = reference.log_softmax(dim=-1)
    for step in range(steps):
        weights = soft_keep(scores, 0.05 ** (step / max(steps - 1, 1)))
        x, bias = embed(model, images), None
        for i, block in enumerate(model.blocks):
            if i in weights:
                bias = torch.cat([torch.ones(len(x), 1), weights[i]], dim=1).add(1e-6).log()[:, None, None, :]
            x, _ = block_forward(block, x, bias)
        logits = model.forward_head(model.norm(x))
        loss = torch.nn.functional.kl_div(logits.log_softmax(-1), target, log_target=True, reduction="batchmean")
        optimizer.zero_grad()
        loss.backward(inputs=list(scores.values()))  # the scores' gradients only, not the weights'
        optimizer.step()
    return {b: s.detach() for b, s in scores.items()}


@torch.no_grad()
def pruned_logits(model: torch.nn.Module, images: Tensor, scores: dict[int, Tensor]) -> Tensor:
    """Logits with only the best-scored surviving patch tokens entering each location (order kept)."""
    x = embed(model, images)
    alive = torch.arange(x.shape[1] - 1).expand(x.shape[0], -1)
    for i, block in enumerate(model.blocks):
        if i in LOCATIONS:
            keep = scores[i].gather(1, alive).topk(KEEP[LOCATIONS.index(i)], dim=1).indices.sort(dim=1).values
            alive = alive.gather(1, keep)
            patches = x[:, 1:].gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            x = torch.cat([x[:, :1], patches], dim=1)
        x, _ = block_forward(block, x)
    return model.forward_head(model.norm(x))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shared_args(p)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = create_model(MODEL, weights=args.weights).eval()
    transform = model_transform(model)
    images = torch.stack([transform(load_rgb(path)) for path, _ in ImageNetFolder(args.images, args.wnids).samples])
    reference, rows = [], {}
    for i in range(0, len(images), 50):
        batch = images[i:i + 50]
        logits, signals = oracle_scores(model, batch)
        signals["optimised per image"] = optimised_scores(model, batch, logits, signals["rollout"])
        reference.append(logits)
        for name, scores in signals.items():
            rows.setdefault(name, []).append(pruned_logits(model, batch, scores))
    reference = torch.cat(reference)
    topk = tokensparse.patch(copy.deepcopy(model), f"topk:tokens=[{','.join(map(str, KEEP))}]")
    rows = {"topk (tokensparse)": logits_of(topk, images), **{k: torch.cat(v) for k, v in rows.items()}}
    print(f"ViT-Tiny (shared weights), {len(images)} images; patch tokens entering blocks {LOCATIONS}: {KEEP}")
    print(f"{'ranking':32s} {'even agree':>10s} {'even KL':>8s} {'odd agree':>10s} {'odd KL':>8s}")
    for name, logits in rows.items():
        (ae, ke), (ao, ko) = fidelity(logits[0::2], reference[0::2]), fidelity(logits[1::2], reference[1::2])
        print(f"{name:32s} {ae:10.1f} {ke:8.4f} {ao:10.1f} {ko:8.4f}")


if __name__ == "__main__":
    main()
