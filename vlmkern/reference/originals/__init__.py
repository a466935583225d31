"""Faithful ports of the original implementations that have no transformers class: the parity oracle for
``vlmkern.models`` (``python -m vlmkern parity``, the tests and the benchmarks all use these, and only these).

One module per original, each naming the repository and file it ports:

* ``qwen_vl``: Qwen-VL ``visual.py`` ``Resampler`` (+ ``get_abs_pos``, the MAE sin-cos table);
* ``internlm_xcomposer2``: InternLM-XComposer2 ``build_mlp.py`` ``PLoRA`` and the ``modeling_internlm2.py``
  decoder layer with PLoRA linears;
* ``internlm_xcomposer2_hd``: InternLM-XComposer2-4KHD ``HD_transform`` and ``CLIPVisionTower.forward``'s layout;
* ``cogvlm``: CogVLM ``modeling_cogvlm.py`` visual-expert MLP / attention (+ ``build_position_ids``);
* ``cogagent``: CogAgent ``modeling_cogagent.py`` high-resolution ``CrossAttention`` + ``attention_fn``;
* ``mini_gemini``: Mini-Gemini ``mgm_arch.py`` ``unified_resampler`` and its three projectors;
* ``llava``: the original LLaVA-NeXT AnyRes packing (``mm_utils.py``, ``llava_arch.py``), whose size conventions and
  rounding transformers changed.

The ports compute what the originals compute, in the same order of operations (quirks included: the PLoRA
``× 0`` branch, CogVLM's boolean gather / scatter, Mini-Gemini's softmax in the input dtype). They are plain
PyTorch (and numpy / PIL where the original used them) and never import ``vlmkern.ops``, ``vlmkern.nn`` or
``vlmkern.models``: they are what those are checked against. Commits are named where the port was checked
against a stored version of the file; the model-hub files (Qwen-VL, CogVLM, CogAgent, IXC2) are not pinned.
"""
