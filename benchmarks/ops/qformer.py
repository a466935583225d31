"""BLIP-2 / InstructBLIP Q-Former: the masked self-attention, the query->image cross-attention and the
whole Q-Former, forward + backward, against what a user would run instead.

Groups (one plot panel each):

* ``self-attn fwd+bwd``: ``vlmkern.ops.qformer_attention`` over ``[32 queries ; 32 text]`` (``B=256, H=12,
  d=64``; random text padding), ITM ``bidirectional`` mask (GPU outside ``--quick``: also ``unimodal`` and
  ``multimodal_causal``). Baselines: SDPA with the dense boolean ``(B, 1, L, L)`` mask (prebuilt, not timed)
  under each backend (``math``, ``efficient``, ``cudnn``, ``flash``; a backend that refuses the input is listed
  as skipped with its error; on the CPU only the default), compiled FlexAttention (GPU only: it has no CPU
  backward) with its block mask prebuilt, *including* its ``create_block_mask`` build (compiled,
  ``_compile=True``, as a user rebuilding the mask per batch would), and the build alone, transformers' eager
  attention (additive mask), xformers when installed.
  GPU targets: vlmkern >= 2x every SDPA backend with the mask, >= 1.5x FlexAttention including the mask build.
* ``cross-attn fwd+bwd`` / ``cross-attn fwd``: ``vlmkern.ops.cross_attention``, 32 queries -> 257 / 677 image
  tokens (ViT-g 224 / 364 px), no padding (``image_atts`` is all ones in the models). Baselines: SDPA without
  a mask (every backend), compiled FlexAttention, transformers eager, xformers. Target: >= 70 % of the
  GPU's memory bandwidth: the ``pct_copy_peak`` column, GB/s as % of the device-to-device copy ceiling that
  ``benchmarks.ceilings`` measured on the same GPU.
* ``qformer fwd+bwd`` / ``qformer fwd``: the whole Q-Former (BLIP-2 config: 12 layers, 768 hidden, 257 x 1408
  image tokens), ``vlmkern.models.blip2.Blip2QFormerModel`` against ``transformers.Blip2QFormerModel`` with
  eager and SDPA attention, same weights, eval mode (dropout off, so both run the same math). ITM batches are
  ``[pos, (text, neg image), (neg text, image)]`` (LAVIS): ``vlmkern dedup`` passes each distinct image
  once (``encoder_batch_index``). Full GPU runs (or ``VLMKERN_BENCH_COMPILE=1``) add ``torch.compile`` of the
  transformers SDPA model. CPU target: vlmkern never slower than transformers.

bf16 on the GPU, fp32 on the CPU. Useful FLOP are dense (masked score entries counted); fwd+bwd attention FLOP
= 3.5x forward (the backward recomputes the scores). Bytes: q, k, v, out (+ dout, dq, dk, dv) once.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from benchmarks.harness import Case, compiled_baselines, compiled_skipped, fwd_bwd, is_compiled

NQ, T_TEXT, H, D = 32, 32, 12, 64
IMAGE_TOKENS = (257, 677)
ENCODER_WIDTH = 1408
SDPA_BACKENDS = ("math", "efficient", "cudnn", "flash")
MODE_LABEL = {"bidirectional": "ITM bidir", "unimodal": "ITC unimodal", "multimodal_causal": "ITG causal"}


# ----------------------------------------------------------------------------------------- helpers
def _dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float32


def _text_padding(batch: int, t: int, device: str, seed: int = 0) -> torch.Tensor:
    """``(B, t)`` bool, True = real token; lengths uniform in ``[1, t]`` (row 0 unpadded)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (batch,), generator=g)
    lengths[0] = t
    return (torch.arange(t)[None, :] < lengths[:, None]).to(device)


def _leaves(device, dtype, *shapes, seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_() for s in shapes]


_fwd_bwd = fwd_bwd


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend
    return {"math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[name]


def _hf_eager() -> tuple[Optional[Callable], str]:
    try:
        from transformers.models.blip_2.modeling_blip_2 import eager_attention_forward
    except Exception as exc:
        return None, f"transformers not importable: {type(exc).__name__}: {exc}"
    return eager_attention_forward, ""


def _xformers() -> tuple[Optional[Any], str]:
    try:
        import xformers.ops as xops
    except Exception as exc:
        return None, f"xformers not installed ({type(exc).__name__})"
    return xops, ""


def _backend(op: str, *args) -> str:
    try:
        from vlmkern.ops import dispatch as _dispatch
        return _dispatch.REGISTRY[op].select(*args)
    except Exception as exc:
        return f"? ({type(exc).__name__})"


def _try(case: Case, name: str, backend: str, fn: Callable[[], Any]) -> None:
    """Register ``fn`` as implementation ``name`` if one call succeeds, else list it as skipped with the error."""
    try:
        fn()
    except Exception as exc:
        case.skipped[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        return
    case.impls[name] = fn
    case.backends[name] = backend


def _attention_counts(batch, lq, lk, dtype, train) -> tuple[float, float]:
    fwd = 4.0 * batch * H * lq * lk * D
    elem = torch.finfo(dtype).bits // 8
    io = batch * H * D * elem
    if train:
        return 3.5 * fwd, io * (6 * lq + 6 * lk)     # fwd q,k,v,o + bwd q,k,v,o,do,dq,dk,dv
    return fwd, io * (2 * lq + 2 * lk)


def _add_flex(case: Case, q, k, v, leaves, grad, mask_mod, batch, lq, lk, device) -> None:
    """Compiled FlexAttention: block mask prebuilt; mask build (compiled) included; mask build alone."""
    if device != "cuda" or compiled_skipped():
        why = ("FlexAttention runs on the GPU only here (no CPU backward)" if device != "cuda" else
               "Inductor-compiled: timed in a separate pass (--compiled only)")
        for n in ("flex (mask prebuilt)", "flex + create_block_mask", "create_block_mask only"):
            case.skipped[n] = why
        return
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception as exc:
        case.skipped["flex (mask prebuilt)"] = f"flex_attention not importable: {exc}"
        return
    flex = torch.compile(flex_attention, dynamic=False)

    def build():
        if mask_mod is None:
            return None
        return create_block_mask(mask_mod, batch, None, lq, lk, device=device, _compile=True)

    block = build()
    _try(case, "flex (mask prebuilt)", "flex (inductor)",
         lambda: _fwd_bwd(lambda: flex(q, k, v, block_mask=block), leaves, grad))
    if mask_mod is not None:
        _try(case, "flex + create_block_mask", "flex (inductor)",
             lambda: _fwd_bwd(lambda: flex(q, k, v, block_mask=build()), leaves, grad))
        _try(case, "create_block_mask only", "create_block_mask (inductor)", build)


# ------------------------------------------------------------------------------------ self-attention
def _self_attn_case(device: str, batch: int, mode: str, train: bool, with_flex: bool = True) -> Case:
    dtype = _dtype(device)
    L = NQ + T_TEXT
    flops, nbytes = _attention_counts(batch, L, L, dtype, train)

    def setup(case: Case) -> None:
        from vlmkern import ops
        from vlmkern.masks import qformer_visible
        from vlmkern.reference.attention import qformer_attention_mask

        q, k, v = _leaves(device, dtype, *[(batch, H, L, D)] * 3)
        leaves = [q, k, v]
        pad = _text_padding(batch, T_TEXT, device)
        grad = torch.randn(batch, H, L, D, device=device, dtype=dtype) if train else None
        keep = qformer_attention_mask(NQ, mode, pad, q_len=L, k_len=L, batch=batch, device=device)  # (B,1,L,L)
        additive = torch.zeros(keep.shape, device=device, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)

        case.backends["vlmkern"] = _backend("qformer_attention", q, k)
        case.impls["vlmkern"] = lambda: _fwd_bwd(
            lambda: ops.qformer_attention(q, k, v, num_query=NQ, mode=mode, text_mask=pad), leaves, grad)

        sdpa = torch.nn.functional.scaled_dot_product_attention
        if device == "cuda":
            from torch.nn.attention import sdpa_kernel
            for name in SDPA_BACKENDS:
                def run(name=name):
                    with sdpa_kernel([_sdpa_backend(name)]):
                        return _fwd_bwd(lambda: sdpa(q, k, v, attn_mask=keep), leaves, grad)
                _try(case, f"sdpa {name} +mask", f"sdpa {name}", run)
        else:
            _try(case, "sdpa +mask", "sdpa default",
                 lambda: _fwd_bwd(lambda: sdpa(q, k, v, attn_mask=keep), leaves, grad))

        real = torch.cat([torch.ones(batch, NQ, dtype=torch.bool, device=device), pad], 1)

        def mask_mod(b, h, qi, ki):
            return qformer_visible(mode, NQ, qi, ki) & real[b, ki]
        if with_flex:
            _add_flex(case, q, k, v, leaves, grad, mask_mod, batch, L, L, device)

        eager, why = _hf_eager()
        if eager is None:
            case.skipped["hf eager"] = why
        else:
            dummy = torch.nn.Module().eval()
            _try(case, "hf eager", "torch eager", lambda: _fwd_bwd(
                lambda: eager(dummy, q, k, v, additive, scaling=D ** -0.5)[0].transpose(1, 2), leaves, grad))
        xops, why = _xformers()
        if xops is None:
            case.skipped["xformers"] = why
        else:
            bias = additive.expand(batch, H, L, L)
            _try(case, "xformers", "xformers", lambda: _fwd_bwd(lambda: xops.memory_efficient_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias).transpose(1, 2),
                leaves, grad))

    targets = {}
    if device == "cuda" and train:
        targets = {f"sdpa {n} +mask": 2.0 for n in SDPA_BACKENDS} | {"flex + create_block_mask": 1.5}
    tag = "fwd+bwd" if train else "fwd"
    return Case(name=f"{MODE_LABEL[mode]} B={batch}", group=f"self-attn {tag}", flops=flops, bytes=nbytes, setup=setup,
                shape=f"(B={batch}, H={H}, L={NQ}+{T_TEXT}, d={D}) {str(dtype).replace('torch.', '')} {mode}",
                targets=targets,
                notes=["FLOPs count every score entry, masked ones too (dense attention)",
                       "SDPA gets the dense (B,1,L,L) bool mask prebuilt (not timed); flex rows: mask prebuilt, "
                       "build included, build alone (create_block_mask(_compile=True))"])


# ----------------------------------------------------------------------------------- cross-attention
def _cross_attn_case(device: str, batch: int, lk: int, train: bool, with_flex: bool = True) -> Case:
    dtype = _dtype(device)
    flops, nbytes = _attention_counts(batch, NQ, lk, dtype, train)

    def setup(case: Case) -> None:
        from vlmkern import ops

        q, k, v = _leaves(device, dtype, (batch, H, NQ, D), (batch, H, lk, D), (batch, H, lk, D))
        leaves = [q, k, v]
        grad = torch.randn(batch, H, NQ, D, device=device, dtype=dtype) if train else None
        case.backends["vlmkern"] = _backend("cross_attention", q, k)
        case.impls["vlmkern"] = lambda: _fwd_bwd(lambda: ops.cross_attention(q, k, v), leaves, grad)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        if device == "cuda":
            from torch.nn.attention import sdpa_kernel
            for name in SDPA_BACKENDS:
                def run(name=name):
                    with sdpa_kernel([_sdpa_backend(name)]):
                        return _fwd_bwd(lambda: sdpa(q, k, v), leaves, grad)
                _try(case, f"sdpa {name}", f"sdpa {name}", run)
        else:
            _try(case, "sdpa", "sdpa default", lambda: _fwd_bwd(lambda: sdpa(q, k, v), leaves, grad))
        if with_flex:
            _add_flex(case, q, k, v, leaves, grad, None, batch, NQ, lk, device)
        eager, why = _hf_eager()
        if eager is None:
            case.skipped["hf eager"] = why
        else:
            dummy = torch.nn.Module().eval()
            _try(case, "hf eager", "torch eager",
                 lambda: _fwd_bwd(lambda: eager(dummy, q, k, v, None, scaling=D ** -0.5)[0].transpose(1, 2), leaves,
                                  grad))
        xops, why = _xformers()
        if xops is None:
            case.skipped["xformers"] = why
        else:
            _try(case, "xformers", "xformers", lambda: _fwd_bwd(lambda: xops.memory_efficient_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2), leaves, grad))

    tag = "fwd+bwd" if train else "fwd"
    notes = ["memory-bound: GPU target >= 70 % of the measured copy ceiling (pct_copy_peak column)"]
    return Case(name=f"Lk={lk} B={batch}", group=f"cross-attn {tag}", flops=flops, bytes=nbytes, setup=setup,
                shape=f"(B={batch}, H={H}, Lq={NQ}, Lk={lk}, d={D}) {str(dtype).replace('torch.', '')}",
                notes=notes)


# ------------------------------------------------------------------------------------- whole Q-Former
def _qformer_counts(cfg, rows: int, images: int, t: int, lk: int, train: bool, elem: int) -> tuple[float, float]:
    Dm, F, E = cfg.hidden_size, cfg.intermediate_size, cfg.encoder_hidden_size
    L = NQ + t
    per_layer = 2 * rows * L * Dm * 3 * Dm + 4 * rows * L * L * Dm + 2 * rows * L * Dm * Dm + 4 * rows * L * Dm * F
    image_kv = 2 * images * lk * E * 2 * Dm          # the image K/V projections: no gradient to the image tokens
    cross = 2 * rows * NQ * Dm * Dm * 2 + image_kv + 4 * rows * NQ * lk * Dm
    n_cross = len(range(0, cfg.num_hidden_layers, cfg.cross_attention_frequency))
    fwd = cfg.num_hidden_layers * per_layer + n_cross * cross
    params = (cfg.num_hidden_layers * (4 * Dm * Dm + 2 * Dm * F + (2 * Dm * F if t else 0))
              + n_cross * (2 * Dm * Dm + 2 * E * Dm))
    io = rows * L * Dm * 2 + images * lk * E
    # training: 3x the forward (forward, input and weight gradients), but 2x for the image K/V GEMMs, whose
    # inputs (the frozen vision tower's tokens) need no gradient
    flops = 3 * fwd - n_cross * image_kv if train else fwd
    return flops, elem * ((3 if train else 1) * params + (2 if train else 1) * io)


def _qformer_case(device: str, pairs: int, t: int, lk: int, train: bool, layers: int = 12,
                  compile_ref: bool = False) -> Case:
    """ITM batch of ``3 * pairs`` rows [pos, (text, neg image), (neg text, image)] over ``2 * pairs`` images
    (``t > 0``), or ``pairs`` query-only rows (stage-2 path, ``t == 0``). ``layers`` < 12: a shortened
    BLIP-2 Q-Former (real widths) for the quick CPU run."""
    dtype = _dtype(device)
    rows = 3 * pairs if t else pairs
    images = 2 * pairs if t else pairs

    from transformers import Blip2QFormerConfig

    def make_config():
        return Blip2QFormerConfig(use_qformer_text_input=True, num_hidden_layers=layers)

    cfg = make_config()
    flops, nbytes = _qformer_counts(cfg, rows, images, t, lk, train, torch.finfo(dtype).bits // 8)

    def setup(case: Case) -> None:
        from transformers import Blip2QFormerModel as HFModel

        from vlmkern.models.blip2 import Blip2QFormerModel

        torch.manual_seed(0)
        hf_cfg = make_config()
        hf_cfg._attn_implementation = "eager"
        hf = HFModel(hf_cfg).to(device=device, dtype=dtype).eval()
        ours = Blip2QFormerModel.from_transformers(hf)
        hf_sdpa = HFModel(make_config()).to(device=device, dtype=dtype).eval()
        hf_sdpa.load_state_dict(hf.state_dict())
        if hasattr(hf_sdpa, "set_attn_implementation"):
            hf_sdpa.set_attn_implementation("sdpa")

        g = torch.Generator().manual_seed(0)
        x = (torch.randn(rows, NQ + t, cfg.hidden_size, generator=g)).to(device, dtype).requires_grad_(train)
        distinct = torch.randn(images, lk, ENCODER_WIDTH, generator=g).to(device, dtype)
        if t:
            p = torch.arange(pairs)
            index = torch.cat([p, pairs + p, p]).to(device)         # [img, img_neg, img]
            mask = torch.cat([torch.ones(rows, NQ, dtype=torch.long, device=device),
                              _text_padding(rows, t, device).long()], 1)
        else:
            index, mask = None, None
        expanded = distinct if index is None else distinct[index].contiguous()
        kw = dict(query_length=NQ, attention_mask=mask)
        grad = torch.randn(rows, NQ + t, cfg.hidden_size, device=device, dtype=dtype) if train else None

        def run(model, **extra):
            leaves = [x] + list(model.parameters())
            return lambda: _fwd_bwd(lambda: model(x, **kw, **extra).last_hidden_state, leaves, grad)

        probe = torch.empty(1, H, 1, D, device=device, dtype=dtype)
        case.backends["vlmkern"] = _backend("qformer_attention", probe, probe)
        case.impls["vlmkern"] = run(ours, encoder_hidden_states=expanded)
        if index is not None:
            case.backends["vlmkern dedup"] = case.backends["vlmkern"]
            case.impls["vlmkern dedup"] = run(ours, encoder_hidden_states=distinct, encoder_batch_index=index)
        case.backends["hf eager"] = "transformers eager"
        case.impls["hf eager"] = run(hf, encoder_hidden_states=expanded)
        case.backends["hf sdpa"] = "transformers sdpa"
        case.impls["hf sdpa"] = run(hf_sdpa, encoder_hidden_states=expanded)
        if compile_ref:
            compiled = torch.compile(hf_sdpa, dynamic=False)
            case.backends["torch.compile hf sdpa"] = "inductor"
            leaves = [x] + list(hf_sdpa.parameters())
            case.impls["torch.compile hf sdpa"] = lambda: _fwd_bwd(
                lambda: compiled(x, **kw, encoder_hidden_states=expanded).last_hidden_state, leaves, grad)
        if device == "cuda":    # one extra untimed call each: lazy CUDA init out of the timing (the CPU's
            for name, fn in case.impls.items():     # round-robin timing makes an untimed first call itself);
                if not is_compiled(name, case.backends.get(name)):  # compiling is left to the pass timing it
                    fn()

    targets = {"hf eager": 1.0, "hf sdpa": 1.0} if device == "cpu" else {}
    tag = "fwd+bwd" if train else "fwd"
    what = f"ITM {rows} rows / {images} images, {NQ}+{t} tokens" if t else f"queries only, {rows} images"
    depth = "" if layers == 12 else f" {layers} layers"
    return Case(name=f"{'ITM' if t else 'query'} B={rows} Lk={lk}{depth}", group=f"qformer {tag}", flops=flops,
                bytes=nbytes, setup=setup, targets=targets,
                shape=f"BLIP-2 Q-Former{depth or ' (12 layers)'}, {what}, {lk}x{ENCODER_WIDTH} image tokens "
                      f"{str(dtype).replace('torch.', '')}",
                notes=["eval mode (no dropout); same weights; text padded at random lengths"])


# -------------------------------------------------------------------------------------------- cases
def _have_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except Exception:
        return False
    return True


def cases(device: str, quick: bool = False, smoke: bool = False) -> list[Case]:
    """Attention cases always; the whole-Q-Former cases when transformers (baseline and config) is installed."""
    qformer = _have_transformers()
    comp = compiled_baselines(device, quick)
    if smoke:
        return [_self_attn_case(device, 2, "bidirectional", True), _cross_attn_case(device, 2, 257, True)]
    if device == "cuda":
        modes = ("bidirectional",) if quick else ("bidirectional", "unimodal", "multimodal_causal")
        out = [_self_attn_case(device, 256, m, True) for m in modes]
        out += [_cross_attn_case(device, 256, lk, True) for lk in IMAGE_TOKENS]
        out += [_cross_attn_case(device, 256, lk, False) for lk in IMAGE_TOKENS]
        if qformer:
            out += [_qformer_case(device, 32, T_TEXT, 257, True, compile_ref=comp)]
            if not quick:
                out += [_qformer_case(device, 64, 0, 257, False, compile_ref=comp),
                        _qformer_case(device, 64, 0, 677, True)]
        return out
    if quick:
        out = [_self_attn_case(device, 32, "bidirectional", True), _cross_attn_case(device, 16, 257, True)]
        return out + ([_qformer_case(device, 1, T_TEXT, 257, True, layers=2)] if qformer else [])
    out = ([_self_attn_case(device, 64, m, True) for m in ("bidirectional", "multimodal_causal")]
           + [_cross_attn_case(device, 32, lk, True) for lk in IMAGE_TOKENS])
    if qformer:
        out += [_qformer_case(device, 2, T_TEXT, 257, True), _qformer_case(device, 4, 0, 257, False)]
    return out
