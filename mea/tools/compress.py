"""KV-cache compression: convert a trained `mha` or `mea` model to G stored KV heads (low-rank virtual heads).

Each layer's keys (likewise values) are H heads k_h = Σ_g C[g, h] k⁰_g of G₀ stored heads, i.e. the H per-head
projections W_h = Σ_g C[g, h] W⁰_g. Stacked as an H × (D·C) matrix M, a rank-G truncated SVD M ≈ U_G S_G V_Gᵀ is
the best G-head approximation (Eckart–Young): the new stored projections are the rows of V_Gᵀ and the new HLC
is C' = (U_G S_G)ᵀ (G × H). It is exact when M already has rank ≤ G. The KV cache then holds G heads.

    mea-compress exported/ compressed/ --kv-heads 4 [--layers 4-11]
    python train.py +experiment=recover trainer.init_from=compressed/ ...   # continued pretraining to recover
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

from mea.pretrained import load_pretrained, write_model_folder
from mea.models import LM
from mea.models.attention.mea import ExplicitAttention, MEAConfig, grouped_identity
from mea.runs import RunError

CONVERTIBLE = ("mha", "mea")  # variants whose heads are linear compositions of stored key/value heads


def low_rank_heads(w_stored: torch.Tensor, hlc: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(stored weight of g heads, g × H composition, relative Frobenius error) of the best rank-g fit."""
    G0, H = hlc.shape
    C = w_stored.shape[1]
    per_head = torch.einsum("gdc,gh->hdc", w_stored.view(G0, -1, C).double(), hlc.double()).reshape(H, -1)
    U, S, Vh = torch.linalg.svd(per_head, full_matrices=False)
    approx = (U[:, :g] * S[:g]) @ Vh[:g]
    error = (torch.linalg.norm(per_head - approx) / torch.linalg.norm(per_head)).item()
    return Vh[:g].reshape(-1, C).float(), (U[:, :g] * S[:g]).T.contiguous().float(), error


def compress(model: LM, kv_heads: int, layers: list[int] | None = None) -> tuple[LM, list[dict]]:
    """The model with `kv_heads` stored heads in `layers` (default: all), and each layer's reconstruction error."""
    cfg, attention = model.cfg, model.attention_cfg
    if attention.name not in CONVERTIBLE:
        raise RunError(f"compression takes an mha or mea model, not attention={attention.name}; its heads are not a linear composition of stored heads")
    if not 1 <= kv_heads <= cfg.n_heads:
        raise RunError(f"--kv-heads {kv_heads} is not between 1 and the model's {cfg.n_heads} heads")
    layers = list(range(cfg.n_layers)) if layers is None else layers
    if not set(layers) <= set(range(cfg.n_layers)):
        raise RunError(f"--layers {layers} names layers the model does not have (0 to {cfg.n_layers - 1})")
    per_layer = [kv_heads if i in layers else cfg.kv_heads(i) for i in range(cfg.n_layers)]
    target_attention = attention if attention.name == "mea" else MEAConfig(norm=False, hlc_init="identity")
    target = LM(replace(cfg, kv_heads_per_layer=per_layer, n_kv_heads=None), target_attention).eval()
    state = {k: v for k, v in model.state_dict().items() if ".attention." not in k or not k.endswith(("wqkv.weight", "hlc_k", "hlc_v"))}
    target.load_state_dict(state, strict=False)
    report = []
    H, D = cfg.n_heads, cfg.dim // cfg.n_heads
    for i, (src, dst) in enumerate(zip(model.blocks, target.blocks)):
        a, b = src.attention, dst.attention
        G0 = cfg.kv_heads(i)
        w_q, w_k, w_v = a.wqkv.weight.detach().split([H * D, G0 * D, G0 * D])
        hlc_k = a.hlc_k.detach() if isinstance(a, ExplicitAttention) else grouped_identity(G0, H)
        hlc_v = a.hlc_v.detach() if isinstance(a, ExplicitAttention) else grouped_identity(G0, H)
        if i in layers:
            w_k, hlc_k, err_k = low_rank_heads(w_k, hlc_k, kv_heads)
            w_v, hlc_v, err_v = low_rank_heads(w_v, hlc_v, kv_heads)
            report.append({"layer": i, "kv_heads": kv_heads, "key_error": err_k, "value_error": err_v})
        with torch.no_grad():
            b.wqkv.weight.copy_(torch.cat([w_q, w_k, w_v]))
            b.hlc_k.copy_(hlc_k)
            b.hlc_v.copy_(hlc_v)
    return target, report


def write_compressed(model: LM, report: list[dict], source: Path, out: Path) -> Path:
    """An export folder of the compressed model, with the source's tokenizer and compression.json."""
    return write_model_folder(model, source / "tokenizer.json", out, {"compression.json": {"source": str(source), "layers": report}})


def parse_layers(text: str | None, n_layers: int) -> list[int] | None:
    if text is None:
        return None
    if text == "middle":  # the paper finds the middle layers hurt least
        return list(range(n_layers // 4, n_layers - n_layers // 4))
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mea-compress", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="an export folder (mea-export) of an mha or mea model")
    parser.add_argument("out", type=Path)
    parser.add_argument("--kv-heads", type=int, required=True, help="stored KV heads per compressed layer (G)")
    parser.add_argument("--layers", help="layers to compress: 'middle', or a list such as 2-5,8 (default: all)")
    args = parser.parse_args(argv)
    try:
        model, tokenizer = load_pretrained(args.source)
        compressed, report = compress(model, args.kv_heads, parse_layers(args.layers, model.cfg.n_layers))
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    write_compressed(compressed, report, args.source, args.out)
    for row in report:
        print(f"layer {row['layer']:3d}: {row['kv_heads']} KV heads, relative error keys {row['key_error']:.4f}, values {row['value_error']:.4f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
