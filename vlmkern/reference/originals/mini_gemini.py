"""Port of Mini-Gemini's patch info mining (dvlab-research/MGM, ``mgm/model/mgm_arch.py``: the three projectors
of ``MGMMetaModel.initialize_uni_modules`` and ``MGMMetaForCausalLM.unified_resampler``; checked against commit
40afeef83b6d8eb3e678e1d43cdeb1fe3ffc34b2): re-arranged HR copy, K and V materialised, softmax in the input dtype."""
from torch import nn


def unified_resampler(images, images_aux, query_projector, aux_projector, val_projector):
    """``unified_resampler`` with ``self.get_model().vlm_uni_*_projector`` passed in (any callables):
    ``images (B, N, C)`` LR tokens, ``images_aux (B, C_aux, PN*M, PN*M)``, ``N = PN²`` -> ``embed_feat (B, N, C)``."""
    patch_num = int(images.shape[1] ** 0.5)
    patch_size = images_aux.shape[-1] // patch_num
    images_aux = images_aux.permute(0, 2, 3, 1)
    images_aux = images_aux.reshape(len(images_aux), patch_num, patch_size, patch_num, patch_size,
                                    images_aux.shape[-1])
    images_aux = images_aux.permute(0, 1, 3, 2, 4, 5)
    images_aux = images_aux.reshape(len(images_aux), patch_num ** 2, patch_size ** 2,
                                    images_aux.shape[-1]).contiguous()
    embed_query = query_projector(images)
    embed_aux = aux_projector(images_aux)
    embed_value = val_projector(images_aux)
    embed_att = embed_query[:, :, None] @ (embed_aux.transpose(-1, -2) / (embed_aux.shape[-1] ** 0.5))
    embed_att = embed_att.nan_to_num()
    return (embed_att.softmax(-1) @ embed_value).mean(2)


class UniModules(nn.Module):
    """The ``vlm_uni_{query,aux,val}_projector`` modules (``Sequential(LayerNorm, Linear)``, original names) with
    ``forward(images, images_aux) -> (images, embed_feat)`` = ``unified_resampler``; the caller adds the two."""

    def __init__(self, mm_hidden_size, mm_hidden_size_aux):
        super().__init__()
        self.vlm_uni_query_projector = nn.Sequential(nn.LayerNorm(mm_hidden_size),
                                                     nn.Linear(mm_hidden_size, mm_hidden_size))
        self.vlm_uni_aux_projector = nn.Sequential(nn.LayerNorm(mm_hidden_size_aux),
                                                   nn.Linear(mm_hidden_size_aux, mm_hidden_size))
        self.vlm_uni_val_projector = nn.Sequential(nn.LayerNorm(mm_hidden_size_aux),
                                                   nn.Linear(mm_hidden_size_aux, mm_hidden_size))

    def forward(self, images, images_aux):
        return images, unified_resampler(images, images_aux, self.vlm_uni_query_projector,
                                         self.vlm_uni_aux_projector, self.vlm_uni_val_projector)
